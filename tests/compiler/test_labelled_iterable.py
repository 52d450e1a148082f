"""`compile(labelled=True)`: calibration given as an iterable of (x, y) batches is labelled data, exactly as a
labelled .npz is — select_features keeps the same features, recover with labels writes the same bytes — and
a malformed batch or an unlabelled file is a clear InputMismatchError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.errors import InputMismatchError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def _data(tmp_path: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Path]:
    torch.manual_seed(0)
    m = _Net().eval()
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = m(x).argmax(1)
    path = tmp_path / "xy.npz"
    np.savez(path, x=x.numpy(), labels=y.numpy())
    return m, x, y, path


@pytest.mark.parametrize("body", ["select_features on body", "recover { steps = 6, label_weight = 1.0 }"])
def test_an_iterable_of_xy_batches_equals_the_labelled_npz(tmp_path: Path, body: str) -> None:
    m, x, y, path = _data(tmp_path)
    pol = f"policy p {{ calibrate batch 64\n {'trim { ratio = 25% }' if 'recover' in body else ''}\n {body} }}"
    from_file = ns.compile(m, pol, example_inputs=(x[:4],), calibration=path, target="onnx")
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    from_iter = ns.compile(m, pol, example_inputs=(x[:4],), calibration=batches, labelled=True, target="onnx")
    assert from_iter.model.SerializeToString() == from_file.model.SerializeToString()


def test_malformed_labelled_batches_and_unlabelled_files(tmp_path: Path) -> None:
    m, x, _, _ = _data(tmp_path)
    with pytest.raises(InputMismatchError) as e:
        ns.compile(m, "policy p { fold_bn }", example_inputs=(x[:4],), calibration=[x[:64]], labelled=True)
    assert e.value.message == ("labelled calibration batch 0 is a Tensor; expected the model's 1 input(s) "
                               "followed by the labels")
    plain = tmp_path / "x.npz"
    np.savez(plain, x=x.numpy())
    with pytest.raises(InputMismatchError, match="holds no 'labels' array"):
        ns.compile(m, "policy p { fold_bn }", example_inputs=(x[:4],), calibration=plain, labelled=True)
