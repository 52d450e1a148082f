"""Sparse weights at emission: `compile(sparse="csr")` gives torch linear layers holding a `torch.sparse_csr`
weight (same outputs as the dense-with-zeros layers within float rounding), `sparse="dense"` writes dense
ONNX initializers, the default keeps ONNX `sparse_initializer`s."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.torch_modules import SparseLinear
from netsqueeze.errors import NetsqueezeError

POLICY = "policy p { prune on type(linear) { sparsity = 80% } }"


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).eval(), torch.randn(8, 20)


def test_csr_layers_hold_the_nonzeros_and_match_dense() -> None:
    m, x = _model()
    dense = ns.compile(m, POLICY, example_inputs=(x,))
    # a static batch (`dynamic_shapes={}`): the module then has no rank check, and is called with a leading dim
    csr = ns.compile(m, POLICY, example_inputs=(x,), sparse="csr", dynamic_shapes={})
    layers = [mod for mod in csr.model.modules() if isinstance(mod, SparseLinear)]
    assert len(layers) == 2
    assert [lay.weight.layout for lay in layers] == [torch.sparse_csr] * 2
    # 80% of 20·64 and of 64·5 weights pruned: 256 and 64 non-zeros kept
    assert [int(lay.weight.values().numel()) for lay in layers] == [256, 64]
    with torch.no_grad():
        a, b = dense.model(x), csr.model(torch.cat([x, x]).reshape(2, 8, 20))
    assert b.shape == (2, 8, 5)
    assert torch.allclose(b[0], a, atol=1e-6) and torch.allclose(b[1], a, atol=1e-6)


def test_onnx_dense_or_sparse_initializers() -> None:
    m, x = _model()
    default = ns.compile(m, POLICY, example_inputs=(x,), target="onnx").model
    dense = ns.compile(m, POLICY, example_inputs=(x,), target="onnx", sparse="dense").model
    assert len(default.graph.sparse_initializer) == 2 and len(dense.graph.sparse_initializer) == 0
    s = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = ns.compile(m, POLICY, example_inputs=(x,)).model(x).numpy()
    assert np.abs(y - ref).max() < 1e-5


def test_bad_sparse_option() -> None:
    m, x = _model()
    with pytest.raises(NetsqueezeError, match="unknown sparse 'coo'"):
        ns.compile(m, POLICY, example_inputs=(x,), sparse="coo")  # type: ignore[arg-type]


def test_cli_sparse_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from netsqueeze.cli import main

    src = tmp_path / "net.py"
    src.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).eval(), "
                   "(torch.randn(8, 20),)\n")
    pol = tmp_path / "p.sqz"
    pol.write_text(POLICY + "\n")
    out = tmp_path / "small.onnx"
    assert main(["compile", f"{src}:build", "-p", str(pol), "-o", str(out), "--sparse", "dense", "--quiet"]) == 0
    import onnx

    assert len(onnx.load(str(out)).graph.sparse_initializer) == 0


def test_report_lists_nonzeros_per_layer() -> None:
    m, x = _model()
    text = str(ns.compile(m, POLICY, example_inputs=(x,)).report)
    assert "non-zeros'" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("0 ", "2 "))}
    assert rows["0"][-1] == "320" and rows["2"][-1] == "69"  # kept weights + the dense biases (64, 5)
