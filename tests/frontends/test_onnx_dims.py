"""ONNX models with dynamic dims: the dims stay dynamic through import, passes and both backends, their
sizes for analysis come from the example inputs, and an open dim without a size is an error."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import CaptureError
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.dims import expr_of, is_dynamic
from netsqueeze.passes import PassContext
from netsqueeze.passes.trim import Trim
from tests.frontends.onnx_models import run


class Tokens(nn.Module):
    """A conv stem whose feature map becomes a token sequence: reshapes built from the input's runtime shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        b, c, h, w = y.shape
        return self.fc(y.reshape(b, c, h * w).transpose(1, 2)).reshape(b, -1)


def _onnx(m: nn.Module, x: torch.Tensor, axes: dict[str, dict[int, str]] | None = None) -> onnx.ModelProto:
    """`m` exported by torch's TorchScript exporter, input 'x', output 'y', with these dynamic axes (none: static)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                          dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def _exported() -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    m = Tokens().eval()
    return m, _onnx(m, torch.randn(2, 3, 16, 12), {"x": {0: "batch", 2: "H", 3: "W"}, "y": {0: "batch", 1: "L"}})


def test_dynamic_dims_survive_import_and_both_backends() -> None:
    m, proto = _exported()
    g = ns.import_model(proto, (torch.randn(2, 3, 16, 12),))
    assert g.node("x").meta[0].symbolic() == "float32[batch, 3, H, W]"
    assert str(g.node("x").meta[0]) == "float32[2, 3, 16, 12]"  # analysis runs at the example's sizes
    out = to_onnx(g)
    assert [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, "H", "W"]
    module = to_torch(g)
    for shape in [(2, 3, 16, 12), (3, 3, 20, 8), (1, 3, 9, 31)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = m(x).numpy()
            assert np.abs(module(x).numpy() - want).max() < 1e-5
        assert np.abs(run(out, x.numpy())[0] - want).max() < 1e-5


def test_trimmed_dynamic_model_runs_at_other_sizes() -> None:
    _, proto = _exported()
    g = ns.import_model(proto, (torch.randn(2, 3, 16, 12),))
    Trim(criterion="l1", ratio=0.5).run(g, PassContext())
    g.verify()
    assert g.node(g.by_kind("conv")[0].id).params["weight"].shape[0] == 4
    module, out = to_torch(g), to_onnx(g)
    for shape in [(2, 3, 16, 12), (3, 3, 20, 8)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            y = module(x).numpy()
        assert y.shape == (shape[0], 5 * ((shape[2] + 1) // 2) * ((shape[3] + 1) // 2))
        assert np.abs(run(out, x.numpy())[0] - y).max() < 1e-5


def test_open_dims_need_a_size_except_the_batch() -> None:
    _, proto = _exported()
    with pytest.raises(CaptureError) as e:
        from_onnx(proto)
    assert e.value.message == ("model input 'x' has the dynamic dim 'H' (axis 2) and no size for it: pass "
                               "example_inputs or input_shapes={'x': (...)}")
    g = from_onnx(proto, input_shapes={"x": (2, 3, 8, 8)})
    assert g.meta.get("notes") is None
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 8
    g = from_onnx(proto)
    assert g.meta["notes"] == ["input 'x': dynamic dim 'batch' (axis 0) analysed at size 1 (no example size "
                               "given); it stays dynamic in the emitted model"]
    assert g.node("x").meta[0].symbolic() == "float32[batch, 3, 8, 8]"


def test_sizes_feeding_other_ops_are_computed_at_run_time() -> None:
    """Range over a dynamic length and ConstantOfShape of a dynamic shape: the sizes stay run-time values."""
    from onnx import TensorProto, helper, numpy_helper

    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),  # sequence length, a scalar
        helper.make_node("Range", ["zero", "n", "step"], ["pos"]),  # [n]
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Add", ["x", "posf"], ["a"]),
        helper.make_node("Add", ["a", "ones"], ["y"]),
    ]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [i64("one", 1), i64("zero", 0), i64("step", 1)])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    ir = from_onnx(proto, input_shapes={"x": (2, 5)})
    assert [n.kind for n in ir.nodes() if n.kind == "sizes"]  # not baked as constants
    out, module = to_onnx(ir), to_torch(ir)
    for shape in [(2, 5), (3, 9)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        want = x + np.arange(shape[1], dtype=np.float32) + 1
        assert np.abs(run(out, x)[0] - want).max() < 1e-6
        with torch.no_grad():
            assert np.abs(module(torch.from_numpy(x)).numpy() - want).max() < 1e-6


POLICY = "policy p {\n  calibrate samples 32, batch %d\n  trim { criterion = l1, ratio = 25%% }\n}\n"


def test_a_static_batch_the_model_reads_is_a_clear_error_at_another_calibration_batch(
        capfd: pytest.CaptureFixture[str]) -> None:
    """Exported without dynamic axes, `Tokens` reshapes to the example's batch of 2: calibration batches of 16 fail
    in it. The compile says so before any pass runs (it was a pass failing on a RuntimeError, with torch.fx's
    traceback on stderr), and calibrating at the declared batch works."""
    torch.manual_seed(0)
    m = Tokens().eval()
    model = _onnx(m, torch.randn(2, 3, 16, 12))
    calib = torch.randn(32, 3, 16, 12)
    capfd.readouterr()
    with pytest.raises(ns.InputMismatchError) as err:
        ns.compile(model, POLICY % 16, example_inputs=(calib[:2],), calibration=calib, progress=False)
    assert str(err.value).splitlines()[0] == (
        "node 'x': error: calibration batch 0: input 'x' has 16 rows, but the model's batch dim is static at 2 and it "
        "does not run at 16 (RuntimeError: shape '[2, 8, 48]' is invalid for input of size 6144)")
    assert "calibrate with batches of 2 (policy `calibrate batch 2`), or give the model a dynamic batch dim" in \
        str(err.value)
    assert capfd.readouterr().err == ""
    res = ns.compile(model, POLICY % 2, example_inputs=(calib[:2],), calibration=calib, progress=False)
    assert res.graph.node("x").meta[0].shape == (2, 3, 16, 12)


def test_a_static_batch_the_model_does_not_read_calibrates_at_any_batch() -> None:
    """A static export that runs at any batch (its Flatten keeps axis 0) is tried at the calibration batch and
    compiles: refusing it would make users calibrate at the export's batch for nothing."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 10, 5)).eval()
    model = _onnx(m, torch.randn(2, 3, 16, 12))
    calib = torch.randn(32, 3, 16, 12)
    res = ns.compile(model, POLICY % 16, example_inputs=(calib[:2],), calibration=calib, progress=False)
    assert res.graph.node("x").meta[0].shape == (2, 3, 16, 12)
    assert any(n.kind == "conv" and n.params["weight"].shape[0] == 6 for n in res.graph.nodes())  # 8 - 25%


