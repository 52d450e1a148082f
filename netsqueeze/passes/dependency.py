"""`dependency`: finds channel groups (every param axis and tensor axis that must shrink together).

The analysis behind every structural pass; `format_groups` is what `netsqueeze inspect --groups` prints.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from netsqueeze.ir.graph import Graph, Node, Value
from netsqueeze.ir.ops import OPS, attr
from netsqueeze.passes.base import AnalysisPass, PassContext
from netsqueeze.passes.registry import register_pass

Role = Literal["producer", "consumer", "param", "value"]

# (kind, param, axis) of param axes that create channels / read channels, from the op definitions.
PRODUCER_AXES: frozenset[tuple[str, str, int]] = frozenset(
    (k, p, a) for k, spec in OPS.items() for p, a in spec.produced)
CONSUMER_AXES: frozenset[tuple[str, str, int]] = frozenset(
    (k, p, a) for k, spec in OPS.items() for p, a in spec.consumed)


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
    # a 2-D convolution computes or reads these channels: runtimes run it in channel blocks (NCHWc), which sets
    # the default `align` of the channel allocation (`allocation.DEFAULT_ALIGN`)
    blocked: bool = False

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
        s = OPS.get(node.kind)
        if s is not None and s.seed is not None:
            s.seed(self, node)

    def barrier(self, node: Node, side: str, port: int, axis: int, why: str) -> None:
        v = (node.id, port) if side == "out" else self.g.operands(node.id)[port]
        self.freeze(self.V(v, axis), why)

    def defer_merge(self, node: Node, axis: int) -> None:
        self.pending_merges.append((node, axis))

    def rule(self, node: Node, side: str, port: int, axis: int) -> None:
        """The op's own channel rule (its definition in `ir.ops`); ops without one are barriers."""
        s = OPS.get(node.kind)
        if s is None or s.channel is None:
            op_type = node.origin.op_type or node.kind
            self.barrier(node, side, port, axis, f"passes opaque op '{node.id}' ({op_type})")
        else:
            s.channel(self, node, side, port, axis)


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
                if node.kind == "conv" and role == "consumer" and attr(node, "groups") > 1:
                    role = "param"  # grouped conv: its weight slot is shared by several input channels
                members.append(Member(nid, name, None, axis, index, role))
            else:
                members.append(Member(nid, None, int(name), axis, index, "value"))
        members.sort(key=lambda m: (topo[m.node], m.param is not None, m.output or 0, m.param or "", m.axis))
        why = sorted(set().union(*(reasons.get(r, set()) for r in roots)))
        if not why and not any(m.role == "producer" for m in members):
            why = ["no producer creates these channels"]
        frozen = "; ".join(why[:3]) + (f" (+{len(why) - 3} more)" if len(why) > 3 else "") if why else None
        blocked = any(m.param == "weight" and _is_conv2d(graph.node(m.node)) for m in members)
        raw.append((topo[members[0].node], members[0].target, members[0].index[0], len(roots), members, frozen,
                    blocked))
    raw.sort(key=lambda t: (t[0], t[1], t[2]))
    return ChannelGroups(tuple(ChannelGroup(i, n, tuple(ms), fr, bl) for i, (_, _, _, n, ms, fr, bl) in enumerate(raw)))


def _is_conv2d(node: Node) -> bool:
    w = node.params.get("weight")
    return node.kind == "conv" and w is not None and len(w.shape) == 4
