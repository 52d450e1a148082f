"""Sizes that follow dynamic dims through the ops exporters build masks and position ids with: Range(0, seq),
Expand to Shape-built targets (with TorchScript's Where(Equal(shape, -1), 1, shape)), a Slice of a constant
table up to the sequence length, Gather of the last position (index -1), x[:, 1:] and the reversed axis. The
imported graph keeps them symbolic, and the emitted ONNX and torch models match ONNX Runtime on the original
at sizes other than the example's."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.dims import expr_of, is_dynamic
from tests.frontends.onnx_models import run

BIG = np.iinfo(np.int64).max


def _i64(name: str, v: list[int] | int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(v, dtype=np.int64), name)


def _model() -> onnx.ModelProto:
    table = np.arange(64 * 4, dtype=np.float32).reshape(1, 64, 4) / 100.0
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        # position ids: Range(0, seq) expanded to [batch, seq] through the -1 sentinel pattern
        helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "axes0"], ["pos2"]),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
        helper.make_node("Equal", ["target", "minus1"], ["is_sentinel"]),
        helper.make_node("Where", ["is_sentinel", "ones2", "target"], ["target2"]),
        helper.make_node("Expand", ["pos2", "target2"], ["ids"]),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["idsf", "axes2"], ["idsf3"]),
        # a position table sliced to the sequence: table[:, :seq]
        helper.make_node("Unsqueeze", ["seq", "axes0"], ["seq1"]),
        helper.make_node("Slice", ["table", "zeros1", "seq1", "ones1"], ["emb"]),
        helper.make_node("Add", ["x", "emb"], ["h0"]),
        helper.make_node("Mul", ["h0", "idsf3"], ["h1"]),
        # x[:, 1:], its last position (Gather -1), the reversed sequence
        helper.make_node("Slice", ["h1", "ones1", "big1", "ones1"], ["tail"]),
        helper.make_node("Gather", ["h1", "minus1s"], ["last"], axis=1),
        helper.make_node("Unsqueeze", ["last", "ones1"], ["last3"]),
        helper.make_node("Slice", ["h1", "minus1", "negbig1", "ones1", "minus1"], ["rev"]),
        helper.make_node("Concat", ["tail", "last3", "rev"], ["y"], axis=1),
    ]
    inits = [_i64("zero", 0), _i64("one", 1), _i64("axes0", [0]), _i64("axes2", [2]), _i64("minus1", [-1]),
             _i64("ones2", [1, 1]), _i64("zeros1", [0]), _i64("ones1", [1]), _i64("big1", [int(BIG)]),
             _i64("minus1s", -1), _i64("negbig1", [-int(BIG)]), numpy_helper.from_array(table, "table")]
    graph = helper.make_graph(nodes, "sizes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S2", 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(m)
    return m


def test_sizes_built_from_dynamic_dims_stay_symbolic_and_run_at_other_sizes() -> None:
    m = _model()
    g = from_onnx(m, example_shapes=[(2, 5, 4)])
    out = g.meta_of(g.operands(g.outputs[0])[0])
    assert [str(expr_of(d)) for d in out.shape] == ["N", "2*S", "4"] and all(is_dynamic(d) for d in out.shape[:2])
    emitted, module = to_onnx(g), to_torch(g)
    rng = np.random.default_rng(0)
    for shape in [(2, 5, 4), (3, 9, 4), (1, 2, 4)]:
        x = rng.standard_normal(shape).astype(np.float32)
        (want,) = run(m, x)
        (y,) = run(emitted, x)
        with torch.no_grad():
            yt = module(torch.from_numpy(x)).numpy()
        assert want.shape == (shape[0], 2 * shape[1], 4)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(yt, want, rtol=1e-6, atol=1e-6)
