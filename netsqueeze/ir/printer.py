"""Deterministic text form of a graph, used by `str(graph)`, `netsqueeze inspect` and golden tests.

`print_graph(graph)` (what `str(graph)` gives) shows params by shape and form only. `print_graph(graph,
values=True)` prints the exact form that `netsqueeze.ir.parser.parse_graph` reads back: every param with
its values (floats as the shortest decimal that round-trips to the same bits), encoded weights by their
stored components, shared codebook tables once as `centroids @label = ...`, tuples and lists of
attributes told apart, and names that are not plain identifiers quoted. The text form is described in
`netsqueeze/ir/parser.py`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError
from netsqueeze.ir.dims import expr_of, is_dynamic
from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.weights import Affine, Centroids, Codebook, Encoded, Sparse, Weight, describe, form_of


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}"
    return str(v)


def print_graph(graph: Graph, *, values: bool = False) -> str:
    """The graph's text form; `values=True` gives the exact, parseable form (see the module docstring)."""
    if values:
        return _Exact(graph).text()
    lines = [f"graph {graph.name} ({', '.join(graph.inputs)}) -> ({', '.join(graph.outputs)}) {{"]
    for node in graph.nodes():
        ops = ", ".join(f"%{s}" + (f"#{o}" if o else "") for s, o in graph.operands(node.id))
        attrs = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(node.attrs.items()) if not k.startswith("_"))
        params = ", ".join(f"{k}:{list(t.shape)}" + ("" if form_of(t) == "dense" else f" {describe(t)}")
                           for k, t in sorted(node.params.items()))
        outs = ", ".join(str(m) for m in node.meta) or "?"
        head = f"  %{node.id}: {outs} = {node.kind}({ops})"
        extras = [x for x in (f"{{{attrs}}}" if attrs else "", f"<{params}>" if params else "") if x]
        if node.kind == "opaque":
            extras.append(f"[{node.origin.op_type}]")
        lines.append(" ".join([head, *extras]))
    lines.append("}")
    return "\n".join(lines)


# ---- the exact form --------------------------------------------------------------------------------
_SIMPLE = re.compile(r"[A-Za-z0-9_./-]+")
_NP_FLOAT = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: np.float32}
INLINE_MAX = 16  # tensors with more elements print one outermost slice per line


def name(s: str) -> str:
    """An identifier as the exact form writes it: bare when plain, else a quoted string."""
    return s if _SIMPLE.fullmatch(s) and "->" not in s and "//" not in s else _quote(s)


def _quote(s: str) -> str:
    return repr(s)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype in (torch.float16, torch.bfloat16):
        return a.view(torch.int16) == b.view(torch.int16)
    if a.dtype == torch.float32:
        return a.view(torch.int32) == b.view(torch.int32)
    return a.view(torch.int64) == b.view(torch.int64)


def number_strings(t: torch.Tensor) -> list[str]:
    """The flat values of `t` as decimal strings that parse back (via float64) to the same bits."""
    flat = t.detach().reshape(-1).cpu()
    if flat.dtype == torch.bool:
        return ["True" if b else "False" for b in flat.tolist()]
    if not flat.dtype.is_floating_point:
        return [str(int(v)) for v in flat.tolist()]
    if flat.dtype == torch.float64:
        return [repr(float(v)) for v in flat.tolist()]
    npt = _NP_FLOAT.get(flat.dtype)
    as64 = flat.to(torch.float64).tolist()
    strs = [repr(v) for v in as64] if npt is None else [str(npt(v)) for v in as64]
    back = torch.tensor([float(s) for s in strs], dtype=torch.float64).to(flat.dtype)
    ok = _bits_equal(back, flat) | (torch.isnan(back) & torch.isnan(flat))
    for i in torch.nonzero(~ok).reshape(-1).tolist():
        strs[i] = repr(as64[i])  # the exact double: converts back without loss
    return strs


def _nest(strs: list[str], shape: tuple[int, ...], indent: str, pos: int = 0) -> tuple[str, int]:
    if not shape:
        return strs[pos], pos + 1
    if len(shape) == 1:
        return "[" + ", ".join(strs[pos:pos + shape[0]]) + "]", pos + shape[0]
    parts = []
    for _ in range(shape[0]):
        s, pos = _nest(strs, shape[1:], indent + " ", pos)
        parts.append(s)
    return "[" + ", ".join(parts) + "]", pos


def tensor_text(t: torch.Tensor, indent: str = "") -> str:
    """`dtype[shape] values`, exactly."""
    shape = tuple(int(d) for d in t.shape)
    head = f"{dtype_name(t.dtype)}[{', '.join(str(d) for d in shape)}]"
    strs = number_strings(t)
    if len(shape) >= 2 and len(strs) > INLINE_MAX and shape[0] > 1:
        rows = []
        step = len(strs) // shape[0] if shape[0] else 0
        for i in range(shape[0]):
            s, _ = _nest(strs[i * step:(i + 1) * step], shape[1:], indent)
            rows.append(s)
        body = "[\n" + ",\n".join(f"{indent}  {r}" for r in rows) + f"\n{indent}]"
    else:
        body, _ = _nest(strs, shape, indent)
    return f"{head} {body}"