class _Rows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], -1))


def test_a_torch_capture_at_batch_1_that_reads_the_batch_names_the_example() -> None:
    """From an example batch of 1 the torch capture fixes the batch (its reshape reads 1): the error says to give
    a larger example, not to re-export."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 4)
    with pytest.raises(ns.InputMismatchError) as err:
        ns.compile(_Rows().eval(), POLICY % 16, example_inputs=(x[:1],), calibration=x, progress=False)
    assert str(err.value).splitlines()[0].startswith(
        "node 'x': error: calibration batch 0: input 'x' has 16 rows, but the model's batch dim is static at 1 and it "
        "does not run at 16 (RuntimeError: ")
    assert "calibrate with batches of 1 (policy `calibrate batch 1`), or give an example batch of 2 or more" in \
        str(err.value)


def test_a_static_batch_model_that_cannot_run_in_torch_says_that() -> None:
    """The batch check runs the model once; an op without a torch implementation is that op's error, not a
    static-batch one."""
    from netsqueeze.compiler.calibration import check_static_batch
    from netsqueeze.ir.graph import Graph, Origin, TensorMeta

    g = Graph("onnx_model")
    g.add_node("x", "input", attrs={"shape": (1, 4), "dtype": "float32"}, origin=Origin("onnx", "x", "input"))
    g.add_node("/blk/Weird_0", "opaque", ["x"], origin=Origin("onnx", "/blk/Weird_0", "Weird", payload=None))
    g.node("/blk/Weird_0").meta = [TensorMeta((1, 4))]
    g.add_node("output", "output", ["/blk/Weird_0"])
    g.infer_shapes()
    with pytest.raises(ns.UnsupportedOpError) as err:
        check_static_batch(g, (torch.randn(8, 4),), "calibration batch 0")
    assert err.value.message == "opaque node '/blk/Weird_0' (op type 'Weird', from onnx) has no torch implementation"
    check_static_batch(g, (torch.randn(1, 4),), "calibration batch 0")  # the declared batch: nothing to try


class _Back(nn.Module):
    """A strided stem, then tokens through a linear layer and back to a map of the stem's H and W: past the stem no
    tensor has the input's H or W as they are, yet the reshape back computes the stem's from them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc, self.c = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        b, c, h, w = y.shape
        t = torch.relu(self.fc(y.flatten(2).transpose(1, 2)))
        return self.c(t.transpose(1, 2).reshape(b, c, h, w))


