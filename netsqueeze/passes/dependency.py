"""`dependency`: finds channel groups (every param axis and tensor axis that must shrink together).

The analysis behind every structural pass; `format_groups` is what `netsqueeze inspect --groups` prints.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from netsqueeze.ir.graph import Graph, Node, Value
from netsqueeze.ir.ops import OPS
from netsqueeze.passes.base import AnalysisPass, PassContext
from netsqueeze.passes.registry import register_pass

Role = Literal["producer", "consumer", "param", "value"]

# (kind, param, axis) of param axes that create channels / read channels.
PRODUCER_AXES: frozenset[tuple[str, str, int]] = frozenset({
    ("conv", "weight", 0), ("conv_transpose", "weight", 1), ("linear", "weight", 0),
    ("embedding", "weight", 1), ("attention", "out_proj_weight", 0), ("attention", "in_proj_weight", 0),
})
CONSUMER_AXES: frozenset[tuple[str, str, int]] = frozenset({
    ("conv", "weight", 1), ("conv_transpose", "weight", 0), ("linear", "weight", 1),
    ("attention", "in_proj_weight", 1), ("attention", "out_proj_weight", 1),
})
_ELEMENTWISE = frozenset({"relu", "clip", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
                          "hardsigmoid", "identity", "dropout", "quantize", "dequantize"})
_SPATIAL = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "resize"})
_BINARY = frozenset({"add", "sub", "mul", "div"})
_RESHAPES = frozenset({"flatten", "reshape", "squeeze", "unsqueeze"})


@dataclass(frozen=True)
class Member:
    """One axis that shrinks with its group: a param axis (`param` set) or an output value axis (`output` set).

    `index[c]` lists the positions along `axis` that group channel c occupies: one for a plain
    channel, a block of H·W features after flatten, several for grouped convs that share a weight slot.
    """

    node: str
    param: str | None
    output: int | None
    axis: int
    index: tuple[tuple[int, ...], ...]
    role: Role

    @property
    def target(self) -> str:
        return self.param if self.param is not None else f"out{self.output}"

    @property
    def positions(self) -> int:
        return sum(len(p) for p in self.index)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together across all `members`; `frozen` says why it may not shrink."""

    id: int
    size: int
    members: tuple[Member, ...]
    frozen: str | None = None

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.node for m in self.members if m.role == "producer"))

    @property
    def consumers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.node for m in self.members if m.role == "consumer"))

    def members_of(self, role: Role) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == role)


@dataclass(frozen=True)
class ChannelGroups:
    """The side table of the `dependency` analysis: groups in a deterministic order, ids 0..n-1."""

    groups: tuple[ChannelGroup, ...]

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.frozen is None)

    def restrict(self, selected: frozenset[str] | None) -> ChannelGroups:
        """Freezes groups whose producers are not all in `selected` (the policy's `on SELECTOR`)."""
        if selected is None:
            return self
        out = []
        for g in self.groups:
            if g.frozen is None and not all(p in selected for p in g.producers):
                missing = [p for p in g.producers if p not in selected]
                g = replace(g, frozen=f"excluded by the policy selection ('{missing[0]}' not selected)")
            out.append(g)
        return ChannelGroups(tuple(out))

    def format(self) -> str:
        return format_groups(self)


def _fmt_index(index: tuple[tuple[int, ...], ...]) -> str:
    flat = [p for ps in index for p in ps]
    if all(len(ps) == 1 for ps in index):
        if flat == list(range(flat[0], flat[0] + len(flat))):
            return f"[{flat[0]}:{flat[0] + len(flat)}]"
        return "[" + ",".join(map(str, flat[:8])) + (",…" if len(flat) > 8 else "") + "]"
    blocks = sorted({len(ps) for ps in index})
    return f"[{len(index)} × {'/'.join(map(str, blocks))} positions from {min(flat)}]"


def format_groups(groups: ChannelGroups) -> str:
    """Deterministic text listing of groups: id, size, frozen reason, members with role and index map."""
    lines: list[str] = []
    n_free = len(groups.prunable())
    lines.append(f"{len(groups)} channel groups, {n_free} prunable, {len(groups) - n_free} frozen")
    for g in groups:
        state = f"frozen: {g.frozen}" if g.frozen else "prunable"
        lines.append(f"group {g.id}: {g.size} channels, {state}")
        for m in g.members:
            lines.append(f"  {m.role:<8} {m.node}.{m.target} axis {m.axis} {_fmt_index(m.index)}")
    return "\n".join(lines)


# ---- the analysis ----------------------------------------------------------------------------------
Key = tuple[str, str, str, int]  # ("v", node, str(output), axis) or ("p", node, param, axis)


