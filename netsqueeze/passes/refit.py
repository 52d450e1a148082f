"""Least-squares refit of the consumers of removed channels: the reconstruction step of squeeze-and-fold
(Ozen & Orailoglu, ECML PKDD 2020) for channels some other rule chose to remove (`trim`'s scores), and the
consumer statistics `squeeze_fold` and `trim` share (`gather`, `add`, `parallel_fit`, `Cross`).

At every consumer that is linear in its input channels, the augmented second moment E[[a, 1][a, 1]ᵀ] of
the group's channels is streamed over the calibration data; for a chosen kept set S the removed channels
are rebuilt as a ≈ a_S·T + t₀ (`squeeze_math.reconstruction`, least squares with intercept) and T folded
into the consumer, t₀ into its bias (`rewrite.SharedFold` and `ChannelSelection.bias_shift`). The fit is
measured on the graph the statistics were streamed from (a parallel fold, one calibration pass for every
group), or group by group in graph order on the graph as trimmed so far (`cascade`: the kept channels as the
trimmed graph computes them, regressed onto the original channels, so each fold also corrects the drift of the
groups trimmed before it). The cascade runs the data through the trimmed graph and its pass-start copy side by
side, layer by layer (`passes.frontier`): a few model passes over the data whatever the number of groups.
Because T, t₀ minimise each channel's squared error, the residual covariance is the least any
affine rebuild from S reaches, so every consumer's output error E‖W(a − â)‖² is at most the one of keeping
only the removed channels' means (bias compensation, T = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.ops import attr, spec
from netsqueeze.passes.base import PassContext, PassResult
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, Member, find_groups
from netsqueeze.passes.frontier import Frontier, SideBySide, first_positions
from netsqueeze.passes.rewrite import ChannelSelection, SharedFold, apply_selection, axis_vector
from netsqueeze.passes.squeeze_math import reconstruction, ridged_normal, solve_normal


@dataclass
class ConsumerStats:
    """Streamed statistics of one consumer's input in group-channel space: the augmented second moment
    over rows (conv: every spatial position is a row), and per-position sums for blocks (flatten→linear)."""

    member: Member  # the consumer's weight input axis
    value: Value  # the value it reads
    moment: torch.Tensor  # (C+1)×(C+1), summed
    pos_sum: torch.Tensor  # [C, block], summed
    count: int = 0  # rows in `moment`
    rows: int = 0  # rows per position in `pos_sum`


@dataclass
class Cross:
    """Streamed cross statistics between the kept channels as the rewritten graph computes them, a'_S, and
    the original channels a (a cascade refit's least squares a ≈ a'_S·T + t₀)."""

    xtx: torch.Tensor  # (k+1)x(k+1): [a'_S, 1]ᵀ[a'_S, 1]
    xty: torch.Tensor  # (k+1)xC:     [a'_S, 1]ᵀ a
    sum_now: torch.Tensor  # [k, block] per-position sums of a'_S
    sum_ref: torch.Tensor  # [C, block] per-position sums of a
    count: int = 0  # rows in `xtx`
    rows: int = 0  # rows per position in the sums

    @staticmethod
    def empty(k: int, c: int, block: int) -> Cross:
        z = torch.zeros
        return Cross(z(k + 1, k + 1, dtype=torch.float64), z(k + 1, c, dtype=torch.float64),
                     z(k, block, dtype=torch.float64), z(c, block, dtype=torch.float64))

    def add(self, a_s: torch.Tensor, a: torch.Tensor) -> None:
        """Adds one batch: `a_s` [n, k, block] the kept channels now, `a` [n, C, block] the original ones
        (every block position is a row of the fit)."""
        x, y = rows_of(a_s), rows_of(a)
        add_gram(self.xtx, x)
        k = x.shape[1]
        self.xty[:k] += x.T @ y
        self.xty[k] += y.sum(0)
        self.sum_now += a_s.sum(0)
        self.sum_ref += a.sum(0)
        self.count += x.shape[0]
        self.rows += a.shape[0]

    def fit(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(T [k, C], t₀ [C, block]): least squares with a per-position intercept; the kept channels are
        refit too, which corrects their drift."""
        t = solve_normal(ridged_normal(self.xtx, ridge), self.xty)[:-1]  # the last row (intercept): per position
        n = max(1, self.rows)
        return t, self.sum_ref / n - torch.einsum("sj,sc->cj", self.sum_now / n, t)


def refittable(graph: Graph, m: Member) -> bool:
    """Whether a reconstruction of consumer member `m`'s input channels folds exactly into its weight: the
    op is linear in that axis (its op definition says so; grouped convs are not) and every channel
    occupies the same number of positions."""
    node = graph.node(m.node)
    foldable = spec(node.kind).foldable
    if foldable is None or m.param is None or not foldable(node, m.param, m.axis):
        return False
    if node.kind == "conv" and attr(node, "groups") != 1:
        return False
    return len({len(p) for p in m.index}) == 1


