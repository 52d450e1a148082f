"""Evaluates policy selectors on an IR graph: the matched node ids, each with the specificity that matched it.

Specificity (higher wins when rules of the same pass overlap):
  4 exact   — a node id (`conv1`, `"0"`), `first(S)`, `last(S)`
  3 pattern — a glob, `re"..."`, `consumers(S)`, `producers(S)`, `between(A, B)`
  2 filter  — `type(...) where ...` (a `where` lifts `type` and `all` by one level)
  1 type    — `type(...)`
  0 all     — `all`, or no `on` clause
`A | B` gives each node the specificity of the most specific branch that matched it,
`A & B` the higher of the two, `A except B` that of `A`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from netsqueeze.dsl import ast
from netsqueeze.dsl.checker import Env
from netsqueeze.errors import Diagnostic, did_you_mean
from netsqueeze.ir import weights
from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.ops import OPS

EXACT, PATTERN, FILTER, TYPE, ALL = 4, 3, 2, 1, 0
SPECIFICITY_NAMES = {EXACT: "exact name", PATTERN: "pattern", FILTER: "type filter", TYPE: "type", ALL: "all"}

Match = dict[str, int]  # node id -> specificity, in topological order

_NOT_OPS = ("input", "output")


def node_attributes(node: Node) -> dict[str, Any]:
    """The attributes a `where` filter sees: the node's attrs plus values derived from param shapes."""
    out: dict[str, Any] = {"kind": node.kind}
    for k, v in node.attrs.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    select = OPS[node.kind].select if node.kind in OPS else None
    if select is not None:
        out.update(select(node))
    w = node.params.get("weight")
    if w is not None:
        out["weight_form"] = weights.describe(w) if weights.form_of(w) != "dense" else "dense"
    out["params"] = sum(int(p.numel()) for p in node.params.values())
    return out


def _cmp(a: Any, op: str, b: Any) -> bool:
    if isinstance(a, tuple) and not isinstance(b, tuple):
        # a scalar compared with a tuple attribute (kernel == 3) must hold for every element
        return bool(a) and all(_cmp(x, op, b) for x in a)
    try:
        if op == "==":
            return bool(a == b)
        if op == "!=":
            return bool(a != b)
        if op == "<":
            return bool(a < b)
        if op == "<=":
            return bool(a <= b)
        if op == ">":
            return bool(a > b)
        return bool(a >= b)
    except TypeError:
        return False


def _py(v: ast.Value) -> Any:
    if isinstance(v, ast.Number):
        return v.magnitude
    if isinstance(v, ast.Str):
        return v.value
    if isinstance(v, ast.Ident):
        return {"true": True, "false": False, "none": None}.get(v.name, v.name)
    if isinstance(v, ast.Words):
        return v.to_text()
    return tuple(_py(i) for i in v.items)


