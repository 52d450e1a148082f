"""The aten ops HF transformers models export to, each on a small module: what it maps to and that the
emitted torch module computes what the module does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import netsqueeze
from netsqueeze.backends.torch import to_torch
from netsqueeze.ir.graph import Graph


def _capture(model: nn.Module, *xs: torch.Tensor, dynamic: bool = False) -> Graph:
    """Captured with a static batch (`dynamic_shapes={}`) unless `dynamic` (the default batch of import_model)."""
    model.eval()
    with torch.no_grad():
        ref = model(*xs)
    g = netsqueeze.import_model(model, xs, dynamic_shapes=None if dynamic else {})
    with torch.no_grad():
        out = to_torch(g)(*xs)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6, equal_nan=False)
    return g


def _kinds(g: Graph) -> list[str]:
    return [n.kind for n in g.nodes()]


def _opaque(g: Graph) -> list[str]:
    return [n.origin.op_type for n in g.nodes() if n.kind == "opaque"]


class _Select(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] + x[:, -1]


def test_select_is_slice_and_squeeze() -> None:
    g = _capture(_Select(), torch.randn(2, 5, 4))
    assert not _opaque(g)
    assert _kinds(g).count("slice") == 2 and _kinds(g).count("squeeze") == 2


class _Sdpa(nn.Module):
    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mode = mask
        self.register_buffer("bias", torch.randn(1, 2, 6, 6))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = x.view(2, 6, 2, 4).transpose(1, 2)
        k, v = q * 0.5, q + 1.0
        if self.mode == "bool":  # a padding mask broadcast as HF builds it
            m = keep.to(torch.bool)[:, None, None, :].expand(2, 1, 6, 6)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=0.3)


def _keep() -> torch.Tensor:
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[1, 4:] = 0
    return keep


def test_sdpa_with_padding_mask_is_matmul_softmax_and_one_where() -> None:
    g = _capture(_Sdpa("bool"), torch.randn(2, 6, 8), _keep())
    assert "softmax" in _kinds(g) and _kinds(g).count("matmul") == 2
    assert sorted(_opaque(g)) == ["aten::to.dtype", "aten::where.ScalarOther"]  # the int → bool cast, the mask


def test_sdpa_causal_and_float_mask_are_canonical() -> None:
    for mode in ("causal", "float"):
        g = _capture(_Sdpa(mode), torch.randn(2, 6, 8), _keep())
        assert not _opaque(g), mode
        assert "softmax" in _kinds(g)


class _ClassToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)


def test_cat_with_a_constant_part_stays_concat() -> None:
    g = _capture(_ClassToken(), torch.randn(2, 3, 4))
    assert "concat" in _kinds(g) and not _opaque(g)


def test_class_token_expanded_to_a_dynamic_batch_runs_at_another_batch() -> None:
    torch.manual_seed(0)
    model = _ClassToken()
    g = _capture(model, torch.randn(2, 3, 4), dynamic=True)
    assert "concat" in _kinds(g) and _opaque(g) == ["aten::expand.default"]  # expand(batch): at run time
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        assert torch.equal(to_torch(g)(x), model(x))


class _InPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2.0
        y.exp_()
        return y + x


def test_inplace_op_runs_out_of_place() -> None:
    x = torch.randn(2, 3)
    keep = x.clone()
    g = _capture(_InPlace(), x)
    assert _opaque(g) == ["aten::exp.default"]
    to_torch(g)(x)
    assert torch.equal(x, keep)


class _Cast(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # same-dtype casts and a size query: identities, asserts dropped; the int → float cast stays opaque
        n = x.size(1)
        return x.to(torch.float32).reshape(2, n) + ids.to(x.dtype)


def test_asserts_dropped_and_same_dtype_casts_are_identities() -> None:
    g = _capture(_Cast(), torch.randn(2, 3), torch.randint(0, 5, (2, 3)))
    assert _opaque(g) == ["aten::to.dtype"]


class _Gather(nn.Module):
    def forward(self, m: torch.Tensor) -> torch.Tensor:
        b = torch.arange(m.shape[0])[:, None, None, None]
        k = torch.arange(m.shape[1])[None, None, None, :]
        return m[b, k] * 2.0  # HF's padding-mask gather


def test_index_by_whole_axes_is_unsqueeze() -> None:
    g = _capture(_Gather(), torch.randn(2, 6))
    assert not _opaque(g) and "unsqueeze" in _kinds(g)


def test_index_by_sizes_of_a_dynamic_batch_runs_at_another_batch() -> None:
    g = _capture(_Gather(), torch.randn(2, 6), dynamic=True)
    assert sorted(set(_opaque(g))) == ["aten::arange.default", "aten::index.Tensor"]  # built from the batch
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(to_torch(g)(x), _Gather()(x))
