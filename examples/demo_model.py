"""The model `make demo` compiles: a small VGG-style CNN for 28x28 grey images (Fashion-MNIST sized)."""

from __future__ import annotations

import torch
from torch import nn


class SmallVGG(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, width), block(width, width), nn.MaxPool2d(2),
            block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = SmallVGG().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model would have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model, (torch.randn(8, 1, 28, 28),)


def calibration() -> torch.Tensor:
    """Calibration inputs for `netsqueeze compile` when no --calib is given: smooth random images."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 1, 28, 28, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * 3.0
