"""The measured latency budget: `budget latency <= 60%` or `latency <= 5 ms`, met on the emit target.

Passes never see latency: they search FLOPs. The compiler turns the latency target into a FLOPs budget with a
cost model fitted on this machine, then confirms every pipeline result by measurement, each timed side by side
with the original in one process (`compiler.latency.measure`). Two cost models:

- `per_kind` (the default): a per-op-kind model (`compiler.cost_model`: time per FLOP of each convolution
  kind, linear and matmul layer, time per byte moved of the memory-bound ops, a fixed cost), fitted by
  non-negative least squares on the original and channel-scaled variants of it (every prunable channel group
  at 75/50/25% of its channels, and each producer kind's groups alone at 50%), measured side by side before
  the first run. The FLOPs budget is read off the curve of predicted latency ratio against FLOPs ratio of
  uniformly scaled variants (costed by a dry run on shapes). Every measured run is added to the fit, and the
  next budget is read off the refitted curve shifted to pass through the last run (the pipeline's allocation
  is not uniform), at most halving or doubling its FLOPs; a budget the pipeline cannot reach is doubled.
- `line`: t = a + b·FLOPs fitted to the measured runs only (the original first, a = 0 for the first guess).

The pipeline reruns from the original until the measured latency meets the target; once a run met it and
another missed, the FLOPs budget is bisected between them, keeping the met run with the most FLOPs (at most
`MAX_ATTEMPTS` runs in all); the final model's latency is always the measured one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from netsqueeze.compiler.cost_model import CostModel, Work, fit_blocked, graph_works, op_kind
from netsqueeze.compiler.latency import Latency, Runtime, measure
from netsqueeze.compiler.pipeline import PipelineRun, Step, run_pipeline
from netsqueeze.errors import BudgetError, Diagnostic, NetsqueezeError, SourceSpan
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import node_flops
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.allocation import group_bounds, skeleton
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection

MAX_ATTEMPTS = 4
CostModelName = Literal["per_kind", "line"]
COST_MODELS: tuple[CostModelName, ...] = ("per_kind", "line")
VARIANT_KEEP = (0.75, 0.5, 0.25)  # channels kept in the uniformly scaled calibration variants
KIND_KEEP = 0.5  # channels kept in the variants that scale one producer kind's groups alone
CURVE_STEPS = 40  # uniformly scaled variants costed by shape along the FLOPs curve
STEP_LIMIT = (0.5, 2.0)  # a run's FLOPs budget stays within these factors of the last run's FLOPs
CLOSE = 0.9  # a met run at or above this fraction of the target latency is kept without refining
REFINE_GAP = 0.15  # stop refining once the met and the missed FLOPs are within 15% of each other
MARGIN = 0.95  # aim a little under the target: measurements of the same model vary by a few percent


@dataclass
class LatencyTarget:
    """What the policy asked: a ratio of the original's latency or an absolute time, and where to measure."""

    ratio: float | None
    seconds: float | None
    runtime: Runtime
    threads: int = 1
    batch: int | None = None
    span: SourceSpan | None = None
    rounds: int = 15
    cost_model: CostModelName = "per_kind"

    def describe(self) -> str:
        return f"{self.ratio:.0%} of the original" if self.ratio is not None else f"{(self.seconds or 0) * 1e3:.3g} ms"


@dataclass
class LatencyOutcome:
    original: Latency
    compressed: Latency
    target_s: float
    attempts: list[dict[str, float]] = field(default_factory=list)  # flops budget tried, flops reached, ms
    cost_model: str = "line"
    coefficients: str = ""  # the per-kind model's fitted coefficients, as the report shows them

    @property
    def ratio(self) -> float:
        return self.compressed.median_ms / self.original.median_ms


