"""Malformed ONNX models the fuzzer (tests/reliability/test_fuzz_onnx.py) found escaping as bare
ValueError/IndexError/KeyError/TypeError/AttributeError/ZeroDivisionError/MemoryError: one regression test per
site class, each a `CaptureError` with its exact message, naming the node where there is one. Also: a
com.microsoft model round-trips to ONNX and runs the same in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.errors import CaptureError
from netsqueeze.frontends.onnx import from_onnx
from tests.reliability.fuzzing import custom_model


def f32(*shape: int) -> np.ndarray:
    return np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)


def init(name: str, arr: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None, x: list[int] | None = None,
          opset: int = 13, xtype: int = T.FLOAT) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", xtype, x or [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], inits or [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def N(op: str, ins: list[str], outs: list[str] | None = None, name: str = "n", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs or ["y"], name=name, **attrs)


def conv(**attrs: Any) -> onnx.ModelProto:
    return model([N("Conv", ["x", "w"], **attrs)], [init("w", f32(2, 3, 3, 3))])


def _initializer_short() -> onnx.ModelProto:
    m = conv()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    return m


def _initializer_typed_field() -> onnx.ModelProto:
    m = conv()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.int64_data.extend([1, 2])
    return m


def _initializer_dtype() -> onnx.ModelProto:
    m = conv()
    m.graph.initializer[0].data_type = 40
    return m


def _initializer_negative_dims() -> onnx.ModelProto:
    m = conv()
    m.graph.initializer[0].dims[0] = -2
    return m


def _attr_declared_other_field() -> onnx.ModelProto:
    m = model([N("Concat", ["x", "x"], axis=1)])
    a = m.graph.node[0].attribute[0]
    a.ints.extend([1, 2])
    return m


def _attr_type_tag() -> onnx.ModelProto:
    m = model([N("Relu", ["x"])])
    m.graph.node[0].attribute.add(name="alpha", type=0)
    return m


def _non_utf8_attr() -> onnx.ModelProto:
    m = conv()
    m.graph.node[0].attribute.append(helper.make_attribute("auto_pad", b"\xff\xfe"))
    return m


def _non_utf8_name() -> onnx.ModelProto:
    m = model([N("Relu", ["x"], name="relu")])
    data = m.SerializeToString().replace(b"relu", b"rel\xb1")
    return onnx.load_from_string(data)


def _input_elem_type() -> onnx.ModelProto:
    return model([N("Relu", ["x"])], xtype=40)


def _sequence_input() -> onnx.ModelProto:
    m = model([N("Relu", ["x"])])
    m.graph.input[0].type.ClearField("tensor_type")
    m.graph.input[0].type.sequence_type.elem_type.tensor_type.elem_type = T.FLOAT
    return m


def _no_outputs() -> onnx.ModelProto:
    m = model([N("Relu", ["x"]), N("Relu", ["x"], ["z"], name="m")])
    del m.graph.node[1].output[:]
    return m


def _huge_constant() -> onnx.ModelProto:
    return model([N("ConstantOfShape", ["s"], ["c"], name="cos"), N("Add", ["x", "c"], name="add")],
                 [init("s", np.array([2048, 2048, 512], np.int64))])


def _negative_constant() -> onnx.ModelProto:
    return model([N("ConstantOfShape", ["s"], ["c"], name="cos"), N("Add", ["x", "c"], name="add")],
                 [init("s", np.array([4, -1], np.int64))])


def _range_zero_delta() -> onnx.ModelProto:
    return model([N("Range", ["a", "b", "d"], ["r"], name="range"), N("Add", ["x", "r"], name="add")],
                 [init("a", np.array(0, np.int64)), init("b", np.array(5, np.int64)), init("d", np.array(0, np.int64))])


def _huge_expand() -> onnx.ModelProto:
    return model([N("Expand", ["one", "s"], ["c"], name="expand"), N("Add", ["x", "c"], name="add")],
                 [init("one", np.ones(1, np.float32)), init("s", np.array([1 << 16, 1 << 16], np.int64))])


def _huge_tile() -> onnx.ModelProto:
    return model([N("Tile", ["one", "s"], ["c"], name="tile"), N("Add", ["x", "c"], name="add")],
                 [init("one", np.ones(3, np.float32)), init("s", np.array([1 << 31], np.int64))])


def _dequantize_zero_point() -> onnx.ModelProto:
    return model([N("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq", axis=0), N("Conv", ["x", "w"], name="conv")],
                 [init("q", np.ones((2, 3, 1, 1), np.int8)), init("s", np.full(2, 0.1, np.float32)),
                  init("z", np.zeros(1, np.int8))])


def _encoded_transpose() -> onnx.ModelProto:
    return model([N("DequantizeLinear", ["q", "s"], ["w"], name="dq"),
                  N("Transpose", ["w"], ["wt"], name="tr", perm=[0, 0]), N("MatMul", ["x", "wt"], name="mm")],
                 [init("q", np.ones((4, 4), np.int8)), init("s", np.array(0.1, np.float32))], x=[1, 4])


def _bias_dtype() -> onnx.ModelProto:
    return model([N("Conv", ["x", "w", "b"], name="conv")],
                 [init("w", f32(2, 3, 3, 3)), init("b", np.zeros(2, np.int32))])


CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str, str | None]] = {
    # initializer data vs dims and type (was: ValueError "cannot reshape array", "buffer size must be a multiple")
    "initializer_short": (_initializer_short, "initializer 'w' holds 212 bytes of data, but its dims [2, 3, 3, 3] "
                                              "and type FLOAT need 216", None),
    "initializer_typed_field": (_initializer_typed_field, "initializer 'w' stores its data in int64_data, which "
                                                          "does not hold FLOAT values", None),
    "initializer_dtype": (_initializer_dtype, "initializer 'w' has element type 40, which ONNX does not define", None),
    "initializer_negative_dims": (_initializer_negative_dims, "initializer 'w' has negative dims [-2, 3, 3, 3]",
                                  None),
    # attribute type confusion (was: TypeError/ValueError from int()/float(), AttributeError on .values)
    "attr_type": (lambda: model([N("Concat", ["x", "x"], axis=[1, 2])]),
                  "node 'n' (Concat): attribute 'axis' is INTS, but Concat takes INT", "n"),
    "attr_other_field": (_attr_declared_other_field,
                         "node 'n' (Concat): attribute 'axis' is declared INT but holds values in field 'ints'", "n"),
    "attr_type_tag": (_attr_type_tag, "node 'n' (Relu): attribute 'alpha' has attribute type 0, which ONNX does "
                                      "not define", "n"),
    "attr_unknown": (lambda: model([N("Relu", ["x"], alpha=0.5)]),
                     "node 'n' (Relu) has attribute 'alpha', which Relu (opset 13) does not define", "n"),
    # missing attributes and inputs (was: KeyError 'kernel_shape', IndexError in the handlers)
    "attr_required": (lambda: model([N("MaxPool", ["x"])]), "node 'n' (MaxPool) lacks the required attribute "
                                                           "'kernel_shape'", "n"),
    "arity": (lambda: model([N("Add", ["x"])]), "node 'n' (Add) has 1 inputs; Add (opset 13) takes 2", "n"),
    "required_input_empty": (lambda: model([N("Conv", ["x", "", "x"])]),
                             "node 'n' (Conv): input 1 ('W') is required but left empty", "n"),
    "no_outputs": (_no_outputs, "node 'm' (Relu) has 0 outputs; Relu (opset 13) gives 1", "m"),
    # non-UTF-8 strings (was: UnicodeDecodeError in graphsurgeon, TypeError concatenating bytes)
    "non_utf8_attr": (_non_utf8_attr, "node 'n' (Conv): attribute 'auto_pad' is not UTF-8 text (b'\\xff\\xfe')",
                      "n"),
    "non_utf8_name": (_non_utf8_name, "the graph: node #0 has a name that is not UTF-8 text (b'rel\\xb1')", "#0"),
    # graph inputs (was: KeyError in onnx_dtype_name and graphsurgeon)
    "input_elem_type": (_input_elem_type, "model input 'x' has element type 40, which ONNX does not define", None),
    "sequence_input": (_sequence_input, "model input 'x' is not a tensor (sequence_type); netsqueeze imports tensor "
                                        "inputs and outputs only", None),
    # attribute values (was: ZeroDivisionError in auto-pad arithmetic, IndexError/ValueError on axes)
    "zero_stride": (lambda: conv(strides=[0, 1], auto_pad="SAME_UPPER"),
                    "node 'n' (Conv): attribute 'strides' is [0, 1]; its rank-4 input needs 2 values of at least 1",
                    "n"),
    "stride_count": (lambda: conv(strides=[1, 1, 1]),
                     "node 'n' (Conv): attribute 'strides' is [1, 1, 1]; its rank-4 input needs 2 values of at "
                     "least 1", "n"),
    "zero_group": (lambda: conv(group=0), "node 'n' (Conv): attribute 'group' is 0; it must be at least 1", "n"),
    "conv_rank": (lambda: model([N("Conv", ["x", "w"])], [init("w", f32(2, 3))], x=[1, 3]),
                  "node 'n' (Conv): its input has rank 2 and its weight rank 2; Conv needs both of the same rank, "
                  "3 or more", "n"),
    "axis_range": (lambda: model([N("Softmax", ["x"], axis=5)]),
                   "node 'n' (Softmax): axis 5 is out of range for its rank-4 input", "n"),
    "split_zero": (lambda: model([N("Split", ["x"], ["a", "y"], axis=1, num_outputs=0)], opset=18),
                   "node 'n' (Split): it splits into 0 outputs", "n"),
    "slice_step_zero": (lambda: model([N("Slice", ["x", "s", "e", "a", "p"])],
                                      [init("s", [0]), init("e", [2]), init("a", [1]), init("p", [0])]),
                        "node 'n' (Slice): starts [0], ends [2], axes [1] and steps [0] must be as many, steps not 0",
                        "n"),
    "gather_index": (lambda: model([N("Gather", ["x", "i"], axis=1)], [init("i", np.array(7, np.int64))]),
                     "node 'n' (Gather): index 7 is out of range for axis 1 of size 3", "n"),
    "pad_count": (lambda: model([N("Pad", ["x", "p"])], [init("p", np.array([1, 1], np.int64))]),
                  "node 'n' (Pad): pads [1, 1] must hold two values for each of the 4 axes of its input", "n"),
    # constant folding over the size limit (was: MemoryError allocating 8 GiB) or with bad sizes (ValueError)
    "fold_huge": (_huge_constant, "node 'cos' (ConstantOfShape) would fold to a constant of shape [2048, 2048, 512] "
                                  "(2147483648 elements); netsqueeze folds constants of up to 268435456 elements and "
                                  "1024 MiB", "cos"),
    "fold_expand": (_huge_expand, "node 'expand' (Expand) would fold to a constant of shape [65536, 65536] "
                                  "(4294967296 elements); netsqueeze folds constants of up to 268435456 elements and "
                                  "1024 MiB", "expand"),
    "fold_tile": (_huge_tile, "node 'tile' (Tile) would fold to a constant of shape [6442450944] (6442450944 "
                              "elements); netsqueeze folds constants of up to 268435456 elements and 1024 MiB", "tile"),
    "fold_negative": (_negative_constant, "node 'cos' (ConstantOfShape): its shape input [4, -1] has a negative "
                                          "dimension", "cos"),
    "fold_range_delta": (_range_zero_delta, "node 'range' (Range): its delta is 0", "range"),
    # stored weights (was: RuntimeError from torch reshape/permute)
    "dequantize_zero_point": (_dequantize_zero_point, "node 'dq' (DequantizeLinear): its zero point has 1 elements "
                                                      "but its scale 2", "dq"),
    "encoded_transpose": (_encoded_transpose, "node 'tr' (Transpose): perm [0, 0] is not a permutation of the 2 "
                                              "axes of its input", "tr"),
    # element types (was: RuntimeError in the torch backend for an int bias)
    "bias_dtype": (_bias_dtype, "node 'conv' (Conv): input 2 ('b') is int32, which Conv does not take for 'B'",
                   "conv"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_model_is_a_located_capture_error(case: str) -> None:
    build, message, node = CASES[case]
    with pytest.raises(CaptureError) as e:
        from_onnx(build())
    assert e.value.message == message
    assert e.value.diagnostics[0].node == node


def test_custom_domain_ops_round_trip_through_onnx_runtime() -> None:
    """com.microsoft Gelu and FusedMatMul stay opaque and are written back with their domain's opset import."""
    m = custom_model()
    g = from_onnx(m)
    assert [n.origin.op_type for n in g.nodes() if n.kind == "opaque"] == ["Gelu", "FusedMatMul"]
    out = to_onnx(g)
    assert {(o.domain, o.version) for o in out.opset_import} >= {("com.microsoft", 1)}
    fused = next(n for n in out.graph.node if n.op_type == "FusedMatMul")
    assert fused.domain == "com.microsoft"
    assert {a.name: helper.get_attribute_value(a) for a in fused.attribute} == {"alpha": 0.5, "transB": 1}
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_fold_limit_leaves_small_constants_alone() -> None:
    """A ConstantOfShape well under the limit still folds."""
    m = model([N("ConstantOfShape", ["s"], ["c"], name="cos"), N("Add", ["x", "c"], name="add")],
              [init("s", np.array([1, 3, 4, 4], np.int64))])
    g = from_onnx(m)
    assert "cos" not in {n.id for n in g.nodes()}


def test_fold_limit_spares_weights_already_in_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Constant or a Transpose of an initializer above the limit is data the file holds, not a blow-up."""
    import netsqueeze.frontends.onnx.importer as importer

    monkeypatch.setattr(importer, "MAX_FOLD_ELEMENTS", 10)
    w = helper.make_node("Constant", [], ["w"], name="c", value=numpy_helper.from_array(f32(4, 4)))
    m = model([w, N("Transpose", ["w"], ["wt"], name="tr"), N("MatMul", ["x", "wt"], name="mm")], x=[1, 4])
    from_onnx(m)
    with pytest.raises(CaptureError, match=r"node 'cos' \(ConstantOfShape\) would fold to a constant of shape \[4, 4\]"):
        from_onnx(model([N("ConstantOfShape", ["s"], ["c"], name="cos"), N("Add", ["x", "c"], name="add")],
                        [init("s", np.array([4, 4], np.int64))], x=[4, 4]))
