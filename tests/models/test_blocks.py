"""Hand-written blocks real vision models are made of (channel shuffle, squeeze-excitation, dense concat,
atrous convolution + upsampling), captured with a dynamic batch and resolution: the identity compile,
trim 30% and squeeze_fold keeping 70% run, verify, and the emitted models run at a second size in torch and
ONNX Runtime with the output shape the original has there."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx
from tests.frontends.onnx_models import run


class Shuffle(nn.Module):
    """ShuffleNet-v2 unit: split, a branch, concat, channel shuffle (a reshape through the groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        y = y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(y)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * s)


class Dense(nn.Module):
    """DenseNet-style: every layer reads the concat of all earlier feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(14), nn.ReLU(), nn.Conv2d(14, 6, 3, padding=1))
        self.out = nn.Conv2d(20, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.out(x)


class DeepLab(nn.Module):
    """DeepLab-style: a strided stem, atrous branches, concat, 1x1, bilinear upsampling to the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 8, 3, padding=2, dilation=2)
        self.b3 = nn.Conv2d(16, 8, 3, padding=4, dilation=4)
        self.head = nn.Conv2d(24, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = F.relu(torch.cat([self.b1(y), self.b2(y), self.b3(y)], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


BLOCKS: dict[str, Callable[[], nn.Module]] = {"shuffle": Shuffle, "squeeze_excite": SqueezeExcite, "dense": Dense,
                                              "deeplab": DeepLab}
POLICIES = {
    "identity": "policy p { }",
    "trim": "policy p {\n  fold_bn\n  trim { criterion = l1, ratio = 30% }\n}\n",
    "squeeze_fold": "policy p {\n  fold_bn\n  squeeze_fold { ratio = 30% }\n}\n",
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_block_compiles_and_runs_at_a_second_size(block: str, policy: str) -> None:
    torch.manual_seed(0)
    model = BLOCKS[block]().eval()
    x = torch.randn(4, 3, 16, 16)
    dyn = {"x": {0: Dim("batch"), 2: Dim("H", min=8, max=256), 3: Dim("W", min=8, max=256)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ns.compile(model, POLICIES[policy], example_inputs=(x,), calibration=torch.randn(32, 3, 16, 16),
                       dynamic_shapes=dyn)
    r.graph.verify()
    out = to_onnx(r.graph)
    for shape in [(4, 3, 16, 16), (3, 3, 24, 20)]:
        xs = torch.randn(*shape)
        with torch.no_grad():
            want = model(xs)
            y = r.model(xs)
        assert y.shape == want.shape
        if policy == "identity":
            assert float((y - want).abs().max()) <= 1e-4 * float(want.abs().max())
        assert np.abs(run(out, xs.numpy())[0] - y.numpy()).max() <= 1e-4 * max(1.0, float(y.abs().max()))
    if policy != "identity":
        assert r.report.params_ratio > 1.0 or block == "shuffle"  # the shuffle's groups are frozen by design
