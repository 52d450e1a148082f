"""Torch models with dynamic dims declared in torch.export's own form: compiled, trimmed and emitted, they
run at other sizes of those dims in torch and in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.export import Dim

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx
from tests.frontends.onnx_models import run


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.flatten(2).transpose(1, 2)).reshape(x.shape[0], -1)


def test_compile_with_dynamic_shapes_runs_at_other_sizes() -> None:
    torch.manual_seed(0)
    m = Tokens().eval()
    x = torch.randn(2, 3, 16, 12)
    dyn = {"x": {0: Dim("batch"), 2: Dim("H", min=4), 3: Dim("W", min=4)}}
    r = ns.compile(m, "policy p {\n  fold_bn\n  trim { criterion = l1, ratio = 50% }\n}\n", example_inputs=(x,),
                   dynamic_shapes=dyn)
    assert r.graph.node("x").meta[0].symbolic() == "float32[batch, 3, H, W]"
    out = to_onnx(r.graph)
    for shape in [(2, 3, 16, 12), (3, 3, 20, 8), (1, 3, 9, 30)]:
        xs = torch.randn(*shape)
        with torch.no_grad():
            y = r.model(xs).numpy()
        assert y.shape == (shape[0], 5 * ((shape[2] + 1) // 2) * ((shape[3] + 1) // 2))
        assert np.abs(run(out, xs.numpy())[0] - y).max() < 1e-5
    # without the trim the emitted model is the original at every size
    r0 = ns.compile(m, "policy p { fold_bn }", example_inputs=(x,), dynamic_shapes=dyn)
    xs = torch.randn(3, 3, 20, 8)
    with torch.no_grad():
        assert np.abs(r0.model(xs).numpy() - m(xs).numpy()).max() < 1e-5


class SpaceToDepth(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def test_dynamic_shapes_torch_export_refuses_are_an_error_with_its_suggestion_not_a_static_capture() -> None:
    """torch.export wants H = 2*h here: a plain Dim("H") is refused, and the capture says so with torch's suggested
    declaration, where it used to fall back to symbolic_trace with every dim fixed (wrong shapes at 10x12)."""
    import pytest

    from netsqueeze.errors import CaptureError

    x = torch.randn(2, 3, 6, 8)
    with pytest.raises(CaptureError) as e:
        ns.import_model(SpaceToDepth(), (x,), dynamic_shapes={"x": {0: Dim("batch"), 2: Dim("H"), 3: Dim("W")}})
    assert e.value.diagnostics[0].message.startswith(
        "cannot capture SpaceToDepth with the given dynamic_shapes: torch.export refuses them (UserError: "
        "Constraints violated (H, W)!")
    assert e.value.diagnostics[0].notes == (
        "torch.export suggests: _H = Dim('_H', max=oo); _W = Dim('_W', max=oo); H = 2*_H; W = 2*_W",)


def test_following_that_suggestion_is_an_error_not_a_silent_static_capture() -> None:
    """torch.export's suggestion declares derived dims (H = 2*_H): the capture analysed them at the example and
    emitted a model fixed at 6 x 8 without a word; it says so instead."""
    import pytest

    from netsqueeze.errors import CaptureError

    h, w = Dim("_H", max=64), Dim("_W", max=64)
    x = torch.randn(2, 3, 6, 8)
    with pytest.raises(CaptureError) as e:
        ns.import_model(SpaceToDepth(), (x,), dynamic_shapes={"x": {0: Dim("batch"), 2: 2 * h, 3: 2 * w}})
    assert e.value.diagnostics[0].message == ("input 'x' axis 2 is a derived dim (2*_H); netsqueeze keeps plain dims "
                                              "dynamic only")


class Ends(nn.Module):
    """Slices and picks counted from a dynamic dim's end, or running to it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x[:, :, 2:], x[:, :, 1:-1, 2:], x[:, :, ::2, 1::2], x[:, :, -2:], x[-1:], x[:, :, -1], x[-1]


def test_slices_to_the_end_and_negative_picks_follow_a_dynamic_dim() -> None:
    """`x[:, :, 2:]` ran to the example's end (6) at every size, `x[:, :, -1]` picked the example's last row: both
    now follow the dim, in torch and in ONNX Runtime."""
    import onnxruntime as ort

    from netsqueeze.backends.torch import to_torch

    m = Ends()
    g = ns.import_model(m, (torch.randn(2, 3, 6, 8),),
                        dynamic_shapes={"x": {0: Dim("batch"), 2: Dim("H", min=4), 3: Dim("W", min=4)}})
    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 6, 8), (3, 3, 10, 12), (4, 3, 5, 7)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[2]))
        want = m(x)
        got = to_torch(g)(x)
        onnx = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        for w, t, o in zip(want, got, onnx):
            assert t.shape == w.shape and o.shape == tuple(w.shape)
            torch.testing.assert_close(t, w, rtol=0, atol=0)
            np.testing.assert_array_equal(o, w.numpy())


def test_a_dynamic_dim_whose_example_is_1_is_refused_with_a_hint() -> None:
    """torch.export fixes a dim whose example is 1 (it used to be captured static without a word)."""
    import pytest

    from netsqueeze.errors import CaptureError

    with pytest.raises(CaptureError) as e:
        ns.import_model(nn.Sequential(nn.Linear(4, 3)), (torch.randn(1, 4),), dynamic_shapes={"input": {0: Dim("batch")}})
    assert e.value.diagnostics[0].notes == (
        "torch.export suggests: batch = 1",
        "the example is 1 at input 0 axis 0: torch.export fixes a dim whose example is 0 or 1; give an example of 2 "
        "or more there")


def test_the_demo_model_captures_with_the_demos_dynamic_batch() -> None:
    """`make demo` compiles examples/digits with a declared dynamic batch (CI does not run the demo: this is its
    capture)."""
    import importlib.util
    from pathlib import Path

    from netsqueeze.ir.dims import is_dynamic

    path = Path(__file__).resolve().parents[2] / "examples" / "digits" / "model.py"
    spec = importlib.util.spec_from_file_location("digits_model", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, example = mod.build()
    g = ns.import_model(model, example, dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}})
    assert is_dynamic(g.node("x").meta[0].shape[0])


class LiteralRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1) * 1


def test_a_literal_reshape_size_stays_literal_where_the_example_batch_equals_it() -> None:
    """`reshape(2, -1)` of a (2, 2, 3) example became flatten (dim 0 copied), so at batch 4 it gave (4, 6) where
    torch gives (2, 12)."""
    from netsqueeze.backends.torch import to_torch

    g = ns.import_model(LiteralRows(), (torch.randn(2, 2, 3),))
    x = torch.randn(4, 2, 3)
    assert to_torch(g)(x).shape == LiteralRows()(x).shape == (2, 12)
    torch.testing.assert_close(to_torch(g)(x), LiteralRows()(x), rtol=0, atol=0)
