"""Torch frontend: captures an nn.Module with torch.export (aten level) or torch.fx.symbolic_trace
(module level) and maps the captured graph onto the canonical ops of `netsqueeze.ir`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from netsqueeze.errors import CaptureError, Diagnostic, InputMismatchError, NetsqueezeError, VerifyError
from netsqueeze.ir.graph import Graph, Origin, TensorMeta, Value
from netsqueeze.ir.tables import registrar

__all__ = ["AtenCall", "FnCall", "MethodCall", "ModuleCall", "from_torch"]


# ---- picklable callables for opaque nodes -------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    """Placeholder for the i-th operand tensor inside an opaque call's argument template."""

    index: int


def _fill(template: Any, xs: Sequence[torch.Tensor]) -> Any:
    if isinstance(template, _Slot):
        return xs[template.index]
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, xs) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, xs) for k, v in template.items()}
    return template


@dataclass
class AtenCall:
    """Calls an aten overload by name (OpOverload objects do not pickle) with operands filled in."""

    namespace: str
    packet: str
    overload: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> Any:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.packet), self.overload)

    def __call__(self, *xs: torch.Tensor) -> Any:
        return self.target(*_fill(self.args, xs), **_fill(self.kwargs, xs))


@dataclass
class FnCall:
    """Calls a plain torch function (module-level graphs) with operands filled in."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *xs: torch.Tensor) -> Any:
        return self.fn(*_fill(self.args, xs), **_fill(self.kwargs, xs))


@dataclass
class MethodCall:
    """Calls a tensor method by name; args[0] is the receiver."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *xs: torch.Tensor) -> Any:
        a = _fill(self.args, xs)
        return getattr(a[0], self.name)(*a[1:], **_fill(self.kwargs, xs))


