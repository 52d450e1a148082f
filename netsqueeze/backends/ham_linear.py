"""A linear layer that keeps its weight HAM/sHAM-compressed in memory and computes on it (the DotHAM /
DotsHAM product of Marinò et al., ICPR 2020), vectorised with torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from netsqueeze.backends.storage import Store, compressed_entries


def dot_compressed(x: torch.Tensor, data: bytes, store: Store) -> torch.Tensor:
    """x @ Wᵀ for a weight W [out, in] given only as HAM/sHAM bytes.

    As the paper's dot product: the stream is decoded, and for every output the inputs that share one
    weight value are summed first, then multiplied by that value once (one multiplication per distinct
    value and output, not per weight); zero entries and empty outputs cost nothing. Vectorised: the
    per-(output, value) sums are one `index_add_` over the non-zeros, accumulated in x's dtype. When the
    weight has so many distinct values that the (output, value) table would outgrow the non-zeros (an
    unshared weight), each non-zero is multiplied on its own instead (memory O(batch·nnz))."""
    rows, cols, r, c, s, values = compressed_entries(data, store)
    k = values.size
    lead = x.shape[:-1]
    xf = x.reshape(-1, cols)
    picked = xf[:, torch.from_numpy(c)]
    if rows * k <= 4 * max(1, r.size):
        key = torch.from_numpy(r * k + s)
        acc = torch.zeros(xf.shape[0], rows * k, dtype=xf.dtype)
        acc.index_add_(1, key, picked)
        y = acc.view(xf.shape[0], rows, k) @ torch.from_numpy(values).to(xf.dtype)
    else:
        # many distinct values (an unshared weight): grouping saves nothing; one product per non-zero
        y = torch.zeros(xf.shape[0], rows, dtype=xf.dtype)
        y.index_add_(1, torch.from_numpy(r), picked * torch.from_numpy(values[s]).to(xf.dtype))
    return y.reshape(*lead, rows)


class CompressedLinear(nn.Module):
    """`nn.Linear` whose weight stays HAM/sHAM-encoded (a uint8 buffer, so `state_dict` holds the
    compressed bytes); every forward decodes the stream and runs `dot_compressed`."""

    def __init__(self, data: bytes, store: Store, in_features: int, out_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.store: Store = store
        self.in_features, self.out_features = in_features, out_features
        self.data: torch.Tensor
        self.register_buffer("data", torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dot_compressed(x, self.data.numpy().tobytes(), self.store)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, store={self.store}, "
                f"bytes={self.data.numel()}")
