"""Opaque ONNX ops that still have an exact torch form: their payload is callable by the torch backend."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper


def _attr(payload: dict[str, Any], name: str, default: Any) -> Any:
    for raw in payload["attributes"]:
        a = onnx.AttributeProto()
        a.ParseFromString(raw)
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(p: dict[str, Any], x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = [int(a) for a in axes.tolist()] if axes is not None else _attr(p, "axes", None)
        keep = bool(_attr(p, "keepdims", 1))
        if not ax:
            if _attr(p, "noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        return fn(x, dim=tuple(ax), keepdim=keep)

    return run


def _prod(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted((a % x.dim() for a in dim), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


def _cumsum(p: dict[str, Any], x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    ax = int(axis)
    y = torch.flip(x, (ax,)) if _attr(p, "reverse", 0) else x
    y = torch.cumsum(y, ax)
    if _attr(p, "exclusive", 0):
        y = y - (torch.flip(x, (ax,)) if _attr(p, "reverse", 0) else x)
    return torch.flip(y, (ax,)) if _attr(p, "reverse", 0) else y


def _cast(p: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(_attr(p, "to", 1))))
    return x.to(torch.from_numpy(np.zeros(0, np_dtype)).dtype)


def _plain(fn: Any) -> Callable[..., torch.Tensor]:
    return lambda p, *xs: fn(*xs)


def _axis_index(x: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """ONNX indices along `axis` (negative counts from the end) as torch's non-negative int64."""
    idx = idx.long()
    return torch.where(idx < 0, idx + x.shape[axis], idx)


