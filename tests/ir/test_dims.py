"""Symbolic dims: a dynamic dim is its example size everywhere and carries its expression, so both
backends emit models that run at other sizes of it, and reject shapes they cannot handle."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.ir.dims import Dim, evaluate, fmt, is_dynamic
from netsqueeze.ir.graph import Graph
from tests.frontends.onnx_models import run


def test_dim_is_its_value_and_carries_its_expression() -> None:
    b, h = Dim.named("batch", 2), Dim.named("H", 9)
    out = (h + 2 - 3) // 2 + 1  # a stride-2 conv, kernel 3, padding 1
    assert out == 5 and isinstance(out, Dim) and evaluate(out, {"H": 16}) == 8
    assert b * 3 == 6 and str(b * 3) == "6" and fmt((b * 3, 4)) == "3*batch, 4"
    assert h - h == 0 and not isinstance(h - h, Dim)  # a constant expression is a plain int again
    assert hash(b) == hash(2) and list(range(b)) == [0, 1] and torch.zeros(b, 3).shape == (2, 3)
    assert pickle.loads(pickle.dumps(out)).expr == out.expr and copy.deepcopy(out) is out
    assert not is_dynamic(4) and is_dynamic(b)


def _graph() -> tuple[Graph, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    p = {"w": torch.randn(4, 3, 3, 3) * 0.3, "lw": torch.randn(5, 4) * 0.3}
    g = Graph("dyn")
    g.add_node("x", "input", attrs={"shape": (2, 3, 9, 7), "dims": ("batch", None, "H", "W")})
    g.add_node("conv", "conv", ["x"], attrs={"stride": [2, 2], "padding": [1, 1, 1, 1], "dilation": [1, 1]},
               params={"weight": p["w"]})
    g.add_node("seq", "reshape", ["conv"], attrs={"shape": (0, 4, -1)})  # [batch, 4, H'·W']
    g.add_node("tok", "transpose", ["seq"], attrs={"perm": (0, 2, 1)})  # [batch, H'·W', 4]
    g.add_node("fc", "linear", ["tok"], params={"weight": p["lw"]})
    g.add_node("merged", "reshape", ["fc"], attrs={"shape": (-1, 5)})  # [batch·H'·W', 5]
    g.add_node("out", "output", ["merged"])
    g.infer_shapes()
    g.verify()
    return g, p


def _reference(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(x, p["w"], stride=2, padding=1)
    return F.linear(y.flatten(2).transpose(1, 2), p["lw"]).reshape(-1, 5)


def test_shapes_are_symbolic() -> None:
    g, _ = _graph()
    assert g.node("merged").meta[0].symbolic() == \
        "float32[batch*(floor(H/2 - 1/2) + 1)*(floor(W/2 - 1/2) + 1), 5]"
    assert str(g.node("merged").meta[0]) == "float32[40, 5]"  # the example sizes


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (3, 3, 16, 10), (1, 3, 5, 12)])
def test_both_backends_run_at_other_sizes(shape: tuple[int, ...]) -> None:
    g, p = _graph()
    x = torch.randn(*shape)
    ref = _reference(p, x)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(g)(x), ref, atol=1e-5, rtol=1e-5)
    m = to_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "H", "W"]
    (y,) = run(m, x.numpy())
    assert np.abs(y - ref.numpy()).max() < 1e-5


def test_torch_model_rejects_a_shape_it_cannot_handle() -> None:
    g, _ = _graph()
    with pytest.raises(Exception, match=r"input 'x' axis 1 must be 3 \(shape \[batch, 3, H, W\]\)"):
        to_torch(g)(torch.randn(2, 4, 9, 7))
    with pytest.raises(Exception, match=r"input 'x' must have rank 4"):
        to_torch(g)(torch.randn(3, 9, 7))


def test_opaque_aten_call_with_dynamic_sizes_runs_at_other_sizes() -> None:
    """An aten call left opaque whose arguments hold a dynamic size (view(x, [batch, -1])) gets the size at
    run time in torch and is written as a Reshape of computed sizes in ONNX."""
    from netsqueeze.ir.calls import AtenCall, Slot
    from netsqueeze.ir.graph import Origin, TensorMeta

    g = Graph("v")
    g.add_node("x", "input", attrs={"shape": (2, 3, 4), "dims": ("batch", None, None)})
    batch = g.node("x")
    g.infer_shapes()
    b = batch.meta[0].shape[0]
    call = AtenCall("aten", "view", "default", (Slot(0), [b, -1]))
    g.add_node("v", "opaque", ["x"], origin=Origin("fx", "v", "aten::view.default", call))
    g.node("v").meta = [TensorMeta((b, 12))]
    g.add_node("out", "output", ["v"])
    g.infer_shapes()
    module, model = to_torch(g), to_onnx(g)
    for n in (2, 5):
        x = torch.randn(n, 3, 4)
        with torch.no_grad():
            assert torch.equal(module(x), x.reshape(n, 12))
        assert np.array_equal(run(model, x.numpy())[0], x.reshape(n, 12).numpy())
