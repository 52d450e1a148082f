"""The routes through ONNX: torch→onnx, torch's ONNX export→IR→onnx, onnx→torch, on the zoo and the light models."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import UnsupportedOpError
from netsqueeze.frontends.fx import from_torch
from netsqueeze.frontends.onnx import from_onnx
from tests.frontends.onnx_models import (
    LIGHT_PARAMS,
    light_path,
    light_reference,
    randomized,
    randomized_reference,
    run,
    sha256,
)
from tests.zoo import ZOO

# The zoo's model with an op the IR does not know has no ONNX form (torch cannot export aten::erfinv either).
EXPORTABLE = [n for n in ZOO if n != "unknown_op"]


def _reference(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], np.ndarray]:
    model, inputs = ZOO[name]()
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    return model, inputs, ref.numpy()


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
            assert prog is not None
            return prog.model_proto
        f = io.BytesIO()
        torch.onnx.export(model, inputs, f, dynamo=False, opset_version=17)
        return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize("name", EXPORTABLE)
def test_torch_to_onnx(name: str) -> None:
    model, inputs, ref = _reference(name)
    m = to_onnx(from_torch(model, inputs))
    onnx.checker.check_model(m, full_check=True)
    out = run(m, *[x.numpy() for x in inputs])[0]
    assert np.abs(out - ref).max() < 1e-4


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", EXPORTABLE)
def test_torch_export_round_trips_through_ir(name: str, dynamo: bool) -> None:
    model, inputs, ref = _reference(name)
    exported = _export(model, inputs, dynamo)
    g = from_onnx(exported)
    assert g.by_kind("opaque") == [], [n.origin.op_type for n in g.by_kind("opaque")]
    feeds = [x.numpy() for x in inputs]
    again = to_onnx(g)
    onnx.checker.check_model(again, full_check=True)
    assert np.abs(run(again, *feeds)[0] - run(exported, *feeds)[0]).max() < 1e-4
    # onnx→torch
    with torch.no_grad():
        out = to_torch(g)(*inputs)
    assert np.abs(out.numpy() - ref).max() < 1e-4


def test_unknown_torch_op_to_onnx_names_node_and_op() -> None:
    model, inputs = ZOO["unknown_op"]()
    g = from_torch(model, inputs)
    with pytest.raises(UnsupportedOpError) as e:
        to_onnx(g)
    # cumsum has an ONNX translation (CumSum); erfinv has none
    node = next(n for n in g.by_kind("opaque") if "erfinv" in n.origin.op_type)
    assert e.value.message == (f"node '{node.id}' is an opaque fx op ({node.origin.op_type}) with no ONNX equivalent")


def test_opaque_onnx_op_to_torch_is_an_error() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])
    node = onnx.helper.make_node("Hardmax", ["x"], ["y"], name="hm")
    m = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]),
                               opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError) as e:
        to_torch(from_onnx(m))
    assert "'hm'" in e.value.message and "Hardmax" in e.value.message
    assert e.value.diagnostics[0].node == "hm"


# The three big ones (240-550 MB of weights) only check the stored output here; their random-weight
# round trip runs in ORT (tests/frontends/test_onnx_light.py) and their ops are covered by the others.
BIG = {"bvlc_alexnet", "vgg19", "zfnet512"}


@pytest.mark.parametrize("name", LIGHT_PARAMS)
def test_light_model_to_torch(name: str) -> None:
    # Shipped weights: the stored reference output (and the file is never modified).
    before = sha256(light_path(name))
    g = from_onnx(light_path(name))
    assert sha256(light_path(name)) == before
    ref = light_reference(name)
    shape = g.node(g.inputs[0]).attrs["shape"]
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    module = to_torch(g)
    with torch.no_grad():
        out = module(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4
    if name in BIG:
        return
    # Random weights: the ORT output of the original graph.
    model = randomized(light_path(name))
    x, orig = randomized_reference(name, model)
    g = from_onnx(model)
    with torch.no_grad():
        out = to_torch(g)(torch.from_numpy(x)).numpy()
    err = float(np.abs(out - orig).max())
    assert err < 1e-4, f"{name}: onnx→torch max abs error {err}"