def _gather(p: dict[str, Any], x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    ax = int(_attr(p, "axis", 0)) % x.dim()
    i = _axis_index(x, ax, idx)
    return x.index_select(ax, i.reshape(-1)).reshape(*x.shape[:ax], *i.shape, *x.shape[ax + 1:])


def _gather_elements(p: dict[str, Any], x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    ax = int(_attr(p, "axis", 0)) % x.dim()
    return torch.gather(x, ax, _axis_index(x, ax, idx))


def _gather_nd(p: dict[str, Any], x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b = int(_attr(p, "batch_dims", 0))
    idx = idx.long()
    k = idx.shape[-1]
    shape = torch.tensor(x.shape[b:b + k])
    idx = torch.where(idx < 0, idx + shape, idx)
    if b == 0:
        return x[tuple(idx.unbind(-1))]
    batch = x.shape[:b]
    xf, idf = x.reshape(-1, *x.shape[b:]), idx.reshape(-1, *idx.shape[b:])
    out = torch.stack([xf[n][tuple(idf[n].unbind(-1))] for n in range(xf.shape[0])])
    return out.reshape(*batch, *out.shape[1:])


def _expand(p: dict[str, Any], x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(int(d) for d in shape.tolist())))


def _constant_of_shape(p: dict[str, Any], shape: torch.Tensor) -> torch.Tensor:
    v = _attr(p, "value", None)
    fill = torch.from_numpy(np.array(onnx.numpy_helper.to_array(v)).reshape(-1)) if v is not None else torch.zeros(1)
    return torch.full([int(d) for d in shape.tolist()], fill[0].item(), dtype=fill.dtype)


def _is_inf(p: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    pos, neg = bool(_attr(p, "detect_positive", 1)), bool(_attr(p, "detect_negative", 1))
    return (torch.isposinf(x) & pos) | (torch.isneginf(x) & neg)


def _scatter_nd(p: dict[str, Any], data: torch.Tensor, idx: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    out = data.clone()
    where = tuple(idx.long().unbind(-1))
    if _attr(p, "reduction", "none") in ("add", b"add"):
        out.index_put_(where, updates, accumulate=True)
    else:
        out[where] = updates
    return out


def _slice(p: dict[str, Any], x: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
           axes: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
    """ONNX Slice (opset 10+): per axis, python slice semantics with the bounds clamped to the axis."""
    st, en = [int(v) for v in starts.tolist()], [int(v) for v in ends.tolist()]
    ax = [int(v) for v in axes.tolist()] if axes is not None else list(range(len(st)))
    sp = [int(v) for v in steps.tolist()] if steps is not None else [1] * len(st)
    for a, s, e, step in zip(ax, st, en, sp):
        a %= x.dim()
        idx = range(*slice(s, e, step).indices(x.shape[a]))
        if step == 1:
            x = x.narrow(a, idx.start, len(idx)) if len(idx) else x.narrow(a, 0, 0)
        else:
            x = x.index_select(a, torch.tensor(list(idx), dtype=torch.long, device=x.device))
    return x


def _trilu(p: dict[str, Any], x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    diag = int(k) if k is not None else 0
    return torch.triu(x, diag) if _attr(p, "upper", 1) else torch.tril(x, diag)


def same_split(size: int, k: int, s: int, d: int, upper: bool) -> tuple[int, int]:
    """(begin, end) padding of one axis under ONNX `auto_pad` SAME_UPPER (`upper`) / SAME_LOWER: the output
    keeps ceil(size / stride) positions, the odd cell goes at the end (upper) or the beginning."""
    total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def _same_pads(p: dict[str, Any], x: torch.Tensor, kernel: list[int], value: float) -> tuple[torch.Tensor, list[int], list[int]]:
    """`x` padded as ONNX `auto_pad` SAME_UPPER / SAME_LOWER asks at its run-time size (output ceil(size /
    stride)), and the strides and dilations: a conv or pool with dynamic spatial dims and a stride over 1,
    whose padding changes with the size."""
    dims = len(kernel)
    stride = [int(v) for v in _attr(p, "strides", [1] * dims)]
    dilation = [int(v) for v in _attr(p, "dilations", [1] * dims)]
    upper = _attr(p, "auto_pad", b"NOTSET") in (b"SAME_UPPER", "SAME_UPPER")
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[2:], kernel, stride, dilation))):  # F.pad: last dim first
        pads += same_split(int(size), k, s, d, upper)
    return F.pad(x, pads, value=value), stride, dilation


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _conv_same(p: dict[str, Any], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    xp, stride, dilation = _same_pads(p, x, list(w.shape[2:]), 0.0)
    return _CONV[w.dim() - 2](xp, w, b, stride, 0, dilation, int(_attr(p, "group", 1)))


def _max_pool_same(p: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    kernel = [int(v) for v in _attr(p, "kernel_shape", [])]
    xp, stride, dilation = _same_pads(p, x, kernel, float("-inf"))
    return _MAX_POOL[len(kernel)](xp, kernel, stride, 0, dilation)


def _avg_pool_same(p: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """AveragePool with SAME padding: the padded cells count only with `count_include_pad` = 1."""
    kernel = [int(v) for v in _attr(p, "kernel_shape", [])]
    xp, stride, _ = _same_pads(p, x, kernel, 0.0)
    pool = _AVG_POOL[len(kernel)]
    y = pool(xp, kernel, stride, 0)
    if int(_attr(p, "count_include_pad", 0)):
        return y
    ones, _, _ = _same_pads(p, torch.ones_like(x[:1, :1]), kernel, 0.0)
    return y / pool(ones, kernel, stride, 0)


def _split(p: dict[str, Any], x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """ONNX Split: by the sizes given (input or, before opset 13, attribute), else into `num_outputs` parts of
    ceil(length / parts), the last one shorter (the parts of a dynamic axis follow its run-time length)."""
    axis = int(_attr(p, "axis", 0)) % x.dim()
    sizes = [int(v) for v in split.tolist()] if split is not None else _attr(p, "split", None)
    if sizes:
        return tuple(torch.split(x, [int(v) for v in sizes], axis))
    parts = int(p["num_outputs"])
    step = -(-int(x.shape[axis]) // parts)
    return tuple(torch.split(x, [min(step, int(x.shape[axis]) - i * step) for i in range(parts)], axis))


# Unknown-to-the-IR ONNX ops that still have an exact torch form, so onnx→torch keeps working through them
# (e.g. the Pow/Sqrt of a LayerNorm exported at an old opset). Each takes the payload and the operands.
_TORCH_OPS: dict[str, Callable[..., Any]] = {
    **{k: _plain(f) for k, f in {
        "Pow": torch.pow, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Erf": torch.erf,
        "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos,
        "Tan": torch.tan, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
        "Softplus": F.softplus, "Mish": F.mish, "Where": torch.where, "Equal": torch.eq, "Less": torch.lt,
        "Greater": torch.gt, "Not": torch.logical_not, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
    }.items()},
    "Max": lambda p, *xs: functools.reduce(torch.maximum, xs),
    "Min": lambda p, *xs: functools.reduce(torch.minimum, xs),
    "Elu": lambda p, x: F.elu(x, float(_attr(p, "alpha", 1.0))),
    "Cast": _cast,
    "CumSum": _cumsum,
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "ReduceProd": _reduce(lambda x, dim, keepdim: _prod(x, dim, keepdim)),
    "IsNaN": lambda p, x: torch.isnan(x),
    "IsInf": _is_inf,
    "And": lambda p, a, b: torch.logical_and(a, b),
    "Or": lambda p, a, b: torch.logical_or(a, b),
    "Xor": lambda p, a, b: torch.logical_xor(a, b),
    "LessOrEqual": lambda p, a, b: torch.le(a, b),
    "GreaterOrEqual": lambda p, a, b: torch.ge(a, b),
    "Mod": lambda p, a, b: torch.fmod(a, b) if _attr(p, "fmod", 0) else torch.remainder(a, b),
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Expand": _expand,
    "Tile": lambda p, x, reps: x.repeat(*[int(r) for r in reps.tolist()]),
    "Range": lambda p, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),
    "ConstantOfShape": _constant_of_shape,
    "Trilu": _trilu,
    "Slice": _slice,
    "ScatterND": _scatter_nd,
    "NonZero": lambda p, x: torch.nonzero(x).T.contiguous(),
    "Div": lambda p, a, b: torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b,
    "Split": _split,  # equal parts of a dynamic axis
    # only reached for auto_pad SAME with a stride over 1 on dynamic spatial dims (frontends/onnx/ops.py)
    "Conv": _conv_same,
    "MaxPool": _max_pool_same,
    "AveragePool": _avg_pool_same,
}


class OnnxTorchOp(dict):  # type: ignore[type-arg]
    """The payload of an opaque ONNX node (op type, domain, attributes, ...) that torch can also run.

    A dict like every ONNX payload, so the ONNX backend re-emits it verbatim; callable, so the torch
    backend runs it.
    """

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return _TORCH_OPS[self["op_type"]](self, *xs)  # type: ignore[no-any-return]
