"""The JSON report (schema netsqueeze.report/1): round trip, exact totals, the search trajectory, errors."""

from __future__ import annotations

import json

import pytest
import torch

import netsqueeze as ns
from netsqueeze.compiler.report import CompileReport
from netsqueeze.compiler.report_json import SCHEMA
from netsqueeze.errors import NetsqueezeError
from tests.zoo import ZOO

POLICY = """policy p {
  budget flops <= 60%
  guard output error <= 30%
  squeeze_fold on type(linear)
}"""


@pytest.fixture(scope="module")
def result() -> ns.CompileResult:
    model, inputs = ZOO["mlp"]()
    calib = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    return ns.compile(model, POLICY, example_inputs=inputs, calibration=calib, progress=False)


def test_round_trip_keeps_every_field(result: ns.CompileResult) -> None:
    rep = result.report
    text = rep.to_json()
    back = CompileReport.from_json(text)
    assert back.to_dict() == rep.to_dict()
    assert back.format() == rep.format()
    assert json.loads(back.to_json()) == json.loads(text)


def test_schema_keys_and_exact_totals(result: ns.CompileResult) -> None:
    rep = result.report
    d = json.loads(rep.to_json())
    assert d["schema"] == SCHEMA == "netsqueeze.report/1"
    assert set(d) == {"schema", "model", "frontend", "target", "policy_hash", "plan", "totals", "before", "after",
                      "passes", "times", "fidelity", "notes", "storage", "budget", "guard", "search", "latency",
                      "calibration_passes"}
    assert d["totals"]["before"] == {"params": rep.before.params, "flops": rep.before.flops,
                                     "bytes": rep.before.param_bytes, "nonzeros": rep.before.nonzeros}
    assert d["totals"]["after"]["flops"] == rep.after.flops <= 0.6 * rep.before.flops
    assert [p["name"] for p in d["passes"]] == ["squeeze_fold"]
    assert len(d["after"]["nodes"]) == len(rep.after.nodes)
    assert d["budget"] == {"flops": 0.6} and d["guard"] == {"metric": "output_error", "limit": 0.3}


def test_search_trajectory_holds_the_measured_candidates(result: ns.CompileResult) -> None:
    search = result.report.to_dict()["search"]
    assert len(search) >= 2
    assert {s["pass"] for s in search} == {"squeeze_fold"} and {s["metric"] for s in search} == {"output_error"}
    # the final graph is one of the candidates the guard accepted, or smaller still by nothing: its FLOPs
    # are those of a measured candidate whose error is within the guard
    ok = [s for s in search if s["value"] <= 0.3]
    assert ok and min(s["flops"] for s in ok) <= result.report.after.flops


def test_nan_is_written_as_null_and_read_back(result: ns.CompileResult) -> None:
    rep = CompileReport.from_json(result.report.to_json())
    rep.fidelity["output_error"] = float("nan")
    d = json.loads(rep.to_json())
    assert d["fidelity"]["output_error"] is None
    assert CompileReport.from_json(rep.to_json()).fidelity["output_error"] != 0.0


def test_not_a_report_is_a_clear_error() -> None:
    with pytest.raises(NetsqueezeError, match=r"not a netsqueeze report: schema is 'x/2', expected 'netsqueeze.report/1'"):
        CompileReport.from_json('{"schema": "x/2"}')
    with pytest.raises(NetsqueezeError, match=r"invalid JSON at line 1, column 2"):
        CompileReport.from_json("{oops")
    with pytest.raises(NetsqueezeError, match=r"missing the key 'model'"):
        CompileReport.from_json(json.dumps({"schema": SCHEMA, "passes": [], "guard": None}))
