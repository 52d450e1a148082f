"""Per-op handlers: each maps one ONNX op (its opset differences inside) onto IR ops, or returns False
to leave the node opaque."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from netsqueeze.errors import CaptureError, Diagnostic
from netsqueeze.frontends.onnx.torch_ops import same_split
from netsqueeze.frontends.onnx.weights import _is_float, _transposed
from netsqueeze.ir.dims import is_dynamic
from netsqueeze.ir.graph import Value
from netsqueeze.ir.tables import registrar
from netsqueeze.ir.weights import Encoded

if TYPE_CHECKING:
    from netsqueeze.frontends.onnx.importer import _Importer

Handler = Callable[["_Importer", gs.Node], bool]
HANDLERS: dict[str, Handler] = {}


handles = registrar(HANDLERS)

_ABSENT = object()


def _in(n: gs.Node, i: int) -> gs.Tensor | None:
    return n.inputs[i] if i < len(n.inputs) and n.inputs[i].name else None


def _const_in(imp: _Importer, n: gs.Node, i: int) -> Any:
    """The constant at input i, None when the input is absent, _ABSENT when it is not a constant."""
    t = _in(n, i)
    if t is None:
        return None
    arr = imp.const(t)
    return _ABSENT if arr is None else arr


def _ints(v: Any) -> list[int]:
    return [int(a) for a in np.asarray(v).reshape(-1)]


def _refuse(imp: _Importer, n: gs.Node, problem: str) -> CaptureError:
    """A `CaptureError` naming the node being imported and what is wrong with it."""
    return CaptureError(Diagnostic(f"node '{imp.cur_id}' ({n.op}): {problem}", node=imp.cur_id))


def _axis(imp: _Importer, n: gs.Node, axis: int, rank: int, what: str = "axis") -> int:
    """`axis` in 0..rank-1 (negative counts from the end); out of range is an error naming the node."""
    if not -rank <= axis < rank:
        raise _refuse(imp, n, f"{what} {axis} is out of range for its rank-{rank} input")
    return axis % rank


def _spatial(imp: _Importer, n: gs.Node, name: str, default: list[int], dims: int, lo: int = 1) -> list[int]:
    """A per-spatial-dimension attribute: `dims` values (pads: 2·dims), each at least `lo`."""
    v = _ints(n.attrs.get(name, default))
    if len(v) != len(default) or any(x < lo for x in v):
        raise _refuse(imp, n, f"attribute '{name}' is {v}; its rank-{dims + 2} input needs {len(default)} values "
                              f"of at least {lo}")
    return v


def _scalar(imp: _Importer, n: gs.Node, v: Any, what: str) -> float:
    a = np.asarray(v)
    if a.size != 1 or a.dtype.kind not in "fiub":
        raise _refuse(imp, n, f"its {what} must be a number, not {a.dtype} of shape {list(a.shape)}")
    return float(a.reshape(-1)[0])


def _bind(imp: _Importer, n: gs.Node, v: Value, i: int = 0) -> bool:
    imp.vals[n.outputs[i].name] = v
    return True


def _used(imp: _Importer, t: gs.Tensor) -> bool:
    return bool(t.outputs) or t.name in {o.name for o in imp.proto.graph.output}


def _single_output(imp: _Importer, n: gs.Node) -> bool:
    return all(not t.name or not _used(imp, t) for t in n.outputs[1:])


def _auto_pads(imp: _Importer, n: gs.Node, spatial: tuple[int, ...], kernel: list[int], stride: list[int],
               dilation: list[int]) -> list[int] | None:
    """The node's explicit pads (begins then ends); None for `auto_pad` SAME_* with a stride over 1 on a
    dynamic spatial dim, where the padding changes with the run-time size (the node is then kept opaque,
    its ONNX form and a torch form that pads at run time)."""
    auto = n.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    dims = len(kernel)
    if auto in ("NOTSET", ""):
        return _spatial(imp, n, "pads", [0] * 2 * dims, dims, lo=0)
    if auto == "VALID":
        return [0] * 2 * dims
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise _refuse(imp, n, f"attribute 'auto_pad' is '{auto}'; ONNX defines NOTSET, VALID, SAME_UPPER and "
                              f"SAME_LOWER")
    if any(s != 1 and is_dynamic(size) for size, s in zip(spatial, stride)):
        return None
    # with stride 1 the padding is (k - 1)·d whatever the size: the example's serves
    begins, ends = zip(*(same_split(int(size), k, s, d, auto == "SAME_UPPER")
                         for size, k, s, d in zip(spatial, kernel, stride, dilation)))
    return [*begins, *ends]


def _conv_dims(imp: _Importer, n: gs.Node, rank: int, w: Any) -> int:
    if len(w.shape) < 3 or rank != len(w.shape):
        raise _refuse(imp, n, f"its input has rank {rank} and its weight rank {len(w.shape)}; {n.op} needs both "
                              f"of the same rank, 3 or more")
    return len(w.shape) - 2


def _groups(imp: _Importer, n: gs.Node) -> int:
    g = int(n.attrs.get("group", 1))
    if g < 1:
        raise _refuse(imp, n, f"attribute 'group' is {g}; it must be at least 1")
    return g


@handles("Conv")
def _conv(imp: _Importer, n: gs.Node) -> bool:
    w, b = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if w is None or w is _ABSENT or b is _ABSENT or not _is_float(w):
        return False
    x = imp.meta(n.inputs[0])
    dims = _conv_dims(imp, n, len(x.shape), w)
    kernel = _spatial(imp, n, "kernel_shape", list(w.shape[2:]), dims)
    if kernel != list(w.shape[2:]):
        raise _refuse(imp, n, f"attribute 'kernel_shape' is {kernel} but its weight's kernel is {list(w.shape[2:])}")
    stride = _spatial(imp, n, "strides", [1] * dims, dims)
    dilation = _spatial(imp, n, "dilations", [1] * dims, dims)
    pads = _auto_pads(imp, n, x.shape[2:], kernel, stride, dilation)
    if pads is None:
        return False
    params = {"weight": w} | ({"bias": b} if b is not None else {})
    attrs = {"stride": stride, "padding": pads, "dilation": dilation, "groups": _groups(imp, n)}
    return _bind(imp, n, imp.emit("conv", [imp.value(n.inputs[0])], attrs, params))


@handles("ConvTranspose")
def _conv_t(imp: _Importer, n: gs.Node) -> bool:
    w, b = _const_in(imp, n, 1), _const_in(imp, n, 2)
    auto = n.attrs.get("auto_pad", "NOTSET")
    if w is None or w is _ABSENT or b is _ABSENT or "output_shape" in n.attrs or auto not in ("NOTSET", "VALID") \
            or not _is_float(w):
        return False
    dims = _conv_dims(imp, n, len(imp.meta(n.inputs[0]).shape), w)
    _spatial(imp, n, "kernel_shape", list(w.shape[2:]), dims)
    attrs = {
        "stride": _spatial(imp, n, "strides", [1] * dims, dims),
        "padding": _spatial(imp, n, "pads", [0] * 2 * dims, dims, lo=0) if auto == "NOTSET" else [0] * 2 * dims,
        "dilation": _spatial(imp, n, "dilations", [1] * dims, dims),
        "groups": _groups(imp, n),
        "output_padding": _spatial(imp, n, "output_padding", [0] * dims, dims, lo=0),
    }
    params = {"weight": w} | ({"bias": b} if b is not None else {})
    return _bind(imp, n, imp.emit("conv_transpose", [imp.value(n.inputs[0])], attrs, params))


@handles("Gemm")
def _gemm(imp: _Importer, n: gs.Node) -> bool:
    b, c = _const_in(imp, n, 1), _const_in(imp, n, 2)
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    if len(imp.meta(n.inputs[0]).shape) != 2:
        raise _refuse(imp, n, f"its input A has rank {len(imp.meta(n.inputs[0]).shape)}; Gemm multiplies "
                              "rank-2 matrices")
    if b is None or b is _ABSENT or c is _ABSENT or len(b.shape) != 2 or not _is_float(b) \
            or imp.is_const(n.inputs[0]) or isinstance(c, Encoded) or (isinstance(b, Encoded) and alpha != 1.0):
        return False
    w = b if int(n.attrs.get("transB", 0)) else _transposed(b)
    if alpha != 1.0:
        w = w * w.dtype.type(alpha)
    params: dict[str, Any] = {"weight": w if isinstance(w, Encoded) else np.ascontiguousarray(w)}
    if c is not None and beta != 0.0:
        if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
            return False  # a per-row bias is not a linear layer's bias
        params["bias"] = np.broadcast_to(c.reshape(-1) * c.dtype.type(beta), (w.shape[0],)).astype(w.dtype)
    x = imp.value(n.inputs[0])
    if int(n.attrs.get("transA", 0)):
        x = imp.emit("transpose", [x], {"perm": [1, 0]}, suffix="transA")
    return _bind(imp, n, imp.emit("linear", [x], {}, params))


@handles("MatMul")
def _matmul(imp: _Importer, n: gs.Node) -> bool:
    a, b = n.inputs[0], n.inputs[1]
    wb = imp.const(b)
    if wb is not None and len(wb.shape) == 2 and not imp.is_const(a) and _is_float(wb) \
            and len(imp.meta(a).shape) >= 2:
        wt = _transposed(wb)
        params: dict[str, Any] = {"weight": wt if isinstance(wt, Encoded) else np.ascontiguousarray(wt)}
        # a following Add of a bias constant joins the linear in ir.canonicalize (rule linear_bias)
        return _bind(imp, n, imp.emit("linear", [imp.value(a)], {}, params))
    return _bind(imp, n, imp.emit("matmul", [imp.value(a), imp.value(b)]))


@handles("BatchNormalization")
def _bn(imp: _Importer, n: gs.Node) -> bool:
    ps = [_const_in(imp, n, i) for i in range(1, 5)]
    if int(n.attrs.get("training_mode", 0)):
        raise _refuse(imp, n, "training_mode = 1: it normalises by batch statistics (a training graph); "
                              "export the model in eval mode")
    if any(p is None or p is _ABSENT for p in ps) or not _single_output(imp, n) \
            or int(n.attrs.get("spatial", 1)) != 1:
        return False
    params = dict(zip(("weight", "bias", "running_mean", "running_var"), ps))
    return _bind(imp, n, imp.emit("batch_norm", [imp.value(n.inputs[0])],
                                  {"eps": float(n.attrs.get("epsilon", 1e-5))}, params))


@handles("LayerNormalization")
def _ln(imp: _Importer, n: gs.Node) -> bool:
    scale, bias = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if scale is None or scale is _ABSENT or bias is _ABSENT or not _single_output(imp, n):
        return False
    shape = imp.meta(n.inputs[0]).shape
    if isinstance(scale, Encoded) or isinstance(bias, Encoded):
        return False
    axis = _axis(imp, n, int(n.attrs.get("axis", -1)), len(shape))
    ns = list(shape[axis:])
    try:
        params = {"weight": np.broadcast_to(scale, ns).copy()}
        if bias is not None:
            params["bias"] = np.broadcast_to(bias, ns).copy()
    except ValueError:
        raise _refuse(imp, n, f"its scale {list(scale.shape)} or bias does not broadcast to the normalized "
                              f"shape {ns}") from None
    return _bind(imp, n, imp.emit("layer_norm", [imp.value(n.inputs[0])],
                                  {"normalized_shape": ns, "eps": float(n.attrs.get("epsilon", 1e-5))}, params))


@handles("InstanceNormalization", "GroupNormalization")
def _gn(imp: _Importer, n: gs.Node) -> bool:
    scale, bias = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if scale is None or scale is _ABSENT or bias is None or bias is _ABSENT:
        return False
    shape = imp.meta(n.inputs[0]).shape
    if len(shape) < 2 or isinstance(scale, Encoded) or isinstance(bias, Encoded):
        return False
    c = shape[1]
    groups = c if n.op == "InstanceNormalization" else int(n.attrs.get("num_groups", 0))
    if groups < 1 or c % groups:
        raise _refuse(imp, n, f"{groups} groups do not divide its {c} channels")
    if scale.size == groups != c:  # opset 18 GroupNormalization: one scale per group
        scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    if scale.size != c or bias.size != c:
        return False
    return _bind(imp, n, imp.emit("group_norm", [imp.value(n.inputs[0])],
                                  {"num_groups": groups, "eps": float(n.attrs.get("epsilon", 1e-5))},
                                  {"weight": scale.reshape(-1), "bias": bias.reshape(-1)}))


_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish"}


@handles(*_UNARY)
def _unary(imp: _Importer, n: gs.Node) -> bool:
    return _bind(imp, n, imp.emit(_UNARY[n.op], [imp.value(n.inputs[0])]))


@handles("Identity", "Dropout")
def _identity(imp: _Importer, n: gs.Node) -> bool:
    if not _single_output(imp, n):
        return False
    return _bind(imp, n, imp.emit("identity", [imp.value(n.inputs[0])]))


@handles("LeakyRelu")
def _leaky(imp: _Importer, n: gs.Node) -> bool:
    return _bind(imp, n, imp.emit("leaky_relu", [imp.value(n.inputs[0])],
                                  {"negative_slope": float(n.attrs.get("alpha", 0.01))}))


@handles("HardSigmoid")
def _hsig(imp: _Importer, n: gs.Node) -> bool:
    attrs = {"alpha": float(n.attrs.get("alpha", 0.2)), "beta": float(n.attrs.get("beta", 0.5))}
    return _bind(imp, n, imp.emit("hardsigmoid", [imp.value(n.inputs[0])], attrs))


@handles("Gelu")
def _gelu(imp: _Importer, n: gs.Node) -> bool:
    approx = n.attrs.get("approximate", "none")
    return _bind(imp, n, imp.emit("gelu", [imp.value(n.inputs[0])], {"approximate": str(approx)}))


@handles("Clip")
def _clip(imp: _Importer, n: gs.Node) -> bool:
    if imp.opset < 11:
        lo, hi = n.attrs.get("min"), n.attrs.get("max")
    else:
        lo_a, hi_a = _const_in(imp, n, 1), _const_in(imp, n, 2)
        if lo_a is _ABSENT or hi_a is _ABSENT:
            return False
        if isinstance(lo_a, Encoded) or isinstance(hi_a, Encoded):
            return False
        lo = None if lo_a is None else _scalar(imp, n, lo_a, "min")
        hi = None if hi_a is None else _scalar(imp, n, hi_a, "max")
    attrs = {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)}
    if attrs["min"] == 0.0 and attrs["max"] is None:
        return _bind(imp, n, imp.emit("relu", [imp.value(n.inputs[0])]))
    return _bind(imp, n, imp.emit("clip", [imp.value(n.inputs[0])], attrs))


@handles("Softmax")
def _softmax(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    x = imp.value(n.inputs[0])
    if imp.opset >= 13:
        return _bind(imp, n, imp.emit("softmax", [x], {"axis": _axis(imp, n, int(n.attrs.get("axis", -1)),
                                                                         len(shape))}))
    # Before opset 13 softmax normalises over all axes from `axis` on (the input seen as 2-D).
    axis = _axis(imp, n, int(n.attrs.get("axis", 1)), len(shape))
    if all(d == 1 for d in shape[axis + 1:]) and axis < len(shape):
        return _bind(imp, n, imp.emit("softmax", [x], {"axis": axis}))
    if axis == len(shape) - 1:
        return _bind(imp, n, imp.emit("softmax", [x], {"axis": -1}))
    flat = imp.emit("flatten", [x], {"start_dim": axis, "end_dim": -1}, suffix="flatten")
    sm = imp.emit("softmax", [flat], {"axis": -1}, suffix="softmax")
    return _bind(imp, n, imp.emit("reshape", [sm], {"shape": [0] * axis + list(shape[axis:])}))


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@handles(*_BINARY)
def _binary(imp: _Importer, n: gs.Node) -> bool:
    if n.op == "Div" and not imp.meta(n.inputs[0]).dtype.startswith(("float", "bfloat")):
        return False  # integer Div truncates (the IR's div divides): kept opaque, with its torch form
    return _bind(imp, n, imp.emit(_BINARY[n.op], [imp.value(n.inputs[0]), imp.value(n.inputs[1])]))


@handles("Sum")
def _sum(imp: _Importer, n: gs.Node) -> bool:
    vals = [imp.value(t) for t in n.inputs]
    if len(vals) == 1:
        return _bind(imp, n, imp.emit("identity", vals))
    acc = vals[0]
    for i, v in enumerate(vals[1:], 1):
        acc = imp.emit("add", [acc, v], suffix="" if i == len(vals) - 1 else f"add{i}")
    return _bind(imp, n, acc)


@handles("Concat")
def _concat(imp: _Importer, n: gs.Node) -> bool:
    ins = [t for t in n.inputs if (t.name and imp.meta(t).numel() > 0) or len(n.inputs) == 1]
    return _bind(imp, n, imp.emit("concat", [imp.value(t) for t in ins], {"axis": int(n.attrs.get("axis", 1))}))


@handles("Split")
def _split(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    axis = _axis(imp, n, int(n.attrs.get("axis", 0)), len(shape))
    sizes: Any = n.attrs.get("split") if imp.opset < 13 else _const_in(imp, n, 1)
    if sizes is _ABSENT:
        return False
    if sizes is None:
        k = int(n.attrs.get("num_outputs", len(n.outputs)))
        if k < 1:
            raise _refuse(imp, n, f"it splits into {k} outputs")
        if is_dynamic(shape[axis]):
            return False  # the sizes follow the run-time length: kept opaque
        step = -(-shape[axis] // k)
        sizes = [min(step, shape[axis] - i * step) for i in range(k)]
    v = imp.emit("split", [imp.value(n.inputs[0])], {"axis": axis, "sizes": _ints(sizes)})
    for i in range(len(n.outputs)):
        _bind(imp, n, (v[0], i), i)
    return True


@handles("Slice")
def _slice(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    if imp.opset < 10:
        starts, ends = n.attrs["starts"], n.attrs["ends"]
        axes, steps = n.attrs.get("axes"), None
    else:
        starts, ends, axes, steps = (_const_in(imp, n, i) for i in range(1, 5))
        if any(a is _ABSENT for a in (starts, ends, axes, steps)):
            return False
        if any(t is not None and t.name in imp.sym for t in (_in(n, i) for i in range(1, 5))):
            return False  # bounds that follow a dynamic dim (`ids[:, :seq]`): an opaque Slice reads them at run time
    st, en = _ints(starts), _ints(ends)
    ax = _ints(axes) if axes is not None else list(range(len(st)))
    sp = _ints(steps) if steps is not None else [1] * len(st)
    x = imp.value(n.inputs[0])
    if not len(st) == len(en) == len(ax) == len(sp) or 0 in sp:
        raise _refuse(imp, n, f"starts {st}, ends {en}, axes {ax} and steps {sp} must be as many, steps not 0")
    todo = [(_axis(imp, n, a, len(shape)), s, e, p) for a, s, e, p in zip(ax, st, en, sp)]
    if len({a for a, _, _, _ in todo}) != len(todo):
        raise _refuse(imp, n, f"axes {ax} name an axis twice")
    # INT64 sentinels for "to the end" clip to the axis; python slice semantics handle the rest.
    lim = 1 << 62
    todo = [(a, max(-lim, min(lim, s)), max(-lim, min(lim, e)), p) for a, s, e, p in todo]
    for i, (a, s, e, p) in enumerate(todo):
        x = imp.emit("slice", [x], {"axis": a, "start": s, "end": e, "step": p},
                     suffix="" if i == len(todo) - 1 else f"axis{a}")
    if not todo:
        x = imp.emit("identity", [x])
    return _bind(imp, n, x)


@handles("Flatten")
def _flatten(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    axis = int(n.attrs.get("axis", 1))
    if not -rank <= axis <= rank:  # ONNX: axis in [-r, r], a negative one counts from the end (-1 is r - 1)
        raise _refuse(imp, n, f"axis {axis} is out of range for its rank-{rank} input")
    axis = axis + rank if axis < 0 else axis
    x = imp.value(n.inputs[0])
    if axis == 0:
        f = imp.emit("flatten", [x], {"start_dim": 0, "end_dim": -1}, suffix="flatten")
        return _bind(imp, n, imp.emit("unsqueeze", [f], {"axes": [0]}))
    if axis == rank:
        f = imp.emit("flatten", [x], {"start_dim": 0, "end_dim": -1}, suffix="flatten")
        return _bind(imp, n, imp.emit("unsqueeze", [f], {"axes": [1]}))
    if axis == 1:
        return _bind(imp, n, imp.emit("flatten", [x], {"start_dim": 1, "end_dim": -1}))
    inner = imp.emit("flatten", [x], {"start_dim": axis, "end_dim": -1}, suffix="inner")
    return _bind(imp, n, imp.emit("flatten", [inner], {"start_dim": 0, "end_dim": axis - 1}))


@handles("Reshape")
def _reshape(imp: _Importer, n: gs.Node) -> bool:
    shape = n.attrs.get("shape") if imp.opset < 5 else _const_in(imp, n, 1)
    if shape is None or shape is _ABSENT:
        return False
    sym = imp.sym.get(n.inputs[1].name) if imp.opset >= 5 else None
    target = [d for d in sym.reshape(-1)] if sym is not None else _ints(shape)  # dynamic sizes stay Dims
    if int(n.attrs.get("allowzero", 0)) and 0 in target:
        return False
    return _bind(imp, n, imp.emit("reshape", [imp.value(n.inputs[0])], {"shape": target}))


@handles("Transpose")
def _transpose(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    perm = _ints(n.attrs.get("perm", list(range(rank))[::-1]))
    return _bind(imp, n, imp.emit("transpose", [imp.value(n.inputs[0])], {"perm": perm}))


def _axes(imp: _Importer, n: gs.Node) -> Any:
    return n.attrs.get("axes") if imp.opset < 13 else _const_in(imp, n, 1)


@handles("Squeeze")
def _squeeze(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    axes = _axes(imp, n)
    if axes is _ABSENT:
        return False
    # no axes: every axis of size 1; a dynamic axis is not one, whatever its example size
    ax = _ints(axes) if axes is not None else [i for i, d in enumerate(shape) if d == 1 and not is_dynamic(d)]
    ax = [_axis(imp, n, a, len(shape)) for a in ax]
    wrong = [a for a in ax if not is_dynamic(shape[a]) and shape[a] != 1]
    if wrong:
        raise _refuse(imp, n, f"axis {wrong[0]} has size {shape[wrong[0]]}; Squeeze removes axes of size 1")
    return _bind(imp, n, imp.emit("squeeze", [imp.value(n.inputs[0])], {"axes": ax}))


@handles("Unsqueeze")
def _unsqueeze(imp: _Importer, n: gs.Node) -> bool:
    axes = _axes(imp, n)
    if axes is None or axes is _ABSENT:
        return False
    rank = len(imp.meta(n.inputs[0]).shape) + len(_ints(axes))
    ax = sorted(_axis(imp, n, a, rank) for a in _ints(axes))
    if len(set(ax)) != len(ax):
        raise _refuse(imp, n, f"axes {_ints(axes)} name an output axis twice")
    return _bind(imp, n, imp.emit("unsqueeze", [imp.value(n.inputs[0])], {"axes": ax}))


@handles("MaxPool", "AveragePool")
def _pool(imp: _Importer, n: gs.Node) -> bool:
    if not _single_output(imp, n) or int(n.attrs.get("storage_order", 0)):
        return False
    x = imp.meta(n.inputs[0])
    if "kernel_shape" not in n.attrs:
        raise _refuse(imp, n, "it has no attribute 'kernel_shape'")
    dims = len(x.shape) - 2
    if dims < 1:
        raise _refuse(imp, n, f"its input has rank {len(x.shape)}; pooling needs rank 3 or more")
    kernel = _spatial(imp, n, "kernel_shape", [1] * dims, dims)
    stride = _spatial(imp, n, "strides", [1] * dims, dims)
    dilation = _spatial(imp, n, "dilations", [1] * dims, dims)
    pads = _auto_pads(imp, n, x.shape[2:], kernel, stride, dilation)
    if pads is None:
        return False
    attrs: dict[str, Any] = {"kernel": kernel, "stride": stride, "padding": pads,
                             "ceil_mode": bool(n.attrs.get("ceil_mode", 0))}
    if n.op == "MaxPool":
        attrs["dilation"] = dilation
        return _bind(imp, n, imp.emit("max_pool", [imp.value(n.inputs[0])], attrs))
    if any(d != 1 for d in dilation):
        return False
    attrs["count_include_pad"] = bool(n.attrs.get("count_include_pad", 0))
    return _bind(imp, n, imp.emit("avg_pool", [imp.value(n.inputs[0])], attrs))


@handles("GlobalAveragePool")
def _gap(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    return _bind(imp, n, imp.emit("adaptive_avg_pool", [imp.value(n.inputs[0])], {"output_size": [1] * (rank - 2)}))


@handles("ReduceMean")
def _reduce_mean(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    axes = n.attrs.get("axes") if imp.opset < 18 else _const_in(imp, n, 1)
    if axes is _ABSENT:
        return False
    if axes is None or len(_ints(axes)) == 0:
        if int(n.attrs.get("noop_with_empty_axes", 0)):
            return _bind(imp, n, imp.emit("identity", [imp.value(n.inputs[0])]))
        axes = list(range(rank))
    attrs = {"axes": sorted(_axis(imp, n, a, rank) for a in _ints(axes)), "keepdim": bool(n.attrs.get("keepdims", 1))}
    return _bind(imp, n, imp.emit("mean", [imp.value(n.inputs[0])], attrs))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@handles("Pad")
def _pad(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    mode = n.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in _PAD_MODES:
        return False
    if imp.opset < 11:
        pads, value = _ints(n.attrs.get("pads", n.attrs.get("paddings", []))), float(n.attrs.get("value", 0.0))
    else:
        p, v, axes = _const_in(imp, n, 1), _const_in(imp, n, 2), _const_in(imp, n, 3)
        if p is None or p is _ABSENT or v is _ABSENT or axes is _ABSENT:
            return False
        pads = _ints(p)
        if isinstance(v, Encoded) or isinstance(p, Encoded) or isinstance(axes, Encoded):
            return False
        value = 0.0 if v is None or np.asarray(v).size == 0 else _scalar(imp, n, v, "constant value")
        if axes is not None:
            ax = [_axis(imp, n, a, rank) for a in _ints(axes)]
            if len(pads) != 2 * len(ax):
                raise _refuse(imp, n, f"pads {pads} must hold two values for each of the axes {ax}")
            full = [0] * 2 * rank
            for i, a in enumerate(ax):
                full[a], full[a + rank] = pads[i], pads[i + len(ax)]
            pads = full
    if len(pads) != 2 * rank:
        raise _refuse(imp, n, f"pads {pads} must hold two values for each of the {rank} axes of its input")
    attrs = {"pads": pads, "mode": _PAD_MODES[mode], "value": value}
    return _bind(imp, n, imp.emit("pad", [imp.value(n.inputs[0])], attrs))


@handles("Resize", "Upsample")
def _resize(imp: _Importer, n: gs.Node) -> bool:
    x = imp.meta(n.inputs[0])
    rank = len(x.shape)
    def s(key: str, default: str) -> str:
        v = n.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    mode = s("mode", "nearest")
    if n.op == "Upsample" or imp.opset < 11:
        scales = n.attrs.get("scales") if imp.opset < 9 else _const_in(imp, n, 1)
        sizes: Any = None
        ctm, nearest = "asymmetric", "floor"  # Upsample/Resize-10 semantics
    else:
        scales, sizes = _const_in(imp, n, 2), _const_in(imp, n, 3)
        ctm, nearest = s("coordinate_transformation_mode", "half_pixel"), s("nearest_mode", "round_prefer_floor")
        if n.attrs.get("axes") is not None or int(n.attrs.get("antialias", 0)) \
                or s("keep_aspect_ratio_policy", "stretch") != "stretch" or ctm == "tf_crop_and_resize":
            return False
    if scales is _ABSENT or sizes is _ABSENT or mode not in ("nearest", "linear", "cubic"):
        return False
    attrs: dict[str, Any] = {"mode": mode, "coordinate_transformation_mode": ctm, "nearest_mode": nearest}
    if mode == "cubic":
        attrs["cubic_coeff_a"] = float(n.attrs.get("cubic_coeff_a", -0.75))
        attrs["exclude_outside"] = int(n.attrs.get("exclude_outside", 0))
    if sizes is not None and np.asarray(sizes).size:
        sz = _ints(sizes)
        if len(sz) != rank:
            raise _refuse(imp, n, f"its sizes have {len(sz)} values for a rank-{rank} input")
        if tuple(sz[:2]) != tuple(x.shape[:2]):
            return False
        attrs["size"] = sz[2:]
    elif scales is not None and np.asarray(scales).size:
        sc = [float(v) for v in np.asarray(scales).reshape(-1)]
        if len(sc) != rank:
            raise _refuse(imp, n, f"its scales have {len(sc)} values for a rank-{rank} input")
        if sc[:2] != [1.0, 1.0]:
            return False
        attrs["scale"] = sc[2:]
    else:
        return False
    return _bind(imp, n, imp.emit("resize", [imp.value(n.inputs[0])], attrs))


@handles("LRN")
def _lrn(imp: _Importer, n: gs.Node) -> bool:
    attrs = {"size": int(n.attrs["size"]), "alpha": float(n.attrs.get("alpha", 1e-4)),
             "beta": float(n.attrs.get("beta", 0.75)), "bias": float(n.attrs.get("bias", 1.0))}
    return _bind(imp, n, imp.emit("lrn", [imp.value(n.inputs[0])], attrs))


@handles("Gather")
def _gather(imp: _Importer, n: gs.Node) -> bool:
    table, idx = imp.const(n.inputs[0]), n.inputs[1]
    if table is not None and len(table.shape) == 2 and int(n.attrs.get("axis", 0)) == 0 and not imp.is_const(idx) \
            and _is_float(table):
        return _bind(imp, n, imp.emit("embedding", [imp.value(idx)], {}, {"weight": table}))
    ind = imp.const(idx)
    if isinstance(ind, np.ndarray) and ind.ndim == 0 and table is None:
        # x[..., i, ...] along `axis`: a one-element slice, then the axis dropped.
        shape = imp.meta(n.inputs[0]).shape
        axis = _axis(imp, n, int(n.attrs.get("axis", 0)), len(shape))
        if not -shape[axis] <= int(ind) < shape[axis]:
            raise _refuse(imp, n, f"index {int(ind)} is out of range for axis {axis} of size {shape[axis]}")
        i = int(ind)
        if i < 0 and is_dynamic(shape[axis]):  # x[..., -1]: counted from the end at every size of the axis
            start, end = i, (i + 1 if i + 1 < 0 else 1 << 62)
        else:
            start, end = i % int(shape[axis]), i % int(shape[axis]) + 1
        sl = imp.emit("slice", [imp.value(n.inputs[0])], {"axis": axis, "start": start, "end": end, "step": 1},
                      suffix="slice")
        return _bind(imp, n, imp.emit("squeeze", [sl], {"axes": [axis]}))
    if isinstance(ind, np.ndarray) and ind.ndim == 1 and len(ind) and table is None:
        # x.index_select(axis, ind) with distinct constant positions of a fixed-size axis
        shape = imp.meta(n.inputs[0]).shape
        axis = _axis(imp, n, int(n.attrs.get("axis", 0)), len(shape))
        if is_dynamic(shape[axis]):
            return False
        size = int(shape[axis])
        if not all(-size <= int(i) < size for i in ind):
            raise _refuse(imp, n, f"an index is out of range for axis {axis} of size {size}")
        idx = tuple(int(i) % size for i in ind)
        if len(set(idx)) == len(idx):
            return _bind(imp, n, imp.emit("gather", [imp.value(n.inputs[0])], {"axis": axis, "indices": idx}))
    return False


@handles("QuantizeLinear", "DequantizeLinear")
def _qdq(imp: _Importer, n: gs.Node) -> bool:
    scale, zp = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if scale is None or scale is _ABSENT or zp is _ABSENT or int(n.attrs.get("block_size", 0)):
        return False
    if zp is None:
        zp = np.zeros(scale.shape, np.uint8)
    if zp.dtype not in (np.int8, np.uint8) or scale.dtype != np.float32:
        return False
    kind = "quantize" if n.op == "QuantizeLinear" else "dequantize"
    attrs = {"axis": int(n.attrs.get("axis", 1))}
    if n.op == "QuantizeLinear" and int(n.attrs.get("saturate", 1)) != 1:
        return False
    return _bind(imp, n, imp.emit(kind, [imp.value(n.inputs[0])], attrs, {"scale": scale, "zero_point": zp}))
