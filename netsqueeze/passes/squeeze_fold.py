"""`squeeze_fold`: one-shot removal of correlated channels with a linear reconstruction folded into
the consumers (Ozen & Orailoglu, "Squeezing Correlated Neurons for Resource-Efficient Deep Neural
Networks", ECML PKDD 2020)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from netsqueeze.errors import BudgetError, Diagnostic, NetsqueezeError, percent
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.ops import attr, node_flops, spec
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.allocation import (
    Budget,
    GroupBounds,
    Meter,
    Reached,
    bisect,
    give_back,
    group_bounds,
    ratio_note,
)
from netsqueeze.passes.base import PassContext, PassResult, TransformPass, check_squarable
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, DependencyAnalysis, Member, find_groups
from netsqueeze.passes.frontier import Frontier as _Frontier
from netsqueeze.passes.frontier import Pairs, Prefixes, SideBySide, first_positions
from netsqueeze.passes.refit import (
    ConsumerStats,
    Cross,
    Recorder,
    SweepStep,
    add,
    gather,
    layer_plan,
    layer_refittable,
    parallel_fit,
    refit_layers,
    short_fits,
)
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import (
    BlockFold,
    ChannelSelection,
    Fold,
    GroupFold,
    SharedFold,
    apply_selection,
    axis_vector,
    branch_removable,
)
from netsqueeze.passes.squeeze_math import (
    FIT_ROWS,
    covariance,
    gram,
    kept_for_error,
    prefix_errors,
    rank_for_energy,
    ranking,
    reconstruction,
    short_fit,
    shrink,
)

# the most model passes `sensitivity = auto` spends measuring output sensitivities (`SqueezeFold._measure_cost`'s
# bound): the rest of a compile makes 4-5 passes and its linear algebra; measurements within 3 more (about 2 in fact:
# the bound counts unsqueezed candidates and every round whole) keep the compile near 10x one forward pass
# (benchmarks/scaling.py). The default, `first_order`, costs one backward pass over the sensitivity batches and lost
# less than measuring at 11 of the 12 points where `auto` measures (benchmarks/results/squeeze-sensitivity.md)
SENSITIVITY_PASSES = 3.0


@dataclass(frozen=True)
class Ablation:
    """Design choices of `squeeze_fold` that are not policy options: the defaults are the method, the
    alternatives exist for the benchmark's ablation (benchmarks/squeeze.py), which sets them with
    `ablation(...)`. See `SqueezeFold` for what each default does.

    - energy_of: what `energy` measures, `reconstruction` (the consumers' share of reconstructed
      variance) or `spectrum` (the share of the covariance eigenvalues, the paper's wording).
    - weighting: `consumer` (errors as the consumers' outputs see them, M = Σ WᵀW) or `none` (M = I).
    - allocation: the search family, `lagrange` or `uniform` (one energy threshold for every group).
    - sensitivity: how much of a group's reconstruction error reaches the model's outputs. `first_order`
      (the default: every group at once from a backward pass run inside the statistics pass, a Taylor
      estimate of the output error of every kept count), `output` (each group's effect measured: the group
      alone squeezed, the output error measured; `sensitivity_rounds` re-measurements), `auto` (`output`
      when its measurements cost at most `measure_passes` model passes over the data, as bounded by
      `SqueezeFold._measure_cost`, else `first_order`), `curve` (a measured output-error curve per group in place of its reconstruction error, at up to
      `curve_points` counts: what the policy option `search = measured` selects) or `none`. `output` and the
      first-order pass use the first calibration batches holding `sensitivity_samples` samples (all of them
      when 0);
      `curve` the leading batches that keep its measurements within `curve_passes` model passes.
    - block_fit: `full` (flatten→linear: every feature of a channel's block is its own column, up to
      `max_block_features`) or `shared` (one map shared by the block's positions).
    """

    energy_of: Literal["reconstruction", "spectrum"] = "reconstruction"
    weighting: Literal["consumer", "none"] = "consumer"
    allocation: Literal["lagrange", "uniform"] = "lagrange"
    sensitivity: Literal["auto", "output", "first_order", "curve", "none"] = "first_order"
    sensitivity_rounds: int = 2
    sensitivity_samples: int = 256
    measure_passes: float = SENSITIVITY_PASSES
    curve_points: int = 16
    curve_passes: float = 24.0
    block_fit: Literal["full", "shared"] = "full"
    max_block_features: int = 4096
    shrinkage: bool = True


_ABLATION: ContextVar[Ablation] = ContextVar("squeeze_fold_ablation", default=Ablation())  # noqa: B039 (frozen)
# the conv rows per layer of the layer refit inside a measurement of the removal search (the pass's own refit takes
# `refit.LAYER_ROWS`): a quarter, so that each measurement costs about a third of a model pass at 2,048 samples
MEASURE_ROWS = 8192
# the groups of the running compile that may keep 0 channels (`branches = remove`: residual branches removed whole)
_REMOVABLE: ContextVar[frozenset[int]] = ContextVar("squeeze_fold_removable", default=frozenset())


def _shrink(plans: dict[int, list[_Probe]], result: PassResult) -> None:
    """When some group is read only on no more calibration rows than channels, marks the covariances read on fewer
    than `squeeze_math.FIT_ROWS` rows per channel to be read shrunk (`_Probe.covariance`), and says so in
    `result`'s notes and metrics (`shrinkage`: the largest intensity ρ of the deficient groups' probes).

    With no more rows than channels a sample covariance has rank at most rows − 1 whatever the channels do: the
    directions the rows did not reach read as empty, and a group whose every consumer is read so looks redundant
    down to the rows' rank. Then every covariance of few rows per channel is shrunk — the deficient ones and the
    merely noisy ones, so that the search does not weigh a shrunk group against a noisy unshrunk one (on the
    digits MLP of tests/passes/test_shrinkage.py at 256 rows, shrinking its two 256-unit groups but not its
    128-unit one cut that one to 49 channels: 0.018 off on held-out digits, 0.015 either way else) — and the
    well-sampled ones are read as they are (shrinking those too, the benchmark VGG at 2x fewer FLOPs on one draw
    of 16 images lost 12.49 points, 0.90 without). A group with one well-sampled consumer (a residual stream
    read by convs and, after pooling, by a linear layer on one row per image) is full-rank already and switches
    nothing on (the benchmark ResNet at 2x fewer FLOPs on 32 images lost 5.95 points on average over three draws
    when it did, 2.11 when not). With more rows everywhere, a rank deficiency is the channels' own (exact
    redundancy, which stays exact) and every sample covariance is read as it is."""
    if not _ABLATION.get().shrinkage:
        return
    short: list[tuple[float, str, int, str]] = []
    for ps in plans.values():
        if not ps or any(rows > features for rows, features in (p.sampled() for p in ps)):
            continue
        for p in ps:
            cov, rows = p.sample_covariance(full=True)
            what = f"{cov.shape[0]} {'features (channels x positions)' if p.full is not None else 'channels'}"
            short.append((shrink(cov, rows)[1], p.member.node, rows, what))
    if not short:
        return
    shrunk = 0
    for ps in plans.values():
        for p in ps:
            p.shrunk = short_fit(*p.sampled())
            shrunk += p.shrunk
    rho, node, rows, what = max(short)
    result.metrics["shrinkage"] = round(rho, 6)
    result.notes.append(
        f"{len(short)} consumer(s) read with no more calibration rows than channels (the most shrunk '{node}': "
        f"{rows} rows for {what}, ρ = {rho:.2f}): the {shrunk} read on fewer than {FIT_ROWS} rows per channel were "
        "ranked on their channel covariances shrunk toward their diagonals (each channel's variance kept, the "
        "correlations shrunk by the oracle approximating shrinkage intensity, Chen et al. 2010). Unshrunk, such a "
        "covariance reads the channels as redundant down to the rows' rank; calibrate on more samples for a "
        "sharper ranking")


def _keeps(groups: ChannelGroups, ranks: dict[int, tuple[list[int], list[float], torch.Tensor]],
           counts: dict[int, int]) -> dict[int, list[int]]:
    """The channels each group of `counts` keeps (its first ranked ones, ascending), for the groups that shrink."""
    return {gid: sorted(ranks[gid][0][:k]) for gid, k in counts.items() if k < groups[gid].size}


@contextmanager
def ablation(**changes: Any) -> Iterator[Ablation]:
    """Runs the enclosed `squeeze_fold` passes with these `Ablation` fields changed (benchmark use)."""
    token = _ABLATION.set(dataclasses.replace(_ABLATION.get(), **changes))
    try:
        yield _ABLATION.get()
    finally:
        _ABLATION.reset(token)


@dataclass
class _Probe(ConsumerStats):
    """Streamed statistics of one consumer's input, in group-channel space (`refit.ConsumerStats`: the
    augmented second moment and per-position sums, for per-position intercepts), and what only
    squeeze_fold measures."""

    # block_fit = full (flatten→linear): augmented second moment over all C·block features, one row per sample
    full: torch.Tensor | None = None
    # grouped conv consumer: where each channel (weight slot) sits in the input, [C, G], and per conv group
    # the augmented second moment [G, C+1, C+1]; `member` is its weight's input-axis member
    at: list[list[int]] | None = None
    per_group: torch.Tensor | None = None
    shrunk: bool = False  # the ranking reads the covariance shrunk (`_shrink`)

    @property
    def block(self) -> int:
        return int(self.pos_sum.shape[1])

    def fit_rows(self, kept: int) -> tuple[str, int, int]:
        """(consumer, calibration rows, coefficients) of its fold from `kept` channels (`refit.short_fits`)."""
        if self.full is not None:
            return self.member.node, self.rows, kept * self.block
        if self.per_group is not None:  # each conv group fit apart, from its own rows
            return self.member.node, self.count // self.per_group.shape[0], kept
        return self.member.node, self.count, kept

    def sampled(self) -> tuple[int, int]:
        """(rows, features) of the covariance the ranking reads: over every C·block feature with a full block fit
        (one row per sample), else over the C channels."""
        if self.full is not None:
            return self.rows, self.full.shape[0] - 1
        return self.count, self.moment.shape[0] - 1

    def sample_covariance(self, full: bool = False) -> tuple[torch.Tensor, int]:
        """(the channels' sample covariance, its rows); `full`: over the C·block features of a full block fit, one
        row per sample."""
        if full and self.full is not None:
            return covariance(self.full / max(1, self.rows)), self.rows
        return covariance(self.moment / max(1, self.count)), self.count

    def covariance(self, full: bool = False) -> torch.Tensor:
        """The sample covariance, shrunk toward its diagonal (`squeeze_math.shrink`) when `shrunk` (`_shrink`):
        what the ranking, the prefix errors and the first-order estimate read."""
        cov, rows = self.sample_covariance(full)
        return shrink(cov, rows)[0] if self.shrunk else cov

    @property
    def width(self) -> int:
        """Features the first-order gradient Gram spans: those of the covariance the ranking reads (`sampled`)."""
        return self.sampled()[1]


@dataclass
class _Gradients:
    """What the first-order estimate reads from the backward pass (`SqueezeFold._collect`): per probe (by id),
    the Gram of the gradients at its consumer input in group-channel space (C·block square for a full block
    fit); and the outputs' energy Σ‖y‖² over the same batches."""

    grams: dict[int, torch.Tensor]
    energy: float = 0.0


def _option_conflicts(o: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(option, message) for each combination of squeeze_fold's options `o` (defaults included) it cannot run with."""
    out = []
    if o["energy"] is not None and o["ratio"] is not None:
        out.append(("ratio", "give `energy` or `ratio`, not both: `ratio` fixes every group's count and `energy` "
                             "would do nothing"))
    elif o["search"] == "measured" and (o["energy"] is not None or o["ratio"] is not None):
        out.append(("search", "search = measured weighs the groups when a budget or guard sets the kept counts; with "
                              f"`{'energy' if o['energy'] is not None else 'ratio'}` they are fixed: give one of them"))
    return out


@register_pass
@dataclass(frozen=True)
class SqueezeFold(TransformPass):
    """Removes the channels of each group that the others reconstruct linearly, folding the
    reconstruction into every consumer, without fine-tuning.

    Per prunable channel group (dependency analysis; the policy's `on` selects producers):
    1. At every consumer's input, the augmented Gram matrix E[[a,1][a,1]ᵀ] of the group's channels is
       streamed over the calibration data (conv: every spatial position is a sample). A linear layer
       after flatten reads C·H·W features: their whole Gram is streamed (one sample per image; up
       to 4096 features and with more samples than features, else every position of a channel's
       H·W block is a sample of the channel, as the `shared` block fit always does).
    2. Channels ranked once per group by `greedy` backward elimination (default) or column-pivoted
       `qr`, each prefix with its reconstruction error as the consumers' outputs see it
       (tr(M·Σ_res)/tr(M·Σ), M = Σ WᵀW of the consumers); for a full
       block fit, whole channels (blocks of H·W features) are eliminated / pivoted. When some group is read
       only on no more calibration rows than channels (its sample covariances then have rank ≤ rows − 1
       whatever the channels do, and it would read as redundant down to that rank), every covariance read on
       fewer than `squeeze_math.FIT_ROWS` rows per channel is shrunk toward its diagonal, the correlations by the
       oracle approximating shrinkage intensity (`squeeze_math.shrink`, Chen et al. 2010), with a note
       (`_shrink`); on an MLP trained on
       digits calibrated on 64 samples a `params <= 30%` search kept 63 of every group's 256/256/128 channels
       and was 0.064 off on held-out digits, shrunk it keeps 137/107/95 and is 0.029 off
       (`tests/passes/test_shrinkage.py`; on the benchmark models, `benchmarks/squeeze_few_samples.py`).
    3. The kept count: the smallest r whose reconstruction keeps `energy` of that variance, or
       `ratio` of channels removed, or — when neither is given — the search mode: the smallest model
       that meets the policy's `budget` and `guard` (see `_search_counts`). Every count is clamped
       by the shared rule of `passes.allocation`: the options `min_channels`/`round_to` and the
       policy's `bounds` combine, the most restrictive winning (with no `align` in the policy, counts of 16 or more
       that a 2-D convolution computes are whole blocks of 16, `allocation.DEFAULT_ALIGN`); `ratio` removes
       ⌊ratio·size⌋.
       `search = fast` (default) or `measured` chooses how the search weighs a group's error.
    4. Per consumer, least squares with intercept a ≈ a_S·T + t₀ (`ridge` for ill-conditioned Grams; on
       fewer than `squeeze_math.FIT_ROWS` calibration rows per coefficient the ridge by generalised
       cross-validation, `squeeze_math.gcv_ridge`, and a note, `refit.short_fits`),
       folded: W'[o,s] = Σ_c W[o,c]·T[s,c] per kernel tap; for flatten→linear with the full block fit
       every removed (channel, position) feature is rebuilt from every kept feature,
       W'[o,(s,i)] = Σ_{c,j} W[o,(c,j)]·T[(s,i),(c,j)] (a superset of one T shared by all positions,
       which `shared` uses); bias += W·t₀.
    5. The rest is deleted through the shared `apply_selection` routine. `mode = cascade` (default)
       squeezes the groups one at a time in graph order and refits each group's reconstruction from
       the kept channels *as the already-squeezed graph computes them* to the original activations,
       so later folds absorb the error of earlier ones (as Net-Trim's cascade mode does); `parallel`
       fits every group on the original graph at once. The cascade runs the data through the original
       and the squeezed graph side by side, layer by layer (`passes.frontier`): a compile costs a few model
       passes over the calibration data whatever the number of groups (the report's
       `calibration_passes` counts them).
    6. `refit = layer` (default): the fold then only starts the fit. Every conv (one group, 1-d/2-d) and linear
       consumer of a squeezed group is re-solved whole, in graph order, by ridge least squares on the
       calibration data so that its output matches the pass-start layer's output (`passes.refit.refit_layers`:
       the reconstruction step of He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural
       Networks", ICCV 2017, and of ThiNet, Luo et al. 2017). Every kernel tap of every kept input channel is a
       free column, where the fold only remaps channels per tap, and the inputs are the layer's inputs as the
       squeezed and refit graph computes them. A layer whose output feeds a residual add (directly or through its
       batch norm and identities) whose other operand is already final matches the add's sum instead: its own output plus what
       the skip path lost (`passes.refit.residual_skip`, He et al.'s §3.3; on the benchmark ResNet it took the
       one-shot drop at 2x / 3x / 5x fewer FLOPs from 2.07 / 4.26 / 6.96 points to 1.82 / 4.10 / 6.11).
       The ridge is chosen per layer on 20% held-out rows. A group whose every folded
       consumer is re-solved this way is folded in parallel (no cascade: its fold is only the starting point).
       The pass-start outputs each layer is fitted to (and a residual add's other operand) are recorded at the
       rows its fit will read during the statistics pass, which runs the pass-start graph anyway
       (`passes.refit.Recorder`, at most 1 GiB of rows): the refit's sweep then runs the squeezed graph alone
       (a compile of the benchmark models makes 2 calibration passes, where running the pass-start graph
       beside it made 3), and the pass-start graph runs only up to the last cascade step, if any.
       On the benchmark ResNet-style model at 2x / 5x fewer FLOPs (`round_to = 8`) it took one-shot top-1 from
       86.55% / 34.13% (the fold alone, cascade) to 90.06% / 82.20%, at about the same compile cost (the
       cascade's passes are saved). `refit = fold` keeps the paper's fold alone.
    7. `branches = remove`: a group that is the inside of a residual branch (`rewrite.branch_removable`: its
       consumers' outputs reach, through batch norms and activations, one operand of an add whose other operand,
       the skip path, does not depend on it) may also keep 0 channels: the branch's layers are deleted, the
       constant mean it added stays in the add, and the layer refit re-solves the layers that read that sum
       (depth pruning, one-shot). Under a budget, after the channel search, each such branch in turn (the
       cheapest estimated error per unit of cost first) is taken out, the budget it freed spent on channels by
       the same search, and it stays out when the model as the pass writes it (folds and layer refit, the refit on
       `MEASURE_ROWS` rows per layer) has less output error on the sensitivity batches (while the budget is still
       missed it stays out; once a later one meets it, each of those is tried back in, the last first, and goes back
       when the model then measures less error: on the benchmark ResNet at 5x fewer FLOPs with `round_to = 16` this
       took one-shot top-1 from 75.9% with 5 of its 6 blocks out at 6.59x to 84.5% with 2 out at 5.27x); the reconstruction-error
       estimate cannot see what the refit after a removed branch recovers (on the benchmark ResNet, removing the
       second block of its first stage alone lost 37.4 top-1 points without that refit and 5.0 with it). `ratio = 100%` removes every
       selected branch. The report's search line lists each measurement and its notes the branches removed.
       Channel counts round to a runtime's blocks, and a CPU convolution of 8 channels runs as one of 16 (ONNX
       Runtime, AVX-512); a removed branch runs nothing. Default `keep` (no group loses every channel).
    A grouped conv consumer (groups > 1, not depthwise) reads a channel through one weight slot
    shared by its conv groups: the slot goes in every group and each conv group's inputs are rebuilt
    from its own kept slots (one T per group, the group structure kept); in cascade mode its fold is
    the one measured on the pass-start graph. A depthwise conv between producer and consumer passes
    channels through and is sliced.
    Design choices by measurement on the benchmark VGG/ResNet at 5x fewer params
    (benchmarks/results/squeeze.md lists each alternative at the hardest point); the alternatives
    are not policy options but an `Ablation` the benchmark sets with `ablation(...)`.
    Exact when activations have exact rank r and consumers are linear in their input channels. It
    approximates at zero-padded conv borders (t₀ enters the bias at every output position). A group
    with a consumer that is not linear in its input channels (conv_transpose, attention's out_proj)
    gets a note in the report and is left alone; with `nonlinear = "remove"` such consumers
    are only sliced (their removed inputs are lost, not reconstructed) while the group's linear
    consumers still get the fold. Groups frozen by the dependency analysis (graph outputs, opaque
    ops, LayerNorm over the channel axis) are never touched.
    Needs calibration data. Its order with `fold_bn` matters and depends on the model, so measure both: on
    the benchmark ResNet-style model at 2x fewer FLOPs (one training of it), squeezing the BN-folded graph lost
    11.9 top-1 points against 3.4 with the BatchNorms in place (the same activations, but the consumers' metric
    and the allocation differ; not yet explained); on the demo's digits CNN (examples/demo.sqz, with `recover`
    after) folding first did better: 10.0x fewer FLOPs at 99.72% held-out top-1 against 6.9x at 99.17%.
    Guarantees: the graph verifies; params/FLOPs never grow; in search mode the budget holds and, where
    the compiler can measure it, the guard too.
    """

    name: ClassVar[str] = "squeeze_fold"
    energy: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    ratio: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    method: Literal["greedy", "qr"] = "greedy"
    ridge: float = field(default=1e-6, metadata={"min": 0.0})
    min_channels: int = field(default=1, metadata={"min": 1})
    round_to: int = field(default=1, metadata={"min": 1})
    nonlinear: Literal["skip", "remove"] = "skip"
    mode: Literal["cascade", "parallel"] = "cascade"
    max_samples: int = field(default=200_000, metadata={"min": 1, "unit": "count"})
    search: Literal["fast", "measured"] = "fast"
    refit: Literal["layer", "fold"] = "layer"
    branches: Literal["keep", "remove"] = "keep"

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        """What the options alone show squeeze_fold cannot run with (`_option_conflicts`), for the policy checker."""
        return _option_conflicts(cls.with_defaults(given))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = ctx.analysis(DependencyAnalysis, graph).restrict(ctx.selected)
        why = {g.id: branch_removable(graph, g) for g in groups.prunable()} if self.branches == "remove" else {}
        removable = frozenset(gid for gid, reason in why.items() if reason is None)
        token = _REMOVABLE.set(removable)
        try:
            result = self._run(graph, ctx, groups)
        finally:
            _REMOVABLE.reset(token)
        if why and not removable:  # said, not silently the same as `keep`
            result.notes.insert(0, "branches = remove: no channel group is a residual branch that can be removed "
                                "whole (" + "; ".join(f"{', '.join(groups[gid].producers)}: {reason}"
                                                       for gid, reason in list(why.items())[:3])
                                + (f"; {len(why) - 3} more" if len(why) > 3 else "") + ")")
        return result

    def _run(self, graph: Graph, ctx: PassContext, groups: ChannelGroups) -> PassResult:
        conflicts = _option_conflicts(self.option_values())
        if conflicts:  # the checker reports these at the option; here for a pass built from Python
            raise NetsqueezeError(Diagnostic(f"squeeze_fold: {conflicts[0][1]}"))
        result = PassResult()
        plans: dict[int, list[_Probe]] = {}
        for g in groups.prunable():
            cons = g.members_of("consumer")
            # a grouped conv reads these channels through weight slots shared across its groups
            grouped = [m for m in g.members if m.role == "param" and m.param == "weight" and m.axis == 1
                       and graph.node(m.node).kind == "conv" and attr(graph.node(m.node), "groups") != 1]
            bad = [m for m in cons if not self._foldable(graph, m)]
            if not cons and not grouped:
                continue
            # the per-conv-group fold needs the group's channels to be the conv's weight slots (one channel per
            # slot, in every conv group); a concat part laid across conv-group boundaries is not
            split = [m for m in grouped if len(m.index) != int(graph.node(m.node).params["weight"].shape[1])]
            if split:
                result.notes.append(f"group {g.id} ({g.producers[0] if g.producers else '?'}): grouped conv "
                                    f"'{split[0].node}' reads its channels across conv-group boundaries; left alone")
                continue
            if bad and self.nonlinear == "skip":
                result.notes.append(f"group {g.id} ({g.producers[0] if g.producers else '?'}): consumer "
                                    f"'{bad[0].node}' is not linear in its input channels; left alone")
                continue
            probes = [self._probe(graph, m) for m in cons if self._foldable(graph, m)]
            probes += [self._grouped_probe(graph, g, m) for m in grouped]
            if not probes:
                result.notes.append(f"group {g.id}: no consumer is linear in its channels, nothing to measure; left alone")
                continue
            plans[g.id] = probes
        if not plans:
            return result
        searching = self.energy is None and self.ratio is None
        if searching and not Budget.of(ctx) and not self._guarded(ctx):
            # before any pass over the data
            raise BudgetError(Diagnostic("squeeze_fold needs `energy`, `ratio`, a flops/params/bytes `budget` or a `guard`"))
        weighting = self._weighting(graph, groups, plans, ctx) if searching else "none"
        # the layer refit's targets, recorded in the statistics pass: its sweep then runs the squeezed graph alone
        recorder = Recorder(graph, [n for g in groups.prunable() for n in g.consumers], ctx) \
            if self.refit == "layer" and ctx.batches_fn is not None else None
        gradients = self._collect(graph, ctx, plans, first_order=weighting == "first_order", recorder=recorder)
        for gid, ps in plans.items():
            for p in ps:
                if p.full is not None and p.rows <= p.full.shape[0]:  # the feature Gram would be singular
                    result.notes.append(f"group {gid}: '{p.member.node}' fits blocks shared, {p.rows} calibration "
                                        f"samples for {p.full.shape[0] - 1} features")
                    p.full = None
        _shrink(plans, result)
        ranks = {gid: self._rank(graph, probes) for gid, probes in plans.items()}
        if searching:
            counts, line = self._search_counts(graph, groups, ranks, plans, ctx, weighting, gradients)
            result.notes.append(line)
        else:
            counts = {gid: self._kept(groups[gid], ranks[gid], self.energy, ctx) for gid in plans}
            if self.ratio is not None and (raised := ratio_note(
                    [groups[gid] for gid in plans], {gid: self._bounds(groups[gid], ctx) for gid in plans},
                    self.ratio)) is not None:
                result.notes.append(raised)
        keeps = _keeps(groups, ranks, counts)
        if not keeps:
            return result
        start = graph.copy() if searching and self.mode == "cascade" and ctx.guard is not None else None
        mode = self.mode
        out, par = self._squeeze(graph, ctx, groups, keeps, plans, mode, recorder=recorder)
        if start is not None and (check := ctx.guard_check(graph)) is not None and not check[0]:
            # the search measured parallel folds; keep that model when the cascade's refit misses the guard
            graph.assign(start)
            mode = "parallel"
            out, par = self._squeeze(graph, ctx, groups, keeps, plans, mode, layer_refit=False)
            result.notes.append(f"cascade reached {check[1]:.2%}, over the guard: kept the parallel fold (the "
                                "model the search measured, without the layer refit)")
        how = (mode if mode == "parallel" or par == 0 else "parallel folds, every consumer re-solved whole"
               if par == len(keeps) else f"{par} in parallel, {len(keeps) - par} in cascade")
        out.notes = [*result.notes, *out.notes, f"squeezed {len(keeps)} groups ({how}): "
                     + ", ".join(f"{groups[g].size}->{len(k)}" for g, k in sorted(keeps.items()))]
        out.metrics = {**result.metrics, **out.metrics}
        gone = [gid for gid, k in sorted(keeps.items()) if not k]
        if gone:
            out.notes.append(f"removed {len(gone)} residual branch(es) whole, each now the constant mean it adds: "
                             + ", ".join(f"{', '.join(groups[g].producers)} -> {', '.join(groups[g].consumers)}"
                                         for g in gone))
        short_fits((p.fit_rows(len(k)) for gid, k in keeps.items() if k for p in plans[gid]), out)
        return out

    def _squeeze(self, graph: Graph, ctx: PassContext, groups: ChannelGroups, keeps: dict[int, list[int]],
                 plans: dict[int, list[_Probe]], mode: str, layer_refit: bool = True,
                 recorder: Recorder | None = None) -> tuple[PassResult, int]:
        ref = graph.copy()
        layered = layer_refit and self.refit == "layer" and ctx.batches_fn is not None
        # a group whose every folded consumer the layer refit re-solves whole needs no cascade: its fold is
        # only the refit's starting point (and the fallback where a refit does not take)
        # a removed branch (no channel kept) has nothing to refit: its consumers become their mean, in parallel
        par = {gid: k for gid, k in keeps.items() if mode == "parallel" or not k or (layered and all(
            p.per_group is None and layer_refittable(graph, p.member.node) is None for p in plans[gid]))}
        out = PassResult(changed=True)
        if par:
            out = apply_selection(graph, groups, {gid: self._selection(graph, k, plans[gid]) for gid, k in par.items()})
        steps = self._cascade(graph, ref, groups, {g: k for g, k in keeps.items() if g not in par}, plans, out)
        if layered:
            if mode == "cascade":
                out.notes.append(f"refit = layer: {len(par)} of {len(keeps)} groups folded in parallel (each of "
                                 "their consumers re-solved whole), the rest in cascade, in the layer refit's sweep"
                                 if steps else f"refit = layer: all {len(keeps)} groups folded in parallel (each of "
                                 "their consumers re-solved whole), none in cascade")
            refit_layers(graph, ref, ctx, *layer_plan(ref, groups, keeps), out.notes, "layer refit", steps,
                         recorder=recorder)
        elif steps:
            side = SideBySide(_Frontier.open(graph, ref, ctx, graph.topo_order()), graph, ref, ctx, out.notes,
                              "cascade", [at for at, _ in steps])
            for _, run in steps:
                run(side)
        return out, len(par)

    def _cascade(self, graph: Graph, ref: Graph, groups: ChannelGroups, keeps: dict[int, list[int]],
                 plans: dict[int, list[_Probe]], out: PassResult) -> list[SweepStep]:
        """The cascade: one step per group of `keeps` that squeezes it, refitting its fold on the current graph,
        in graph order (`SweepStep`s, positions in `graph.topo_order()`; each adds what it rewrote to
        `out.touched`).

        The data goes through the graph once, layer by layer (`passes.frontier`): the original and the squeezed
        graph run side by side from a checkpoint of the live tensors just before the first node a group
        touches to its consumers' inputs; the checkpoint stays valid after the squeeze (nothing before it
        changes), so the whole cascade costs about two model passes over the data plus the spans of the
        groups (a residual stream's group spans the model), whatever the number of groups; with the layer
        refit the steps run in its sweep (`refit_layers`), which then costs that once for both. Without
        `ctx.segment` (a pass run outside `compile`) each group streams both graphs whole instead. `ref`: the
        pass-start graph (a copy)."""
        start = first_positions(graph.topo_order(), (groups[gid] for gid in keeps))

        def step(gid: int) -> Callable[[SideBySide], None]:
            def run(side: SideBySide) -> None:
                ident = groups[gid].producers, groups[gid].consumers
                # earlier rewrites may shift index maps of shared axes (concat): regroup, find this group again
                now = find_groups(graph)
                fresh = next(g for g in now if (g.producers, g.consumers) == ident)
                values = list(dict.fromkeys(p.value for p in plans[gid] if p.per_group is None))
                sel = self._refit(graph, ref, fresh, keeps[gid], plans[gid], values,
                                  side.pairs(start[gid], values, f"group {gid}"))
                out.touched |= apply_selection(graph, now, {fresh.id: sel}).touched
            return run

        return [(start[gid], step(gid)) for gid in sorted(keeps, key=lambda gid: (start[gid], gid))]

    # ---- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _foldable(graph: Graph, m: Member) -> bool:
        node = graph.node(m.node)
        foldable = spec(node.kind).foldable  # the op's output is linear in this input axis of this weight
        if foldable is None or m.param is None or not foldable(node, m.param, m.axis):
            return False
        return len({len(p) for p in m.index}) == 1

    def _probe(self, graph: Graph, m: Member) -> _Probe:
        c, block = len(m.index), len(m.index[0])
        z = torch.zeros(c + 1, c + 1, dtype=torch.float64)
        ab = _ABLATION.get()
        full = block > 1 and ab.block_fit == "full" and c * block <= ab.max_block_features
        return _Probe(m, graph.operands(m.node)[0], z, torch.zeros(c, block, dtype=torch.float64),
                      full=torch.zeros(c * block + 1, c * block + 1, dtype=torch.float64) if full else None)

    @staticmethod
    def _grouped_probe(graph: Graph, g: ChannelGroup, m: Member) -> _Probe:
        """A grouped conv reading group `g`: slot c of conv group γ is input channel γ·per_in + c."""
        node = graph.node(m.node)
        n_groups, per_in = int(node.attrs["groups"]), int(node.params["weight"].shape[1])
        at = [[gam * per_in + c for gam in range(n_groups)] for c in range(per_in)]
        c = len(m.index)
        z = torch.zeros(c + 1, c + 1, dtype=torch.float64)
        return _Probe(m, graph.operands(m.node)[0], z, torch.zeros(c, n_groups, dtype=torch.float64), at=at,
                      per_group=torch.zeros(n_groups, c + 1, c + 1, dtype=torch.float64))

    def _collect(self, graph: Graph, ctx: PassContext, plans: dict[int, list[_Probe]], first_order: bool = False,
                 recorder: Recorder | None = None) -> _Gradients | None:
        """Runs the calibration data through `graph` once for every probe's statistics (and the layer refit's
        targets, into `recorder`). With `first_order`, the
        same pass also runs backward on the sensitivity batches (`_sensitivity_batches`) for the gradient Grams
        of the first-order estimate (`_first_order`), which are returned: one forward pass serves both. None when
        not asked, or when the estimate does not apply: a grouped conv consumer (it does not cover them), no
        floating-point output, or no segment runner (a pass run outside `compile`)."""
        probes = [p for ps in plans.values() for p in ps]
        values = list(dict.fromkeys(p.value for p in probes))
        tapped = list(dict.fromkeys([*values, *(recorder.values() if recorder is not None else [])]))
        outs = graph.output_values()
        # the estimate projects the floating-point outputs: a model without one has nothing to project
        floats = any(graph.meta_of(v).dtype.startswith(("float", "bfloat")) for v in outs)
        seg = ctx.segment(graph, [(nid, 0) for nid in graph.inputs], [*outs, *tapped]) if first_order and floats \
            and not any(p.per_group is not None for p in probes) else None
        if seg is None:
            for batch in ctx.stream(graph, tapped):
                by_tap = dict(zip(tapped, batch))
                self._add(graph, probes, by_tap)
                if recorder is not None:
                    recorder.add(by_tap)
            return None
        grads = _Gradients({id(p): torch.zeros(p.width, p.width, dtype=torch.float64) for p in probes})
        gen = torch.Generator().manual_seed(ctx.seed)
        n_batches = self._sensitivity_batches(ctx)
        keep = ctx.outputs_sink(graph)
        bar = ctx.progress(f"calibration ({len(values)} tapped values, gradients)", len(ctx.batch_sizes()), "batch")
        for i, inputs in enumerate(ctx.batches()):
            bar.update(1)
            backward = n_batches is None or i < n_batches
            with torch.set_grad_enabled(backward):
                got = seg(list(inputs))
                ys, acts = got[: len(outs)], got[len(outs): len(outs) + len(values)]
                if recorder is not None:  # before the backward pass, so that what only it reads is freed
                    recorder.add(dict(zip(tapped, got[len(outs):])))
                del got
                if backward:  # a random ±1 projection of the outputs, back to the probed values
                    proj = torch.stack([((torch.randint(0, 2, y.shape, generator=gen) * 2 - 1).to(y.dtype) * y).sum()
                                        for y in ys if y.is_floating_point()]).sum()
                    by_value = dict(zip(values, torch.autograd.grad(proj, acts, allow_unused=True)))
            if keep is not None:
                keep(i, [y.detach() for y in ys])
            self._add(graph, probes, {v: a.detach() for v, a in zip(values, acts)})
            if not backward:
                continue
            grads.energy += sum(float((y.detach().double() ** 2).sum()) for y in ys if y.is_floating_point())
            for p in probes:
                if (gv := by_value[p.value]) is None:
                    continue
                g = gather(graph, p.member, gv)  # [n, C, block]
                grads.grams[id(p)] += gram(g.reshape(g.shape[0], -1)) if p.full is not None else torch.einsum(
                    "ncb,ndb->cd", g, g)
        bar.close()
        return grads

    def _add(self, graph: Graph, probes: list[_Probe], acts: dict[Value, torch.Tensor]) -> None:
        """One batch's activations `acts` (by value) into every probe's statistics."""
        read: dict[Value, str] = {}  # each value once, however many consumers probe it (named by the first)
        for p in probes:
            if p.count < self.max_samples:
                read.setdefault(p.value, p.member.node)
        for v, node in read.items():
            check_squarable(acts[v], node, "inputs")
        for p in probes:
            if p.count >= self.max_samples:
                continue
            a = gather(graph, p.member, acts[p.value], p.at)  # [n, C, block]
            rows = add(p, a)  # samples x C
            if p.per_group is not None:
                aug = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
                per = aug.reshape(-1, a.shape[2], aug.shape[1])  # rows are (sample, conv group) ordered
                p.per_group += torch.einsum("ngi,ngj->gij", per, per)
            if p.full is not None:
                flat = torch.cat([a.reshape(a.shape[0], -1), torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
                p.full += gram(flat)

    def _refit(self, graph: Graph, ref: Graph, g: ChannelGroup, keep: list[int], probes: list[_Probe],
               values: list[Value], pairs: Pairs) -> ChannelSelection:
        """Cascade: least squares from the kept channels *as the already-squeezed graph computes them*
        to the original activations, so each fold also corrects the drift of the layers before it.
        `pairs`: per calibration batch, the tensors at `values` in the current graph and in `ref`."""
        cur = {m.node: m for m in g.members_of("consumer")}
        grouped = [p for p in probes if p.per_group is not None]
        probes = [p for p in probes if p.per_group is None]
        k = len(keep)
        stats = {p.member.node: Cross.empty(k * p.block, len(p.member.index) * p.block, 1) if p.full is not None
                 else Cross.empty(k, len(p.member.index), p.block) for p in probes}
        for now, orig in pairs if probes else ():
            acts_now, acts_ref = dict(zip(values, now)), dict(zip(values, orig))
            for p in probes:
                st = stats[p.member.node]
                if st.count >= self.max_samples:
                    continue
                a_s = gather(graph, cur[p.member.node], acts_now[p.value], keep=keep)  # [n, k, block]
                a = gather(ref, p.member, acts_ref[p.value])  # [n, C, block]
                if p.full is not None:  # every feature of the block is its own column
                    a_s, a = a_s.reshape(a_s.shape[0], -1, 1), a.reshape(a.shape[0], -1, 1)
                st.add(a_s, a)
        fits: dict[str, tuple[Fold, torch.Tensor]] = {}
        for p in probes:
            t, t0 = stats[p.member.node].fit(self.ridge)  # k x C, intercept per position
            fits[p.member.node] = self._shaped(p, k, t, t0)
        for p in grouped:  # a grouped conv's fold stays the one measured on the pass-start graph
            tg, t0g = self._grouped_fit(p, keep)
            fits[p.member.node] = (GroupFold(tg), t0g)
            cur[p.member.node] = p.member
        return self._selection_from(graph, cur, keep, fits)

    def _rank(self, graph: Graph, probes: list[_Probe]) -> tuple[list[int], list[float], torch.Tensor]:
        """(channel order, prefix errors, pooled covariance) for one group.

        Consumers are pooled with equal weight: covariances normalised by their trace, metrics by the
        consumer-output variance they imply; exact for the common single-consumer group.
        """
        cov_sum: torch.Tensor | None = None
        met_sum: torch.Tensor | None = None
        weighted = _ABLATION.get().weighting == "consumer"
        full = probes[0].full
        if len(probes) == 1 and full is not None:  # flatten→linear: rank channels by their blocks
            p = probes[0]
            met = self._metric(graph, p.member, full=True) if weighted else None
            order, err = ranking(p.covariance(full=True), self.method, met, max(self.ridge, 1e-9), block=p.block)
            return order, err, p.covariance()
        for p in probes:
            cov = p.covariance()
            cov = cov / cov.trace().clamp_min(1e-30)
            met = self._metric(graph, p.member) if weighted else torch.eye(cov.shape[0], dtype=cov.dtype)
            met = met / torch.trace(met @ cov).clamp_min(1e-30)
            cov_sum = cov if cov_sum is None else cov_sum + cov
            met_sum = met if met_sum is None else met_sum + met
        assert cov_sum is not None and met_sum is not None
        order, err = ranking(cov_sum, self.method, met_sum, max(self.ridge, 1e-9))
        return order, err, cov_sum

    @staticmethod
    def _metric(graph: Graph, m: Member, full: bool = False) -> torch.Tensor:
        """Σ_o WᵀW of a consumer in group-channel space, summed over kernel taps / block positions
        (`full`: over every feature of the blocks, C·block square)."""
        w = graph.node(m.node).dense(m.param or "weight").double().movedim(m.axis, -1)
        idx = torch.tensor([list(q) for q in m.index])  # [C, block]
        wc = w[..., idx].reshape(-1, *idx.shape)  # [rows, C, block]
        if full:
            wf = wc.reshape(wc.shape[0], -1)
            return wf.T @ wf
        return torch.einsum("rcb,rdb->cd", wc, wc)

    @staticmethod
    def _shaped(p: _Probe, k: int, t: torch.Tensor, t0: torch.Tensor) -> tuple[Fold, torch.Tensor]:
        """A fit over block features (k·block × C·block, intercept C·block) as the fold
        [k, block, C, block] and intercept [C, block]; a shared fit as a shared fold."""
        if p.full is None:
            return SharedFold(t), t0
        c, b = len(p.member.index), p.block
        return BlockFold(t.reshape(k, b, c, b)), t0.reshape(c, b)

    def _selection(self, graph: Graph, keep: list[int], probes: list[_Probe]) -> ChannelSelection:
        """Parallel: the reconstruction measured on the pass-start graph, per consumer."""
        fits: dict[str, tuple[Fold, torch.Tensor]] = {}
        for p in probes:
            if p.per_group is not None:
                t, t0 = self._grouped_fit(p, keep)
                fits[p.member.node] = (GroupFold(t), t0)
                continue
            if p.full is not None:
                feats = [s * p.block + j for s in keep for j in range(p.block)]
                tf, t0f = reconstruction(p.full / max(1, p.rows), feats, self.ridge, p.rows)
                fits[p.member.node] = self._shaped(p, len(keep), tf, t0f)
                continue
            t, t0_pos = parallel_fit(p, keep, self.ridge)
            fits[p.member.node] = (SharedFold(t), t0_pos)
        return self._selection_from(graph, {p.member.node: p.member for p in probes}, keep, fits)

    def _grouped_fit(self, p: _Probe, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per conv group γ, least squares of its slots from its own kept slots: T [G, k, C] and the
        intercept over all input channels (channel γ·per_in + c gets t₀_γ[c])."""
        assert p.per_group is not None
        per_count = max(1, p.count // p.per_group.shape[0])
        fits = [reconstruction(m / per_count, keep, self.ridge, per_count) for m in p.per_group]
        return torch.stack([t for t, _ in fits]), torch.cat([t0 for _, t0 in fits])

    @staticmethod
    def _selection_from(graph: Graph, members: dict[str, Member], keep: list[int],
                        fits: dict[str, tuple[Fold, torch.Tensor]]) -> ChannelSelection:
        folds: dict[str, Fold] = {}
        shifts: dict[str, torch.Tensor] = {}
        for nid, (t, t0_pos) in fits.items():
            m = members[nid]
            folds[nid] = t
            if isinstance(t, GroupFold):  # grouped conv: the intercept is already over its input channels
                shifts[nid] = t0_pos
                continue
            shifts[nid] = axis_vector(graph, m, t0_pos)
        return ChannelSelection(keep=keep, fold=folds, bias_shift=shifts)

    def _kept(self, g: ChannelGroup, rank: tuple[list[int], list[float], torch.Tensor], energy: float | None,
              ctx: PassContext) -> int:
        b = self._bounds(g, ctx)
        if self.ratio is not None:
            return b.for_ratio(self.ratio)
        if energy is None:
            return g.size
        return b.clamp(kept_for_error(rank[1], 1.0 - energy) if _ABLATION.get().energy_of == "reconstruction"
                       else rank_for_energy(rank[2], energy))

    def _bounds(self, g: ChannelGroup, ctx: PassContext) -> GroupBounds:
        """Group `g`'s bounds: this pass's min_channels/round_to and the policy's bounds, the most
        restrictive winning (`passes.allocation`)."""
        return group_bounds(g, ctx, self.min_channels, self.round_to, removable=g.id in _REMOVABLE.get())

    def _candidate(self, graph: Graph, groups: ChannelGroups, ranks: dict[int, tuple[list[int], list[float], torch.Tensor]],
                   plans: dict[int, list[_Probe]], counts: dict[int, int]) -> Graph:
        """A copy of `graph` with each group in `counts` squeezed to its count, folded in parallel
        (the pass-start statistics): what the search measures a candidate on."""
        g2 = graph.copy()
        keeps = _keeps(groups, ranks, counts)
        if keeps:
            apply_selection(g2, groups, {gid: self._selection(g2, k, plans[gid]) for gid, k in keeps.items()})
        return g2

    def _sensitivities(self, graph: Graph, groups: ChannelGroups,
                       ranks: dict[int, tuple[list[int], list[float], torch.Tensor]], plans: dict[int, list[_Probe]],
                       counts: dict[int, int], ctx: PassContext, done: dict[int, int],
                       prefixes: Callable[[], tuple[dict[int, int], Prefixes]]) -> dict[int, float]:
        """Per group, the model's squared relative output error per unit of the group's own
        reconstruction error: the group alone squeezed to its count in `counts` (half its channels
        when that keeps them all), folded in parallel on a copy, measured by `ctx.fidelity` from the tensors
        live at the group's first node. `prefixes()`: every group's first position and the tensors live there
        (`frontier.Prefixes`: one run for every group and every round, made when first asked for). `done`: the
        count each group was last measured at (updated here); a group at that count is not measured again."""
        out: dict[int, float] = {}
        batches = self._sensitivity_batches(ctx)
        todo: dict[int, int] = {}
        for gid, (_, err, _) in ranks.items():
            size = groups[gid].size
            k = counts[gid] if counts[gid] < size else max(1, size // 2)
            if err[k] > 1e-9 and done.get(gid) != k:
                todo[gid] = k
        if not todo:
            return out
        # each candidate equals `graph` before the first node its group touches: it runs from there
        start, kept = prefixes()
        for gid, k in todo.items():
            done[gid] = k
            e = ctx.fidelity(self._candidate(graph, groups, ranks, plans, {gid: k}), "output_error", batches,
                             kept.feeds(start[gid]))
            if e is not None:
                out[gid] = max(e * e / ranks[gid][1][k], 1e-6)
        return out

    def _measured_error(self, graph: Graph, groups: ChannelGroups,
                        ranks: dict[int, tuple[list[int], list[float], torch.Tensor]], plans: dict[int, list[_Probe]],
                        counts: dict[int, int], ctx: PassContext) -> float | None:
        """The squared relative output error of the model squeezed to `counts` as the pass writes it: parallel
        folds, then (`refit = layer`) the layer refit of `refit.layer_plan`, on the sensitivity batches (the refit
        too). None when the compiler cannot measure."""
        n = self._sensitivity_batches(ctx)
        cand = self._candidate(graph, groups, ranks, plans, counts)
        if self.refit == "layer" and ctx.batches_fn is not None:
            full = ctx.batches_fn
            sub = ctx if n is None else dataclasses.replace(ctx, batches_fn=lambda: itertools.islice(full(), n),
                                                            sink_fn=None)
            refit_layers(cand, graph, sub, *layer_plan(graph, groups, _keeps(groups, ranks, counts)), [], "search",
                         rows=MEASURE_ROWS)
        e = ctx.fidelity(cand, "output_error", n)
        return None if e is None else e * e

    @staticmethod
    def _sensitivity_batches(ctx: PassContext) -> int | None:
        """How many calibration batches hold `Ablation.sensitivity_samples` samples (None: all of them)."""
        want = _ABLATION.get().sensitivity_samples
        if want <= 0 or ctx.batches_fn is None:
            return None
        have = 0
        for n, size in enumerate(ctx.batch_sizes()):
            if have >= want:
                return n
            have += size
        return None

    def _sensitivity_share(self, ctx: PassContext) -> float:
        """The share of the calibration data one sensitivity measurement runs over."""
        if ctx.batches_fn is None:
            return 1.0
        total = len(ctx.batch_sizes())
        used = self._sensitivity_batches(ctx)
        return 1.0 if used is None or not total else used / total

    @staticmethod
    def _first_order(ranks: dict[int, tuple[list[int], list[float], torch.Tensor]], plans: dict[int, list[_Probe]],
                     gradients: _Gradients) -> dict[int, list[float]]:
        """Per group, the model's squared relative output error when it keeps its first k ranked channels,
        for every k, to first order: ‖Δy‖² ≈ Σ_rows gᵀ·Σ_res(k)·g, where g = Jᵀr is the gradient of a random
        ±1 projection r of the outputs at a consumer's input (E_r[ggᵀ] = JᵀJ, Hutchinson's estimator) and
        Σ_res(k) the covariance of the part of the group's channels the kept ones do not reconstruct. The
        gradients' Grams come from the backward pass `_collect` ran in its forward pass over the sensitivity
        batches: one forward/backward pass serves every group. Empty when the outputs carry no energy."""
        if gradients.energy <= 0:
            return {}
        out: dict[int, list[float]] = {}
        for gid, ps in plans.items():
            order = ranks[gid][0]
            total = [0.0] * (len(order) + 1)
            for p in ps:
                grams = gradients.grams[id(p)]
                c = len(p.member.index)
                if p.full is None and grams.shape[0] != c:  # a full block fit dropped after collecting: per channel
                    grams = torch.einsum("cbdb->cd", grams.reshape(c, p.block, c, p.block))
                if p.full is not None:
                    cov = p.covariance(full=True)
                    feats = [c * p.block + j for c in order for j in range(p.block)]
                    err = prefix_errors(cov, grams, feats)[:: p.block]
                else:
                    cov = p.covariance()
                    err = prefix_errors(cov, grams, order)
                scale = float((grams * cov).sum())
                total = [a + scale * e for a, e in zip(total, err)]
            out[gid] = [t / gradients.energy for t in total]
        return out

    @staticmethod
    def _guarded(ctx: PassContext) -> bool:
        """Whether the search measures a guard: the policy sets one and the compiler can measure it."""
        return ctx.guard is not None and ctx.fidelity_fn is not None

    def _weighting(self, graph: Graph, groups: ChannelGroups, gids: Iterable[int], ctx: PassContext) -> str:
        """How the search weighs each group's reconstruction error (`Ablation.sensitivity`, `auto` resolved:
        `output` while measuring the groups `gids` costs at most `measure_passes` model passes
        (`_measure_cost`), else `first_order`; `curve` with `search = measured`); `none` for the uniform
        allocation."""
        ab = _ABLATION.get()
        if ab.allocation != "lagrange":
            return "none"
        how: str = "curve" if self.search == "measured" else ab.sensitivity
        if how == "auto":
            how = "output" if self._measure_cost(graph, groups, gids, ctx) <= ab.measure_passes else "first_order"
        return how

    def _measure_cost(self, graph: Graph, groups: ChannelGroups, gids: Iterable[int], ctx: PassContext) -> float:
        """The most model passes over the calibration data that measuring the output sensitivity of the groups
        `gids` (`_sensitivities`) costs: over the sensitivity batches, one run of `graph` up to the last position
        the prefixes keep (`Prefixes.kept`; none without a layer-by-layer runner) and `sensitivity_rounds` runs of
        each group's candidate, from its first node on where the prefixes keep that position, else whole, counted
        at `graph`'s FLOPs. The measurements cost less: a squeezed candidate has fewer FLOPs, and a round after
        the first measures only the groups whose count moved. A group near the outputs costs a small part of a
        pass; one at the inputs, a whole pass."""
        topo = graph.topo_order()
        flops = [node_flops(graph, graph.node(nid)) for nid in topo]
        total = sum(flops)
        start = list(first_positions(topo, (groups[g] for g in gids)).values())
        if not total or not start:
            return 0.0
        after = list(itertools.accumulate(reversed(flops)))[::-1]  # after[i]: FLOPs from position i on
        sizes = ctx.batch_sizes()
        kept = Prefixes.kept(graph, start, sum(sizes[: self._sensitivity_batches(ctx)])) if ctx.segment_fn else {}
        runs = (total - after[max(kept)] if kept else 0) + _ABLATION.get().sensitivity_rounds * sum(
            after[i] if i in kept else total for i in start)
        return self._sensitivity_share(ctx) * runs / total

    def _curve_grid(self, groups: ChannelGroups, ranks: dict[int, tuple[list[int], list[float], torch.Tensor]],
                    ctx: PassContext) -> dict[int, list[int]]:
        """Per group, the kept counts its output-error curve is measured at: n of the counts its bounds allow
        (below its size), spread evenly over them, the smallest included; n the most, from `curve_points` down
        to 3, whose measurements (and the current graph's), each over one calibration batch at the least, fit
        in `curve_passes` model passes; 3 when none fits. Counts before samples: on the benchmark ResNet, more
        counts on fewer images allocated better than fewer counts on all of them."""
        ab = _ABLATION.get()
        n_batches = len(ctx.batch_sizes())
        allowed = {gid: [k for k in self._bounds(groups[gid], ctx).allowed()[:-1] if k] for gid in ranks}

        def grid(n: int) -> dict[int, list[int]]:
            return {gid: sorted({a[round(i * (len(a) - 1) / max(1, min(n, len(a)) - 1))]
                                 for i in range(min(n, len(a)))}) for gid, a in allowed.items()}

        for n in range(ab.curve_points, 2, -1):
            # `measure_batches` gives each of `points` measurements max(1, ⌊passes·batches/points⌋) batches:
            # within the passes unless that is below one batch
            g = grid(n)
            if n == 3 or not n_batches or sum(map(len, g.values())) + 1 <= ab.curve_passes * n_batches:
                return g
        return grid(3)

    def _curves(self, graph: Graph, groups: ChannelGroups,
                ranks: dict[int, tuple[list[int], list[float], torch.Tensor]], plans: dict[int, list[_Probe]],
                ctx: PassContext) -> tuple[dict[int, dict[int, float]], int]:
        """Per group, the model's squared relative output error (less the current graph's) with that group
        alone squeezed to k channels (parallel fold on a copy), at k on a grid of allowed counts
        (`_curve_grid`); and the samples each measurement ran over. The measurements together cost at most
        `curve_passes` model passes over the calibration data (`PassContext.measure_batches`: the leading
        batches only, when there are many points), and each runs from the tensors live at its group's first
        node (`frontier.Prefixes`, one run for every group). Empty when the compiler cannot measure."""
        grid = self._curve_grid(groups, ranks, ctx)
        n_batches, n_samples = ctx.measure_batches(sum(map(len, grid.values())) + 1, _ABLATION.get().curve_passes)
        base = ctx.fidelity(graph, "output_error", n_batches)
        if base is None:
            return {}, 0
        start = first_positions(graph.topo_order(), (groups[gid] for gid in grid))
        prefixes = Prefixes(graph, ctx, start.values(), n_batches)
        out: dict[int, dict[int, float]] = {}
        for gid, ks in grid.items():
            pts = {groups[gid].size: 0.0}
            for k in ks:
                e = ctx.fidelity(self._candidate(graph, groups, ranks, plans, {gid: k}), "output_error", n_batches,
                                 prefixes.feeds(start[gid]))
                if e is None:
                    return {}, 0
                pts[k] = max(e * e - base * base, 0.0)
            out[gid] = pts
        return out, n_samples

    def _fill(self, groups: ChannelGroups, counts: dict[int, int], value: Callable[[int, int], float],
              cost: dict[int, float],
              stats_for: Callable[[dict[int, int]], Reached],
              meets: Callable[[Reached], bool], ctx: PassContext, fixed: Iterable[int] = ()) -> dict[int, int]:
        """Spends the budget the λ bisection leaves unused (its steps are coarse with `round_to`): gives
        channels back (`allocation.give_back`), one rounding step at a time, to the group whose weighted
        error falls most per unit of cost, while the budget still holds; the groups in `fixed` (removed
        branches) stay as they are."""
        fixed = set(fixed)

        def gain(gid: int, k: int, k2: int) -> float | None:
            if gid in fixed:
                return None
            g = (value(gid, k) - value(gid, k2)) / (cost[gid] * (k2 - k))
            return g if g > 0 else None

        bounds = {gid: self._bounds(groups[gid], ctx) for gid in counts}
        return give_back(counts, bounds, gain, lambda c: meets(stats_for(c)))

    def _search_counts(self, graph: Graph, groups: ChannelGroups,
                       ranks: dict[int, tuple[list[int], list[float], torch.Tensor]], plans: dict[int, list[_Probe]],
                       ctx: PassContext, how: str, gradients: _Gradients | None
                       ) -> tuple[dict[int, int], str]:
        """Kept channels per group in search mode: the smallest model that meets the policy's budget and
        guard, and a line for the report.

        The candidates are one family of allocations, ordered from keep-everything to keep-the-minimum
        (`Ablation.allocation`):
        - `lagrange` (default): each group keeps argmin_k err_g(k) + λ·cost_g·k, where err_g is the
          group's prefix reconstruction error and cost_g the budget share one of its channels costs
          (measured by removing one channel on a copy); channels go where they buy the least error per
          FLOP/param. The family is indexed by log λ. err_g is weighted by how much of it reaches the
          model's outputs (`Ablation.sensitivity`): by default a first-order estimate of every group's
          output-error curve from a backward pass inside the statistics pass on the first 256 calibration
          samples (`_collect`, `_first_order`); as alternatives measured — each group alone squeezed to its
          count at the budget, the squared relative output error per unit of err_g on those samples
          (`sensitivity_rounds` re-measurements) — always (`output`) or while that costs at most
          `SENSITIVITY_PASSES` model passes over the data (`auto`, `_measure_cost`). With `search = measured`, err_g is instead the
          group's measured output-error curve: the group alone squeezed to up to 16 allowed counts, the
          squared relative output error on the leading batches (all measurements within 24 model passes,
          each from the tensors live at its group), linear between the points (`_curves`); it costs more
          compile time; on the benchmark ResNet it pays off with unrounded counts and is mixed when they are
          rounded to 8 (`benchmarks/results/squeeze-allocation.md`).
          The report's search line says which. After the bisection the budget its coarse steps leave
          unused is handed back (`_fill`).
        - `uniform`: one reconstruction-energy threshold for every group.
        1. Budget (flops/params/bytes): bisection for the largest candidate that meets it, every candidate's
           stats metered exactly (`allocation.Meter`). Without a guard this is the answer: the least
           reconstruction error the budget allows.
        2. Guard (`guard output error` / `guard top1 drop`, measured by the compiler through
           `ctx.fidelity_fn`): from step 1's candidate (keep-everything without a budget), bisection
           towards smaller candidates for the smallest one whose guard still holds, each squeezed on a
           copy with its parallel fold. When even step 1's candidate misses the guard, the budget and
           the guard cannot both hold: a BudgetError states what the guard reached there.
        """
        ab = _ABLATION.get()
        budget = Budget.of(ctx)
        guarded = self._guarded(ctx)
        base = graph_stats(ctx.original or graph)
        now = graph_stats(graph)
        stats_for = Meter(graph, groups, base, shifted=True, grouped_shifted=True, removable=_REMOVABLE.get())
        meets = budget.meets
        first_node = groups[next(iter(ranks))].producers[0] if groups[next(iter(ranks))].producers else None

        bounds = {gid: self._bounds(groups[gid], ctx) for gid in ranks}
        smallest = {gid: b.smallest for gid, b in bounds.items()}
        if budget and not meets(reached := stats_for(smallest)):
            raise budget.unreachable("squeeze_fold", "squeezing every group to its minimum", reached, first_node,
                                     Budget.unbounded(bounds, stats_for), held=(stats_for, smallest))
        family: Callable[[float], dict[int, int]]
        sens: dict[int, float] = dict.fromkeys(ranks, 1.0)
        curves: dict[int, dict[int, float]] = {}
        cost: dict[int, float] = {}

        taylor: dict[int, list[float]] = {}
        removed: set[int] = set()  # residual branches the removal search took out whole (`branches = remove`)

        def value(gid: int, k: int) -> float:
            """The error group `gid` contributes keeping k channels: a first-order or measured output-error
            curve, else its reconstruction error weighted by its sensitivity."""
            if gid in taylor:
                return taylor[gid][k]
            if gid not in curves:
                return sens[gid] * ranks[gid][1][k]
            pts = curves[gid]
            lo_k = max((q for q in pts if q <= k), default=min(pts))
            hi_k = min((q for q in pts if q >= k), default=max(pts))
            if hi_k == lo_k:
                return pts[lo_k]
            w = (k - lo_k) / (hi_k - lo_k)
            return (1 - w) * pts[lo_k] + w * pts[hi_k]

        if ab.allocation == "uniform":
            lo, hi, steps = -1.0, 0.0, 16  # t = −energy

            def family(t: float) -> dict[int, int]:
                return {gid: self._kept(groups[gid], ranks[gid], -t, ctx) for gid in ranks}
        else:
            weight = {k: 1.0 / v for k, v in budget.limits.items()} if budget else {"flops": 1.0, "params": 1.0}
            for gid in ranks:
                f1, p1, b1 = stats_for({gid: groups[gid].size - 1})
                delta = {"flops": now.flops / max(1, base.flops) - f1, "params": now.params / max(1, base.params) - p1,
                         "bytes": now.param_bytes / max(1, base.param_bytes) - b1}
                cost[gid] = sum(w * delta[k] for k, w in weight.items()) + 1e-12
            lo, hi, steps = -12.0, 6.0, 24  # t = log10 λ: small keeps everything, large keeps the minimum

            def family(t: float) -> dict[int, int]:
                out = {}
                for gid, (_, err, _) in ranks.items():
                    if gid in removed:  # a residual branch the removal search took out whole
                        out[gid] = 0
                        continue
                    best = min(range(1, len(err)), key=lambda k: value(gid, k) + 10**t * cost[gid] * k)
                    out[gid] = self._bounds(groups[gid], ctx).clamp(best)
                return out

        def budget_t() -> float:
            """The least squeezed candidate found that meets the budget (`hi` meets it: checked above)."""
            return bisect(hi, lo, lambda t: meets(stats_for(family(t))), steps)

        t_budget = budget_t() if budget else lo
        weighed = ""  # how the groups' errors were weighed, said after the final t
        if ab.allocation == "lagrange" and how == "curve":
            measured, n_samples = self._curves(graph, groups, ranks, plans, ctx)
            curves.update(measured)
            t_budget = budget_t() if budget else lo
            weighed += (f" after measuring output-error curves ({sum(len(c) - 1 for c in curves.values())} points "
                     f"on {n_samples:,} calibration samples)" if measured else
                     " (no output-error curves: this compile cannot measure the output error; reconstruction "
                     "errors unweighted)")
        if ab.allocation == "lagrange" and how == "first_order" and gradients is not None:
            taylor.update(self._first_order(ranks, plans, gradients))
            if taylor:
                t_budget = budget_t() if budget else lo
                weighed += (" after a first-order estimate of every group's output error (a backward pass in the "
                         "statistics pass)")
        elif ab.allocation == "lagrange" and how == "output" and ctx.fidelity_fn is not None:
            measured_at: dict[int, int] = {}

            @functools.cache
            def prefixes() -> tuple[dict[int, int], Prefixes]:
                start = first_positions(graph.topo_order(), (groups[g] for g in ranks))
                return start, Prefixes(graph, ctx, start.values(), self._sensitivity_batches(ctx))

            for _ in range(ab.sensitivity_rounds):
                sens.update(self._sensitivities(graph, groups, ranks, plans, family(t_budget), ctx, measured_at,
                                                prefixes))
                t_budget = budget_t() if budget else lo
            weighed += " after weighting groups by measured output sensitivity (" + ", ".join(
                f"{groups[g].producers[0] if groups[g].producers else g}: {v:.3g}" for g, v in sorted(sens.items())) + ")"
        # t: the uniform allocation's energy threshold (−t), or log10 of the Lagrange price λ of a unit of budget
        # in reconstruction error; the last one the budget search found, after the weighting
        line = (f"search ({ab.allocation}): "
                + (f"budget met at energy {-t_budget:.3g}" if ab.allocation == "uniform" else
                   f"budget met at λ = 10^{t_budget:.3g} (error per unit of budget)" if budget else
                   "no budget") + weighed)
        if not guarded or ctx.guard is None:
            if not budget or ab.allocation != "lagrange":
                return family(t_budget), line
            counts = self._fill(groups, family(t_budget), value, cost, stats_for, meets, ctx, removed)
            branches = [gid for gid in ranks if gid in _REMOVABLE.get()]
            if not branches or ctx.fidelity_fn is None:
                return counts, line

            def allocate() -> dict[int, int] | None:
                """The allocation with the branches in `removed` out, None when even the smallest misses the budget."""
                if not meets(stats_for(family(hi))):
                    return None
                return self._fill(groups, family(budget_t()), value, cost, stats_for, meets, ctx, removed)

            # Removing a branch is judged by measurement, not by the reconstruction-error estimate (which cannot see
            # the refit that follows it): greedily, cheapest estimated error per unit of cost first, a branch stays
            # out when the model written with it out (and the budget spent on the rest) has less output error.
            best = self._measured_error(graph, groups, ranks, plans, counts, ctx) if meets(stats_for(counts)) else None
            tried = [f"none out: {best:.3g}" if best is not None else "none out: over the budget"]
            taken: list[int] = []  # the branches taken out while the budget was still missed, in that order

            def measure(gid: int, move: str) -> tuple[dict[int, int], float] | None:
                """The allocation with the branches in `removed` out and its measured error (None: over the budget),
                logged in `tried` as `gid` `move`d."""
                got = allocate()
                e = None if got is None else self._measured_error(graph, groups, ranks, plans, got, ctx)
                tried.append(f"{groups[gid].producers[0]} {move}: " + (f"{e:.3g}" if e is not None else "over the budget"))
                return None if got is None or e is None else (got, e)

            for gid in sorted(branches, key=lambda g: (value(g, 0) / (cost[g] * groups[g].size), g)):
                removed.add(gid)
                m = measure(gid, "out")
                if m is not None and (best is None or m[1] < best):
                    counts, best = m
                elif m is not None or best is not None:
                    removed.discard(gid)  # worse; or the budget is met without it
                else:
                    taken.append(gid)
            # A branch taken out while the budget was missed may not be needed once a later one is out: each is
            # tried back in (the last taken first) and stays in when the budget still holds and the model measures
            # less output error with it (its channels then come from the same search)
            for gid in reversed(taken if best is not None else []):
                removed.discard(gid)
                m = measure(gid, "back")
                if m is not None and best is not None and m[1] < best:
                    counts, best = m
                else:
                    removed.add(gid)
            if best is None:
                raise budget.unreachable("squeeze_fold", "removing every residual branch the search tried",
                                         stats_for(counts), first_node)
            return counts, (f"{line}; branch removal measured (squared relative output error of the model as "
                            f"written, on the sensitivity batches): " + ", ".join(tried))
        metric, limit = ctx.guard
        seen: dict[tuple[tuple[int, int], ...], tuple[bool, float] | None] = {}

        def guard_at(t: float) -> tuple[bool, float] | None:
            counts = family(t)
            key = tuple(sorted(counts.items()))
            if key not in seen:
                seen[key] = ctx.guard_check(self._candidate(graph, groups, ranks, plans, counts))
            return seen[key]

        first = guard_at(t_budget)
        if first is None:  # the compiler cannot measure it (no eval_fn): compile() reports that
            return family(t_budget), line
        name = metric.replace("_", " ")
        if not first[0]:
            raise BudgetError(Diagnostic(
                f"squeeze_fold cannot meet guard {name} <= {percent(limit)}"
                + (f" within the budget {budget}" if budget else "")
                + f": the least squeezed candidate reaches {percent(first[1])}", node=first_node))
        end = guard_at(hi)
        if end is not None and end[0]:
            a = hi
        else:  # the smallest candidate found whose guard holds
            a = bisect(t_budget, hi, lambda t: (got := guard_at(t)) is not None and got[0], 14)
        final = guard_at(a)
        at = f"energy {-a:.3g}" if ab.allocation == "uniform" else f"λ = 10^{a:.3g}"
        return family(a), (f"{line}; guard {name} <= {percent(limit)}: smallest candidate meeting it at {at} "
                           f"({percent(final[1] if final else float('nan'))}, {len(seen)} candidates measured)")
