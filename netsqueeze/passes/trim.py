"""`trim`: structured neuron/channel trimming by a per-channel score, to a ratio or a global FLOPs/params budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import pdist, squareform

from netsqueeze.errors import BudgetError, Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.collectors import Moments, Reservoir, channel_rows
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, DependencyAnalysis, Member
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection

Criterion = Literal["gdnt", "l1", "l2", "bn_scale", "activation", "random"]


@dataclass(frozen=True)
class _Obs:
    """Where a group's channels are observed: the input value of one consumer, and that consumer's output."""

    consumer: Member  # the consumer's weight axis
    value: Member  # the group's value member that feeds it
    out: Value  # the consumer's output value
    out_axis: int
    spatial: bool  # conv maps: average over H×W for gdnt


def _observations(graph: Graph, group: ChannelGroup) -> list[_Obs]:
    values = {(m.node, m.output): m for m in group.members if m.param is None}
    obs = []
    for m in group.members_of("consumer"):
        node = graph.node(m.node)
        if node.kind not in ("conv", "linear", "conv_transpose"):
            continue  # attention's out_proj reads heads inside the node: not observable
        src = graph.operands(m.node)[0]
        vm = values.get(src)
        if vm is None:
            continue
        rank = len(node.meta[0].shape)
        out_axis = rank - 1 if node.kind == "linear" else 1
        obs.append(_Obs(m, vm, (m.node, 0), out_axis, node.kind != "linear"))
    return obs


def _per_channel(stat: torch.Tensor, m: Member) -> torch.Tensor:
    """Averages a per-position statistic over each channel's positions (flatten blocks)."""
    return torch.stack([stat[list(p)].mean() for p in m.index])


def fr_cross_edges(a: np.ndarray, b: np.ndarray) -> int:
    """Friedman–Rafsky statistic: edges of the Euclidean MST over a ∪ b that join a point of a to one of b."""
    z = np.vstack([a, b])
    d = squareform(pdist(z))
    d[d == 0] = 1e-12  # scipy reads a zero as "no edge"; duplicates must stay connected
    np.fill_diagonal(d, 0.0)
    mst = minimum_spanning_tree(d).tocoo()
    na = a.shape[0]
    return int(np.sum((mst.row < na) != (mst.col < na)))


