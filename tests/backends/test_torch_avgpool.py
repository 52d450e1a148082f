"""ONNX AveragePool with asymmetric pads and count_include_pad=0 runs in torch like in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx


def test_asymmetric_avg_pool_excludes_padding() -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
                            count_include_pad=0, ceil_mode=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 9), dtype=np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = to_torch(from_onnx(model))(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5
