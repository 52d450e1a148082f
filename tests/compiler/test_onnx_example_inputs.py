"""`example_inputs` given to compile()/import_model() size an ONNX model's dynamic dims for analysis."""

from __future__ import annotations

import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import netsqueeze as ns
from netsqueeze.errors import InputMismatchError


def _model() -> object:
    w = numpy_helper.from_array(torch.randn(4, 3, 3, 3).numpy(), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_example_inputs_size_the_dynamic_dims() -> None:
    g = ns.import_model(_model(), (torch.randn(2, 3, 16, 12),))
    assert tuple(g.node("x").meta[0].shape) == (2, 3, 16, 12)
    # input_shapes win over the example
    g = ns.import_model(_model(), (torch.randn(2, 3, 16, 12),), input_shapes={"x": (1, 3, 8, 8)})
    assert tuple(g.node("x").meta[0].shape) == (1, 3, 8, 8)


def test_example_input_count_must_match() -> None:
    with pytest.raises(InputMismatchError) as e:
        ns.import_model(_model(), (torch.randn(2, 3, 8, 8), torch.randn(1)))
    assert e.value.message == "2 example inputs given, but the ONNX model has 1 inputs (x)"
