"""Per-capture state shared by the op tables, the collapsing and the driver: fx node → IR value(s)."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn

from netsqueeze.ir.dims import make
from netsqueeze.ir.graph import Graph, Origin, TensorMeta, Value


class _Unmappable(Exception):
    """Raised by a handler when the op's arguments fall outside the canonical op: emit it opaque."""


def _dtype(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _meta(v: Any) -> TensorMeta:
    return TensorMeta(tuple(int(d) for d in v.shape), _dtype(v.dtype))


def _tup(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    return v * n if len(v) == 1 and n > 1 else v


CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


@dataclass
class _Scope:
    path: str  # module path ('' = top level)
    leaf: bool  # a torch.nn layer (its op takes the module's own name)


class _Capture:
    """Per-capture state: fx node -> IR value(s) / constant tensors / python values."""

    def __init__(self, name: str, model: nn.Module | None, aten: bool) -> None:
        self.graph = Graph(name)
        self.model = model
        self.aten = aten
        self.env: dict[fx.Node, Any] = {}
        self.consts: dict[fx.Node, torch.Tensor] = {}
        self.trainable: set[fx.Node] = set()  # consts that are the model's nn.Parameters (counted as params)
        self.const_names: dict[fx.Node, str] = {}
        self.observed: dict[fx.Node, Any] = {}  # what torch saw: FakeTensor / tensor / python value
        self.names: dict[fx.Node, str] = {}  # precomputed base id per node
        self.scopes: dict[fx.Node, _Scope] = {}
        self.checks: list[tuple[Value, TensorMeta, str]] = []
        self.input_dims: dict[str, tuple[str | None, ...]] = {}  # dynamic dim names per graph input
        self.cur: fx.Node | None = None
        self._main_used = False

    # -- operand access
    def is_const(self, a: Any) -> bool:
        return isinstance(a, torch.Tensor) or (isinstance(a, fx.Node) and a in self.consts)

    def const(self, a: Any) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a.detach().clone()
        if isinstance(a, fx.Node) and a in self.consts:
            return self.consts[a].detach().clone()
        raise _Unmappable(f"expected a constant tensor, got {a}")

    def val(self, a: Any) -> Value:
        if isinstance(a, fx.Node) and a not in self.consts:
            v = self.env.get(a)
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
                return v
        raise _Unmappable(f"expected an activation tensor, got {a}")

    def shape(self, a: Any) -> tuple[int, ...]:
        if isinstance(a, fx.Node) and a in self.observed:
            return tuple(int(d) for d in self.observed[a].shape)
        return tuple(self.graph.meta_of(self.val(a)).shape)

    def out_meta(self) -> Any:
        assert self.cur is not None
        return self.observed.get(self.cur)

    # -- node creation
    def emit(self, kind: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None,
             params: dict[str, torch.Tensor] | None = None, *, op_type: str = "",
             payload: Any = None, name: str | None = None) -> str:
        nd = self.cur
        assert nd is not None
        scope = self.scopes.get(nd, _Scope("", False))
        if name is not None:
            base = name
        elif self.names.get(nd) and not self._main_used:
            base = self.names[nd]
        else:
            label = op_type.split("::")[-1].split(".")[0] if kind == "opaque" and op_type else kind
            base = f"{scope.path}.{label}" if scope.path else label
        if kind == "constant":
            base = f"{scope.path}.const" if scope.path else "const"
        elif base == self.names.get(nd):
            self._main_used = True
        origin = Origin("fx", scope.path or nd.name, op_type or _op_type(nd), payload)
        nid = self.graph.add_node(base, kind, inputs, attrs=attrs, params=params, origin=origin, unique=True)
        if kind == "opaque":
            obs = self.out_meta()
            outs = obs if isinstance(obs, (list, tuple)) else [obs]
            # a size that follows a dynamic dim stays a Dim (a cls token's expand to the batch): an int would fix
            # it at the example's, and the shapes inferred after it would disagree with the layers that keep it
            self.graph.node(nid).meta = [TensorMeta(tuple(python_value(d) for d in o.shape), _dtype(o.dtype))
                                         for o in outs]
        else:
            self.graph.node(nid).meta = _infer(self.graph, nid)
        return nid

    def scalar(self, value: Any, like: Value, trainable: bool = False) -> Value:
        dt = getattr(torch, self.graph.meta_of(like).dtype)
        t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dt)
        return (self.emit("constant", [], {"trainable": True} if trainable else None, params={"value": t}), 0)

    def operand(self, a: Any, like: Value) -> Value:
        """An activation, or a constant node for a scalar or a constant tensor."""
        if isinstance(a, fx.Node) and a not in self.consts:
            return self.val(a)
        if self.is_const(a):  # a layer scale, a position embedding: an nn.Parameter stays one
            return self.scalar(self.const(a), like, trainable=isinstance(a, fx.Node) and a in self.trainable)
        if isinstance(a, (int, float, bool)):
            return self.scalar(a, like)
        raise _Unmappable(f"unsupported operand {a!r}")


def _infer(graph: Graph, nid: str) -> list[TensorMeta]:
    from netsqueeze.ir.ops import infer_node

    return infer_node(graph, graph.node(nid))


def _op_type(nd: fx.Node) -> str:
    t = nd.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._overloadpacket.__name__}.{t._overloadname}"
    if nd.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        return f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', repr(t))}".lstrip(".")
    return str(t)


