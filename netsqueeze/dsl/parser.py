"""Parses policy text into the AST (Lark LALR + a Transformer); syntax errors become located `PolicyError`s.

To report every syntax error of a file at once, the parser blanks out the statement that
failed and parses again (positions are preserved), a few times at most.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from netsqueeze.dsl import ast
from netsqueeze.errors import Diagnostic, PolicyError, SourceSpan, did_you_mean

MAX_SYNTAX_ERRORS = 10

_TERMINAL_WORDS = {
    "NAME": "a name",
    "DOTTED": "a node id",
    "GLOB": "a glob pattern",
    "QUANTITY": "a number",
    "STRING": "a string",
    "REGEX": 're"..."',
    "RANGE": "'..'",
    "LE": "'<='",
    "ON": "'on'",
    "$END": "end of file",
}


@cache
def _lark() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", start=["start", "value"], maybe_placeholders=True,
                propagate_positions=True)


class _SyntaxProblem(Exception):
    """Raised inside the Transformer for a construct that lexes and parses but is malformed."""

    def __init__(self, message: str, span: SourceSpan) -> None:
        super().__init__(message)
        self.message = message
        self.span = span


def _quantity(tok: Token, span: SourceSpan) -> ast.Number:
    m = re.fullmatch(r"(-?[\d.]+(?:[eE][+-]?\d+)?)(?:(%)|[ \t]*(KB|MB|GB|B|K|M|G|us|ms|s))?", str(tok))
    if m is None:  # the terminal's regex guarantees the match; kept for mypy and safety
        raise _SyntaxProblem(f"malformed number '{tok}'", span)
    text, unit = m.group(1), m.group(2) or m.group(3) or ""
    if len(text) > 300:  # beyond any quantity (and Python's int() refuses over 4,300 digits)
        raise _SyntaxProblem(f"number '{str(tok)[:20]}...' ({len(text)} digits) is out of range", span)
    value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
    try:
        big = not math.isfinite(value) or abs(value) > 1e300
    except OverflowError:  # an integer literal too long to compare with a float
        big = True
    if big:
        raise _SyntaxProblem(f"number '{tok}' is out of range", span)
    return ast.Number(value, unit, span=span)


class _Builder(Transformer[Token, Any]):
    """Builds AST nodes; every node gets a span from the Lark meta or token positions."""

    def __init__(self, filename: str, text: str) -> None:
        super().__init__()
        self.filename = filename
        self.text = text

    # ---- spans
    def _span(self, meta: Any) -> SourceSpan:
        if getattr(meta, "empty", True):
            return SourceSpan(self.filename, 1, 1, text=self.text)
        return SourceSpan(self.filename, meta.line, meta.column, meta.end_line, meta.end_column, self.text)

    def _tspan(self, tok: Token) -> SourceSpan:
        return SourceSpan(self.filename, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column, self.text)

    # ---- file structure
    @v_args(meta=True)
    def start(self, meta: Any, items: list[Any]) -> list[Any]:
        return items

    @v_args(meta=True)
    def stmt_outside(self, meta: Any, children: list[Any]) -> Any:
        stmt = children[0]
        kind = stmt.to_text().split()[0]
        raise _SyntaxProblem(f"'{kind}' must be inside the 'policy NAME {{ ... }}' block", stmt.span)

    @v_args(meta=True)
    def policy_block(self, meta: Any, children: list[Any]) -> ast.Policy:
        name, *body = children
        return ast.Policy(str(name), tuple(body), span=self._tspan(name))

    @v_args(meta=True)
    def import_stmt(self, meta: Any, children: list[Any]) -> ast.Import:
        return ast.Import(json.loads(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def input_stmt(self, meta: Any, children: list[Any]) -> ast.InputDecl:
        name, dtype, *dims = children
        shape: list[int] = []
        for d in dims:
            if d is None:
                continue
            n = _quantity(d, self._tspan(d))
            if not isinstance(n.value, int) or n.unit or n.value <= 0:
                raise _SyntaxProblem(f"a dimension must be a positive integer, got '{d}'", n.span)
            shape.append(n.value)
        return ast.InputDecl(str(name), str(dtype), tuple(shape), span=self._span(meta))

    @v_args(meta=True)
    def calib_stmt(self, meta: Any, children: list[ast.Option]) -> ast.Calibrate:
        return ast.Calibrate(tuple(children), span=self._span(meta))

    @v_args(meta=True)
    def runtime_stmt(self, meta: Any, children: list[Any]) -> ast.Runtime:
        return ast.Runtime(tuple(children[0]) if children and children[0] else (), span=self._span(meta))

    @v_args(meta=True)
    def calib_item(self, meta: Any, children: list[Any]) -> ast.Option:
        return ast.Option(str(children[0]), children[1], span=self._tspan(children[0]))

    @v_args(meta=True)
    def let_stmt(self, meta: Any, children: list[Any]) -> ast.Let:
        return ast.Let(str(children[0]), children[1], span=self._tspan(children[0]))

    @v_args(meta=True)
    def param_stmt(self, meta: Any, children: list[Any]) -> ast.Param:
        return ast.Param(str(children[0]), children[1], span=self._tspan(children[0]))

    @v_args(meta=True)
    def budget_stmt(self, meta: Any, children: list[ast.BudgetItem]) -> ast.Budget:
        return ast.Budget(tuple(children), span=self._span(meta))

    @v_args(meta=True)
    def budget_item(self, meta: Any, children: list[Any]) -> ast.BudgetItem:
        return ast.BudgetItem(str(children[0]), children[2], span=self._tspan(children[0]))

    @v_args(meta=True)
    def bounds_stmt(self, meta: Any, children: list[Any]) -> ast.Bounds:
        _on, sel, opts = children
        return ast.Bounds(opts, sel, span=self._span(meta))

    @v_args(meta=True)
    def guard_stmt(self, meta: Any, children: list[Any]) -> ast.Guard:
        a, b, _le, value = children
        metric = f"{a}_{b}"
        span = SourceSpan(self.filename, a.line, a.column, b.end_line, b.end_column, self.text)
        return ast.Guard(metric, value, span=span)

    @v_args(meta=True)
    def invocation(self, meta: Any, children: list[Any]) -> ast.Invocation:
        name, _on, sel, opts, expect = children
        return ast.Invocation(
            str(name), sel, opts or (), expect, span=self._span(meta), name_span=self._tspan(name)
        )

    @v_args(meta=True)
    def options(self, meta: Any, children: list[Any]) -> tuple[ast.Option, ...]:
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def option(self, meta: Any, children: list[Any]) -> ast.Option:
        return ast.Option(str(children[0]), children[1], span=self._tspan(children[0]))

    @v_args(meta=True)
    def expect(self, meta: Any, children: list[Any]) -> ast.Expect:
        low_tok, rng, high_tok = children
        span = self._span(meta)
        bounds: list[int | None] = []
        for tok in (low_tok, high_tok):
            if tok is None:
                bounds.append(None)
                continue
            n = _quantity(tok, self._tspan(tok))
            if not isinstance(n.value, int) or n.unit or n.value < 0:
                raise _SyntaxProblem(f"'expect' takes non-negative integer counts, got '{tok}'", n.span)
            bounds.append(n.value)
        low = bounds[0] if bounds[0] is not None else 0
        high = bounds[1] if rng is not None else low
        return ast.Expect(low, high, span=span)

    # ---- values
    @v_args(meta=True)
    def number(self, meta: Any, children: list[Token]) -> ast.Number:
        return _quantity(children[0], self._tspan(children[0]))

    @v_args(meta=True)
    def string(self, meta: Any, children: list[Token]) -> ast.Str:
        return ast.Str(json.loads(children[0]), span=self._tspan(children[0]))

    @v_args(meta=True)
    def ident(self, meta: Any, children: list[Token]) -> ast.Ident:
        return ast.Ident(str(children[0]), span=self._tspan(children[0]))

    @v_args(meta=True)
    def words(self, meta: Any, children: list[Token]) -> ast.Words:
        return ast.Words(tuple(ast.Ident(str(t), span=self._tspan(t)) for t in children), span=self._span(meta))

    @v_args(meta=True)
    def list_value(self, meta: Any, children: list[Any]) -> ast.ListValue:
        return ast.ListValue(tuple(c for c in children if c is not None), span=self._span(meta))

    # ---- selectors
    @v_args(meta=True)
    def sel_name(self, meta: Any, children: list[Token]) -> ast.SelName:
        return ast.SelName(str(children[0]), span=self._tspan(children[0]))

    @v_args(meta=True)
    def sel_glob(self, meta: Any, children: list[Token]) -> ast.SelGlob:
        return ast.SelGlob(str(children[0]), span=self._tspan(children[0]))

    @v_args(meta=True)
    def sel_string(self, meta: Any, children: list[Token]) -> ast.SelString:
        return ast.SelString(json.loads(children[0]), span=self._tspan(children[0]))

    @v_args(meta=True)
    def sel_regex(self, meta: Any, children: list[Token]) -> ast.SelRegex:
        body = str(children[0])[3:-1]
        pattern = re.sub(r'\\(.)', lambda m: '"' if m.group(1) == '"' else m.group(0), body)
        return ast.SelRegex(pattern, span=self._tspan(children[0]))

    @v_args(meta=True)
    def sel_type(self, meta: Any, children: list[Token]) -> ast.SelType:
        return ast.SelType(tuple(str(c) for c in children), span=self._span(meta))

    @v_args(meta=True)
    def sel_all(self, meta: Any, children: list[Any]) -> ast.SelAll:
        return ast.SelAll(span=self._span(meta))

    def func_name(self, children: list[Token]) -> str:
        return str(children[0])

    @v_args(meta=True)
    def sel_func(self, meta: Any, children: list[Any]) -> ast.SelFunc:
        return ast.SelFunc(children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def sel_between(self, meta: Any, children: list[Any]) -> ast.SelBetween:
        return ast.SelBetween(children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def sel_where(self, meta: Any, children: list[Any]) -> ast.SelWhere:
        return ast.SelWhere(children[0], children[1], span=self._span(meta))

    def _binary(self, op: str, meta: Any, children: list[Any]) -> ast.SelBinary:
        return ast.SelBinary(op, children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def sel_except(self, meta: Any, children: list[Any]) -> ast.SelBinary:
        return self._binary("except", meta, children)

    @v_args(meta=True)
    def sel_union(self, meta: Any, children: list[Any]) -> ast.SelBinary:
        return self._binary("|", meta, children)

    @v_args(meta=True)
    def sel_inter(self, meta: Any, children: list[Any]) -> ast.SelBinary:
        return self._binary("&", meta, children)

    # ---- conditions
    @v_args(meta=True)
    def compare(self, meta: Any, children: list[Any]) -> ast.Compare:
        return ast.Compare(str(children[0]), children[1], children[2], span=self._span(meta))

    def cmp_op(self, children: list[Token]) -> str:
        return str(children[0])

    @v_args(meta=True)
    def cond_or(self, meta: Any, children: list[Any]) -> ast.BoolOp:
        return ast.BoolOp("or", children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def cond_and(self, meta: Any, children: list[Any]) -> ast.BoolOp:
        return ast.BoolOp("and", children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def cond_negate(self, meta: Any, children: list[Any]) -> ast.NotCond:
        return ast.NotCond(children[0], span=self._span(meta))


# ---- syntax errors -------------------------------------------------------------------------------
def _describe_expected(expected: set[str]) -> str:
    parser = _lark()
    words = set()
    for name in expected:
        if name in _TERMINAL_WORDS:
            words.add(_TERMINAL_WORDS[name])
            continue
        try:
            term = parser.get_terminal(name)
        except KeyError:
            words.add(name.lower())
            continue
        if term.pattern.type == "str":
            words.add(f"'{term.pattern.value}'")
        else:
            words.add(name.lower())
    ordered = sorted(words, key=lambda w: (not w.startswith("'"), w))
    if len(ordered) > 8:
        ordered = [*ordered[:8], "..."]
    return ", ".join(ordered)


def _token_words(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok}'"


def _eof_span(filename: str, text: str) -> SourceSpan:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return SourceSpan(filename, 1, 1, text=text)
    return SourceSpan(filename, len(lines), len(lines[-1]) + 1, text=text)


def _unclosed_brace(text: str) -> tuple[int, int] | None:
    """(line, column) of the innermost '{' that no '}' closes, strings and comments skipped; None when every
    '{' is closed."""
    open_at: list[tuple[int, int]] = []
    line, col, i = 1, 1, 0
    while i < len(text):
        ch = text[i]
        if ch == "#":  # a comment, to the end of the line
            while i < len(text) and text[i] != "\n":
                i, col = i + 1, col + 1
            continue
        if ch == '"':  # a string (or a re"..." pattern): nothing in it is a brace
            i, col = i + 1, col + 1
            while i < len(text) and text[i] not in '"\n':
                step = 2 if text[i] == "\\" else 1
                i, col = i + step, col + step
        elif ch == "{":
            open_at.append((line, col))
        elif ch == "}" and open_at:
            open_at.pop()
        if i < len(text) and text[i] == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    return open_at[-1] if open_at else None


def _syntax_diagnostic(e: UnexpectedInput, filename: str, text: str) -> Diagnostic:
    if isinstance(e, UnexpectedToken) and e.token.type != "$END":
        tok = e.token
        span = SourceSpan(filename, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column, text)
        msg = f"unexpected {_token_words(tok)}; expected {_describe_expected({str(x) for x in e.expected})}"
        if tok.type == "NAME" and e.expected and "NAME" not in e.expected:
            msg += did_you_mean(str(tok), _keywords_of({str(x) for x in e.expected}))
        return Diagnostic(msg, span=span)
    if isinstance(e, UnexpectedToken | UnexpectedEOF):
        expected = {str(x) for x in (e.expected or ())}
        span = _eof_span(filename, text)
        brace = _unclosed_brace(text) if "RBRACE" in expected else None
        where = f" (the '{{' at {brace[0]}:{brace[1]} is not closed)" if brace else ""
        return Diagnostic(f"unexpected end of file{where}; expected {_describe_expected(expected)}", span=span)
    if not isinstance(e, UnexpectedCharacters):
        return Diagnostic(f"syntax error: {e}", span=_eof_span(filename, text))
    span = SourceSpan(filename, e.line, e.column, e.line, e.column + 1, text)
    pos = e.pos_in_stream or 0
    ch = text[pos] if 0 <= pos < len(text) else "?"
    hint = f"; expected {_describe_expected(set(e.allowed))}" if e.allowed else ""
    return Diagnostic(f"unexpected character {ch!r}{hint}", span=span)


def _keywords_of(expected: set[str]) -> list[str]:
    out = []
    for name in expected:
        try:
            term = _lark().get_terminal(name)
        except KeyError:
            continue
        if term.pattern.type == "str" and str(term.pattern.value).isidentifier():
            out.append(str(term.pattern.value))
    return out


def _blank_lines(text: str, line: int) -> str | None:
    """`text` with line `line` (and the lines up to its closing brace) replaced by spaces.

    None when there is nothing to blank (the line is empty or is the policy header, without
    which the rest of the block cannot be recovered).
    """
    lines = text.split("\n")
    if not 1 <= line <= len(lines) or not lines[line - 1].strip():
        return None
    if re.match(r"\s*policy\b", lines[line - 1]):
        return None
    depth, i = 0, line - 1
    while i < len(lines):
        depth += lines[i].count("{") - lines[i].count("}")
        lines[i] = " " * len(lines[i])
        if depth <= 0:
            break
        i += 1
    return "\n".join(lines)


def _faulty_line(text: str, line: int, col: int) -> int:
    """The line to blank for an error at (line, col): an error at the first token of a line
    usually means the statement on the previous non-blank line is unfinished."""
    lines = text.split("\n")
    if 1 <= line <= len(lines) and not lines[line - 1][: col - 1].strip():
        prev = line - 1
        while prev >= 1 and not lines[prev - 1].split("#")[0].strip():
            prev -= 1
        if prev >= 1 and not re.match(r"\s*policy\b", lines[prev - 1]):
            return prev
    return line


def _parse_tree_items(text: str, filename: str) -> tuple[list[Any], list[Diagnostic]]:
    """Parses `text`, re-parsing with failed statements blanked out to find further errors."""
    diags: list[Diagnostic] = []
    seen: set[tuple[int, int]] = set()
    current = text
    for _ in range(4 * MAX_SYNTAX_ERRORS):
        try:
            tree = _lark().parse(current, start="start")
            items = _Builder(filename, text).transform(tree)
            return (items if not diags else []), diags
        except UnexpectedInput as e:
            d = _syntax_diagnostic(e, filename, text)
            at_end = isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END")
        except VisitError as e:
            if not isinstance(e.orig_exc, _SyntaxProblem):
                raise
            d = Diagnostic(e.orig_exc.message, span=e.orig_exc.span)
            at_end = False
        if d.span is None:
            diags.append(d)
            break
        pos = (d.span.line, d.span.col)
        repeated = pos in seen
        if not repeated:
            if diags and diags[-1].span is not None and pos < (diags[-1].span.line, diags[-1].span.col):
                break  # an error before one already reported is a cascade of it
            diags.append(d)
            seen.add(pos)
        if at_end or len(diags) >= MAX_SYNTAX_ERRORS:
            break
        # first try the statement the error most likely belongs to, then the error's own line
        target = d.span.line if repeated else _faulty_line(current, *pos)
        nxt = _blank_lines(current, target)
        if nxt is None and target != d.span.line:
            nxt = _blank_lines(current, d.span.line)
        if nxt is None:
            break
        current = nxt
    return [], diags


# ---- files and imports ---------------------------------------------------------------------------
def _split_items(
    items: list[Any], filename: str, text: str, *, main: bool
) -> tuple[ast.Policy | None, list[ast.Import], list[ast.Definition], list[Diagnostic]]:
    diags: list[Diagnostic] = []
    policy: ast.Policy | None = None
    imports: list[ast.Import] = []
    defs: list[ast.Definition] = []
    for it in items:
        if isinstance(it, ast.Import):
            if policy is not None or defs:
                diags.append(Diagnostic("'import' must come before every other statement", span=it.span))
            imports.append(it)
        elif isinstance(it, ast.Let | ast.Param):
            defs.append(it)
        elif isinstance(it, ast.Policy):
            if policy is not None:
                diags.append(Diagnostic(f"a second policy block '{it.name}'; a file holds one policy", span=it.span))
                continue
            policy = it
            nested = [s for s in it.body if isinstance(s, ast.Import)]
            for imp in nested:
                diags.append(Diagnostic("'import' must come at the top of the file, before 'policy'", span=imp.span))
            if nested:
                policy = ast.Policy(
                    it.name, tuple(s for s in it.body if not isinstance(s, ast.Import)), span=it.span
                )
    if main and policy is None and not diags:
        diags.append(Diagnostic("expected a 'policy NAME { ... }' block", span=_eof_span(filename, text)))
    return policy, imports, defs, diags


class _Loader:
    """Reads imported files once each, reports cycles and missing files at the import statement."""

    def __init__(self) -> None:
        self.cache: dict[str, ast.Module] = {}
        self.diags: list[Diagnostic] = []

    def resolve(self, imp: ast.Import, importer: str) -> Path:
        base = Path(importer).parent if not importer.startswith("<") else Path.cwd()
        return (base / imp.path).resolve()

    def load_imports(self, imports: list[ast.Import], importer: str, stack: tuple[str, ...]) -> tuple[ast.Module, ...]:
        mods = []
        for imp in imports:
            path = self.resolve(imp, importer)
            key = str(path)
            if key in stack:
                chain = " -> ".join(Path(p).name for p in (*stack[stack.index(key):], key))
                self.diags.append(Diagnostic(f"import cycle: {chain}", span=imp.span))
                continue
            if key in self.cache:
                mods.append(self.cache[key])
                continue
            try:
                text = read_policy_text(path)
            except (OSError, UnicodeDecodeError) as e:
                self.diags.append(Diagnostic(f"cannot import '{imp.path}': {_read_error(e)}", span=imp.span))
                continue
            shown = str(Path(importer).parent / imp.path) if not importer.startswith("<") else imp.path
            items, diags = _parse_tree_items(text, shown)
            self.diags += diags
            if diags:
                continue
            policy, sub_imports, defs, d2 = _split_items(items, shown, text, main=False)
            self.diags += d2
            if policy is not None:
                defs += [s for s in policy.body if isinstance(s, ast.Let | ast.Param)]
            sub = self.load_imports(sub_imports, shown, (*stack, key))
            mod = ast.Module(shown, tuple(sub_imports), tuple(defs), sub)
            self.cache[key] = mod
            mods.append(mod)
        return tuple(mods)


def _apply_overrides(policy: ast.Policy, params: Mapping[str, str]) -> tuple[ast.Policy, list[Diagnostic]]:
    """Replaces `param` defaults by `--set key=value` / `params={...}` values (parsed as policy values)."""
    diags: list[Diagnostic] = []
    declared = {d.name: d for d in policy.all_definitions() if isinstance(d, ast.Param)}
    read = ast.names_read(policy)
    new_values: dict[str, ast.Value] = {}
    for key, raw in params.items():
        src = f"{key}={raw}"
        where = SourceSpan(ast.OVERRIDE_FILE, 1, 1, 1, len(key) + 1, src)
        if key not in declared:
            known = sorted(declared)
            hint = did_you_mean(key, known) or (
                f" (declared: {', '.join(known)})" if known else " (the policy declares no 'param')"
            )
            diags.append(Diagnostic(f"unknown parameter '{key}'{hint}", span=where))
            continue
        if key not in read:  # the user believes it changed something: it changes nothing
            diags.append(Diagnostic(
                f"parameter '{key}' is set, but no statement of the policy reads it: setting it changes nothing",
                span=where, notes=(f"'{key}' is declared at {declared[key].span}",)))
            continue
        try:
            value = parse_value(str(raw), ast.OVERRIDE_FILE, offset=len(key) + 1, full_text=src)
        except PolicyError as e:
            diags += e.diagnostics
            continue
        new_values[key] = value
    if diags or not new_values:
        return policy, diags

    def swap(d: ast.Definition) -> ast.Definition:
        if isinstance(d, ast.Param) and d.name in new_values:
            return ast.Param(d.name, new_values[d.name], span=d.span)
        return d

    def swap_mod(m: ast.Module) -> ast.Module:
        return ast.Module(m.path, m.imports, tuple(swap(d) for d in m.definitions), tuple(swap_mod(s) for s in m.modules))

    body = tuple(swap(s) if isinstance(s, ast.Param) else s for s in policy.body)
    return (
        ast.Policy(
            policy.name, body, policy.imports, tuple(swap(d) for d in policy.definitions),
            span=policy.span, modules=tuple(swap_mod(m) for m in policy.modules),
        ),
        diags,
    )


def parse_value(text: str, filename: str = "<value>", *, offset: int = 0, full_text: str | None = None) -> ast.Value:
    """Parses one value (`25%`, `"x"`, `[1, 2]`, `gdnt`); used for parameter overrides."""
    shown = full_text if full_text is not None else text
    padded = " " * offset + text
    try:
        tree = _lark().parse(padded, start="value")
        result: ast.Value = _Builder(filename, shown).transform(tree)
        return result
    except UnexpectedInput as e:
        raise PolicyError(_syntax_diagnostic(e, filename, shown)) from None
    except VisitError as e:
        if isinstance(e.orig_exc, _SyntaxProblem):
            raise PolicyError(Diagnostic(e.orig_exc.message, span=e.orig_exc.span)) from None
        raise


def parse_policy(text: str, filename: str = "<policy>", *, params: Mapping[str, str] | None = None) -> ast.Policy:
    """Parses a policy (resolving its imports relative to `filename`); raises `PolicyError` with every syntax error."""
    text = normal_lines(text.removeprefix(BOM))
    try:
        return _parse_policy(text, filename, params)
    except RecursionError:
        raise PolicyError(too_deep(filename, text)) from None


def too_deep(filename: str, text: str) -> Diagnostic:
    """The error for a policy nested deeper than Python's recursion allows, located at its longest line."""
    lines = text.splitlines() or [""]
    n = max(range(len(lines)), key=lambda i: len(lines[i]))
    return Diagnostic("the policy nests too deeply to read (an expression or selector chain of thousands of "
                      "terms); name parts of it with `let`", span=SourceSpan(filename, n + 1, 1, text=text))


