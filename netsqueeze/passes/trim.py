"""`trim`: structured neuron/channel trimming by a per-channel score, to a ratio or a global FLOPs/params budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.stats import GraphStats, graph_stats
from netsqueeze.ir.weights import ENCODED_FORMS
from netsqueeze.passes import allocation, gdnt_groups
from netsqueeze.passes import refit as consumer_refit
from netsqueeze.passes.allocation import (
    METRICS,
    Budget,
    GroupBounds,
    Meter,
    Reached,
    bisect_int,
    group_bounds,
    ratio_note,
)
from netsqueeze.passes.base import GIVE_CALIBRATION, MEASURE_PASSES, PassContext, PassResult, TransformPass
from netsqueeze.passes.collectors import Moments, Reservoir, channel_rows
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, DependencyAnalysis, Member
from netsqueeze.passes.friedman_rafsky import BATCH_BYTES, cross_edges_batched, squared_distances
from netsqueeze.passes.frontier import Prefixes, first_positions
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection

Criterion = Literal["gdnt", "l1", "l2", "bn_scale", "activation", "random"]
_MAX_RATIO = 0.999  # the most of a group's channels a ratio removes (the `ratio` option's maximum)
# a group's measured loss model: (a, p, budget cost of one channel, the most channels a measurement removed)
_Loss = tuple[float, float, float, int]

# the global ranking rule (see `Trim`): not a policy option, the benchmark's ablation sets it with `ranking(...)`
_RANKING: ContextVar[str] = ContextVar("trim_ranking", default="measured")


@contextmanager
def ranking(rule: Literal["measured", "mean"]) -> Iterator[None]:
    """Runs the enclosed `trim` passes with the global ranking `rule` (benchmark use, benchmarks/trim.py):
    `measured` (the default: score / group mean, weighted by each group's measured output error per unit of
    budget) or `mean` (score / group mean alone, the rule before the measured weights)."""
    token = _RANKING.set(rule)
    try:
        yield
    finally:
        _RANKING.reset(token)


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


def _magnitude(graph: Graph, members: Sequence[Member], norm: str) -> torch.Tensor | None:
    """Per channel, the l1 or l2 norm of the weight slices `members` give it (flatten blocks summed), each
    member normalised by its mean over the channels, then averaged over the members; None without any."""
    parts = []
    for m in members:
        # scores read a decoded copy; the rewrite keeps each weight's form
        w = graph.node(m.node).dense(m.param or "", accept=ENCODED_FORMS).double().movedim(m.axis, 0)
        per_pos = w.abs().flatten(1).sum(1) if norm == "l1" else (w * w).flatten(1).sum(1)
        v = torch.stack([per_pos[list(p)].sum() for p in m.index])
        v = v if norm == "l1" else v.sqrt()
        parts.append(v / v.mean().clamp_min(1e-30))
    return torch.stack(parts).mean(0) if parts else None


def _thirds(parents: torch.Tensor, children: torch.Tensor, seed: int
            ) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       tuple[torch.Tensor, torch.Tensor]]:
    """The samples shuffled by `seed` and standardised, split in thirds A, B, C: (generator, parents,
    children, (parents A, B, C), (children A, C))."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(parents.shape[0], generator=gen)
    p, x = _standardise(parents[perm]), _standardise(children[perm])
    m3 = p.shape[0] // 3
    if m3 < 2:
        raise ValueError("gdnt needs at least 6 calibration samples")
    return gen, p, x, (p[:m3], p[m3:2 * m3], p[2 * m3:3 * m3]), (x[:m3], x[2 * m3:3 * m3])


