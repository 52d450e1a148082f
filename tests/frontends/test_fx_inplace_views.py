"""Writes through a view (`y[:, 0] = 0`, `y[:, :2] = sigmoid(...)`, `y[..., 1:3] += 5`) change the tensor viewed:
the capture functionalizes such programs, so the IR computes what torch does (it kept the unwritten tensor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import UnsupportedOpError


class ZeroChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = 0
        return y


class YoloHead(nn.Module):
    """A detection head's habit: squash some channels in place, shift a band of rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        y[:, :2] = torch.sigmoid(y[:, :2])
        y[:, :, 1:3] += 5
        return y


class FlatAdd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.view(-1).add_(1)
        return y


@pytest.mark.parametrize("model", [ZeroChannel(), YoloHead().eval(), FlatAdd()], ids=lambda m: type(m).__name__)
def test_a_write_through_a_view_reaches_the_outputs(model: nn.Module) -> None:
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    g = ns.import_model(model, (x,))
    for batch in (2, 5):  # the example's batch and another (the batch is dynamic)
        xb = torch.randn(batch, 3, 4, 5, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(xb.clone())
            got = to_torch(g)(xb.clone())
        assert got.shape == want.shape == (batch, *want.shape[1:])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_written_view_without_an_onnx_form_is_refused_by_name() -> None:
    from netsqueeze.backends.onnx import to_onnx

    g = ns.import_model(ZeroChannel(), (torch.randn(2, 3, 4, 5),))
    with pytest.raises(UnsupportedOpError) as e:
        to_onnx(g)
    assert str(e.value) == ("error: node 'fill' is an opaque fx op (aten::fill.Tensor) with no ONNX "
                            "equivalent")
