"""The pass manager: runs a pipeline, verifies after every pass, records time and changes per pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from netsqueeze.errors import PASS_ERRORS, Diagnostic, NetsqueezeError, PassError, SourceSpan
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import GraphStats, graph_stats
from netsqueeze.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class Step:
    """One pipeline entry: a pass instance, the nodes its `on` clause selected, and where it was written."""

    instance: Pass
    selected: frozenset[str] | None = None
    where: str = ""  # "policy.sqz:7" for policy steps, "" for Python-built pipelines
    span: SourceSpan | None = None  # the invocation in the policy: errors without a place of their own get it


@dataclass
class PassRecord:
    """What one pass did: time, result, and the graph statistics before and after it."""

    name: str
    options: str
    where: str
    seconds: float
    result: PassResult
    before: GraphStats
    after: GraphStats

    def changed_nodes(self) -> list[str]:
        """Nodes whose shapes, params or FLOPs differ, plus added and removed nodes, in a stable order."""
        b, a = self.before.nodes, self.after.nodes
        out = [n for n in b if n not in a or b[n] != a[n]]
        out += [n for n in a if n not in b]
        return out


@dataclass
class PipelineRun:
    records: list[PassRecord] = field(default_factory=list)


def _describe(p: Pass) -> str:
    opts = [f"{f.name}={getattr(p, f.name)!r}" for f in p.options()]
    return ", ".join(opts)


def run_pipeline(graph: Graph, steps: Sequence[Step | Pass], ctx: PassContext,
                 on_exact: Callable[[Graph], None] | None = None,
                 on_pass: Callable[[Pass, bool], None] | None = None) -> PipelineRun:
    """Runs `steps` on `graph` in place. Each pass is followed by `graph.verify()`. `on_exact` is called with
    the graph after each pass that changed it while every change so far came from `exact` passes (the graph
    still computes the input graph's function, rounding apart); `on_pass` after every pass, with the pass and
    whether it changed the graph.

    A failure is re-raised as `PassError` naming the failing pass, where it was written and
    the passes that ran before it; a `NetsqueezeError`'s own diagnostics are kept, and so is its kind (a budget,
    user code, non-finite data or mismatched input error is also a `PassBudgetError`, `PassUserCodeError`, ...).
    """
    run = PipelineRun()
    done: list[str] = []
    exact_so_far = True
    stats = graph_stats(graph)
    for raw in steps:
        step = raw if isinstance(raw, Step) else Step(raw)
        p = step.instance
        if not isinstance(p, Pass):
            raise PassError(f"pipeline entry {p!r} is not a Pass instance")
        label = f"pass '{p.name}'" + (f" ({step.where})" if step.where else "")
        before_txt = "passes run before it: " + (", ".join(done) if done else "none")
        t0 = time.perf_counter()
        try:
            result = p.run(graph, ctx.with_selection(step.selected))
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, expected PassResult")
            graph.verify()
        except NetsqueezeError as e:
            diags = [
                Diagnostic(f"{label} failed: {d.message}", d.severity, d.span or step.span, d.node,
                           (*d.notes, before_txt))
                for d in e.diagnostics
            ]
            kind = next((located for cause, located in PASS_ERRORS if isinstance(e, cause)), PassError)
            err = kind(diags)
            for note in getattr(e, "__notes__", ()):  # e.g. the user's traceback from an eval_fn
                err.add_note(note)
            raise err from e
        except Exception as e:
            raise PassError(Diagnostic(f"{label} failed: {type(e).__name__}: {e}", span=step.span,
                                       notes=(before_txt,))) from e
        seconds = time.perf_counter() - t0
        ctx.invalidate(p.preserves if result.changed else None)
        if result.changed:
            exact_so_far = exact_so_far and p.exact
            if exact_so_far and on_exact is not None:
                on_exact(graph)
        if on_pass is not None:
            on_pass(p, result.changed)
        after = graph_stats(graph)
        run.records.append(PassRecord(p.name, _describe(p), step.where, seconds, result, stats, after))
        stats = after
        done.append(p.name)
    return run