@dataclass
class ModuleCall:
    """Calls a private copy of a submodule the IR does not know."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *xs: torch.Tensor) -> Any:
        return self.module(*_fill(self.args, xs), **_fill(self.kwargs, xs))


# ---- capture state ------------------------------------------------------------------------------
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
        self.const_names: dict[fx.Node, str] = {}
        self.observed: dict[fx.Node, Any] = {}  # what torch saw: FakeTensor / tensor / python value
        self.names: dict[fx.Node, str] = {}  # precomputed base id per node
        self.scopes: dict[fx.Node, _Scope] = {}
        self.checks: list[tuple[Value, TensorMeta, str]] = []
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
            self.graph.node(nid).meta = [_meta(o) for o in outs]
        else:
            self.graph.node(nid).meta = _infer(self.graph, nid)
        return nid

    def scalar(self, value: Any, like: Value) -> Value:
        dt = getattr(torch, self.graph.meta_of(like).dtype)
        t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dt)
        return (self.emit("constant", [], params={"value": t}), 0)

    def operand(self, a: Any, like: Value) -> Value:
        """An activation, or a constant node for a scalar or a constant tensor."""
        if isinstance(a, fx.Node) and a not in self.consts:
            return self.val(a)
        if self.is_const(a):
            return self.scalar(self.const(a), like)
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


# ---- handlers: one per aten packet name; args bound by the aten schema -----------------------------
Handler = Callable[[_Capture, dict[str, Any]], Any]
HANDLERS: dict[str, Handler] = {}


handles = registrar(HANDLERS)


def _simple(kind: str, attrs: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Handler:
    def h(cx: _Capture, a: dict[str, Any]) -> Value:
        x = a["self"] if "self" in a else a["input"]  # aten.dropout & co. name their operand `input`
        return (cx.emit(kind, [cx.val(x)], attrs(a) if attrs else {}), 0)

    return h


for _name, _kind in [("relu", "relu"), ("sigmoid", "sigmoid"), ("tanh", "tanh"), ("silu", "silu"),
                     ("hardswish", "hardswish"), ("hardsigmoid", "hardsigmoid"), ("dropout", "identity"),
                     ("feature_dropout", "identity"), ("alpha_dropout", "identity"), ("clone", "identity"),
                     ("contiguous", "identity"), ("alias", "identity"), ("detach", "identity"),
                     ("lift_fresh_copy", "identity")]:
    HANDLERS[_name] = _simple(_kind)

HANDLERS["gelu"] = _simple("gelu", lambda a: {"approximate": a.get("approximate", "none")})
HANDLERS["leaky_relu"] = _simple("leaky_relu", lambda a: {"negative_slope": float(a["negative_slope"])})
HANDLERS["relu6"] = _simple("clip", lambda a: {"min": 0.0, "max": 6.0})
HANDLERS["hardtanh"] = _simple("clip", lambda a: {"min": float(a["min_val"]), "max": float(a["max_val"])})


@handles("clamp", "clip")
def _clamp(cx: _Capture, a: dict[str, Any]) -> Value:
    lo, hi = a.get("min"), a.get("max")
    if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
        raise _Unmappable("tensor clamp bounds")
    return (cx.emit("clip", [cx.val(a["self"])], {"min": None if lo is None else float(lo),
                                                  "max": None if hi is None else float(hi)}), 0)


@handles("_softmax", "softmax")
def _softmax(cx: _Capture, a: dict[str, Any]) -> Value:
    if a.get("dtype") is not None:
        raise _Unmappable("softmax with dtype")
    return (cx.emit("softmax", [cx.val(a["self"])], {"axis": int(a["dim"])}), 0)


def _conv_pad(padding: Any, w: torch.Tensor, dilation: tuple[int, ...], dims: int) -> tuple[int, ...]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * 2 * dims
        total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        return tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    p = _tup(padding, dims)
    return p + p


def _conv_common(cx: _Capture, a: dict[str, Any], transposed: bool) -> Value:
    x = cx.val(a["input"])
    w = cx.const(a["weight"])
    dims = w.dim() - 2
    dil = _tup(a.get("dilation", 1), dims)
    attrs: dict[str, Any] = {"stride": _tup(a.get("stride", 1), dims), "dilation": dil,
                             "groups": int(a.get("groups", 1))}
    if transposed:
        if isinstance(a.get("padding", 0), str):
            raise _Unmappable("string padding on a transposed conv")
        attrs["padding"] = _conv_pad(a.get("padding", 0), w, dil, dims)
        attrs["output_padding"] = _tup(a.get("output_padding", 0), dims)
    else:
        attrs["padding"] = _conv_pad(a.get("padding", 0), w, dil, dims)
    params = {"weight": w}
    if a.get("bias") is not None:
        params["bias"] = cx.const(a["bias"])
    return (cx.emit("conv_transpose" if transposed else "conv", [x], attrs, params), 0)


@handles("conv1d", "conv2d", "conv3d")
def _conv(cx: _Capture, a: dict[str, Any]) -> Value:
    return _conv_common(cx, a, False)


@handles("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_t(cx: _Capture, a: dict[str, Any]) -> Value:
    return _conv_common(cx, a, True)


@handles("convolution", "_convolution")
def _convolution(cx: _Capture, a: dict[str, Any]) -> Value:
    return _conv_common(cx, a, bool(a["transposed"]))


def _linear_node(cx: _Capture, x: Value, w: torch.Tensor, b: torch.Tensor | None) -> Value:
    params = {"weight": w.contiguous()}
    if b is not None:
        params["bias"] = b
    return (cx.emit("linear", [x], {}, params), 0)


@handles("linear")
def _linear(cx: _Capture, a: dict[str, Any]) -> Value:
    b = cx.const(a["bias"]) if a.get("bias") is not None else None
    return _linear_node(cx, cx.val(a["input"]), cx.const(a["weight"]), b)


@handles("addmm")
def _addmm(cx: _Capture, a: dict[str, Any]) -> Value:
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1 or not cx.is_const(a["self"]):
        raise _Unmappable("addmm with scaling or activation bias")
    b = cx.const(a["self"])
    if b.dim() != 1:
        raise _Unmappable("addmm with a matrix bias")
    return _linear_node(cx, cx.val(a["mat1"]), cx.const(a["mat2"]).t(), b)


@handles("mm", "matmul", "bmm")
def _matmul(cx: _Capture, a: dict[str, Any]) -> Value:
    other = a.get("mat2", a.get("other"))
    if cx.is_const(other):
        w = cx.const(other)
        if w.dim() != 2:
            raise _Unmappable("matmul by a constant of rank != 2")
        return _linear_node(cx, cx.val(a["self"]), w.t(), None)
    return (cx.emit("matmul", [cx.val(a["self"]), cx.val(other)]), 0)


def _bn(cx: _Capture, a: dict[str, Any], eps: float) -> Value:
    params = {"running_mean": cx.const(a["running_mean"]), "running_var": cx.const(a["running_var"])}
    for k in ("weight", "bias"):
        if a.get(k) is not None:
            params[k] = cx.const(a[k])
    return (cx.emit("batch_norm", [cx.val(a["input"])], {"eps": float(eps)}, params), 0)


@handles("batch_norm")
def _batch_norm(cx: _Capture, a: dict[str, Any]) -> Value:
    if a["training"] or a.get("running_mean") is None:
        raise _Unmappable("training-mode batch norm")
    return _bn(cx, a, a["eps"])


@handles("_native_batch_norm_legit_no_training")
def _bn_legit(cx: _Capture, a: dict[str, Any]) -> list[Value | None]:
    return [_bn(cx, a, a["eps"]), None, None]


@handles("native_batch_norm", "_native_batch_norm_legit_functional")
def _native_bn(cx: _Capture, a: dict[str, Any]) -> list[Value | None]:
    if a["training"]:
        raise _Unmappable("training-mode batch norm")
    return [_bn(cx, a, a["eps"]), None, None, None, None][: len(cx.out_meta())]


def _ln(cx: _Capture, a: dict[str, Any]) -> Value:
    params = {k: cx.const(a[k]) for k in ("weight", "bias") if a.get(k) is not None}
    return (cx.emit("layer_norm", [cx.val(a["input"])],
                    {"normalized_shape": tuple(int(d) for d in a["normalized_shape"]), "eps": float(a["eps"])},
                    params), 0)


HANDLERS["layer_norm"] = _ln
HANDLERS["native_layer_norm"] = lambda cx, a: [_ln(cx, a), None, None]


@handles("group_norm")
def _group_norm(cx: _Capture, a: dict[str, Any]) -> Value:
    params = {k: cx.const(a[k]) for k in ("weight", "bias") if a.get(k) is not None}
    return (cx.emit("group_norm", [cx.val(a["input"])],
                    {"num_groups": int(a["num_groups"]), "eps": float(a["eps"])}, params), 0)


def _binary(kind: str) -> Handler:
    def h(cx: _Capture, a: dict[str, Any]) -> Value:
        if a.get("alpha", 1) != 1 or a.get("rounding_mode") is not None:
            raise _Unmappable("alpha / rounding_mode")
        x, y = a["self"], a["other"]
        if not (isinstance(x, fx.Node) and x not in cx.consts):
            if kind in ("add", "mul"):
                x, y = y, x
            else:
                raise _Unmappable("constant left operand")
        vx = cx.val(x)
        return (cx.emit(kind, [vx, cx.operand(y, vx)]), 0)

    return h


for _k in ("add", "sub", "mul", "div"):
    HANDLERS[_k] = _binary(_k)


@handles("rsub")
def _rsub(cx: _Capture, a: dict[str, Any]) -> Value:
    if a.get("alpha", 1) != 1:
        raise _Unmappable("alpha")
    vx = cx.val(a["self"])
    return (cx.emit("sub", [cx.operand(a["other"], vx), vx]), 0)


@handles("cat", "concat", "concatenate")
def _cat(cx: _Capture, a: dict[str, Any]) -> Value:
    vals = [cx.val(t) for t in a["tensors"]]
    return (cx.emit("concat", vals, {"axis": int(a.get("dim", 0))}), 0)


@handles("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk")
def _split(cx: _Capture, a: dict[str, Any]) -> list[Value]:
    outs = cx.out_meta()
    dim = int(a.get("dim", 0))
    sizes = tuple(int(o.shape[dim]) for o in outs)
    nid = cx.emit("split", [cx.val(a["self"])], {"axis": dim, "sizes": sizes})
    return [(nid, i) for i in range(len(sizes))]


@handles("slice")
def _slice(cx: _Capture, a: dict[str, Any]) -> Value:
    x = cx.val(a["self"])
    dim = int(a.get("dim", 0))
    size = cx.shape(a["self"])[dim]
    start = 0 if a.get("start") is None else int(a["start"])
    end = size if a.get("end") is None else int(a["end"])
    # INT64_MAX means "to the end"; store the python-slice form that survives channel pruning
    end = min(end, size) if end >= 0 else end
    if start == 0 and end == size and int(a.get("step", 1)) == 1:
        return (cx.emit("identity", [x]), 0)
    return (cx.emit("slice", [x], {"axis": dim, "start": start, "end": end, "step": int(a.get("step", 1))}), 0)


@handles("flatten")
def _flatten(cx: _Capture, a: dict[str, Any]) -> Value:
    return (cx.emit("flatten", [cx.val(a["self"])],
                    {"start_dim": int(a.get("start_dim", 0)), "end_dim": int(a.get("end_dim", -1))}), 0)


@handles("view", "reshape", "_unsafe_view", "unflatten", "_reshape_alias")
def _reshape(cx: _Capture, a: dict[str, Any]) -> Value:
    x = cx.val(a["self"])
    src = cx.shape(a["self"])
    out = tuple(int(d) for d in cx.out_meta().shape)
    # a flatten written as view(x.size(0), -1): keep it batch- and channel-count agnostic
    if len(src) > 2 and len(out) == 2 and out[0] == src[0]:
        return (cx.emit("flatten", [x], {"start_dim": 1, "end_dim": -1}), 0)
    # the observed shape is the truth; the batch dim becomes 0 (copy) and a written -1 stays -1
    target = list(out)
    if src and out[0] == src[0]:
        target[0] = 0
    size = [int(d) for d in a.get("size") or ()]
    if -1 in size and size.index(-1) < len(target) and target[size.index(-1)] != 0:
        target[size.index(-1)] = -1
    elif -1 not in target and len(target) >= 2 and target[-1] != 0:
        # torch.export resolves -1; inferring the trailing dim keeps the IR free of baked-in spatial sizes
        target[-1] = -1
    return (cx.emit("reshape", [x], {"shape": tuple(target)}), 0)


@handles("permute")
def _permute(cx: _Capture, a: dict[str, Any]) -> Value:
    rank = len(cx.shape(a["self"]))
    return (cx.emit("transpose", [cx.val(a["self"])], {"perm": tuple(int(d) % rank for d in a["dims"])}), 0)


@handles("transpose", "swapaxes", "t")
def _transpose(cx: _Capture, a: dict[str, Any]) -> Value:
    rank = len(cx.shape(a["self"]))
    perm = list(range(rank))
    d0, d1 = (int(a.get("dim0", 0)) % rank, int(a.get("dim1", 1)) % rank) if rank > 1 else (0, 0)
    if "axis0" in a:
        d0, d1 = int(a["axis0"]) % rank, int(a["axis1"]) % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return (cx.emit("transpose", [cx.val(a["self"])], {"perm": tuple(perm)}), 0)


@handles("squeeze")
def _squeeze(cx: _Capture, a: dict[str, Any]) -> Value:
    src = cx.shape(a["self"])
    dims = a.get("dim")
    if dims is None:
        axes = tuple(i for i, d in enumerate(src) if d == 1)
    else:
        axes = tuple(int(d) % len(src) for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
        axes = tuple(d for d in axes if src[d] == 1)
    if not axes:
        return (cx.emit("identity", [cx.val(a["self"])]), 0)
    return (cx.emit("squeeze", [cx.val(a["self"])], {"axes": axes}), 0)


@handles("unsqueeze")
def _unsqueeze(cx: _Capture, a: dict[str, Any]) -> Value:
    rank = len(cx.shape(a["self"])) + 1
    return (cx.emit("unsqueeze", [cx.val(a["self"])], {"axes": (int(a["dim"]) % rank,)}), 0)


def _pool_attrs(a: dict[str, Any], dims: int) -> dict[str, Any]:
    k = _tup(a["kernel_size"], dims)
    s = a.get("stride")
    stride = k if s is None or (isinstance(s, (list, tuple)) and len(s) == 0) else _tup(s, dims)
    p = _tup(a.get("padding", 0), dims)
    return {"kernel": k, "stride": stride, "padding": p + p, "ceil_mode": bool(a.get("ceil_mode", False))}


@handles("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices")
def _max_pool(cx: _Capture, a: dict[str, Any]) -> Any:
    dims = len(cx.shape(a["self"])) - 2
    attrs = _pool_attrs(a, dims)
    attrs["dilation"] = _tup(a.get("dilation", 1), dims)
    v = (cx.emit("max_pool", [cx.val(a["self"])], attrs), 0)
    return [v, None] if isinstance(cx.out_meta(), (list, tuple)) else v


@handles("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool(cx: _Capture, a: dict[str, Any]) -> Value:
    if a.get("divisor_override") is not None:
        raise _Unmappable("divisor_override")
    dims = len(cx.shape(a["self"])) - 2
    attrs = _pool_attrs(a, dims)
    attrs["count_include_pad"] = bool(a.get("count_include_pad", True))
    return (cx.emit("avg_pool", [cx.val(a["self"])], attrs), 0)


@handles("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d")
def _adaptive(cx: _Capture, a: dict[str, Any]) -> Value:
    out = tuple(int(d) for d in cx.out_meta().shape[2:])
    return (cx.emit("adaptive_avg_pool", [cx.val(a["self"])], {"output_size": out}), 0)


@handles("mean")
def _mean(cx: _Capture, a: dict[str, Any]) -> Value:
    if a.get("dtype") is not None:
        raise _Unmappable("mean with dtype")
    rank = len(cx.shape(a["self"]))
    dims = a.get("dim")
    axes = tuple(range(rank)) if not dims else tuple(sorted(int(d) % rank for d in dims))
    return (cx.emit("mean", [cx.val(a["self"])], {"axes": axes, "keepdim": bool(a.get("keepdim", False))}), 0)


@handles("pad", "constant_pad_nd")
def _pad(cx: _Capture, a: dict[str, Any]) -> Value:
    rank = len(cx.shape(a["self"]))
    tp = [int(p) for p in a["pad"]]
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(tp) // 2):  # torch order: last axis first, (begin, end) pairs
        begins[rank - 1 - i], ends[rank - 1 - i] = tp[2 * i], tp[2 * i + 1]
    mode = a.get("mode", "constant")
    value = a.get("value")
    return (cx.emit("pad", [cx.val(a["self"])], {"pads": tuple(begins + ends), "mode": mode,
                                                 "value": float(value or 0.0)}), 0)


@handles("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
         "upsample_bilinear2d", "upsample_trilinear3d")
def _upsample(cx: _Capture, a: dict[str, Any]) -> Value:
    size = tuple(int(d) for d in cx.out_meta().shape[2:])
    assert cx.cur is not None
    linear = a["_linear"] if "_linear" in a else "nearest" not in str(cx.cur.target)
    # coordinate conventions spelled the ONNX way, so both backends agree on what torch computed
    attrs: dict[str, Any] = {"size": size, "mode": "linear" if linear else "nearest"}
    if linear:
        align = bool(a.get("align_corners", False))
        attrs["align_corners"] = align
        attrs["coordinate_transformation_mode"] = "align_corners" if align else "pytorch_half_pixel"
    else:
        attrs["coordinate_transformation_mode"] = "asymmetric"
        attrs["nearest_mode"] = "floor"
    return (cx.emit("resize", [cx.val(a["input"] if "input" in a else a["self"])], attrs), 0)


@handles("embedding")
def _embedding(cx: _Capture, a: dict[str, Any]) -> Value:
    return (cx.emit("embedding", [cx.val(a["indices"])], {}, {"weight": cx.const(a["weight"])}), 0)


# ---- module-level graphs (symbolic_trace fallback): modules and functions onto aten-style args --
def _mod_args(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(aten packet, bound args without the input) for a torch.nn layer, or None if unknown."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros":
        return "conv2d", {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
                          "dilation": m.dilation, "groups": m.groups}
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv_transpose2d", {"weight": m.weight, "bias": m.bias, "stride": m.stride,
                                    "padding": m.padding, "output_padding": m.output_padding,
                                    "groups": m.groups, "dilation": m.dilation}
    if isinstance(m, nn.Linear):
        return "linear", {"weight": m.weight, "bias": m.bias}
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and not m.training:
        return "batch_norm", {"weight": m.weight, "bias": m.bias, "running_mean": m.running_mean,
                              "running_var": m.running_var, "training": False, "eps": m.eps}
    if isinstance(m, nn.LayerNorm):
        return "layer_norm", {"normalized_shape": m.normalized_shape, "weight": m.weight, "bias": m.bias,
                              "eps": m.eps}
    if isinstance(m, nn.GroupNorm):
        return "group_norm", {"num_groups": m.num_groups, "weight": m.weight, "bias": m.bias, "eps": m.eps}
    if isinstance(m, nn.Embedding):
        return "embedding", {"weight": m.weight}
    if isinstance(m, nn.ReLU6):
        return "relu6", {}
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", {"min_val": m.min_val, "max_val": m.max_val}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": m.negative_slope}
    if isinstance(m, nn.GELU):
        return "gelu", {"approximate": m.approximate}
    if isinstance(m, nn.Softmax) and m.dim is not None:
        return "softmax", {"dim": m.dim}
    if isinstance(m, nn.Flatten):
        return "flatten", {"start_dim": m.start_dim, "end_dim": m.end_dim}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and not m.return_indices:
        return "max_pool2d", {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                              "dilation": m.dilation, "ceil_mode": m.ceil_mode}
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return "avg_pool2d", {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                              "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
                              "divisor_override": getattr(m, "divisor_override", None)}
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return "adaptive_avg_pool2d", {}
    if isinstance(m, nn.Upsample) and m.mode in ("nearest", "linear", "bilinear", "trilinear"):
        return "upsample_nearest2d", {"_linear": m.mode != "nearest", "align_corners": bool(m.align_corners)}
    simple = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu",
              nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Dropout: "dropout",
              nn.Dropout1d: "dropout", nn.Dropout2d: "dropout", nn.Identity: "clone"}
    name = simple.get(type(m))
    return (name, {}) if name else None


_FUNCS: dict[Any, str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
    torch.relu: "relu", F.relu: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh", F.silu: "silu",
    F.gelu: "gelu", F.hardswish: "hardswish", F.relu6: "relu6", torch.cat: "cat", torch.concat: "cat",
    torch.flatten: "flatten", torch.matmul: "matmul", torch.bmm: "bmm", torch.softmax: "softmax",
    F.softmax: "softmax", torch.permute: "permute", torch.transpose: "transpose", torch.mean: "mean",
    torch.chunk: "chunk", torch.split: "split", F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", F.dropout: "dropout",
}
_METHODS = {"view": "view", "reshape": "reshape", "flatten": "flatten", "permute": "permute",
            "transpose": "transpose", "relu": "relu", "sigmoid": "sigmoid", "mean": "mean",
            "squeeze": "squeeze", "unsqueeze": "unsqueeze", "contiguous": "contiguous", "chunk": "chunk",
            "split": "split", "add": "add", "mul": "mul", "sub": "sub", "div": "div", "softmax": "softmax",
            "matmul": "matmul", "tanh": "tanh"}
_VARARGS = {"view": "size", "reshape": "shape", "permute": "dims"}
_OVERLOADS = {"add": "Tensor", "sub": "Tensor", "mul": "Tensor", "div": "Tensor", "flatten": "using_ints",
              "transpose": "int", "mean": "dim", "squeeze": "dims", "split": "Tensor", "softmax": "int"}


def _bind(schema: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out[arg.name] = args[i]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    for k in ("input", "dim", "dims", "shape"):  # torch-function spellings of aten argument names
        if k in kwargs and k not in out:
            out[{"input": "self", "dims": "dim", "shape": "size"}.get(k, k)] = kwargs[k]
    return out


def _schema_for(packet: str) -> Any:
    p = getattr(torch.ops.aten, packet)
    ov = _OVERLOADS.get(packet, "default")
    return getattr(p, ov if ov in p.overloads() else p.overloads()[0])._schema


# ---- the capture driver ----------------------------------------------------------------------------
def _scope_of(nd: fx.Node) -> tuple[str, str, str] | None:
    stack = nd.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, typ) = list(stack.items())[-1]
    return key, str(path), typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"


def _is_leaf_type(typ: str) -> bool:
    return typ.startswith("torch.nn.modules.") and typ.rsplit(".", 1)[-1] not in CONTAINERS


_COLLAPSE = ("MultiheadAttention", "LocalResponseNorm")


def _collapse_key(nd: fx.Node) -> tuple[str, str, str] | None:
    """The outermost module in the stack whose aten ops become one IR node (attention, lrn)."""
    for key, (path, typ) in (nd.meta.get("nn_module_stack") or {}).items():
        name = typ if isinstance(typ, str) else typ.__qualname__
        if name.rsplit(".", 1)[-1] in _COLLAPSE and name.startswith("torch.nn"):
            return key, str(path), name.rsplit(".", 1)[-1]
    return None


def _plan_names(cx: _Capture, nodes: list[fx.Node]) -> None:
    """Layer ops take their module's path; functional ops `<scope>.<op>` (made unique on emission)."""
    calls = [n for n in nodes if n.op in ("call_function", "call_method", "call_module")]
    runs: list[list[fx.Node]] = []
    for n in calls:
        if n.op == "call_module":
            cx.scopes[n] = _Scope(str(n.target), True)
            cx.names[n] = str(n.target)
            continue
        sc = _scope_of(n)
        if sc is None:
            cx.scopes[n] = _Scope("", False)
            continue
        _, path, typ = sc
        leaf = _is_leaf_type(typ)
        cx.scopes[n] = _Scope(path, leaf)
        if leaf:
            if runs and runs[-1] and _scope_of(runs[-1][-1]) == sc and runs[-1][-1] is _prev_call(calls, n):
                runs[-1].append(n)
            else:
                runs.append([n])
    for run in runs:
        main = [n for n in run if n.target is not operator.getitem]
        if main:
            cx.names[main[-1]] = cx.scopes[main[-1]].path
        for n in main[:-1]:
            cx.scopes[n] = _Scope(cx.scopes[n].path, False)


