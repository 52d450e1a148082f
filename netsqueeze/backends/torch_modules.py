"""nn.Modules the torch backend places in emitted GraphModules where torch has no exact match."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from netsqueeze.ir.weights import Encoded, Weight


def resize_nearest(x: torch.Tensor, sizes: tuple[Any, ...], scales: tuple[float, ...] | None, ctm: str,
                   nearest: str) -> torch.Tensor:
    """ONNX Resize, mode nearest, with any coordinate transformation and rounding (F.interpolate has two of
    them): per spatial axis, output index d reads input index round(x(d)) clamped to the axis, x(d) the
    coordinate transformation at scale s (`scales`, else output/input size)."""
    for i, out in enumerate(sizes):
        axis = 2 + i
        n_in, n_out = int(x.shape[axis]), int(out)
        s = scales[i] if scales is not None else n_out / n_in
        d = torch.arange(n_out, dtype=torch.float64, device=x.device)
        if ctm == "asymmetric":
            c = d / s
        elif ctm == "align_corners":
            c = d * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(d)
        elif ctm == "tf_half_pixel_for_nn":
            c = (d + 0.5) / s
        elif ctm == "pytorch_half_pixel" and n_out <= 1:
            c = torch.zeros_like(d)
        else:  # half_pixel, pytorch_half_pixel
            c = (d + 0.5) / s - 0.5
        r = {"floor": torch.floor(c), "ceil": torch.ceil(c), "round_prefer_ceil": torch.floor(c + 0.5)}.get(
            nearest, torch.ceil(c - 0.5))  # round_prefer_floor, the default
        x = x.index_select(axis, r.clamp(0, n_in - 1).long())
    return x


class Attention(nn.Module):
    """Multi-head attention whose inner width H·Dh may differ from embed_dim (after head pruning).

    Parameter names and layouts follow the IR's attention node: in_proj_weight [3·H·Dh, E] (q, k, v
    stacked), in_proj_bias [3·H·Dh], out_proj_weight [E, H·Dh], out_proj_bias [E].
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, batch_first: bool = True,
                 in_bias: bool = True, out_bias: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = embed_dim, num_heads, head_dim, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner)) if in_bias else None
        self.out_proj_weight = nn.Parameter(torch.empty(embed_dim, inner))
        self.out_proj_bias = nn.Parameter(torch.empty(embed_dim)) if out_bias else None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        inner = self.num_heads * self.head_dim
        w = self.in_proj_weight
        b = self.in_proj_bias
        q = F.linear(query, w[:inner], None if b is None else b[:inner])
        k = F.linear(key, w[inner : 2 * inner], None if b is None else b[inner : 2 * inner])
        v = F.linear(value, w[2 * inner :], None if b is None else b[2 * inner :])

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention masks True = blocked; sdpa True = allowed
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], inner)
        out = F.linear(o, self.out_proj_weight, self.out_proj_bias)
        return out if self.batch_first else out.transpose(0, 1)


class Decode(nn.Module):
    """An encoded weight: its stored buffers (integer data, scales, indices, centroids) and the form's
    own decoder, so `state_dict` carries the encoded data and `forward()` returns the dense weight."""

    def __init__(self, w: Encoded) -> None:
        super().__init__()
        self.form = w.form
        self.static = w.static()
        self._decode = type(w).decode
        self._names = sorted(w.storage())
        self.out_dtype = w.dtype
        for k, t in sorted(w.storage().items()):
            self.register_buffer(k, t.detach().clone())

    def forward(self) -> torch.Tensor:
        return self._decode({k: getattr(self, k) for k in self._names}, self.static).to(self.out_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Decode:
        # .half() / .to(dtype) change the decoded weight's dtype, never the stored data: an int32 bias's
        # scale (~1e-9) would underflow in float16; device moves apply to the buffers as usual
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        self.out_dtype = probe.dtype
        for k in self._names:
            t = getattr(self, k)
            setattr(self, k, t.to(probe.device))
        return self

    def extra_repr(self) -> str:
        return f"{self.form}, shape={list(self.static['shape'])}"


class WithEncodedParams(nn.Module):
    """A torch layer some of whose params are encoded: each call decodes them (`Decode` modules under
    `encoded`) and runs the layer with them; the layer itself keeps only its dense params."""

    def __init__(self, inner: nn.Module, encoded: dict[str, Encoded]) -> None:
        super().__init__()
        for k in encoded:
            delattr(inner, k)
        self.inner = inner
        self.encoded = nn.ModuleDict({k: Decode(w) for k, w in sorted(encoded.items())})

    def forward(self, *xs: Any) -> Any:
        params = {k: d() for k, d in self.encoded.items()}
        return functional_call(self.inner, params, xs, strict=False)


class ParamHolder(nn.Module):
    """Holds a node's params as parameters or buffers (by the IR's naming) for get_attr access;
    encoded params become `Decode` submodules of the same name (called, not read)."""

    def __init__(self, params: Mapping[str, Weight], buffers: frozenset[str]) -> None:
        super().__init__()
        for k, t in params.items():
            if isinstance(t, Encoded):
                self.add_module(k, Decode(t))
            elif k in buffers or not t.is_floating_point():
                self.register_buffer(k, t.detach().clone())
            else:
                self.register_parameter(k, nn.Parameter(t.detach().clone()))


class Opaque(nn.Module):
    """Runs an opaque node's torch callable (a private copy, so edits never reach the IR)."""

    def __init__(self, fn: Callable[..., Any], op_type: str = "") -> None:
        super().__init__()
        self.fn = fn
        self.op_type = op_type

    def forward(self, *xs: torch.Tensor) -> Any:
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.op_type


class SparseLinear(nn.Module):
    """A linear layer whose weight is a `torch.sparse_csr` tensor [out, in] (a buffer: sparse layouts are not
    trained here), multiplied as W · xᵀ over the flattened leading axes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.reshape(-1, x.shape[-1])
        y = torch.mm(w, rows.t().to(w.dtype)).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], w.shape[0])

    def extra_repr(self) -> str:
        w = self.weight
        return f"in_features={w.shape[1]}, out_features={w.shape[0]}, nnz={int(w.values().numel())}, layout=csr"
