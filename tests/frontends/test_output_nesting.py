"""A torch model that returns its outputs in dicts and lists gets them back the same way from the compiled module
(they came back as a flat tuple, keys lost, with no word: `out["logits"]` broke only after compression); ONNX
outputs stay flat and the report says which is which."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import netsqueeze as ns

POLICY = "policy p {\n  trim on a { ratio = 50%, criterion = l2 }\n}\n"


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(20, 32), nn.Linear(32, 4), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.a(x))
        return {"logits": self.b(h), "aux": [self.c(h), self.b(h) * 2]}


class _ListOut(_Heads):
    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.a(x))
        return [self.b(h), self.c(h)]


class _TupleOut(_Heads):
    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.a(x))
        return self.b(h), self.c(h)


X, CAL = torch.randn(4, 20), torch.randn(64, 20, generator=torch.Generator().manual_seed(1))


def test_dict_and_list_outputs_keep_their_nesting() -> None:
    model = _Heads().eval()
    same = ns.compile(model, "policy p { dead_code }", example_inputs=(X,)).model(X)
    ref = model(X)
    assert list(same) == ["logits", "aux"] and isinstance(same["aux"], list) and len(same["aux"]) == 2
    for got, want in ((same["logits"], ref["logits"]), (same["aux"][0], ref["aux"][0]), (same["aux"][1], ref["aux"][1])):
        assert torch.allclose(got, want, atol=1e-6)
    res = ns.compile(model, POLICY, example_inputs=(X,), calibration=CAL)
    out = res.model(X)
    assert res.graph.node("a").params["weight"].shape == (16, 20)
    assert [tuple(out["logits"].shape), [tuple(t.shape) for t in out["aux"]]] == [(4, 4), [(4, 3), (4, 4)]]
    assert torch.allclose(out["aux"][1], 2 * out["logits"], atol=1e-6)


@pytest.mark.parametrize(("model", "kind"), [(_ListOut, list), (_TupleOut, tuple)])
def test_a_list_stays_a_list_and_a_tuple_a_tuple(model: type[nn.Module], kind: type) -> None:
    out = ns.compile(model().eval(), POLICY, example_inputs=(X,), calibration=CAL).model(X)
    assert type(out) is kind and len(out) == 2


def test_onnx_outputs_are_flat_and_the_report_maps_them() -> None:
    res = ns.compile(_Heads().eval(), POLICY, example_inputs=(X,), calibration=CAL, target="onnx")
    assert [o.name for o in res.model.graph.output] == ["output", "output_1", "output_2"]
    assert ("the model nests its outputs; ONNX's are flat, in this order: output = out['logits'], "
            "output_1 = out['aux'][0], output_2 = out['aux'][1]") in res.report.notes
