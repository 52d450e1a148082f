"""`select_features`: online streaming deep feature selection (Geometric Online Adaptation) on a channel group,
the discarded features removed structurally and their consumers refit on the kept ones."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from netsqueeze.errors import Diagnostic, InputMismatchError, NetsqueezeError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.ops import attr
from netsqueeze.ir.stats import GraphStats, graph_stats
from netsqueeze.passes.allocation import Budget, Meter, bisect_int, group_bounds
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.collectors import channel_rows
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, DependencyAnalysis, Member, find_groups
from netsqueeze.passes.goa import ClassReservoirs, GoaResult, goa_select
from netsqueeze.passes.refit import layer_plan, refit_layers
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import ChannelSelection, SharedFold, apply_selection, cut_view


@dataclass(frozen=True)
class _Site:
    """A consumer of the group and where it reads the group: its weight member and the value member feeding it."""

    consumer: Member
    value: Member
    kind: str

    @property
    def tap(self) -> Value:
        return (self.value.node, self.value.output or 0)

    @property
    def foldable(self) -> bool:
        """Linear in the group's channels with one position per channel: gets the least-squares reconstruction."""
        return all(len(p) == 1 for p in self.value.index)


class _Gram:
    """Streamed Σ [a, 1]ᵀ[a, 1] of the group's channels at one consumer's input (float64): memory C², not rows."""

    def __init__(self, site: _Site) -> None:
        self.site = site
        self.g: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = channel_rows(x, self.site.value.axis)
        if self.site.foldable:
            rows = rows[:, [p[0] for p in self.site.value.index]]
        else:  # channels spread over blocks (flatten→linear): each channel's mean over its block, for its mean
            rows = torch.stack([rows[:, list(p)].mean(1) for p in self.site.value.index], 1)
        a = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1)
        g = a.T @ a
        self.g = g if self.g is None else self.g + g


def _sites(graph: Graph, group: ChannelGroup) -> list[_Site]:
    values = {(m.node, m.output): m for m in group.members if m.param is None}
    out = []
    for m in group.members_of("consumer"):
        node = graph.node(m.node)
        if node.kind not in ("linear", "conv") or m.param != "weight":
            continue
        if node.kind == "conv" and attr(node, "groups") != 1:
            continue
        vm = values.get(graph.operands(m.node)[0])
        if vm is not None:
            out.append(_Site(m, vm, node.kind))
    return out


def _observed(sites: list[_Site]) -> _Site:
    """The consumer whose input the features are read at: the group's last linear consumer, else its last conv
    (sites follow the group's member order, topological)."""
    linear = [s for s in sites if s.kind == "linear"]
    return (linear or sites)[-1]


def _viewed(sites: list[_Site], grams: list[_Gram], consumer: str | None) -> tuple[list[_Site], list[_Gram]]:
    """The sites (and their Grams) a removal refits: all, or only `consumer` when the cut is in its view."""
    pairs = [(s, gr) for s, gr in zip(sites, grams) if consumer is None or s.consumer.node == consumer]
    return [s for s, _ in pairs], [gr for _, gr in pairs]


def _reconstruction_order(gram: torch.Tensor, w: torch.Tensor, kept: list[int]) -> list[int]:
    """The features not in `kept`, in the order a greedy forward selection adds them to best reproduce the
    consumer's output A·Wᵀ (`w` [out, C], group channel order) from the kept ones and an intercept by least
    squares, from the streamed Gram G = Σ[a, 1]ᵀ[a, 1] alone (ridge 1e-10 of the mean diagonal). With
    P = G[:, :C]·Wᵀ and S the features chosen so far (with the intercept), feature j raises the reproduced
    output energy tr(Pₛᵀ Gₛₛ⁻¹ Pₛ) by ‖Pⱼ − Gⱼₛ Gₛₛ⁻¹ Pₛ‖² / (Gⱼⱼ − Gⱼₛ Gₛₛ⁻¹ Gₛⱼ) (the Schur complement), all
    candidates scored by one solve per step; the largest goes next (the first on a tie). A feature that is a
    linear function of S (relative Schur complement under 1e-12) scores 0, so copies come last."""
    c = w.shape[1]
    g = gram + 1e-10 * float(gram.diagonal().mean()) * torch.eye(c + 1, dtype=torch.float64)
    p = gram[:, :c] @ w.T.double()  # [C+1, out]
    chosen = [*kept, c]
    rest = sorted(set(range(c)) - set(kept))
    order: list[int] = []
    while rest:
        cross = g[chosen][:, rest]
        q = torch.linalg.solve(g[chosen][:, chosen], cross)  # [S, R]
        d = g[rest, rest] - (cross * q).sum(0)
        r = p[rest] - q.T @ p[chosen]
        score = torch.where(d > 1e-12 * g[rest, rest], (r * r).sum(1) / d.clamp_min(1e-300), torch.zeros_like(d))
        best = rest[int(torch.argmax(score))]
        order.append(best)
        chosen.append(best)
        rest.remove(best)
    return order


