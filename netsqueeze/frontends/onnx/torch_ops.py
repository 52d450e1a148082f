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
}


class OnnxTorchOp(dict):  # type: ignore[type-arg]
    """The payload of an opaque ONNX node (op type, domain, attributes, ...) that torch can also run.

    A dict like every ONNX payload, so the ONNX backend re-emits it verbatim; callable, so the torch
    backend runs it.
    """

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return _TORCH_OPS[self["op_type"]](self, *xs)  # type: ignore[no-any-return]