def _prev_call(calls: list[fx.Node], n: fx.Node) -> fx.Node | None:
    i = calls.index(n)
    return calls[i - 1] if i else None


def _template(cx: _Capture, args: Any, operands: list[Value]) -> Any:
    if isinstance(args, fx.Node):
        if args in cx.consts:
            return cx.consts[args].detach().clone()
        v = cx.env.get(args)
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            if v not in operands:
                operands.append(v)
            return _Slot(operands.index(v))
        if v is None or isinstance(v, list):
            raise CaptureError(Diagnostic(f"'{args.name}' has no tensor value to pass to an opaque op"))
        return v
    if isinstance(args, (list, tuple)):
        return type(args)(_template(cx, a, operands) for a in args)
    if isinstance(args, dict):
        return {k: _template(cx, v, operands) for k, v in args.items()}
    return args


def _opaque(cx: _Capture, nd: fx.Node) -> Any:
    operands: list[Value] = []
    args = _template(cx, tuple(nd.args), operands)
    kwargs = _template(cx, dict(nd.kwargs), operands)
    payload: Any
    if isinstance(nd.target, torch._ops.OpOverload):
        t = nd.target
        payload = AtenCall(t.namespace, t._overloadpacket.__name__, t._overloadname, args, kwargs)
    elif nd.op == "call_method":
        payload = MethodCall(str(nd.target), args, kwargs)
    elif nd.op == "call_module":
        assert cx.model is not None
        mod = cx.model.get_submodule(str(nd.target))
        payload = ModuleCall(copy.deepcopy(mod), args, kwargs)
    else:
        payload = FnCall(nd.target, args, kwargs)  # type: ignore[arg-type]
    obs = cx.observed.get(nd)
    seq = isinstance(obs, (list, tuple))
    outs: list[Any] = list(obs) if isinstance(obs, (list, tuple)) else [obs]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise CaptureError(Diagnostic(f"op {_op_type(nd)} returns non-tensor values, which the IR cannot hold",
                                      node=nd.name))
    op_type = _op_type(nd) if nd.op != "call_module" else type(payload.module).__name__
    nid = cx.emit("opaque", operands, {}, op_type=op_type, payload=payload)
    return [(nid, i) for i in range(len(outs))] if seq else (nid, 0)


