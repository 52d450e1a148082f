"""ONNX semantics the importer keeps where a plain mapping to the IR would change the numbers: SAME padding at
run-time sizes, Flatten's negative axis, Resize's nearest rounding modes, integer Div, equal Split and a
no-axes Squeeze on dynamic axes, reshape targets with two computed sizes, Clip with min above max, a reshape
to a scalar, one tensor listed as two outputs. Each emitted ONNX and torch model matches ONNX Runtime on the
original, at the example's sizes and at others; malformed nodes ONNX Runtime refuses are refused by name."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import CaptureError, InputMismatchError
from netsqueeze.frontends.onnx import from_onnx
from tests.frontends.onnx_models import run


def _model(nodes: list[onnx.NodeProto], inputs: list[tuple[str, int, list[object]]], n_out: int = 1,
           inits: dict[str, np.ndarray] | None = None, opset: int = 17, outputs: list[str] | None = None,
           out_type: int = TP.FLOAT) -> onnx.ModelProto:
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                      [oh.make_tensor_value_info(o, out_type, None) for o in (outputs or ["y"][:n_out])],
                      [nh.from_array(v, k) for k, v in (inits or {}).items()])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


def _same_everywhere(m: onnx.ModelProto, example: list[np.ndarray], others: list[list[np.ndarray]]) -> None:
    """The emitted ONNX and torch models give ONNX Runtime's outputs (shapes and values, 1e-5) at the example
    inputs and at `others`."""
    g = from_onnx(m, example_shapes=[x.shape for x in example])
    emitted, module = to_onnx(g), to_torch(g)
    for xs in [example, *others]:
        want = run(m, *xs)
        got_onnx = run(emitted, *xs)
        with torch.no_grad():
            out = module(*[torch.from_numpy(x) for x in xs])
        got_torch = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
        for w, a, b in zip(want, got_onnx, got_torch):
            assert a.shape == w.shape and b.shape == w.shape, (w.shape, a.shape, b.shape)
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(b, w, rtol=1e-5, atol=1e-5)


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
@pytest.mark.parametrize("auto", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_with_a_stride_follows_the_run_time_size(op: str, auto: str) -> None:
    # stride 2: the padding of 16 and of 17 differ (and the output size): fixed pads would be wrong at 17
    kw: dict[str, object] = {"auto_pad": auto, "strides": [2, 2]}
    if op == "Conv":
        node = oh.make_node("Conv", ["x", "w"], ["y"], **kw)
        inits = {"w": _x(3, 2, 3, 3, seed=1)}
    else:
        node = oh.make_node(op, ["x"], ["y"], kernel_shape=[3, 3], **kw)
        inits = {}
    m = _model([node], [("x", TP.FLOAT, ["N", 2, "H", "W"])], inits=inits)
    _same_everywhere(m, [_x(1, 2, 16, 16)], [[_x(2, 2, 17, 15, seed=2)], [_x(1, 2, 9, 20, seed=3)]])


def test_same_padding_with_stride_one_stays_a_conv_the_passes_see() -> None:
    m = _model([oh.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")], [("x", TP.FLOAT, ["N", 2, "H", "W"])],
               inits={"w": _x(3, 2, 4, 4, seed=1)})
    g = from_onnx(m, example_shapes=[(1, 2, 8, 8)])
    (conv,) = [n for n in g.nodes() if n.kind == "conv"]
    assert conv.attrs["padding"] == [1, 1, 2, 2]  # (k - 1) = 3: one before, two after (SAME_UPPER)
    _same_everywhere(m, [_x(1, 2, 8, 8)], [[_x(2, 2, 11, 6, seed=2)]])


def test_flatten_negative_axis_counts_from_the_end() -> None:
    m = _model([oh.make_node("Flatten", ["x"], ["y"], axis=-1)], [("x", TP.FLOAT, ["N", 2, 3])])
    _same_everywhere(m, [_x(2, 2, 3)], [[_x(5, 2, 3, seed=1)]])
    assert run(m, _x(2, 2, 3))[0].shape == (4, 3)


@pytest.mark.parametrize("ctm,nearest", [("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
                                         ("asymmetric", "round_prefer_floor"), ("align_corners", "floor"),
                                         ("pytorch_half_pixel", "ceil"), ("tf_half_pixel_for_nn", "floor")])
@pytest.mark.parametrize("scale", [1.5, 0.5, 2.0])
def test_resize_nearest_rounds_as_onnx_says(ctm: str, nearest: str, scale: float) -> None:
    # scale 1.5 and 0.5 put output pixels exactly half-way: the rounding mode decides
    m = _model([oh.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest", coordinate_transformation_mode=ctm,
                             nearest_mode=nearest)], [("x", TP.FLOAT, [1, 1, 4, 6])],
               inits={"s": np.array([1, 1, scale, scale], np.float32)})
    x = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    _same_everywhere(m, [x], [])


def test_integer_div_truncates_in_both_targets() -> None:
    m = _model([oh.make_node("Div", ["a", "b"], ["y"])], [("a", TP.INT64, [2, 3]), ("b", TP.INT64, [3])],
               out_type=TP.INT64)
    a, b = np.array([[7, -7, 9], [-5, 5, -9]], np.int64), np.array([2, -3, 4], np.int64)
    _same_everywhere(m, [a, b], [])
    assert run(m, a, b)[0].tolist() == [[3, 2, 2], [-2, -1, -2]]


def test_equal_split_of_a_dynamic_axis_follows_its_length() -> None:
    m = _model([oh.make_node("Split", ["x"], ["y", "z"], axis=0)], [("x", TP.FLOAT, ["N", 6])],
               outputs=["y", "z"], opset=13)
    _same_everywhere(m, [_x(4, 6)], [[_x(6, 6, seed=1)], [_x(10, 6, seed=2)]])  # (opset 13: even lengths)


def test_squeeze_without_axes_keeps_a_dynamic_axis_whose_example_is_one() -> None:
    m = _model([oh.make_node("Squeeze", ["x"], ["y"])], [("x", TP.FLOAT, ["N", 3, 1, 1])], opset=13)
    g = from_onnx(m, example_shapes=[(1, 3, 1, 1)])
    assert [int(d) for d in g.meta_of(g.operands(g.outputs[0])[0]).shape] == [1, 3]
    _same_everywhere(m, [_x(2, 3, 1, 1)], [[_x(4, 3, 1, 1, seed=1)]])


def test_reshape_target_with_two_computed_sizes_infers_the_one_no_backend_can_compute() -> None:
    # [2, H / 2, -1]: the -1 is floor(3·H / floor(H / 2)), which no runtime computes from sizes
    i64 = np.int64
    nodes = [oh.make_node("Shape", ["x"], ["s"]), oh.make_node("Slice", ["s", "st", "en"], ["h"]),
             oh.make_node("Div", ["h", "two"], ["h2"]), oh.make_node("Concat", ["n0", "h2", "m1"], ["t"], axis=0),
             oh.make_node("Reshape", ["x", "t"], ["y"])]
    m = _model(nodes, [("x", TP.FLOAT, [2, "H", 3])], opset=13,
               inits={"st": np.array([1], i64), "en": np.array([2], i64), "two": np.array([2], i64),
                      "n0": np.array([2], i64), "m1": np.array([-1], i64)})
    _same_everywhere(m, [_x(2, 4, 3)], [[_x(2, 6, 3, seed=1)], [_x(2, 10, 3, seed=2)]])


def test_clip_with_min_above_max_gives_max_and_a_reshape_to_a_scalar_runs() -> None:
    m = _model([oh.make_node("Clip", ["x", "lo", "hi"], ["y"])], [("x", TP.FLOAT, [3, 4])],
               inits={"lo": np.array(0.5, np.float32), "hi": np.array(0.2, np.float32)})
    _same_everywhere(m, [_x(3, 4)], [])
    m = _model([oh.make_node("Reshape", ["x", "s"], ["y"])], [("x", TP.FLOAT, [1, 1])],
               inits={"s": np.zeros(0, np.int64)})
    _same_everywhere(m, [_x(1, 1)], [])


def test_one_tensor_listed_as_two_outputs_or_an_input_as_an_output() -> None:
    relu = [oh.make_node("Relu", ["x"], ["y"])]
    _same_everywhere(_model(relu, [("x", TP.FLOAT, ["N", 3])], outputs=["y", "y"], opset=13), [_x(2, 3)], [[_x(5, 3)]])
    m = _model(relu, [("x", TP.FLOAT, ["N", 3])], outputs=["y", "x"], opset=13)
    _same_everywhere(m, [_x(2, 3)], [])
    assert [o.name for o in to_onnx(from_onnx(m, example_shapes=[(2, 3)])).graph.output] == ["y", "x"]


X4 = [("x", TP.FLOAT, [2, 4, 6, 6])]


@pytest.mark.parametrize("nodes,inputs,inits,message", [
    ([oh.make_node("Squeeze", ["x", "a"], ["y"])], X4, {"a": np.array([1], np.int64)},
     "node 'Squeeze_0' (Squeeze): axis 1 has size 4; Squeeze removes axes of size 1"),
    ([oh.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[2, 2])], X4, {"w": np.ones((3, 4, 3, 3), np.float32)},
     "node 'Conv_0' (Conv): attribute 'kernel_shape' is [2, 2] but its weight's kernel is [3, 3]"),
    ([oh.make_node("Slice", ["x", "s", "e", "a"], ["y"])], X4,
     {"s": np.array([0, 1], np.int64), "e": np.array([2, 3], np.int64), "a": np.array([1, 1], np.int64)},
     "node 'Slice_0' (Slice): axes [1, 1] name an axis twice"),
    ([oh.make_node("Unsqueeze", ["x", "a"], ["y"])], X4, {"a": np.array([1, 1], np.int64)},
     "node 'Unsqueeze_0' (Unsqueeze): axes [1, 1] name an output axis twice"),
    ([oh.make_node("Gemm", ["x", "w"], ["y"])], [("x", TP.FLOAT, [2, 2, 4])], {"w": np.ones((4, 3), np.float32)},
     "node 'Gemm_0' (Gemm): its input A has rank 3; Gemm multiplies rank-2 matrices"),
    ([oh.make_node("Resize", ["x", "", "s"], ["y"])], X4, {"s": np.array([2.0, 2.0], np.float32)},
     "node 'Resize_0' (Resize): its scales have 2 values for a rank-4 input"),
    ([oh.make_node("Reshape", ["x", "s"], ["y"])], [("x", TP.FLOAT, [2, 6])], {"s": np.array([2, 3, 0], np.int64)},
     "target [2, 3, 0] copies (0) dim 2 or later of a rank-2 input"),
    ([oh.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)], X4,
     {k: np.ones(4, np.float32) for k in "sbmv"},
     "node 'BatchNormalization_0' (BatchNormalization): training_mode = 1: it normalises by batch statistics "
     "(a training graph); export the model in eval mode"),
])
def test_malformed_nodes_are_refused_by_name(nodes: list[onnx.NodeProto], inputs: list[tuple[str, int, list[object]]],
                                             inits: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(CaptureError, match=re.escape(message)):
        from_onnx(_model(nodes, inputs, inits=inits, opset=15))


def test_an_input_without_element_type_and_one_dim_with_two_sizes_are_refused() -> None:
    m = _model([oh.make_node("Relu", ["x"], ["y"])], [("x", TP.UNDEFINED, [2, 3])])
    with pytest.raises(CaptureError, match=re.escape("model input 'x' has no element type (elem_type 0)")):
        from_onnx(m)
    m = _model([oh.make_node("Add", ["x", "z"], ["y"])], [("x", TP.FLOAT, ["N", 3]), ("z", TP.FLOAT, ["N", 3])])
    with pytest.raises(InputMismatchError, match=re.escape(
            "dynamic dim 'N' is 2 in input 'x' (axis 0) but 4 in input 'z' (axis 0): a named dim takes one size in "
            "the example inputs")):
        from_onnx(m, example_shapes=[(2, 3), (4, 3)])
    m = _model([oh.make_node("Relu", ["x"], ["y"])], [("x", TP.FLOAT, ["S", "S"])])
    with pytest.raises(InputMismatchError, match=re.escape("dynamic dim 'S' is 2 in input 'x' (axis 0) but 3 in "
                                                           "input 'x' (axis 1)")):
        from_onnx(m, example_shapes=[(2, 3)])