def _parse_policy(text: str, filename: str, params: Mapping[str, str] | None) -> ast.Policy:
    items, diags = _parse_tree_items(text, filename)
    if diags:
        raise PolicyError(diags)
    policy, imports, defs, diags = _split_items(items, filename, text, main=True)
    if diags or policy is None:
        raise PolicyError(diags or [Diagnostic("empty policy", span=_eof_span(filename, text))])
    loader = _Loader()
    here = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    modules = loader.load_imports(imports, filename, (here,))
    if loader.diags:
        raise PolicyError(loader.diags)
    policy = ast.Policy(
        policy.name, policy.body, tuple(imports), tuple(defs), span=policy.span, modules=modules
    )
    if params:
        policy, d3 = _apply_overrides(policy, params)
        if d3:
            raise PolicyError(d3)
    return policy


BOM = "\ufeff"


def read_policy_text(path: str | Path) -> str:
    """The text of a policy file: UTF-8, a leading byte-order mark (as some editors write) dropped, line ends
    read as `\n` (`normal_lines`)."""
    return normal_lines(Path(path).read_bytes().decode("utf-8-sig"))


def normal_lines(text: str) -> str:
    """`text` with CR LF and lone CR line ends as LF: the parser counts lines by LF, so a file saved with CR ends
    located every error on line 1."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_error(e: OSError | UnicodeDecodeError) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "it is a directory"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start})"
    return e.strerror or str(e)


def load_policy(path: str | Path, *, params: Mapping[str, str] | None = None) -> ast.Policy:
    """Reads and parses a policy file; an unreadable file is a `PolicyError` too."""
    p = Path(path)
    try:
        text = read_policy_text(p)
    except UnicodeDecodeError as e:  # located at the first bad byte's line and column
        raw = e.object[:e.start] if isinstance(e.object, bytes) else b""
        line = raw.count(b"\n") + 1
        col = len(raw) - (raw.rfind(b"\n") + 1) + 1
        raise PolicyError(Diagnostic(f"cannot read policy '{p}': {_read_error(e)}",
                                     span=SourceSpan(str(path), line, col))) from None
    except OSError as e:
        raise PolicyError(Diagnostic(f"cannot read policy '{p}': {_read_error(e)}")) from None
    except ValueError:  # a NUL in the path, which no file name holds
        raise PolicyError(Diagnostic(f"cannot read policy '{p}': a file name cannot hold a NUL byte")) from None
    return parse_policy(text, str(path), params=params)
