"""A per-op-kind latency cost model, fitted on the machine from a few real measurements.

A model's predicted time is a sum over its nodes of an affine function per op kind:

    t(G) = c + Σ_kind (n_kind · α_kind + W_kind · β_kind)

where W_kind is the work of the kind's nodes (FLOPs for compute-bound kinds: convolutions split by kernel size
and dense/depthwise/grouped form, linear, matmul, attention; bytes moved, inputs plus outputs, for the
memory-bound rest: elementwise, pooling, norms, reshapes), n_kind their count and c the fixed cost of running
any graph. The coefficients are fitted by non-negative least squares (time never falls with more work) on
measurements of the model itself and of channel-scaled variants of it (`latency_budget.variants`). A norm that
folds into the convolution or linear layer before it (the only consumer of its output) has no kind of its own:
`fold_bn` removes it and runtimes fuse it, so its cost is its producer's.

Columns that the measurements cannot tell apart (channel-scaled variants keep every node, so the node counts
move together with the fixed cost) are left out of the fit in a fixed order, the fixed cost and the work
columns first: their share lands on the columns kept, and `CostModel.folded` names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.ops import node_flops
from netsqueeze.ir.weights import form_of

FREE = frozenset({"input", "output", "constant"})
COMPUTE = frozenset({"conv", "conv_transpose", "linear", "matmul", "attention"})
FOLDABLE_NORMS = frozenset({"batch_norm"})
_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int64": 8, "int32": 4,
          "int16": 2, "bool": 1}
# channel blocks a CPU runtime may compute convolutions in (ONNX Runtime's NCHWc layout: 8 channels with AVX2,
# 16 with AVX-512; 1: no blocking): the fit picks the one that explains the measurements best
BLOCKS = (1, 8, 16)
RANK_TOL = 1e-9  # a column whose part outside the kept columns' span is below this (relative) is left out


@dataclass(frozen=True)
class Work:
    """What a graph asks of the runtime, per op kind: work (FLOPs or bytes moved) and node count."""

    work: Mapping[str, float]
    count: Mapping[str, int]

    def scaled(self, s: float) -> Work:
        """The same graph run at `s` times the batch: work scales, node counts do not."""
        return Work({k: v * s for k, v in self.work.items()}, dict(self.count))


def _conv_kind(node: Node) -> str:
    w = node.params["weight"]
    shape = tuple(int(d) for d in w.shape)
    groups = int(node.attrs.get("groups", 1) or 1)
    form = "dense" if groups == 1 else "depthwise" if shape[1] == 1 else "grouped"
    kernel = "x".join(str(k) for k in shape[2:]) or "1"
    enc = form_of(w)
    return f"{node.kind} {kernel} {form}" + ("" if enc == "dense" else f" {enc}")


def _bytes(metas: Sequence[object]) -> float:
    return float(sum(m.numel() * _SIZES.get(m.dtype, 4) for m in metas))  # type: ignore[attr-defined]


def _folds_into_producer(graph: Graph, node: Node) -> bool:
    if node.kind not in FOLDABLE_NORMS:
        return False
    ops = graph.operands(node.id)
    if not ops:
        return False
    src = graph.node(ops[0][0])
    return src.kind in ("conv", "conv_transpose", "linear") and graph.consumers(src.id) == [node.id]


def _pad(c: int, block: int) -> int:
    return -(-c // block) * block


def padded_channels(out_c: int, in_c: int, block: int) -> tuple[int, int]:
    """(output, input) channels of a dense convolution as a runtime computing in blocks of `block` runs them:
    output channels rounded up to whole blocks, input channels too when there are at least `block` of them
    (fewer run unblocked)."""
    if block <= 1:
        return out_c, in_c
    return _pad(out_c, block), (_pad(in_c, block) if in_c >= block else in_c)


def _conv_padding(node: Node, block: int) -> float:
    """How much more a convolution computes when its channels run in blocks of `block` (`padded_channels`), per
    group for a depthwise one."""
    if block <= 1:
        return 1.0
    shape = tuple(int(d) for d in node.params["weight"].shape)
    groups = int(node.attrs.get("groups", 1) or 1)
    out_c, in_c = (shape[0], shape[1]) if node.kind == "conv" else (shape[1] * groups, shape[0] // max(1, groups))
    if groups == 1:
        out_p, in_p = padded_channels(out_c, in_c, block)
        return out_p * in_p / (out_c * in_c)
    if groups == out_c and in_c == 1:  # depthwise: the channels are the groups
        return _pad(out_c, block) / out_c
    return 1.0


def _padded_flops(graph: Graph, node: Node, block: int) -> float:
    """A convolution's FLOPs with its channels padded to `block` (`_conv_padding`)."""
    return float(node_flops(graph, node)) * _conv_padding(node, block)