@pytest.mark.parametrize("policy", ["trim { criterion = l1, ratio = 50% }", "squeeze_fold { ratio = 50% }",
                                    "budget params <= 70%\n  trim { criterion = l1 }"])
def test_passes_that_run_the_model_layer_by_layer_read_dynamic_dims_from_the_inputs(policy: str) -> None:
    """The refit and the loss measurements run the model from a checkpoint past the stem, where no live tensor
    carries H or W; the segments get the inputs' sizes (shape-only stand-ins). It was a PassError on a KeyError
    ('H'), as on HF's SegFormer and wav2vec2 (a mask's arithmetic on the sequence length)."""
    torch.manual_seed(0)
    m = _Back().eval()
    model = _onnx(m, torch.randn(2, 3, 16, 12), {"x": {0: "batch", 2: "H", 3: "W"}, "y": {0: "batch", 2: "H", 3: "W"}})
    calib = torch.randn(32, 3, 16, 12)
    res = ns.compile(model, f"policy p {{\n  calibrate samples 32, batch 8\n  {policy}\n}}\n",
                     example_inputs=(calib[:2],), calibration=calib, progress=False)
    assert res.graph.node("x").attrs["dims"] == ("batch", None, "H", "W")
    x = torch.randn(3, 3, 20, 10)  # other sizes: the dims stay dynamic
    with torch.no_grad():
        y = res.model(x)
        err = float((y - m(x)).norm() / m(x).norm())
    assert tuple(y.shape) == (3, 4, 10, 5) and err < 0.5


def test_calibration_at_other_sizes_of_a_dynamic_dim_names_the_dims() -> None:
    _, model = _exported()  # x: [batch, 3, H, W], the example 16 x 12
    calib = torch.randn(8, 3, 20, 12)
    with pytest.raises(ns.InputMismatchError) as err:
        ns.compile(model, "policy p {\n  trim { ratio = 25% }\n}\n", example_inputs=(torch.randn(2, 3, 16, 12),),
                   calibration=calib, progress=False)
    assert err.value.message == (
        "calibration batch 0: input 'x' has shape [8, 3, 20, 12] but the model expects [N, 3, H = 16, W = 12] ('H', "
        "'W' are dynamic, but calibration batches take the example inputs' sizes there)")


class _ClassToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))


def test_a_class_token_expanded_to_a_batch_analysed_at_1_keeps_the_batch_dynamic() -> None:
    """Without example inputs a dynamic batch is analysed at 1; broadcast with the class token's fixed 1 in its
    Expand it stayed 1, and the model ran at batch 1 only (HF's ViT through `netsqueeze compile`)."""
    torch.manual_seed(0)
    m = _ClassToken().eval()
    g = from_onnx(_onnx(m, torch.randn(2, 4, 8), {"x": {0: "batch"}, "y": {0: "batch"}}))
    y = g.node("y").meta[0].shape
    assert is_dynamic(y[0]) and str(expr_of(y[0])) == "batch" and tuple(int(d) for d in y) == (1, 5, 8)
    x = torch.randn(5, 4, 8)
    with torch.no_grad():
        assert torch.allclose(to_torch(g)(x), m(x), atol=1e-5)
    assert run(to_onnx(g), x.numpy())[0].shape == (5, 5, 8)