def _record_check(cx: _Capture, nd: fx.Node, result: Any) -> None:
    obs = cx.observed.get(nd)
    if isinstance(result, tuple) and isinstance(obs, torch.Tensor):
        cx.checks.append((result, _meta(obs), nd.name))
    elif isinstance(result, list) and isinstance(obs, (list, tuple)):
        for r, o in zip(result, obs):
            if r is not None and isinstance(o, torch.Tensor):
                cx.checks.append((r, _meta(o), nd.name))


def _fold(cx: _Capture, nd: fx.Node) -> bool:
    """Evaluates an op whose tensor operands are all constants (e.g. `self.w.t()`)."""
    ins = nd.all_input_nodes
    if not ins or not all(i in cx.consts or not _is_value(cx.env.get(i)) for i in ins):
        return False
    if nd.op not in ("call_function", "call_method") or not any(i in cx.consts for i in ins):
        return False

    def sub(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return cx.consts[a] if a in cx.consts else cx.env.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a

    args, kwargs = sub(nd.args), sub(dict(nd.kwargs))
    with torch.no_grad():
        if nd.op == "call_method":
            r = getattr(args[0], str(nd.target))(*args[1:], **kwargs)
        else:
            r = nd.target(*args, **kwargs)  # type: ignore[operator]
    if isinstance(r, torch.Tensor):
        cx.consts[nd] = r.detach().clone()
        return True
    cx.env[nd] = r
    return True


def _is_value(v: Any) -> bool:
    return (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)) or isinstance(v, list)


