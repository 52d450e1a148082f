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
}


class OnnxTorchOp(dict):  # type: ignore[type-arg]
    """The payload of an opaque ONNX node (op type, domain, attributes, ...) that torch can also run.

    A dict like every ONNX payload, so the ONNX backend re-emits it verbatim; callable, so the torch
    backend runs it.
    """

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return _TORCH_OPS[self["op_type"]](self, *xs)  # type: ignore[no-any-return]
