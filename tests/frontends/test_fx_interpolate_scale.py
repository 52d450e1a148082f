"""F.interpolate with a scale factor: torch places output pixels by 1 / scale, not by input / output size, so
the IR keeps the scale (a size from the output shape moved bilinear pixels at scale 1.5 by up to 0.61), and
sizes that follow dynamic dims stay dynamic."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx


class _Up(nn.Module):
    def __init__(self, scale: float, mode: str) -> None:
        super().__init__()
        self.c, self.scale, self.mode = nn.Conv2d(4, 4, 1), scale, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.c(x), scale_factor=self.scale, mode=self.mode)


@pytest.mark.parametrize("scale", [1.5, 2.0, 2.5])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_a_scale_factor_is_kept_and_both_targets_match_torch_at_other_sizes(scale: float, mode: str) -> None:
    torch.manual_seed(0)
    m = _Up(scale, mode).eval()
    x = torch.randn(2, 4, 7, 9)
    dims = {0: torch.export.Dim("b"), 2: torch.export.Dim("h", min=2), 3: torch.export.Dim("w", min=2)}
    r = ns.compile(m, "policy p { fold_bn }", example_inputs=(x,), dynamic_shapes=(dims,))
    (node,) = [n for n in r.graph.nodes() if n.kind == "resize"]
    assert node.attrs["scale"] == [scale, scale]
    assert r.report.fidelity["output_error"] < 1e-6
    sess = ort.InferenceSession(to_onnx(r.graph).SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in [(2, 4, 7, 9), (3, 4, 10, 5)]:
        xi = torch.randn(*shape)
        with torch.no_grad():
            want = m(xi)
            assert torch.allclose(r.model(xi), want, atol=1e-6)
        np.testing.assert_allclose(sess.run(None, {"x": xi.numpy()})[0], want.numpy(), atol=1e-5)
