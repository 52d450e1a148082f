"""A model quantized by ONNX Runtime's `quantize_static` (QDQ form) imports with real conv nodes whose
weights are encoded, keeps its channel groups, counts params and bytes exactly, and round-trips to ONNX
and to torch with ONNX Runtime's own results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir import graph_stats
from netsqueeze.ir.weights import Affine
from netsqueeze.passes import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.trim import Trim
from tests.frontends.onnx_models import input_shapes, light_path, randomized, run


def _with_initializers(model: onnx.ModelProto, opset: int = 13) -> onnx.ModelProto:
    """Constant-node weights as initializers at `opset` (how exporters write weights, and what
    `quantize_static` quantizes per channel)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    inits = {t.name for t in m.graph.initializer}
    real = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(real)
    m.ir_version = 7  # initializers need not be graph inputs
    m = version_converter.convert_version(m, opset)
    m.ir_version = helper.find_min_ir_version_for(list(m.opset_import))
    return m


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{name: rng.standard_normal(shape, dtype=np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    d: Path = tmp_path_factory.mktemp("qdq")
    fp = _with_initializers(randomized(light_path("squeezenet")))
    onnx.save(fp, d / "fp.onnx")
    quantize_static(str(d / "fp.onnx"), str(d / "q.onnx"), _Reader(fp.graph.input[0].name, input_shapes(fp)[0]),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    return fp, onnx.load(str(d / "q.onnx"))


def test_qdq_model_imports_with_real_convs_and_exact_accounting(models: tuple[onnx.ModelProto, ...]) -> None:
    fp, q = models
    g, ref = from_onnx(q), from_onnx(fp)
    convs = g.by_kind("conv")
    assert len(convs) == len(ref.by_kind("conv")) == 26
    assert not g.by_kind("opaque")
    for c in convs:
        w, b = c.params["weight"], c.params["bias"]
        assert isinstance(w, Affine) and w.describe() == "int8 per-axis(0)"
        assert isinstance(b, Affine) and b.type_name == "int32"
    # the same channel groups as the float model
    assert sorted(gr.size for gr in find_groups(g).prunable()) == sorted(gr.size for gr in find_groups(ref).prunable())
    st, st_ref = graph_stats(g), graph_stats(ref)
    assert st.params == st_ref.params == 1_235_496
    # int8 weights + one float scale per output channel; int32 biases + their scales; no zero points (all 0)
    expected = sum(w.numel() + 4 * w.shape[0] for w in (c.params["weight"] for c in convs)) + sum(
        4 * b.numel() + 4 * b.shape[0] for b in (c.params["bias"] for c in convs))
    acts = g.by_kind("quantize", "dequantize")  # activations: a float scale and a uint8 zero point each
    assert len(acts) == 86
    expected += 5 * len(acts)
    assert st.param_bytes == expected
    assert st.param_bytes < st_ref.param_bytes / 3.8


def test_qdq_model_round_trips_to_onnx_and_torch(models: tuple[onnx.ModelProto, ...]) -> None:
    _, q = models
    g = from_onnx(q)
    out, module = to_onnx(g), to_torch(g)
    assert sum(1 for n in out.graph.node if n.op_type == "DequantizeLinear") == \
        sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear")
    # batch 1 only: the file reshapes to a literal [1, 1000, 1, 1] at the end
    x = np.random.default_rng(1).standard_normal(input_shapes(q)[0], dtype=np.float32)
    (y_ort,) = run(q, x)
    assert np.abs(run(out, x)[0] - y_ort).max() <= 1e-5
    with torch.no_grad():
        y_torch = module(torch.from_numpy(x)).numpy()
    assert np.abs(y_torch - y_ort).max() <= 1e-5


def test_trim_removes_channels_of_encoded_weights(models: tuple[onnx.ModelProto, ...]) -> None:
    _, q = models
    g = from_onnx(q)
    before = graph_stats(g)
    Trim(criterion="l1", ratio=0.5, bias_compensation=False).run(g, PassContext())
    g.verify()
    after = graph_stats(g)
    assert after.params < before.params and after.param_bytes < before.param_bytes
    assert all(isinstance(c.params["weight"], Affine) for c in g.by_kind("conv"))
    x = np.random.default_rng(3).standard_normal(input_shapes(q)[0], dtype=np.float32)
    with torch.no_grad():
        y_torch = to_torch(g)(torch.from_numpy(x)).numpy()
    assert np.abs(run(to_onnx(g), x)[0] - y_torch).max() <= 1e-5


def test_trim_to_a_bytes_budget_meters_encoded_sizes(models: tuple[onnx.ModelProto, ...]) -> None:
    _, q = models
    g = from_onnx(q)
    before = graph_stats(g)
    ctx = PassContext(budget={"bytes": 0.6})
    Trim(criterion="l1").run(g, ctx)
    after = graph_stats(g)
    # int8 weights: the budget is met on the encoded size, which is ~1/4 of the float size the params imply
    assert after.param_bytes <= 0.6 * before.param_bytes
    assert after.param_bytes > 0.5 * before.param_bytes  # the bisection stops near the limit
    assert after.param_bytes < after.params * 1.1
