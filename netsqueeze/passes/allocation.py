"""Channel allocation shared by the structural passes (`trim`, `squeeze_fold`): per-group bounds,
ratio → channel count, budget metering and the bisections of the budget/guard searches.

One rule for every structural pass:

- Bounds. A group's fewest kept channels and its rounding step combine the pass's own
  `min_channels`/`round_to` options with the policy's `bounds` (global and every `bounds on
  SELECTOR` entry of the group's producers) the way several `bounds` entries combine: the most
  restrictive wins — the largest `min_channels`, `round_to` and `align`, the smallest `max_ratio` (at
  most ⌊max_ratio·size⌋ channels of a group may go).
- Ratio → count. `ratio` of a group's channels removed removes ⌊ratio·size⌋ of them: never more
  than the ratio asks, the same way `max_ratio` reads.
- Clamping. A count k becomes max(k, min_keep), rounded *up* to a multiple of `round_to` and, when
  that is at least `align`, up to a multiple of both `round_to` and `align`, at most the group's size
  (so a group that is not a whole number of blocks can keep all its channels where the next
  multiple would exceed it): bounds never remove more than the pass chose. `align` is a runtime's channel block: ONNX Runtime's CPU
  convolutions run in NCHWc blocks (16 channels with AVX-512, 8 with AVX2) only when their input
  channels are fewer than a block or a multiple of it, so `round_to = 8, align = 16` allows 8, 16,
  32, 48, ... and never 24 or 40, which fall back to a slower unblocked convolution. With no `align`
  from any bounds entry, a group a 2-D convolution computes or reads (`ChannelGroup.blocked`) has
  `DEFAULT_ALIGN`, every other group none.
- Giving back. A search over coarse counts (a bisection, a Lagrange multiplier) can land under
  its budget by a whole step; `give_back` returns channels, one allowed step of one group at a
  time, the group the pass values most first, while the budget still holds.
- Metering. An allocation {group: kept count} is costed by its FLOPs and params against the
  original graph; which channels are kept does not change the cost, so the first k stand in, and
  every allocation is measured once. The measurement is a dry run of the rewrite: the same
  `apply_selection` on a skeleton of the graph whose dense weights are shape-only ("meta")
  tensors, so a candidate costs shape arithmetic, not a copy of the weights; an allocation whose
  every node was costed at its groups' counts by earlier dry runs is summed from those costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from netsqueeze.errors import BudgetError, Diagnostic
from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.ops import node_flops, node_params, spec
from netsqueeze.ir.stats import GraphStats
from netsqueeze.ir.weights import Encoded, graph_weight_bytes
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection, branch_removal, grouped_input

# the `align` of a group a 2-D convolution computes or reads when no bounds sets one (`bounds { align = 1 }` allows
# every count): ONNX Runtime's CPU block with AVX-512 (a multiple of AVX2's 8 and of the 8 that GPU tensor cores
# take in fp16). An unaligned count runs unblocked: one-shot trim of the benchmark VGG to 2x fewer FLOPs ran at
# 0.56x the original's speed on ONNX Runtime (batch 64), 1.66x aligned
DEFAULT_ALIGN = 16

# the global targets the structural passes can meet, as ratios of the original model
METRICS = ("flops", "params", "bytes")
Reached = tuple[float, float, float]  # (flops, params, bytes) ratios, in METRICS order


def kept_for_ratio(size: int, ratio: float) -> int:
    """What a group of `size` keeps when `ratio` of it goes, before any bounds: ⌊ratio·size⌋ removed (never more
    than the ratio asks; `ratio`, `max_ratio` and the note on rounded-up ratios read it alike)."""
    return size - math.floor(ratio * size + 1e-9)


@dataclass(frozen=True)
class GroupBounds:
    """How far one channel group may shrink: keep at least `min_keep` channels, counts in
    multiples of `step` and, from `align` up, of `align` (capped at `size`)."""

    size: int
    min_keep: int
    step: int
    align: int = 1
    empty: bool = False  # 0 is allowed too: the group is a residual branch the pass may remove whole

    def clamp(self, k: int) -> int:
        """`k` kept channels within the bounds: at least min_keep (and 1), rounded up to a multiple
        of step and, when that is at least align, of both step and align; at most size. 0 stays 0 where
        the group may be removed whole (`empty`)."""
        if self.empty and k <= 0:
            return 0
        k = max(k, self.min_keep, 1)
        k = math.ceil(k / self.step) * self.step
        if k >= self.align:  # a multiple of both (round_to = 8, align = 12: 24, 48, ...)
            both = math.lcm(self.step, self.align)
            k = math.ceil(k / both) * both
        return min(k, self.size)

    def above(self, k: int) -> int:
        """The next allowed count above `k` (`size` at the most)."""
        return self.clamp(min(k + 1, self.size))

    def allowed(self) -> list[int]:
        """Every count the bounds allow, ascending (`size` the last)."""
        return sorted({self.clamp(k) for k in range(0 if self.empty else 1, self.size + 1)})

    def below(self, k: int) -> int:
        """The largest allowed count below `k`; `k` itself when there is none."""
        return max((c for c in self.allowed() if c < k), default=k)

    def for_ratio(self, ratio: float) -> int:
        """Channels kept when `ratio` of them are removed: ⌊ratio·size⌋ removed, then clamped."""
        return self.clamp(kept_for_ratio(self.size, ratio))

    @property
    def smallest(self) -> int:
        return self.clamp(0)


def group_bounds(group: ChannelGroup, ctx: PassContext, min_channels: int = 1, round_to: int = 1,
                 removable: bool = False) -> GroupBounds:
    """The bounds of `group`: the pass options `min_channels`/`round_to` and the policy's bounds for
    its producers (`ctx.bounds_for`, which alone sets `align`), the most restrictive winning; with
    `removable`, 0 as well (a residual branch removed whole, `rewrite.branch_removable`: the bounds
    apply to what a group keeps, not to whether a block stays)."""
    b = ctx.bounds_for(group.producers)
    # bounds count channels; a group's unit can hold several (a grouped conv's weight slot is one channel in each
    # of its conv groups), so they are converted: k units are k·u channels
    u = channels_per_unit(group)
    min_keep = -(-max(min_channels, int(b.get("min_channels", 1)), 1) // u)
    if "max_ratio" in b:
        min_keep = max(min_keep, kept_for_ratio(group.size, float(b["max_ratio"])))
    step = max(round_to, int(b.get("round_to", 1)), 1)
    align = max(int(b["align"]) if "align" in b else DEFAULT_ALIGN if group.blocked else 1, 1)
    return GroupBounds(group.size, min(min_keep, group.size), step // math.gcd(step, u), align // math.gcd(align, u),
                       removable)


def ratio_note(groups: Iterable[ChannelGroup], bounds: Mapping[int, GroupBounds], ratio: float) -> str | None:
    """A note on the groups whose bounds keep more channels than `ratio` asks (⌊ratio·size⌋ removed): how many, how
    many of them whole, the first three (`'producer' asked -> kept of size`) and why; None when there are none. A
    ratio that removes nothing from a group in blocks must not pass unsaid."""
    raised = [(g, kept_for_ratio(g.size, ratio), bounds[g.id].for_ratio(ratio)) for g in groups]
    raised = [(g, want, got) for g, want, got in raised if got > want]
    if not raised:
        return None
    whole = sum(got == g.size for g, _, got in raised)
    shown = ", ".join(f"'{g.producers[0] if g.producers else g.id}' {want} -> {got} of {g.size}"
                      for g, want, got in raised[:3])
    return (f"ratio {ratio:g}: the bounds keep more channels than it asks in {len(raised)} group(s), {whole} of them "
            f"whole ({shown}{', ...' if len(raised) > 3 else ''}): counts go up to `min_channels`, to a multiple of "
            "`round_to` and, from one block up, to whole blocks of `align` (16 for the channels of 2-D convolutions "
            "unless a bounds sets it; `bounds { align = 1 }` allows any count)")


def channels_per_unit(group: ChannelGroup) -> int:
    """Channels each of `group`'s units stands for at its producers: 1, or a grouped conv consumer's number of
    conv groups when the group is that conv's weight slots (every unit the same number of output channels)."""
    sizes = {len(p) for m in group.members_of("producer") if m.param is not None for p in m.index}
    return sizes.pop() if len(sizes) == 1 else 1