def op_kind(graph: Graph, node: Node, block: int = 1) -> tuple[str, float] | None:
    """The node's kind in the cost model and its work (FLOPs, convolutions' with channels padded to `block`,
    or bytes moved); None for nodes that cost nothing of their own (graph inputs, outputs, constants, norms
    folded into their producer)."""
    if node.kind in FREE or _folds_into_producer(graph, node):
        return None
    if node.kind in ("conv", "conv_transpose") and "weight" in node.params:
        return _conv_kind(node), _padded_flops(graph, node, block)
    if node.kind in COMPUTE:
        return node.kind, float(node_flops(graph, node))
    return "memory", _bytes(graph.input_metas(node.id)) + _bytes(node.meta)


def graph_work(graph: Graph, block: int = 1) -> Work:
    work: dict[str, float] = {}
    count: dict[str, int] = {}
    for node in graph.nodes():
        kw = op_kind(graph, node, block)
        if kw is None:
            continue
        work[kw[0]] = work.get(kw[0], 0.0) + kw[1]
        count[kw[0]] = count.get(kw[0], 0) + 1
    return Work(work, count)


def unit(kind: str) -> str:
    return "byte" if kind == "memory" else "FLOP"


@dataclass(frozen=True)
class CostModel:
    """t = fixed + Σ per_node[k]·n_k + Σ per_work[k]·W_k, in seconds; `folded`: columns the fit could not
    separate from the others (their coefficient is 0 here, their cost in the columns kept)."""

    fixed: float
    per_work: Mapping[str, float]
    per_node: Mapping[str, float]
    folded: tuple[str, ...] = ()
    residual: float = 0.0  # root-mean-square error of the fit over its points, seconds
    points: int = 0
    block: int = 1  # the channel block the convolutions' work was counted in

    def predict(self, w: Work) -> float:
        return (self.fixed + sum(self.per_work.get(k, 0.0) * v for k, v in w.work.items())
                + sum(self.per_node.get(k, 0.0) * n for k, n in w.count.items()))

    def describe(self) -> str:
        """The coefficients for the report: per kind, time per work unit (and per node when fitted)."""
        parts = [f"fixed {self.fixed * 1e3:.4g} ms"]
        for k in sorted(self.per_work):
            parts.append(f"{k} {self.per_work[k] * 1e12:.4g} ps/{unit(k)}"
                         + (f" + {self.per_node[k] * 1e6:.4g} us/node" if self.per_node.get(k) else ""))
        for k in sorted(set(self.per_node) - set(self.per_work)):
            if self.per_node[k]:
                parts.append(f"{k} {self.per_node[k] * 1e6:.4g} us/node")
        notes = [f"conv channels in blocks of {self.block}"] if self.block > 1 else []
        notes.append(f"NNLS on {self.points} measurements, rms {self.residual * 1e3:.3g} ms")
        if self.folded:
            notes.append(f"not separable, folded into the rest: {', '.join(self.folded)}")
        return ", ".join(parts) + " (" + "; ".join(notes) + ")"


@dataclass
class _Design:
    names: list[str] = field(default_factory=list)  # "fixed", "work:<kind>", "node:<kind>"
    columns: list[np.ndarray] = field(default_factory=list)


def _design(points: Sequence[Work]) -> _Design:
    kinds = sorted({k for w in points for k in w.work} | {k for w in points for k in w.count})
    d = _Design()
    d.names.append("fixed")
    d.columns.append(np.ones(len(points)))
    for k in kinds:
        d.names.append(f"work:{k}")
        d.columns.append(np.array([float(w.work.get(k, 0.0)) for w in points]))
    for k in kinds:
        d.names.append(f"node:{k}")
        d.columns.append(np.array([float(w.count.get(k, 0)) for w in points]))
    return d