def _collapse(cx: _Capture, group: list[fx.Node], path: str, typ: str) -> bool:
    """Maps the aten ops of one nn.MultiheadAttention / nn.LocalResponseNorm call onto one node."""
    inside = set(group)
    ext: list[fx.Node] = []
    params: dict[str, torch.Tensor] = {}
    for n in group:
        for i in n.all_input_nodes:
            if i in inside:
                continue
            if i in cx.consts:
                params[cx.const_names.get(i, i.name)] = cx.consts[i]
            elif i not in ext:
                ext.append(i)
    outs = [n for n in group if any(u not in inside for u in n.users)]
    if len(outs) != 1 or not all(_is_value(cx.env.get(e)) and isinstance(cx.env[e], tuple) for e in ext):
        return False
    mod = None
    if cx.model is not None:
        try:
            mod = cx.model.get_submodule(path)
        except AttributeError:
            mod = None
    cx.cur = group[0]
    cx.scopes[group[0]] = _Scope(path, True)
    cx.names[group[0]] = path
    cx._main_used = False
    out = outs[0]
    if typ == "LocalResponseNorm":
        if not isinstance(mod, nn.LocalResponseNorm) or len(ext) != 1:
            return False
        cx.observed[group[0]] = cx.observed[out]
        nid = cx.emit("lrn", [cx.env[ext[0]]], {"size": int(mod.size), "alpha": float(mod.alpha),
                                                 "beta": float(mod.beta), "bias": float(mod.k)}, op_type=typ)
    else:
        byname = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if k.count(".") >= 1 else k: v
                  for k, v in params.items()}
        byname.update({k.rsplit(".", 1)[-1]: v for k, v in params.items()})
        if "in_proj_weight" not in byname or len(ext) not in (1, 3) or "out_proj.weight" not in byname:
            return False
        if isinstance(mod, nn.MultiheadAttention) and (mod.bias_k is not None or mod.add_zero_attn):
            return False
        sdpa = [n for n in group if "scaled_dot_product_attention" in str(n.target)]
        if isinstance(mod, nn.MultiheadAttention):
            heads, batch_first = mod.num_heads, mod.batch_first
        elif len(sdpa) == 1:
            heads, batch_first = int(cx.observed[sdpa[0].args[0]].shape[1]), True  # type: ignore[index]
        else:
            return False
        w = byname["in_proj_weight"]
        p = {"in_proj_weight": w.detach().clone(), "out_proj_weight": byname["out_proj.weight"].detach().clone()}
        if "in_proj_bias" in byname:
            p["in_proj_bias"] = byname["in_proj_bias"].detach().clone()
        if "out_proj.bias" in byname:
            p["out_proj_bias"] = byname["out_proj.bias"].detach().clone()
        qkv = [cx.env[e] for e in ext] * (3 if len(ext) == 1 else 1)
        cx.observed[group[0]] = cx.observed[out]
        nid = cx.emit("attention", qkv, {"num_heads": int(heads), "embed_dim": int(w.shape[1]),
                                         "head_dim": int(w.shape[0]) // (3 * int(heads)),
                                         "batch_first": bool(batch_first)}, p, op_type=typ)
    for n in group:
        cx.env[n] = None
    cx.env[out] = (nid, 0)
    _record_check(cx, out, (nid, 0))
    return True


