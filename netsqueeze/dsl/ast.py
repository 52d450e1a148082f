"""The policy AST: frozen dataclasses with source spans (excluded from equality) and canonical printing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from netsqueeze.dsl.values import dimension, format_number, magnitude
from netsqueeze.errors import SourceSpan

NOSPAN = SourceSpan("<generated>", 1, 1)
# the file name of values given as parameter overrides (`--set key=value`, `compile(params=...)`)
OVERRIDE_FILE = "<--set>"


def _quote(s: str, prefix: str = "") -> str:
    # json escaping is a subset of what the STRING terminal accepts, so this round-trips
    return prefix + json.dumps(s, ensure_ascii=False)


# ---- values ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    """A number with an optional unit suffix ('' | % | K | M | G | us | ms | s)."""

    value: int | float
    unit: str = ""
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    @property
    def dimension(self) -> str:
        return dimension(self.unit)

    @property
    def magnitude(self) -> int | float:
        return magnitude(self.value, self.unit)

    def to_text(self) -> str:
        return format_number(self.value) + self.unit


@dataclass(frozen=True)
class Str:
    value: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return _quote(self.value)


@dataclass(frozen=True)
class Ident:
    """A bare word: an enum value, `true`/`false`/`none`, or a reference to a `param` or `let`."""

    name: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return self.name


@dataclass(frozen=True)
class Words:
    """Juxtaposed words in an option value (`int8 per_channel`): a list, or one space-joined string."""

    words: tuple[Ident, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return " ".join(w.name for w in self.words)


@dataclass(frozen=True)
class ListValue:
    items: tuple[Value, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return "[" + ", ".join(i.to_text() for i in self.items) + "]"


Value = Number | Str | Ident | Words | ListValue


# ---- selectors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelName:
    """A bare node id (`layer1.0.conv1`) or the name of a `let` selector."""

    name: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return self.name


@dataclass(frozen=True)
class SelString:
    """A quoted exact node id, for ids that are not bare words (`"/features/Conv"`, `"0"`)."""

    name: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return _quote(self.name)


@dataclass(frozen=True)
class SelGlob:
    pattern: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return self.pattern


@dataclass(frozen=True)
class SelRegex:
    pattern: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        # raw: only the quote is escaped (see the REGEX terminal)
        return 're"' + self.pattern.replace('"', '\\"') + '"'


@dataclass(frozen=True)
class SelType:
    kinds: tuple[str, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"type({', '.join(self.kinds)})"


@dataclass(frozen=True)
class SelAll:
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return "all"


@dataclass(frozen=True)
class SelFunc:
    """`first(S)`, `last(S)`, `consumers(S)`, `producers(S)`."""

    fn: str
    arg: Selector
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"{self.fn}({self.arg.to_text()})"


@dataclass(frozen=True)
class SelBetween:
    start: Selector
    end: Selector
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"between({self.start.to_text()}, {self.end.to_text()})"


@dataclass(frozen=True)
class Compare:
    attr: str
    op: str  # == != < <= > >=
    value: Value
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"{self.attr} {self.op} {self.value.to_text()}"


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or
    left: Condition
    right: Condition
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        p = _COND_PREC[self.op]
        # left-associative: only a right operand of equal precedence needs parentheses
        return f"{_cond_text(self.left, p)} {self.op} {_cond_text(self.right, p + 1)}"


@dataclass(frozen=True)
class NotCond:
    cond: Condition
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"not {_cond_text(self.cond, _COND_PREC['not'])}"


Condition = Compare | BoolOp | NotCond

_COND_PREC = {"or": 1, "and": 2, "not": 3}


def _cond_text(c: Condition, min_prec: int) -> str:
    prec = _COND_PREC[c.op] if isinstance(c, BoolOp) else (3 if isinstance(c, NotCond) else 4)
    return f"({c.to_text()})" if prec < min_prec else c.to_text()


@dataclass(frozen=True)
class SelWhere:
    base: Selector
    cond: Condition
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"{_sel_text(self.base, 5)} where {self.cond.to_text()}"


@dataclass(frozen=True)
class SelBinary:
    """`A | B` (union), `A & B` (intersection), `A except B` (difference)."""

    op: str
    left: Selector
    right: Selector
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        p = _SEL_PREC[self.op]
        # left-associative: the right operand needs parentheses at equal precedence
        return f"{_sel_text(self.left, p)} {self.op} {_sel_text(self.right, p + 1)}"


@dataclass(frozen=True)
class SelParen:
    """Kept only while parsing; never stored in the AST (parentheses are implied by the tree)."""

    inner: Selector
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"({self.inner.to_text()})"


_SEL_PREC = {"except": 1, "|": 2, "&": 3}

Selector = SelName | SelString | SelGlob | SelRegex | SelType | SelAll | SelFunc | SelBetween | SelWhere | SelBinary


def _sel_text(s: Selector, min_prec: int) -> str:
    if isinstance(s, SelBinary):
        prec = _SEL_PREC[s.op]
    elif isinstance(s, SelWhere):
        prec = 4
    else:
        prec = 5
    return f"({s.to_text()})" if prec < min_prec else s.to_text()


# ---- statements --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    key: str
    value: Value
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"{self.key} = {self.value.to_text()}"


@dataclass(frozen=True)
class Expect:
    """`expect N..M` (M None = unbounded); `expect N` is N..N."""

    low: int
    high: int | None
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        if self.high == self.low:
            return f"expect {self.low}"
        return f"expect {self.low}..{'' if self.high is None else self.high}"

    def admits(self, n: int) -> bool:
        return self.low <= n and (self.high is None or n <= self.high)


@dataclass(frozen=True)
class Invocation:
    """`PASS [on SELECTOR] [{ key = value, ... }] [expect N..M]`."""

    pass_name: str
    selector: Selector | None = None
    options: tuple[Option, ...] = ()
    expect: Expect | None = None
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)
    name_span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        out = self.pass_name
        if self.selector is not None:
            out += " on " + self.selector.to_text()
        if self.options:
            out += " { " + ", ".join(o.to_text() for o in self.options) + " }"
        if self.expect is not None:
            out += " " + self.expect.to_text()
        return out


@dataclass(frozen=True)
class InputDecl:
    name: str
    dtype: str
    shape: tuple[int, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"input {self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class Calibrate:
    settings: tuple[Option, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return "calibrate " + ", ".join(f"{o.key} {o.value.to_text()}" for o in self.settings)


@dataclass(frozen=True)
class Let:
    name: str
    value: Selector | Value
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"let {self.name} = {self.value.to_text()}"


@dataclass(frozen=True)
class Param:
    name: str
    value: Value
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"param {self.name} = {self.value.to_text()}"


@dataclass(frozen=True)
class BudgetItem:
    metric: str
    value: Value
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"{self.metric} <= {self.value.to_text()}"


@dataclass(frozen=True)
class Budget:
    items: tuple[BudgetItem, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return "budget " + ", ".join(i.to_text() for i in self.items)


@dataclass(frozen=True)
class Bounds:
    """Per-layer bounds, for every layer or (with `on`) for the selected ones."""

    options: tuple[Option, ...]
    selector: Selector | None = None
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        on = f" on {self.selector.to_text()}" if self.selector is not None else ""
        return f"bounds{on} {{ " + ", ".join(o.to_text() for o in self.options) + " }"


@dataclass(frozen=True)
class Guard:
    """`guard output error <= 2%` (metric 'output_error') or `guard top1 drop <= 1%` ('top1_drop')."""

    metric: str
    value: Value
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        words = {"output_error": "output error", "top1_drop": "top1 drop"}.get(self.metric, self.metric)
        return f"guard {words} <= {self.value.to_text()}"


@dataclass(frozen=True)
class Import:
    path: str
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return f"import {_quote(self.path)}"


@dataclass(frozen=True)
class Runtime:
    """`runtime { threads = 2, batch = 64 }`: where a latency budget is measured."""

    settings: tuple[Option, ...]
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)

    def to_text(self) -> str:
        return "runtime { " + ", ".join(o.to_text() for o in self.settings) + " }"


Statement = InputDecl | Calibrate | Let | Param | Budget | Bounds | Guard | Invocation | Runtime
Definition = Let | Param


@dataclass(frozen=True)
class Module:
    """An imported file: its own imports and its `let`/`param` definitions."""

    path: str
    imports: tuple[Import, ...]
    definitions: tuple[Definition, ...]
    modules: tuple[Module, ...] = field(default=(), compare=False, repr=False)

    def to_text(self) -> str:
        lines = [i.to_text() for i in self.imports] + [d.to_text() for d in self.definitions]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Policy:
    """A parsed policy file. `modules` holds the imported files (resolved, not compared)."""

    name: str
    body: tuple[Statement, ...]
    imports: tuple[Import, ...] = ()
    definitions: tuple[Definition, ...] = ()  # top-level lets/params outside the policy block
    span: SourceSpan = field(default=NOSPAN, compare=False, repr=False, kw_only=True)
    modules: tuple[Module, ...] = field(default=(), compare=False, repr=False)

    def to_text(self) -> str:
        lines = [i.to_text() for i in self.imports] + [d.to_text() for d in self.definitions]
        if lines:
            lines.append("")
        lines.append(f"policy {self.name} {{")
        lines += ["  " + s.to_text() for s in self.body]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def hash(self) -> str:
        """sha256 of the canonical text of this policy and of every file it imports."""
        h = hashlib.sha256(self.to_text().encode())
        for m in _all_modules(self.modules):
            h.update(b"\0" + m.to_text().encode())
        return h.hexdigest()

    @property
    def inputs(self) -> tuple[InputDecl, ...]:
        return tuple(s for s in self.body if isinstance(s, InputDecl))

    @property
    def invocations(self) -> tuple[Invocation, ...]:
        return tuple(s for s in self.body if isinstance(s, Invocation))

    def all_definitions(self) -> list[Definition]:
        """Imported definitions first (depth-first, in import order), then this file's."""
        out: list[Definition] = []
        for m in _all_modules(self.modules):
            out += m.definitions
        out += self.definitions
        out += [s for s in self.body if isinstance(s, Let | Param)]
        return out


