"""Op tables: one handler per aten packet name (args bound by the aten schema), and the torch.nn
module / torch function / tensor method tables that map a symbolic_trace graph onto the same handlers."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from netsqueeze.frontends.fx.opaque import AtenCall, _Slot
from netsqueeze.frontends.fx.state import _Capture, _tup, _Unmappable, python_value
from netsqueeze.ir.dims import expr_of, is_dynamic
from netsqueeze.ir.graph import TensorMeta, Value
from netsqueeze.ir.tables import registrar

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
    # torch.cat skips empty 1-d tensors (an empty KV cache in HF decoders)
    parts = [t for t in a["tensors"] if not (cx.is_const(t) and cx.const(t).numel() == 0)]
    acts = [t for t in parts if not cx.is_const(t)]
    if not acts:
        raise _Unmappable("concat of constants only")
    like = cx.val(acts[0])
    if len(parts) == 1:
        return (cx.emit("identity", [like]), 0)
    # a constant part (a class token) becomes a constant node, so the concat stays canonical
    vals = [cx.operand(t, like) for t in parts]
    return (cx.emit("concat", vals, {"axis": int(a.get("dim", 0))}), 0)


@handles("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk")
def _split(cx: _Capture, a: dict[str, Any]) -> list[Value]:
    outs = cx.out_meta()
    dim = int(a.get("dim", 0))
    sizes = tuple(int(o.shape[dim]) for o in outs)
    nid = cx.emit("split", [cx.val(a["self"])], {"axis": dim, "sizes": sizes})
    return [(nid, i) for i in range(len(sizes))]


TO_THE_END = 2**63 - 1  # a slice end past any size (INT64_MAX, as torch and ONNX write it)


@handles("slice")
def _slice(cx: _Capture, a: dict[str, Any]) -> Value:
    x = cx.val(a["self"])
    dim = int(a.get("dim", 0))
    size = cx.shape(a["self"])[dim]
    start = 0 if a.get("start") is None else int(a["start"])
    end = size if a.get("end") is None else int(a["end"])
    if is_dynamic(cx.graph.meta_of(x).shape[dim]) and end >= size:
        end = TO_THE_END  # past the example's end: to the end at every size (the IR's length follows the dim)
    else:  # INT64_MAX means "to the end"; store the python-slice form that survives channel pruning
        end = min(end, size) if end >= 0 else end
    if start == 0 and end in (size, TO_THE_END) and int(a.get("step", 1)) == 1:
        return (cx.emit("identity", [x]), 0)
    return (cx.emit("slice", [x], {"axis": dim, "start": start, "end": end, "step": int(a.get("step", 1))}), 0)


@handles("index_select")
def _index_select(cx: _Capture, a: dict[str, Any]) -> Value:
    """x.index_select(dim, index) with a constant 1-d index of distinct positions: a gather."""
    if not cx.is_const(a["index"]):
        raise _Unmappable("index_select with an activation index")
    shape = cx.shape(a["self"])
    dim = int(a["dim"]) % len(shape)
    idx = [int(i) % shape[dim] for i in cx.const(a["index"]).reshape(-1).tolist()]
    if len(set(idx)) != len(idx):
        raise _Unmappable("index_select with repeated positions")
    return (cx.emit("gather", [cx.val(a["self"])], {"axis": dim, "indices": tuple(idx)}), 0)

@handles("flatten")
def _flatten(cx: _Capture, a: dict[str, Any]) -> Value:
    return (cx.emit("flatten", [cx.val(a["self"])],
                    {"start_dim": int(a.get("start_dim", 0)), "end_dim": int(a.get("end_dim", -1))}), 0)


@handles("view", "reshape", "_unsafe_view", "unflatten", "_reshape_alias")
def _reshape(cx: _Capture, a: dict[str, Any]) -> Value:
    x = cx.val(a["self"])
    src = cx.shape(a["self"])
    out = tuple(python_value(d) for d in cx.out_meta().shape)  # dynamic sizes stay Dims
    # dim 0 kept: the same dynamic expression as the input's (a literal `reshape(2, -1)` of a batch that is 2 in
    # the example is not: it stays 2 at every batch, and so does it where the capture fixed the batch)
    d0 = cx.graph.meta_of(x).shape[0] if src else 0
    kept0 = bool(src) and bool(out) and is_dynamic(d0) and is_dynamic(out[0]) and expr_of(d0) == expr_of(out[0])
    # a flatten written as view(x.size(0), -1): keep it batch- and channel-count agnostic
    if len(src) > 2 and len(out) == 2 and kept0:
        return (cx.emit("flatten", [x], {"start_dim": 1, "end_dim": -1}), 0)
    # the observed shape is the truth; the batch dim becomes 0 (copy) and a written -1 stays -1
    target = list(out)
    if kept0:
        target[0] = 0
    # sizes read from the tensor at run time (dynamic dims) are graph nodes, not literals: only a literal -1 matters
    size = [int(d) if isinstance(d, int) else None for d in a.get("size") or ()]
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
    size = tuple(python_value(d) for d in cx.out_meta().shape[2:])  # a size following the input stays a Dim
    assert cx.cur is not None
    linear = a["_linear"] if "_linear" in a else "nearest" not in str(cx.cur.target)
    # coordinate conventions spelled the ONNX way, so both backends agree on what torch computed
    attrs: dict[str, Any] = {"size": size, "mode": "linear" if linear else "nearest"}
    # given scale factors set the coordinates (1 / scale, not input / output size): kept, the size follows
    scales = a.get("scale_factors")
    if scales is None:
        scales = [a[k] for k in ("scales_d", "scales_h", "scales_w", "scales") if a.get(k) is not None] or None
    if scales is not None and len(scales) == len(size):
        attrs = {"scale": [float(v) for v in scales], "mode": attrs["mode"]}
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


# ---- ops HF transformers models use (torch.export graphs) -------------------------------------------
@handles("select")
def _select(cx: _Capture, a: dict[str, Any]) -> Value:
    """x[:, i] → a one-wide slice and a squeeze of that axis."""
    src = cx.shape(a["self"])
    dim = int(a["dim"]) % len(src)
    i = int(a["index"])
    if i < 0 and is_dynamic(cx.graph.meta_of(cx.val(a["self"])).shape[dim]):  # x[:, -1]: counted from the end
        start, end = i, (i + 1 if i < -1 else TO_THE_END)
    else:
        start = i + src[dim] if i < 0 else i
        end = start + 1
    s = (cx.emit("slice", [cx.val(a["self"])], {"axis": dim, "start": start, "end": end, "step": 1}), 0)
    return (cx.emit("squeeze", [s], {"axes": (dim,)}), 0)


@handles("to", "_to_copy", "type_as", "_to_dtype", "to_dtype")
def _to(cx: _Capture, a: dict[str, Any]) -> Value:
    """A dtype/device change that keeps the dtype is an identity; a real cast has no canonical op."""
    x = cx.val(a["self"])
    out = cx.out_meta()
    if not isinstance(out, torch.Tensor) or _dtype_name(out.dtype) != cx.graph.meta_of(x).dtype:
        raise _Unmappable("dtype cast")
    return (cx.emit("identity", [x]), 0)


def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


@handles("expand")
def _expand(cx: _Capture, a: dict[str, Any]) -> Value:
    out = tuple(int(d) for d in cx.out_meta().shape)
    if out != cx.shape(a["self"]):
        raise _Unmappable("a broadcasting expand")
    return (cx.emit("identity", [cx.val(a["self"])]), 0)


@handles("pow")
def _pow(cx: _Capture, a: dict[str, Any]) -> Value:
    e = a.get("exponent")
    if isinstance(e, bool) or not isinstance(e, (int, float)) or float(e) not in (1.0, 2.0):
        raise _Unmappable("pow other than x**1, x**2")  # x**3 stays opaque: canonicalize reads it (tanh GELU)
    x = cx.val(a["self"])
    return (cx.emit("identity", [x]), 0) if float(e) == 1.0 else (cx.emit("mul", [x, x]), 0)


@handles("scaled_dot_product_attention")
def _sdpa(cx: _Capture, a: dict[str, Any]) -> Value:
    """softmax(q·kᵀ·scale + mask)·v as matmul / mul / add / softmax / matmul.

    Not the IR `attention` op: that one owns its q/k/v/o projections, which SDPA does not have. A
    boolean mask from an activation (padding masks) keeps the masked scores at -inf through one opaque
    `aten::where.ScalarOther`; a constant mask becomes an additive constant (dropped when it masks nothing).
    Rows whose keys are all masked give NaN here where torch's math kernel gives 0 (HF padding masks
    always keep at least one key).
    """
    if float(a.get("dropout_p", 0.0)) != 0.0 or a.get("enable_gqa"):
        raise _Unmappable("SDPA with dropout or grouped-query heads")
    q, k, v = cx.val(a["query"]), cx.val(a["key"]), cx.val(a["value"])
    qs, ks = cx.shape(a["query"]), cx.shape(a["key"])
    if len(ks) < 2 or ks[:-2] != cx.shape(a["value"])[:-2] or qs[-1] != ks[-1]:
        raise _Unmappable("SDPA with broadcast key/value batch dims")
    rank = len(ks)
    perm = (*range(rank - 2), rank - 1, rank - 2)
    kt = (cx.emit("transpose", [k], {"perm": perm}), 0)
    s = (cx.emit("matmul", [q, kt]), 0)
    scale = a.get("scale")
    scale = 1.0 / float(qs[-1]) ** 0.5 if scale is None else float(scale)
    if scale != 1.0:
        s = (cx.emit("mul", [s, cx.scalar(scale, s)]), 0)
    mask = a.get("attn_mask")
    anded: list[torch.Tensor] = []
    if isinstance(mask, fx.Node):
        mask, anded = _mask_source(cx, mask, tuple(int(d) for d in (*ks[:-2], qs[-2], ks[-2])))
    for m in anded:  # constant masks ANDed into an activation mask: -inf where they mask
        add = torch.zeros(m.shape, dtype=getattr(torch, cx.graph.meta_of(s).dtype))
        s = (cx.emit("add", [s, cx.scalar(add.masked_fill(~m, float("-inf")), s)]), 0)
    if a.get("is_causal"):
        if mask is not None:
            raise _Unmappable("SDPA with both a mask and is_causal")
        mask = torch.ones(qs[-2], ks[-2], dtype=torch.bool).tril()
    if mask is not None:
        if cx.is_const(mask):
            m = cx.const(mask)
            if m.dtype == torch.bool:
                if not bool(m.all()):
                    add = torch.zeros(m.shape, dtype=getattr(torch, cx.graph.meta_of(s).dtype))
                    s = (cx.emit("add", [s, cx.scalar(add.masked_fill(~m, float("-inf")), s)]), 0)
            else:
                s = (cx.emit("add", [s, cx.scalar(m, s)]), 0)
        else:
            mv = cx.val(mask)
            if cx.graph.meta_of(mv).dtype == "bool":
                s = _where_ninf(cx, mv, s)
            else:
                s = (cx.emit("add", [s, mv]), 0)
    p = (cx.emit("softmax", [s], {"axis": -1}), 0)
    return (cx.emit("matmul", [p, v]), 0)


_BOOL_VIEWS = frozenset({"expand", "to", "_to_copy", "alias", "clone", "detach", "contiguous", "__and__",
                         "bitwise_and", "logical_and"})


def _mask_source(cx: _Capture, nd: fx.Node, scores: tuple[int, ...]) -> tuple[fx.Node, list[torch.Tensor]]:
    """The boolean mask before the broadcasts HF's mask builder adds (expand, bool→bool `to`) and the
    constant boolean masks ANDed into it (a causal mask): SDPA broadcasts its mask, so the smaller one
    with the constants added as -inf gives the same scores."""
    cur, consts = nd, []
    while isinstance(cur.target, torch._ops.OpOverload) and cur.target._overloadpacket.__name__ in _BOOL_VIEWS:
        if not isinstance(cx.observed.get(cur), torch.Tensor) or cx.observed[cur].dtype != torch.bool:
            break
        src = [i for i in cur.all_input_nodes if not cx.is_const(i)]
        cs = [cx.const(i) for i in cur.all_input_nodes if cx.is_const(i)]
        if len(src) != 1 or not isinstance(cx.observed.get(src[0]), torch.Tensor) \
                or cx.observed[src[0]].dtype != torch.bool:
            break
        if cs and (cur.target._overloadpacket.__name__ not in ("__and__", "bitwise_and", "logical_and")
                   or not all(c.dtype == torch.bool for c in cs)):
            break
        try:
            if any(torch.broadcast_shapes(tuple(t), scores) != scores
                   for t in [cx.observed[src[0]].shape, *(c.shape for c in cs)]):
                break
        except RuntimeError:
            break
        consts += [c for c in cs if not bool(c.all())]
        cur = src[0]
    if isinstance(cx.env.get(cur), tuple) and cur not in cx.consts:
        return cur, consts
    return nd, []


def _where_ninf(cx: _Capture, mask: Value, scores: Value) -> Value:
    """scores where mask else -inf, as one opaque aten call (the IR has no select-by-mask op)."""
    meta = cx.graph.meta_of(scores)
    call = AtenCall("aten", "where", "ScalarOther", (_Slot(0), _Slot(1), float("-inf")))
    nid = cx.emit("opaque", [mask, scores], {}, op_type="aten::where.ScalarOther", payload=call)
    cx.graph.node(nid).meta = [meta]
    return (nid, 0)


@handles("__and__", "bitwise_and", "logical_and", "__or__", "bitwise_or", "logical_or")
def _logical(cx: _Capture, a: dict[str, Any]) -> Value:
    """x & all-true (x | all-false) is x: HF mask builders AND a padding mask with constant masks that a
    capture at fixed sizes makes all-true (the bidirectional mask)."""
    assert cx.cur is not None
    neutral = "and" in str(cx.cur.target)
    x, y = a["self"], a["other"]
    if cx.is_const(x):
        x, y = y, x
    if not cx.is_const(y):
        raise _Unmappable("logical op of two activations")
    c = cx.const(y)
    if c.dtype != torch.bool or bool(c.all() if neutral else c.any()) is not True \
            or tuple(int(d) for d in cx.out_meta().shape) != cx.shape(x) or cx.observed[x].dtype != torch.bool:
        raise _Unmappable("logical op with a non-neutral constant")
    return (cx.emit("identity", [cx.val(x)]), 0)


@handles("index")
def _index(cx: _Capture, a: dict[str, Any]) -> Value:
    """x[arange(B)[:, None, None, None], arange(K)[None, None, None, :]] (HF's mask gather, indices
    constant at a fixed capture size) is an unsqueeze of x: each index is a whole axis of x, placed at
    increasing broadcast positions."""
    idx = a["indices"]
    src = cx.shape(a["self"])
    if not idx or any(i is None or not cx.is_const(i) for i in idx) or len(idx) > len(src):
        raise _Unmappable("index with activation or missing indices")
    ts = [cx.const(i) for i in idx]
    if any(t.dtype in (torch.bool, torch.uint8) or t.dtype.is_floating_point for t in ts):
        raise _Unmappable("boolean index")
    rank = max(t.dim() for t in ts)
    out = tuple(int(d) for d in cx.out_meta().shape)
    chosen: list[int] = []
    for j, t in enumerate(ts):
        n = src[j]
        t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
        axes = [d for d in range(rank) if t.shape[d] != 1]
        if n > 1:
            if len(axes) != 1 or t.shape[axes[0]] != n or not torch.equal(t.reshape(-1), torch.arange(n)):
                raise _Unmappable("index that is not a whole axis")
            p = axes[0]
        else:
            if axes or int(t.reshape(-1)[0]) != 0:
                raise _Unmappable("index that is not a whole axis")
            p = (chosen[-1] + 1) if chosen else 0
        if chosen and p <= chosen[-1]:
            raise _Unmappable("index that reorders axes")
        chosen.append(p)
    if chosen and chosen[-1] >= rank:
        raise _Unmappable("index that reorders axes")
    missing = tuple(d for d in range(rank) if d not in chosen)
    x = cx.val(a["self"])
    y = (cx.emit("unsqueeze", [x], {"axes": missing}), 0) if missing else (cx.emit("identity", [x]), 0)
    if tuple(cx.graph.meta_of(y).shape) != out:
        raise _Unmappable("index result shape")
    return y


def _where_blend(cx: _Capture, mask: fx.Node, x: Any, y: Any, out: torch.Tensor) -> Value | None:
    """where(mask, X, s) with X a finite float32 constant of the result's shape and s a finite scalar (T5's
    per-head position bias where the padding mask keeps a key, the dtype's minimum elsewhere), as
    X·where(mask, 1, 0) + where(mask, 0, s): exact for finite X and s, and the opaque calls read only the
    mask, so the axes of X (the heads) stay visible to channel analysis. None when it does not apply (one
    opaque where then)."""
    flip = not cx.is_const(x)
    const, scalar = (y, x) if flip else (x, y)
    if not cx.is_const(const) or not isinstance(scalar, (int, float)) or isinstance(scalar, bool) \
            or out.dtype != torch.float32 or not math.isfinite(float(scalar)):
        return None
    c = cx.const(const)
    if c.dtype != torch.float32 or c.dim() > out.dim() or not bool(torch.isfinite(c).all()):
        return None
    mv = cx.val(mask)
    shape = tuple(cx.graph.meta_of(mv).shape)
    on, off = (0.0, 1.0) if flip else (1.0, 0.0)  # the constant's weight where the mask is true / false

    def select(t: float, f: float) -> Value:
        call = AtenCall("aten", "where", "Scalar", (_Slot(0), t, f))
        nid = cx.emit("opaque", [mv], {}, op_type="aten::where.Scalar", payload=call)
        cx.graph.node(nid).meta = [TensorMeta(shape, "float32")]
        return (nid, 0)

    weight = select(on, off)
    rest = select(0.0, float(scalar)) if not flip else select(float(scalar), 0.0)
    blend = (cx.emit("mul", [cx.scalar(c, mv), weight]), 0)
    res = (cx.emit("add", [blend, rest]), 0)
    if tuple(int(d) for d in cx.graph.meta_of(res).shape) != tuple(int(d) for d in out.shape):
        raise _Unmappable("where blend shape")
    return res


@handles("where")
def _where(cx: _Capture, a: dict[str, Any]) -> Value:
    """where(mask, x, y) stays one opaque call (the IR has no select-by-mask op), reading the boolean mask
    before HF's broadcasts (see `_mask_source`) so the mask-builder ops around it drop out."""
    assert cx.cur is not None and isinstance(cx.cur.target, torch._ops.OpOverload)
    cond = a["condition"]
    out = cx.out_meta()
    if not isinstance(cond, fx.Node) or cx.is_const(cond) or not isinstance(out, torch.Tensor):
        raise _Unmappable("where on a constant condition")
    src, anded = _mask_source(cx, cond, tuple(int(d) for d in out.shape))
    blended = _where_blend(cx, cond if anded else src, a["self"], a["other"], out)
    if blended is not None:
        return blended
    if anded or src is cond:
        raise _Unmappable("nothing to look through")
    operands: list[Value] = [cx.val(src)]

    def slot(x: Any) -> Any:
        if isinstance(x, fx.Node) and not cx.is_const(x):
            operands.append(cx.val(x))
            return _Slot(len(operands) - 1)
        return cx.const(x) if cx.is_const(x) else x

    t = cx.cur.target
    call = AtenCall("aten", "where", t._overloadname, (_Slot(0), slot(a["self"]), slot(a["other"])))
    return (cx.emit("opaque", operands, {}, op_type=f"aten::where.{t._overloadname}", payload=call), 0)
