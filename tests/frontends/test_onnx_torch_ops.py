"""Standard ONNX ops outside the IR's canonical set run in the torch backend (a torch form per op, checked
against ONNX Runtime), and shapes ONNX shape inference cannot tell are measured with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from tests.frontends.onnx_models import run

R = np.random.default_rng(0)
F = TensorProto.FLOAT


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, tuple[int, ...]], inits: dict[str, np.ndarray],
           opset: int = 17, domain_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(k, F, v) for k, v in inputs.items()],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domain_opsets or {}).items()]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 10  # what this onnxruntime reads
    return m


CASES = {
    "GatherElements": (_model([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)], {"x": (3, 5)},
                              {"i": R.integers(-5, 5, (3, 4)).astype(np.int64)})),
    "GatherND": (_model([helper.make_node("GatherND", ["x", "i"], ["y"])], {"x": (4, 5, 2)},
                        {"i": R.integers(0, 4, (3, 2)).astype(np.int64)})),
    "Gather_axis1": (_model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], {"x": (2, 6)},
                            {"i": np.asarray([[0, -1], [2, 3]], np.int64)})),
    "IsNaN_Where": (_model([helper.make_node("Log", ["x"], ["l"]), helper.make_node("IsNaN", ["l"], ["n"]),
                            helper.make_node("Where", ["n", "z", "l"], ["y"])], {"x": (3, 4)},
                           {"z": np.zeros(1, np.float32)})),
    "Expand": (_model([helper.make_node("Expand", ["x", "s"], ["y"])], {"x": (3, 1)}, {"s": np.asarray([2, 3, 4])})),
    "Tile": (_model([helper.make_node("Tile", ["x", "r"], ["y"])], {"x": (2, 3)}, {"r": np.asarray([2, 1])})),
    "Trilu": (_model([helper.make_node("Trilu", ["x", "k"], ["y"], upper=0)], {"x": (4, 4)},
                     {"k": np.asarray(1, np.int64)})),
    "ScatterND": (_model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"])], {"x": (4, 3)},
                         {"i": np.asarray([[0], [2]], np.int64), "u": np.ones((2, 3), np.float32)})),
    "Mod_fmod": (_model([helper.make_node("Mod", ["x", "d"], ["y"], fmod=1)], {"x": (3, 4)},
                        {"d": np.asarray([1.5], np.float32)})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_op_runs_in_torch_as_in_onnx_runtime(case: str) -> None:
    m = CASES[case]
    feeds = [R.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in m.graph.input]
    (ref,) = run(m, *feeds)
    g = from_onnx(m)
    with torch.no_grad():
        y = to_torch(g)(*[torch.from_numpy(f) for f in feeds])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(to_onnx(g), *feeds)[0], ref, rtol=1e-6, atol=1e-6)


def test_shapes_onnx_cannot_infer_are_measured_with_onnx_runtime() -> None:
    # com.microsoft::Gelu: ONNX shape inference does not know it, ONNX Runtime runs it
    m = _model([helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"), helper.make_node("Relu", ["g"], ["y"])],
               {"x": (2, 7)}, {}, domain_opsets={"com.microsoft": 1})
    g = from_onnx(m)
    gelu = g.by_kind("opaque")[0]
    assert gelu.origin.op_type == "Gelu" and str(gelu.meta[0]) == "float32[2, 7]"
    x = R.standard_normal((2, 7)).astype(np.float32)
    np.testing.assert_allclose(run(to_onnx(g), x)[0], run(m, x)[0], rtol=1e-6, atol=1e-6)
