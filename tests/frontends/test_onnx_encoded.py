"""Weights stored as ONNX subgraphs of constants import in their form: DequantizeLinear behind a
Transpose (as tf2onnx writes conv weights), block-quantized int4, and Gather codebooks."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.weights import Affine, Codebook
from tests.frontends.onnx_models import run

R = np.random.default_rng(0)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int], opset: int = 21
           ) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _check(m: onnx.ModelProto, x: np.ndarray) -> None:
    (ref,) = run(m, x)
    g = from_onnx(m)
    assert np.abs(run(to_onnx(g), x)[0] - ref).max() <= 1e-5
    with torch.no_grad():
        assert np.abs(to_torch(g)(torch.from_numpy(x)).numpy() - ref).max() <= 1e-5


def test_transposed_dequantized_conv_weight() -> None:
    w = R.integers(-127, 128, (3, 3, 2, 4)).astype(np.int8)  # HWIO, per output channel (axis 3)
    s = np.asarray([0.01, 0.02, 0.03, 0.04], np.float32)
    m = _model([helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=3),
                helper.make_node("Transpose", ["wd"], ["wt"], perm=[3, 2, 0, 1]),
                helper.make_node("Conv", ["x", "wt"], ["y"], pads=[1, 1, 1, 1])],
               [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")], [1, 2, 5, 5], opset=13)
    conv = from_onnx(m).by_kind("conv")[0]
    wt = conv.params["weight"]
    assert isinstance(wt, Affine) and wt.describe() == "int8 per-axis(0)" and wt.shape == (4, 2, 3, 3)
    _check(m, R.standard_normal((1, 2, 5, 5)).astype(np.float32))


def test_int4_block_quantized_matmul_weight() -> None:
    q = R.integers(-8, 8, (8, 6)).astype(np.int8)
    w = onnx.helper.make_tensor("w", TensorProto.INT4, [8, 6], q.flatten().tolist())
    s = numpy_helper.from_array(R.uniform(0.01, 0.1, (2, 6)).astype(np.float32), "s")  # blocks of 4 along axis 0
    m = _model([helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=4),
                helper.make_node("MatMul", ["x", "wd"], ["y"])], [w, s], [3, 8])
    lin = from_onnx(m).by_kind("linear")[0]
    wt = lin.params["weight"]  # MatMul's [in, out] weight becomes linear's [out, in]: the blocks run along axis 1
    assert isinstance(wt, Affine) and wt.describe() == "int4 block 4 on axis 1" and wt.nbytes() == 24 + 48
    _check(m, R.standard_normal((3, 8)).astype(np.float32))


def test_gather_codebook_weight_is_shared() -> None:
    c = numpy_helper.from_array(np.asarray([-0.5, 0.0, 0.25, 1.0], np.float32), "c")
    i1 = numpy_helper.from_array(R.integers(0, 4, (5, 4)).astype(np.int64), "i1")
    i2 = numpy_helper.from_array(R.integers(0, 4, (4, 5)).astype(np.int64), "i2")
    m = _model([helper.make_node("Gather", ["c", "i1"], ["w1"], axis=0),
                helper.make_node("Gather", ["c", "i2"], ["w2"], axis=0),
                helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
               [c, i1, i2], [2, 5], opset=17)
    lins = from_onnx(m).by_kind("linear")
    a, b = (n.params["weight"] for n in lins)
    assert isinstance(a, Codebook) and isinstance(b, Codebook) and a.centroids is b.centroids
    _check(m, R.standard_normal((2, 5)).astype(np.float32))
