"""Semantic checks of a parsed policy against pass schemas (plain data, so dsl never imports passes).

Every problem becomes a located `Diagnostic`; `check_policy` reports all of them at once.
The same value conversion (`Checker.option_values`) builds pass options in the compiler.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from netsqueeze.dsl import ast
from netsqueeze.dsl.values import DIMENSION_WORDS
from netsqueeze.errors import Diagnostic, NetsqueezeError, PolicyError, SourceSpan, did_you_mean

TypeKind = Literal["int", "float", "bool", "str", "literal", "list", "tuple", "optional", "any"]
Unit = Literal["ratio", "count", "duration"]


@dataclass(frozen=True)
class TypeDesc:
    """A small description of an option's Python type: scalars, Literal choices, list/tuple, optional."""

    kind: TypeKind
    choices: tuple[Any, ...] = ()  # literal; for int, the words it also takes (`align = auto`)
    args: tuple[TypeDesc, ...] = ()  # list: (item,); tuple: fixed items, or (item,) with variadic; optional: (inner,)
    variadic: bool = True  # tuple[T, ...]

    def __str__(self) -> str:
        if self.kind == "literal":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind in ("list", "tuple"):
            if self.kind == "tuple" and not self.variadic:
                return "(" + ", ".join(str(a) for a in self.args) + ")"
            plural = {"int": "integers", "float": "numbers", "bool": "booleans", "str": "strings"}
            return f"a list of {plural.get(self.args[0].kind, self.args[0])}" if self.args else "a list"
        if self.kind == "optional":
            return f"{self.args[0]} or none"
        words = "".join(f" or '{c}'" for c in self.choices) if self.kind == "int" else ""
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(
            self.kind, "any value"
        ) + words


@dataclass(frozen=True)
class OptionSchema:
    """One option of a pass: its type, default, doc, and the range/unit from the field's metadata."""

    name: str
    type: TypeDesc
    default: Any = None
    required: bool = False
    doc: str = ""
    min: float | None = None
    max: float | None = None
    unit: Unit | None = None
    min_exclusive: bool = False  # `min` itself is out of range (a budget of 0% leaves nothing)