def _fail(msg: str, node: str | None = None) -> NetsqueezeError:
    return NetsqueezeError(Diagnostic(msg, node=node))


class _Exact:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.labels: dict[int, str] = {}
        self.tables: list[tuple[str, Centroids]] = []
        uses: dict[int, int] = {}
        found: list[Centroids] = []
        for node in graph.nodes():
            for _, w in sorted(node.params.items()):
                if isinstance(w, Codebook):
                    if id(w.centroids) not in uses:
                        found.append(w.centroids)
                    uses[id(w.centroids)] = uses.get(id(w.centroids), 0) + 1
        taken: set[str] = set()
        for c in found:
            if not c.name and uses[id(c)] == 1:
                continue  # an unshared, unnamed table is written inline
            label = c.name if c.name and c.name not in taken and not re.fullmatch(r"_\d+", c.name) else ""
            if not label:
                i = len(taken)
                while f"_{i}" in taken:
                    i += 1
                label = f"_{i}"
            taken.add(label)
            self.labels[id(c)] = label
            self.tables.append((label, c))

    def text(self) -> str:
        g = self.graph
        lines = [f"graph {name(g.name)} ({', '.join(name(i) for i in g.inputs)}) -> "
                 f"({', '.join(name(o) for o in g.outputs)}) {{"]
        for label, c in self.tables:
            named = "" if label == c.name else (f" name={_quote(c.name)}" if c.name else "")
            lines.append(f"  centroids @{name(label)}{named} = {tensor_text(c.values, '  ')}")
        lines.extend(self.node(n) for n in g.nodes())
        lines.append("}")
        return "\n".join(lines) + "\n"

    def node(self, node: Node) -> str:
        g = self.graph
        ops = ", ".join(f"%{name(s)}" + (f"#{o}" if o else "") for s, o in g.operands(node.id))
        outs = ", ".join(str(m) for m in node.meta) or "?"
        out = f"  %{name(node.id)}: {outs} = {node.kind}({ops})"
        attrs = [f"{name(k)}={self.value(v, node.id, k)}" for k, v in sorted(node.attrs.items())
                 if not k.startswith("_")]
        if attrs:
            out += " {" + ", ".join(attrs) + "}"
        if node.params:
            params = [f"    {name(k)} = {self.weight(w, node.id, k)}" for k, w in sorted(node.params.items())]
            out += " <\n" + ",\n".join(params) + "\n  >"
        if node.kind == "opaque":
            out += f" [{_quote(node.origin.op_type)}]"
        return out

    def value(self, v: Any, node: str, key: str) -> str:
        if isinstance(v, bool) or v is None:
            return str(v)
        if is_dynamic(v):  # a size that follows the dynamic dims: its example value and its expression
            return f"dim({int(v)}, {_quote(str(expr_of(v)))})"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return _quote(v)
        if isinstance(v, list):
            return "[" + ", ".join(self.value(x, node, key) for x in v) + "]"
        if isinstance(v, tuple):
            inner = ", ".join(self.value(x, node, key) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        if isinstance(v, torch.Tensor):
            return tensor_text(v, "    ")
        raise _fail(f"attribute '{key}' of node '{node}' holds a {type(v).__name__}, which the IR text form "
                    "cannot write", node)

    def weight(self, w: Weight, node: str, key: str) -> str:
        ind = "      "
        if isinstance(w, torch.Tensor):
            return tensor_text(w, "    ")
        comps: list[tuple[str, torch.Tensor]]
        if isinstance(w, Affine):
            head = w.describe() + ("" if w.dtype == torch.float32 else f" as {dtype_name(w.dtype)}")
            comps = [("q", w.q), ("scale", w.scale)]
            if w.zero_point is not None:
                comps.append(("zero_point", w.zero_point))
        elif isinstance(w, Sparse):
            head = f"{w.describe()} [{', '.join(str(d) for d in w.shape)}]"
            comps = [("values", w.values), ("indices", w.indices)]
        elif isinstance(w, Codebook):
            head = w.describe()
            comps = [("indices", w.indices)]
            label = self.labels.get(id(w.centroids))
            if label is not None:
                head += f" @{name(label)}"
            else:
                comps.append(("centroids", w.centroids.values))
        else:
            kind = w.form if isinstance(w, Encoded) else type(w).__name__
            raise _fail(f"param '{key}' of node '{node}' is a {kind} weight, which the IR text form cannot write",
                        node)
        body = ",\n".join(f"{ind}{k} = {tensor_text(t, ind)}" for k, t in comps)
        return f"{head} {{\n{body}\n    }}"
