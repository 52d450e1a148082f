"""`share_kernels`: clusters the spatial kernels of a convolution into k shared kernels per layer; the conv
then reads a kernel bank through an index (a `Codebook` whose centroids are kernels)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import attr
from netsqueeze.ir.weights import Centroids, Codebook, nbytes
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.prune import weighted_nodes
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.share_weights import kmeanspp_rows

MAX_ITER = 100


def kmeans_rows(v: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of `v` (float64): k-means++ seeding from `gen`, Lloyd iterations to a fixed
    point (or `MAX_ITER`); an emptied cluster keeps its centre. Returns (centres [k', d], assignment)."""
    c = v[kmeanspp_rows(v, k, gen)]
    assign = torch.cdist(v, c).argmin(1)
    for _ in range(MAX_ITER):
        cnt = torch.bincount(assign, minlength=c.shape[0]).to(torch.float64)
        sums = torch.zeros_like(c).index_add_(0, assign, v)
        c = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], c)
        new = torch.cdist(v, c).argmin(1)
        if bool((new == assign).all()):
            break
        assign = new
    used = torch.unique(assign)
    return c[used], torch.searchsorted(used, assign)


@register_pass
@dataclass(frozen=True)
class ShareKernels(TransformPass):
    """Kernel sharing inside a convolution (Bidart, "Representational redundancy reduction strategies for
    efficient neural network architectures for visual and language tasks", Waterloo 2023): the kh×kw
    kernels of a conv layer are clustered (k-means, k-means++ seeding from the compile seed) into at most
    `k` shared kernels, and the weight becomes a `Codebook` of indices [out, in/groups] into a kernel
    bank [k, kh, kw]: the conv reads its kernels through the index (torch: a decode module; ONNX:
    `Gather(bank, indices)`), so storage is k·kh·kw values plus ⌈log2 k⌉ bits per kernel.

    `convs = depthwise` (default) acts on the selected depthwise convs only (groups = in_channels = out
    channels; their kernels are purely spatial, where the method works best); `convs = all` also on
    regular and grouped convs. 1×1 convs (a kernel is one number: that is `share_weights`) and convs with
    at most k kernels are left as they are, with a note.

    Needs: dense or sparse conv weights (a shared or quantized weight is a located `WeightFormError`).
    Reports per layer the kernels, the bank size, the bytes before → after and the relative weight error
    (notes), and in total (metrics).
    """

    name: ClassVar[str] = "share_kernels"
    k: int = field(default=16, metadata={"min": 1, "max": 65536, "doc": "shared kernels per layer"})
    convs: Literal["depthwise", "all"] = "depthwise"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = [n for n in weighted_nodes(graph, ctx, self.name) if n.kind == "conv"]
        result = PassResult()
        before = after = 0
        err = ref = 0.0
        for i, n in enumerate(nodes):
            w = n.dense("weight", accept=frozenset({"sparse"}))
            out_c, per_group = int(w.shape[0]), int(w.shape[1])
            groups = int(attr(n, "groups"))
            depthwise = per_group == 1 and groups == out_c
            if self.convs == "depthwise" and not depthwise:
                continue
            tail = tuple(int(d) for d in w.shape[2:])
            kernels = out_c * per_group
            if math.prod(tail) <= 1 or kernels <= self.k:
                why = "1x1 kernels" if math.prod(tail) <= 1 else f"only {kernels} kernels"
                result.notes.append(f"{n.id}: left as it is ({why})")
                continue
            v = w.detach().reshape(kernels, -1).to(torch.float64)
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)
            bank, assign = kmeans_rows(v, self.k, gen)
            old = nbytes(n.params["weight"])
            cb = Codebook(assign.reshape(out_c, per_group), Centroids(bank.reshape(-1, *tail).to(w.dtype), n.id))
            n.params["weight"] = cb
            new = nbytes(cb)
            e = float((cb.dense().double() - w.double()).norm())
            r = float(w.double().norm())
            before, after, err, ref = before + old, after + new, err + e * e, ref + r * r
            kind = "depthwise" if depthwise else f"groups={groups}" if groups > 1 else "regular"
            result.notes.append(f"{n.id} ({kind}): {kernels} kernels -> {cb.k} shared, {old} -> {new} bytes, "
                                f"weight error {e / max(r, 1e-30):.3f}")
            result.touched.add(n.id)
        result.changed = bool(result.touched)
        if not result.changed:
            result.notes.append(f"no {'depthwise ' if self.convs == 'depthwise' else ''}conv with more than "
                                f"{self.k} spatial kernels among the selected nodes")
        result.metrics.update({"layers": float(len(result.touched)), "bytes_before": float(before),
                               "bytes_after": float(after),
                               "weight_rel_error": math.sqrt(err / ref) if ref else 0.0})
        return result
