"""The measured latency budget: `budget latency <= 60%` or `latency <= 5 ms`, met on the emit target.

Passes never see latency: they search FLOPs. The compiler turns the latency target into a FLOPs budget with a
cost model fitted on this machine, t ≈ a + b·FLOPs (a: the fixed cost of running any graph, b: the time per
FLOP), from real measurements: the original model first (a = 0 for the first guess), then every pipeline
result, each timed side by side with the original in one process (`compiler.latency.measure`). The pipeline
reruns from the original with the refitted FLOPs budget until the measured latency meets the target, then
bisects the FLOPs budget between the run that met it and the one that missed it, keeping the met run with the
most FLOPs (at most `MAX_ATTEMPTS` runs in all); the final model's latency is always the measured one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from netsqueeze.compiler.latency import Latency, Runtime, measure
from netsqueeze.compiler.pipeline import PipelineRun, Step, run_pipeline
from netsqueeze.errors import BudgetError, Diagnostic, NetsqueezeError, SourceSpan
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext

MAX_ATTEMPTS = 4
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

    def describe(self) -> str:
        return f"{self.ratio:.0%} of the original" if self.ratio is not None else f"{(self.seconds or 0) * 1e3:.3g} ms"


@dataclass
class LatencyOutcome:
    original: Latency
    compressed: Latency
    target_s: float
    attempts: list[dict[str, float]] = field(default_factory=list)  # flops budget tried, flops reached, ms

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
    try:
        return measure([original, graph], inputs, runtime=target.runtime, threads=target.threads,
                       rounds=target.rounds)
    except NetsqueezeError:
        raise
    except Exception as e:
        raise NetsqueezeError(Diagnostic(
            f"cannot time the models on {target.runtime} at batch {inputs[0].shape[0] if inputs else '?'} for the "
            f"latency budget: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            span=target.span)) from e


def run_for_latency(original: Graph, steps: Sequence[Step], ctx: PassContext, target: LatencyTarget,
                    log: Callable[[str], None]) -> tuple[Graph, PipelineRun, LatencyOutcome]:
    """Runs the pipeline on copies of `original` until the measured latency meets `target`; raises
    BudgetError, located at the budget item, with the measured figures when it cannot."""
    inputs = timing_inputs(original, target.batch, ctx.seed)
    flops0 = graph_stats(original).flops
    base = _pair(target, original, original, inputs)[0]
    t0 = base.median_ms / 1e3
    goal = target.seconds if target.seconds is not None else (target.ratio or 1.0) * t0
    user_flops = ctx.budget.get("flops")
    points: list[tuple[float, float]] = [(float(flops0), t0)]
    attempts: list[dict[str, float]] = []
    budget_ratio: float | None = None if goal >= t0 else min(1.0, goal * MARGIN / t0)
    graph: Graph = original
    run: Any = None
    lat: list[Latency] = [base, base]
    user_budget = dict(ctx.budget)
    best: tuple[float, Graph, Any, list[Latency]] | None = None  # the met run with the most FLOPs kept
    missed: float | None = None  # the fewest FLOPs (ratio) a run missed the target with
    for attempt in range(MAX_ATTEMPTS):
        graph = original.copy()
        budget = dict(user_budget)
        if budget_ratio is not None:
            budget["flops"] = min(budget_ratio, user_flops) if user_flops is not None else budget_ratio
        ctx.invalidate(frozenset())
        ctx.budget = budget
        run = run_pipeline(graph, steps, ctx)
        lat = _pair(target, original, graph, inputs)
        flops = graph_stats(graph).flops
        now_flops = flops / max(1, flops0)
        # the ratio is the stable figure (timed side by side); the goal is rescaled to this round's original
        now_ratio = lat[1].median_ms / lat[0].median_ms
        attempts.append({"flops_budget": budget.get("flops", 1.0), "flops": now_flops, "ratio": now_ratio,
                         "ms": lat[1].median_ms})
        log(f"latency budget, run {attempt + 1}: FLOPs {now_flops:.1%} of the original, "
            f"measured {lat[1].median_ms:.3f} ms vs {lat[0].median_ms:.3f} ms ({now_ratio:.1%})")
        goal_now = goal if target.seconds is not None else (target.ratio or 1.0) * lat[0].median_ms / 1e3
        if lat[1].median_ms / 1e3 <= goal_now:
            if best is None or now_flops > best[0]:
                best = (now_flops, graph, run, lat)
            if missed is None or (missed - best[0]) <= REFINE_GAP * missed:
                break  # met at the first try, or close enough to the FLOPs that missed
            budget_ratio = (best[0] + missed) / 2  # keep more of the model: bisect towards the miss
            continue
        missed = now_flops if missed is None else min(missed, now_flops)
        if best is not None:
            if (missed - best[0]) <= REFINE_GAP * missed:
                break
            budget_ratio = (best[0] + missed) / 2
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
        ratio = lat[1].median_ms / lat[0].median_ms
        raise BudgetError(Diagnostic(
            f"budget latency <= {target.describe()} not met: measured {lat[1].median_ms:.3f} ms against "
            f"{lat[0].median_ms:.3f} ms for the original ({ratio:.1%}) on {target.runtime}, batch "
            f"{inputs[0].shape[0] if inputs else 1}, {target.threads} thread(s), after {len(attempts)} run(s) of "
            "the pipeline", span=target.span))
    _, graph, run, lat = best
    return graph, run, LatencyOutcome(lat[0], lat[1], goal, attempts)


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
                         span=resolved.budget_spans.get("latency"))