def gdnt_scores(parents: torch.Tensor, children: torch.Tensor, child_groups: int, seed: int) -> torch.Tensor:
    """Dependency of child groups on each parent channel, max over child groups (GDNT's geometric
    dependency; Yasaei Sekeh & Hero, "Geometric Estimation of Multivariate Dependency", Entropy 2019).

    Rows are samples. Split into thirds A, B, C; in A each parent channel y is replaced by the y of the
    nearest neighbour in B under the other parents z (conditional independence of y and x given z);
    C is the joint sample. Score = 1 − R / (n/3), R = Friedman–Rafsky cross edges between
    {(x_A, y_nn)} and {(x_C, y_C)}: near 0 when the children ignore y, near 1 when they depend on it.
    The trees of every channel of a child group are computed together (`friedman_rafsky.cross_edges_batched`):
    their points share the children's coordinates, so only the parent's term of the distances differs.
    """
    gen, p, x, (pa, pb, pc), (xa, xc) = _thirds(parents, children, seed)
    m3 = pa.shape[0]
    d2 = torch.cdist(pa, pb) ** 2
    blocks = [b for b in np.array_split(np.arange(x.shape[1]), min(child_groups, x.shape[1])) if len(b)]
    n = p.shape[1]
    y = torch.empty(n, 2 * m3, dtype=torch.float64)  # per parent channel: y_nn over A, then y over C
    for c in range(n):
        if n > 1:
            nn = (d2 - (pa[:, c, None] - pb[None, :, c]) ** 2).argmin(1)
        else:  # no other parents: plain independence, a random pairing
            nn = torch.randperm(m3, generator=gen)
        y[c, :m3], y[c, m3:] = pb[nn, c], pc[:, c]
    scores = torch.zeros(n, dtype=torch.float64)
    chunk = max(1, BATCH_BYTES // (8 * (2 * m3) ** 2))
    for blk in blocks:
        dx = squared_distances(torch.cat([xa[:, blk], xc[:, blk]]))
        for lo in range(0, n, chunk):
            yc = y[lo:lo + chunk]
            r = cross_edges_batched(dx + (yc[:, :, None] - yc[:, None, :]) ** 2, m3)
            scores[lo:lo + chunk] = torch.maximum(scores[lo:lo + chunk], 1.0 - r.double() / m3)
    return scores


def gdnt_group_scores(parents: torch.Tensor, children: torch.Tensor, parent_groups: int, child_groups: int,
                      seed: int) -> torch.Tensor:
    """[parent group, child group] geometric dependencies, GDNT as published (Ganesh, Corso & Yasaei Sekeh,
    ICPR 2020; reference code Sekeh-Lab/MINT): parents and children split into contiguous groups, and each
    child group's dependency on each parent group estimated as in `gdnt_scores`, with the whole parent group
    replaced by its nearest neighbour's under the other parents."""
    gen, p, x, (pa, pb, pc), (xa, xc) = _thirds(parents, children, seed)
    m3 = pa.shape[0]
    pblocks = [b for b in np.array_split(np.arange(p.shape[1]), min(parent_groups, p.shape[1])) if len(b)]
    cblocks = [b for b in np.array_split(np.arange(x.shape[1]), min(child_groups, x.shape[1])) if len(b)]
    dx = torch.stack([squared_distances(torch.cat([xa[:, cb], xc[:, cb]])) for cb in cblocks])
    scores = torch.zeros(len(pblocks), len(cblocks), dtype=torch.float64)
    for i, blk in enumerate(pblocks):
        others = torch.ones(p.shape[1], dtype=torch.bool)
        others[torch.from_numpy(blk)] = False
        if bool(others.any()):
            nn = torch.cdist(pa[:, others], pb[:, others]).argmin(1)
        else:  # no other parents: plain independence, a random pairing
            nn = torch.randperm(m3, generator=gen)
        dy = squared_distances(torch.cat([pb[nn][:, blk], pc[:, blk]]))
        scores[i] = 1.0 - cross_edges_batched(dx + dy, m3).double() / m3
    return scores


# one observed consumer of gdnt_mode = groups: (its group, its index in the group's observations, parent blocks,
# child blocks, the [parent group, child group] scores)
_GdntEntry = tuple[ChannelGroup, int, list[np.ndarray], list[np.ndarray], torch.Tensor]


def _normalised(score: torch.Tensor) -> torch.Tensor:
    """A group's scores over their mean (scale-free within the group)."""
    s = score.double()
    return s / (s.abs().mean() + 1e-12)


def _standardise(t: torch.Tensor) -> torch.Tensor:
    sd = t.std(0, keepdim=True)
    return torch.where(sd > 1e-12, (t - t.mean(0, keepdim=True)) / sd.clamp_min(1e-12), torch.zeros_like(t))


def _combination_conflicts(o: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(option, message) for each combination of trim's options `o` (every option, defaults included) that it cannot
    run with: the policy checker reports them at check time (`Trim.option_conflicts`), `Trim._check` when a pass
    built from Python runs."""
    out = []
    crit, mode, allocation, refit = o["criterion"], o["gdnt_mode"], o["allocation"], o["refit"]
    if mode == "groups" and crit != "gdnt":
        out.append(("gdnt_mode", f"gdnt_mode = groups applies to criterion = gdnt, not {crit}"))
    if refit in ("least_squares", "layer") and not o["bias_compensation"]:
        out.append(("refit", f"refit = {refit} refits the consumers' biases (the intercept): it contradicts "
                             "bias_compensation = false"))
    if allocation == "uniform" and o["ratio"] is not None:
        out.append(("allocation", _allocation_with_ratio(allocation)))
    if allocation == "uniform" and mode == "groups":
        out.append(("allocation", _allocation_with_groups(allocation)))
    return out


def _allocation_with_ratio(allocation: str) -> str:
    return (f"allocation = {allocation} spreads a flops/params/bytes budget over the groups; with a `ratio` every "
            "group loses that ratio already: give one of them")


def _allocation_with_groups(allocation: str) -> str:
    return f"allocation = {allocation} ranks whole channels; gdnt_mode = groups sets its own cut"


def _fallback_notes(criterion: str, fallbacks: list[tuple[int, str]], groups: int) -> list[str]:
    """One note per reason the criterion fell back to l1 (`fallbacks`: (group id, reason) from `Trim._score`),
    naming the groups, and saying when it was every group: the compile then ranked by l1 alone."""
    by: dict[str, list[str]] = {}
    for gid, why in fallbacks:
        by.setdefault(why, []).append(str(gid))
    return [(f"{criterion} fell back to l1 in " + (f"every group ({len(ids)})" if len(ids) == groups else
                                                   f"{len(ids)} of {groups} groups")
             + f", {why}: group(s) {', '.join(ids)}"
             + ("; bn_scale reads batch/group/layer norms: put trim before fold_bn" if why == "no norm layer" else ""))
            for why, ids in by.items()]


@register_pass
@dataclass(frozen=True)
class Trim(TransformPass):
    """Removes the lowest-scoring channels of every prunable channel group, through `apply_selection`.

    Needs: shapes inferred; calibration data (`ctx.stream`) for `criterion = gdnt | activation` and for
    bias compensation (skipped, with a note, without it). Selection (`ctx.selected`): a group shrinks
    only if all its producers are selected. Target: `ratio` of each group's channels, or else the
    policy's global budget (`ctx.budget`, e.g. {"flops": 0.5}: keep ≤ 50% of the original FLOPs), met
    by the `allocation`:
    - `global` (default): channels ranked across groups, the lowest removed until the budget holds
      (binary search over how many, exact FLOPs/params of each candidate). Within a group a channel
      ranks by its score over the group's mean score; across groups by a measured loss model, since
      raw scores do not say what a channel of one group costs against one of another: a channel of a
      coupled group (a residual stream, read and written by every block of a stage; concat inputs)
      is lost at every consumer at once. Each group alone is trimmed on a copy at the uniform ratio r
      that meets the budget and at min(2r, 90%) (its lowest-scored channels, consumers refit as
      below), the model's squared relative output error on the calibration data measured, and
      loss(D) = a·D^p fitted through both points (D: the removed channels' normalised scores,
      1 ≤ p ≤ 8); a channel ranks by the loss it adds over the budget share (flops/params/bytes,
      each over its limit) one channel of its group costs — loss per FLOP under a FLOPs budget. A
      channel beyond its group's deeper measured cut ranks after every channel within one: the fit is
      not extrapolated unless the budget cannot be met otherwise (one-shot on the benchmark ResNet at 2x
      fewer FLOPs, extrapolating cut its last stage's residual stream from 64 to 18 channels; top-1 l1
      66.98% → 77.77% with the group-magnitude l1 of then, bn_scale 54.98% → 85.80%). Two calibration
      passes per group. Without calibration data to measure on, the rank is score /
      group mean alone (with a note).
    - `uniform`: every group loses the same ratio r (Torch-Pruning's default), ⌊r·size⌋ channels,
      r bisected for the smallest ratio that meets the budget; `allocation = uniform` with a `ratio`
      is an error (a ratio is uniform already).
    `BudgetError` states what was reached when it cannot. Bounds and ratio → count follow the shared
    rule of `passes.allocation`: the options `min_channels`/`round_to` and the policy's `bounds`
    combine, the most restrictive winning; `ratio` removes ⌊ratio·size⌋ channels of a group; kept
    counts are rounded up to a multiple of `round_to` (and of `align` too from `align` up; with no `align` in the
    policy, 16 for the groups a 2-D convolution computes or reads, `allocation.DEFAULT_ALIGN`). When
    that rounding takes the `global` allocation's last removal a whole step past the budget, channels go
    back one allowed step of one group at a time, the highest-ranked first, while the budget holds.

    Criteria (higher = kept): `l1`/`l2` — the norm of the weight columns with which the group's consumers
    read the channel, normalised per consumer and averaged (the producer rows only where no consumer has
    weights). Torch-Pruning's group magnitude also adds the producer rows; those measure the channel's own
    scale, which the refit makes up for and which after `fold_bn` says little of its use: on the benchmark
    ResNet at 2x fewer FLOPs the group magnitude kept 77.77% top-1, below a random choice (84.02%), the
    consumer columns 85.96% (3x: 40.94% / 59.44% / 66.83%; `benchmarks/results/trim.md`). `bn_scale` — |γ| of
    the group's batch/group norms (network slimming, Liu et al. 2017; l1 where a group has none, with a note —
    so put `trim` before `fold_bn` for it); `activation` — what the channel carries into its consumers: its
    mean |a| (or variance, `activation_stat`) at their inputs times the l2 norm of their columns (squared for
    the variance); `random` (seeded by the policy's `calibrate seed` / `compile(seed=)`); `gdnt` — geometric dependency of the next layer on each neuron (GDNT /
    MINT, Ganesh, Corso & Yasaei Sekeh, ICPR 2020; Henze–Penrose dependency estimated by the
    Friedman–Rafsky minimal-spanning-tree statistic, Friedman & Rafsky, Ann. Statist. 1979; Yasaei
    Sekeh & Hero, Entropy 2019). Choices for gdnt, where the method leaves them open: the parents are the group's
    channels at each consumer's input, the children that consumer's outputs (conv maps averaged over
    H×W, tokens as samples for sequences), split into `gdnt_child_groups` groups; a channel's score is
    its largest dependency over child groups and consumers (a neuron is kept if any child group
    depends on it, MINT's "no remaining outgoing connection" rule at channel level); columns are
    standardised; ties (the estimates are counts over a third of the sampled rows: a group of 64 channels
    scored 16 distinct values on the benchmark ResNet) go to the channel with the larger consumer columns (l2;
    one-shot at 2x fewer FLOPs: ResNet 82.55% → 84.50%, VGG 91.40% → 91.82%, `benchmarks/results/trim.md`);
    `gdnt_samples` rows are reservoir-sampled per consumer so memory is bounded; groups
    whose consumers are not observable (attention heads) fall back to l1, noted in the result.
    `gdnt_mode = groups` is GDNT as published (reference code Sekeh-Lab/MINT): each observed consumer's inputs
    (parents) and outputs (children) are split into `gdnt_child_groups` contiguous groups, every (parent
    group, child group) connection is scored (`gdnt_group_scores`), the connections under the `ratio`
    quantile of all scores are cut — at most `gdnt_layer_cap` (published: 0.75) of one consumer's — by zeroing
    their weights, and parent groups left with no connection are removed structurally (bounds add back the
    best-scored ones). What remains is refit (`refit`, below; `gdnt_groups.refit`): every observed consumer's
    remaining incoming weights per output channel, with its bias as intercept, re-solved by ridge least squares
    on the calibration data to match the original's pre-activations (convs unrolled at 16 sampled output
    positions per sample; consumers in graph order, each reading the graph cut and refit so far), the cut blocks
    left exactly zero — the compiler's one-shot stand-in for the method's fine-tuning; with `refit = none`
    each cut block's mean input goes into the bias instead. The FLOPs saved come only from the removed
    channels (the zeroed connections stay as dense zeros, which `recover` keeps). Without a `ratio`, the policy's
    flops/params/bytes budget sets the cut: connections in one order (score, ties — the Friedman–Rafsky scores
    are counts over n/3 samples — broken by the block's weight magnitude over its consumer's mean block), the
    fewest cut (bisected over the count, every candidate's removal metered exactly) whose removal meets it, then
    a closer landing: one cut can remove a parent group and, through the children it fed, groups before it, so
    when that lands more than 5% of the limit under it, from the largest count that misses the budget the next
    connections are walked in order, those whose cut overshoots it skipped (left uncut), up to the first cut
    within 5% of the limit (else the one with the least slack; `gdnt_groups.closer_cut`); `BudgetError` when even the largest cut the per-layer cap allows misses it. The guard is not searched here:
    a `recover` after trim restores fidelity, and compile checks the guard on the final model.

    Refit (`refit`; default `auto`: `layer` when the compile has calibration data and `bias_compensation` is
    on, else `none`). `layer`: every trimmed group gets the parallel fold below (measured on the pass-start
    graph), then every conv (one group, 1-d/2-d) and linear consumer of a trimmed channel is re-solved whole,
    in graph order on the trimmed graph, by ridge least squares so that its output matches the pass-start
    layer's on the calibration data: every kernel tap of every kept input channel and the bias are free
    (`passes.refit.refit_layers`, the reconstruction step of He, Zhang & Sun, ICCV 2017; the ridge chosen on
    20% held-out rows); a layer feeding a residual add whose other operand is already final matches the sum, its
    own output plus what the skip path lost (`passes.refit.residual_skip`). On the benchmark ResNet-style
    model (512 calibration images) it took one-shot top-1 at 2x fewer FLOPs from 84.44% to 90.01% (`l1`),
    86.10% to 89.75% (`activation`), 75.36% to 89.25% (`gdnt`) and 81.22% to 89.05% (`random`); at 5x from
    14.19% to 83.58% (`bn_scale`), 22.69% to 82.52% (`l1`) and 17.61% to 80.95% (`random`).
    `least_squares`: the consumers of the trimmed channels are refit by least
    squares with intercept on the calibration data — squeeze-and-fold's reconstruction (Ozen &
    Orailoglu, ECML PKDD 2020) for the channels the criterion chose. At every consumer linear in its
    input channels (ungrouped conv, linear) the group's channels are rebuilt as a ≈ a_S·T + t₀ from
    the kept channels S, T folded into its weight and t₀ into its bias (`passes.refit`). Groups are
    trimmed one at a time in graph order, each fit regressing the kept channels as the graph trimmed
    so far computes them onto the original channels, so a fold also corrects the drift of the groups
    trimmed before it; the data runs through the trimmed graph and the original side by side, layer
    by layer (`passes.frontier`, as squeeze_fold's cascade): a few calibration passes for the whole
    cascade whatever the number of groups (3 to 7 on the test models; streamed whole, two per group,
    outside `compile`).
    At a consumer it is never worse than bias compensation (least squares with intercept includes T = 0, the means alone) and exact when
    the removed channels are affine combinations of the kept ones. Other consumers (conv_transpose)
    get bias compensation; grouped convs reading the group are sliced, as without refit.
    `refit = least_squares` or `layer` without calibration data or with
    `bias_compensation = false` is an error. Under `gdnt_mode = groups` the same option chooses that mode's
    connection refit (above) instead.

    Bias compensation (`refit = none`, and consumers the refit cannot fold into; the intercept of
    squeeze-and-fold's reconstruction with nothing kept to reconstruct from): each removed
    channel's mean at a consumer's input, passed through the consumer's weights, is added to its bias;
    exact for linear consumers, approximate at zero-padded borders of convs.

    BatchNorm for fine-tuning: without `fold_bn` in the policy the trimmed BatchNorms stay. The torch
    backend emits them as `nn.BatchNorm1d/2d` with the kept channel counts, whose statistics can be
    re-estimated or trained as usual (`reset_running_stats()`, `momentum = None`, a pass in train
    mode), the ONNX backend as `BatchNormalization`. `fold_bn` after `trim` gives the same outputs in
    eval mode with the BatchNorms folded.
    Guarantees: the graph verifies; frozen and unselected groups are untouched.
    """

    name: ClassVar[str] = "trim"
    criterion: Criterion = "l1"
    ratio: float | None = field(default=None, metadata={"min": 0.0, "max": 0.999, "unit": "ratio"})
    round_to: int = field(default=1, metadata={"min": 1})
    min_channels: int = field(default=1, metadata={"min": 1})
    activation_stat: Literal["mean_abs", "variance"] = "mean_abs"
    bias_compensation: bool = True
    gdnt_samples: int = field(default=384, metadata={"min": 1, "unit": "count"})
    gdnt_child_groups: int = field(default=8, metadata={"min": 1})
    gdnt_mode: Literal["neuron", "groups"] = "neuron"
    gdnt_layer_cap: float = field(default=0.75, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    allocation: Literal["global", "uniform"] = "global"
    refit: Literal["auto", "none", "least_squares", "layer"] = "auto"

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The option combinations trim refuses (`_combination_conflicts`), and every option the policy sets that
        does nothing under its other options: `activation_stat` without `criterion = activation`; `gdnt_samples`,
        `gdnt_child_groups` and `gdnt_mode` without `criterion = gdnt`; `gdnt_layer_cap` outside
        `gdnt_mode = groups`; `allocation` with a `ratio` or under `gdnt_mode = groups` (it spreads a budget over
        whole channels). A default never counts as set."""
        o = cls.with_defaults(given)
        out = _combination_conflicts(o)
        crit, mode = o["criterion"], o["gdnt_mode"]
        if "activation_stat" in given and crit != "activation":
            out.append(("activation_stat", f"activation_stat applies to criterion = activation, not {crit}"))
        for key in ("gdnt_samples", "gdnt_child_groups", "gdnt_mode"):
            if key in given and crit != "gdnt" and not (key == "gdnt_mode" and mode == "groups"):
                out.append((key, f"{key} applies to criterion = gdnt, not {crit}"))
        if "gdnt_layer_cap" in given and crit != "gdnt":
            out.append(("gdnt_layer_cap", f"gdnt_layer_cap applies to criterion = gdnt with gdnt_mode = groups, not "
                                          f"{crit}"))
        elif "gdnt_layer_cap" in given and mode != "groups":
            out.append(("gdnt_layer_cap", f"gdnt_layer_cap applies to gdnt_mode = groups, not {mode}"))
        if "allocation" in given and o["allocation"] != "uniform":  # uniform's conflicts are above
            if o["ratio"] is not None:
                out.append(("allocation", _allocation_with_ratio(o["allocation"])))
            elif mode == "groups" and crit == "gdnt":
                out.append(("allocation", _allocation_with_groups(o["allocation"])))
        return out

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = ctx.analysis(DependencyAnalysis, graph).restrict(ctx.selected)
        bounds = {g.id: group_bounds(g, ctx, self.min_channels, self.round_to) for g in groups.prunable()}
        cands = [g for g in groups.prunable() if g.size > bounds[g.id].min_keep]
        self._check(cands[0].producers[0] if cands else None, ctx)
        notes: list[str] = []
        if not cands:
            return PassResult(changed=False, notes=["no prunable channel group"])
        obs = {g.id: _observations(graph, g) for g in cands}
        fits = {g.id: consumer_refit.plan(graph, g) for g in cands} if self._refits(ctx) else {}
        # the layer refit's targets, recorded in the statistics pass: its sweep then runs the trimmed graph alone
        layered = bool(fits) and self.refit in ("auto", "layer") and not (
            self.criterion == "gdnt" and self.gdnt_mode == "groups") and ctx.batches_fn is not None
        recorder = consumer_refit.Recorder(graph, [n for g in cands for n in g.consumers], ctx) if layered else None
        moments, reservoirs = self._collect(graph, ctx, cands, obs, notes, fits, recorder)
        if self.criterion == "gdnt" and self.gdnt_mode == "groups":
            return self._published(graph, ctx, groups, cands, bounds, obs, moments, reservoirs, notes)
        fallbacks: list[tuple[int, str]] = []
        scores = {g.id: self._score(graph, g, obs[g.id], moments, reservoirs, fallbacks, ctx.seed) for g in cands}
        notes += _fallback_notes(self.criterion, fallbacks, len(cands))
        before = graph_stats(ctx.original or graph)

        def finish(sel: dict[int, ChannelSelection]) -> dict[int, ChannelSelection]:
            """The chosen channels with their consumers refit (least squares) or bias-compensated."""
            return {gid: self._complete(graph, groups[gid], s, obs[gid], moments, fits.get(gid, []))
                    for gid, s in sel.items()}

        if self.ratio is not None:
            sel = {g.id: self._keep_top(scores[g.id], bounds[g.id].for_ratio(self.ratio)) for g in cands}
            if (line := ratio_note(cands, bounds, self.ratio)) is not None:
                notes.append(line)
        else:
            # bias compensation (which every refit implies) gives a bias to each consumer without one: count it
            meter = Meter(graph, groups, before, shifted=self.bias_compensation)
            budget = Budget.of(ctx)
            if self.allocation == "uniform":
                sel = self._uniform(cands, scores, bounds, budget, meter, notes)
            else:
                losses = self._losses(graph, ctx, groups, cands, scores, bounds, meter, finish, notes)
                sel = self._budget(cands, scores, bounds, budget, meter, losses)
        sel = {gid: s for gid, s in sel.items() if len(s.keep) < groups[gid].size}
        if fits and self.refit in ("auto", "layer"):  # parallel folds, then every consumer re-solved whole
            ref = graph.copy()
            result = apply_selection(graph, groups, finish(sel))
            keeps = {gid: sorted(s.keep) for gid, s in sel.items()}
            consumer_refit.refit_layers(graph, ref, ctx, *consumer_refit.layer_plan(ref, groups, keeps), notes,
                                        "layer refit", recorder=recorder)
        elif fits:  # each group refit on the graph as trimmed so far
            result = consumer_refit.cascade(graph, ctx, groups, {gid: sorted(s.keep) for gid, s in sel.items()})
            notes.append(f"consumers of {len(sel)} trimmed groups refit by least squares, group by group")
        else:
            result = apply_selection(graph, groups, finish(sel))
        after = graph_stats(graph)
        removed = sum(groups[gid].size - len(s.keep) for gid, s in sel.items())
        result.metrics.update({"channels_removed": float(removed), "groups_trimmed": float(len(sel)),
                               "flops_ratio": after.flops / max(1, before.flops),
                               "params_ratio": after.params / max(1, before.params)})
        result.notes.extend(notes)
        consumer_refit.short_fits(((st.member.node, st.count, len(s.keep)) for gid, s in sel.items()
                                   for st in fits.get(gid, [])), result)
        return result

    # ---- checks and targets ----
    def _check(self, node: str | None, ctx: PassContext) -> None:
        def fail(msg: str) -> NetsqueezeError:
            return NetsqueezeError(Diagnostic(f"trim: {msg}", node=node))

        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise fail(f"ratio {self.ratio} leaves no channel; it must be in [0, 1)")
        # what the policy checker reports at check time (`option_conflicts`): here for a pass built from Python
        conflicts = _combination_conflicts(self.option_values())
        if conflicts and conflicts[0][0] == "gdnt_mode":
            raise fail(conflicts[0][1])
        if self.ratio is None and not Budget.of(ctx):
            raise fail("needs a `ratio` or a flops/params/bytes budget in the policy")
        if self.min_channels < 1 or self.round_to < 1:
            raise fail("min_channels and round_to must be at least 1")
        for k, v in Budget.of(ctx).limits.items():
            if not 0.0 < v <= 1.0:
                raise fail(f"budget {k} = {v} must be a ratio in (0, 1]")
        if self.refit in ("least_squares", "layer") and ctx.stream_fn is None:
            raise fail(f"refit = {self.refit} fits the consumers on calibration data and this compile has "
                       f"none: {GIVE_CALIBRATION}, or set refit = none")
        if conflicts:
            raise fail(conflicts[0][1])

    def _refits(self, ctx: PassContext) -> bool:
        """Whether the consumers are refit by least squares: `least_squares`, or `auto` with calibration data
        (and bias compensation on, outside gdnt_mode = groups)."""
        if self.refit in ("least_squares", "layer"):
            return self.gdnt_mode != "groups"  # groups mode refits its consumers itself (`gdnt_groups.refit`)
        return (self.refit == "auto" and self.bias_compensation and ctx.stream_fn is not None
                and self.gdnt_mode != "groups")

    @staticmethod
    def _keep_top(score: torch.Tensor, k: int) -> ChannelSelection:
        order = sorted(range(len(score)), key=lambda c: (-float(score[c]), c))
        return ChannelSelection(keep=sorted(order[:k]))

    def _budget(self, cands: list[ChannelGroup], scores: dict[int, torch.Tensor], bounds: dict[int, GroupBounds],
                budget: Budget, meter: Meter, losses: dict[int, _Loss] | None = None) -> dict[int, ChannelSelection]:
        """Channels ranked across groups by score / group mean score or, with measured loss models (`_losses`),
        by the loss each adds per unit of budget when a group's channels go lowest-scored first, channels past the
        deepest cut a group was measured at (and those of unmeasured groups) ranked after all others; the fewest
        lowest-ranked removed (bisection over how many, each candidate metered) that meet the budget; then the
        budget that rounding to the bounds left unused is spent (`_give_back`)."""
        entries: list[tuple[bool, float, int, int]] = []  # (past the measured range, rank, group, channel)
        for g in cands:
            norm = _normalised(scores[g.id])
            if losses is None or g.id not in losses:
                entries.extend((losses is not None, float(norm[c]) if losses is None else math.inf, g.id, c)
                               for c in range(g.size))
                continue
            a, p, cost, measured = losses[g.id]
            done = 0.0
            order = sorted(range(g.size), key=lambda c: (float(norm[c]), -c))  # the order `_keep_top` drops
            for i, c in enumerate(order):
                step = a * ((done + float(norm[c])) ** p - done ** p) / cost
                done += float(norm[c])
                entries.append((i >= measured, step, g.id, c))
        entries.sort()

        def counts(t: int) -> dict[int, int]:
            drop: dict[int, int] = {}
            for _, _, gid, _ in entries[:t]:
                drop[gid] = drop.get(gid, 0) + 1
            return {gid: bounds[gid].clamp(bounds[gid].size - d) for gid, d in drop.items()}

        def ok(t: int) -> bool:
            return budget.meets(meter(counts(t)))

        if not ok(len(entries)):
            most = counts(len(entries))
            raise budget.unreachable("trim", "removing every removable channel", meter(most), cands[0].producers[0],
                                     Budget.unbounded({g.id: bounds[g.id] for g in cands}, meter), held=(meter, most))
        if ok(0):
            return {}
        t = bisect_int(len(entries), 0, ok)
        kept = self._give_back(entries[:t], counts(t), bounds, budget, meter)
        return {gid: self._keep_top(scores[gid], k) for gid, k in kept.items()}

    @staticmethod
    def _give_back(removed: list[tuple[bool, float, int, int]], kept: dict[int, int],
                   bounds: dict[int, GroupBounds], budget: Budget, meter: Meter) -> dict[int, int]:
        """Spends what the bisection leaves of the budget: one removal more can take a group down a whole
        `round_to`/`align` step, past the budget (and even unrounded, another group's channel may still fit).
        Channels go back (`allocation.give_back`), one allowed step of one group at a time, the group whose
        channels given back ranked highest (the most loss per unit of budget, or the highest normalised score)
        first, while the budget still holds."""
        ranks: dict[int, list[tuple[bool, float]]] = {}  # per group, its removed channels' ranks in removal order
        for flag, rank, gid, _ in removed:
            ranks.setdefault(gid, []).append((flag, rank))

        def gain(gid: int, k: int, k2: int) -> tuple[bool, float]:
            size = bounds[gid].size
            return max(ranks[gid][size - k2:size - k])  # the last removed of the channels that went

        return allocation.give_back(kept, bounds, gain, lambda c: budget.meets(meter(c)))

    def _uniform_ratio(self, cands: list[ChannelGroup], bounds: dict[int, GroupBounds], budget: Budget,
                       meter: Meter) -> float | None:
        """The smallest ratio r that meets the budget when every group removes ⌊r·size⌋ channels (bounds
        applied; bisection, each candidate metered); None when even r = 99.9% misses it."""

        def ok(r: float) -> bool:
            return budget.meets(meter({g.id: bounds[g.id].for_ratio(r) for g in cands}))

        if not ok(_MAX_RATIO):
            return None
        return 0.0 if ok(0.0) else allocation.bisect(_MAX_RATIO, 0.0, ok, 30)

    def _uniform(self, cands: list[ChannelGroup], scores: dict[int, torch.Tensor], bounds: dict[int, GroupBounds],
                 budget: Budget, meter: Meter, notes: list[str]) -> dict[int, ChannelSelection]:
        """allocation = uniform: one ratio for every group (`_uniform_ratio`), each group keeping its best-scored
        channels."""
        r = self._uniform_ratio(cands, bounds, budget, meter)
        if r is None:
            most = {g.id: bounds[g.id].for_ratio(_MAX_RATIO) for g in cands}
            raise budget.unreachable("trim", f"removing {_MAX_RATIO:.1%} of every group's channels (allocation = "
                                     "uniform)", meter(most), cands[0].producers[0], held=(meter, most))
        got = meter({g.id: bounds[g.id].for_ratio(r) for g in cands})
        line = (f"allocation = uniform: ratio {r:.2%} of every group's channels removed, the smallest that meets the "
                f"budget {budget} (flops {got[0]:.1%}, params {got[1]:.1%} of the original)")
        far = any(got[i] < 0.9 * budget.limits[k] for i, k in enumerate(METRICS) if k in budget.limits)
        below = meter({g.id: bounds[g.id].for_ratio(max(0.0, r - 1e-6)) for g in cands}) if far else None
        if below is not None and not budget.meets(below):  # the next smaller step misses: the steps forced it
            line += (f"; the counts the bounds allow change in coarse steps: the step before removes less and "
                     f"reaches flops {below[0]:.1%}, params {below[1]:.1%}, over the budget (`allocation = global` "
                     "lands closer)")
        notes.append(line)
        return {g.id: self._keep_top(scores[g.id], bounds[g.id].for_ratio(r)) for g in cands}

    def _losses(self, graph: Graph, ctx: PassContext, groups: ChannelGroups, cands: list[ChannelGroup],
                scores: dict[int, torch.Tensor], bounds: dict[int, GroupBounds], meter: Meter,
                finish: Callable[[dict[int, ChannelSelection]], dict[int, ChannelSelection]],
                notes: list[str]) -> dict[int, _Loss] | None:
        """Per group, a measured model of the output loss of removing its lowest-scored channels, which makes
        scores of different groups comparable: loss(D) = a·D^p, D the removed channels' normalised scores, and
        the budget share (flops/params/bytes, each over its limit) one channel of the group costs. Each group
        alone is trimmed on a copy at the uniform ratio r that meets the budget and at min(2r, 90%) (its
        lowest-scored channels, consumers refit or compensated as the pass does), and the model's squared
        relative output error on the calibration data (`ctx.fidelity`), less the current graph's, fitted
        through the two points (1 ≤ p ≤ 8). Each candidate runs from the tensors live at its group's first node
        (`frontier.Prefixes`, one run for every group). The measurements run over the leading calibration batches that keep
        them all within `MEASURE_PASSES` model passes (`PassContext.measure_batches`; the note says how many
        samples), so their cost does not grow with the number of groups. None (score / group mean alone, with a
        note) without calibration data to measure on."""
        if _RANKING.get() == "mean":
            return None
        budget = Budget.of(ctx)
        r = self._uniform_ratio(cands, bounds, budget, meter)
        if r is None:
            return None
        # two measurements per group and the current graph's, together at most MEASURE_PASSES model passes
        n_batches, n_samples = ctx.measure_batches(2 * len(cands) + 1, MEASURE_PASSES)
        base = ctx.fidelity(graph, "output_error", n_batches)
        if base is None:
            notes.append("channels ranked across groups by score / group mean: no calibration data to measure "
                         "each group's output sensitivity on")
            return None
        limit = {k: 1.0 / v for k, v in budget.limits.items()}
        at = allocation.METRICS.index
        now = meter({})
        out: dict[int, _Loss] = {}
        # each candidate equals `graph` before the first node its group touches: it runs from there
        start = first_positions(graph.topo_order(), cands)
        prefixes = Prefixes(graph, ctx, start.values(), n_batches)
        for g in cands:
            b = bounds[g.id]
            ks = sorted({min(b.for_ratio(x), b.below(g.size)) for x in (r, min(2 * r, 0.9))} - {g.size},
                        reverse=True)
            if not ks:
                continue
            got = meter({g.id: ks[0]})
            cost = sum(w * (now[at(m)] - got[at(m)]) for m, w in limit.items()) / (g.size - ks[0])
            norm = _normalised(scores[g.id])
            pts: list[tuple[float, float]] = []
            for k in ks:
                keep = self._keep_top(scores[g.id], k)
                dropped = float(sum(norm[c] for c in range(g.size) if c not in set(keep.keep)))
                cand = graph.copy()
                apply_selection(cand, groups, finish({g.id: keep}))
                err = ctx.fidelity(cand, "output_error", n_batches, prefixes.feeds(start[g.id]))
                if err is None:
                    return None
                pts.append((max(dropped, 1e-12), max(err * err - base * base, 1e-12)))
            (d1, l1), (d2, l2) = pts[0], pts[-1]
            p = min(8.0, max(1.0, math.log(l2 / l1) / math.log(d2 / d1))) if d2 > d1 * (1 + 1e-9) else 2.0
            out[g.id] = (l2 / d2 ** p, p, max(cost, 1e-12), g.size - ks[-1])
        notes.append("channels ranked across groups by the measured output loss they add per unit of budget "
                     f"({len(out)} groups measured at ratios {r:.1%} and {min(2 * r, 0.9):.1%} on "
                     + ("all" if n_batches is None else "the first") + f" {n_samples:,} calibration samples; "
                     "loss = a·D^p, "
                     + ", ".join(f"{groups[gid].producers[0] if groups[gid].producers else gid}: a/cost "
                                 f"{a / c:.3g}, p {p:.2f}" for gid, (a, p, c, _) in sorted(out.items())) + ")")
        return out

    # ---- statistics ----
    def _collect(self, graph: Graph, ctx: PassContext, cands: list[ChannelGroup], obs: dict[int, list[_Obs]],
                 notes: list[str], fits: dict[int, list[consumer_refit.ConsumerStats]] | None = None,
                 recorder: consumer_refit.Recorder | None = None
                 ) -> tuple[dict[tuple[Value, int], Moments], dict[tuple[int, int], Reservoir]]:
        """One pass over the calibration data for the criterion's statistics (`Moments`, gdnt's `Reservoir`s), the
        parallel folds' consumer statistics (`fits`) and the layer refit's targets (`recorder`)."""
        fits = fits or {}
        need_act = self.criterion in ("activation", "gdnt")
        if not need_act and not fits and not (self.bias_compensation and ctx.stream_fn is not None):
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
                    reservoirs[(g.id, i)] = Reservoir(self.gdnt_samples, ctx.seed + g.id)
        for st in (st for sts in fits.values() for st in sts):
            if st.value not in values:
                values.append(st.value)
        values += [v for v in (recorder.values() if recorder is not None else []) if v not in values]
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
            for st in (st for sts in fits.values() for st in sts):
                consumer_refit.update(graph, st, batch[slot[st.value]])
            if recorder is not None:
                recorder.add(dict(zip(values, batch)))
        return moments, reservoirs

    def _score(self, graph: Graph, g: ChannelGroup, obs: list[_Obs], moments: dict[tuple[Value, int], Moments],
               reservoirs: dict[tuple[int, int], Reservoir], fallbacks: list[tuple[int, str]], seed: int) -> torch.Tensor:
        """Per-channel scores of group `g` (higher = kept); random draws are seeded by `seed` + group id. Where the
        criterion cannot score the group it falls back to l1 and adds (group id, reason) to `fallbacks`
        (`_fallback_notes` words them)."""
        crit = self.criterion
        if crit == "random":
            return torch.rand(g.size, generator=torch.Generator().manual_seed(seed + g.id), dtype=torch.float64)
        if crit == "bn_scale":
            norms = [m for m in g.members if m.param == "weight"
                     and graph.node(m.node).kind in ("batch_norm", "group_norm", "layer_norm")]
            if norms:
                return sum((_per_channel(graph.node(m.node).dense("weight", accept=ENCODED_FORMS).double().abs(), m) for m in norms),
                           torch.zeros(g.size, dtype=torch.float64))
            fallbacks.append((g.id, "no norm layer"))
            crit = "l1"
        if crit == "activation" and obs:
            stats = []
            for o in obs:
                mo = moments[((o.value.node, o.value.output or 0), o.value.axis)]
                stat = mo.mean_abs if self.activation_stat == "mean_abs" else mo.var
                stats.append(_per_channel(stat, o.value))
            # what the channel carries into its consumers: its activation times how strongly they read it
            # (the column norm for a mean magnitude, squared for a variance)
            act = torch.stack(stats).mean(0)
            use = _magnitude(graph, g.members_of("consumer"), "l2")
            if use is None:
                return act
            return act * (use if self.activation_stat == "mean_abs" else use * use)
        if crit == "gdnt" and obs:
            best = torch.full((g.size,), -math.inf, dtype=torch.float64)
            for i in range(len(obs)):
                res = reservoirs[(g.id, i)]
                if res.rows is None or res.rows.shape[0] < 6:
                    continue
                sample = res.sample()
                best = torch.maximum(best, gdnt_scores(sample[:, :g.size], sample[:, g.size:],
                                                       self.gdnt_child_groups, seed + g.id))
            if bool(torch.isfinite(best).all()):
                # the estimates are counts over a third of the reservoir (ties by the dozen): a tie goes to
                # the channel its consumers read more strongly
                use = _magnitude(graph, g.members_of("consumer"), "l2")
                return best if use is None else best + 1e-9 * use / use.max().clamp_min(1e-30)
        if crit in ("activation", "gdnt"):
            fallbacks.append((g.id, "no observable consumer input"))
            crit = "l1"
        # the consumer columns the channel feeds: how strongly the next layers read it; the producer rows
        # (Torch-Pruning's group magnitude adds them) measure its own scale, which the refit makes up for
        # and after fold_bn says little of its use — only where no consumer has weights
        use = _magnitude(graph, g.members_of("consumer"), crit)
        if use is None:
            use = _magnitude(graph, g.members_of("producer"), crit)
        return torch.zeros(g.size, dtype=torch.float64) if use is None else use

    def _complete(self, graph: Graph, g: ChannelGroup, sel: ChannelSelection, obs: list[_Obs],
                  moments: dict[tuple[Value, int], Moments],
                  stats: list[consumer_refit.ConsumerStats]) -> ChannelSelection:
        """`sel` with its consumers refit by least squares (`stats`: the refittable ones; the others get the
        removed channels' means) or, without refit, bias-compensated."""
        base = self._compensate(graph, g, sel, obs, moments) if self.bias_compensation and moments else sel
        if not stats:
            return base
        shifts = dict(base.bias_shift) if isinstance(base.bias_shift, dict) else None
        return consumer_refit.selection(graph, sorted(sel.keep), stats, shifts)

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

    def _published(self, graph: Graph, ctx: PassContext, groups: ChannelGroups, cands: list[ChannelGroup],
                   bounds: dict[int, GroupBounds], obs: dict[int, list[_Obs]],
                   moments: dict[tuple[Value, int], Moments], reservoirs: dict[tuple[int, int], Reservoir],
                   notes: list[str]) -> PassResult:
        """GDNT as published: every (child group, parent group) connection of every observed consumer scored;
        the connections under the cut — the `ratio` quantile of all scores, or without a ratio the smallest cut
        whose structural removal meets the policy's budget (`_budget_cut`) — cut (at most `gdnt_layer_cap` of a
        consumer's connections), their weights zeroed with their mean input moved into the bias; parent groups
        left with no connection removed structurally (as far as the bounds allow)."""
        before = graph_stats(ctx.original or graph)
        table: list[_GdntEntry] = []
        for g in cands:
            for i, o in enumerate(obs[g.id]):
                res = reservoirs.get((g.id, i))
                if res is None or res.rows is None or res.rows.shape[0] < 6 or o.consumer.axis != 1:
                    continue  # conv_transpose reads its input on weight axis 0: scored per neuron only
                sample = res.sample()
                sc = gdnt_group_scores(sample[:, :g.size], sample[:, g.size:], self.gdnt_child_groups,
                                       self.gdnt_child_groups, ctx.seed + g.id)
                width = sample.shape[1] - g.size
                pb = [b for b in np.array_split(np.arange(g.size), min(self.gdnt_child_groups, g.size)) if len(b)]
                cb = [b for b in np.array_split(np.arange(width), min(self.gdnt_child_groups, width)) if len(b)]
                table.append((g, i, pb, cb, sc))
        if not table:
            return PassResult(changed=False, notes=[*notes, "gdnt: no observable consumer"])
        members = [obs[g.id][i].consumer for g, i, *_ in table]
        raw = torch.cat([t[4].flatten() for t in table])
        # scores become ranks in one order (ties broken by weight magnitude): the cut moves a connection at a time
        table = gdnt_groups.ranked(graph, table, members)
        scores = torch.cat([t[4].flatten() for t in table])
        cut_at: gdnt_groups.Cut
        if self.ratio is not None:
            cut_at = float(gdnt_groups.cut_count(raw, self.ratio))
        else:
            cut_at = self._budget_cut(graph, ctx, groups, bounds, obs, table, scores, before, notes)
        cuts, sel = self._cut_plan(table, cut_at, groups, bounds, obs)
        ref = graph.copy() if gdnt_groups.refits(self.refit, self.bias_compensation, ctx) else None
        zeroed = sum(self._zero(graph, g, obs[g.id][i], pb, cb, cut, moments, notes)
                     for (g, i, pb, cb, _), cut in zip(table, cuts))
        n_refit = gdnt_groups.refit(graph, ref, ctx, table, cuts, sel, notes, members) if ref is not None else 0
        # a removed channel's cut connections already have their mean in the biases (`_zero`); its uncut ones (into
        # removed rows) get it here, through the weights left after the cut
        if self.bias_compensation and moments:
            sel = {gid: self._compensate(graph, groups[gid], s, obs[gid], moments) for gid, s in sel.items()}
        result = apply_selection(graph, groups, sel) if sel else PassResult(changed=zeroed > 0)
        after = graph_stats(graph)
        result.metrics.update({"connections_cut": float(sum(int(c.sum()) for c in cuts)),
                               "weights_zeroed": float(zeroed), "consumers_refit": float(n_refit),
                               "cut_quantile": sum(int(m.sum()) for m in gdnt_groups.candidates(table, cut_at))
                               / len(scores),
                               "channels_removed": float(sum(groups[gid].size - len(s.keep) for gid, s in sel.items())),
                               "groups_trimmed": float(len(sel)), "flops_ratio": after.flops / max(1, before.flops),
                               "params_ratio": after.params / max(1, before.params)})
        result.notes.extend(notes)
        return result

    def _cut_plan(self, table: list[_GdntEntry], cut_at: gdnt_groups.Cut, groups: ChannelGroups,
                  bounds: dict[int, GroupBounds],
                  obs: dict[int, list[_Obs]]) -> tuple[list[torch.Tensor], dict[int, ChannelSelection]]:
        """The connections cut at `cut_at` (per table entry, a [parent group, child group] mask: the scores under
        `cut_at`, lowest first, at most `gdnt_layer_cap` of the entry's, never a child group's strongest incoming
        one) and the channels kept per group, raised to the bounds with the best-scored removed ones. Changes
        nothing.

        Every child group keeps its strongest incoming connection: MINT's cut may leave a child group with none, a
        constant, and the layers after it then read nothing (on the VGG-style model a cut near 30% of the scores
        left no path from the input to the output). A parent channel is kept while it has an uncut connection to
        a child group with a kept channel (MINT's rule, with the children's own removal counted, to a fixpoint
        over consecutive layers: a connection into removed rows leads nowhere)."""
        cuts: list[torch.Tensor] = []
        best: dict[int, torch.Tensor] = {}
        offered = gdnt_groups.candidates(table, cut_at)
        for (g, _, pb, _, sc), under in zip(table, offered):
            b_ = best.setdefault(g.id, torch.full((g.size,), -math.inf, dtype=torch.float64))
            for a, blk in enumerate(pb):
                b_[torch.from_numpy(blk)] = torch.clamp(b_[torch.from_numpy(blk)], min=float(sc[a].max()))
            flat = sc.flatten()
            strongest = {int(sc[:, b].argmax()) * sc.shape[1] + b for b in range(sc.shape[1])}
            order = sorted((k for k in range(flat.numel()) if k not in strongest and bool(under.flatten()[k])),
                           key=lambda k: (float(flat[k]), k))
            n_cut = min(len(order), math.floor(self.gdnt_layer_cap * flat.numel() + 1e-9))
            cut = torch.zeros(flat.numel(), dtype=torch.bool)
            cut[order[:n_cut]] = True
            cuts.append(cut.reshape(sc.shape))
        planned = list(best)
        # the planned group whose channels are an entry's children (its consumer is that group's producer, channel
        # c at output position c), else None: children outside the plan always count as kept
        entry_of = {obs[g.id][i].consumer.node: e for e, (g, i, *_) in enumerate(table)}
        out_of: list[int | None] = [None] * len(table)
        for gid in planned:
            rows = [m for m in groups[gid].members_of("producer") if m.param == "weight"]
            if all(p == (c,) for m in rows for c, p in enumerate(m.index)):
                for m in rows:
                    if m.node in entry_of:
                        out_of[entry_of[m.node]] = gid
        live = {gid: np.ones(groups[gid].size, dtype=bool) for gid in planned}
        while True:
            new = {gid: np.zeros(groups[gid].size, dtype=bool) for gid in planned}
            for (g, _, pb, cb, _), cut, h in zip(table, cuts, out_of):
                child_live = [h is None or bool(live[h][blk].any()) for blk in cb]
                for a, blk in enumerate(pb):
                    if any(not bool(cut[a, b]) and child_live[b] for b in range(len(cb))):
                        new[g.id][blk] = True
            new = {gid: new[gid] & live[gid] for gid in planned}
            if all(np.array_equal(new[gid], live[gid]) for gid in planned):
                break
            live = new
        sel: dict[int, ChannelSelection] = {}
        for gid in planned:
            g = groups[gid]
            keep = [c for c in range(g.size) if live[gid][c]]
            k = bounds[gid].clamp(len(keep))
            if k > len(keep):  # the bounds win: the best-scored removed channels come back
                back = sorted((c for c in range(g.size) if not live[gid][c]), key=lambda c: (-float(best[gid][c]), c))
                keep = sorted(keep + back[:k - len(keep)])
            if len(keep) < g.size:
                sel[gid] = ChannelSelection(keep=keep)
        return cuts, sel

    def _budget_cut(self, graph: Graph, ctx: PassContext, groups: ChannelGroups, bounds: dict[int, GroupBounds],
                    obs: dict[int, list[_Obs]], table: list[_GdntEntry], scores: torch.Tensor, before: GraphStats,
                    notes: list[str]) -> gdnt_groups.Cut:
        """Without a `ratio`: the smallest cut meeting the policy's flops/params/bytes budget. Candidates are the
        connection ranks of `gdnt_groups.ranked` (cut every connection ranked under one), bisected; each is
        costed by the channels its structural removal keeps (`_cut_plan`, exact FLOPs/params/bytes by `Meter`).
        Zeroed connections stay dense and save nothing: only the removed parents count. `BudgetError` when even
        the largest cut the per-layer cap allows misses the budget, with what that cut reaches."""
        budget = Budget.of(ctx)
        meter = Meter(graph, groups, before, shifted=self.bias_compensation)  # as in `run`
        if self.bias_compensation or gdnt_groups.refits(self.refit, self.bias_compensation, ctx):
            # `_zero` and the refit give a bias to consumers whose inputs only lose connections, not channels
            meter.biased(obs[g.id][i].consumer.node for g, i, *_ in table)
        levels = [*sorted({float(v) for v in scores}), math.inf]

        def reached(t: int) -> Reached:
            _, sel = self._cut_plan(table, levels[t], groups, bounds, obs)
            return meter({gid: len(s.keep) for gid, s in sel.items()})

        def ok(t: int) -> bool:
            return budget.meets(reached(t))

        top = len(levels) - 1
        if not ok(top):
            raise budget.unreachable(
                "trim", f"cutting every connection gdnt_layer_cap = {self.gdnt_layer_cap:g} allows", reached(top),
                table[0][0].producers[0])
        t = 0 if ok(0) else bisect_int(top, 0, ok)
        got = reached(t)
        note = (f"gdnt: cut under the {float((scores < levels[t]).double().mean()):.1%} quantile of the connection "
                f"scores, the smallest cut meeting the budget {budget} (flops {got[0]:.1%}, params {got[1]:.1%} of "
                "the original")
        cut: gdnt_groups.Cut = levels[t]
        closer = gdnt_groups.closer_cut(
            table, levels[t - 1], lambda masks: meter({gid: len(s.keep) for gid, s in
                                                       self._cut_plan(table, masks, groups, bounds, obs)[1].items()}),
            budget, gdnt_groups.landing(budget)) if t > 0 and gdnt_groups.slack(budget, got) > gdnt_groups.landing(
                budget) else None
        if closer is not None and gdnt_groups.slack(budget, closer[1]) < gdnt_groups.slack(budget, got):
            cut, got = closer
            note += (f"; then, in score order, the connections whose cut overshot it skipped: flops {got[0]:.1%}, "
                     f"params {got[1]:.1%}")
        notes.append(note + f"; {meter.measured} cuts metered)")
        return cut

    def _zero(self, graph: Graph, g: ChannelGroup, o: _Obs, pb: list[np.ndarray], cb: list[np.ndarray],
              cut: torch.Tensor, moments: dict[tuple[Value, int], Moments], notes: list[str]) -> int:
        """Zeroes the cut (parent group, child group) blocks of consumer `o`'s weight; each cut block's mean
        input goes into the bias (the removed connections' mean contribution). Returns the weights zeroed."""
        node = graph.node(o.consumer.node)
        w = node.params["weight"]
        if not isinstance(w, torch.Tensor):
            notes.append(f"gdnt: '{node.id}' holds an encoded weight; its connections were not cut")
            return 0
        mo = moments.get(((o.value.node, o.value.output or 0), o.value.axis))
        wd = w.double().clone()
        bias = node.params.get("bias")
        delta = torch.zeros(wd.shape[0], dtype=torch.float64)
        n = 0
        for a, blk in enumerate(pb):
            pos = [q for c in blk for q in o.consumer.index[int(c)]]
            for b, cbk in enumerate(cb):
                if not bool(cut[a, b]):
                    continue
                rows = torch.from_numpy(cbk)
                part = wd[rows][:, pos]
                if mo is not None and self.bias_compensation and (bias is None or isinstance(bias, torch.Tensor)):
                    mean = torch.stack([mo.mean[q] for c in blk for q in o.value.index[int(c)]])
                    delta[rows] += (part.flatten(2).sum(2) if part.dim() > 2 else part) @ mean
                n += part.numel()
                idx_r, idx_c = rows[:, None], torch.tensor(pos)[None, :]
                wd[idx_r, idx_c] = 0.0
        node.params["weight"] = wd.to(w.dtype)
        if bool(delta.any()):
            b0 = node.params.get("bias")
            base = torch.zeros(wd.shape[0], dtype=torch.float64) if not isinstance(b0, torch.Tensor) else b0.double()
            node.params["bias"] = (base + delta).to(w.dtype)
        return n

