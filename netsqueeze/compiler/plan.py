"""Resolves a checked policy against a model: selectors to node sets, options to pass instances, a `Plan`.

Overlapping rules: invocations of the same pass that follow each other in the pipeline form
one rule set; each node goes to the most specific rule that selects it (see `selectors`), and
at equal specificity to the first in source order when their options agree. Equal
specificity with different options is an error. Invocations of a pass that are not adjacent
run one after the other, each on everything it selects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netsqueeze.dsl import ast
from netsqueeze.dsl.checker import (
    BOUNDS_KEYS,
    BUDGET_METRICS,
    CALIBRATE_KEYS,
    GUARD_METRICS,
    RUNTIME_KEYS,
    PassSchema,
    run_checker,
    sort_diagnostics,
)
from netsqueeze.dsl.parser import load_policy
from netsqueeze.dsl.schema import check_options, schema_from_dataclass
from netsqueeze.dsl.schema import type_desc as type_desc  # re-exported
from netsqueeze.errors import Diagnostic, PolicyError, SourceSpan
from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import Pass, install_option_check

from .cost_model import cpu_block
from .selectors import ALL, SPECIFICITY_NAMES, SelectorEvaluator

InputDecl = ast.InputDecl

# passes built from Python are checked as the policy checker checks them (passes cannot import dsl)
install_option_check(check_options)


# ---- schemas from pass dataclasses ---------------------------------------------------------------
def schema_from_pass(cls: type[Pass]) -> PassSchema:
    """The checker's view of a pass: its init fields with types, defaults, docs, ranges and units
    (see `dsl.schema.schema_from_dataclass`)."""
    return schema_from_dataclass(cls)


def schemas_of(passes: Mapping[str, type[Pass]]) -> dict[str, PassSchema]:
    return {name: schema_from_pass(cls) for name, cls in passes.items()}


# ---- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Guard:
    metric: str  # "output_error" | "top1_drop"
    limit: float  # a ratio: 0.02 = 2%
    # the `guard ...` statement, for a located error when the compiled model misses the limit
    span: SourceSpan | None = field(default=None, compare=False)


@dataclass
class PlanStep:
    pass_name: str
    instance: Pass
    selected: frozenset[str] | None  # None: no `on` clause, the pass decides
    span: SourceSpan
    source_line: str
    # node -> spans of the less specific rules of the same pass that this step won it from
    overrides: dict[str, tuple[SourceSpan, ...]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.span.file}:{self.span.line}"


@dataclass
class Plan:
    policy_name: str
    steps: list[PlanStep]
    budget: dict[str, float] = field(default_factory=dict)
    # metric -> the `budget` item that set it (`flops <= 50%`), for located budget errors
    budget_spans: dict[str, SourceSpan] = field(default_factory=dict)
    bounds: dict[str, Any] = field(default_factory=dict)
    guard: Guard | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputDecl] = field(default_factory=list)
    policy_hash: str = ""
    # budget items the policy gave in absolute units, in base units (params/FLOPs count, bytes, seconds);
    # `budget` holds their ratio of the original model (latency's only once measured, by the compiler)
    budget_absolute: dict[str, float] = field(default_factory=dict)
    # `runtime { threads, batch }`: where a latency budget is measured
    runtime: dict[str, Any] = field(default_factory=dict)
    # (block, instruction set) that `align = auto` stood for (`cost_model.cpu_block`), when a bounds said it
    align_auto: tuple[int, str] | None = None

    def to_text(self) -> str:
        """The resolved plan, deterministic: for the report and the ONNX metadata."""
        out = [f"# plan for policy {self.policy_name} (sha256 {self.policy_hash})"]
        out += [i.to_text() for i in self.inputs]
        if self.calibration:
            out.append("calibrate " + ", ".join(f"{k}={v!r}" for k, v in self.calibration.items()))
        if self.budget or self.budget_absolute:
            items = {**self.budget, **{k: v for k, v in self.budget_absolute.items() if k not in self.budget}}
            out.append("budget " + ", ".join(
                f"{k}<={_num(v)}" + (f" ({_num(self.budget_absolute[k])} absolute)" if k in self.budget_absolute
                                     and k in self.budget else " (absolute)" if k in self.budget_absolute else "")
                for k, v in items.items()))
        if self.runtime:
            out.append("runtime " + ", ".join(f"{k}={v!r}" for k, v in self.runtime.items()))
        if self.align_auto is not None:
            out.append(f"# align = auto: {self.align_auto[0]}, the channel block of ONNX Runtime's CPU convolutions "
                       f"on this {self.align_auto[1]} CPU")
        if self.bounds:
            glob = {k: v for k, v in self.bounds.items() if k != "per_node"}
            if glob:
                out.append("bounds " + ", ".join(f"{k}={v!r}" for k, v in glob.items()))
            for node, b in self.bounds.get("per_node", {}).items():
                out.append(f"bounds {node}: " + ", ".join(f"{k}={v!r}" for k, v in b.items()))
        if self.guard is not None:
            out.append(f"guard {self.guard.metric}<={_num(self.guard.limit)}")
        for i, s in enumerate(self.steps, 1):
            on = "" if s.selected is None else f" on [{', '.join(sorted(s.selected))}]"
            out.append(f"{i}. {format_instance(s.instance)}{on}  # {s.where}")
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return f"{v:.6g}"


def format_instance(p: Pass) -> str:
    opts = ", ".join(f"{f.name}={getattr(p, f.name)!r}" for f in dataclasses.fields(p) if f.init)
    return f"{type(p).name}({opts})"


# ---- resolution ----------------------------------------------------------------------------------
class _Resolver:
    def __init__(self, policy: ast.Policy, graph: Graph, passes: Mapping[str, type[Pass]]) -> None:
        self.policy = policy
        self.graph = graph
        self.passes = passes
        self.schemas = schemas_of(passes)
        self.checker, self.diags = run_checker(policy, self.schemas)
        self.sel = SelectorEvaluator(graph, self.checker.env)

    def select(self, sel: ast.Selector, expect: ast.Expect | None) -> dict[str, int]:
        """Matches of `sel`; reports names that match nothing unless `expect` admits zero."""
        self.sel.misses = []
        n_hard, n_poisoned = len(self.sel.diags), self.sel.poisoned
        m = self.sel.evaluate(sel)
        hard = self.sel.diags[n_hard:]
        self.diags += hard
        allow_zero = expect is not None and expect.admits(0)
        if self.sel.poisoned > n_poisoned:
            pass  # the checker already reported why this selector is wrong
        elif not allow_zero:
            self.diags += self.sel.misses
            if not m and not self.sel.misses and not hard:
                self.diags.append(Diagnostic(
                    f"selector '{sel.to_text()}' matches no node (add 'expect 0..' if that is intended)",
                    span=sel.span))
        empty_range = expect is not None and expect.high is not None and expect.high < expect.low
        if expect is not None and m and not expect.admits(len(m)) and not empty_range:
            rng = expect.to_text().removeprefix("expect ")
            self.diags.append(Diagnostic(
                f"selector '{sel.to_text()}' matches {len(m)} node{'s' if len(m) != 1 else ''}, expected {rng}",
                span=sel.span, notes=(f"matched: {', '.join(list(m)[:8])}{', ...' if len(m) > 8 else ''}",)))
        elif expect is not None and not m and not expect.admits(0):
            pass  # already reported as a miss
        return m

    def run(self) -> Plan:
        invs = self.policy.invocations
        matches: list[dict[str, int] | None] = []
        options: list[dict[str, Any]] = []
        for inv in invs:
            matches.append(self.select(inv.selector, inv.expect) if inv.selector is not None else None)
            schema = self.schemas.get(inv.pass_name)
            options.append(self.checker.option_values(inv, schema) if schema is not None else {})
        selected = self._assign(invs, matches, options)
        steps: list[PlanStep] = []
        for inv, opts, (sel, overrides) in zip(invs, options, selected):
            cls = self.passes.get(inv.pass_name)
            if cls is None or self.diags:
                continue  # the policy is rejected anyway; a half-checked instance would only add noise
            try:
                inst = cls(**opts)
            except Exception as e:  # a pass's own validation (__post_init__) rejecting the options
                self.diags.append(Diagnostic(f"pass '{inv.pass_name}' rejected its options: {e}", span=inv.name_span))
                continue
            steps.append(PlanStep(inv.pass_name, inst, sel, inv.span, inv.span.source_line() or inv.to_text(),
                                  overrides))
        plan = Plan(self.policy.name, steps, policy_hash=self.policy.hash(), inputs=list(self.policy.inputs))
        self._statements(plan)
        if self.diags:
            raise PolicyError(sort_diagnostics(_dedupe(self.diags)))
        return plan

    def _assign(
        self, invs: Sequence[ast.Invocation], matches: list[dict[str, int] | None], options: list[dict[str, Any]]
    ) -> list[tuple[frozenset[str] | None, dict[str, tuple[SourceSpan, ...]]]]:
        out: list[tuple[frozenset[str] | None, dict[str, tuple[SourceSpan, ...]]]] = []
        i = 0
        all_ops = {n: ALL for n in self.sel.ops}
        while i < len(invs):
            j = i
            while j + 1 < len(invs) and invs[j + 1].pass_name == invs[i].pass_name:
                j += 1
            group = list(range(i, j + 1))
            if len(group) == 1:
                m = matches[i]
                out.append((None if m is None else frozenset(m), {}))
                i = j + 1
                continue
            owned: dict[int, set[str]] = {k: set() for k in group}
            overrides: dict[int, dict[str, tuple[SourceSpan, ...]]] = {k: {} for k in group}
            conflicts: dict[tuple[int, int], list[str]] = {}
            nodes: dict[str, list[tuple[int, int]]] = {}
            for k in group:
                mk = matches[k]
                for n, s in (mk if mk is not None else all_ops).items():
                    nodes.setdefault(n, []).append((s, k))
            for n in sorted(nodes, key=lambda n: self.sel.pos[n]):
                cands = nodes[n]
                best = max(s for s, _ in cands)
                winners = [k for s, k in cands if s == best]
                first = winners[0]
                for k in winners[1:]:
                    if options[k] != options[first]:
                        conflicts.setdefault((first, k), []).append(n)
                owned[first].add(n)
                losers = tuple(invs[k].span for s, k in cands if s < best)
                if losers:
                    overrides[first][n] = losers
            for (a, b), ns in conflicts.items():
                sa = matches[a] or {}
                level = SPECIFICITY_NAMES[sa.get(ns[0], ALL)]
                shown = ", ".join(f"'{n}'" for n in ns[:4]) + (", ..." if len(ns) > 4 else "")
                span = (invs[b].selector or invs[b]).span
                self.diags.append(Diagnostic(
                    f"'{invs[b].pass_name}' rules of equal specificity ({level}) with different options both "
                    f"select {shown}; make one more specific or exclude the nodes with 'except'",
                    span=span, notes=(f"the other rule is at {invs[a].span}",)))
            for k in group:
                out.append((frozenset(owned[k]), overrides[k]))
            i = j + 1
        return out

    def _original_total(self, metric: str) -> int:
        """The model's total params, FLOPs (per sample: `stats.example_batch`) or weight bytes, that an absolute
        budget is a ratio of."""
        from netsqueeze.ir.stats import example_batch, graph_stats

        st = graph_stats(self.graph)
        return {"params": st.params, "flops": st.flops // example_batch(self.graph), "bytes": st.param_bytes,
                "nonzeros": st.nonzeros}[metric]

    def _statements(self, plan: Plan) -> None:
        conv = self.checker.convert
        per_node: dict[str, dict[str, tuple[int, Any, ast.Bounds]]] = {}
        for s in self.policy.body:
            try:
                if isinstance(s, ast.Calibrate):
                    for o in s.settings:
                        if o.key in CALIBRATE_KEYS:
                            plan.calibration[o.key] = conv(o.value, CALIBRATE_KEYS[o.key], o.key)
                elif isinstance(s, ast.Budget):
                    for item in s.items:
                        if item.metric in BUDGET_METRICS:
                            absolute, value = self.checker.budget_value(item.metric, item.value)
                            plan.budget_spans[item.metric] = _through(item.span, item.value.span)
                            if not absolute:
                                plan.budget[item.metric] = value
                                continue
                            plan.budget_absolute[item.metric] = value
                            if item.metric != "latency":  # the passes see a ratio of the original
                                plan.budget[item.metric] = min(1.0, value / max(1, self._original_total(item.metric)))
                elif isinstance(s, ast.Runtime):
                    for o in s.settings:
                        if o.key in RUNTIME_KEYS:
                            plan.runtime[o.key] = conv(o.value, RUNTIME_KEYS[o.key], o.key)
                elif isinstance(s, ast.Guard) and s.metric in GUARD_METRICS:
                    plan.guard = Guard(s.metric, float(conv(s.value, GUARD_METRICS[s.metric], s.metric)),
                                       span=_through(s.span, s.value.span))
                elif isinstance(s, ast.Bounds):
                    vals = {o.key: conv(o.value, BOUNDS_KEYS[o.key], o.key) for o in s.options if o.key in BOUNDS_KEYS}
                    if vals.get("align") == "auto":  # the block of the runtime the model is compiled for
                        plan.align_auto = cpu_block()
                        vals["align"] = plan.align_auto[0]
                    if s.selector is None:
                        plan.bounds.update(vals)
                        continue
                    for n, spec in self.select(s.selector, None).items():
                        slot = per_node.setdefault(n, {})
                        for k, v in vals.items():
                            prev = slot.get(k)
                            if prev is None or spec > prev[0]:
                                slot[k] = (spec, v, s)
                            elif spec == prev[0] and v != prev[1]:
                                self.diags.append(Diagnostic(
                                    f"bounds of equal specificity ({SPECIFICITY_NAMES[spec]}) give '{k}' two values "
                                    f"for node '{n}'", span=s.span, notes=(f"the other bounds are at {prev[2].span}",)))
            except Exception:
                continue  # already reported by the checker
        if per_node:
            plan.bounds["per_node"] = {
                n: {k: v for k, (_, v, _) in slot.items()}
                for n, slot in sorted(per_node.items(), key=lambda kv: self.sel.pos[kv[0]])
            }


def _through(start: SourceSpan, end: SourceSpan) -> SourceSpan:
    """The span from `start` to the end of `end` (a whole `flops <= 50%`), or `start` if `end` is elsewhere."""
    if end.file != start.file or end.end_col is None:
        return start
    return SourceSpan(start.file, start.line, start.col, end.end_line or end.line, end.end_col, start.text)


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen: set[tuple[str, str]] = set()
    out = []
    for d in diags:
        key = (d.message, str(d.span))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def resolve(policy: ast.Policy, graph: Graph, passes: Mapping[str, type[Pass]]) -> Plan:
    """Checks `policy`, resolves its selectors on `graph` and builds the pass instances.

    Raises `PolicyError` with every diagnostic (checker and model-dependent) at once.
    """
    return _Resolver(policy, graph, passes).run()


# ---- explain and check ---------------------------------------------------------------------------
def explain(plan: Plan, graph: Graph) -> str:
    """Per node, the passes that will touch it, their options, and the policy line that decided it."""
    lines = [f"policy {plan.policy_name} (sha256 {plan.policy_hash[:16]})"]
    whole = [(i, s) for i, s in enumerate(plan.steps, 1) if s.selected is None]
    if whole:
        lines.append("whole graph (no 'on': the pass decides which nodes it touches):")
        lines += [f"  {i}. {format_instance(s.instance)}  [{s.where}]" for i, s in whole]
    lines.append("per node:")
    for node in graph.nodes():
        if node.kind in ("input", "output"):
            continue
        lines.append(f"  {node.id} ({node.kind})")
        touched = False
        for i, s in enumerate(plan.steps, 1):
            if s.selected is None or node.id not in s.selected:
                continue
            touched = True
            extra = ""
            if node.id in s.overrides:
                extra = " over " + ", ".join(f"{sp.file}:{sp.line}" for sp in s.overrides[node.id])
            lines.append(f"    {i}. {format_instance(s.instance)}  [{s.where}{extra}]")
        if not touched:
            lines.append("    -")
    return "\n".join(lines) + "\n"


def check_file(
    path: str | Path, graph: Graph | None = None, passes: Mapping[str, type[Pass]] | None = None
) -> list[Diagnostic]:
    """Every diagnostic for a policy file (parse, check, and with `graph` also resolution); [] if clean."""
    if passes is None:
        from netsqueeze.passes.registry import all_passes

        passes = all_passes()
    try:
        policy = load_policy(path)
        if graph is None:
            _, diags = run_checker(policy, schemas_of(passes))
            return sort_diagnostics(diags)
        resolve(policy, graph, passes)
    except PolicyError as e:
        return list(e.diagnostics)
    return []