class _Builder:
    """Union-find over individual channel positions; op rules couple positions of neighbouring axes.

    Working per position (not per axis) makes concat offsets, split/slice ranges, flatten blocks,
    grouped-conv weight sharing and attention heads all the same operation: union two positions.
    """

    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.parent: list[int] = []
        self.keys: dict[Key, tuple[int, int]] = {}  # key -> (base, size)
        self.key_order: list[Key] = []
        self.reasons: dict[int, set[str]] = {}
        self.queue: deque[tuple[Value, int]] = deque()
        self.pending_merges: list[tuple[Node, int]] = []

    # -- union-find
    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb

    def _alloc(self, key: Key, size: int) -> tuple[int, int, bool]:
        if key in self.keys:
            base, n = self.keys[key]
            return base, n, False
        base = len(self.parent)
        self.parent.extend(range(base, base + size))
        self.keys[key] = (base, size)
        self.key_order.append(key)
        return base, size, True

    def V(self, value: Value, axis: int) -> tuple[int, int]:
        """Positions of `axis` of a value; new value axes are queued for propagation."""
        shape = self.g.meta_of(value).shape
        axis = axis + len(shape) if axis < 0 else axis
        base, n, new = self._alloc(("v", value[0], str(value[1]), axis), shape[axis])
        if new:
            self.queue.append((value, axis))
        return base, n

    def P(self, node: Node, param: str, axis: int) -> tuple[int, int]:
        base, n, _ = self._alloc(("p", node.id, param, axis), int(node.params[param].shape[axis]))
        return base, n

    def tie(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        if a[1] != b[1]:
            raise AssertionError(f"tie of unequal axes {a} {b}")
        for i in range(a[1]):
            self.union(a[0] + i, b[0] + i)

    def freeze(self, a: tuple[int, int], reason: str) -> None:
        for i in range(a[1]):
            self.reasons.setdefault(a[0] + i, set()).add(reason)

    # -- propagation
    def run(self) -> None:
        for node in self.g.nodes():
            self.seed(node)
            while self.queue:
                value, axis = self.queue.popleft()
                self.rule(self.g.node(value[0]), "out", value[1], axis)
                for dst, port in self.g.value_users(value):
                    self.rule(self.g.node(dst), "in", port, axis)

    def seed(self, node: Node) -> None:
        k = node.kind
        if k in ("conv", "conv_transpose"):
            self.V((node.id, 0), 1)
            self.V(self.g.operands(node.id)[0], 1)
        elif k == "linear":
            self.V((node.id, 0), -1)
            self.V(self.g.operands(node.id)[0], -1)
        elif k == "embedding":
            self.V((node.id, 0), -1)
        elif k == "attention":
            self.V((node.id, 0), -1)
            for v in self.g.operands(node.id)[:3]:
                self.V(v, -1)
            h, dh = node.attrs["num_heads"], node.attrs["head_dim"]
            inw, outw = self.P(node, "in_proj_weight", 0), self.P(node, "out_proj_weight", 1)
            inb = self.P(node, "in_proj_bias", 0) if "in_proj_bias" in node.params else None
            for head in range(h):
                first = inw[0] + head * dh
                for d in range(dh):
                    for t in range(3):
                        self.union(first, inw[0] + t * h * dh + head * dh + d)
                        if inb is not None:
                            self.union(first, inb[0] + t * h * dh + head * dh + d)
                    self.union(first, outw[0] + head * dh + d)

    def barrier(self, node: Node, side: str, port: int, axis: int, why: str) -> None:
        v = (node.id, port) if side == "out" else self.g.operands(node.id)[port]
        self.freeze(self.V(v, axis), why)

    def rule(self, node: Node, side: str, port: int, axis: int) -> None:
        g, k = self.g, node.kind
        ins = g.operands(node.id)
        out0 = (node.id, 0)
        here = (node.id, port) if side == "out" else ins[port]
        rank = len(g.meta_of(here).shape)
        if k not in OPS or k == "opaque":
            op_type = node.origin.op_type or k
            self.barrier(node, side, port, axis, f"passes opaque op '{node.id}' ({op_type})")
        elif k == "input":
            self.freeze(self.V(out0, axis), f"graph input '{node.id}'")
        elif k == "output":
            self.freeze(self.V(ins[0], axis), f"reaches graph output '{node.id}'")
        elif k == "constant":
            self.tie(self.V(out0, axis), self.P(node, "value", axis))
        elif k in ("conv", "conv_transpose"):
            self._conv(node, side, axis)
        elif k == "linear":
            last = rank - 1
            if axis != last:
                self.tie(self.V(ins[0], axis), self.V(out0, axis))
            elif side == "in":
                self.tie(self.V(ins[0], axis), self.P(node, "weight", 1))
            else:
                self.tie(self.V(out0, axis), self.P(node, "weight", 0))
                if "bias" in node.params:
                    self.tie(self.V(out0, axis), self.P(node, "bias", 0))
        elif k == "embedding":
            if side == "out" and axis == rank - 1:
                self.tie(self.V(out0, axis), self.P(node, "weight", 1))
            else:
                self.barrier(node, side, port, axis, f"embedding '{node.id}' index axis")
        elif k == "attention":
            self._attention(node, side, port, axis, rank)
        elif k == "batch_norm" or (k == "group_norm" and axis == 1):
            if axis != 1:
                self.tie(self.V(ins[0], axis), self.V(out0, axis))
                return
            x = self.V(ins[0], 1)
            self.tie(x, self.V(out0, 1))
            for p in ("running_mean", "running_var", "weight", "bias"):
                if p in node.params:
                    self.tie(x, self.P(node, p, 0))
            if k == "group_norm" and node.attrs["num_groups"] != x[1]:
                self.freeze(x, f"group_norm '{node.id}' normalises groups of channels together")
        elif k == "group_norm":
            self.barrier(node, side, port, axis, f"group_norm '{node.id}' reduces this axis")
        elif k == "layer_norm":
            ns = len(node.attrs["normalized_shape"])
            x = self.V(ins[0], axis)
            self.tie(x, self.V(out0, axis))
            if axis >= rank - ns:
                for p in ("weight", "bias"):
                    if p in node.params:
                        self.tie(x, self.P(node, p, axis - (rank - ns)))
                self.freeze(x, f"layer_norm '{node.id}' normalises over this axis (removing channels changes it)")
        elif k in _ELEMENTWISE:
            self.tie(self.V(ins[0], axis), self.V(out0, axis))
            for p in ("scale", "zero_point"):
                t = node.params.get(p)
                if t is not None and t.numel() > 1 and node.attrs.get("axis", 1) % rank == axis:
                    self.tie(self.V(out0, axis), self.P(node, p, 0))
        elif k in _SPATIAL or k == "pad":
            pads = node.attrs.get("pads") or (0,) * 2 * rank
            if (k in _SPATIAL and axis < 2) or (k == "pad" and pads[axis] == 0 and pads[axis + rank] == 0):
                self.tie(self.V(ins[0], axis), self.V(out0, axis))
            else:
                self.barrier(node, side, port, axis, f"{k} '{node.id}' changes this axis")
        elif k in _BINARY:
            self._binary(node, side, port, axis)
        elif k == "concat":
            cat = node.attrs["axis"] % rank
            o = self.V(out0, axis)
            off = 0
            for v in ins:
                x = self.V(v, axis)
                if axis == cat:
                    self.tie(x, (o[0] + off, x[1]))
                    off += x[1]
                else:
                    self.tie(x, o)
        elif k == "split":
            sp = node.attrs["axis"] % rank
            x = self.V(ins[0], axis)
            off = 0
            for j in range(len(node.meta)):
                y = self.V((node.id, j), axis)
                if axis == sp:
                    self.tie((x[0] + off, y[1]), y)
                    off += y[1]
                else:
                    self.tie(x, y)
        elif k == "slice":
            a = node.attrs
            x, y = self.V(ins[0], axis), self.V(out0, axis)
            if axis != a["axis"] % rank:
                self.tie(x, y)
                return
            idx = range(*slice(a["start"], a["end"], a.get("step", 1)).indices(x[1]))
            for j, i in enumerate(idx):
                self.union(x[0] + i, y[0] + j)
            if a.get("step", 1) != 1:
                self.freeze(y, f"strided slice '{node.id}' on this axis")
        elif k in _RESHAPES:
            self._reshape(node, side, axis)
        elif k == "transpose":
            perm = list(node.attrs["perm"])
            if side == "in":
                self.tie(self.V(ins[0], axis), self.V(out0, perm.index(axis)))
            else:
                self.tie(self.V(ins[0], perm[axis]), self.V(out0, axis))
        elif k == "mean":
            in_rank = len(g.meta_of(ins[0]).shape)
            axes = sorted(a % in_rank for a in node.attrs["axes"])
            keep = node.attrs.get("keepdim", False)
            kept = [i for i in range(in_rank) if keep or i not in axes]  # out axis j <- in axis kept[j]
            in_axis = axis if side == "in" else kept[axis]
            if in_axis in axes:
                self.barrier(node, side, port, axis, f"mean '{node.id}' reduces this axis")
            else:
                self.tie(self.V(ins[0], in_axis), self.V(out0, kept.index(in_axis)))
        elif k == "softmax" and node.attrs["axis"] % rank != axis:
            self.tie(self.V(ins[0], axis), self.V(out0, axis))
        else:  # matmul, lrn, softmax over the channel axis: they mix channels
            self.barrier(node, side, port, axis, f"{k} '{node.id}' mixes channels along this axis")

    def _conv(self, node: Node, side: str, axis: int) -> None:
        ins = self.g.operands(node.id)
        if axis != 1:
            self.barrier(node, side, 0, axis, f"{node.kind} '{node.id}' mixes spatial axis {axis}")
            return
        w = node.params["weight"]
        groups = node.attrs.get("groups", 1)
        x, y = self.V(ins[0], 1), self.V((node.id, 0), 1)
        if node.kind == "conv_transpose":
            self.tie(x, self.P(node, "weight", 0))
            if groups != 1:
                reason = f"grouped conv_transpose '{node.id}'"
                self.freeze(x, reason)
                self.freeze(y, reason)
                return
            self.tie(y, self.P(node, "weight", 1))
        else:
            wo = self.P(node, "weight", 0)
            self.tie(y, wo)
            per_in, per_out = int(w.shape[1]), int(w.shape[0]) // groups
            if groups == 1:
                self.tie(x, self.P(node, "weight", 1))
            elif per_in == 1:  # depthwise (channel multiplier per_out): input c feeds outputs c·m .. c·m+m-1
                for o in range(y[1]):
                    self.union(x[0] + o // per_out, y[0] + o)
            else:  # grouped: keep group structure by removing the same local slot from every group
                wi = self.P(node, "weight", 1)
                for c in range(x[1]):
                    self.union(x[0] + c, wi[0] + c % per_in)
                for o in range(y[1]):
                    self.union(y[0] + o, y[0] + o % per_out)
        if "bias" in node.params:
            self.tie(y, self.P(node, "bias", 0))

    def _attention(self, node: Node, side: str, port: int, axis: int, rank: int) -> None:
        ins = self.g.operands(node.id)
        reason = f"embedding dim of attention '{node.id}' (only whole heads are pruned)"
        if axis != rank - 1 or (side == "in" and port > 2):
            self.barrier(node, side, port, axis, f"attention '{node.id}' mixes this axis")
        elif side == "in":
            x = self.V(ins[port], axis)
            self.tie(x, self.P(node, "in_proj_weight", 1))
            self.freeze(x, reason)
        else:
            y = self.V((node.id, 0), axis)
            self.tie(y, self.P(node, "out_proj_weight", 0))
            if "out_proj_bias" in node.params:
                self.tie(y, self.P(node, "out_proj_bias", 0))
            self.freeze(y, reason)

    def _binary(self, node: Node, side: str, port: int, axis: int) -> None:
        ins = self.g.operands(node.id)
        out_shape = node.meta[0].shape
        r = len(out_shape)
        a_out = axis if side == "out" else axis + r - len(self.g.meta_of(ins[port]).shape)
        y = self.V((node.id, 0), a_out)
        for v in ins:
            shape = self.g.meta_of(v).shape
            a = a_out - (r - len(shape))
            if a >= 0 and shape[a] == out_shape[a_out]:
                self.tie(self.V(v, a), y)

    def _reshape(self, node: Node, side: str, axis: int) -> None:
        ins = self.g.operands(node.id)
        src, dst = self.g.meta_of(ins[0]).shape, node.meta[0].shape
        if side == "in":
            found = _reshape_map(src, axis, dst)
            if found is None:
                self.barrier(node, side, 0, axis, f"{node.kind} '{node.id}' splits or mixes this axis")
                return
            self._tie_reshape(self.V(ins[0], axis), self.V((node.id, 0), found[0]), found[1])
            return
        cands = [a for a in range(len(src)) if src[a] > 1 and (m := _reshape_map(src, a, dst)) and m[0] == axis]
        if len(cands) == 1:
            found = _reshape_map(src, cands[0], dst)
            assert found is not None
            self._tie_reshape(self.V(ins[0], cands[0]), self.V((node.id, 0), axis), found[1])
        elif not cands:
            self.barrier(node, side, 0, axis, f"{node.kind} '{node.id}' splits or mixes this axis")
        else:  # merged axes: the producer's forward rule decides which one is the channel axis
            self.V((node.id, 0), axis)
            self.pending_merges.append((node, axis))

    def _tie_reshape(self, x: tuple[int, int], y: tuple[int, int], r: int) -> None:
        for pos in range(y[1]):
            self.union(x[0] + (pos // r) % x[1], y[0] + pos)


def _reshape_map(src: tuple[int, ...], a: int, dst: tuple[int, ...]) -> tuple[int, int] | None:
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


_PARAM_ROLE: dict[tuple[str, str, int], Role] = {
    **dict.fromkeys(PRODUCER_AXES, "producer"), **dict.fromkeys(CONSUMER_AXES, "consumer"),
}


@register_pass
@dataclass(frozen=True)
class DependencyAnalysis(AnalysisPass[ChannelGroups]):
    """Finds channel groups: every param axis and value axis that must shrink together, and frozen groups.

    Needs: shapes inferred. Returns a `ChannelGroups` side table. Follows the dependency-graph idea of
    DepGraph (Fang et al., CVPR 2023) at the granularity of single channel positions: op rules union
    positions of neighbouring axes (elementwise and residual adds, concat offsets, split/slice ranges,
    flatten→linear blocks, grouped/depthwise convs, attention heads), and positions whose union-find
    components have the same set of members form one group. Unknown and opaque ops, graph inputs
    and outputs, reshapes that split or mix the channel axis and normalisations over it freeze the
    components they touch, each with a reason. The policy selection is applied by `restrict`.
    """

    name: ClassVar[str] = "dependency"

    def compute(self, graph: Graph, ctx: PassContext) -> ChannelGroups:
        return find_groups(graph)


def find_groups(graph: Graph) -> ChannelGroups:
    """The channel groups of `graph` (shapes must be inferred)."""
    b = _Builder(graph)
    b.run()
    # merged reshape axes whose positions no producer reached: the channel axis was not recognisable
    for node, axis in b.pending_merges:
        src = graph.operands(node.id)[0]
        src_roots = {b.find(base + i) for key, (base, n) in b.keys.items()
                     if key[0] == "v" and (key[1], int(key[2])) == src for i in range(n)}
        base, n = b.keys[("v", node.id, "0", axis)]
        for i in range(n):
            if b.find(base + i) not in src_roots:
                b.reasons.setdefault(base + i, set()).add(
                    f"{node.kind} '{node.id}' merges axes; the channel axis is not recognisable")
    comp_pos: dict[int, dict[Key, list[int]]] = {}
    reasons: dict[int, set[str]] = {}
    for key in b.key_order:
        base, n = b.keys[key]
        for i in range(n):
            root = b.find(base + i)
            comp_pos.setdefault(root, {}).setdefault(key, []).append(i)
            if base + i in b.reasons:
                reasons.setdefault(root, set()).update(b.reasons[base + i])
    key_rank = {k: i for i, k in enumerate(b.key_order)}
    by_sig: dict[tuple[tuple[Key, int], ...], list[int]] = {}
    for root, pos in comp_pos.items():
        sig = tuple(sorted(((k, len(p)) for k, p in pos.items()), key=lambda kp: key_rank[kp[0]]))
        by_sig.setdefault(sig, []).append(root)
    topo = {nid: i for i, nid in enumerate(graph.topo_order())}
    raw = []
    for sig, roots in by_sig.items():
        first = sig[0][0]
        roots.sort(key=lambda r: min(comp_pos[r][first]))
        members = []
        for key, _ in sig:
            kind, nid, name, axis = key
            node = graph.node(nid)
            index = tuple(tuple(sorted(comp_pos[r][key])) for r in roots)
            if kind == "p":
                role = _PARAM_ROLE.get((node.kind, name, axis), "param")
                if node.kind == "conv" and role == "consumer" and node.attrs.get("groups", 1) > 1:
                    role = "param"  # grouped conv: its weight slot is shared by several input channels
                members.append(Member(nid, name, None, axis, index, role))
            else:
                members.append(Member(nid, None, int(name), axis, index, "value"))
        members.sort(key=lambda m: (topo[m.node], m.param is not None, m.output or 0, m.param or "", m.axis))
        why = sorted(set().union(*(reasons.get(r, set()) for r in roots)))
        if not why and not any(m.role == "producer" for m in members):
            why = ["no producer creates these channels"]
        frozen = "; ".join(why[:3]) + (f" (+{len(why) - 3} more)" if len(why) > 3 else "") if why else None
        raw.append((topo[members[0].node], members[0].target, members[0].index[0], len(roots), members, frozen))
    raw.sort(key=lambda t: (t[0], t[1], t[2]))
    return ChannelGroups(tuple(ChannelGroup(i, n, tuple(ms), fr) for i, (_, _, _, n, ms, fr) in enumerate(raw)))