def _convert(cx: _Capture, gm: fx.GraphModule, input_names: list[str], example_inputs: Sequence[torch.Tensor],
             user_outputs: list[Any]) -> Graph:
    nodes = list(gm.graph.nodes)
    _plan_names(cx, nodes)
    groups: dict[fx.Node, tuple[list[fx.Node], str, str]] = {}
    if cx.aten:
        cur_key: tuple[str, str, str] | None = None
        for n in nodes:
            ck = _collapse_key(n) if n.op == "call_function" else None
            if ck is None:
                cur_key = None
                continue
            if ck != cur_key:
                groups[n] = ([n], ck[1], ck[2])
                head = n
                cur_key = ck
            else:
                groups[head][0].append(n)
    done: set[fx.Node] = set()
    inputs = iter(zip(input_names, example_inputs))
    for nd in nodes:
        if nd in done:
            continue
        if nd.op == "placeholder":
            if nd in cx.consts:
                continue
            name, t = next(inputs)
            nid = cx.graph.add_node(name, "input", attrs={"shape": tuple(t.shape), "dtype": _dtype(t.dtype)},
                                    origin=Origin("fx", name, "input"))
            cx.graph.node(nid).meta = _infer(cx.graph, nid)
            cx.env[nd] = (nid, 0)
            continue
        if nd.op == "get_attr":
            v = _getattr_path(gm, str(nd.target))
            if isinstance(v, torch.Tensor):
                cx.consts[nd] = v.detach().clone()
                cx.const_names[nd] = str(nd.target)
            else:
                cx.env[nd] = v
            continue
        if nd.op == "output":
            break
        if nd in groups:
            grp, path, typ = groups[nd]
            if _collapse(cx, grp, path, typ):
                done.update(grp)
                continue
        _convert_node(cx, nd)
    for i, o in enumerate(user_outputs):
        if not isinstance(o, fx.Node) or not _is_value(cx.env.get(o)) or not isinstance(cx.env[o], tuple):
            raise CaptureError(Diagnostic(f"model output {i} is not a tensor computed from the inputs"))
        cx.graph.add_node("output", "output", [cx.env[o]], origin=Origin("fx", f"output {i}", "output"),
                          unique=True)
    cx.graph.infer_shapes()
    for value, expected, name in cx.checks:
        got = cx.graph.meta_of(value)
        if got != expected:
            raise CaptureError(Diagnostic(
                f"frontend bug: node '{value[0]}' infers {got} but torch observed {expected} (fx node {name})",
                node=value[0]))
    cx.graph.verify()
    return cx.graph