def _apply(graph: Graph, groups: ChannelGroups, sel: dict[int, ChannelSelection], views: dict[int, str]
           ) -> PassResult:
    """`apply_selection` of the groups cut whole, then `cut_view` of those cut in one consumer's view (each on
    the groups as they stand then: found again, matched by producers, consumers and size)."""
    plain = {gid: s for gid, s in sel.items() if gid not in views}
    result = apply_selection(graph, groups, plain) if plain else PassResult()
    for gid, consumer in views.items():
        if gid not in sel:
            continue
        old = groups[gid]
        now = next((g for g in find_groups(graph)
                    if (g.producers, g.consumers, g.size) == (old.producers, old.consumers, old.size)), None)
        if now is None:
            raise NetsqueezeError(Diagnostic(f"select_features: group {gid} read by '{consumer}' changed under the "
                                             "other groups' cuts; select it in a pass of its own", node=consumer))
        got = cut_view(graph, now, consumer, sel[gid])
        result.changed, result.touched = True, result.touched | got.touched
    return result


@register_pass
@dataclass(frozen=True)
class SelectFeatures(TransformPass):
    """Keeps a minimal subset of a channel group's features chosen online from labelled calibration data by
    Geometric Online Adaptation (GOA; Yasaei Sekeh, Ganesh, Banerjee, Corso, Hero, "A Geometric Approach to
    Online Streaming Feature Selection", arXiv 1910.01182), removes the rest through `apply_selection` and
    refits every consumer on the kept features.

    Needs: shapes inferred; labelled calibration data (`ctx.labels()`: an .npz with the inputs and an integer
    array `labels`, one class per sample); the groups to select are those whose producers are all selected
    (typically `on` the layer feeding the classifier). The features are the group's channels read by its last
    linear consumer (else its last conv consumer, maps averaged over H×W), one row per sample.

    One pass over the data: samples go to a reservoir of at most `reservoir` rows per class (algorithm R,
    seeded by the policy's seed), plus a streamed Gram matrix at each consumer's input, so memory is
    classes × `reservoir` × features + consumers × features² whatever the number of samples. Features then
    stream one at a time in channel order through GOA's rule over the reservoir: a feature is admitted when
    it is not a linear function of the kept set and raises the class-conditional geometric dependency of
    the kept set with the label — the prior-weighted mean over class pairs of the Henze–Penrose divergence
    between the classes' distributions, estimated by the Friedman–Rafsky MST statistic — by more than
    `threshold`; after each admission, kept features the newcomer made redundant (their removal does not
    lower the dependency) are discarded, and above `max_features` / `max_fraction` of the group the least
    useful one goes. Where the paper leaves them open, `threshold` = 0.05 (a gain under the estimator's
    noise at 128 rows per class is not taken) and `reservoir` = 128 rows per class are this pass's choices.
    Bounds (`min_channels`, `round_to`, the policy's `bounds`) raise the kept count with the rejected features
    its last linear consumer's output needs most: a greedy forward selection that each step adds the feature
    whose least-squares refit (with intercept) best reproduces that consumer's output, from the streamed Gram
    alone (`_reconstruction_order`; by GOA's gain where the features are read by a conv or as flattened
    blocks); with a `guard`, features are added back in that order until it holds. GOA's own set is a
    minimal set that separates the classes (a handful of features); the fill keeps what the trained
    classifier reads. On an earlier training of the benchmark ResNet, at 16 of 64 features this order lost 0.98
    points where the rejected features' GOA gains lost 2.23 (`benchmarks/select_features.py`).

    Scope: `scope = group` (default) removes the features from the whole channel group, every producer and
    consumer. Where the group is read by several layers (a residual stream: the next block and, after
    pooling, the classifier), that also narrows the stream. `scope = consumer` removes them only from what
    the observed consumer reads (`rewrite.cut_view`): a `gather` of the kept features goes where its input
    path leaves the shared tensors (the last residual add's shortcut), the layers that fed it alone (that
    block's last conv) compute only the kept features, and the other consumers still read all of them.
    Groups with one consumer are cut whole either way. It takes no budget (the budget meters group cuts).

    Budget: under the policy's `budget flops | params | bytes <= R%` the kept count of each group is a target,
    as `trim`'s: the largest count that meets the budget (one common fraction of every selected group's cap —
    `max_features` / `max_fraction`, else its size — bisected, each candidate's FLOPs/params/bytes metered
    exactly by a dry run of the rewrite), within the bounds. GOA runs capped at that count and its set is
    filled up to it in the fill order (above); `BudgetError` (at the group's first producer)
    when the fewest features the bounds allow miss the budget. The counts are then fixed: a `guard` is
    measured and noted, not searched.

    Refit: at every consumer the removed features are rebuilt from the kept ones by least squares with an
    intercept on the streamed Gram (squeeze-and-fold's reconstruction, Ozen & Orailoglu, ECML PKDD 2020),
    folded into its weights and bias; exact when the removed features are affine functions of the kept
    ones. Consumers whose channels span blocks (flatten→linear) get the removed features' means in the bias.
    Where the group has several consumers (a residual stream: the next block's conv and, after pooling, the
    classifier), the removal also changes what the later ones read of the kept features; every conv (one group)
    and linear consumer of such a group is then re-solved whole, in graph order, by ridge least squares (every
    kernel tap of every kept channel, and the bias) from what it reads after the removal to what it output before
    it (`passes.refit.refit_layers`: both graphs side by side, a few passes over the calibration data; after the
    guard's search, which measures its candidates without it).
    Guarantees: the graph verifies; unselected and frozen groups are untouched.
    """

    name: ClassVar[str] = "select_features"
    max_features: int | None = field(default=None, metadata={"min": 1, "unit": "count"})
    max_fraction: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    threshold: float = field(default=0.05, metadata={"min": -1.0, "max": 1.0})
    reservoir: int = field(default=128, metadata={"min": 4, "unit": "count"})
    min_channels: int = field(default=1, metadata={"min": 1})
    round_to: int = field(default=1, metadata={"min": 1})
    scope: Literal["group", "consumer"] = "group"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = ctx.analysis(DependencyAnalysis, graph).restrict(ctx.selected)
        cands = [(g, _sites(graph, g)) for g in groups.prunable()]
        cands = [(g, s) for g, s in cands if s]
        if not cands:
            return PassResult(changed=False, notes=["no prunable channel group with a linear or conv consumer"])
        node = cands[0][0].producers[0]
        if ctx.labels_fn is None:
            raise NetsqueezeError(Diagnostic(
                "select_features needs labelled calibration data: an .npz holding the model's inputs and an "
                "integer array 'labels' (one class per sample)", node=node))
        budget = Budget.of(ctx)
        # scope = consumer: a group read by several layers loses the features in its observed consumer's view only
        views: dict[int, str] = {}
        for g, sites in cands:
            obs = _observed(sites)
            if self.scope != "consumer" or len(sites) < 2:
                continue
            views[g.id] = obs.consumer.node
            if not (obs.kind == "linear" and obs.foldable):
                raise NetsqueezeError(Diagnostic(
                    f"select_features: scope = consumer cuts the view of the group's last linear consumer, reading "
                    f"one position per feature; group {g.id} is read by '{obs.consumer.node}' ({obs.kind}"
                    f"{'' if obs.foldable else ', features spread over blocks'})", node=obs.consumer.node))
        if views and budget:
            raise NetsqueezeError(Diagnostic(
                "select_features: scope = consumer removes features from the classifier's view only, which a "
                "flops/params/bytes budget does not meter; use scope = group under a budget", node=node))
        for k, v in budget.limits.items():
            if not 0.0 < v <= 1.0:
                raise NetsqueezeError(Diagnostic(f"select_features: budget {k} = {v} must be a ratio in (0, 1]",
                                                 node=node))
        before = graph_stats(ctx.original or graph)
        # the budget's counts first: metering needs shapes only, and GOA then runs under that cap
        target = self._budget_counts(graph, ctx, groups, [g for g, _ in cands], budget, before) if budget else {}
        collected = self._collect(graph, ctx, cands)
        sel: dict[int, ChannelSelection] = {}
        metrics: dict[str, float] = {}
        notes: list[str] = []
        goas: dict[int, GoaResult] = {}
        for g, sites in cands:
            res, grams = collected[g.id]
            goa = goas[g.id] = self._choose(g, res, min(self._cap(g.size), target.get(g.id, g.size)))
            obs = _observed(sites)
            gram = grams[sites.index(obs)].g
            if obs.kind == "linear" and obs.foldable and gram is not None and len(goa.kept) < g.size:
                # features beyond GOA's set (bounds, budget, guard) are the ones its consumer's output needs most
                w = graph.node(obs.consumer.node).dense("weight").double()
                goa.fill = _reconstruction_order(gram, w[:, [p[0] for p in obs.consumer.index]], goa.kept)
            keep = self._bounded(g, ctx, goa, 0, target.get(g.id))
            metrics.update({f"group{g.id}_kept": float(len(keep)), f"group{g.id}_admitted": float(goa.admitted),
                            f"group{g.id}_discarded_online": float(goa.discarded_online),
                            f"group{g.id}_dependency": goa.dependency})
            metrics["reservoir_rows"] = metrics.get("reservoir_rows", 0.0) + res.rows_held
            metrics["samples_seen"] = float(res.seen)
            metrics["dependency_estimates"] = metrics.get("dependency_estimates", 0.0) + goa.evaluations
            notes.append(f"group {g.id} ({g.producers[0]}): kept {len(keep)} of {g.size} features "
                         f"(dependency {goa.dependency:.3f}, {goa.admitted} admitted, {goa.discarded_online} "
                         f"discarded online)")
            if len(keep) < g.size:
                sel[g.id] = self._refit(graph, g, *_viewed(sites, grams, views.get(g.id)), keep)
        if ctx.guard is not None and sel and not target:
            sel = self._guarded(graph, ctx, groups, cands, collected, goas, sel, notes, views)
        elif ctx.guard is not None and sel:  # the budget fixes the counts: the guard is measured, not searched
            trial = graph.copy()
            _apply(trial, groups, sel, views)
            check = ctx.guard_check(trial)
            if check is not None and not check[0]:
                notes.append(f"guard not met at the budget's feature counts (guard metric {check[1]:.4g})")
        if not sel:
            return PassResult(changed=False, notes=notes, metrics=metrics)
        # consumers behind another consumer of the group read kept features that the removal changed upstream (a
        # residual stream's next block): every conv/linear consumer is re-solved whole on what it now reads
        again = {g.id: sorted(sel[g.id].keep) for g, sites in cands
                 if g.id in sel and len(sites) > 1 and g.id not in views}
        reference = graph.copy() if again else None
        result = _apply(graph, groups, sel, views)
        for gid, consumer in views.items():
            if gid in sel:
                notes.append(f"group {gid}: features removed from '{consumer}''s view only (scope = consumer); "
                             f"its other consumers read all {groups[gid].size}")
        if reference is not None:
            # the re-solved layers: those reading a stream cut whole; their outputs: what every group cut here keeps
            nodes, _ = layer_plan(reference, groups, again)
            _, out = layer_plan(reference, groups, {gid: sorted(s.keep) for gid, s in sel.items() if gid not in views})
            result.metrics["layers_refit"] = float(refit_layers(graph, reference, ctx, nodes, out, notes,
                                                                "layer refit"))
        after = graph_stats(graph)
        metrics.update({"features_removed": float(sum(groups[gid].size - len(s.keep) for gid, s in sel.items())),
                        "flops_ratio": after.flops / max(1, before.flops),
                        "params_ratio": after.params / max(1, before.params)})
        result.metrics.update(metrics)
        result.notes.extend(notes)
        return result

    def _choose(self, g: ChannelGroup, res: ClassReservoirs, cap: int) -> GoaResult:
        """GOA over the reservoir, keeping at most `cap` features (a subclass may choose otherwise and keep the
        removal and refit)."""
        return goa_select(res, g.size, self.threshold, cap)

    def _cap(self, size: int) -> int:
        cap = size
        if self.max_features is not None:
            cap = min(cap, self.max_features)
        if self.max_fraction is not None:
            cap = min(cap, max(1, math.floor(self.max_fraction * size + 1e-9)))
        return cap

    def _bounded(self, g: ChannelGroup, ctx: PassContext, goa: GoaResult, extra: int, target: int | None = None
                 ) -> list[int]:
        """GOA's kept set plus `extra` rejected features, raised to the bounds' count (to `target`, the budget's
        count, when given); added features follow `goa.fill`: the last linear consumer's reconstruction order
        where `run` set it, else the rejected ones of largest gain, those that are linear
        functions of the kept and added ones last."""
        want = group_bounds(g, ctx, self.min_channels, self.round_to).clamp(len(goa.kept) + extra)
        if target is not None:
            want = max(want, target)
        return sorted(goa.kept + goa.fill[:max(0, want - len(goa.kept))])

    def _budget_counts(self, graph: Graph, ctx: PassContext, groups: ChannelGroups, cands: list[ChannelGroup],
                       budget: Budget, before: GraphStats) -> dict[int, int]:
        """The kept count of every group under the policy's flops/params/bytes budget: the largest counts that
        meet it, one common fraction s/S of each group's cap (`max_features`/`max_fraction`, else its size;
        S the largest cap), rounded up and clamped to the bounds, s bisected, every candidate metered exactly
        (`Meter`: a dry run of the rewrite on shapes). `BudgetError` when the bounds' smallest counts miss it."""
        meter = Meter(graph, groups, before, shifted=True)  # the refit's intercept: a bias on every consumer
        bounds = {g.id: group_bounds(g, ctx, self.min_channels, self.round_to) for g in cands}
        caps = {g.id: self._cap(g.size) for g in cands}
        top = max(caps.values())

        def counts(s: int) -> dict[int, int]:
            return {g.id: bounds[g.id].clamp(math.ceil(s * caps[g.id] / top)) for g in cands}

        def ok(s: int) -> bool:
            return budget.meets(meter(counts(s)))

        if not ok(0):
            raise budget.unreachable("select_features", "keeping the fewest features the bounds allow",
                                     meter(counts(0)), cands[0].producers[0])
        return counts(top if ok(top) else bisect_int(0, top, ok))

    # ---- one pass over the calibration data ----
    def _collect(self, graph: Graph, ctx: PassContext, cands: list[tuple[ChannelGroup, list[_Site]]]
                 ) -> dict[int, tuple[ClassReservoirs, list[_Gram]]]:
        taps: list[Value] = []
        plan: dict[int, tuple[_Site, ClassReservoirs, list[_Gram]]] = {}
        for g, sites in cands:
            observe = _observed(sites)
            plan[g.id] = (observe, ClassReservoirs(self.reservoir, ctx.seed + g.id), [_Gram(s) for s in sites])
            for s in sites:
                if s.tap not in taps:
                    taps.append(s.tap)
        slot = {v: i for i, v in enumerate(taps)}
        labels = ctx.labels()
        assert labels is not None  # checked by run
        for b, batch in enumerate(ctx.stream(graph, taps)):
            y = next(labels, None)
            if y is None:
                raise InputMismatchError("select_features: the calibration labels end before the inputs")
            if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
                raise InputMismatchError(f"select_features: calibration labels must be one class index per "
                                         f"sample (integers of shape [N]); got "
                                         f"{str(y.dtype).removeprefix('torch.')} of shape {list(y.shape)}")
            for observe, res, grams in plan.values():
                x = batch[slot[observe.tap]]
                rows = channel_rows(x, observe.value.axis, spatial_mean=observe.kind == "conv")
                rows = torch.stack([rows[:, list(p)].mean(1) for p in observe.value.index], 1)
                if rows.shape[0] != y.shape[0]:
                    raise InputMismatchError(Diagnostic(
                        f"select_features: calibration batch {b} has {y.shape[0]} labels but the features read "
                        f"by '{observe.consumer.node}' have {rows.shape[0]} rows (one label per row is needed)",
                        node=observe.consumer.node))
                res.update(rows, y)
                for gram in grams:
                    gram.update(batch[slot[gram.site.tap]])
        out = {}
        for gid, (observe, res, grams) in plan.items():
            if len(res.classes()) < 2:
                raise InputMismatchError(Diagnostic(
                    "select_features: the calibration labels hold fewer than two classes with two samples each",
                    node=observe.consumer.node))
            out[gid] = (res, grams)
        return out

    # ---- removal with the refit ----
    @staticmethod
    def _refit(graph: Graph, g: ChannelGroup, sites: list[_Site], grams: list[_Gram], keep: list[int]
               ) -> ChannelSelection:
        """Per consumer, T [k, C] and t₀ from least squares of every feature on [kept, 1] (ridge 1e-10 of the
        mean diagonal for rank-deficient kept sets); consumers of block channels get the means only."""
        folds: dict[str, SharedFold] = {}
        shifts: dict[str, torch.Tensor] = {}
        drop = [c for c in range(g.size) if c not in set(keep)]
        for site, gram in zip(sites, grams):
            assert gram.g is not None
            n = float(gram.g[-1, -1])
            m = site.consumer
            shift = torch.zeros(graph.node(m.node).params["weight"].shape[m.axis], dtype=torch.float64)
            if site.foldable:
                cols = [*keep, g.size]
                a = gram.g[cols][:, cols]
                ridge = 1e-10 * float(a.diagonal().mean()) * torch.eye(len(cols), dtype=torch.float64)
                beta = torch.linalg.solve(a + ridge, gram.g[cols][:, :g.size])  # [k+1, C]
                t = torch.zeros(len(keep), g.size, dtype=torch.float64)
                t[:, drop] = beta[:len(keep), drop]
                t[range(len(keep)), keep] = 1.0
                folds[m.node] = SharedFold(t)
                for c in drop:
                    shift[list(m.index[c])] = beta[len(keep), c]
            else:
                mean = gram.g[-1, :g.size] / n
                for c in drop:
                    shift[list(m.index[c])] = mean[c]
            shifts[m.node] = shift
        return ChannelSelection(keep=keep, fold=folds or None, bias_shift=shifts)

    def _guarded(self, graph: Graph, ctx: PassContext, groups: ChannelGroups,
                 cands: list[tuple[ChannelGroup, list[_Site]]],
                 collected: dict[int, tuple[ClassReservoirs, list[_Gram]]], goas: dict[int, GoaResult],
                 sel: dict[int, ChannelSelection], notes: list[str], views: dict[int, str]
                 ) -> dict[int, ChannelSelection]:
        """Adds back rejected features (in the fill order), 1, 2, 4, ... per group, until the guard holds."""
        extra = 0
        while True:
            trial = graph.copy()
            _apply(trial, groups, sel, views)
            check = ctx.guard_check(trial)
            if check is None or check[0]:
                if extra:
                    reached = "" if check is None else f" (guard metric {check[1]:.4g})"
                    notes.append(f"guard: {extra} rejected features per group added back{reached}")
                return sel
            extra = max(1, 2 * extra)
            sel = {}
            for g, sites in cands:
                keep = self._bounded(g, ctx, goas[g.id], extra)
                if len(keep) < g.size:
                    sel[g.id] = self._refit(graph, g, *_viewed(sites, collected[g.id][1], views.get(g.id)), keep)
            if not sel:
                notes.append(f"guard not met by any feature subset (guard metric {check[1]:.4g}): groups kept whole")
                return sel