def _record_check(cx: _Capture, nd: fx.Node, result: Any) -> None:
    obs = cx.observed.get(nd)
    if isinstance(result, tuple) and isinstance(obs, torch.Tensor):
        cx.checks.append((result, _meta(obs), nd.name))
    elif isinstance(result, list) and isinstance(obs, (list, tuple)):
        for r, o in zip(result, obs):
            if r is not None and isinstance(o, torch.Tensor):
                cx.checks.append((r, _meta(o), nd.name))


def _is_value(v: Any) -> bool:
    return (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)) or isinstance(v, list)


# torch's size symbols (s0, s1, ...) of the capture under way → the dynamic dims' own symbols
SYMBOLS: ContextVar[dict[Any, Any] | None] = ContextVar("SYMBOLS", default=None)


def plain_sympy(expr: Any) -> Any:
    """`expr` with torch's own sympy functions for integer division and modulo (`FloorDiv`, `CleanDiv`,
    `PythonMod`, `Mod`) written as sympy's (floor(a/b), a/b, Mod): one size reached as `(H - 1)//4 + 1` and as
    floor(H/4 - 1/4) + 1 is then one expression, so a ratio of the two cancels (SegFormer's patch grid)."""
    from torch.utils._sympy import functions as tf

    return expr.replace(lambda e: isinstance(e, tf.FloorDiv), lambda e: sympy.floor(e.args[0] / e.args[1])) \
        .replace(lambda e: isinstance(e, tf.CleanDiv), lambda e: e.args[0] / e.args[1]) \
        .replace(lambda e: isinstance(e, (tf.PythonMod, tf.Mod)), lambda e: sympy.Mod(e.args[0], e.args[1]))


def python_value(v: Any) -> Any:
    """A concrete python number for a SymInt/SymFloat/SymBool seen at the example sizes; a size that follows
    a declared dynamic dim is a `Dim` (the example's value, carrying its expression)."""
    symbols = SYMBOLS.get()
    if isinstance(v, torch.SymInt) and symbols:
        hint = v.node.hint
        expr = v.node.expr
        if hint is not None and expr.free_symbols and expr.free_symbols <= set(symbols):
            return make(int(hint), plain_sympy(expr.xreplace(symbols)))
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = v.node.hint
        return hint if hint is not None else v
    if isinstance(v, (list, tuple)):
        return type(v)(python_value(x) for x in v)
    return v
