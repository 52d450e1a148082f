"""Weight sharing, kernel sharing and HAM/sHAM storage on Fashion-MNIST (filled in below)."""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import CACHE, fashion_mnist, train  # noqa: E402


class DepthwiseNet(nn.Module):
    """A MobileNet-style CNN: a 3x3 stem, three depthwise-separable blocks (3x3 depthwise + 1x1
    pointwise, BN and ReLU after each), global average pooling and two FC layers."""

    def __init__(self, w: int = 32, classes: int = 10) -> None:
        super().__init__()

        def cbr(i: int, o: int, k: int, s: int, g: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *cbr(1, w, 3, 1, 1),
            *cbr(w, w, 3, 2, w), *cbr(w, 2 * w, 1, 1, 1),
            *cbr(2 * w, 2 * w, 3, 2, 2 * w), *cbr(2 * w, 4 * w, 1, 1, 1),
            *cbr(4 * w, 4 * w, 3, 1, 4 * w), *cbr(4 * w, 4 * w, 1, 1, 1),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 128), nn.ReLU(),
                                        nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def trained_depthwise(data: dict[str, torch.Tensor], epochs: int = 2) -> nn.Module:
    """The depthwise model, trained once (about 4 minutes on one thread) and cached under benchmarks/cache/."""
    path = CACHE / f"depthwise_e{epochs}.pt"
    model = DepthwiseNet()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    train(model, data, epochs)
    torch.save(model.state_dict(), path)
    print(f"trained depthwise in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return model.eval()


if __name__ == "__main__":
    torch.set_num_threads(1)
    d = fashion_mnist()
    m = trained_depthwise(d)
    from common import accuracy
    print("depthwise top-1", accuracy(m, d["test_x"], d["test_y"]))
