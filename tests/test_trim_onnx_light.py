"""Issue 5 acceptance on the onnx package's light models: trimming half of every prunable group gives a
model that verifies, runs in torch and in ONNX Runtime, and whose params equal the accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir import graph_stats
from netsqueeze.passes import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.trim import Trim
from tests.frontends.onnx_models import LIGHT_PARAMS, input_shapes, light_path, randomized, run


@pytest.mark.parametrize("name", LIGHT_PARAMS)
def test_half_trim_of_light_model(name: str) -> None:
    model = randomized(light_path(name))
    graph = from_onnx(model)
    groups = find_groups(graph)
    sizes = {g.id: g.size for g in groups.prunable()}
    assert sizes, f"{name}: no prunable group"
    before = graph_stats(graph)
    Trim(criterion="l1", ratio=0.5, bias_compensation=False).run(graph, PassContext())
    graph.verify()
    after = graph_stats(graph)
    assert after.params < before.params and after.flops < before.flops
    # every prunable group lost half its channels, a count of 16 or more that a convolution computes rounded up
    # to a multiple of 16 (the default `align`; at most the group's size)
    regrouped = sorted(g.size for g in find_groups(graph).prunable())
    blocked = {g.id for g in groups.prunable() if g.blocked}
    assert regrouped == sorted(min(s, -(-(s - s // 2) // 16) * 16) if gid in blocked and s - s // 2 >= 16
                               else s - s // 2 for gid, s in sizes.items())
    x = np.random.default_rng(0).standard_normal(input_shapes(model)[0], dtype=np.float32)
    module = to_torch(graph)
    assert sum(p.numel() for p in module.parameters()) == after.params
    with torch.no_grad():
        y_torch = module(torch.from_numpy(x)).numpy()
    (y_ort,) = run(to_onnx(graph), x)
    assert y_torch.shape == y_ort.shape
    assert np.abs(y_torch - y_ort).max() <= 1e-4 * max(1.0, float(np.abs(y_ort).max()))
