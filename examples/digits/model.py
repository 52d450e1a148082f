"""The model `make demo` compresses: a small CNN trained on scikit-learn's 8x8 handwritten digits.

`build()` returns the trained network (weights in `digits_cnn.pt`, written by `train.py`) with an example
batch; `calibration()` gives labelled training images; `test_split()` the held-out images the demo scores.
The split is fixed: a seeded permutation of the 1,797 images, the last 360 held out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "digits_cnn.pt"
TEST_SIZE = 360


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 48, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, width), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 2 * width), block(2 * width, 2 * width),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # (1797, 1, 8, 8) in [-0.5, 0.5]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    return x[order], y[order]


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data()
    return torch.from_numpy(x[:-TEST_SIZE].copy()), torch.from_numpy(y[:-TEST_SIZE].copy())


def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data()
    return torch.from_numpy(x[-TEST_SIZE:].copy()), torch.from_numpy(y[-TEST_SIZE:].copy())


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = DigitsCNN()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval(), (test_split()[0][:2],)  # 2, not 1: torch.export fixes a dim whose example is 1


def calibration() -> dict[str, np.ndarray]:
    """Labelled calibration data (training images, never the held-out ones), as a `.npz` would hold it."""
    x, y = train_split()
    return {"x": x.numpy(), "labels": y.numpy()}