def timing_inputs(graph: Graph, batch: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the graph's, at `batch` (the example batch when None), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for nid in graph.inputs:
        meta = graph.node(nid).meta[0]
        shape = [int(d) for d in meta.shape]
        if batch is not None and shape:
            shape[0] = batch
        dtype = getattr(torch, meta.dtype, torch.float32)
        out.append(torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point
                   else torch.zeros(shape, dtype=dtype))
    return tuple(out)


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of t = a + b·F over (FLOPs, seconds) points; with one point, a = 0."""
    if len(points) == 1 or len({f for f, _ in points}) == 1:
        f, t = points[0]
        return 0.0, t / max(f, 1.0)
    n = len(points)
    mf = sum(f for f, _ in points) / n
    mt = sum(t for _, t in points) / n
    var = sum((f - mf) ** 2 for f, _ in points)
    b = sum((f - mf) * (t - mt) for f, t in points) / var
    b = max(b, 1e-18)  # time never falls with more FLOPs in this model
    return mt - b * mf, b


def _pair(target: LatencyTarget, original: Graph, graph: Graph, inputs: tuple[torch.Tensor, ...]) -> list[Latency]:
    return _measure(target, [original, graph], inputs)


def run_for_latency(original: Graph, steps: Sequence[Step], ctx: PassContext, target: LatencyTarget,
                    log: Callable[[str], None]) -> tuple[Graph, PipelineRun, LatencyOutcome]:
    """Runs the pipeline on copies of `original` until the measured latency meets `target`; raises
    BudgetError, located at the budget item, with the measured figures when it cannot."""
    if target.cost_model == "line":
        return _run_line(original, steps, ctx, target, log)
    return _run_per_kind(original, steps, ctx, target, log)


def _run_line(original: Graph, steps: Sequence[Step], ctx: PassContext, target: LatencyTarget,
              log: Callable[[str], None]) -> tuple[Graph, PipelineRun, LatencyOutcome]:
    inputs = timing_inputs(original, target.batch, ctx.seed)
    flops0 = graph_stats(original).flops
    base = _pair(target, original, original, inputs)[0]
    t0 = base.median_ms / 1e3
    goal = target.seconds if target.seconds is not None else (target.ratio or 1.0) * t0
    points: list[tuple[float, float]] = [(float(flops0), t0)]
    attempts: list[dict[str, float]] = []
    budget_ratio: float | None = 1.0 if goal >= t0 else min(1.0, goal * MARGIN / t0)  # met: the passes run at 100%
    graph: Graph = original
    run: Any = None
    lat: list[Latency] = [base, base]
    user_budget = dict(ctx.budget)
    best: tuple[float, Graph, Any, list[Latency]] | None = None  # the met run with the most FLOPs kept
    missed: tuple[float, float] | None = None  # the run that missed the target with the fewest FLOPs: (FLOPs, latency)
    for attempt in range(MAX_ATTEMPTS):
        graph, budget = _fresh_run(original, ctx, user_budget, budget_ratio)
        try:
            run = run_pipeline(graph, steps, ctx)
        except BudgetError as e:
            ctx.budget = user_budget
            raise _unreachable(target, e, budget_ratio, user_budget.get("flops")) from None
        lat = _pair(target, original, graph, inputs)
        flops = graph_stats(graph).flops
        now_flops = flops / max(1, flops0)
        # the ratio is the stable figure (timed side by side); the goal is rescaled to this round's original
        now_ratio = lat[1].median_ms / lat[0].median_ms
        attempts.append({"flops_budget": budget.get("flops", 1.0), "flops": now_flops, "ratio": now_ratio,
                         "ms": lat[1].median_ms})
        log(f"latency budget, run {attempt + 1}: FLOPs {now_flops:.1%} of the original, "
            f"measured {lat[1].median_ms:.3f} ms vs {lat[0].median_ms:.3f} ms ({now_ratio:.1%})")
        goal_ratio = goal / t0 if target.seconds is None else goal / (lat[0].median_ms / 1e3)
        if now_ratio <= goal_ratio:
            if best is None or now_flops > best[0]:
                best = (now_flops, graph, run, lat)
            if now_ratio >= CLOSE * goal_ratio:
                break  # close enough to the target
        elif missed is None or now_flops < missed[0]:
            missed = (now_flops, now_ratio)
        if best is not None:
            step = None if _repeated(attempts) else refine(best, missed, goal_ratio)
            if step is None:
                break
            budget_ratio = step
            continue
        points.append((float(flops), lat[1].median_ms / 1e3 * (t0 / (lat[0].median_ms / 1e3))))
        a, b = fit(points)
        want = (goal * MARGIN - a) / b
        # below the fitted fixed cost (want <= 0), or no lower than what just missed: the fit is noisy, so
        # halve what was reached instead of trusting it; the final measurement decides
        new_ratio = min(1.0, want / max(1, flops0)) if want > 0 else now_flops * 0.5
        if new_ratio >= now_flops:
            new_ratio = now_flops * 0.5
        budget_ratio = new_ratio
    ctx.budget = user_budget
    if best is None:
        raise _not_met(target, lat, inputs, len(attempts))
    _, graph, run, lat = best
    return graph, run, LatencyOutcome(lat[0], lat[1], goal, attempts)


def _fresh_run(original: Graph, ctx: PassContext, user_budget: dict[str, float],
               budget_ratio: float | None) -> tuple[Graph, dict[str, float]]:
    """A copy of `original` for the next run of the pipeline and the budget it runs under: the user's, its
    FLOPs limit lowered to `budget_ratio` (None: the user's alone), set on `ctx` with its analyses dropped."""
    budget = dict(user_budget)
    if budget_ratio is not None:
        user_flops = user_budget.get("flops")
        budget["flops"] = min(budget_ratio, user_flops) if user_flops is not None else budget_ratio
    ctx.invalidate(frozenset())
    ctx.budget = budget
    return original.copy(), budget


def _not_met(target: LatencyTarget, lat: Sequence[Latency], inputs: tuple[torch.Tensor, ...], runs: int) -> BudgetError:
    ratio = lat[1].median_ms / lat[0].median_ms
    return BudgetError(Diagnostic(
        f"budget latency <= {target.describe()} not met: measured {lat[1].median_ms:.3f} ms against "
        f"{lat[0].median_ms:.3f} ms for the original ({ratio:.1%}) on {target.runtime}, batch "
        f"{inputs[0].shape[0] if inputs else 1}, {target.threads} thread(s), after {runs} run(s) of "
        "the pipeline", span=target.span))


def _unreachable(target: LatencyTarget, e: BudgetError, budget_ratio: float | None,
                 user_flops: float | None) -> BudgetError:
    """The pass's BudgetError under the FLOPs limit the latency search chose (`budget_ratio`), as an error at the
    latency budget the user wrote; the user's own budget's failure (their FLOPs limit, or ours at 100%) as it is."""
    if budget_ratio is None or budget_ratio >= min(1.0, user_flops or 1.0):
        return e
    return BudgetError(Diagnostic(
        f"budget latency <= {target.describe()} not met: the passes cannot reach the FLOPs it needs ({budget_ratio:.1%} of the "
        f"original, chosen by the latency search): {e.diagnostics[0].message if e.diagnostics else e}",
        span=target.span))


def _batch_scale(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> float:
    """Timing batch over the graph's example batch: the work the shapes count scales by it."""
    if not graph.inputs or not inputs or not inputs[0].dim():
        return 1.0
    shape = graph.node(graph.inputs[0]).meta[0].shape
    return float(inputs[0].shape[0]) / max(1, int(shape[0])) if shape else 1.0


def _scaled_copy(graph: Graph, ctx: PassContext, keep: dict[int, float], groups: Any) -> Graph | None:
    """A copy of `graph` keeping the first ⌈keep·size⌉ channels (within the policy's bounds) of each group in
    `keep`; None when no group shrinks."""
    counts = {}
    for gid, r in keep.items():
        g = groups[gid]
        k = group_bounds(g, ctx).for_ratio(1.0 - r)
        if k < g.size:
            counts[gid] = k
    if not counts:
        return None
    out = graph.copy()
    apply_selection(out, groups, {gid: ChannelSelection(keep=list(range(k))) for gid, k in sorted(counts.items())})
    return out


def variants(original: Graph, ctx: PassContext) -> list[tuple[str, Graph]]:
    """Channel-scaled copies of `original`, real weights, for calibrating the cost model: every prunable
    channel group at each of `VARIANT_KEEP` of its channels, then (when the groups' producers are of more than
    one kind) each producer kind's groups alone at `KIND_KEEP`. The policy's bounds apply."""
    groups = find_groups(original)
    prunable = groups.prunable()
    out: list[tuple[str, Graph]] = []
    for r in VARIANT_KEEP:
        v = _scaled_copy(original, ctx, {g.id: r for g in prunable}, groups)
        if v is not None:
            out.append((f"every group at {r:.0%}", v))
    by_kind: dict[str, list[int]] = {}
    for g in prunable:
        kw = op_kind(original, original.node(g.producers[0])) if g.producers else None
        by_kind.setdefault(kw[0] if kw is not None else "other", []).append(g.id)
    if len(by_kind) > 1:
        for kind, ids in sorted(by_kind.items()):
            v = _scaled_copy(original, ctx, dict.fromkeys(ids, KIND_KEEP), groups)
            if v is not None:
                out.append((f"{kind} groups at {KIND_KEEP:.0%}", v))
    return out


def flops_curve(original: Graph, ctx: PassContext, scale: float = 1.0,
                steps: int = CURVE_STEPS) -> list[tuple[float, dict[int, Work]]]:
    """(FLOPs ratio, `graph_works`) of `original` with every prunable group uniformly scaled, at `steps` ratios
    of kept channels from 100% down, costed by a dry run on a shape-only skeleton; sorted by FLOPs."""
    groups = find_groups(original)
    prunable = groups.prunable()
    sk = skeleton(original)
    flops0 = max(1, graph_stats(original).flops)
    pts = [(1.0, graph_works(original, scale))]
    for i in range(1, steps):
        g = _scaled_copy(sk, ctx, {grp.id: 1.0 - i / steps for grp in prunable}, groups)
        if g is not None:
            pts.append((sum(node_flops(g, n) for n in g.nodes()) / flops0, graph_works(g, scale)))
    return sorted(pts, key=lambda p: p[0])


def _interp(curve: Sequence[tuple[float, float]], f: float) -> float:
    """The curve's value at FLOPs ratio `f`, linear between points, proportional below the first."""
    if f <= curve[0][0]:
        return curve[0][1] * f / max(curve[0][0], 1e-12)
    for (f1, r1), (f2, r2) in itertools.pairwise(curve):
        if f <= f2:
            return r1 + (r2 - r1) * (f - f1) / (f2 - f1 or 1.0)
    return curve[-1][1]


def _repeated(attempts: Sequence[Mapping[str, float]]) -> bool:
    """Whether the last run reached the FLOPs of an earlier one: the pipeline mapped its budget to a model it had
    built, so the bracket `refine` aims in is unchanged and the next aim would bring the same model again (with
    channel counts in blocks, budgets a block apart build the same model)."""
    return any(a["flops"] == attempts[-1]["flops"] for a in attempts[:-1])


def refine(best: tuple[float, Graph, Any, list[Latency]], missed: tuple[float, float] | None, goal_ratio: float
           ) -> float | None:
    """The next FLOPs budget once a run met the target (`best`: the met run with the most FLOPs, with its pair of
    latencies; `missed`: the missed run with the fewest, (FLOPs, latency ratio)), or None to stop: when the two are
    within REFINE_GAP, or `bracket_aim` sees no room. Between measured runs (or a met run and the original) the
    measurements decide, not a cost model: `per_kind`'s curve scales every group at once, so in a blocked runtime it
    climbs in steps that the pipeline's allocation, crossing blocks group by group, does not take (it saw no room
    above a first run far under the target, and a shift read off a step's edge sent a VGG-style search from 28.7%
    of the FLOPs at 35.3% of the latency to 41.2% at 60.8%, for 40%)."""
    met = (best[0], best[3][1].median_ms / best[3][0].median_ms)
    if missed is not None and missed[0] - met[0] <= REFINE_GAP * missed[0]:
        return None
    return bracket_aim(met, missed, goal_ratio * MARGIN)


def bracket_aim(met: tuple[float, float], missed: tuple[float, float] | None, want: float) -> float | None:
    """The next FLOPs budget after a run met the target well under it: where the line through the met run with
    the most FLOPs and the missed run with the fewest (`missed`; None: the original, (1, 1)), both (FLOPs ratio,
    latency ratio), reaches latency ratio `want` (false position). Kept within the middle half of a bracket of two
    runs, so every run narrows it; above a met run alone, at most STEP_LIMIT[1] x its FLOPs, and None when the
    line keeps less than REFINE_GAP / 2 more."""
    (f0, r0), (f1, r1) = met, missed or (1.0, 1.0)
    x = f0 + (want - r0) * (f1 - f0) / (r1 - r0) if r1 > r0 else (f0 + f1) / 2
    if missed is not None:
        quarter = (f1 - f0) / 4
        return min(max(x, f0 + quarter), f1 - quarter)
    x = min(x, f0 * STEP_LIMIT[1], 1.0)
    return x if x > f0 * (1 + REFINE_GAP / 2) else None


def pick_flops(curve: Sequence[tuple[float, float]], want: float) -> float:
    """The largest FLOPs ratio whose value on the curve ((FLOPs ratio, latency ratio) points sorted by FLOPs,
    linear between points) is at most `want`; proportional below the curve's first point."""
    if curve[-1][1] <= want:
        return curve[-1][0]
    for (f1, r1), (f2, r2) in reversed(list(itertools.pairwise(curve))):
        if r1 <= want:
            return f1 + (want - r1) * (f2 - f1) / (r2 - r1 or 1.0)
    return curve[0][0] * want / max(curve[0][1], 1e-12)


def _run_per_kind(original: Graph, steps: Sequence[Step], ctx: PassContext, target: LatencyTarget,
                  log: Callable[[str], None]) -> tuple[Graph, PipelineRun, LatencyOutcome]:
    inputs = timing_inputs(original, target.batch, ctx.seed)
    scale = _batch_scale(original, inputs)
    flops0 = max(1, graph_stats(original).flops)
    w0 = graph_works(original, scale)
    calib = variants(original, ctx)
    timed = _measure(target, [original, *[g for _, g in calib]], inputs)
    t0 = timed[0].median_ms / 1e3
    points: list[tuple[dict[int, Work], float]] = [(w0, t0)] + [
        (graph_works(g, scale), lat.median_ms / 1e3) for (_, g), lat in zip(calib, timed[1:])]
    model: CostModel = fit_blocked(points)
    log(f"latency cost model from the original and {len(calib)} variant(s) "
        f"({', '.join(name for name, _ in calib) or 'none'}): {model.describe()}")
    curve_work = flops_curve(original, ctx, scale)

    def curve(m: CostModel) -> list[tuple[float, float]]:
        p0 = max(m.predict(w0[m.block]), 1e-12)
        return [(f, m.predict(w[m.block]) / p0) for f, w in curve_work]

    goal = target.seconds if target.seconds is not None else (target.ratio or 1.0) * t0
    user_flops = ctx.budget.get("flops")
    user_budget = dict(ctx.budget)
    attempts: list[dict[str, float]] = []
    budget_ratio: float | None = 1.0 if goal >= t0 else min(1.0, pick_flops(curve(model), goal * MARGIN / t0))
    graph: Graph = original
    run: Any = None
    lat: list[Latency] = [timed[0], timed[0]]
    best: tuple[float, Graph, Any, list[Latency]] | None = None  # the met run with the most FLOPs kept
    missed: tuple[float, float] | None = None  # the run that missed the target with the fewest FLOPs: (FLOPs, latency)
    for attempt in range(MAX_ATTEMPTS):
        graph, budget = _fresh_run(original, ctx, user_budget, budget_ratio)
        try:
            run = run_pipeline(graph, steps, ctx)
        except BudgetError as e:
            # a FLOPs budget of ours below what the pipeline can reach: double it (a run spent), else the
            # user's own budget failed, which is theirs to see
            if budget_ratio is None or budget_ratio >= (user_flops or 1.0) or attempt == MAX_ATTEMPTS - 1:
                ctx.budget = user_budget
                raise _unreachable(target, e, budget_ratio, user_flops) from None
            log(f"latency budget, run {attempt + 1}: the pipeline cannot reach FLOPs {budget_ratio:.1%}")
            nan = float("nan")
            attempts.append({"flops_budget": budget_ratio, "flops": nan, "predicted": nan, "ratio": nan, "ms": nan})
            budget_ratio = min(1.0, 2 * budget_ratio, *([missed[0]] if missed is not None else []))
            continue
        work = graph_works(graph, scale)
        predicted = model.predict(work[model.block]) / max(model.predict(w0[model.block]), 1e-12)
        lat = _pair(target, original, graph, inputs)
        now_flops = graph_stats(graph).flops / flops0
        now_ratio = lat[1].median_ms / lat[0].median_ms
        attempts.append({"flops_budget": budget.get("flops", 1.0), "flops": now_flops, "predicted": predicted,
                         "ratio": now_ratio, "ms": lat[1].median_ms})
        log(f"latency budget, run {attempt + 1}: FLOPs {now_flops:.1%} of the original, predicted "
            f"{predicted:.1%}, measured {lat[1].median_ms:.3f} ms vs {lat[0].median_ms:.3f} ms ({now_ratio:.1%})")
        # the ratio is the stable figure (timed side by side); the goal is rescaled to this round's original
        goal_ratio = goal / t0 if target.seconds is None else goal / (lat[0].median_ms / 1e3)
        points.append((work, now_ratio * t0))
        model = fit_blocked(points)
        # the refitted curve of uniformly scaled variants, shifted to pass through this run: the pipeline's own
        # allocation of channels is not uniform, and the shift carries the difference to the next budget
        refitted = curve(model)
        shift = now_ratio - _interp(refitted, now_flops)
        aim = pick_flops([(f, r + shift) for f, r in refitted], goal_ratio * MARGIN)
        aim = min(max(aim, now_flops * STEP_LIMIT[0]), now_flops * STEP_LIMIT[1])
        if now_ratio <= goal_ratio:
            if best is None or now_flops > best[0]:
                best = (now_flops, graph, run, lat)
            if now_ratio >= CLOSE * goal_ratio or budget_ratio is None:
                break  # close enough to the target (or no FLOPs budget to raise)
        elif missed is None or now_flops < missed[0]:
            missed = (now_flops, now_ratio)
        if best is not None:
            step = None if _repeated(attempts) else refine(best, missed, goal_ratio)
            if step is None:
                break
            aim = step
        elif aim >= now_flops:
            aim = now_flops * 0.5  # the model sees no gain in fewer FLOPs: halve, the measurement decides
        budget_ratio = min(1.0, aim)
    ctx.budget = user_budget
    if best is None:
        raise _not_met(target, lat, inputs, len(attempts))
    _, graph, run, lat = best
    coefficients = model.describe()
    graph.meta["notes"] = [
        *graph.meta.get("notes", []),
        f"latency cost model (per op kind, {target.runtime}, batch {inputs[0].shape[0] if inputs else 1}): "
        f"{coefficients}",
        "latency budget runs (FLOPs: predicted -> measured latency, of the original): " + ", ".join(
            f"{x['flops']:.1%}: {x['predicted']:.1%} -> {x['ratio']:.1%}" if not math.isnan(x["ratio"])
            else f"budget {x['flops_budget']:.1%}: not reachable" for x in attempts)]
    return graph, run, LatencyOutcome(lat[0], lat[1], goal, attempts, "per_kind", coefficients)


def _measure(target: LatencyTarget, graphs: Sequence[Graph], inputs: tuple[torch.Tensor, ...],
             purpose: str = "the latency budget") -> list[Latency]:
    try:
        return measure(list(graphs), inputs, runtime=target.runtime, threads=target.threads, rounds=target.rounds)
    except NetsqueezeError:
        raise
    except Exception as e:
        raise NetsqueezeError(Diagnostic(
            f"cannot time the models on {target.runtime} at batch {inputs[0].shape[0] if inputs else '?'} for "
            f"{purpose}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            span=target.span)) from e


def runtime_latency(resolved: Any, emit_target: str, original: Graph, graph: Graph, seed: int
                    ) -> tuple[Latency, Latency] | None:
    """(original, compressed): both models' latency, timed side by side where the model is emitted to (as
    `latency_target`) at the policy's `runtime { threads, batch }`, for a policy that declares a runtime without
    a latency budget: the report shows what the params and FLOPs it reached buy there. None without a runtime
    block, or with a latency budget (that measures its own)."""
    rt = resolved.runtime
    if not rt or latency_target(resolved, emit_target) is not None:
        return None
    target = LatencyTarget(ratio=None, seconds=None, runtime="ort" if emit_target == "onnx" else "torch",
                           threads=int(rt.get("threads") or 1), batch=rt.get("batch"))
    inputs = timing_inputs(original, target.batch, seed)
    before, after = _measure(target, [original, graph], inputs, "the runtime block's latency report")
    return before, after


def latency_target(resolved: Any, emit_target: str) -> LatencyTarget | None:
    """The policy's latency budget (from the compiler's resolved policy), measured where the model is emitted
    to: ONNX Runtime's CPU provider for an ONNX target, torch eager otherwise. None without one."""
    ratio = resolved.budget.get("latency")
    seconds = resolved.budget_absolute.get("latency")
    if ratio is None and seconds is None:
        return None
    rt = resolved.runtime
    return LatencyTarget(ratio=ratio, seconds=seconds, runtime="ort" if emit_target == "onnx" else "torch",
                         threads=int(rt.get("threads") or 1), batch=rt.get("batch"),
                         span=resolved.budget_spans.get("latency"), cost_model=rt.get("cost_model") or "per_kind")
