"""Least-squares refit of the consumers of removed channels: the reconstruction step of squeeze-and-fold
(Ozen & Orailoglu, ECML PKDD 2020) for channels some other rule chose to remove (`trim`'s scores).

At every consumer that is linear in its input channels, the augmented second moment E[[a, 1][a, 1]ᵀ] of
the group's channels is streamed over the calibration data; for a chosen kept set S the removed channels
are rebuilt as a ≈ a_S·T + t₀ (`squeeze_math.reconstruction`, least squares with intercept) and T folded
into the consumer, t₀ into its bias (`rewrite.SharedFold` and `ChannelSelection.bias_shift`). The fit is
measured on the graph the statistics were streamed from (a parallel fold, one calibration pass for every
group), or group by group in graph order on the graph as trimmed so far (`cascade`: the kept channels as the
trimmed graph computes them, regressed onto the original channels, so each fold also corrects the drift of the
groups trimmed before it; two calibration passes per group). Because T, t₀ minimise each channel's squared error, the residual covariance is the least any
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


def gather(graph: Graph, m: Member, x: torch.Tensor) -> torch.Tensor:
    """Consumer `m`'s input `x` in group-channel space, [rows, C, block] (conv reads axis 1, linear the last)."""
    xm = x.detach().double()
    xm = xm.movedim(1, -1) if graph.node(m.node).kind != "linear" else xm
    idx = torch.tensor([list(q) for q in m.index])  # [C, block]
    return xm[..., idx].reshape(-1, *idx.shape)


def update(graph: Graph, stats: ConsumerStats, x: torch.Tensor) -> None:
    """Adds one calibration batch of the consumer's input `x` to `stats`."""
    a = gather(graph, stats.member, x)  # [n, C, block]
    rows = a.movedim(-1, 1).reshape(-1, a.shape[1])
    aug = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    stats.moment += aug.T @ aug
    stats.count += rows.shape[0]
    stats.pos_sum += a.sum(0)
    stats.rows += a.shape[0]


def selection(graph: Graph, keep: list[int], stats: list[ConsumerStats],
              shifts: dict[str, torch.Tensor] | None = None, ridge: float = 1e-6) -> ChannelSelection:
    """The selection keeping `keep` (ascending) with every consumer in `stats` refit: fold T and intercept
    t₀ per consumer (per block position for flatten→linear), measured at its own input. `shifts` are
    bias shifts {consumer: tensor over its input axis} for consumers not refit (removed channels' means)."""
    folds: dict[str, SharedFold] = {}
    out_shifts: dict[str, torch.Tensor] = dict(shifts or {})
    for st in stats:
        m = st.member
        t, t0 = reconstruction(st.moment / max(1, st.count), keep, ridge)
        mean_pos = st.pos_sum / max(1, st.rows)  # [C, block]
        # per-position intercept: each position's mean minus the kept channels' mapped mean there
        t0_pos = mean_pos - torch.einsum("sj,sc->cj", mean_pos[keep], t) if mean_pos.shape[1] > 1 else t0[:, None]
        folds[m.node] = SharedFold(t)
        out_shifts[m.node] = axis_vector(graph, m, t0_pos)
    return ChannelSelection(keep=keep, fold=folds or None, bias_shift=out_shifts or None)


def cascade(graph: Graph, ctx: PassContext, groups: ChannelGroups, keeps: dict[int, list[int]],
            ridge: float = 1e-6) -> PassResult:
    """Trims every group in `keeps` (group id → kept channels) one group at a time in graph order. Each
    group's refittable consumers get the least-squares fold from its kept channels *as the graph trimmed so
    far computes them* to the original channels (streamed side by side from a copy of `graph` made here);
    its other consumers (conv_transpose, grouped or unequal-block ones) get the removed channels' original
    means in their bias. Groups are found again after every rewrite, as shared axes (concat) shift."""
    ref = graph.copy()
    pos = {nid: i for i, nid in enumerate(graph.topo_order())}
    order = sorted(keeps, key=lambda gid: min(pos[n] for n in groups[gid].producers or groups[gid].consumers))
    out = PassResult(changed=bool(keeps))
    for gid in order:
        ident = groups[gid].producers, groups[gid].consumers
        now = find_groups(graph)
        fresh = next(g for g in now if (g.producers, g.consumers) == ident)
        r = apply_selection(graph, now, {fresh.id: _cascade_selection(graph, ref, ctx, fresh, groups[gid],
                                                                      sorted(keeps[gid]), ridge)})
        out.touched |= r.touched
    return out


def _cascade_selection(graph: Graph, ref: Graph, ctx: PassContext, g: ChannelGroup, g_ref: ChannelGroup,
                       keep: list[int], ridge: float) -> ChannelSelection:
    ref_of = {m.node: m for m in g_ref.members_of("consumer")}
    cons = [m for m in g.members_of("consumer") if m.node in ref_of
            and (refittable(graph, m) or graph.node(m.node).kind in ("linear", "conv_transpose"))]
    values = list(dict.fromkeys(graph.operands(m.node)[0] for m in cons))
    k = len(keep)
    acc: dict[str, dict[str, torch.Tensor]] = {}
    for now_b, ref_b in zip(ctx.stream(graph, values), ctx.stream(ref, values)) if cons else ():
        acts_now, acts_ref = dict(zip(values, now_b)), dict(zip(values, ref_b))
        for m in cons:
            v = graph.operands(m.node)[0]
            y = gather(ref, ref_of[m.node], acts_ref[v])  # [n, C, block]
            a = acc.setdefault(m.node, {"sum_ref": torch.zeros(y.shape[1:], dtype=torch.float64), "n": torch.zeros(())})
            a["sum_ref"] += y.sum(0)
            a["n"] += y.shape[0]
            if not refittable(graph, m):
                continue
            x = gather(graph, m, acts_now[v])[:, keep]  # [n, k, block]
            xr = x.movedim(-1, 1).reshape(-1, k)
            x1 = torch.cat([xr, torch.ones(xr.shape[0], 1, dtype=xr.dtype)], 1)
            yr = y.movedim(-1, 1).reshape(-1, y.shape[1])
            for key, val in (("xtx", x1.T @ x1), ("xty", x1.T @ yr), ("sum_now", x.sum(0))):
                a[key] = a[key] + val if key in a else val
    folds: dict[str, SharedFold] = {}
    shifts: dict[str, torch.Tensor] = {}
    drop = [c for c in range(g.size) if c not in set(keep)]
    for m in cons:
        st = acc.get(m.node)
        if st is None:
            continue
        n = max(1.0, float(st["n"]))
        mean_ref = st["sum_ref"] / n  # [C, block]
        if "xtx" in st:
            # k × C (the last row, the intercept, is dropped: per position below); kept channels are refit
            # too, which corrects their drift
            t = solve_normal(ridged_normal(st["xtx"], ridge), st["xty"])[:-1]
            t0 = mean_ref - torch.einsum("sj,sc->cj", st["sum_now"] / n, t)  # per position
            folds[m.node] = SharedFold(t)
            shifts[m.node] = axis_vector(graph, m, t0)
            continue
        full = torch.zeros(graph.node(m.node).params[m.param or "weight"].shape[m.axis], dtype=torch.float64)
        for c in drop:  # not refittable: the removed channels' means only
            full[list(m.index[c])] = mean_ref[c, : len(m.index[c])]
        shifts[m.node] = full
    return ChannelSelection(keep=keep, fold=folds or None, bias_shift=shifts or None)
