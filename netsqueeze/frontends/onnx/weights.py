"""Constant subgraphs that are stored weights (QDQ, codebooks) become encoded weights, not folded floats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from netsqueeze.errors import CaptureError, Diagnostic
from netsqueeze.frontends.onnx.load import _DEFAULT_DOMAINS
from netsqueeze.ir.weights import Affine, Centroids, Codebook, Encoded, WeightFormError

if TYPE_CHECKING:
    from netsqueeze.frontends.onnx.importer import _Importer

_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


_INT_TYPES = {np.dtype(np.int8): (8, True), np.dtype(np.uint8): (8, False), np.dtype(np.int16): (16, True),
              np.dtype(np.int32): (32, True)}


def _int_type(arr: np.ndarray) -> tuple[int, bool] | None:
    """(bits, signed) of an integer array a weight may be stored in, 4-bit types included."""
    name = str(arr.dtype)
    if name in ("int4", "uint4"):
        return 4, name == "int4"
    return _INT_TYPES.get(arr.dtype)


def _is_float(w: Any) -> bool:
    return isinstance(w, Encoded) or w.dtype in _FLOATS


def _np_float(w: Any) -> Any:
    return np.dtype(str(w.dtype).removeprefix("torch.")) if isinstance(w, Encoded) else w.dtype


def _transposed(w: Any) -> Any:
    return w.permute((1, 0)) if isinstance(w, Encoded) else w.T


def _dense_np(v: Any) -> np.ndarray:
    return v.dense().numpy() if isinstance(v, Encoded) else v  # type: ignore[no-any-return]


def _ints_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr).astype(np.int64))


def _encoded_weight(imp: _Importer, n: gs.Node) -> Encoded | None:
    """A constant subgraph that is a stored weight, kept in its form instead of folded to floats:
    DequantizeLinear of an integer initializer, Gather(centroids, indices) of constants, and a
    Transpose of either (exporters transpose dequantized weights)."""
    if (n.domain or "") not in _DEFAULT_DOMAINS or not n.outputs:
        return None
    ins = [imp.const(t) if t.name else None for t in n.inputs]
    try:
        if n.op == "DequantizeLinear" and len(ins) >= 2 and isinstance(ins[0], np.ndarray) \
                and isinstance(ins[1], np.ndarray) and _int_type(ins[0]) and ins[1].dtype == np.float32:
            x, scale = ins[0], ins[1]
            zp = ins[2] if len(ins) > 2 else None
            if zp is not None and (not isinstance(zp, np.ndarray) or zp.dtype != x.dtype):
                return None
            if zp is not None and zp.size != scale.size:
                raise CaptureError(Diagnostic(
                    f"node '{imp.cur_id}' (DequantizeLinear): its zero point has {zp.size} elements but its scale "
                    f"{scale.size}", node=imp.cur_id))
            bits, signed = _int_type(x)  # type: ignore[misc]
            block = int(n.attrs.get("block_size", 0))
            per_tensor = scale.size == 1 and scale.ndim <= 1 and not block
            axis = None if per_tensor else int(n.attrs.get("axis", 1)) % max(x.ndim, 1)
            shape = () if per_tensor else scale.shape
            z = None if zp is None or not np.any(zp.astype(np.int64)) else _ints_tensor(zp).reshape(shape)
            return Affine(_ints_tensor(x), torch.from_numpy(scale.astype(np.float32).reshape(shape).copy()), z,
                          axis, block, bits, signed)
        if n.op == "Gather" and len(ins) == 2 and isinstance(ins[0], np.ndarray) and ins[0].ndim == 1 \
                and ins[0].dtype in _FLOATS and isinstance(ins[1], np.ndarray) and ins[1].dtype.kind in "iu" \
                and int(n.attrs.get("axis", 0)) == 0 and ins[1].size and int(ins[1].min()) >= 0:
            name = n.inputs[0].name
            if name not in imp.centroids:
                imp.centroids[name] = Centroids(torch.from_numpy(ins[0].copy()), name)
            return Codebook(_ints_tensor(ins[1]), imp.centroids[name])
        if n.op == "Transpose" and len(ins) == 1 and isinstance(ins[0], Encoded):
            perm = n.attrs.get("perm")
            order = tuple(int(p) for p in perm) if perm is not None else tuple(reversed(range(ins[0].dim())))
            if sorted(order) != list(range(ins[0].dim())):
                raise CaptureError(Diagnostic(
                    f"node '{imp.cur_id}' (Transpose): perm {list(order)} is not a permutation of the "
                    f"{ins[0].dim()} axes of its input", node=imp.cur_id))
            return ins[0].permute(order)
    except WeightFormError:
        return None
    return None
