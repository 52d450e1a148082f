"""nn.MultiheadAttention collapses onto one `attention` node only when that node computes what the caller reads:
the attention output, with no mask (a constant mask buffer was filed as a weight and dropped, and a caller that
read the attention weights got the attention output)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.ir.dims import is_dynamic


class Masked(nn.Module):
    def __init__(self, mask: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.m = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mask = mask
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(4))
        self.register_buffer("pad", torch.tensor([[False, False, True, True]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask == "attn_mask":
            return self.m(x, x, x, attn_mask=self.causal, need_weights=False)[0]
        if self.mask == "key_padding_mask":
            return self.m(x, x, x, key_padding_mask=self.pad.expand(x.shape[0], 4), need_weights=False)[0]
        return self.m(x, x, x)[0]


class Weights(nn.Module):
    """Reads only the (head-averaged) attention weights: [batch, 6, 6] for 6 tokens of width 6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.m = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x, x, x)[1]


@pytest.mark.parametrize("model, width, collapsed", [
    (Masked("none"), 8, True), (Masked("attn_mask"), 8, False), (Masked("key_padding_mask"), 8, False),
    (Weights(), 6, False)], ids=["unmasked", "attn_mask", "key_padding_mask", "weights"])
def test_attention_collapses_only_onto_what_the_caller_reads(model: nn.Module, width: int, collapsed: bool) -> None:
    model = model.eval()
    tokens = 4 if width == 8 else 6
    g = ns.import_model(model, (torch.randn(2, tokens, width),))
    assert any(n.kind == "attention" for n in g.nodes()) == collapsed
    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    # a constant key-padding mask expanded to the batch keeps it dynamic: the expand's shape holds the batch Dim,
    # and the mask's zeros_like / masked_fill run in ONNX as ConstantOfShape / Where
    assert is_dynamic(g.node("x").meta[0].shape[0])
    for batch in (2, 3):
        x = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(to_torch(g)(x), want, rtol=0, atol=1e-5)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
