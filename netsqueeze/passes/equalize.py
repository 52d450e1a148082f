"""`equalize`: cross-layer equalization (Nagel, van Baalen, Blankevoort & Welling, "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.ops import attr
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import register_pass

# activations f with f(x / s) = f(x) / s for every s > 0
HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})


def _is_depthwise(node: Node) -> bool:
    return node.kind == "conv" and attr(node, "groups") == node.params["weight"].shape[0] \
        and node.params["weight"].shape[1] == 1


def _pairs(graph: Graph, ctx: PassContext) -> list[tuple[str, str]]:
    """(first, second) layer pairs joined through at most one positively homogeneous activation, where the
    first layer's output channels are exactly the second's input channels and nothing else reads them."""
    out = []
    for node in graph.nodes():
        if node.kind not in ("conv", "linear") or not ctx.is_selected(node.id):
            continue
        if not isinstance(node.params.get("weight"), torch.Tensor):
            continue
        if node.kind == "conv" and attr(node, "groups") != 1 and not _is_depthwise(node):
            continue
        if node.kind == "linear" and len(node.meta[0].shape) != 2:
            continue
        cur = node.id
        users = graph.users(cur)
        if len(users) == 1 and graph.node(users[0][0]).kind in HOMOGENEOUS:
            cur = users[0][0]
            users = graph.users(cur)
        if len(users) != 1 or users[0][1] != 0:
            continue
        nxt = graph.node(users[0][0])
        if nxt.kind != node.kind or not ctx.is_selected(nxt.id) or not isinstance(nxt.params.get("weight"), torch.Tensor):
            continue
        if nxt.kind == "conv" and attr(nxt, "groups") != 1 and not _is_depthwise(nxt):
            continue
        out.append((node.id, nxt.id))
    return out


@register_pass
@dataclass(frozen=True)
class Equalize(TransformPass):
    """Scales output channel i of a conv/linear layer by 1/sᵢ and input channel i of the next layer by sᵢ,
    through a ReLU or leaky ReLU (positively homogeneous, so the network's function is unchanged), with
    sᵢ = √(r1ᵢ·r2ᵢ)/r2ᵢ where r1ᵢ = max|W1[i]| and r2ᵢ = max|W2[:, i]|: both layers' per-channel weight
    ranges become √(r1ᵢ·r2ᵢ), which per-tensor and per-channel int8 grids represent far better when the
    ranges differ widely (depthwise convs). Chains of layers are swept `iterations` times, or until the
    largest relative scale change is under `tolerance`. Depthwise convs take part on either side.

    Needs no data. Runs before `quantize`; after `fold_bn` (a BatchNorm between two layers stops a pair).
    Channels whose range is zero on either side keep sᵢ = 1.
    """

    name: ClassVar[str] = "equalize"
    exact: ClassVar[bool] = True
    preserves: ClassVar[frozenset[str] | None] = frozenset({"shape_inference"})
    iterations: int = field(default=20, metadata={"min": 1, "max": 1000})
    tolerance: float = field(default=1e-6, metadata={"min": 0.0})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pairs = _pairs(graph, ctx)
        result = PassResult()
        if not pairs:
            result.notes.append("equalize: no conv/linear pair joined through a ReLU")
            return result
        sweeps = 0
        for _ in range(self.iterations):
            sweeps += 1
            change = max(self._equalize(graph.node(a), graph.node(b)) for a, b in pairs)
            if change < self.tolerance:
                break
        result.changed = True
        result.touched = {n for p in pairs for n in p}
        result.metrics.update({"pairs": float(len(pairs)), "sweeps": float(sweeps)})
        return result

    @staticmethod
    def _equalize(first: Node, second: Node) -> float:
        w1 = first.dense("weight").to(torch.float64)
        w2 = second.dense("weight").to(torch.float64)
        dt1, dt2 = first.dense("weight").dtype, second.dense("weight").dtype
        c = w1.shape[0]
        r1 = w1.abs().reshape(c, -1).amax(1)
        if _is_depthwise(second):
            r2 = w2.abs().reshape(c, -1).amax(1)
        else:
            r2 = w2.abs().transpose(0, 1).reshape(c, -1).amax(1)
        ok = (r1 > 0) & (r2 > 0)
        s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))
        view1 = [c] + [1] * (w1.dim() - 1)
        first.params["weight"] = (w1 / s.reshape(view1)).to(dt1)
        if "bias" in first.params:
            b = first.dense("bias")
            first.params["bias"] = (b.to(torch.float64) / s).to(b.dtype)
        if _is_depthwise(second):
            w2n = w2 * s.reshape([c] + [1] * (w2.dim() - 1))
        else:
            w2n = w2 * s.reshape([1, c] + [1] * (w2.dim() - 2))
        second.params["weight"] = w2n.to(dt2)
        return float((s - 1).abs().max())