def _all_modules(mods: tuple[Module, ...], seen: set[str] | None = None) -> list[Module]:
    seen = set() if seen is None else seen
    out: list[Module] = []
    for m in mods:
        if m.path in seen:
            continue
        seen.add(m.path)
        out += _all_modules(m.modules, seen)
        out.append(m)
    return out


# ---- references ----------------------------------------------------------------------------------
def _value_names(v: Value | Selector | Condition) -> list[str]:
    """The words in a value, selector or condition that may name a `let` or `param` (whether they do is the
    caller's to say: a word names a definition when one of that name exists)."""
    if isinstance(v, Ident | SelName):
        return [v.name]
    if isinstance(v, Words):
        return [w.name for w in v.words]
    if isinstance(v, ListValue):
        return [n for i in v.items for n in _value_names(i)]
    if isinstance(v, SelFunc):
        return _value_names(v.arg)
    if isinstance(v, SelBetween):
        return _value_names(v.start) + _value_names(v.end)
    if isinstance(v, SelWhere):
        return _value_names(v.base) + _value_names(v.cond)
    if isinstance(v, SelBinary):
        return _value_names(v.left) + _value_names(v.right)
    if isinstance(v, Compare):
        return _value_names(v.value)
    if isinstance(v, BoolOp):
        return _value_names(v.left) + _value_names(v.right)
    if isinstance(v, NotCond):
        return _value_names(v.cond)
    return []


def _statement_names(s: Statement) -> list[str]:
    out: list[str] = []
    if isinstance(s, Invocation | Bounds) and s.selector is not None:
        out += _value_names(s.selector)
    options: tuple[Option, ...] = ()
    if isinstance(s, Invocation | Bounds):
        options = s.options
    elif isinstance(s, Calibrate | Runtime):
        options = s.settings
    elif isinstance(s, Budget):
        out += [n for i in s.items for n in _value_names(i.value)]
    elif isinstance(s, Guard):
        out += _value_names(s.value)
    return out + [n for o in options for n in _value_names(o.value)]


def names_read(policy: Policy) -> set[str]:
    """The `let` and `param` names the policy's statements read, directly or through other definitions: a
    definition outside this set changes nothing (an override of such a param is an error)."""
    defs: dict[str, list[Definition]] = {}
    for d in policy.all_definitions():
        defs.setdefault(d.name, []).append(d)
    todo = [n for s in policy.body if not isinstance(s, Let | Param) for n in _statement_names(s)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        for d in defs[name]:
            todo += _value_names(d.value)
    return seen
