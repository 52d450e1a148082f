"""Layers named like GraphModule's own attributes (graph, code, meta, recompile), Python keywords or `self`
compile and run: the emitted module paths step around those names (they ended the compile in an
InternalError, even for the ONNX target, whose output error the torch backend measures)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns


@pytest.mark.parametrize("name", ["graph", "meta", "code", "class", "def", "self", "recompile", "print_readable"])
def test_a_layer_named_like_a_graph_module_attribute_or_a_keyword(name: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module(name, nn.Linear(4, 4))
    m.add_module("fc", nn.Linear(4, 2))
    m.eval()
    x = torch.randn(3, 4)
    res = ns.compile(m, "policy p { fold_bn }", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(res.model(x), m(x))
    assert res.report.fidelity["output_error"] == 0.0