# a pass's check of its option combination (`Pass.option_conflicts`): the options a policy sets (converted values)
# -> (option, message) for each combination the pass cannot run with, found from the options alone
ConflictCheck = Callable[[Mapping[str, Any]], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class PassSchema:
    name: str
    options: tuple[OptionSchema, ...] = ()
    doc: str = ""
    conflicts: ConflictCheck | None = field(default=None, compare=False, repr=False)

    def option(self, name: str) -> OptionSchema | None:
        return next((o for o in self.options if o.name == name), None)


DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
# name -> (option schema) for the fixed statements; the same coercion serves them and pass options
_INT = TypeDesc("int")
_RATIO = TypeDesc("float")
CALIBRATE_KEYS: dict[str, OptionSchema] = {
    "samples": OptionSchema("samples", _INT, 512, min=1, unit="count"),
    "batch": OptionSchema("batch", _INT, 32, min=1, unit="count"),
    "seed": OptionSchema("seed", _INT, 0, min=0),
    "data": OptionSchema("data", TypeDesc("str"), None),
}
BUDGET_METRICS: dict[str, OptionSchema] = {
    "params": OptionSchema("params", _RATIO, min=0, max=1, unit="ratio", min_exclusive=True),
    "flops": OptionSchema("flops", _RATIO, min=0, max=1, unit="ratio", min_exclusive=True),
    "bytes": OptionSchema("bytes", _RATIO, min=0, max=1, unit="ratio", min_exclusive=True),
    # non-zero weights (sparsity passes: net_trim's epsilon search; checked on the compiled model)
    "nonzeros": OptionSchema("nonzeros", _RATIO, min=0, max=1, unit="ratio", min_exclusive=True),
    # measured on the emit target by the compiler (`compiler.latency`), never seen by the passes
    "latency": OptionSchema("latency", _RATIO, min=0, max=1, unit="ratio", min_exclusive=True),
}
# the absolute form of each budget metric (`params <= 4.5M`, `bytes <= 2 MB`, `latency <= 5 ms`): its unit
# dimension and an example; the compiler turns it into a ratio of the original model
ABSOLUTE_BUDGET: dict[str, tuple[str, str]] = {
    "params": ("count", "a count (e.g. 4.5M)"),
    "flops": ("count", "a count (e.g. 300M)"),
    "bytes": ("bytes", "a byte size (e.g. 2 MB)"),
    "nonzeros": ("count", "a count (e.g. 50K)"),
    "latency": ("duration", "a duration (e.g. 5 ms)"),
}
# budget metrics the language knows but nothing measures yet: a located error instead of a silent no-op
UNSUPPORTED_BUDGET: dict[str, str] = {}
RUNTIME_KEYS: dict[str, OptionSchema] = {
    "threads": OptionSchema("threads", _INT, 1, min=1, unit="count"),
    "batch": OptionSchema("batch", _INT, None, min=1, unit="count"),
    # how the latency budget's search predicts latency (compiler.latency_budget): per-op-kind model or one line
    "cost_model": OptionSchema("cost_model", TypeDesc("literal", ("per_kind", "line")), "per_kind"),
}
BOUNDS_KEYS: dict[str, OptionSchema] = {
    "min_channels": OptionSchema("min_channels", _INT, 1, min=1),
    "max_ratio": OptionSchema("max_ratio", _RATIO, 1.0, min=0, max=1, unit="ratio"),
    "round_to": OptionSchema("round_to", _INT, 1, min=1),
    # a runtime's channel block: kept counts of at least `align` are multiples of it (allocation.GroupBounds; when
    # no bounds sets it, allocation.DEFAULT_ALIGN for the channels of 2-D convolutions);
    # `auto`: the block of ONNX Runtime's CPU convolutions on the compiling machine (compiler.cost_model.cpu_block)
    "align": OptionSchema("align", TypeDesc("int", ("auto",)), 1, min=1),
}
GUARD_METRICS: dict[str, OptionSchema] = {
    "output_error": OptionSchema("output_error", _RATIO, min=0, max=1, unit="ratio"),
    "top1_drop": OptionSchema("top1_drop", _RATIO, min=0, max=1, unit="ratio"),
}


# the calibration file forms `compile()` reads (`compiler.calibration`): `calibrate data` must name one
CALIBRATION_SUFFIXES = (".npz", ".npy", ".pt", ".pth")

# the op kinds `type(...)` may name: the IR's op table, installed by the compiler (dsl does not import ir), so a
# kind no op has is an error in every selector, one no statement uses too, with or without a model
_OP_KINDS: list[Collection[str]] = []


def install_op_kinds(kinds: Collection[str]) -> None:
    """Sets the op kinds `type(...)` selectors are checked against (a live collection: kinds registered later
    count)."""
    _OP_KINDS[:] = [kinds]


class _Bad(Exception):
    def __init__(self, message: str, span: SourceSpan, notes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.diag = Diagnostic(message, span=span, notes=notes)


def _describe(v: ast.Value | ast.Selector) -> str:
    if isinstance(v, ast.Number):
        return f"'{v.to_text()}'"
    if isinstance(v, ast.Str):
        return f"the string {v.to_text()}"
    if isinstance(v, ast.Ident | ast.SelName):
        return f"the name '{v.to_text()}'"
    if isinstance(v, ast.ListValue):
        return f"the list {v.to_text()}"
    if isinstance(v, ast.Words):
        return f"the words '{v.to_text()}'"
    return f"the selector '{v.to_text()}'"


def _fmt_bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


VALUE_TYPES = (ast.Number, ast.Str, ast.Ident, ast.Words, ast.ListValue)


@dataclass
class Env:
    """The `let` and `param` definitions visible to a policy (imported ones included)."""

    defs: dict[str, ast.Definition] = field(default_factory=dict)

    def value(self, v: ast.Value, seen: tuple[str, ...] = ()) -> ast.Value:
        """`v` with references to params and value lets replaced by their values."""
        if isinstance(v, ast.ListValue):
            return ast.ListValue(tuple(self.value(i, seen) for i in v.items), span=v.span)
        if not isinstance(v, ast.Ident) or v.name not in self.defs:
            return v
        if v.name in seen:
            raise _Bad(f"'{v.name}' is defined in terms of itself ({' -> '.join((*seen, v.name))})", v.span)
        d = self.defs[v.name]
        target = d.value
        if isinstance(target, ast.SelName):
            target = ast.Ident(target.name, span=target.span)
        elif isinstance(target, ast.SelString):
            target = ast.Str(target.name, span=target.span)
        if not isinstance(target, VALUE_TYPES):
            raise _Bad(f"'{v.name}' is a selector (let at {_short(d.span)}), not a value", v.span)
        resolved = self.value(target, (*seen, v.name))
        return resolved

    def selector(self, name: str) -> ast.Selector | None:
        """The selector a `let` binds, or None when `name` is not a selector let."""
        d = self.defs.get(name)
        if not isinstance(d, ast.Let):
            return None
        v = d.value
        if isinstance(v, ast.Str):
            return ast.SelString(v.value, span=v.span)
        return None if isinstance(v, VALUE_TYPES) else v


def _short(span: SourceSpan) -> str:
    return f"{span.file}:{span.line}"


def _through(start: SourceSpan, end: SourceSpan) -> SourceSpan:
    """The span from `start` to the end of `end` (a whole `key = value`), or `start` if `end` is elsewhere."""
    if end.file != start.file or end.end_col is None or (end.end_line or end.line) != start.line:
        return start
    return SourceSpan(start.file, start.line, start.col, start.line, end.end_col, start.text)


class Checker:
    """Collects every diagnostic of a policy; reusable by the compiler to convert option values."""

    def __init__(self, policy: ast.Policy, schemas: Mapping[str, PassSchema]) -> None:
        self.policy = policy
        self.schemas = schemas
        self.diags: list[Diagnostic] = []
        self.env = Env()

    def error(self, message: str, span: SourceSpan, *notes: str) -> None:
        self.diags.append(Diagnostic(message, span=span, notes=tuple(notes)))

    def guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except _Bad as b:
            self.diags.append(b.diag)
            return None

    # ---- entry point
    def check(self) -> list[Diagnostic]:
        self._definitions()
        seen_inputs: dict[str, ast.InputDecl] = {}
        calib: dict[str, ast.Option] = {}
        budget: dict[str, ast.BudgetItem] = {}
        runtime: dict[str, ast.Option] = {}
        bounds: dict[str, ast.Option] = {}
        guard: ast.Guard | None = None
        for s in self.policy.body:
            if isinstance(s, ast.InputDecl):
                if s.name in seen_inputs:
                    self.error(f"input '{s.name}' declared twice", s.span, f"first declared at {seen_inputs[s.name].span}")
                seen_inputs[s.name] = s
                if s.dtype not in DTYPES:
                    self.error(f"unknown dtype '{s.dtype}'{did_you_mean(s.dtype, DTYPES) or ' (one of ' + ', '.join(DTYPES) + ')'}", s.span)
            elif isinstance(s, ast.Calibrate):
                for o in s.settings:
                    value = self._fixed(o.key, o.value, o.span, CALIBRATE_KEYS, "calibration setting", calib, o)
                    if o.key == "data" and isinstance(value, str):
                        self._calibration_file(value, o)
            elif isinstance(s, ast.Budget):
                for item in s.items:
                    if item.metric in UNSUPPORTED_BUDGET:
                        self.error(f"budget metric '{item.metric}' is not supported yet: "
                                   f"{UNSUPPORTED_BUDGET[item.metric]}", item.span)
                        continue
                    if item.metric in BUDGET_METRICS and item.metric not in budget:
                        budget[item.metric] = item
                        self.guard(functools.partial(self.budget_value, item.metric, item.value))
                        continue
                    self._fixed(item.metric, item.value, item.span, BUDGET_METRICS, "budget metric", budget, item)
            elif isinstance(s, ast.Runtime):
                for o in s.settings:
                    self._fixed(o.key, o.value, o.span, RUNTIME_KEYS, "runtime setting", runtime, o)
            elif isinstance(s, ast.Bounds):
                local: dict[str, Any] = {} if s.selector is not None else bounds
                for o in s.options:
                    self._fixed(o.key, o.value, o.span, BOUNDS_KEYS, "bound", local, o)
                if s.selector is not None:
                    self.selector(s.selector)
            elif isinstance(s, ast.Guard):
                if guard is not None:
                    self.error("a second 'guard'; a policy has at most one", s.span, f"first guard at {guard.span}")
                guard = s
                self._fixed(s.metric, s.value, s.span, GUARD_METRICS, "guard", {}, s,
                            names={"output_error": "output error", "top1_drop": "top1 drop"})
            elif isinstance(s, ast.Invocation):
                self._invocation(s)
        if "cost_model" in runtime and "latency" not in budget:
            self.error("runtime setting 'cost_model' is how a latency budget predicts latency: this policy has no "
                       "'budget latency'", runtime["cost_model"].span)
        return self.diags

    # ---- definitions
    def _definitions(self) -> None:
        for d in self.policy.all_definitions():
            if d.name in self.env.defs:
                prev = self.env.defs[d.name]
                self.error(f"'{d.name}' is defined twice", d.span, f"first defined at {prev.span}")
                continue
            self.env.defs[d.name] = d
        for d in self.env.defs.values():
            sel = self.env.selector(d.name)
            if sel is not None:
                self.selector(sel)
                self._walk_names(sel, (d.name,), d)
            else:
                try:
                    self.env.value(ast.Ident(d.name, span=d.span))
                except _Bad as b:
                    self.diags.append(b.diag)

    # ---- fixed statements (calibrate, budget, bounds, guard)
    def _fixed(
        self, key: str, value: ast.Value, span: SourceSpan, table: Mapping[str, OptionSchema], what: str,
        seen: dict[str, Any], node: Any, names: Mapping[str, str] | None = None,
    ) -> Any:
        names = names or {}
        shown = names.get(key, key.replace("_", " ") if table is GUARD_METRICS else key)
        if key not in table:
            choices = [names.get(k, k) for k in table]
            hint = did_you_mean(shown, choices) or f" (one of: {', '.join(choices)})"
            self.error(f"unknown {what} '{shown}'{hint}", span)
            return None
        if key in seen:
            self.error(f"{what} '{shown}' given twice", span, f"first given at {seen[key].span}")
            return None
        seen[key] = node
        return self.guard(lambda: self.convert(value, table[key], f"{what} '{shown}'"))

    def _calibration_file(self, data: str, o: ast.Option) -> None:
        """`calibrate data "FILE"` names a calibration file compile() can read: relative to the policy file (as
        compile resolves it; to the working directory for policy text), an existing file of a form it reads."""
        span = _through(o.span, o.value.span)
        path = Path(data)
        if not path.is_absolute() and not o.span.file.startswith("<"):
            path = Path(o.span.file).parent / path
        if path.is_dir():
            self.error(f"calibration file '{path}' is a directory", span)
        elif not path.exists():
            siblings: list[str] = []
            if path.parent.is_dir():
                with contextlib.suppress(OSError):
                    siblings = [p.name for p in path.parent.iterdir() if p.suffix in CALIBRATION_SUFFIXES]
            hint = did_you_mean(path.name, siblings)
            if not hint and not path.parent.is_dir():
                hint = f" (no folder '{path.parent}')"
            relative = not Path(data).is_absolute() and not o.span.file.startswith("<")
            self.error(f"calibration file '{path}' does not exist{hint}", span,
                       *(["a relative path is read from the policy file's folder"] if relative else []))
        elif path.suffix not in CALIBRATION_SUFFIXES:
            self.error(f"calibration file '{path}': unsupported format '{path.suffix}' (use .npz, .npy or .pt)", span)

    # ---- invocations
    def _invocation(self, inv: ast.Invocation) -> None:
        schema = self.schemas.get(inv.pass_name)
        if schema is None:
            hint = did_you_mean(inv.pass_name, self.schemas) or (
                f" (registered: {', '.join(sorted(self.schemas))})" if self.schemas else ""
            )
            self.error(f"unknown pass '{inv.pass_name}'{hint}", inv.name_span)
        if inv.selector is not None:
            self.selector(inv.selector)
        if inv.expect is not None:
            if inv.selector is None:
                self.error("'expect' needs an 'on SELECTOR' clause", inv.expect.span)
            elif inv.expect.high is not None and inv.expect.high < inv.expect.low:
                self.error(f"empty range in '{inv.expect.to_text()}'", inv.expect.span)
        if schema is not None:
            before = len(self.diags)
            values = self.option_values(inv, schema, report=True)
            if schema.conflicts is not None and len(self.diags) == before:  # every option it sets is valid
                self._conflicts(inv, schema, values)

    def _conflicts(self, inv: ast.Invocation, schema: PassSchema, values: Mapping[str, Any]) -> None:
        """The pass's own check of its option combination (`Pass.option_conflicts`), each problem located at the
        option it names (the pass name when the policy does not set that option)."""
        assert schema.conflicts is not None
        spans: dict[str, SourceSpan] = {}
        for o in inv.options:
            spans.setdefault(o.key, _through(o.span, o.value.span))
        try:
            problems = list(schema.conflicts(values))
        except NetsqueezeError as e:
            problems = [("", e.message)]
        for key, message in problems:
            self.error(f"pass '{schema.name}': {message}", spans.get(key, inv.name_span))

    def option_values(self, inv: ast.Invocation, schema: PassSchema, report: bool = False) -> dict[str, Any]:
        """The converted options of `inv` (only those it sets); problems go to `self.diags` if `report`."""
        out: dict[str, Any] = {}
        given: dict[str, ast.Option] = {}
        names = [o.name for o in schema.options]
        for opt in inv.options:
            target = schema.option(opt.key)
            if target is None:
                if not report:
                    continue
                if not names:
                    self.error(f"pass '{schema.name}' takes no options", opt.span)
                else:
                    hint = did_you_mean(opt.key, names) or f" (options: {', '.join(names)})"
                    self.error(f"unknown option '{opt.key}' for pass '{schema.name}'{hint}", opt.span)
                continue
            if opt.key in given:
                if report:
                    self.error(f"option '{opt.key}' given twice for pass '{schema.name}'", opt.span,
                               f"first given at {given[opt.key].span}")
                continue
            given[opt.key] = opt
            try:
                out[opt.key] = self.convert(opt.value, target, f"option '{opt.key}' of pass '{schema.name}'")
            except _Bad as b:
                if report:
                    self.diags.append(b.diag)
        if report:
            for o in schema.options:
                if o.required and o.name not in given:
                    self.error(f"pass '{schema.name}' needs option '{o.name}' ({o.type})", inv.name_span)
        return out

    # ---- values
    def budget_value(self, metric: str, value: ast.Value) -> tuple[bool, float]:
        """(absolute?, value) of a budget item: a ratio of the original (`50%`, `0.5`) or, with the metric's
        unit, an absolute limit in base units (params/FLOPs count, bytes, seconds)."""
        what = f"budget metric '{metric}'"
        v = self.env.value(value)
        if isinstance(v, ast.Number) and v.dimension not in ("number", "ratio"):
            dim, example = ABSOLUTE_BUDGET[metric]
            if v.dimension != dim:
                raise _Bad(f"wrong unit for {what}: expected a ratio (a number or a percentage) or {example}, "
                           f"got {DIMENSION_WORDS[v.dimension]} '{v.to_text()}'", v.span)
            if not v.magnitude > 0:
                raise _Bad(f"{what} must be greater than 0, got '{v.to_text()}'", v.span)
            return True, float(v.magnitude)
        return False, float(self.convert(value, BUDGET_METRICS[metric], what))

    def convert(self, value: ast.Value, opt: OptionSchema, what: str) -> Any:
        """Converts a policy value to the Python value an option of type `opt.type` takes."""
        v = self.env.value(value)
        try:
            result = self._coerce(v, opt.type, opt, what)
            self._range(result, v, opt, what)
        except _Bad as b:
            if v is value or not isinstance(value, ast.Ident) or value.name not in self.env.defs:
                raise
            if b.diag.span is not None and b.diag.span.file == ast.OVERRIDE_FILE:
                # a value given by `--set` (`compile(params=...)`): the error is at the override, which the user
                # typed, the place it is used a note
                raise _Bad(b.diag.message, b.diag.span, (*b.diag.notes, f"the value of '{value.name}', used at "
                                                                        f"{value.span}")) from None
            # a param's or let's value that does not fit here: the error is where it is used (the definition
            # may be right for its other uses), the definition a note
            d = self.env.defs[value.name]
            kind = "param" if isinstance(d, ast.Param) else "let"
            raise _Bad(b.diag.message, value.span, (*b.diag.notes, f"the value of {kind} '{value.name}', defined at "
                                                                   f"{_short(d.span)}")) from None
        return result

    def _coerce(self, v: ast.Value, t: TypeDesc, opt: OptionSchema, what: str) -> Any:
        if t.kind == "optional":
            if isinstance(v, ast.Ident) and v.name == "none":
                return None
            return self._coerce(v, t.args[0], opt, what)
        if t.kind == "any":
            return _plain(v)
        if t.kind == "bool":
            if isinstance(v, ast.Ident) and v.name in ("true", "false"):
                return v.name == "true"
            raise _Bad(f"{what} expects true or false, got {_describe(v)}", v.span)
        if t.kind in ("int", "float"):
            named = v.name if isinstance(v, ast.Ident) else v.value if isinstance(v, ast.Str) else None
            if t.kind == "int" and named in t.choices:  # `align = auto` or `align = "auto"`
                return named
            if not isinstance(v, ast.Number):
                raise _Bad(f"{what} expects {t}, got {_describe(v)}", v.span)
            self._unit(v, t, opt, what)
            m = v.magnitude
            if t.kind == "int":
                if isinstance(m, float) and not m.is_integer():
                    raise _Bad(f"{what} expects an integer, got '{v.to_text()}'", v.span)
                return int(m)
            return float(m)
        if t.kind == "str":
            if isinstance(v, ast.Str):
                return v.value
            if isinstance(v, ast.Ident | ast.Words):
                return v.to_text()
            raise _Bad(f"{what} expects a string, got {_describe(v)}", v.span)
        if t.kind == "literal":
            word: Any = v.value if isinstance(v, ast.Str) else v.name if isinstance(v, ast.Ident) else None
            if isinstance(v, ast.Number):  # a choice of numbers takes them bare: `bits = 400%` is not 4
                word = v.magnitude if not v.unit else v.to_text()
            for c in t.choices:
                if c == word and type(c) is not bool:
                    return c
                if isinstance(c, bool) and isinstance(v, ast.Ident) and v.name == str(c).lower():
                    return c
            raise _Bad(f"{what} {_choices_problem(t, word)}".replace(_GOT, f", got {_describe(v)}"), v.span)
        if t.kind in ("list", "tuple"):
            items: tuple[ast.Value, ...]
            if isinstance(v, ast.ListValue):
                items = v.items
            elif isinstance(v, ast.Words):
                items = v.words
            elif t.kind == "list" or t.variadic:
                items = (v,)  # one value where a list is expected: a list of one
            else:
                raise _Bad(f"{what} expects {t}, got {_describe(v)}", v.span)
            if t.kind == "tuple" and not t.variadic:
                if len(items) != len(t.args):
                    raise _Bad(f"{what} expects {len(t.args)} items {t}, got {len(items)}", v.span)
                return tuple(self._coerce(self.env.value(i), a, opt, what) for i, a in zip(items, t.args))
            conv = [self._coerce(self.env.value(i), t.args[0], opt, what) if t.args else _plain(i) for i in items]
            return tuple(conv) if t.kind == "tuple" else conv
        raise _Bad(f"{what} has an unsupported type", v.span)

    def _unit(self, v: ast.Number, t: TypeDesc, opt: OptionSchema, what: str) -> None:
        dim = v.dimension
        if opt.unit == "ratio":
            ok, want = {"number", "ratio"}, "a ratio (a number or a percentage)"
        elif opt.unit == "duration":
            ok, want = {"number", "duration"}, "a duration (e.g. 12ms, 2s)"
        elif opt.unit == "count" or t.kind == "int":
            ok, want = {"number", "count"}, "a count (e.g. 512, 4K, 4.5M)"
        else:
            ok, want = {"number", "ratio", "count"}, "a number"
        if dim not in ok:
            raise _Bad(f"wrong unit for {what}: expected {want}, got {DIMENSION_WORDS[dim]} '{v.to_text()}'", v.span)

    def _range(self, result: Any, v: ast.Value, opt: OptionSchema, what: str) -> None:
        problem = range_problem(result, opt)
        if problem is not None:
            raise _Bad(f"{what} {problem}, got '{v.to_text()}'", v.span)

    # ---- selectors
    def selector(self, sel: ast.Selector) -> None:
        """Checks what can be checked without a model: let references and regexes."""
        if isinstance(sel, ast.SelName):
            d = self.env.defs.get(sel.name)
            if d is not None and self.env.selector(sel.name) is None:
                kind = "a parameter" if isinstance(d, ast.Param) else "a value"
                self.error(f"'{sel.name}' is {kind} (defined at {_short(d.span)}), not a selector", sel.span)
            return
        if isinstance(sel, ast.SelRegex):
            try:
                re.compile(sel.pattern)
            except re.error as e:
                self.error(f"invalid regular expression: {e}", sel.span)
            return
        if isinstance(sel, ast.SelType) and _OP_KINDS:
            kinds = _OP_KINDS[0]
            for k in sel.kinds:
                if k not in kinds:  # worded as the selector evaluator words it, so a model's check says it once
                    self.error(f"unknown op kind '{k}'{did_you_mean(k, kinds)}", sel.span)
            return
        if isinstance(sel, ast.SelWhere):
            self._condition(sel.cond)
        for child in _children(sel):
            self.selector(child)

    def _walk_names(self, sel: ast.Selector, seen: tuple[str, ...], origin: ast.Definition) -> None:
        # cycle detection through let references only (other checks happen at the let itself)
        if isinstance(sel, ast.SelName):
            if sel.name == origin.name:
                chain = " -> ".join((*seen, sel.name))
                self.error(f"selector '{origin.name}' is defined in terms of itself ({chain})", origin.span)
                return
            inner = self.env.selector(sel.name)
            if inner is not None and sel.name not in seen:
                self._walk_names(inner, (*seen, sel.name), origin)
            return
        for child in _children(sel):
            self._walk_names(child, seen, origin)

    def _condition(self, c: ast.Condition) -> None:
        if isinstance(c, ast.Compare):
            self.guard(lambda: self.env.value(c.value))
        elif isinstance(c, ast.BoolOp):
            self._condition(c.left)
            self._condition(c.right)
        else:
            self._condition(c.cond)


# ---- the one check of option values: the policy checker (after converting a policy value) and passes
# built from Python (`Pass.__post_init__`, through the hook the compiler installs) both use it
_GOT = "\x00got\x00"  # where ", got VALUE" goes; filled in by the caller, which knows how to show the value


def range_problem(value: Any, opt: OptionSchema) -> str | None:
    """'must be between 0 and 1 (0% to 100%)' when the number `value` is outside `opt`'s range, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    lo, hi = opt.min, opt.max
    low_out = lo is not None and (value <= lo if opt.min_exclusive else value < lo)
    if not (low_out or (hi is not None and value > hi) or value != value):
        return None
    if lo is not None and hi is not None:
        if opt.min_exclusive:
            rng = f"more than {_fmt_bound(lo)} and at most {_fmt_bound(hi)}"
            if opt.unit == "ratio":
                rng += f" (above {_fmt_bound(lo * 100)}%, up to {_fmt_bound(hi * 100)}%)"
        else:
            rng = f"between {_fmt_bound(lo)} and {_fmt_bound(hi)}"
            if opt.unit == "ratio":
                rng += f" ({_fmt_bound(lo * 100)}% to {_fmt_bound(hi * 100)}%)"
    elif lo is not None:
        rng = f"{'>' if opt.min_exclusive else '>='} {_fmt_bound(lo)}"
    elif hi is not None:
        rng = f"<= {_fmt_bound(hi)}"
    else:
        rng = "a number"
    return f"must be {rng}"


def _choices_problem(t: TypeDesc, word: Any) -> str:
    strs = [str(c) for c in t.choices]
    hint = did_you_mean(word, strs) if isinstance(word, str) else ""
    return f"must be one of {', '.join(repr(c) for c in t.choices)}{_GOT}{hint}"


def _show(value: Any) -> str:
    """A Python value in a message: strings quoted by repr, numbers in quotes like policy text."""
    if isinstance(value, str):
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        return f"'{value!r}'"
    return f"{type(value).__name__} {value!r}"


def _value_problem(value: Any, t: TypeDesc) -> str | None:
    """Why the Python `value` (or an item of it) is not of option type `t` ("expects an integer, got '2.5'")."""
    problem = _type_problem(value, t)
    return None if problem is None else problem.replace(_GOT, f", got {_show(value)}")


def _type_problem(value: Any, t: TypeDesc) -> str | None:
    if t.kind == "optional":
        return None if value is None else _value_problem(value, t.args[0])
    if t.kind == "any":
        return None
    ok = {
        "bool": lambda: isinstance(value, bool),
        "int": lambda: (isinstance(value, int) and not isinstance(value, bool)) or value in t.choices,
        "float": lambda: isinstance(value, int | float) and not isinstance(value, bool),
        "str": lambda: isinstance(value, str),
    }.get(t.kind)
    if ok is not None:
        return None if ok() else f"expects {t}{_GOT}"
    if t.kind == "literal":
        if any(c == value and isinstance(c, bool) == isinstance(value, bool) for c in t.choices):
            return None
        return _choices_problem(t, value)
    if t.kind in ("list", "tuple"):
        if not isinstance(value, list | tuple):
            return f"expects {t}{_GOT}"
        if t.kind == "tuple" and not t.variadic:
            if len(value) != len(t.args):
                return f"expects {len(t.args)} items {t}, got {len(value)}"
            return next((p for p in map(_value_problem, value, t.args) if p is not None), None)
        if not t.args:
            return None
        return next((p for p in (_value_problem(i, t.args[0]) for i in value) if p is not None), None)
    return None


def option_problem(value: Any, opt: OptionSchema, what: str) -> str | None:
    """The message for a Python `value` that option `opt` does not accept ("option 'ratio' of pass
    'trim' must be between 0 and 0.999 (0% to 99.9%), got '2.0'"), or None when it is accepted.
    Type, choices and range are those the policy checker enforces, worded the same way."""
    problem = _value_problem(value, opt.type)
    if problem is None:
        problem = range_problem(value, opt)
        if problem is None:
            return None
        problem += f", got {_show(value)}"
    return f"{what} {problem}"


def _children(sel: ast.Selector) -> list[ast.Selector]:
    if isinstance(sel, ast.SelFunc):
        return [sel.arg]
    if isinstance(sel, ast.SelBetween):
        return [sel.start, sel.end]
    if isinstance(sel, ast.SelWhere):
        return [sel.base]
    if isinstance(sel, ast.SelBinary):
        return [sel.left, sel.right]
    return []


def _plain(v: ast.Value) -> Any:
    if isinstance(v, ast.Number):
        return v.magnitude
    if isinstance(v, ast.Str):
        return v.value
    if isinstance(v, ast.Ident | ast.Words):
        return v.to_text()
    return [_plain(i) for i in v.items]


def sort_diagnostics(diags: list[Diagnostic]) -> list[Diagnostic]:
    """File order (by file, line, column), so reports read top to bottom."""

    def key(d: Diagnostic) -> tuple[str, int, int]:
        s = d.span
        return (s.file, s.line, s.col) if s is not None else ("", 0, 0)

    return sorted(diags, key=key)


def run_checker(policy: ast.Policy, schemas: Mapping[str, PassSchema]) -> tuple[Checker, list[Diagnostic]]:
    """A `Checker` of `policy` that has checked it, and its diagnostics; a policy too deep to check (thousands of
    chained terms or definitions) is a `PolicyError` at the policy, not a RecursionError."""
    checker = Checker(policy, schemas)
    try:
        return checker, checker.check()
    except RecursionError:
        raise PolicyError(Diagnostic("the policy nests too deeply to check (an expression, selector or let/param "
                                     "chain of thousands of terms); name parts of it with `let`",
                                     span=policy.span)) from None


def check_policy(policy: ast.Policy, schemas: Mapping[str, PassSchema]) -> None:
    """Checks `policy` against pass `schemas`; raises `PolicyError` carrying every diagnostic."""
    _, diags = run_checker(policy, schemas)
    if diags:
        raise PolicyError(sort_diagnostics(diags))
