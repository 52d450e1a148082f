"""torch.ao quantized modules keep their weights packed: they stay opaque, run as they are, and the
report says so (instead of counting them as weightless layers in silence)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import netsqueeze as ns


def test_dynamic_quantized_linears_stay_opaque_with_a_note() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 8)
    r = ns.compile(q, "policy p { }", example_inputs=(x,))
    ops = [(n.kind, n.origin.op_type if n.kind == "opaque" else "") for n in r.graph.nodes()
           if n.kind not in ("input", "output")]
    ao = ("opaque", "torch.ao.nn.quantized.dynamic.modules.linear.Linear")
    assert ops == [ao, ("relu", ""), ao]
    assert r.report.notes[0] == (
        "'0' is a torch.ao quantized module (torch.ao.nn.quantized.dynamic.modules.linear.Linear): it stays "
        "opaque, its packed weights are not counted and no pass changes it; compile the float model (or its "
        "ONNX QDQ export, whose int8 weights netsqueeze reads) to compress it")
    assert len(r.report.notes) == 2 and "note: '0' is a torch.ao quantized module" in str(r.report)
    assert torch.equal(r.model(x), q(x))
