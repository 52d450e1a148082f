"""The benchmarks' peers (benchmarks/squeeze.py): BatchNorm re-estimation and Torch-Pruning at a FLOPs or
params target."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.common import VGGStyle
from benchmarks.squeeze import flops_params, reestimate_bn, tp_prune


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).eval()


def test_reestimate_bn_is_the_cumulative_average_of_the_batches() -> None:
    model = _conv_bn()
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 3
    conv, bn = model[0], model[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    conv_w = conv.weight.detach().clone()
    out = reestimate_bn(model, x, batch=64)
    assert out is model and not model.training and not bn.training and not model[3].training
    with torch.no_grad():
        y = conv(x)  # what the BatchNorm reads, 4 equal batches of 64
    batches = y.split(64)
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4
    assert torch.equal(conv.weight, conv_w)


def test_tp_prune_meets_the_target_and_leaves_the_model_alone() -> None:
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = VGGStyle(8).eval()
    before = copy.deepcopy(model.state_dict())
    data = {"train_x": torch.randn(256, 1, 28, 28), "train_y": torch.randint(0, 10, (256,))}
    f0, p0 = flops_params(model)
    pruned = tp_prune(model, data, 0.5, "l1", 1)
    f, _ = flops_params(pruned)
    assert 0.40 * f0 <= f <= 0.5 * f0
    by_params = tp_prune(model, data, 0.5, "l1", 1, measure="params", bn_calib=data["train_x"])
    _, p = flops_params(by_params)
    assert 0.40 * p0 <= p <= 0.5 * p0
    assert not by_params.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"^Torch-Pruning \(l1, round_to 8\) cannot keep <= 1.0% of the flops$"):
        tp_prune(model, data, 0.01, "l1", 8)
    with pytest.raises(ValueError, match=r"^measure must be 'flops' or 'params', not 'bytes'$"):
        tp_prune(model, data, 0.5, "l1", measure="bytes")
