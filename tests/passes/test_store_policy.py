"""The policy's `store` statement: the compile encodes the compressed model file as `compile(store=)` does,
`compile(store=)` overrides it, and `netsqueeze compile -o model.nsq` writes a file `netsqueeze.load` reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.errors import NetsqueezeError


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), torch.randn(16, 12)


BODY = "prune on type(linear) { sparsity = 75% }\n share_weights { method = cws, k = 8 }\n"


def test_policy_store_encodes_the_file_and_load_is_bit_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m, x = _model()
    res = ns.compile(m, f"policy s {{ {BODY} store {{ format = ham }} }}", example_inputs=(x,), calibration=[x])
    assert res.stored is not None and res.report.storage["psi"] < 0.25
    same = ns.compile(m, f"policy s {{ {BODY} }}", example_inputs=(x,), calibration=[x], store="ham")
    assert res.stored == same.stored  # the policy setting and the argument write the same bytes
    res.save(tmp_path / "m.nsq")
    with torch.no_grad():
        assert torch.equal(ns.load(tmp_path / "m.nsq")(x), res.model(x))


def test_compile_argument_overrides_the_policy() -> None:
    m, x = _model()
    res = ns.compile(m, f"policy s {{ {BODY} store {{ format = ham }} }}", example_inputs=(x,), calibration=[x],
                     store="csr")
    csr = ns.compile(m, f"policy s {{ {BODY} }}", example_inputs=(x,), calibration=[x], store="csr")
    assert res.stored == csr.stored


def test_no_store_no_file() -> None:
    m, x = _model()
    res = ns.compile(m, f"policy s {{ {BODY} }}", example_inputs=(x,), calibration=[x])
    assert res.stored is None


def test_bad_format_is_the_checkers_message() -> None:
    m, x = _model()
    with pytest.raises(NetsqueezeError) as e:
        ns.compile(m, "policy s { store { format = zip } }", example_inputs=(x,))
    assert "format" in str(e.value) and "'sham'" in str(e.value) and "<policy>:1:" in str(e.value)


def test_cli_writes_the_compressed_model_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from netsqueeze.cli import main

    src = tmp_path / "net.py"
    src.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), "
                   "(torch.randn(16, 12),)\n")
    pol = tmp_path / "p.sqz"
    pol.write_text(f"policy s {{\n {BODY} store {{ format = csr }}\n}}\n")
    out = tmp_path / "small.nsq"
    assert main(["compile", f"{src}:build", "-p", str(pol), "-o", str(out), "--quiet"]) == 0
    m, x = _model()
    ref = ns.compile(m, f"policy s {{ {BODY} }}", example_inputs=(torch.randn(16, 12),), store="csr")
    assert out.read_bytes() == ref.stored  # the policy's csr format, the same bytes as the Python API
    with torch.no_grad():
        assert torch.equal(ns.load(out)(x), ref.model(x))


def test_a_quantized_model_saves_and_loads_bit_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """quantize's activation pairs hold plain integer zero points (`uint8[] 135` in the IR text), which the
    parser read as encoded weights, so a saved quantized model could not be loaded."""
    m, x = _model()
    res = ns.compile(m, "policy q { quantize\n store { format = sham } }", example_inputs=(x,), calibration=[x])
    zero_points = [n.params["zero_point"] for n in res.graph.nodes() if n.kind == "quantize"]
    assert zero_points and all(z.dtype in (torch.int8, torch.uint8) and z.dim() == 0 for z in zero_points)
    res.save(tmp_path / "q.nsq")
    with torch.no_grad():
        assert torch.equal(ns.load(tmp_path / "q.nsq")(x), res.model(x))
