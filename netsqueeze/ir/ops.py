"""The canonical op set: one `OpSpec` per kind with shape inference, FLOPs and channel semantics.

Conventions every frontend and backend share:
- conv / pooling work on N, C, *spatial; `padding` is ONNX-ordered (begins..., ends...).
- linear applies to the last axis; weight is [out, in] as in torch.
- reshape's `shape` uses 0 = copy that input dim and -1 = infer (ONNX semantics).
- FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from netsqueeze.errors import Diagnostic, VerifyError
from netsqueeze.ir import weights
from netsqueeze.ir.calls import AtenCall
from netsqueeze.ir.dims import Dim, is_dynamic
from netsqueeze.ir.graph import Graph, Node, TensorMeta, Value

InferFn = Callable[[Node, list[TensorMeta]], list[TensorMeta]]
FlopsFn = Callable[[Node, list[TensorMeta], list[TensorMeta]], int]

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()  # an attr with no default

# ---- channel semantics: what the dependency analysis asks of each op ----------------------------------
Span = tuple[int, int]  # (first position, count) of one axis in the channel analysis


class Channels(Protocol):
    """What an op's channel rule works with: the dependency analysis' union-find over single channel
    positions (`V`: a value's axis, `P`: a param's axis, each a span of positions)."""

    g: Graph

    def V(self, value: Value, axis: int) -> Span: ...
    def P(self, node: Node, param: str, axis: int) -> Span: ...
    def tie(self, a: Span, b: Span) -> None: ...
    def union(self, a: int, b: int) -> None: ...
    def freeze(self, a: Span, reason: str) -> None: ...
    def barrier(self, node: Node, side: str, port: int, axis: int, why: str) -> None: ...
    def defer_merge(self, node: Node, axis: int) -> None: ...


# A channel rule relates `axis` of one side of a node (side "in": operand `port`; "out": output `port`) to the
# axes it must shrink with; a seed rule names the axes an op creates channels on before propagation.
ChannelFn = Callable[[Channels, Node, str, int, int], None]
SeedFn = Callable[[Channels, Node], None]
# Channel removal: removed positions of a value axis (node id, output, axis), and the shapes before removal.
RemovedFn = Callable[[str, int, int], set[int]]
OldShapeFn = Callable[[Value], tuple[int, ...]]
OnRemoveFn = Callable[[Graph, Node, RemovedFn, OldShapeFn], None]
FoldableFn = Callable[[Node, str, int], bool]
SelectFn = Callable[[Node], dict[str, Any]]


def _here_rank(cx: Channels, node: Node, side: str, port: int) -> int:
    here = (node.id, port) if side == "out" else cx.g.operands(node.id)[port]
    return len(cx.g.meta_of(here).shape)


def _io(cx: Channels, node: Node, axis: int) -> tuple[Span, Span]:
    return cx.V(cx.g.operands(node.id)[0], axis), cx.V((node.id, 0), axis)


def _passthrough(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    """Every axis of the input is the same axis of the output."""
    cx.tie(*_io(cx, node, axis))


def _mixes(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    cx.barrier(node, side, port, axis, f"{node.kind} '{node.id}' mixes channels along this axis")


# ONNX ops (default domain) whose output has the numpy broadcast of their inputs' shapes, each element computed from
# the inputs' elements at its position: the ONNX frontend's shape rule for them; kept opaque, they pass channels
ONNX_ELEMENTWISE = frozenset({
    "Not", "Cast", "CastLike", "IsNaN", "IsInf", "Abs", "Neg", "Sign", "Ceil", "Floor", "Round", "Sqrt", "Reciprocal",
    "Exp", "Log", "Erf", "Sin", "Cos", "Identity", "Where", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Add", "Sub", "Mul", "Div", "Pow", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseNot",
    "Min", "Max",
})

# aten calls that act elementwise (with broadcasting) on their tensor operands: an opaque node holding one
# passes channels through like add/mul instead of stopping them
_ELEMENTWISE_ATEN = frozenset({"where", "masked_fill", "to", "_to_copy", "type_as", "rsqrt", "exp", "log", "sqrt",
                               "neg", "abs", "sin", "cos", "erf", "reciprocal", "sign", "pow", "clone",
                               "contiguous", "bitwise_not", "logical_not"})


def _opaque_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    if node.meta and _passes_channels(node, [cx.g.meta_of(v) for v in cx.g.operands(node.id)]):
        _binary_rule(cx, node, side, port, axis)
        return
    op_type = node.origin.op_type or node.kind
    cx.barrier(node, side, port, axis, f"passes opaque op '{node.id}' ({op_type})")


def _graph_input(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    cx.freeze(cx.V((node.id, 0), axis), f"graph input '{node.id}'")


def _graph_output(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    cx.freeze(cx.V(cx.g.operands(node.id)[0], axis), f"reaches graph output '{node.id}'")


def _constant_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    cx.tie(cx.V((node.id, 0), axis), cx.P(node, "value", axis))


def _seed_channel_axis(axis: int) -> SeedFn:
    def seed(cx: Channels, node: Node) -> None:
        cx.V((node.id, 0), axis)
        cx.V(cx.g.operands(node.id)[0], axis)

    return seed


def _conv_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    ins = cx.g.operands(node.id)
    if axis != 1:
        cx.barrier(node, side, 0, axis, f"{node.kind} '{node.id}' mixes spatial axis {axis}")
        return
    w = node.params["weight"]
    groups = attr(node, "groups")
    x, y = cx.V(ins[0], 1), cx.V((node.id, 0), 1)
    if node.kind == "conv_transpose":
        cx.tie(x, cx.P(node, "weight", 0))
        if groups != 1:
            reason = f"grouped conv_transpose '{node.id}'"
            cx.freeze(x, reason)
            cx.freeze(y, reason)
            return
        cx.tie(y, cx.P(node, "weight", 1))
    else:
        wo = cx.P(node, "weight", 0)
        cx.tie(y, wo)
        per_in, per_out = int(w.shape[1]), int(w.shape[0]) // groups
        if groups == 1:
            cx.tie(x, cx.P(node, "weight", 1))
        elif per_in == 1:  # depthwise (channel multiplier per_out): input c feeds outputs c·m .. c·m+m-1
            for o in range(y[1]):
                cx.union(x[0] + o // per_out, y[0] + o)
        else:  # grouped: keep group structure by removing the same local slot from every group
            wi = cx.P(node, "weight", 1)
            for c in range(x[1]):
                cx.union(x[0] + c, wi[0] + c % per_in)
            for o in range(y[1]):
                cx.union(y[0] + o, y[0] + o % per_out)
    if "bias" in node.params:
        cx.tie(y, cx.P(node, "bias", 0))


def _linear_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    ins, out0 = cx.g.operands(node.id), (node.id, 0)
    if axis != _here_rank(cx, node, side, port) - 1:
        cx.tie(cx.V(ins[0], axis), cx.V(out0, axis))
    elif side == "in":
        cx.tie(cx.V(ins[0], axis), cx.P(node, "weight", 1))
    else:
        cx.tie(cx.V(out0, axis), cx.P(node, "weight", 0))
        if "bias" in node.params:
            cx.tie(cx.V(out0, axis), cx.P(node, "bias", 0))


def _embedding_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    if side == "out" and axis == _here_rank(cx, node, side, port) - 1:
        cx.tie(cx.V((node.id, 0), axis), cx.P(node, "weight", 1))
    else:
        cx.barrier(node, side, port, axis, f"embedding '{node.id}' index axis")


def _embedding_seed(cx: Channels, node: Node) -> None:
    cx.V((node.id, 0), -1)


def _attention_seed(cx: Channels, node: Node) -> None:
    cx.V((node.id, 0), -1)
    for v in cx.g.operands(node.id)[:3]:
        cx.V(v, -1)
    h, dh = node.attrs["num_heads"], node.attrs["head_dim"]
    inw, outw = cx.P(node, "in_proj_weight", 0), cx.P(node, "out_proj_weight", 1)
    inb = cx.P(node, "in_proj_bias", 0) if "in_proj_bias" in node.params else None
    for head in range(h):  # q, k, v rows and out_proj columns of one head shrink together
        first = inw[0] + head * dh
        for d in range(dh):
            for t in range(3):
                cx.union(first, inw[0] + t * h * dh + head * dh + d)
                if inb is not None:
                    cx.union(first, inb[0] + t * h * dh + head * dh + d)
            cx.union(first, outw[0] + head * dh + d)


def _attention_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    ins = cx.g.operands(node.id)
    reason = f"embedding dim of attention '{node.id}' (only whole heads are pruned)"
    if axis != _here_rank(cx, node, side, port) - 1 or (side == "in" and port > 2):
        cx.barrier(node, side, port, axis, f"attention '{node.id}' mixes this axis")
    elif side == "in":
        x = cx.V(ins[port], axis)
        cx.tie(x, cx.P(node, "in_proj_weight", 1))
        cx.freeze(x, reason)
    else:
        y = cx.V((node.id, 0), axis)
        cx.tie(y, cx.P(node, "out_proj_weight", 0))
        if "out_proj_bias" in node.params:
            cx.tie(y, cx.P(node, "out_proj_bias", 0))
        cx.freeze(y, reason)


def _channel_norm_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    """batch_norm and group_norm: per-channel params on axis 1; group_norm reduces the other axes."""
    if axis != 1:
        if node.kind == "group_norm":
            cx.barrier(node, side, port, axis, f"group_norm '{node.id}' reduces this axis")
        else:
            cx.tie(*_io(cx, node, axis))
        return
    x, y = _io(cx, node, 1)
    cx.tie(x, y)
    for p in ("running_mean", "running_var", "weight", "bias"):
        if p in node.params:
            cx.tie(x, cx.P(node, p, 0))
    if node.kind == "group_norm" and node.attrs["num_groups"] != x[1]:
        cx.freeze(x, f"group_norm '{node.id}' normalises groups of channels together")


def _layer_norm_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    rank = _here_rank(cx, node, side, port)
    ns = len(node.attrs["normalized_shape"])
    x, y = _io(cx, node, axis)
    cx.tie(x, y)
    if axis >= rank - ns:
        for p in ("weight", "bias"):
            if p in node.params:
                cx.tie(x, cx.P(node, p, axis - (rank - ns)))
        cx.freeze(x, f"layer_norm '{node.id}' normalises over this axis (removing channels changes it)")


def _qdq_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    rank = _here_rank(cx, node, side, port)
    cx.tie(*_io(cx, node, axis))
    for p in ("scale", "zero_point"):
        t = node.params.get(p)
        if t is not None and t.numel() > 1 and attr(node, "axis") % rank == axis:
            cx.tie(cx.V((node.id, 0), axis), cx.P(node, p, 0))


def _spatial_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    """Pooling and resizing keep N and C and change the spatial axes."""
    if axis < 2:
        cx.tie(*_io(cx, node, axis))
    else:
        cx.barrier(node, side, port, axis, f"{node.kind} '{node.id}' changes this axis")


def _pad_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    rank = _here_rank(cx, node, side, port)
    pads = node.attrs.get("pads") or (0,) * 2 * rank
    if pads[axis] == 0 and pads[axis + rank] == 0:
        cx.tie(*_io(cx, node, axis))
    else:
        cx.barrier(node, side, port, axis, f"pad '{node.id}' changes this axis")


def _binary_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    ins = cx.g.operands(node.id)
    out_shape = node.meta[0].shape
    r = len(out_shape)
    a_out = axis if side == "out" else axis + r - len(cx.g.meta_of(ins[port]).shape)
    y = cx.V((node.id, 0), a_out)
    for v in ins:
        shape = cx.g.meta_of(v).shape
        a = a_out - (r - len(shape))
        if a >= 0 and shape[a] == out_shape[a_out]:
            cx.tie(cx.V(v, a), y)


def _concat_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    ins = cx.g.operands(node.id)
    cat = node.attrs["axis"] % _here_rank(cx, node, side, port)
    o = cx.V((node.id, 0), axis)
    off = 0
    for v in ins:
        x = cx.V(v, axis)
        if axis == cat:
            cx.tie(x, (o[0] + off, x[1]))
            off += x[1]
        else:
            cx.tie(x, o)


def _split_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    sp = node.attrs["axis"] % _here_rank(cx, node, side, port)
    x = cx.V(cx.g.operands(node.id)[0], axis)
    off = 0
    for j in range(len(node.meta)):
        y = cx.V((node.id, j), axis)
        if axis == sp:
            cx.tie((x[0] + off, y[1]), y)
            off += y[1]
        else:
            cx.tie(x, y)


def _slice_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    a = node.attrs
    x, y = _io(cx, node, axis)
    if axis != a["axis"] % _here_rank(cx, node, side, port):
        cx.tie(x, y)
        return
    idx = range(*slice(a["start"], a["end"], attr(node, "step")).indices(x[1]))
    for j, i in enumerate(idx):
        cx.union(x[0] + i, y[0] + j)
    if attr(node, "step") != 1:
        cx.freeze(y, f"strided slice '{node.id}' on this axis")


def _gather_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    """Output position j along the gathered axis is input channel indices[j]; input channels not gathered are
    coupled with nothing past the node (the same rule as a slice, with any distinct indices)."""
    x, y = _io(cx, node, axis)
    if axis != node.attrs["axis"] % _here_rank(cx, node, side, port):
        cx.tie(x, y)
        return
    for j, i in enumerate(node.attrs["indices"]):
        cx.union(x[0] + i, y[0] + j)


def reshape_map(src: tuple[int, ...], a: int, dst: tuple[int, ...]) -> tuple[int, int] | None:
    """Output axis b and block r such that dst position p along b holds source channel (p // r) % src[a]."""
    inner = math.prod(src[a + 1:])
    outer = math.prod(src[:a])
    c = src[a]
    exact = [b for b in range(len(dst)) if math.prod(dst[:b]) == outer and dst[b] == c
             and math.prod(dst[b + 1:]) == inner]
    if exact:
        return exact[0], 1
    for b in range(len(dst)):
        inner_out = math.prod(dst[b + 1:])
        if inner_out <= inner and inner % inner_out == 0:
            r = inner // inner_out
            if dst[b] % (r * c) == 0 and outer % max(1, math.prod(dst[:b])) == 0:
                return b, r
    return None


def split_map(src: tuple[int, ...], a: int, dst: tuple[int, ...]) -> tuple[int, int] | None:
    """When source axis a splits into consecutive output axes b0..b1 (everything around it unchanged):
    (b0, the size of the axes after b0), so source position p is position p // that of axis b0."""
    c = src[a]
    for b0 in range(len(dst)):
        size = dst[b0]
        for b1 in range(b0 + 1, len(dst)):
            size *= dst[b1]
            if size > c:
                break
            if size == c and dst[b0] > 1 and math.prod(dst[:b0]) == math.prod(src[:a]) \
                    and math.prod(dst[b1 + 1:]) == math.prod(src[a + 1:]):
                return b0, math.prod(dst[b0 + 1:b1 + 1])
    return None


def _matmul_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    """a @ b: a's rows and b's columns are the output's last two axes, the contracted axis ties a's last
    axis to b's second-last, and batch axes tie where their sizes match (broadcasting)."""
    ins = cx.g.operands(node.id)
    sa, sb, so = cx.g.meta_of(ins[0]).shape, cx.g.meta_of(ins[1]).shape, node.meta[0].shape
    ra, rb, ro = len(sa), len(sb), len(so)
    if ra < 2 or rb < 2:
        _mixes(cx, node, side, port, axis)
        return
    out0 = (node.id, 0)
    # (operand, its axis) feeding each output axis: batch axes from both, then rows of a and columns of b
    if side == "in":
        r, shape = (ra, sa) if port == 0 else (rb, sb)
        if (port == 0 and axis == ra - 1) or (port == 1 and axis == rb - 2):  # the contracted axis
            cx.tie(cx.V(ins[0], ra - 1), cx.V(ins[1], rb - 2))
            return
        j = ro - 2 if (port == 0 and axis == ra - 2) else ro - 1 if (port == 1 and axis == rb - 1) \
            else axis + (ro - r)
    else:
        j = axis
        if j >= ro - 2:
            src, ax = (0, ra - 2) if j == ro - 2 else (1, rb - 1)
            cx.tie(cx.V(ins[src], ax), cx.V(out0, j))
            return
    y = cx.V(out0, j)
    if j >= ro - 2:
        src, ax = (0, ra - 2) if j == ro - 2 else (1, rb - 1)
        cx.tie(cx.V(ins[src], ax), y)
        return
    for v, shape, r in ((ins[0], sa, ra), (ins[1], sb, rb)):
        k = j - (ro - r)
        if 0 <= k < r - 2 and shape[k] == so[j]:
            cx.tie(cx.V(v, k), y)


def _reshape_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    """flatten, reshape, squeeze, unsqueeze: an axis maps to an output axis, possibly as blocks of positions."""
    ins = cx.g.operands(node.id)
    src, dst = cx.g.meta_of(ins[0]).shape, node.meta[0].shape

    def tie_blocks(x: Span, y: Span, r: int) -> None:
        for pos in range(y[1]):
            cx.union(x[0] + (pos // r) % x[1], y[0] + pos)

    def tie_split(a: int, b0: int, inner: int) -> None:
        """Source channel p becomes position p // inner of output axis b0 (attention heads: p // head_dim)."""
        x, y = cx.V(ins[0], a), cx.V((node.id, 0), b0)
        for p in range(x[1]):
            cx.union(x[0] + p, y[0] + p // inner)

    if side == "in":
        found = reshape_map(src, axis, dst)
        if found is None:
            split = split_map(src, axis, dst)
            if split is None:
                cx.barrier(node, side, 0, axis, f"{node.kind} '{node.id}' splits or mixes this axis")
            else:
                tie_split(axis, *split)
            return
        tie_blocks(cx.V(ins[0], axis), cx.V((node.id, 0), found[0]), found[1])
        return
    cands = [a for a in range(len(src)) if src[a] > 1 and (m := reshape_map(src, a, dst)) and m[0] == axis]
    splits = [a for a in range(len(src)) if (sm := split_map(src, a, dst)) and sm[0] == axis]
    if not cands and len(splits) == 1:
        sm = split_map(src, splits[0], dst)
        assert sm is not None
        tie_split(splits[0], *sm)
    elif len(cands) == 1:
        found = reshape_map(src, cands[0], dst)
        assert found is not None
        tie_blocks(cx.V(ins[0], cands[0]), cx.V((node.id, 0), axis), found[1])
    elif not cands:
        cx.barrier(node, side, 0, axis, f"{node.kind} '{node.id}' splits or mixes this axis")
    else:  # merged axes: the producer's forward rule decides which one is the channel axis
        cx.V((node.id, 0), axis)
        cx.defer_merge(node, axis)


def _transpose_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    perm = list(node.attrs["perm"])
    ins, out0 = cx.g.operands(node.id), (node.id, 0)
    if side == "in":
        cx.tie(cx.V(ins[0], axis), cx.V(out0, perm.index(axis)))
    else:
        cx.tie(cx.V(ins[0], perm[axis]), cx.V(out0, axis))


def _mean_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    ins = cx.g.operands(node.id)
    in_rank = len(cx.g.meta_of(ins[0]).shape)
    axes = sorted(a % in_rank for a in node.attrs["axes"])
    keep = attr(node, "keepdim")
    kept = [i for i in range(in_rank) if keep or i not in axes]  # out axis j <- in axis kept[j]
    in_axis = axis if side == "in" else kept[axis]
    if in_axis in axes:
        cx.barrier(node, side, port, axis, f"mean '{node.id}' reduces this axis")
    else:
        cx.tie(cx.V(ins[0], in_axis), cx.V((node.id, 0), kept.index(in_axis)))


def _softmax_rule(cx: Channels, node: Node, side: str, port: int, axis: int) -> None:
    if node.attrs["axis"] % _here_rank(cx, node, side, port) != axis:
        cx.tie(*_io(cx, node, axis))
    else:
        _mixes(cx, node, side, port, axis)


# ---- channel removal: attrs that spell out channel counts ---------------------------------------------
def _split_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    ax = node.attrs["axis"] % len(old((node.id, 0)))
    node.attrs["sizes"] = tuple(s - len(gone(node.id, j, ax)) for j, s in enumerate(node.attrs["sizes"]))


def _slice_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    a = node.attrs
    src = graph.operands(node.id)[0]
    shape = old(src)
    ax = a["axis"] % len(shape)
    lost = gone(src[0], src[1], ax)
    if lost:
        start, end, step = slice(a["start"], a["end"], attr(node, "step")).indices(shape[ax])
        new_start = start - sum(1 for p in lost if p < start)
        a["start"], a["end"] = new_start, new_start + len(range(start, end, step)) - len(gone(node.id, 0, ax))


def _gather_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    src = graph.operands(node.id)[0]
    ax = node.attrs["axis"] % len(old(src))
    lost = set(gone(src[0], src[1], ax))
    if lost:  # a gathered channel goes with its output position (the rule couples them); the rest renumber
        node.attrs["indices"] = tuple(i - sum(1 for p in lost if p < i) for i in node.attrs["indices"]
                                      if i not in lost)


def _reshape_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    dims = list(node.attrs["shape"])
    for b, d in enumerate(dims):
        if d > 0:
            dims[b] = d - len(gone(node.id, 0, b))
    node.attrs["shape"] = tuple(dims)


def _conv_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    if attr(node, "groups") == 1:
        return
    src = graph.operands(node.id)[0]
    old_in = old(src)[1]
    if node.attrs["groups"] == old_in:  # depthwise: one group per channel
        node.attrs["groups"] = old_in - len(gone(src[0], src[1], 1))


def _group_norm_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    old_c = old((node.id, 0))[1]
    if node.attrs["num_groups"] == old_c:  # instance norm: one group per channel
        node.attrs["num_groups"] = old_c - len(gone(node.id, 0, 1))


def _attention_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    node.attrs["num_heads"] = int(node.params["in_proj_weight"].shape[0]) // (3 * node.attrs["head_dim"])


def _layer_norm_removed(graph: Graph, node: Node, gone: RemovedFn, old: OldShapeFn) -> None:
    rank = len(old((node.id, 0)))
    ns = list(node.attrs["normalized_shape"])
    for i in range(len(ns)):
        ns[i] -= len(gone(node.id, 0, rank - len(ns) + i))
    node.attrs["normalized_shape"] = tuple(ns)


# ---- selector attributes: what a policy's `where` filter sees besides the attrs ------------------------
def _conv_select(node: Node) -> dict[str, Any]:
    w, g = node.params["weight"], attr(node, "groups")
    if node.kind == "conv":
        return {"out_channels": w.shape[0], "in_channels": w.shape[1] * g, "kernel": tuple(w.shape[2:]), "groups": g}
    return {"in_channels": w.shape[0], "out_channels": w.shape[1] * g, "kernel": tuple(w.shape[2:]), "groups": g}


def _matrix_select(node: Node) -> dict[str, Any]:
    w = node.params["weight"]
    return {"out_channels": w.shape[0], "in_channels": w.shape[1], "out_features": w.shape[0],
            "in_features": w.shape[1]}


def _vector_select(node: Node) -> dict[str, Any]:
    w = node.params.get("weight")
    return {"channels": w.shape[0]} if w is not None and w.dim() == 1 else {}


def _conv_foldable(node: Node, param: str, axis: int) -> bool:
    """A reconstruction of input channels folds exactly into an ungrouped conv's input axis."""
    return param == "weight" and axis == 1 and attr(node, "groups") == 1


def _linear_foldable(node: Node, param: str, axis: int) -> bool:
    return param == "weight" and axis == 1


@dataclass(frozen=True)
class OpSpec:
    """Everything the compiler knows about one op kind; every pass, analysis and selector reads it here.

    - `infer`, `flops`: output shapes and cost (a multiply-add counts 2).
    - `attrs`: the attribute schema, name → default (`REQUIRED`: must be given); `verify` rejects others.
      None (opaque ops) accepts anything.
    - `channel`, `seed`: how the dependency analysis couples channel axes through the op (None: a
      barrier that freezes what reaches it); `produced`/`consumed`: (param, axis) pairs that create /
      read channels; `bias`: for a consumed weight, its bias and the weight's output axis.
    - `foldable(node, param, axis)`: the op's output is linear in that input axis of that weight, so a
      reconstruction of removed input channels folds exactly into it.
    - `on_remove`: rewrites attrs that spell out channel counts after channels were removed.
    - `select`: attributes a policy's `where` filter sees besides the attrs.
    """

    kind: str
    infer: InferFn
    flops: FlopsFn
    arity: tuple[int, int | None] = (1, 1)  # min, max number of operands (None = unbounded)
    params: tuple[str, ...] = ()  # required params
    optional_params: tuple[str, ...] = ()
    attrs: Mapping[str, Any] | None = field(default_factory=dict)
    channel: ChannelFn | None = None
    seed: SeedFn | None = None
    produced: tuple[tuple[str, int], ...] = ()
    consumed: tuple[tuple[str, int], ...] = ()
    bias: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    foldable: FoldableFn | None = None
    on_remove: OnRemoveFn | None = None
    select: SelectFn | None = None
    doc: str = ""


OPS: dict[str, OpSpec] = {}


def attr(node: Node, name: str) -> Any:
    """The node's attr `name`, or the default from its op's schema."""
    if name in node.attrs:
        return node.attrs[name]
    schema = spec(node.kind).attrs or {}
    default = schema.get(name, REQUIRED)
    if default is REQUIRED:
        raise _fail(node, f"missing attribute '{name}'")
    return default


def _fail(node: Node, msg: str) -> VerifyError:
    return VerifyError(Diagnostic(f"{node.kind} '{node.id}': {msg}", node=node.id))


def _numel(m: TensorMeta) -> int:
    return m.numel()


def _zero(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    return 0


def _per_out(k: int) -> FlopsFn:
    return lambda node, ins, outs: k * sum(_numel(o) for o in outs)


def op(kind: str, *, flops: FlopsFn = _zero, **fields: Any) -> Callable[[InferFn], InferFn]:
    """Defines op `kind` with its shape inference (the decorated function) and the `OpSpec` fields."""

    def register(fn: InferFn) -> InferFn:
        if kind in OPS:
            raise ValueError(f"op kind '{kind}' is defined twice")
        OPS[kind] = OpSpec(kind, fn, flops, doc=(fn.__doc__ or "").strip(), **fields)
        return fn

    return register


def spec(kind: str) -> OpSpec:
    return OPS.get(kind, OPS["opaque"])


def _axis(node: Node, axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise _fail(node, f"axis {axis} out of range for rank {rank}")
    return a


def broadcast_shapes(node: Node, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        here = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        if len({int(d) for d in here} - {1}) > 1:
            raise _fail(node, f"shapes {' and '.join(str(list(s)) for s in shapes)} do not broadcast")
        # a dynamic dim wins even at example size 1 (a batch of 1 is not a broadcast 1); else the non-1 size
        dynamic = [d for d in here if is_dynamic(d)]
        out.append(dynamic[0] if dynamic else next((d for d in here if int(d) != 1), 1))
    return tuple(out)


def _same(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    return [ins[0]]


# ---- sources and sinks --------------------------------------------------------------------
@op("input", arity=(0, 0), attrs={"shape": REQUIRED, "dtype": "float32", "dims": None}, channel=_graph_input)
def _input(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """A graph input; attrs `shape` (the example sizes), `dtype`, and `dims`: per axis the name of a
    dynamic dim (e.g. ('batch', None, 'H', 'W')) or None for a fixed one."""
    shape = tuple(int(d) for d in node.attrs["shape"])
    names = node.attrs.get("dims")
    if names is not None:
        if len(names) != len(shape):
            raise _fail(node, f"dims {list(names)} do not match the rank of shape {list(shape)}")
        shape = tuple(Dim.named(n, d) if n else d for n, d in zip(names, shape))
    return [TensorMeta(shape, node.attrs.get("dtype", "float32"))]


@op("output", channel=_graph_output)
def _output(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """A graph output; one operand."""
    return [ins[0]]


@op("constant", arity=(0, 0), params=("value",), attrs={"trainable": False}, channel=_constant_rule)
def _constant(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """A constant tensor held in params['value']; `trainable`: one of the source model's parameters (a layer scale,
    a position embedding), which the params count includes."""
    v = node.params["value"]
    return [TensorMeta(tuple(v.shape), str(v.dtype).removeprefix("torch."))]


@op("sizes", arity=(0, 0), attrs={"values": REQUIRED, "shape": REQUIRED})
def _sizes(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """An int64 tensor of sizes (attrs `values`, flat, and its `shape`) that may follow the dynamic dims: a
    shape computation the backends evaluate at run time (a constant would fix them at the example's)."""
    shape = tuple(int(d) for d in node.attrs["shape"])
    if math.prod(shape) != len(node.attrs["values"]):
        raise _fail(node, f"{len(node.attrs['values'])} values do not fill shape {list(shape)}")
    return [TensorMeta(shape, "int64")]


# ---- producers -----------------------------------------------------------------------------
def _conv_out(node: Node, size: int, k: int, i: int, dims: int, transposed: bool = False) -> int:
    a = node.attrs
    s, d, p = a["stride"][i], a["dilation"][i], a["padding"][i] + a["padding"][i + dims]
    if transposed:
        return (size - 1) * s - p + d * (k - 1) + a.get("output_padding", (0,) * dims)[i] + 1
    out = (size + p - d * (k - 1) - 1) // s + 1
    if out <= 0:
        raise _fail(node, f"spatial size {size} too small for kernel {k}")
    return out


def _conv_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    w = node.params["weight"]
    per_out = 2 * math.prod(w.shape[1:])
    return per_out * outs[0].numel() + (outs[0].numel() if "bias" in node.params else 0)


@op("conv", params=("weight",), optional_params=("bias",), flops=_conv_flops,
    attrs={"stride": REQUIRED, "padding": REQUIRED, "dilation": REQUIRED, "groups": 1},
    channel=_conv_rule, seed=_seed_channel_axis(1), produced=(("weight", 0),), consumed=(("weight", 1),),
    bias={"weight": ("bias", 0)}, foldable=_conv_foldable, on_remove=_conv_removed, select=_conv_select)
def _conv(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """N-d convolution; attrs stride, padding (begins+ends), dilation, groups; weight [O, I/g, *k]."""
    x, w = ins[0], node.params["weight"]
    dims = w.dim() - 2
    g = attr(node, "groups")
    if len(x.shape) != dims + 2:
        raise _fail(node, f"expects a rank-{dims + 2} input, got {x}")
    if x.shape[1] != w.shape[1] * g:
        raise _fail(node, f"input has {x.shape[1]} channels but weight expects {w.shape[1] * g} ({g} groups)")
    if w.shape[0] % g:
        raise _fail(node, f"{w.shape[0]} output channels are not divisible by {g} groups")
    if "bias" in node.params and node.params["bias"].shape != (w.shape[0],):
        raise _fail(node, f"bias has shape {list(node.params['bias'].shape)}, expected [{w.shape[0]}]")
    sp = tuple(_conv_out(node, x.shape[2 + i], w.shape[2 + i], i, dims) for i in range(dims))
    return [TensorMeta((x.shape[0], w.shape[0], *sp), x.dtype)]


def _conv_t_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    """2 per multiply-add (every input element times its [O/g, *k] taps), and the bias once per output element,
    as for `conv` and `linear`."""
    return 2 * math.prod(node.params["weight"].shape[1:]) * ins[0].numel() + (
        outs[0].numel() if "bias" in node.params else 0)


@op("conv_transpose", params=("weight",), optional_params=("bias",), flops=_conv_t_flops,
    attrs={"stride": REQUIRED, "padding": REQUIRED, "dilation": REQUIRED, "groups": 1, "output_padding": None},
    channel=_conv_rule, seed=_seed_channel_axis(1), produced=(("weight", 1),), consumed=(("weight", 0),),
    bias={"weight": ("bias", 1)}, select=_conv_select)
def _conv_t(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Transposed convolution; weight [I, O/g, *k]."""
    x, w = ins[0], node.params["weight"]
    dims = w.dim() - 2
    g = attr(node, "groups")
    if x.shape[1] != w.shape[0]:
        raise _fail(node, f"input has {x.shape[1]} channels but weight expects {w.shape[0]}")
    sp = tuple(_conv_out(node, x.shape[2 + i], w.shape[2 + i], i, dims, True) for i in range(dims))
    return [TensorMeta((x.shape[0], w.shape[1] * g, *sp), x.dtype)]


def _linear_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    w = node.params["weight"]
    rows = ins[0].numel() // w.shape[1]
    return rows * (2 * w.numel() + (w.shape[0] if "bias" in node.params else 0))


@op("linear", params=("weight",), optional_params=("bias",), flops=_linear_flops, channel=_linear_rule,
    seed=_seed_channel_axis(-1), produced=(("weight", 0),), consumed=(("weight", 1),), bias={"weight": ("bias", 0)},
    foldable=_linear_foldable, select=_matrix_select)
def _linear(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """y = x Wᵀ + b on the last axis; weight [out, in]."""
    x, w = ins[0], node.params["weight"]
    if x.shape[-1] != w.shape[1]:
        raise _fail(node, f"input has {x.shape[-1]} features but weight expects {w.shape[1]}")
    if "bias" in node.params and node.params["bias"].shape != (w.shape[0],):
        raise _fail(node, f"bias has shape {list(node.params['bias'].shape)}, expected [{w.shape[0]}]")
    return [TensorMeta((*x.shape[:-1], w.shape[0]), x.dtype)]


def _matmul_shape(node: Node, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    a1, b1 = len(a) == 1, len(b) == 1
    a2 = (1, *a) if a1 else a
    b2 = (*b, 1) if b1 else b
    if a2[-1] != b2[-2]:
        raise _fail(node, f"cannot multiply {list(a)} by {list(b)}")
    batch = broadcast_shapes(node, [a2[:-2], b2[:-2]]) if (a2[:-2] or b2[:-2]) else ()
    out = (*batch, a2[-2], b2[-1])
    if a1:
        out = out[:-2] + out[-1:]
    if b1:
        out = out[:-1]
    return out


@op("matmul", arity=(2, 2), flops=lambda n, i, o: 2 * o[0].numel() * i[0].shape[-1], channel=_matmul_rule)
def _matmul(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """torch.matmul of two activations."""
    return [TensorMeta(_matmul_shape(node, ins[0].shape, ins[1].shape), ins[0].dtype)]


def _attn_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    e = node.attrs["embed_dim"]
    inner = node.attrs["num_heads"] * node.attrs["head_dim"]  # shrinks when heads are pruned
    q = ins[0]
    bf = node.attrs.get("batch_first", True)
    l_q = q.shape[1] if bf else q.shape[0]
    l_k = ins[1].shape[1] if bf else ins[1].shape[0]
    b = q.numel() // (l_q * q.shape[-1])
    proj = 2 * (l_q * e * inner + 2 * l_k * e * inner + l_q * inner * e)
    return b * (proj + 4 * l_q * l_k * inner)


@op(
    "attention",
    attrs={"embed_dim": REQUIRED, "num_heads": REQUIRED, "head_dim": REQUIRED, "batch_first": True},
    channel=_attention_rule,
    seed=_attention_seed,
    produced=(("out_proj_weight", 0), ("in_proj_weight", 0)),
    consumed=(("in_proj_weight", 1), ("out_proj_weight", 1)),
    bias={"in_proj_weight": ("in_proj_bias", 0), "out_proj_weight": ("out_proj_bias", 0)},
    on_remove=_attention_removed,
    arity=(3, 4),
    params=("in_proj_weight", "out_proj_weight"),
    optional_params=("in_proj_bias", "out_proj_bias"),
    flops=_attn_flops,
)
def _attention(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Multi-head attention (query, key, value[, mask]); attrs num_heads, embed_dim, head_dim, batch_first.

    in_proj_weight is [3·H·Dh, E] (q, k, v stacked), out_proj_weight is [E, H·Dh].
    """
    a = node.attrs
    h, dh = a["num_heads"], a["head_dim"]
    w = node.params["in_proj_weight"]
    if w.shape[0] != 3 * h * dh:
        raise _fail(node, f"in_proj_weight has {w.shape[0]} rows, expected 3·{h}·{dh}")
    if node.params["out_proj_weight"].shape[1] != h * dh:
        raise _fail(node, f"out_proj_weight has {node.params['out_proj_weight'].shape[1]} columns, expected {h * dh}")
    if ins[0].shape[-1] != w.shape[1]:
        raise _fail(node, f"query has {ins[0].shape[-1]} features but in_proj_weight expects {w.shape[1]}")
    return [TensorMeta((*ins[0].shape[:-1], node.params["out_proj_weight"].shape[0]), ins[0].dtype)]


@op("embedding", params=("weight",), channel=_embedding_rule, seed=_embedding_seed,
    produced=(("weight", 1),), select=_matrix_select)
def _embedding(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Table lookup; weight [num_embeddings, dim]; input integer indices."""
    return [TensorMeta((*ins[0].shape, node.params["weight"].shape[1]), "float32")]


# ---- normalisation -------------------------------------------------------------------------
def _check_vec(node: Node, names: tuple[str, ...], c: int) -> None:
    for k in names:
        if k in node.params and tuple(node.params[k].shape) != (c,):
            raise _fail(node, f"param '{k}' has shape {list(node.params[k].shape)}, expected [{c}]")


@op("batch_norm", params=("running_mean", "running_var"), optional_params=("weight", "bias"), attrs={"eps": 1e-5},
    channel=_channel_norm_rule, select=_vector_select,
    flops=_per_out(2))
def _bn(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Inference-mode batch norm over axis 1; attrs eps."""
    _check_vec(node, ("running_mean", "running_var", "weight", "bias"), ins[0].shape[1])
    return [ins[0]]


@op("layer_norm", optional_params=("weight", "bias"), flops=_per_out(5),
    attrs={"normalized_shape": REQUIRED, "eps": 1e-5}, channel=_layer_norm_rule, on_remove=_layer_norm_removed,
    select=_vector_select)
def _ln(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Layer norm over the trailing `normalized_shape`; attrs eps."""
    ns = tuple(node.attrs["normalized_shape"])
    if tuple(ins[0].shape[-len(ns):]) != ns:
        raise _fail(node, f"normalized_shape {list(ns)} does not match input {ins[0]}")
    for k in ("weight", "bias"):
        if k in node.params and tuple(node.params[k].shape) != ns:
            raise _fail(node, f"param '{k}' has shape {list(node.params[k].shape)}, expected {list(ns)}")
    return [ins[0]]


@op("group_norm", optional_params=("weight", "bias"), flops=_per_out(5), attrs={"num_groups": REQUIRED, "eps": 1e-5},
    channel=_channel_norm_rule, on_remove=_group_norm_removed, select=_vector_select)
def _gn(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Group norm over axis 1 with `num_groups`; instance norm is num_groups == C."""
    c = ins[0].shape[1]
    if c % node.attrs["num_groups"]:
        raise _fail(node, f"{c} channels are not divisible by {node.attrs['num_groups']} groups")
    _check_vec(node, ("weight", "bias"), c)
    return [ins[0]]


# ---- elementwise -------------------------------------------------------------------------------
_ELEMENTWISE_ATTRS: dict[str, dict[str, Any]] = {
    "clip": {"min": None, "max": None}, "leaky_relu": {"negative_slope": 0.01}, "gelu": {"approximate": "none"},
    "hardsigmoid": {"alpha": 1 / 6, "beta": 0.5},
}
for _k, _cost in [("relu", 1), ("clip", 1), ("leaky_relu", 2), ("gelu", 8), ("silu", 4), ("sigmoid", 4),
                  ("tanh", 4), ("hardswish", 4), ("hardsigmoid", 3), ("identity", 0)]:
    op(_k, flops=_per_out(_cost), attrs=_ELEMENTWISE_ATTRS.get(_k, {}), channel=_passthrough)(_same)


@op("lrn", flops=_per_out(6), attrs={"size": REQUIRED, "alpha": 1e-4, "beta": 0.75, "bias": 1.0}, channel=_mixes)
def _lrn(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Local response norm across channels; attrs size, alpha, beta, bias (torch nn.LocalResponseNorm's k).

    Mixes neighbouring channels, so channel analysis treats it as a barrier.
    """
    return [ins[0]]


@op("softmax", flops=_per_out(5), attrs={"axis": REQUIRED}, channel=_softmax_rule)
def _softmax(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Softmax along `axis`; couples the whole axis, so it is a barrier when that axis is the channel axis."""
    _axis(node, node.attrs["axis"], len(ins[0].shape))
    return [ins[0]]


def _binary(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    dtype = ins[0].dtype if ins[0].dtype.startswith("float") or len(ins) == 1 else ins[1].dtype
    return [TensorMeta(broadcast_shapes(node, [m.shape for m in ins]), dtype)]


for _k in ("add", "sub", "mul", "div"):
    op(_k, arity=(2, 2), flops=_per_out(1), channel=_binary_rule)(_binary)


# ---- structure ---------------------------------------------------------------------------------
@op("concat", arity=(1, None), attrs={"axis": REQUIRED}, channel=_concat_rule)
def _concat(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Concatenate along `axis`."""
    rank = len(ins[0].shape)
    ax = _axis(node, node.attrs["axis"], rank)
    for m in ins[1:]:
        if len(m.shape) != rank or any(a != b for i, (a, b) in enumerate(zip(m.shape, ins[0].shape)) if i != ax):
            raise _fail(node, f"cannot concatenate {ins[0]} and {m} along axis {ax}")
    shape = list(ins[0].shape)
    shape[ax] = sum(m.shape[ax] for m in ins)
    return [TensorMeta(tuple(shape), ins[0].dtype)]


@op("split", attrs={"axis": REQUIRED, "sizes": REQUIRED}, channel=_split_rule, on_remove=_split_removed)
def _split(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Split along `axis` into pieces of `sizes`; one output per piece."""
    ax = _axis(node, node.attrs["axis"], len(ins[0].shape))
    sizes = list(node.attrs["sizes"])
    if sum(sizes) != ins[0].shape[ax]:
        raise _fail(node, f"sizes {sizes} do not add up to {ins[0].shape[ax]}")
    outs = []
    for s in sizes:
        shape = list(ins[0].shape)
        shape[ax] = s
        outs.append(TensorMeta(tuple(shape), ins[0].dtype))
    return outs


def slice_len(size: int, start: int, end: int, step: int) -> int:
    return len(range(*slice(start, end, step).indices(size)))


@op("slice", attrs={"axis": REQUIRED, "start": REQUIRED, "end": REQUIRED, "step": 1}, channel=_slice_rule,
    on_remove=_slice_removed)
def _slice(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """x[start:end:step] along `axis` (python slice semantics, clamped)."""
    a = node.attrs
    ax = _axis(node, a["axis"], len(ins[0].shape))
    shape = list(ins[0].shape)
    size = shape[ax]
    shape[ax] = slice_len(size, a["start"], a["end"], a.get("step", 1))
    if is_dynamic(size):
        shape[ax] = _dynamic_slice_len(size, a["start"], a["end"], a.get("step", 1), shape[ax])
    return [TensorMeta(tuple(shape), ins[0].dtype)]


@op("gather", attrs={"axis": REQUIRED, "indices": REQUIRED}, channel=_gather_rule, on_remove=_gather_removed)
def _gather(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """x.index_select(axis, indices): the positions `indices` (distinct, in any order) of a fixed-size axis."""
    a = node.attrs
    ax = _axis(node, a["axis"], len(ins[0].shape))
    size = ins[0].shape[ax]
    idx = list(a["indices"])
    if is_dynamic(size):
        raise _fail(node, f"gathers along axis {ax}, whose size is dynamic")
    if not idx or len(set(idx)) != len(idx) or not all(isinstance(i, int) and 0 <= i < int(size) for i in idx):
        raise _fail(node, f"indices must be distinct integers in [0, {int(size)}), got {idx}")
    shape = list(ins[0].shape)
    shape[ax] = len(idx)
    return [TensorMeta(tuple(shape), ins[0].dtype)]


def _dynamic_slice_len(size: int, start: int, end: int, step: int, length: int) -> int:
    """The length of a slice of a dynamic axis as an expression of its size, for the bounds as they fall at the
    example size (a bound past the end stays clamped to it, one counted from the end follows it, one within
    the axis is fixed): `x[1:]`, `x[:-1]`, `x[-3:]`, `x[::-1]`, `x[1::2]`. Any other negative step, or an empty slice, keeps the
    example's length."""
    n = int(size)
    if step == -1 and length == n and (start == -1 or start > n) and end < -n:
        return size  # the whole axis reversed
    if step < 1 or length <= 0:
        return length
    lo = start if start >= 0 else size + start if -start <= n else 0
    hi = size if end > n else end if end >= 0 else size + end
    out = hi - lo if step == 1 else (hi - lo + step - 1) // step  # x[::2]: ⌈(hi − lo) / step⌉
    return out if int(out) == length else length


@op("flatten", attrs={"start_dim": 1, "end_dim": -1}, channel=_reshape_rule)
def _flatten(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Flatten dims start_dim..end_dim (torch semantics)."""
    s = list(ins[0].shape)
    st = _axis(node, node.attrs.get("start_dim", 1), len(s)) if s else 0
    en = _axis(node, node.attrs.get("end_dim", -1), len(s)) if s else 0
    return [TensorMeta((*s[:st], math.prod(s[st : en + 1]), *s[en + 1 :]), ins[0].dtype)]


def reshape_target(node: Node, src: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if any(d == 0 and i >= len(src) for i, d in enumerate(shape)):
        raise _fail(node, f"target {list(shape)} copies (0) dim {len(src)} or later of a rank-{len(src)} input")
    out = [src[i] if d == 0 else d for i, d in enumerate(shape)]
    if out.count(-1) > 1:
        raise _fail(node, "more than one -1 in the target shape")
    total = math.prod(src)
    if -1 in out:
        rest = math.prod(d for d in out if d != -1)
        if rest == 0 or total % rest:
            raise _fail(node, f"cannot reshape {list(src)} to {list(shape)}")
        out[out.index(-1)] = total // rest
    if math.prod(out) != total:
        raise _fail(node, f"cannot reshape {list(src)} ({total} elements) to {list(shape)}")
    return tuple(out)


@op("reshape", attrs={"shape": REQUIRED}, channel=_reshape_rule, on_remove=_reshape_removed)
def _reshape(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Reshape to `shape` (0 copies the input dim, -1 is inferred)."""
    return [TensorMeta(reshape_target(node, ins[0].shape, tuple(node.attrs["shape"])), ins[0].dtype)]


@op("transpose", attrs={"perm": REQUIRED}, channel=_transpose_rule)
def _transpose(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Permute axes by `perm`."""
    perm = node.attrs["perm"]
    if sorted(perm) != list(range(len(ins[0].shape))):
        raise _fail(node, f"perm {list(perm)} does not fit rank {len(ins[0].shape)}")
    return [TensorMeta(tuple(ins[0].shape[p] for p in perm), ins[0].dtype)]


@op("squeeze", attrs={"axes": REQUIRED}, channel=_reshape_rule)
def _squeeze(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Drop size-1 `axes`."""
    rank = len(ins[0].shape)
    axes = {_axis(node, a, rank) for a in node.attrs["axes"]}
    return [TensorMeta(tuple(d for i, d in enumerate(ins[0].shape) if i not in axes or d != 1), ins[0].dtype)]


@op("unsqueeze", attrs={"axes": REQUIRED}, channel=_reshape_rule)
def _unsqueeze(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Insert size-1 `axes` (positions in the output)."""
    shape = list(ins[0].shape)
    rank = len(shape) + len(node.attrs["axes"])
    for a in sorted(_axis(node, a, rank) for a in node.attrs["axes"]):
        shape.insert(a, 1)
    return [TensorMeta(tuple(shape), ins[0].dtype)]


def _pool_out(node: Node, x: TensorMeta, kernel: tuple[int, ...]) -> list[TensorMeta]:
    a = node.attrs
    dims = len(kernel)
    stride = a.get("stride") or kernel
    pad = a.get("padding", (0,) * 2 * dims)
    dil = a.get("dilation", (1,) * dims)
    sp = []
    for i in range(dims):
        span = x.shape[2 + i] + pad[i] + pad[i + dims] - dil[i] * (kernel[i] - 1) - 1
        o = (-(-span // stride[i]) if a.get("ceil_mode") else span // stride[i]) + 1
        if a.get("ceil_mode") and (o - 1) * stride[i] >= x.shape[2 + i] + pad[i]:
            o -= 1
        if o <= 0:
            raise _fail(node, f"input {x} too small for kernel {list(kernel)}")
        sp.append(o)
    return [TensorMeta((*x.shape[:2], *sp), x.dtype)]


def _pool_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    return outs[0].numel() * math.prod(node.attrs["kernel"])


@op("max_pool", flops=_pool_flops, channel=_spatial_rule,
    attrs={"kernel": REQUIRED, "stride": None, "padding": None, "dilation": None, "ceil_mode": False})
def _maxpool(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Max pooling; attrs kernel, stride, padding (begins+ends), dilation, ceil_mode."""
    return _pool_out(node, ins[0], tuple(node.attrs["kernel"]))


@op("avg_pool", flops=_pool_flops, channel=_spatial_rule,
    attrs={"kernel": REQUIRED, "stride": None, "padding": None, "ceil_mode": False, "count_include_pad": True})
def _avgpool(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Average pooling; attrs kernel, stride, padding, ceil_mode, count_include_pad."""
    return _pool_out(node, ins[0], tuple(node.attrs["kernel"]))


@op("adaptive_avg_pool", flops=lambda n, i, o: i[0].numel(), attrs={"output_size": REQUIRED}, channel=_spatial_rule)
def _adaptive(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Adaptive average pooling to `output_size`; global average pooling is output_size all ones."""
    return [TensorMeta((*ins[0].shape[:2], *node.attrs["output_size"]), ins[0].dtype)]


@op("mean", flops=lambda n, i, o: i[0].numel(), attrs={"axes": REQUIRED, "keepdim": False}, channel=_mean_rule)
def _mean(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Mean over `axes`, keeping them when `keepdim`."""
    rank = len(ins[0].shape)
    axes = {_axis(node, a, rank) for a in node.attrs["axes"]}
    keep = node.attrs.get("keepdim", False)
    shape = tuple(1 if i in axes else d for i, d in enumerate(ins[0].shape) if keep or i not in axes)
    return [TensorMeta(shape, ins[0].dtype)]


@op("pad", attrs={"pads": REQUIRED, "mode": "constant", "value": 0.0}, channel=_pad_rule)
def _pad(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Constant/reflect/replicate padding; `pads` ONNX-ordered over all axes (begins..., ends...)."""
    pads = node.attrs["pads"]
    rank = len(ins[0].shape)
    if len(pads) != 2 * rank:
        raise _fail(node, f"pads {list(pads)} do not fit rank {rank}")
    return [TensorMeta(tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(ins[0].shape)), ins[0].dtype)]


@op("resize", channel=_spatial_rule, attrs={
    "mode": "nearest", "coordinate_transformation_mode": None, "nearest_mode": "floor", "scale": None, "size": None,
    "align_corners": False, "cubic_coeff_a": -0.75, "exclude_outside": False})
def _resize(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Spatial resize by `size` or `scale` (per spatial axis); `mode` nearest or linear."""
    x = ins[0]
    if node.attrs.get("size"):
        sp = tuple(node.attrs["size"])
    else:
        # a dynamic size stays a Dim: floor(d·s) as (d·p) // q with s = p / q exactly
        sp = tuple((d * Fraction(s).numerator) // Fraction(s).denominator if is_dynamic(d) else math.floor(d * s)
                   for d, s in zip(x.shape[2:], node.attrs["scale"]))
    return [TensorMeta((*x.shape[:2], *sp), x.dtype)]


@op("quantize", params=("scale", "zero_point"), attrs={"axis": 1}, channel=_qdq_rule)
def _quant(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Affine quantisation to int8/uint8 (`axis` for per-channel scales)."""
    return [TensorMeta(ins[0].shape, str(node.params["zero_point"].dtype).removeprefix("torch."))]


@op("dequantize", params=("scale", "zero_point"), attrs={"axis": 1}, channel=_qdq_rule)
def _dequant(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Affine dequantisation back to float32."""
    return [TensorMeta(ins[0].shape, "float32")]


@op("opaque", arity=(0, None), attrs=None, channel=_opaque_rule)
def _opaque(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """An op the IR does not know: run verbatim; its output shapes are what the frontend observed."""
    if not node.meta:
        raise _fail(node, "opaque node has no recorded output shapes")
    if _passes_channels(node, ins):  # elementwise: its shape follows its operands (after channel removal too)
        payload = node.origin.payload
        consts = [tuple(t.shape) for t in _tensors(payload.args)] if isinstance(payload, AtenCall) else []
        return [TensorMeta(broadcast_shapes(node, [m.shape for m in ins] + consts), node.meta[0].dtype)]
    return list(node.meta)


def _tensors(args: Any) -> list[Any]:
    """The constant tensors inside an aten call's arguments."""
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in _tensors(a)]
    return [args] if hasattr(args, "shape") and hasattr(args, "dtype") else []


def _passes_channels(node: Node, ins: list[TensorMeta]) -> bool:
    """An opaque aten call or ONNX op that acts elementwise on operands broadcasting to its recorded output."""
    call = node.origin.payload
    if len(node.meta) != 1 or not ins:
        return False
    if isinstance(call, AtenCall):
        # a constant tensor inside the call cannot lose channels with its operands: such a node stays a barrier
        if call.packet not in _ELEMENTWISE_ATEN or any(math.prod(t.shape) > 1 for t in _tensors(call.args)):
            return False
    elif not (node.origin.frontend == "onnx" and isinstance(call, dict) and call.get("domain") in ("", "ai.onnx")
              and call.get("op_type") in ONNX_ELEMENTWISE):  # an ONNX op's constants are operands, cut with them
        return False
    # the recorded output has the rank the operands broadcast to (sizes may have changed since, by channel removal)
    return max(len(m.shape) for m in ins) == len(node.meta[0].shape)


def infer_node(graph: Graph, node: Node) -> list[TensorMeta]:
    s = spec(node.kind)
    ins = graph.input_metas(node.id)
    lo, hi = s.arity
    if len(ins) < lo or (hi is not None and len(ins) > hi):
        raise _fail(node, f"has {len(ins)} operands, expected {lo if hi == lo else f'{lo}..{hi or chr(110)}'}")
    for p in s.params:
        if p not in node.params:
            raise _fail(node, f"missing param '{p}'")
    try:
        return s.infer(node, ins)
    except VerifyError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _fail(node, f"malformed attributes or params ({type(e).__name__}: {e})") from None


def infer_shapes(graph: Graph) -> None:
    """Fills `meta` of every node in topological order."""
    for node in graph.nodes():
        node.meta = infer_node(graph, node)


def node_flops(graph: Graph, node: Node) -> int:
    return int(spec(node.kind).flops(node, graph.input_metas(node.id), node.meta))


# Params that torch keeps as buffers, not nn.Parameters: not counted as parameters.
BUFFERS = frozenset({"running_mean", "running_var", "scale", "zero_point", "value"})


def node_params(node: Node) -> int:
    """Trainable parameters (what `sum(p.numel() for p in module.parameters())` counts)."""
    if node.kind == "constant":
        return int(node.params["value"].numel()) if node.attrs.get("trainable") else 0
    return sum(int(t.numel()) for k, t in node.params.items() if k not in BUFFERS)


def node_param_bytes(node: Node, *, tables: bool = True) -> int:
    """Exact stored bytes of the node's params (encoded forms at their encoded size)."""
    return sum(weights.nbytes(t, tables=tables) for t in node.params.values())


def node_nonzeros(node: Node) -> int:
    """Non-zero parameter values (trainable params only, as `node_params` counts them)."""
    if node.kind == "constant":
        return weights.nnz(node.params["value"]) if node.attrs.get("trainable") else 0
    return sum(weights.nnz(t) for k, t in node.params.items() if k not in BUFFERS)


def node_weight_forms(node: Node) -> str:
    """The params' storage forms, e.g. 'weight: int8 per-axis(0)', for reports; '' when all are dense."""
    return ", ".join(f"{k}: {weights.describe(t)}" for k, t in sorted(node.params.items())
                     if weights.form_of(t) != "dense")