@dataclass(frozen=True)
class Budget:
    """The policy's flops/params/bytes budget (ratios of the original model)."""

    limits: Mapping[str, float]

    @staticmethod
    def of(ctx: PassContext) -> Budget:
        return Budget({k: v for k, v in ctx.budget.items() if k in METRICS})

    def __bool__(self) -> bool:
        return bool(self.limits)

    def meets(self, reached: Reached) -> bool:
        """Whether (flops, params, bytes) ratios are within every limit."""
        got = dict(zip(METRICS, reached))
        return all(got[k] <= v + 1e-12 for k, v in self.limits.items())

    def __str__(self) -> str:
        return ", ".join(f"{k} <= {v:.1%}" for k, v in sorted(self.limits.items()))

    def missed(self, reached: Reached) -> str | None:
        """The first measure of the budget that `reached` is over, if any."""
        got = dict(zip(METRICS, reached))
        return next((k for k in METRICS if k in self.limits and got[k] > self.limits[k] + 1e-12), None)

    def unreachable(self, pass_name: str, how: str, reached: Reached, node: str | None,
                    unbounded: Reached | None = None,
                    held: tuple[Meter, Mapping[int, int]] | None = None) -> BudgetError:
        """The error for a budget that even the smallest allocation misses, with what it reached; `unbounded`:
        what one channel per group would reach, when the bounds keep more (said, so that a user sees whether the
        bounds or the model stop the budget); `held`: (the meter, that allocation), to name the nodes that hold
        the most of the measure it misses (`Meter.holders`) — the error is then at the first of them, not at
        `node`."""

        def amounts(r: Reached) -> str:
            return f"flops {r[0]:.1%}, params {r[1]:.1%}" + (f", bytes {r[2]:.1%}" if "bytes" in self.limits else "")

        where = ""
        measure = self.missed(reached)
        if held is not None and measure is not None and (top := held[0].holders(held[1], measure)):
            node = top[0][0]
            said = {"cut": "cut to its minimum", "held": "its channels all kept", "fixed": "in no group it can shrink"}
            where = f"; the most of its {measure} is at " + ", ".join(
                f"'{nid}' ({share:.1%}{f' of the original {measure}' if not i else ''}, {said[state]})"
                for i, (nid, share, state) in enumerate(top))
        return BudgetError(Diagnostic(
            f"{pass_name} cannot meet the budget {self}: {how} reaches {amounts(reached)} of the original"
            + (f"; its bounds (min_channels, round_to, align) hold it there: one channel per group would reach "
               f"{amounts(unbounded)}"
               if unbounded is not None else "") + where, node=node))

    @staticmethod
    def unbounded(bounds: Mapping[int, GroupBounds], meter: Callable[[dict[int, int]], Reached]) -> Reached | None:
        """What one channel per group reaches (`unreachable`'s `unbounded`), when the bounds' minimums keep more."""
        return meter(dict.fromkeys(bounds, 1)) if any(b.smallest > 1 for b in bounds.values()) else None


