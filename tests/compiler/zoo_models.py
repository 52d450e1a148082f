"""Zoo models as a model file for the CLI: `zoo_models.py` is the VGG, `zoo_models.py:resnet` etc. the others.

`netsqueeze check/explain/compile --model tests/compiler/zoo_models.py[:name]`; `calibration()`
gives `netsqueeze compile` a small random calibration set for the default model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the CLI imports this file by path, outside pytest's pythonpath
    sys.path.insert(0, _ROOT)

from tests.zoo import ZOO  # noqa: E402

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def build() -> Built:
    return ZOO["vgg"]()


def resnet() -> Built:
    return ZOO["resnet"]()


def transformer() -> Built:
    return ZOO["transformer"]()


def mlp() -> Built:
    return ZOO["mlp"]()


def calibration() -> torch.Tensor:
    return torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(0))