def _getattr_path(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _convert_node(cx: _Capture, nd: fx.Node) -> None:
    cx.cur = nd
    cx._main_used = False
    obs = cx.observed.get(nd)
    if nd.target is operator.getitem:
        src, idx = nd.args[0], nd.args[1]
        v = cx.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(src, fx.Node) and src in cx.consts:
            cx.consts[nd] = cx.consts[src][idx]  # type: ignore[index]
        elif isinstance(v, list):
            cx.env[nd] = v[idx]  # type: ignore[index]
        elif _is_value(v):
            _set(cx, nd, _opaque(cx, nd))
        else:
            cx.env[nd] = v[idx]  # type: ignore[index]
        return
    # python-level values (sizes, shapes) in module-level graphs are concrete: keep them as such
    if not cx.aten and not (isinstance(obs, torch.Tensor) or
                            (isinstance(obs, (list, tuple)) and obs and all(isinstance(o, torch.Tensor)
                                                                            for o in obs))):
        cx.env[nd] = obs
        return
    if _fold(cx, nd):
        return
    packet, a = _resolve(cx, nd)
    inplace = False
    if packet is not None and packet not in HANDLERS and packet.endswith("_") and packet[:-1] in HANDLERS:
        packet, inplace = packet[:-1], True
    result: Any = None
    if packet is not None and packet in HANDLERS:
        first = cx.graph._counter
        try:
            result = HANDLERS[packet](cx, a)
        except (_Unmappable, VerifyError, KeyError, IndexError, TypeError, ValueError):
            # outside the canonical op's conventions: drop what the handler made, keep it as an opaque call
            for n in sorted((n for n in cx.graph.nodes() if n.order >= first), key=lambda n: -n.order):
                cx.graph.remove_node(n.id)
            result = None
    if result is None:
        result = _opaque(cx, nd)
    _set(cx, nd, result)
    if inplace and isinstance(nd.args[0], fx.Node):
        cx.env[nd.args[0]] = result  # later readers of the mutated tensor see the new value


def _set(cx: _Capture, nd: fx.Node, result: Any) -> None:
    cx.env[nd] = result
    _record_check(cx, nd, result)


def _resolve(cx: _Capture, nd: fx.Node) -> tuple[str | None, dict[str, Any]]:
    """The aten packet name for a node and its arguments bound by that packet's schema."""
    t = nd.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__, _bind(t._schema, nd.args, dict(nd.kwargs))
    args, kwargs = list(nd.args), dict(nd.kwargs)
    resolved = [_concrete(cx, x) for x in args]
    kw = {k: _concrete(cx, v) for k, v in kwargs.items()}
    if nd.op == "call_module":
        assert cx.model is not None
        mod = cx.model.get_submodule(str(t))
        spec = _mod_args(mod)
        if spec is None:
            if isinstance(mod, nn.MultiheadAttention):
                return None, {}
            return None, {}
        packet, a = spec
        if packet == "adaptive_avg_pool2d":
            a["output_size"] = mod.output_size  # type: ignore[attr-defined]
        a = {k: v for k, v in a.items()}
        first = "indices" if packet == "embedding" else _schema_for(packet).arguments[0].name
        a[first] = args[0] if args else kwargs.get("input")
        return packet, a
    if nd.op == "call_method":
        method = _METHODS.get(str(t))
        if method is None:
            return None, {}
        packet = method
        if (str(t) in _VARARGS and len(args) > 2) or (len(args) == 2 and isinstance(resolved[1], int)
                                                      and str(t) in _VARARGS):
            args = [args[0], list(resolved[1:])]
    else:
        fn = _FUNCS.get(t)
        if fn is None:
            return None, {}
        packet = fn
        if packet in ("add", "sub", "mul", "div") and not isinstance(args[0], fx.Node):
            if packet in ("add", "mul"):
                args = [args[1], args[0]]
            else:
                return None, {}
    args = [a if (isinstance(a, fx.Node) and _is_value(cx.env.get(a))) or (isinstance(a, fx.Node) and a in cx.consts)
            else _concrete(cx, a) for a in args]
    kw = {k: (v if isinstance(v, fx.Node) and (_is_value(cx.env.get(v)) or v in cx.consts) else _concrete(cx, v))
          for k, v in kwargs.items()}
    return packet, _bind(_schema_for(packet), args, kw)


def _concrete(cx: _Capture, a: Any) -> Any:
    if isinstance(a, fx.Node):
        if a in cx.consts:
            return cx.consts[a]
        v = cx.env.get(a)
        return a if _is_value(v) else v
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(cx, x) for x in a)
    return a


# ---- capture paths -------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        r = super().run_node(n)
        self.values[n] = r
        return r