def plan(graph: Graph, group: ChannelGroup) -> list[ConsumerStats]:
    """Empty statistics for every refittable consumer of `group` (the others are only sliced)."""
    out = []
    for m in group.members_of("consumer"):
        if not refittable(graph, m):
            continue
        c, block = len(m.index), len(m.index[0])
        out.append(ConsumerStats(m, graph.operands(m.node)[0], torch.zeros(c + 1, c + 1, dtype=torch.float64),
                                 torch.zeros(c, block, dtype=torch.float64)))
    return out


def _channel_axis(graph: Graph, m: Member) -> int:
    """The axis of consumer `m`'s input its channels are on: `linear` reads the last axis, conv and
    conv_transpose (channels-first) axis 1."""
    return -1 if graph.node(m.node).kind == "linear" else 1


def channels_last(graph: Graph, m: Member, x: torch.Tensor) -> torch.Tensor:
    """Consumer `m`'s input `x` in float64 with its input-channel axis last."""
    return x.detach().double().movedim(_channel_axis(graph, m), -1)


def gather(graph: Graph, m: Member, x: torch.Tensor, at: list[list[int]] | None = None,
           keep: list[int] | None = None) -> torch.Tensor:
    """Consumer `m`'s input `x` in group-channel space, [rows, C, block] in float64 (rows: every position but
    the channel axis, as `channels_last` orders them); `at` overrides where the channels sit on that axis (a
    grouped conv's weight slots: block = conv groups); `keep`: only those group channels, [rows, k, block].
    The channels are picked in the input's own dtype and layout, then converted in one copy."""
    idx = torch.tensor(at if at is not None else [list(q) for q in m.index])  # [C, block]
    if keep is not None:
        idx = idx[keep]
    axis = _channel_axis(graph, m)
    xm, flat = x.detach(), idx.reshape(-1)
    if not (len(flat) == xm.shape[axis] and bool((flat == torch.arange(len(flat))).all())):
        xm = xm.index_select(axis, flat)
    xm = xm.movedim(axis, -1).to(torch.float64, memory_format=torch.contiguous_format)
    return xm.reshape(-1, *idx.shape)


def rows_of(a: torch.Tensor) -> torch.Tensor:
    """`a` [n, C, block] (`gather`) as fit rows [n·block, C], ordered (sample, block position)."""
    return a.reshape(a.shape[0], a.shape[1]) if a.shape[2] == 1 else a.movedim(-1, 1).reshape(-1, a.shape[1])


def add_gram(moment: torch.Tensor, x: torch.Tensor) -> None:
    """Adds [x, 1]ᵀ[x, 1] of rows `x` [N, C] to the (C+1)×(C+1) `moment` (without building [x, 1])."""
    c = x.shape[1]
    moment[:c, :c] += x.T @ x
    s = x.sum(0)
    moment[:c, c] += s
    moment[c, :c] += s
    moment[c, c] += x.shape[0]


def add(stats: ConsumerStats, a: torch.Tensor) -> torch.Tensor:
    """Adds one batch of a consumer's input in group-channel space, `a` [n, C, block] (`gather`), to
    `stats`; returns its rows [n·block, C] (`rows_of`)."""
    rows = rows_of(a)
    add_gram(stats.moment, rows)
    stats.count += rows.shape[0]
    stats.pos_sum += a.sum(0)
    stats.rows += a.shape[0]
    return rows


def update(graph: Graph, stats: ConsumerStats, x: torch.Tensor) -> None:
    """Adds one calibration batch of the consumer's input `x` to `stats`."""
    add(stats, gather(graph, stats.member, x))