@dataclass
class SelectorEvaluator:
    """Evaluates selectors on `graph`; problems (names that match nothing, unknown kinds) go to `diags`.

    `misses` collects the leaves that matched nothing; the caller decides whether they are
    errors (they are not under `expect 0..`).
    """

    graph: Graph
    env: Env
    diags: list[Diagnostic] = field(default_factory=list)
    misses: list[Diagnostic] = field(default_factory=list)

    # incremented where the checker already reported the problem, so no "matches nothing" follows it
    poisoned: int = 0

    def __post_init__(self) -> None:
        self.order = self.graph.topo_order()
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.ops = [n for n in self.order if self.graph.node(n).kind not in _NOT_OPS]

    def _sorted(self, m: Match) -> Match:
        return dict(sorted(m.items(), key=lambda kv: self.pos[kv[0]]))

    def _closest(self, word: str) -> str:
        close = get_close_matches(word, self.order, n=3, cutoff=0.5)
        if not close:
            close = get_close_matches(word, self.order, n=3, cutoff=0.0)
        return ", ".join(f"'{c}'" for c in close)

    def _miss(self, sel: ast.Selector, what: str, word: str) -> None:
        closest = self._closest(word)
        hint = f"; closest node ids: {closest}" if closest else ""
        self.misses.append(Diagnostic(f"{what} matches no node{hint}", span=sel.span))

    def evaluate(self, sel: ast.Selector, stack: tuple[str, ...] = ()) -> Match:
        if isinstance(sel, ast.SelName):
            inner = self.env.selector(sel.name)
            if inner is not None:
                if sel.name in stack:
                    return {}  # the checker reports the cycle
                return self.evaluate(inner, (*stack, sel.name))
            if sel.name in self.env.defs:
                self.poisoned += 1  # a param or value let used as a selector
                return {}
            if sel.name in self.graph:
                return {sel.name: EXACT}
            self._miss(sel, f"node id '{sel.name}'", sel.name)
            return {}
        if isinstance(sel, ast.SelString):
            if sel.name in self.graph:
                return {sel.name: EXACT}
            self._miss(sel, f"node id {sel.to_text()}", sel.name)
            return {}
        if isinstance(sel, ast.SelGlob):
            m = {n: PATTERN for n in self.order if fnmatch.fnmatchcase(n, sel.pattern)}
            if not m:
                self._miss(sel, f"pattern '{sel.pattern}'", sel.pattern.replace("*", "").replace("?", ""))
            return m
        if isinstance(sel, ast.SelRegex):
            try:
                rx = re.compile(sel.pattern)
            except re.error:
                self.poisoned += 1
                return {}
            m = {n: PATTERN for n in self.order if rx.fullmatch(n)}
            if not m:
                self._miss(sel, f"regex {sel.to_text()}", sel.pattern)
            return m
        if isinstance(sel, ast.SelType):
            for k in sel.kinds:
                if k not in OPS:
                    self.diags.append(Diagnostic(f"unknown op kind '{k}'{_kind_hint(k)}", span=sel.span))
            m = {n: TYPE for n in self.order if self.graph.node(n).kind in sel.kinds}
            if not m and all(k in OPS for k in sel.kinds):
                kinds = sorted({self.graph.node(n).kind for n in self.ops})
                self.misses.append(Diagnostic(
                    f"'{sel.to_text()}' matches no node; the model has kinds: {', '.join(kinds)}", span=sel.span))
            return m
        if isinstance(sel, ast.SelAll):
            return {n: ALL for n in self.ops}
        if isinstance(sel, ast.SelFunc):
            inner_m = self.evaluate(sel.arg, stack)
            if sel.fn in ("first", "last"):
                if not inner_m:
                    return {}
                pick = next(iter(inner_m)) if sel.fn == "first" else list(inner_m)[-1]
                return {pick: EXACT}
            step = self.graph.consumers if sel.fn == "consumers" else self.graph.producers
            return self._sorted({m: PATTERN for n in inner_m for m in step(n)})
        if isinstance(sel, ast.SelBetween):
            a, b = self.evaluate(sel.start, stack), self.evaluate(sel.end, stack)
            down = self._reach(set(a), self.graph.consumers)
            up = self._reach(set(b), self.graph.producers)
            return self._sorted({n: PATTERN for n in down & up})
        if isinstance(sel, ast.SelWhere):
            base = self.evaluate(sel.base, stack)
            attrs = {n: node_attributes(self.graph.node(n)) for n in base}
            self._check_attrs(sel.cond, attrs)
            lift = {ALL: TYPE, TYPE: FILTER}
            return {n: lift.get(s, s) for n, s in base.items() if self._holds(sel.cond, attrs[n])}
        if isinstance(sel, ast.SelBinary):
            left, right = self.evaluate(sel.left, stack), self.evaluate(sel.right, stack)
            if sel.op == "|":
                merged = dict(left)
                for n, s in right.items():
                    merged[n] = max(s, merged.get(n, -1))
                return self._sorted(merged)
            if sel.op == "&":
                return {n: max(s, right[n]) for n, s in left.items() if n in right}
            return {n: s for n, s in left.items() if n not in right}
        return {}

    def _reach(self, start: set[str], step: Any) -> set[str]:
        seen, todo = set(start), list(start)
        while todo:
            for m in step(todo.pop()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    def _holds(self, c: ast.Condition, attrs: dict[str, Any]) -> bool:
        if isinstance(c, ast.Compare):
            if c.attr not in attrs:
                return False
            if isinstance(c.value, ast.Ident) and c.value.name in attrs and c.value.name not in self.env.defs:
                return _cmp(attrs[c.attr], c.op, attrs[c.value.name])  # attribute against attribute
            try:
                value = _py(self.env.value(c.value))
            except Exception:
                return False  # the checker reports bad references
            return _cmp(attrs[c.attr], c.op, value)
        if isinstance(c, ast.BoolOp):
            if c.op == "and":
                return self._holds(c.left, attrs) and self._holds(c.right, attrs)
            return self._holds(c.left, attrs) or self._holds(c.right, attrs)
        return not self._holds(c.cond, attrs)

    def _check_attrs(self, c: ast.Condition, attrs: dict[str, dict[str, Any]]) -> None:
        if isinstance(c, ast.Compare):
            if attrs and not any(c.attr in a for a in attrs.values()):
                known = sorted({k for a in attrs.values() for k in a})
                hint = did_you_mean(c.attr, known) or f" (attributes here: {', '.join(known)})"
                self.diags.append(Diagnostic(f"no selected node has attribute '{c.attr}'{hint}", span=c.span))
        elif isinstance(c, ast.BoolOp):
            self._check_attrs(c.left, attrs)
            self._check_attrs(c.right, attrs)
        else:
            self._check_attrs(c.cond, attrs)


def _kind_hint(kind: str) -> str:
    return did_you_mean(kind, OPS) or ""
