"""Reads the IR text form back into a `Graph`: `parse_graph(text)`, the inverse of `print_graph(g, values=True)`.

The form (whitespace is free; `//` starts a comment that runs to the end of the line):

    graph NAME (INPUT, ...) -> (OUTPUT, ...) {
      centroids @LABEL [name='...'] = TENSOR              // a codebook table several weights share
      %ID[: META, ...] = KIND(%ID[#K], ...) [{ATTR=VALUE, ...}] [<PARAM = WEIGHT, ...>] ['OP_TYPE' in [...]]
    }

- Names (graph, node ids, attribute and param names) are bare when made of letters, digits and `_./-`,
  else quoted as a Python string (`%'onnx::Conv_3'`). `%a#1` is output 1 of node `a`.
- `META` is `float32[2, 3]` per output (`?` or nothing: let shape inference fill it). When written, it
  must match what shape inference gives.
- Attribute values: integers, floats (`1e-05`, `inf`, `nan`), strings (`'x'`), `True`/`False`/`None`,
  lists `[...]`, tuples `(...)` (`(1,)` for one element), and tensors.
- `TENSOR` is `DTYPE[SHAPE] DATA`: DATA is a literal, nested as the shape (`[[1.0, 2.0], [3.0, 4.0]]`) or
  flat, or a generator: `randn(seed=S, scale=1.0, mean=0.0)`, `rand(seed=S, low=0.0, high=1.0)`,
  `randint(seed=S, low=L, high=H)`, `zeros`, `ones`, `full(V)`, `arange(start=0, step=1)` (each seeded
  generator is its own `torch.Generator`, so a file means the same tensor everywhere). DTYPE is a torch
  dtype name (`float32`, `int8`, ...) or a short alias (`f32`, `i64`, ...).
- `WEIGHT` is a `TENSOR` (dense) or an encoded weight, written as its form (the words of
  `describe()`) followed either by `of TENSOR` (encode these dense values deterministically:
  `Affine.quantize` / `Sparse.from_dense`) or by its stored components (what `print_graph(values=True)`
  writes, exact):
    - affine: `int8 per-tensor | per-axis(A) | block B on axis A [asym] [as DTYPE] {q = T, scale = T
      [, zero_point = T]}`; `int8 per-axis(0) asym of f32[4, 3] randn(seed=1)` quantizes asymmetrically;
    - sparse: `coo | csr | N:M [SHAPE] {values = T, indices = T}`, or `2:4 of TENSOR`;
    - codebook: `codebook [k=K] [huffman] @LABEL {indices = T}` (a shared table) or
      `codebook [k=K] [huffman] {indices = T, centroids = T}`.

Errors are `VerifyError`s located at `file:line:col`; after reading, shapes are inferred and the graph
is verified (problems of a node are located at its id).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError, SourceSpan, VerifyError, did_you_mean
from netsqueeze.ir.dims import Dim
from netsqueeze.ir.graph import Graph, Origin, TensorMeta
from netsqueeze.ir.ops import OPS, infer_node
from netsqueeze.ir.weights import Affine, Centroids, Codebook, Sparse, Weight

__all__ = ["load_graph", "parse_graph"]

_ALIASES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64", "i8": "int8",
            "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8"}
_INT_TYPES = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False),
              "int16": (16, True), "int32": (32, True)}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"(?:[A-Za-z0-9_.]|/(?!/)|-(?!>))+")
_NUMBER = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)(?![A-Za-z0-9_])")
_INT = re.compile(r"[-+]?\d+(?![A-Za-z0-9_.])")
_NM = re.compile(r"(\d+):(\d+)")


def torch_dtype(name: str) -> torch.dtype | None:
    dt = getattr(torch, _ALIASES.get(name, name), None)
    return dt if isinstance(dt, torch.dtype) else None


@dataclass
class _NodeDecl:
    id: str
    pos: int
    kind: str
    kind_pos: int
    operands: list[tuple[str, int, int]]  # id, output index, position
    attrs: dict[str, Any]
    params: dict[str, Weight]
    metas: list[TensorMeta] | None
    meta_pos: int
    meta_end: int
    op_type: str | None = None


@dataclass
class _Parser:
    text: str
    file: str
    pos: int = 0
    tables: dict[str, Centroids] = field(default_factory=dict)

    # ---- locations and errors ------------------------------------------------------------------
    def span(self, start: int, end: int | None = None) -> SourceSpan:
        line = self.text.count("\n", 0, start) + 1
        col = start - (self.text.rfind("\n", 0, start) + 1) + 1
        end_col = None
        if end is not None and end > start and "\n" not in self.text[start:end]:
            end_col = col + (end - start)
        return SourceSpan(self.file, line, col, line if end_col else None, end_col, self.text)

    def error(self, msg: str, start: int | None = None, end: int | None = None) -> VerifyError:
        p = self.pos if start is None else start
        return VerifyError(Diagnostic(msg, span=self.span(p, end)))

    def found(self) -> str:
        self.ws()
        if self.pos >= len(self.text):
            return "end of input"
        m = _WORD.match(self.text, self.pos) or _NUMBER.match(self.text, self.pos)
        return f"'{m.group(0)}'" if m else f"'{self.text[self.pos]}'"

    def expected(self, what: str) -> VerifyError:
        self.ws()
        return self.error(f"expected {what}, found {self.found()}")

    # ---- tokens --------------------------------------------------------------------------------
    def ws(self) -> None:
        t = self.text
        while self.pos < len(t):
            if t[self.pos].isspace():
                self.pos += 1
            elif t.startswith("//", self.pos):
                nl = t.find("\n", self.pos)
                self.pos = len(t) if nl < 0 else nl
            else:
                break

    def peek(self, s: str) -> bool:
        self.ws()
        return self.text.startswith(s, self.pos)

    def eat(self, s: str) -> bool:
        if self.peek(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str, what: str | None = None) -> int:
        if not self.peek(s):
            raise self.expected(what or f"'{s}'")
        start = self.pos
        self.pos += len(s)
        return start

    def match(self, rx: re.Pattern[str]) -> tuple[str, int] | None:
        self.ws()
        m = rx.match(self.text, self.pos)
        if not m:
            return None
        self.pos = m.end()
        return m.group(0), m.start()

    def peek_word(self) -> str | None:
        self.ws()
        m = _WORD.match(self.text, self.pos)
        return m.group(0) if m else None

    def word(self, what: str) -> tuple[str, int]:
        m = self.match(_WORD)
        if m is None:
            raise self.expected(what)
        return m

    def keyword(self, kw: str) -> bool:
        if self.peek_word() == kw:
            self.pos += len(kw)
            return True
        return False

    def string(self) -> tuple[str, int] | None:
        self.ws()
        t, start = self.text, self.pos
        if start >= len(t) or t[start] not in "'\"":
            return None
        q, i = t[start], start + 1
        while i < len(t) and t[i] != q:
            if t[i] == "\n":
                break
            i += 2 if t[i] == "\\" else 1
        if i >= len(t) or t[i] != q:
            raise self.error("unterminated string", start)
        try:
            value = ast.literal_eval(t[start:i + 1])
        except (ValueError, SyntaxError):
            raise self.error("malformed string", start, i + 1) from None
        self.pos = i + 1
        return str(value), start

    def name(self, what: str) -> tuple[str, int]:
        s = self.string()
        if s is not None:
            return s
        m = self.match(_NAME)
        if m is None:
            raise self.expected(what)
        return m

    def integer(self, what: str) -> tuple[int, int]:
        m = self.match(_INT)
        if m is None:
            raise self.expected(what)
        return int(m[0]), m[1]

    def shape(self) -> tuple[int, ...]:
        self.expect("[")
        dims: list[int] = []
        if not self.eat("]"):
            while True:
                d, p = self.integer("a dimension")
                if d < 0:
                    raise self.error(f"negative dimension {d}", p)
                dims.append(d)
                if self.eat("]"):
                    break
                self.expect(",", "',' or ']'")
        return tuple(dims)

    def dtype(self, what: str = "a dtype") -> tuple[torch.dtype, int]:
        w, p = self.word(what)
        dt = torch_dtype(w)
        if dt is None:
            raise self.error(f"unknown dtype '{w}'", p, p + len(w))
        return dt, p

    # ---- the graph -----------------------------------------------------------------------------
    def graph(self) -> Graph:
        if self.peek_word() != "graph":
            raise self.expected("'graph'")
        self.pos += len("graph")
        gname, _ = self.name("a graph name")
        ins = self.name_list()
        self.expect("->")
        outs = self.name_list()
        self.expect("{")
        decls: list[_NodeDecl] = []
        while not self.eat("}"):
            if self.keyword("centroids"):
                self.table()
            elif self.peek("%"):
                decls.append(self.node())
            else:
                raise self.expected("'%' (a node), 'centroids' or '}'")
        self.ws()
        if self.pos < len(self.text):
            raise self.error(f"unexpected {self.found()} after the graph")
        return self.build(gname, ins, outs, decls)

    def name_list(self) -> list[tuple[str, int]]:
        self.expect("(")
        out: list[tuple[str, int]] = []
        if self.eat(")"):
            return out
        while True:
            out.append(self.name("a node name"))
            if self.eat(")"):
                return out
            self.expect(",", "',' or ')'")

    def table(self) -> None:
        self.expect("@")
        label, p = self.name("a table label")
        cname = "" if re.fullmatch(r"_\d+", label) else label
        if self.keyword("name"):
            self.expect("=")
            s = self.string()
            if s is None:
                raise self.expected("a quoted table name")
            cname = s[0]
        self.expect("=")
        if label in self.tables:
            raise self.error(f"table '@{label}' is defined twice", p, p + len(label))
        self.tables[label] = Centroids(self.tensor(), cname)

    def node(self) -> _NodeDecl:
        self.expect("%")
        nid, pos = self.name("a node id")
        metas: list[TensorMeta] | None = None
        meta_pos = meta_end = pos
        if self.eat(":"):
            self.ws()
            meta_pos = self.pos
            if not self.eat("?"):
                metas = []
                while True:
                    w, _ = self.word("an output type like float32[2, 3]")
                    metas.append(TensorMeta(self.shape(), _ALIASES.get(w, w)))
                    meta_end = self.pos
                    if not self.eat(","):
                        break
        self.expect("=")
        kind, kind_pos = self.word("an op kind")
        self.expect("(")
        operands: list[tuple[str, int, int]] = []
        if not self.eat(")"):
            while True:
                self.ws()
                p = self.expect("%", "an operand like %x")
                src, _ = self.name("an operand id")
                out = 0
                if self.text.startswith("#", self.pos):
                    self.pos += 1
                    m = _INT.match(self.text, self.pos)
                    if m is None or m.group(0).startswith(("-", "+")):
                        raise self.error("expected an output index after '#'")
                    out = int(m.group(0))
                    self.pos = m.end()
                operands.append((src, out, p))
                if self.eat(")"):
                    break
                self.expect(",", "',' or ')'")
        attrs: dict[str, Any] = {}
        if self.eat("{") and not self.eat("}"):
            while True:
                k, kp = self.name("an attribute name")
                if k in attrs:
                    raise self.error(f"attribute '{k}' is given twice", kp, kp + len(k))
                self.expect("=")
                attrs[k] = self.value()
                if self.eat("}"):
                    break
                self.expect(",", "',' or '}'")
        params: dict[str, Weight] = {}
        if self.eat("<") and not self.eat(">"):
            while True:
                k, kp = self.name("a param name")
                if k in params:
                    raise self.error(f"param '{k}' is given twice", kp, kp + len(k))
                self.expect("=")
                params[k] = self.weight()
                if self.eat(">"):
                    break
                self.expect(",", "',' or '>'")
        op_type = None
        if self.eat("["):
            s = self.string()
            if s is None:
                self.ws()
                end = self.text.find("]", self.pos)
                if end < 0 or "\n" in self.text[self.pos:end]:
                    raise self.expected("an op type and ']'")
                s = (self.text[self.pos:end].strip(), self.pos)
                self.pos = end
            op_type = s[0]
            self.expect("]")
        return _NodeDecl(nid, pos, kind, kind_pos, operands, attrs, params, metas, meta_pos, meta_end, op_type)

    # ---- values --------------------------------------------------------------------------------
    def value(self) -> Any:
        self.ws()
        s = self.string()
        if s is not None:
            return s[0]
        if self.eat("["):
            items = self.items("]")
            return items
        if self.eat("("):
            start = self.pos
            items = self.items(")")
            if len(items) == 1 and not self.text[start:self.pos - 1].rstrip().endswith(","):
                return items[0]
            return tuple(items)
        w = self.peek_word()
        if w in ("True", "False", "None"):
            self.pos += len(w)
            return {"True": True, "False": False, "None": None}[w]
        if w == "dim" and self.text.startswith("(", self.pos + 3):
            return self.dim()
        if w is not None and w not in ("inf", "nan") and torch_dtype(w) is not None:
            return self.tensor()
        m = self.match(_NUMBER)
        if m is None:
            raise self.expected("a value")
        return _number(m[0])

    def dim(self) -> Dim:
        """`dim(12, "2*H")`: a size that follows the dynamic dims (example value, expression over their names)."""
        start = self.pos
        self.pos += len("dim(")
        value = self.value()
        self.expect(",", "','")
        self.ws()
        text = self.string()
        if not isinstance(value, int) or isinstance(value, bool) or text is None:
            raise self.error("dim(...) takes an example size and an expression string: dim(12, \"2*H\")", start,
                             self.pos)
        try:
            expr = sympy.sympify(text[0])
            expr = expr.subs({s: sympy.Symbol(s.name, integer=True, positive=True) for s in expr.free_symbols})
        except (sympy.SympifyError, TypeError, SyntaxError) as err:
            raise self.error(f"dim(...): {text[0]!r} is not a size expression ({err})", start, self.pos) from None
        self.expect(")", "')'")
        return Dim(value, expr)

    def items(self, close: str) -> list[Any]:
        out: list[Any] = []
        if self.eat(close):
            return out
        while True:
            out.append(self.value())
            if self.eat(close):
                return out
            self.expect(",", f"',' or '{close}'")
            if self.eat(close):
                return out

    # ---- tensors -------------------------------------------------------------------------------
    def tensor(self) -> torch.Tensor:
        dt, _p = self.dtype()
        self.ws()
        if not self.text.startswith("[", self.pos):
            raise self.expected("a shape after the dtype")
        shape = self.shape()
        self.ws()
        start = self.pos
        w = self.peek_word()
        if w is not None and w not in ("inf", "nan", "True", "False"):
            return self.generator(dt, shape)
        flat: list[tuple[str, int]] = []
        got = self.literal(flat)
        numel = math.prod(shape)
        if got != shape and not (len(got) == 1 and got[0] == numel):
            raise self.error(f"values of shape {list(got)} do not fit {_tname(dt, shape)}", start, self.pos)
        return _make(self, dt, flat).reshape(shape)

    def literal(self, flat: list[tuple[str, int]]) -> tuple[int, ...]:
        self.ws()
        if not self.eat("["):
            m = self.match(_NUMBER) or self.match(re.compile(r"True|False"))
            if m is None:
                raise self.expected("a number, '[' or a generator")
            flat.append(m)
            return ()
        shapes: list[tuple[int, ...]] = []
        start = self.pos - 1
        if not self.eat("]"):
            while True:
                shapes.append(self.literal(flat))
                if self.eat("]"):
                    break
                self.expect(",", "',' or ']'")
        if any(s != shapes[0] for s in shapes):
            raise self.error("ragged tensor literal: rows of different shapes", start, self.pos)
        return (len(shapes), *(shapes[0] if shapes else ()))

    def generator(self, dt: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        gname, gp = self.word("a generator")
        spec = _GENERATORS.get(gname)
        if spec is None:
            raise self.error(f"unknown generator '{gname}'{did_you_mean(gname, _GENERATORS)} (expected a literal "
                             f"or one of {', '.join(sorted(_GENERATORS))})", gp, gp + len(gname))
        allowed, required, make = spec
        args: dict[str, float] = {}
        positional = 0
        if self.eat("(") and not self.eat(")"):
            while True:
                self.ws()
                ap = self.pos
                m = _WORD.match(self.text, self.pos)
                if m and self.text[m.end():].lstrip().startswith("="):
                    key = m.group(0)
                    self.pos = m.end()
                    self.expect("=")
                else:
                    if positional >= len(allowed):
                        raise self.error(f"too many arguments for {gname}", ap)
                    key = allowed[positional]
                    positional += 1
                if key not in allowed:
                    raise self.error(f"{gname} has no argument '{key}'{did_you_mean(key, allowed)} "
                                     f"(it takes {', '.join(allowed) or 'none'})", ap, ap + len(key))
                if key in args:
                    raise self.error(f"argument '{key}' is given twice", ap, ap + len(key))
                num = self.match(_NUMBER)
                if num is None:
                    raise self.expected(f"a number for '{key}'")
                args[key] = _number(num[0])
                if self.eat(")"):
                    break
                self.expect(",", "',' or ')'")
        missing = [k for k in required if k not in args]
        if missing:
            raise self.error(f"{gname} needs {', '.join(repr(k) for k in missing)}", gp, gp + len(gname))
        if "seed" in args and args["seed"] != int(args["seed"]):
            raise self.error("seed must be an integer", gp, gp + len(gname))
        return make(shape, args).to(dt)

    # ---- weights -------------------------------------------------------------------------------
    def weight(self) -> Weight:
        self.ws()
        start = self.pos
        w = self.peek_word()
        nm = _NM.match(self.text, self.pos)
        try:
            if nm is not None or w in ("coo", "csr"):
                return self.sparse(start)
            # `int8[...]` is a plain integer tensor (a zero point), `int8 per-...` an encoded affine weight
            if w in _INT_TYPES and not self.text.startswith("[", self.pos + len(w)):
                return self.affine(start)
            if w == "codebook":
                return self.codebook(start)
        except NetsqueezeError as e:
            if any(d.span is not None for d in e.diagnostics):
                raise
            raise self.error(e.message, start, start + len(w or "")) from None
        if w is not None and torch_dtype(w) is not None:
            return self.tensor()
        raise self.expected("a weight (a dtype like float32, an integer type like int8, coo, csr, N:M or codebook)")

    def components(self, names: tuple[str, ...], required: tuple[str, ...]) -> dict[str, torch.Tensor]:
        self.expect("{", "'of' or '{'")
        out: dict[str, torch.Tensor] = {}
        brace = self.pos - 1
        while True:
            k, kp = self.name("a component name")
            if k not in names:
                raise self.error(f"unknown component '{k}'{did_you_mean(k, names)} (expected {', '.join(names)})",
                                 kp, kp + len(k))
            if k in out:
                raise self.error(f"component '{k}' is given twice", kp, kp + len(k))
            self.expect("=")
            out[k] = self.tensor()
            if self.eat("}"):
                break
            self.expect(",", "',' or '}'")
        missing = [k for k in required if k not in out]
        if missing:
            raise self.error(f"missing component {', '.join(repr(k) for k in missing)}", brace)
        return out

    def affine(self, start: int) -> Affine:
        tname, _ = self.word("an integer type")
        bits, signed = _INT_TYPES[tname]
        axis: int | None = None
        block = 0
        if self.keyword("per-tensor") or self.eat("per-tensor"):
            pass
        elif self.eat("per-axis"):
            self.expect("(")
            axis = self.integer("an axis")[0]
            self.expect(")")
        elif self.keyword("block"):
            block, bp = self.integer("a block size")
            if block <= 0:
                raise self.error("block size must be positive", bp)
            if not (self.keyword("on") and self.keyword("axis")):
                raise self.expected("'on axis'")
            axis = self.integer("an axis")[0]
        else:
            raise self.expected("'per-tensor', 'per-axis(A)' or 'block B on axis A'")
        asym = self.keyword("asym")
        if self.keyword("of"):
            dense = self.tensor()
            if not dense.dtype.is_floating_point:
                raise self.error(f"only a float tensor can be quantized (got {_tname(dense.dtype, dense.shape)})",
                                 start, self.pos)
            return Affine.quantize(dense, bits=bits, signed=signed, axis=axis, block_size=block,
                                   symmetric=not asym)
        dtype = torch.float32
        if self.keyword("as"):
            dtype, _ = self.dtype()
        c = self.components(("q", "scale", "zero_point"), ("q", "scale"))
        if asym != ("zero_point" in c):
            raise self.error("'asym' goes with a zero_point component" if asym else
                             "a zero_point component needs 'asym' in the form", start)
        return Affine(c["q"], c["scale"], c.get("zero_point"), axis, block, bits, signed, dtype)

    def sparse(self, start: int) -> Sparse:
        self.ws()
        nm = _NM.match(self.text, self.pos)
        n = m = 0
        if nm is not None:
            layout, n, m = "nm", int(nm.group(1)), int(nm.group(2))
            self.pos = nm.end()
        else:
            layout = self.word("a sparse layout")[0]
        if self.keyword("of"):
            dense = self.tensor()
            return Sparse.from_dense(dense, layout, n, m)
        self.ws()
        if not self.text.startswith("[", self.pos):
            raise self.expected("'of' or the weight's shape")
        shape = self.shape()
        c = self.components(("values", "indices"), ("values", "indices"))
        return Sparse(c["values"], c["indices"], shape, layout, n, m)

    def codebook(self, start: int) -> Codebook:
        self.word("'codebook'")
        k: int | None = None
        if self.keyword("k"):
            self.expect("=")
            k = self.integer("the number of centroids")[0]
        huffman = self.keyword("huffman")
        if self.keyword("of"):
            raise self.error("a codebook weight is written by its parts: codebook {indices = ..., centroids = ...}",
                             start, self.pos)
        table: Centroids | None = None
        if self.eat("@"):
            label, lp = self.name("a table label")
            if label not in self.tables:
                raise self.error(f"no table '@{label}'{did_you_mean(label, self.tables)} (tables are declared with "
                                 "'centroids @label = ...' before they are used)", lp, lp + len(label))
            table = self.tables[label]
            c = self.components(("indices",), ("indices",))
        else:
            c = self.components(("indices", "centroids"), ("indices", "centroids"))
            table = Centroids(c["centroids"])
        rows = int(table.values.shape[0]) if table.values.dim() else 1  # a kernel bank: one kernel per row
        if k is not None and k != rows:
            raise self.error(f"k={k} but the table has {rows} centroids", start)
        return Codebook(c["indices"], table, huffman)

    # ---- building ------------------------------------------------------------------------------
    def build(self, gname: str, ins: list[tuple[str, int]], outs: list[tuple[str, int]],
              decls: list[_NodeDecl]) -> Graph:
        g = Graph(gname)
        where: dict[str, int] = {}
        for d in decls:
            if d.kind not in OPS:
                raise self.error(f"unknown op kind '{d.kind}'{did_you_mean(d.kind, OPS)}", d.kind_pos,
                                 d.kind_pos + len(d.kind))
            if d.id in where:
                raise self.error(f"node '%{d.id}' is defined twice (first at {self.span(where[d.id])})", d.pos,
                                 d.pos + len(d.id))
            where[d.id] = d.pos
            origin = Origin("text", d.id, d.op_type or "")
            g.add_node(d.id, d.kind, attrs=d.attrs, params=d.params, origin=origin)
            if d.op_type is not None and d.kind != "opaque":
                raise self.error("only opaque nodes carry an op type in '[...]'", d.kind_pos)
            if d.metas is not None:
                g.node(d.id).meta = list(d.metas)
        for d in decls:
            for port, (src, out, p) in enumerate(d.operands):
                if src not in where:
                    raise self.error(f"unknown operand '%{src}'{did_you_mean(src, where)}", p, p + 1 + len(src))
                g.connect(src, d.id, port, out)
        for header, listed, kind in ((ins, g.inputs, "input"), (outs, g.outputs, "output")):
            names = [n for n, _ in header]
            for n, p in header:
                if n not in where or g.node(n).kind != kind:
                    raise self.error(f"'{n}' is listed as a graph {kind} but is not an {kind} node", p, p + len(n))
                if names.count(n) > 1:
                    raise self.error(f"'{n}' is listed twice as a graph {kind}", p, p + len(n))
            for n in listed:
                if n not in names:
                    raise self.error(f"{kind} node '%{n}' is missing from the graph's {kind}s", where[n],
                                     where[n] + len(n))
            listed[:] = names
        by_id = {d.id: d for d in decls}
        try:
            for node in g.nodes():
                d = by_id[node.id]
                for src, out, p in d.operands:
                    have = len(g.node(src).meta)
                    if out >= have:
                        raise self.error(f"'%{src}' has {have} output{'s' * (have != 1)}: there is no '#{out}'", p,
                                         p + 1 + len(src) + 1 + len(str(out)))
                metas = infer_node(g, node)
                if d.metas is not None and d.metas != metas:
                    raise self.error(f"'%{node.id}' is written as {', '.join(str(m) for m in d.metas)} but shape "
                                     f"inference gives {', '.join(str(m) for m in metas)}", d.meta_pos, d.meta_end)
                node.meta = metas
            g.verify()
        except VerifyError as e:
            raise VerifyError([self.locate(diag, where) for diag in e.diagnostics]) from None
        return g

    def locate(self, d: Diagnostic, where: dict[str, int]) -> Diagnostic:
        if d.span is not None or d.node not in where:
            return d
        p = where[d.node]
        return Diagnostic(d.message, d.severity, self.span(p, p + len(d.node)), d.node, d.notes)


# ---- generators --------------------------------------------------------------------------------------
def _gen(args: dict[str, float]) -> torch.Generator:
    return torch.Generator().manual_seed(int(args["seed"]))


def _randn(shape: tuple[int, ...], a: dict[str, float]) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(a)) * a.get("scale", 1.0) + a.get("mean", 0.0)


def _rand(shape: tuple[int, ...], a: dict[str, float]) -> torch.Tensor:
    lo, hi = a.get("low", 0.0), a.get("high", 1.0)
    return torch.rand(shape, generator=_gen(a)) * (hi - lo) + lo


def _randint(shape: tuple[int, ...], a: dict[str, float]) -> torch.Tensor:
    return torch.randint(int(a["low"]), int(a["high"]), shape, generator=_gen(a))


def _arange(shape: tuple[int, ...], a: dict[str, float]) -> torch.Tensor:
    return (torch.arange(math.prod(shape), dtype=torch.float64) * a.get("step", 1) + a.get("start", 0)).reshape(shape)


_Maker = Callable[[tuple[int, ...], dict[str, float]], torch.Tensor]
_GENERATORS: dict[str, tuple[tuple[str, ...], tuple[str, ...], _Maker]] = {
    "randn": (("seed", "scale", "mean"), ("seed",), _randn),
    "rand": (("seed", "low", "high"), ("seed",), _rand),
    "randint": (("seed", "low", "high"), ("seed", "low", "high"), _randint),
    "zeros": ((), (), lambda s, a: torch.zeros(s)),
    "ones": ((), (), lambda s, a: torch.ones(s)),
    "full": (("value",), ("value",), lambda s, a: torch.full(s, float(a["value"]), dtype=torch.float64)),
    "arange": (("start", "step"), (), _arange),
}


def _number(s: str) -> int | float:
    return float(s) if any(c in s for c in ".eEn") else int(s)  # 'n': inf / nan


def _tname(dt: torch.dtype, shape: tuple[int, ...] | torch.Size) -> str:
    return f"{str(dt).removeprefix('torch.')}[{', '.join(str(int(d)) for d in shape)}]"


def _make(p: _Parser, dt: torch.dtype, flat: list[tuple[str, int]]) -> torch.Tensor:
    if dt == torch.bool:
        vals: list[Any] = []
        for s, pos in flat:
            if s not in ("True", "False", "0", "1"):
                raise p.error(f"'{s}' is not a bool (True, False, 0 or 1)", pos, pos + len(s))
            vals.append(s in ("True", "1"))
        return torch.tensor(vals, dtype=torch.bool)
    if dt.is_floating_point:
        for s, pos in flat:
            if s in ("True", "False"):
                raise p.error(f"'{s}' in a {str(dt).removeprefix('torch.')} tensor", pos, pos + len(s))
        return torch.tensor([float(s) for s, _ in flat], dtype=torch.float64).to(dt)
    ints = []
    for s, pos in flat:
        if not _INT.fullmatch(s):
            raise p.error(f"'{s}' is not an integer, in a {str(dt).removeprefix('torch.')} tensor", pos, pos + len(s))
        ints.append(int(s))
    info = torch.iinfo(dt)
    for (s, pos), v in zip(flat, ints):
        if not info.min <= v <= info.max:
            raise p.error(f"{v} is out of range for {str(dt).removeprefix('torch.')}", pos, pos + len(s))
    return torch.tensor(ints, dtype=torch.int64).to(dt) if dt != torch.uint64 else torch.tensor(ints, dtype=dt)


# ---- entry points ---------------------------------------------------------------------------------------
def parse_graph(text: str, *, file: str = "<ir>") -> Graph:
    """The graph written in `text` (the IR text form, see the module docstring), shape-inferred and verified.
    Errors are `VerifyError`s located at `file:line:col`."""
    return _Parser(text, file).graph()


def load_graph(path: str) -> Graph:
    """`parse_graph` of a file; errors name the file."""
    with open(path, encoding="utf-8") as f:
        return parse_graph(f.read(), file=str(path))