def parallel_fit(stats: ConsumerStats, keep: list[int], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T [k, C], t₀ [C, block]) rebuilding the consumer's channels from the kept ones on the graph the
    statistics were streamed from; per-position intercept: each position's mean minus the kept channels'
    mapped mean there."""
    t, t0 = reconstruction(stats.moment / max(1, stats.count), keep, ridge)
    mean_pos = stats.pos_sum / max(1, stats.rows)  # [C, block]
    if mean_pos.shape[1] == 1:
        return t, t0[:, None]
    return t, mean_pos - torch.einsum("sj,sc->cj", mean_pos[keep], t)


def selection(graph: Graph, keep: list[int], stats: list[ConsumerStats],
              shifts: dict[str, torch.Tensor] | None = None, ridge: float = 1e-6) -> ChannelSelection:
    """The selection keeping `keep` (ascending) with every consumer in `stats` refit: fold T and intercept
    t₀ per consumer (per block position for flatten→linear), measured at its own input. `shifts` are
    bias shifts {consumer: tensor over its input axis} for consumers not refit (removed channels' means)."""
    folds: dict[str, SharedFold] = {}
    out_shifts: dict[str, torch.Tensor] = dict(shifts or {})
    for st in stats:
        t, t0_pos = parallel_fit(st, keep, ridge)
        folds[st.member.node] = SharedFold(t)
        out_shifts[st.member.node] = axis_vector(graph, st.member, t0_pos)
    return ChannelSelection(keep=keep, fold=folds or None, bias_shift=out_shifts or None)


def cascade(graph: Graph, ctx: PassContext, groups: ChannelGroups, keeps: dict[int, list[int]],
            ridge: float = 1e-6) -> PassResult:
    """Trims every group in `keeps` (group id → kept channels) one group at a time in graph order (of the
    first node each touches). Each group's refittable consumers get the least-squares fold from its kept
    channels *as the graph trimmed so far computes them* to the original channels (the two graphs run side
    by side from a copy of `graph` made here, layer by layer where the compiler gives `ctx.segment`, else
    streamed whole per group); its other consumers (conv_transpose, unequal-block linear ones) get the
    removed channels' original means in their bias; grouped convs are sliced. Groups are found again after
    every rewrite, as shared axes (concat) shift."""
    out = PassResult(changed=bool(keeps))
    if not keeps:
        return out
    ref = graph.copy()
    topo = graph.topo_order()
    start = first_positions(topo, (groups[gid] for gid in keeps))
    order = sorted(keeps, key=lambda gid: (start[gid], gid))
    side = SideBySide(Frontier.open(graph, ref, ctx, topo), graph, ref, ctx, out.notes, "refit", start.values())
    for gid in order:
        ident = groups[gid].producers, groups[gid].consumers
        now = find_groups(graph)
        fresh = next(g for g in now if (g.producers, g.consumers) == ident)
        sel = _cascade_selection(graph, ref, fresh, groups[gid], sorted(keeps[gid]), ridge, side, start[gid], gid)
        r = apply_selection(graph, now, {fresh.id: sel})
        out.touched |= r.touched
    return out


def _cascade_selection(graph: Graph, ref: Graph, g: ChannelGroup, g_ref: ChannelGroup, keep: list[int],
                       ridge: float, side: SideBySide, at: int, gid: int) -> ChannelSelection:
    """Group `g`'s selection keeping `keep`, its consumers refit on the tensors `side` gives at checkpoint
    position `at` (per batch: their inputs in `graph` as trimmed so far and in the pass-start `ref`)."""
    ref_of = {m.node: m for m in g_ref.members_of("consumer")}
    cons = [m for m in g.members_of("consumer") if m.node in ref_of
            and (refittable(graph, m) or graph.node(m.node).kind in ("linear", "conv_transpose"))]
    values = list(dict.fromkeys(graph.operands(m.node)[0] for m in cons))
    fits = {m.node: Cross.empty(len(keep), len(m.index), len(m.index[0])) for m in cons if refittable(graph, m)}
    # the others: sums over their input axis in the pass-start graph (whole axis: blocks may be unequal)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for now_b, ref_b in side.pairs(at, values, gid) if cons else ():
        acts_now, acts_ref = dict(zip(values, now_b)), dict(zip(values, ref_b))
        for m in cons:
            v = graph.operands(m.node)[0]
            if m.node in fits:
                fits[m.node].add(gather(graph, m, acts_now[v], keep=keep), gather(ref, ref_of[m.node], acts_ref[v]))
                continue
            x = channels_last(ref, ref_of[m.node], acts_ref[v])
            x = x.reshape(-1, x.shape[-1])
            sums[m.node] = sums[m.node] + x.sum(0) if m.node in sums else x.sum(0)
            rows[m.node] = rows.get(m.node, 0) + x.shape[0]
    folds: dict[str, SharedFold] = {}
    shifts: dict[str, torch.Tensor] = {}
    drop = [c for c in range(g.size) if c not in set(keep)]
    for m in cons:
        if m.node in fits:
            if fits[m.node].rows:
                t, t0 = fits[m.node].fit(ridge)
                folds[m.node] = SharedFold(t)
                shifts[m.node] = axis_vector(graph, m, t0)
            continue
        if m.node not in sums:
            continue
        mean = sums[m.node] / rows[m.node]  # over the pass-start input axis
        full = torch.zeros(graph.node(m.node).params[m.param or "weight"].shape[m.axis], dtype=torch.float64)
        for c in drop:  # not refittable: the removed channels' means only
            full[list(m.index[c])] = mean[list(ref_of[m.node].index[c])]
        shifts[m.node] = full
    return ChannelSelection(keep=keep, fold=folds or None, bias_shift=shifts or None)