def fit_cost_model(points: Sequence[tuple[Work, float]], block: int = 1) -> CostModel:
    """Non-negative least squares of the per-kind model over (work, seconds) points.

    Columns are scaled to unit norm and kept in order (fixed cost, then work per kind, then node count per
    kind) while they add a direction the kept ones do not span; the rest are `folded`. With as many
    independent points as kept columns and timings from known non-negative coefficients, the fit returns
    those coefficients."""
    if not points:
        raise NetsqueezeError("the latency cost model needs at least one measurement")
    works = [w for w, _ in points]
    y = np.array([float(t) for _, t in points])
    if not np.all(np.isfinite(y)) or np.any(y < 0):
        raise NetsqueezeError(f"latency measurements must be finite and non-negative, got {y.tolist()}")
    d = _design(works)
    kept: list[int] = []
    basis: list[np.ndarray] = []
    folded: list[str] = []
    for i, col in enumerate(d.columns):
        norm = float(np.linalg.norm(col))
        if norm == 0.0:
            continue  # a kind absent from every point: nothing to fit
        v = col / norm
        r = v.copy()
        for q in basis:
            r -= (q @ r) * q
        rn = float(np.linalg.norm(r))
        if rn <= RANK_TOL or len(kept) >= len(points):
            folded.append(d.names[i].split(":", 1)[-1] + (" per node" if d.names[i].startswith("node:") else ""))
            continue
        basis.append(r / rn)
        kept.append(i)
    scale = np.array([float(np.linalg.norm(d.columns[i])) for i in kept])
    a = np.stack([d.columns[i] / s for i, s in zip(kept, scale)], axis=1)
    coef_scaled, _ = nnls(a, y)
    coef = coef_scaled / scale
    fixed = 0.0
    per_work: dict[str, float] = {}
    per_node: dict[str, float] = {}
    for i, c in zip(kept, coef):
        name = d.names[i]
        if name == "fixed":
            fixed = float(c)
        elif name.startswith("work:"):
            per_work[name[5:]] = float(c)
        else:
            per_node[name[5:]] = float(c)
    resid = float(np.sqrt(np.mean((a @ coef_scaled - y) ** 2)))
    return CostModel(fixed, per_work, per_node, tuple(folded), resid, len(points), block)


def graph_works(graph: Graph, scale: float = 1.0) -> dict[int, Work]:
    """The graph's work counted in each of `BLOCKS`, at `scale` times its example batch."""
    return {b: graph_work(graph, b).scaled(scale) for b in BLOCKS}


def fit_blocked(points: Sequence[tuple[Mapping[int, Work], float]]) -> CostModel:
    """`fit_cost_model` with the convolutions' work counted in each of `BLOCKS` (points from `graph_works`):
    the fit with the smallest residual, the smaller block on a tie (within 1%)."""
    fits = [fit_cost_model([(w[b], t) for w, t in points], b) for b in BLOCKS]
    best = fits[0]
    for m in fits[1:]:
        if m.residual < best.residual * 0.99:
            best = m
    return best


def cpu_block() -> tuple[int, str]:
    """(the channel block ONNX Runtime's CPU convolutions use on this machine, the instruction set it follows
    from): MLAS computes NCHWc convolutions in blocks of 16 channels with AVX-512 and 8 with AVX2 (1: none)."""
    import torch

    cap = str(torch.backends.cpu.get_cpu_capability())
    return (16 if cap.startswith("AVX512") else 8 if cap.startswith("AVX2") else 1), cap


def conv_flops(graph: Graph, block: int = 1) -> float:
    """The FLOPs of `graph`'s convolutions, with their channels padded to `block` as a blocked runtime runs them."""
    return sum(_padded_flops(graph, n, block) for n in graph.nodes()
               if n.kind in ("conv", "conv_transpose") and "weight" in n.params)


def block_note(original: Graph, graph: Graph, block: int, cap: str, align: int = 1) -> str | None:
    """A report line when the channel counts of `graph` leave part of its convolution FLOPs savings unrealised
    in blocks of `block` (more than 2% of the original's convolution FLOPs); None otherwise. The bounds it suggests
    leave out `align` when the policy's global `align` is already a multiple of the block."""
    base = conv_flops(original)
    if block <= 1 or base <= 0:
        return None
    nominal, padded = conv_flops(graph) / base, conv_flops(graph, block) / conv_flops(original, block)
    if padded - nominal <= 0.02 or nominal >= 1.0:
        return None
    return (f"ONNX Runtime's CPU convolutions run channels in blocks of {block} on an {cap} CPU like this one: "
            f"with these channel counts they compute {padded:.0%} of the original's convolution FLOPs, not "
            f"{nominal:.0%}; " + (f"the counts under one block, which `align` allows, run as one block: "
                                  f"`bounds {{ round_to = {block} }}` keeps every count in whole blocks"
                                  if align % block == 0 else
                                  f"`bounds {{ align = auto }}` ({block} here) keeps counts of {block} or more in "
                                  "whole blocks, "
                                  f"`round_to = {block}` every count"))