def skeleton(graph: Graph) -> Graph:
    """A copy of `graph` whose dense weights are "meta" tensors (shape and dtype, no data): slicing
    it through `apply_selection` and re-inferring shapes costs a rewrite by shape arithmetic alone.
    Encoded weights stay as they are (their `index_select` is exact on the encoded data)."""
    real = {node.id: node.params for node in graph.nodes()}
    try:  # the copy clones shape-only stand-ins, never the weights
        for node in graph.nodes():
            node.params = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor)
                           else v for k, v in real[node.id].items()}
        return graph.copy()
    finally:
        for node in graph.nodes():
            node.params = real[node.id]


class Meter:
    """(flops, params, bytes) ratios of allocations {group id: kept count} against `base` (the
    original model's stats), each allocation measured once by a dry run of the rewrite on a skeleton
    of `graph` (`skeleton`); with `shifted`, as the pass will write it, with a bias added to every
    consumer of a squeezed group that has none (an intercept's FLOPs). Bytes are the exact stored size: encoded weights at their encoded size,
    shared tables once. `removable`: the groups the caller may meter at 0 kept channels (residual branches removed
    whole, `rewrite.branch_removable`), whose removal also turns the ops after their consumers into a constant."""

    def __init__(self, graph: Graph, groups: ChannelGroups, base: GraphStats, shifted: bool = False,
                 grouped_shifted: bool = False, removable: Iterable[int] = ()) -> None:
        self.graph = skeleton(graph)
        self.groups = groups
        self.shifted = shifted  # the pass shifts every consumer's bias (a consumer without one gets one)
        self.grouped_shifted = grouped_shifted  # ... and every grouped conv's reading a squeezed group
        self.base = (max(1, base.flops), max(1, base.params), max(1, base.param_bytes))
        self._seen: dict[tuple[tuple[int, int], ...], Reached] = {}
        # A node's cost depends only on the counts of the groups with a member at it (a rewrite reshapes
        # nothing else), so each node's (flops, params, bytes) is kept per those counts: an allocation whose
        # every node was seen at its counts in some earlier dry run is summed without one. Checked on every
        # dry run (a node outside every group whose cost moved turns this off), and off when encoded weights
        # share tables across nodes (their bytes do not add up node by node).
        touch: dict[str, set[int]] = {}
        self._removable = frozenset(removable)
        for g in groups:
            # removing a residual branch whole also turns the ops after its consumers into a constant, and deletes
            # what only fed them (in an attention block, layers of other groups: `rewrite.branch_removal`)
            tail: list[str] = []
            if g.id in self._removable:
                chains, dead = branch_removal(graph, g.consumers)
                tail = [n for chain in chains.values() for n in chain] + sorted(dead)
            for nid in [m.node for m in g.members] + tail:
                touch.setdefault(nid, set()).add(g.id)
        self._touch = {nid: tuple(sorted(gids)) for nid, gids in touch.items()}
        nodes = self.graph.nodes()
        self._fixed = {n.id: self._cost(self.graph, n) for n in nodes if n.id not in self._touch}
        self._rest = _total(self._fixed.values())  # the nodes no group touches
        self._by_node: dict[tuple[str, tuple[int, ...]], tuple[int, int, int]] = {}
        self._additive = not any(isinstance(w, Encoded) for n in nodes for w in n.params.values())
        self.dry_runs = 0

    @staticmethod
    def _cost(g: Graph, n: Node) -> tuple[int, int, int]:
        # the counts graph_stats totals, read from shapes (a meta tensor has no nonzeros to count)
        return node_flops(g, n), node_params(n), graph_weight_bytes(list(n.params.values()))

    def _key(self, counts: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
        """The allocation `counts` as (group, kept) pairs of the groups that shrink, sorted."""
        return tuple(sorted((gid, k) for gid, k in counts.items() if k < self.groups[gid].size))

    def __call__(self, counts: Mapping[int, int]) -> Reached:
        key = self._key(counts)
        if any(k == 0 and gid not in self._removable for gid, k in key):
            self._additive = False  # a branch removed that was not declared: its tail's costs are not keyed by it
        if key not in self._seen:
            total = self._summed(dict(key)) if self._additive else None
            if total is None:
                total = self._dry_run(key)
            self._seen[key] = (total[0] / self.base[0], total[1] / self.base[1], total[2] / self.base[2])
        return self._seen[key]

    def _at(self, nid: str, kept: Mapping[int, int]) -> tuple[str, tuple[int, ...]]:
        return nid, tuple(kept.get(gid, self.groups[gid].size) for gid in self._touch[nid])

    def _summed(self, kept: Mapping[int, int]) -> tuple[int, int, int] | None:
        """The allocation's totals from the per-node costs seen before, or None when a node's are missing."""
        costs = [self._by_node.get(self._at(nid, kept)) for nid in self._touch]
        if any(c is None for c in costs):
            return None
        return _total([self._rest, *(c for c in costs if c is not None)])

    def _rewritten(self, key: tuple[tuple[int, int], ...]) -> Graph:
        """The skeleton with the allocation `key` applied."""
        g = self.graph.copy()
        if key:
            apply_selection(g, self.groups, {gid: ChannelSelection(keep=list(range(k)),
                                                                   bias_shift=self._shifts(g, gid))
                                             for gid, k in key})
        return g

    def holders(self, counts: Mapping[int, int], measure: str, top: int = 3) -> list[tuple[str, float, str]]:
        """The `top` nodes holding the most of `measure` (flops, params or bytes) at the allocation `counts`, each
        as (node, its share of the original's total, how the allocation left it: `cut`, `held` — a group of
        `counts` reaches it but keeps every channel, as bounds may make it — or `fixed`, no group of `counts`
        reaches it): where a budget the allocation misses is held (`Budget.unreachable`). Bytes are counted per
        node (a shared table at each user)."""
        i = METRICS.index(measure)
        g = self._rewritten(self._key(counts))
        costs = sorted(((self._cost(g, n)[i], n.id) for n in g.nodes()), key=lambda c: (-c[0], c[1]))

        def state(nid: str, cost: int) -> str:
            if nid in self.graph and cost < self._cost(self.graph, self.graph.node(nid))[i]:
                return "cut"
            return "held" if any(gid in counts for gid in self._touch.get(nid, ())) else "fixed"

        return [(nid, c / self.base[i], state(nid, c)) for c, nid in costs[:top] if c > 0]

    def _dry_run(self, key: tuple[tuple[int, int], ...]) -> tuple[int, int, int]:
        self.dry_runs += 1
        g = self._rewritten(key)
        nodes = g.nodes()
        costs = {n.id: self._cost(g, n) for n in nodes}
        if not costs.keys() <= self._fixed.keys() | self._touch.keys() or any(
                costs.get(nid) != c for nid, c in self._fixed.items()):
            self._additive = False  # a rewrite added a node or moved one outside every group: no shortcut
        kept = dict(key)
        for nid in self._touch:  # a node the rewrite deleted (a removed residual branch's) costs nothing
            self._by_node[self._at(nid, kept)] = costs.get(nid, (0, 0, 0))
        flops, params, _ = _total(costs.values())
        return flops, params, graph_weight_bytes([w for n in nodes for w in n.params.values()])  # tables once

    def _shifts(self, g: Graph, gid: int) -> dict[str, torch.Tensor] | None:
        """Zero (shape-only) bias shifts for every consumer of group `gid`, when the pass shifts biases (and,
        with `grouped_shifted`, for every grouped conv reading it: squeeze_fold's per-group intercepts)."""
        if not self.shifted:
            return None
        # an encoded (quantized, coded) consumer weight takes no shift: the passes leave its bias alone
        out = {m.node: torch.zeros(w.shape[m.axis], dtype=torch.float64, device="meta")
               for m in self.groups[gid].members_of("consumer")
               if isinstance(w := g.node(m.node).params[m.param or "weight"], torch.Tensor)}
        if self.grouped_shifted:  # a grouped conv's shift is over all its input channels
            out.update({m.node: torch.zeros(int(w.shape[1]) * int(g.node(m.node).attrs["groups"]),
                                             dtype=torch.float64, device="meta")
                        for m in self.groups[gid].members if grouped_input(g, m)
                        and isinstance(w := g.node(m.node).params["weight"], torch.Tensor)})
        return out or None

    def biased(self, nodes: Iterable[str]) -> None:
        """Meters each of `nodes` with a bias where it has none (a pass that gives each an intercept, as trim's
        gdnt refit and mean compensation do, must count its params and FLOPs). Before the first allocation."""
        assert not self._seen, "Meter.biased after an allocation was metered"
        for nid in nodes:
            node = self.graph.node(nid)
            name, axis = (spec(node.kind).bias or {}).get("weight", (None, 0))
            w = node.params.get("weight")
            if name is not None and name not in node.params and isinstance(w, torch.Tensor):
                node.params[name] = torch.empty(w.shape[axis], dtype=w.dtype, device="meta")

    @property
    def measured(self) -> int:
        return len(self._seen)


def _total(costs: Iterable[tuple[int, int, int]]) -> tuple[int, int, int]:
    """Elementwise sum of (flops, params, bytes) triples."""
    flops = params = size = 0
    for f, p, b in costs:
        flops, params, size = flops + f, params + p, size + b
    return flops, params, size


def give_back(counts: Mapping[int, int], bounds: Mapping[int, GroupBounds],
              gain: Callable[[int, int, int], Any], fits: Callable[[dict[int, int]], bool]) -> dict[int, int]:
    """`counts` raised, one allowed step of one group at a time (`GroupBounds.above`), while `fits` holds:
    each round the step whose `gain(group, k, next k)` is the largest (None: that step is not wanted)."""
    out = dict(counts)
    while True:
        best: tuple[Any, int, int] | None = None
        for gid, k in out.items():
            k2 = bounds[gid].above(k)
            if k2 == k or (g := gain(gid, k, k2)) is None:
                continue
            if (best is None or g > best[0]) and fits({**out, gid: k2}):
                best = (g, gid, k2)
        if best is None:
            return out
        out[best[1]] = best[2]


def bisect(good: float, bad: float, ok: Callable[[float], bool], steps: int) -> float:
    """The last point found on the `good` side of the boundary between `good` (where `ok` holds)
    and `bad` (where it does not), after `steps` halvings."""
    for _ in range(steps):
        mid = (good + bad) / 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def bisect_int(good: int, bad: int, ok: Callable[[int], bool]) -> int:
    """The integer nearest `bad` on the `good` side where `ok` holds (`ok(good)` holds, `ok(bad)`
    does not, `ok` monotone between them)."""
    while abs(good - bad) > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good
