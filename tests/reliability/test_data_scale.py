"""Calibration data far off the model's scale: finite inputs whose activations cannot be squared in float32, which
the statistics and the layer refit sum the squares of. A clear error naming the layer, where a solver failed on a
LAPACK assert (and oneMKL printed to stderr)."""

from __future__ import annotations

import pytest
import torch

import netsqueeze as ns
from tests.zoo import ZOO


@pytest.mark.parametrize("step", ["squeeze_fold", "trim { criterion = l1 }"])
def test_activations_past_float32s_square_root_are_named(step: str, capfd: pytest.CaptureFixture[str]) -> None:
    model, inputs = ZOO["resnet"]()
    torch.manual_seed(0)
    calib = torch.randn(32, *inputs[0].shape[1:]) * 1e30
    capfd.readouterr()
    with pytest.raises(ns.NetsqueezeError) as err:
        ns.compile(model, f"policy p {{\n  calibrate samples 32, batch 16\n  budget flops <= 50%\n  {step}\n}}\n",
                   example_inputs=inputs, calibration=calib, progress=False)
    message = str(err.value)
    assert "on the calibration data reach " in message and "past float32's square root, the sums of their squares " \
        "this pass needs overflow" in message, message
    assert "note: the data is far off the model's scale: check its preprocessing" in message
    assert capfd.readouterr().err == ""
    # the same data at the model's scale compiles
    ns.compile(model, f"policy p {{\n  calibrate samples 32, batch 16\n  budget flops <= 50%\n  {step}\n}}\n",
               example_inputs=inputs, calibration=calib * 1e-30, progress=False)
