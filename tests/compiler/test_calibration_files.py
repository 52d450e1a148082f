"""Calibration files with several inputs: arrays named after the model's inputs go to those inputs whatever their
order in the file (they went by position: swapped data compiled without a word); unnamed arrays go by position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import netsqueeze as ns
from netsqueeze.compiler.calibration import calibration_source, split_labels


class Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ca, self.cb, self.out = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(3, 16, 3, padding=1), \
            torch.nn.Conv2d(16, 8, 1)

    def forward(self, image: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.ca(image)) * torch.sigmoid(self.cb(gain)))


POLICY = "policy p {\n  calibrate samples 64, batch 16\n  trim { criterion = activation, ratio = 50%, refit = none }\n}\n"


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (5 * rng.standard_normal((64, 3, 8, 8))).astype(np.float32), np.zeros((64, 3, 8, 8), np.float32)


def _compile(path: Path) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 3, 8, 8)
    res = ns.compile(Two().eval(), POLICY, example_inputs=(x, x), calibration=path, progress=False)
    return {n.id: n.params["weight"] for n in res.graph.nodes() if n.kind == "conv"}


def test_arrays_named_after_the_inputs_go_to_them_in_any_order(tmp_path: Path) -> None:
    image, gain = _data()
    np.savez(tmp_path / "in_order.npz", image=image, gain=gain)
    np.savez(tmp_path / "other_order.npz", gain=gain, image=image)
    np.savez(tmp_path / "positional.npz", image, gain)  # arr_0, arr_1: the inputs' order
    want = _compile(tmp_path / "in_order.npz")
    for name in ("other_order.npz", "positional.npz"):
        got = _compile(tmp_path / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    # the activation criterion saw the images at 'image': fed the zeros there, it keeps other channels
    np.savez(tmp_path / "swapped.npz", image=gain, gain=image)
    swapped = _compile(tmp_path / "swapped.npz")
    assert not torch.equal(swapped["ca"], want["ca"])


def test_arrays_named_partly_after_the_inputs_are_an_error(tmp_path: Path) -> None:
    image, gain = _data()
    np.savez(tmp_path / "mixed.npz", image=image, scale=gain)
    with pytest.raises(ns.InputMismatchError) as err:
        _compile(tmp_path / "mixed.npz")
    assert err.value.message == (
        f"calibration file '{tmp_path / 'mixed.npz'}' names its arrays 'image', 'scale', the model's inputs are "
        "'image', 'gain': name every array after an input (in any order), or none (np.savez(path, a, b): in the "
        "inputs' order)")


def test_a_labelled_file_orders_its_inputs_by_name(tmp_path: Path) -> None:
    image, gain = _data()
    labels = np.arange(64) % 10
    np.savez(tmp_path / "labelled.npz", labels=labels, gain=gain, image=image)
    inputs, got_labels = split_labels(tmp_path / "labelled.npz", 2, names=("image", "gain"))
    assert torch.equal(inputs[0], torch.from_numpy(image)) and torch.equal(inputs[1], torch.from_numpy(gain))
    assert torch.equal(got_labels, torch.from_numpy(labels))
    batch = next(iter(calibration_source(tmp_path / "labelled.npz", batch_size=64, names=("x",))()))
    assert len(batch) == 3  # one input named otherwise: the file's arrays as they are (split_labels reads labels)