def gdnt_scores(parents: torch.Tensor, children: torch.Tensor, child_groups: int, seed: int) -> torch.Tensor:
    """Dependency of child groups on each parent channel, max over child groups (METHODS.md §3).

    Rows are samples. Split into thirds A, B, C; in A each parent channel y is replaced by the y of the
    nearest neighbour in B under the other parents z (conditional independence of y and x given z);
    C is the joint sample. Score = 1 − R / (n/3), R = Friedman–Rafsky cross edges between
    {(x_A, y_nn)} and {(x_C, y_C)}: near 0 when the children ignore y, near 1 when they depend on it.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(parents.shape[0], generator=gen)
    p, x = _standardise(parents[perm]), _standardise(children[perm])
    m3 = p.shape[0] // 3
    if m3 < 2:
        raise ValueError("gdnt needs at least 6 calibration samples")
    pa, pb, pc = p[:m3], p[m3:2 * m3], p[2 * m3:3 * m3]
    xa, xc = x[:m3].numpy(), x[2 * m3:3 * m3].numpy()
    d2 = torch.cdist(pa, pb) ** 2
    blocks = [b for b in np.array_split(np.arange(x.shape[1]), min(child_groups, x.shape[1])) if len(b)]
    n = p.shape[1]
    scores = torch.zeros(n, dtype=torch.float64)
    for c in range(n):
        if n > 1:
            nn = (d2 - (pa[:, c, None] - pb[None, :, c]) ** 2).argmin(1)
        else:  # no other parents: plain independence, a random pairing
            nn = torch.randperm(m3, generator=gen)
        y_ind = pb[nn, c].numpy()[:, None]
        y_joint = pc[:, c].numpy()[:, None]
        for blk in blocks:
            r = fr_cross_edges(np.hstack([xa[:, blk], y_ind]), np.hstack([xc[:, blk], y_joint]))
            scores[c] = max(float(scores[c]), 1.0 - r / m3)
    return scores


def _standardise(t: torch.Tensor) -> torch.Tensor:
    sd = t.std(0, keepdim=True)
    return torch.where(sd > 1e-12, (t - t.mean(0, keepdim=True)) / sd.clamp_min(1e-12), torch.zeros_like(t))


@register_pass
@dataclass(frozen=True)
class Trim(TransformPass):
    """Removes the lowest-scoring channels of every prunable channel group, through `apply_selection`.

    Needs: shapes inferred; calibration data (`ctx.stream`) for `criterion = gdnt | activation` and for
    bias compensation (skipped, with a note, without it). Selection (`ctx.selected`): a group shrinks
    only if all its producers are selected. Target: `ratio` of each group's channels, or else the
    policy's global budget (`ctx.budget`, e.g. {"flops": 0.5}: keep ≤ 50% of the original FLOPs), met
    by ranking channels across groups by their score divided by their group's mean score and
    removing the lowest until the budget holds (binary search, exact FLOPs/params of each candidate);
    `BudgetError` states what was reached when it cannot. `round_to` rounds kept counts up,
    `min_channels` is a floor per group.

    Criteria (higher = kept): `l1`/`l2` — group magnitude: the norm of every weight slice the channel
    owns (producer rows, consumer columns), normalised per member and averaged, as Torch-Pruning's
    group magnitude; `bn_scale` — |γ| of the group's batch/group norms (network slimming, Liu et al.
    2017; l1 where a group has none, with a note — so put `trim` before `fold_bn` for it); `activation` — mean |a| or variance at the consumers'
    inputs; `random` (seeded); `gdnt` — geometric dependency of the next layer on each neuron (GDNT /
    MINT, Yasaei Sekeh lab; Henze–Penrose via Friedman–Rafsky, Yasaei Sekeh & Hero 2019;
    METHODS.md §3). Choices for gdnt, where the method leaves them open: the parents are the group's
    channels at each consumer's input, the children that consumer's outputs (conv maps averaged over
    H×W, tokens as samples for sequences), split into `gdnt_child_groups` groups; a channel's score is
    its largest dependency over child groups and consumers (a neuron is kept if any child group
    depends on it, MINT's "no remaining outgoing connection" rule at channel level); columns are
    standardised; `gdnt_samples` rows are reservoir-sampled per consumer so memory is bounded; groups
    whose consumers are not observable (attention heads) fall back to l1, noted in the result.

    Bias compensation (METHODS.md, "a lesson that applies to every structural pass"): each removed
    channel's mean at a consumer's input, passed through the consumer's weights, is added to its bias;
    exact for linear consumers, approximate at zero-padded borders of convs.
    Guarantees: the graph verifies; frozen and unselected groups are untouched.
    """

    name: ClassVar[str] = "trim"
    criterion: Criterion = "l1"
    ratio: float | None = field(default=None, metadata={"min": 0.0, "max": 0.999, "unit": "ratio"})
    round_to: int = field(default=1, metadata={"min": 1})
    min_channels: int = field(default=1, metadata={"min": 1})
    activation_stat: Literal["mean_abs", "variance"] = "mean_abs"
    bias_compensation: bool = True
    seed: int = 0
    gdnt_samples: int = 384
    gdnt_child_groups: int = 8

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = ctx.analysis(DependencyAnalysis, graph).restrict(ctx.selected)
        lim = {g.id: self._limits(g, ctx) for g in groups.prunable()}
        cands = [g for g in groups.prunable() if g.size > lim[g.id][0]]
        first = cands[0].producers[0] if cands else None
        self._check(first, self.min_channels, self.round_to, ctx)
        notes: list[str] = []
        if not cands:
            return PassResult(changed=False, notes=["no prunable channel group"])
        obs = {g.id: _observations(graph, g) for g in cands}
        moments, reservoirs = self._collect(graph, ctx, cands, obs, notes)
        scores = {g.id: self._score(graph, g, obs[g.id], moments, reservoirs, notes) for g in cands}
        before = graph_stats(ctx.original or graph)
        if self.ratio is not None:
            sel = {g.id: self._keep_top(scores[g.id], self._ratio_keep(g.size, *lim[g.id])) for g in cands}
        else:
            budget = {k: v for k, v in ctx.budget.items() if k in ("flops", "params")}
            sel = self._budget(graph, groups, cands, scores, lim, budget, before.flops, before.params)
        sel = {gid: s for gid, s in sel.items() if len(s.keep) < groups[gid].size}
        if self.bias_compensation and moments:
            sel = {gid: self._compensate(graph, groups[gid], s, obs[gid], moments) for gid, s in sel.items()}
        result = apply_selection(graph, groups, sel)
        after = graph_stats(graph)
        removed = sum(groups[gid].size - len(s.keep) for gid, s in sel.items())
        result.metrics.update({"channels_removed": float(removed), "groups_trimmed": float(len(sel)),
                               "flops_ratio": after.flops / max(1, before.flops),
                               "params_ratio": after.params / max(1, before.params)})
        result.notes.extend(notes)
        return result

    # ---- checks and targets ----
    def _check(self, node: str | None, min_keep: int, round_to: int, ctx: PassContext) -> None:
        def fail(msg: str) -> NetsqueezeError:
            return NetsqueezeError(Diagnostic(f"trim: {msg}", node=node))

        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise fail(f"ratio {self.ratio} leaves no channel; it must be in [0, 1)")
        if self.ratio is None and not ({"flops", "params"} & set(ctx.budget)):
            raise fail("needs a `ratio` or a flops/params budget in the policy")
        if min_keep < 1 or round_to < 1:
            raise fail("min_channels and round_to must be at least 1")
        for k in ("flops", "params"):
            if k in ctx.budget and not 0.0 < ctx.budget[k] <= 1.0:
                raise fail(f"budget {k} = {ctx.budget[k]} must be a ratio in (0, 1]")

    def _limits(self, g: ChannelGroup, ctx: PassContext) -> tuple[int, int]:
        """(fewest channels to keep, rounding) for a group: the pass options and the policy's bounds
        (global and `bounds on` its producers), the most restrictive winning; max_ratio caps removal."""
        b = ctx.bounds_for(g.producers)
        min_keep = max(self.min_channels, int(b.get("min_channels", 1)))
        if "max_ratio" in b:
            min_keep = max(min_keep, g.size - math.floor(float(b["max_ratio"]) * g.size + 1e-9))
        return min(min_keep, g.size), max(self.round_to, int(b.get("round_to", 1)))

    def _ratio_keep(self, size: int, min_keep: int, round_to: int) -> int:
        assert self.ratio is not None
        keep = size - math.floor(self.ratio * size + 1e-9)
        keep = min(size, math.ceil(keep / round_to) * round_to)
        return max(keep, min(size, min_keep))

    @staticmethod
    def _keep_top(score: torch.Tensor, k: int) -> ChannelSelection:
        order = sorted(range(len(score)), key=lambda c: (-float(score[c]), c))
        return ChannelSelection(keep=sorted(order[:k]))

    def _budget(self, graph: Graph, groups: ChannelGroups, cands: list[ChannelGroup],
                scores: dict[int, torch.Tensor], lim: dict[int, tuple[int, int]], budget: dict[str, float],
                flops0: int, params0: int) -> dict[int, ChannelSelection]:
        entries: list[tuple[float, int, int]] = []
        for g in cands:
            s = scores[g.id].double()
            norm = s / (s.abs().mean() + 1e-12)
            entries.extend((float(norm[c]), g.id, c) for c in range(g.size))
        entries.sort()

        def select(t: int) -> dict[int, ChannelSelection]:
            drop: dict[int, int] = {}
            for _, gid, _ in entries[:t]:
                drop[gid] = drop.get(gid, 0) + 1
            out = {}
            for gid, d in drop.items():
                size = groups[gid].size
                min_keep, round_to = lim[gid]
                keep = max(min(size, min_keep), size - d)
                keep = min(size, math.ceil(keep / round_to) * round_to)
                out[gid] = self._keep_top(scores[gid], keep)
            return out

        def measure(t: int) -> tuple[float, float]:
            g = graph.copy()
            apply_selection(g, groups, {k: v for k, v in select(t).items() if len(v.keep) < groups[k].size})
            st = graph_stats(g)
            return st.flops / max(1, flops0), st.params / max(1, params0)

        def ok(r: tuple[float, float]) -> bool:
            return r[0] <= budget.get("flops", math.inf) + 1e-12 and r[1] <= budget.get("params", math.inf) + 1e-12

        lo, hi = 0, len(entries)
        reached = measure(hi)
        if not ok(reached):
            raise BudgetError(Diagnostic(
                f"trim cannot meet the budget {_fmt_budget(budget)}: removing every removable channel "
                f"reaches flops {reached[0]:.1%}, params {reached[1]:.1%} of the original",
                node=cands[0].producers[0]))
        if ok(measure(0)):
            return {}
        while hi - lo > 1:  # invariant: lo fails, hi meets the budget
            mid = (lo + hi) // 2
            if ok(measure(mid)):
                hi = mid
            else:
                lo = mid
        return select(hi)

    # ---- statistics ----
    def _collect(self, graph: Graph, ctx: PassContext, cands: list[ChannelGroup], obs: dict[int, list[_Obs]],
                 notes: list[str]) -> tuple[dict[tuple[Value, int], Moments], dict[tuple[int, int], Reservoir]]:
        need_act = self.criterion in ("activation", "gdnt")
        if not need_act and not (self.bias_compensation and ctx.stream_fn is not None):
            if self.bias_compensation:
                notes.append("bias compensation skipped: no calibration data")
            return {}, {}
        values: list[Value] = []
        moments: dict[tuple[Value, int], Moments] = {}
        reservoirs: dict[tuple[int, int], Reservoir] = {}
        for g in cands:
            for i, o in enumerate(obs[g.id]):
                v = (o.value.node, o.value.output or 0)
                moments.setdefault((v, o.value.axis), Moments())
                for val in (v, o.out):
                    if val not in values:
                        values.append(val)
                if self.criterion == "gdnt":
                    reservoirs[(g.id, i)] = Reservoir(self.gdnt_samples, self.seed + g.id)
        if not values:
            return {}, {}
        slot = {v: i for i, v in enumerate(values)}
        for batch in ctx.stream(graph, values):
            for (v, axis), mo in moments.items():
                mo.update(channel_rows(batch[slot[v]], axis))
            for (gid, i), res in reservoirs.items():
                o = obs[gid][i]
                v = (o.value.node, o.value.output or 0)
                par = channel_rows(batch[slot[v]], o.value.axis, spatial_mean=o.spatial)
                par = torch.stack([par[:, list(p)].mean(1) for p in o.value.index], 1)
                chi = channel_rows(batch[slot[o.out]], o.out_axis, spatial_mean=o.spatial)
                if chi.shape[0] == par.shape[0]:
                    res.update(torch.cat([par, chi], 1))
        return moments, reservoirs

    def _score(self, graph: Graph, g: ChannelGroup, obs: list[_Obs], moments: dict[tuple[Value, int], Moments],
               reservoirs: dict[tuple[int, int], Reservoir], notes: list[str]) -> torch.Tensor:
        crit = self.criterion
        if crit == "random":
            return torch.rand(g.size, generator=torch.Generator().manual_seed(self.seed + g.id), dtype=torch.float64)
        if crit == "bn_scale":
            norms = [m for m in g.members if m.param == "weight"
                     and graph.node(m.node).kind in ("batch_norm", "group_norm", "layer_norm")]
            if norms:
                return sum((_per_channel(graph.node(m.node).params["weight"].double().abs(), m) for m in norms),
                           torch.zeros(g.size, dtype=torch.float64))
            notes.append(f"group {g.id}: no norm layer, bn_scale fell back to l1")
            crit = "l1"
        if crit == "activation" and obs:
            stats = []
            for o in obs:
                mo = moments[((o.value.node, o.value.output or 0), o.value.axis)]
                stat = mo.mean_abs if self.activation_stat == "mean_abs" else mo.var
                stats.append(_per_channel(stat, o.value))
            return torch.stack(stats).mean(0)
        if crit == "gdnt" and obs:
            best = torch.full((g.size,), -math.inf, dtype=torch.float64)
            for i in range(len(obs)):
                res = reservoirs[(g.id, i)]
                if res.rows is None or res.rows.shape[0] < 6:
                    continue
                sample = res.sample()
                best = torch.maximum(best, gdnt_scores(sample[:, :g.size], sample[:, g.size:],
                                                       self.gdnt_child_groups, self.seed + g.id))
            if bool(torch.isfinite(best).all()):
                return best
        if crit in ("activation", "gdnt"):
            notes.append(f"group {g.id}: no observable consumer input, {crit} fell back to l1")
            crit = "l1"
        # group magnitude (as Torch-Pruning's GroupMagnitudeImportance): every weight slice the channel
        # owns — producer rows and consumer columns — each member normalised by its mean, then averaged;
        # producer rows alone misjudge channels after fold_bn has rescaled them
        parts = []
        for m in (*g.members_of("producer"), *g.members_of("consumer")):
            w = graph.node(m.node).params[m.param or ""].double().movedim(m.axis, 0)
            per_pos = w.abs().flatten(1).sum(1) if crit == "l1" else (w * w).flatten(1).sum(1)
            v = torch.stack([per_pos[list(p)].sum() for p in m.index])
            v = v if crit == "l1" else v.sqrt()
            parts.append(v / v.mean().clamp_min(1e-30))
        return torch.stack(parts).mean(0) if parts else torch.zeros(g.size, dtype=torch.float64)

    def _compensate(self, graph: Graph, g: ChannelGroup, sel: ChannelSelection, obs: list[_Obs],
                    moments: dict[tuple[Value, int], Moments]) -> ChannelSelection:
        drop = [c for c in range(g.size) if c not in set(sel.keep)]
        shifts: dict[str, torch.Tensor] = {}
        for o in obs:
            mean = moments[((o.value.node, o.value.output or 0), o.value.axis)].mean
            m = o.consumer
            width = graph.node(m.node).params[m.param or ""].shape[m.axis]
            s = shifts.setdefault(m.node, torch.zeros(width, dtype=torch.float64))
            for c in drop:
                s[list(m.index[c])] = mean[list(o.value.index[c])]
        return ChannelSelection(keep=sel.keep, bias_shift=shifts) if shifts else sel


def _fmt_budget(b: dict[str, float]) -> str:
    return ", ".join(f"{k} <= {v:.0%}" for k, v in sorted(b.items()))