def _from_exported(ep: torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor], name: str,
                   model: nn.Module | None) -> Graph:
    cx = _Capture(name, model, aten=True)
    sig = ep.graph_signature
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    for n in placeholders:
        if n.name in lookup:
            fqn = lookup[n.name]
            t = ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]
            cx.consts[n] = t.detach().clone()
            cx.const_names[n] = fqn
    user = [n for n in placeholders if n.name in sig.user_inputs]
    for n in gm.graph.nodes:
        if "val" in n.meta:
            cx.observed[n] = n.meta["val"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    kinds = [s.kind.name for s in sig.output_specs]
    user_outs = [o for o, k in zip(outs, kinds) if k == "USER_OUTPUT"]
    if len(user) != len(example_inputs):
        raise InputMismatchError(Diagnostic(
            f"the model takes {len(user)} tensor inputs ({', '.join(n.name for n in user)}) "
            f"but {len(example_inputs)} example inputs were given"))
    return _convert(cx, gm, [n.name for n in user], example_inputs, user_outs)


def _from_symbolic(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], name: str) -> Graph:
    cx = _Capture(name, gm, aten=False)
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*example_inputs)
    cx.observed = rec.values
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    res = out_node.args[0]
    outs = list(res) if isinstance(res, (list, tuple)) else [res]
    return _convert(cx, gm, [str(n.target) for n in placeholders], example_inputs, outs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _expected(mod: nn.Module) -> str | None:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        sp = {1: "L", 2: "H, W", 3: "D, H, W"}[len(mod.kernel_size)]
        return f"[N, {mod.in_channels}, {sp}]"
    if isinstance(mod, nn.Linear):
        return f"[..., {mod.in_features}]"
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return f"[N, {mod.num_features}, ...]"
    if isinstance(mod, nn.LayerNorm):
        return "[..., " + ", ".join(str(d) for d in mod.normalized_shape) + "]"
    if isinstance(mod, nn.Embedding):
        return "integer indices"
    return None


def _check_inputs(model: nn.Module, names: list[str], example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Runs the model once; a failure is reported against the input and the layer that rejected it."""
    entered: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
    handles_ = []
    for path, m in model.named_modules():
        if path and not list(m.children()):
            handles_.append(m.register_forward_pre_hook(
                lambda mod, args, p=path: entered.append((p, mod, args))))  # type: ignore[misc]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as e:
        given = ", ".join(f"'{n}' = {_meta(t)}" for n, t in zip(names, example_inputs))
        culprit = None
        if entered:
            path, mod, args = entered[-1]
            idx = next((i for i, t in enumerate(example_inputs) if args and args[0] is t), None)
            culprit = (path, mod, idx)
        which = names[culprit[2]] if culprit and culprit[2] is not None else (names[0] if len(names) == 1 else None)
        head = f"example input '{which}'" if which else "example inputs"
        t = example_inputs[names.index(which)] if which else None
        msg = f"{head} ({_meta(t) if t is not None else given}) do not fit the model"
        if which:
            msg = f"{head} (given {_meta(t)}) does not fit the model"
        if culprit:
            path, mod, _ = culprit
            exp = _expected(mod)
            params = list(mod.parameters())
            dt = _dtype(params[0].dtype) if params else None
            if exp is not None and t is not None:
                if dt and t.dtype != params[0].dtype and not isinstance(mod, nn.Embedding):
                    exp = f"{dt}{exp}"
                msg += f": layer '{path}' ({type(mod).__name__}) expects {exp}"
            else:
                msg += f" at layer '{path}' ({type(mod).__name__})"
        raise InputMismatchError(Diagnostic(msg, node=culprit[0] if culprit else None,
                                            notes=(f"reason: {_first_line(e)}",))) from None
    finally:
        for h in handles_:
            h.remove()


def _check_count(model: nn.Module, n: int) -> None:
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in pos if p.default is p.empty]
    if not len(required) <= n <= len(pos):
        want = f"{len(required)}" if len(required) == len(pos) else f"{len(required)} to {len(pos)}"
        raise InputMismatchError(Diagnostic(
            f"{type(model).__name__}.forward takes {want} inputs ({', '.join(p.name for p in pos)}) "
            f"but {n} example inputs were given"))


def _forward_names(model: nn.Module, n: int) -> list[str]:
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [f"input_{i}" for i in range(len(names), n)])[:n]


def from_torch(model: nn.Module | fx.GraphModule | torch.export.ExportedProgram,
               example_inputs: tuple[torch.Tensor, ...], *, name: str | None = None) -> Graph:
    """Captures `model` on `example_inputs` into a verified `Graph` (shapes from the example inputs).

    torch.export (strict=False, aten level) first, torch.fx.symbolic_trace (module level) when export
    fails; ops outside the canonical set become opaque nodes that run the original torch callable.
    The model is left untouched: its training flags are restored and its tensors cloned.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise InputMismatchError(Diagnostic(f"example input {i} is a {type(t).__name__}, not a torch.Tensor"))
    gname = name or type(model).__name__
    if isinstance(model, torch.export.ExportedProgram):
        names = list(model.graph_signature.user_inputs)
        try:
            model.module()(*example_inputs)
        except Exception as e:
            raise InputMismatchError(Diagnostic(
                "example inputs (" + ", ".join(f"'{n}' = {_meta(t)}" for n, t in zip(names, example_inputs))
                + ") do not fit the exported program", notes=(f"reason: {_first_line(e)}",))) from None
        return _from_exported(model, example_inputs, gname, None)
    if not isinstance(model, nn.Module):
        raise CaptureError(Diagnostic(f"cannot capture a {type(model).__name__}: expected an nn.Module, "
                                      "a torch.fx.GraphModule or a torch.export.ExportedProgram"))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()  # the IR is inference-mode (BatchNorm running stats, no dropout)
        names = _forward_names(model, len(example_inputs))
        _check_count(model, len(example_inputs))
        _check_inputs(model, names, example_inputs)
        try:
            ep = torch.export.export(model, example_inputs, strict=False)
        except Exception as e:
            export_error: BaseException = e
        else:
            try:
                return _from_exported(ep, example_inputs, gname, model)
            except NetsqueezeError:
                raise
            except Exception as e:
                export_error = e
        try:
            gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
            return _from_symbolic(gm, example_inputs, gname)
        except NetsqueezeError:
            raise
        except Exception as e:
            raise CaptureError(Diagnostic(
                f"cannot capture {type(model).__name__}: neither torch.export nor torch.fx.symbolic_trace handles it",
                notes=(f"torch.export: {_first_line(export_error)}",
                       f"torch.fx.symbolic_trace: {_first_line(e)}"))) from None
    finally:
        for m, f in flags.items():
            m.training = f
