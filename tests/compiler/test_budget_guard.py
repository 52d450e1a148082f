"""A budget or guard the compiled model misses is a `BudgetError` located at the policy line that set
it, with the source line, a caret under the whole item, and what the pipeline reached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import netsqueeze as ns
from netsqueeze.compiler.plan import Guard, resolve
from netsqueeze.dsl import parse_policy
from netsqueeze.errors import percent
from netsqueeze.passes.registry import all_passes
from tests.zoo import ZOO

TIGHT = """\
policy tight {
  input x: float32[4, 20]
  budget flops <= 80%, params <= 10%
  dead_code
}
"""

GUARDED = """\
param r = 50%

policy guarded {
  budget params <= 90%
  guard output error <= 0.1%
  trim on fc1 { criterion = l1, ratio = r }
}
"""


def _calibration() -> torch.Tensor:
    return torch.randn(200, 20, generator=torch.Generator().manual_seed(0))


def test_budget_not_met_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("tight.sqz").write_text(TIGHT)
    model, inputs = ZOO["mlp"]()
    with pytest.raises(ns.BudgetError) as e:
        ns.compile(model, "tight.sqz", example_inputs=inputs)
    assert str(e.value) == (
        "tight.sqz:3:10: error: budget flops <= 80.0% not met: the pipeline reached 100.0% (10,452 of 10,452 flops)\n"
        "    budget flops <= 80%, params <= 10%\n"
        "           ^~~~~~~~~~~~\n"
        "tight.sqz:3:24: error: budget params <= 10.0% not met: the pipeline reached 100.0% (1,285 of 1,285 params)\n"
        "    budget flops <= 80%, params <= 10%\n"
        "                         ^~~~~~~~~~~~~"
    )


def test_guard_not_met_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("guarded.sqz").write_text(GUARDED)
    model, inputs = ZOO["mlp"]()
    with pytest.raises(ns.BudgetError) as e:
        ns.compile(model, "guarded.sqz", example_inputs=inputs, calibration=_calibration())
    assert str(e.value) == (
        "guarded.sqz:5:9: error: guard output error <= 0.10% not met: reached 37.53%\n"
        "    guard output error <= 0.1%\n"
        "          ^~~~~~~~~~~~~~~~~~~~"
    )
    # the same policy with a guard it can meet compiles, and the budget holds
    res = ns.compile(model, GUARDED.replace("0.1%", "60%"), example_inputs=inputs, calibration=_calibration())
    assert res.report.fidelity["output_error"] == pytest.approx(0.3753, abs=1e-4)
    assert res.report.after.params <= 0.9 * res.report.before.params


def test_a_guard_under_a_hundredth_of_a_percent_reads_as_written() -> None:
    """`guard output error <= 0.001%` was shown as "<= 0.00%"; values under 0.01% keep three significant digits."""
    model, inputs = ZOO["mlp"]()
    with pytest.raises(ns.BudgetError) as e:
        ns.compile(model, GUARDED.replace("0.1%", "0.001%"), example_inputs=inputs, calibration=_calibration())
    assert e.value.diagnostics[0].message == "guard output error <= 0.001% not met: reached 37.53%"
    assert [percent(x) for x in (0.0, 2.5e-5, 1e-4, 0.3753, float("nan"))] == ["0.00%", "0.0025%", "0.01%", "37.53%",
                                                                              "nan%"]


def test_guard_that_cannot_be_measured_is_located() -> None:
    model, inputs = ZOO["mlp"]()
    text = "policy p {\n  guard top1 drop <= 1%\n  dead_code\n}\n"
    with pytest.raises(ns.BudgetError) as e:
        ns.compile(model, text, example_inputs=inputs)
    assert str(e.value) == (
        "<policy>:2:9: error: guard top1 drop cannot be measured: pass eval_fn=... to compile()\n"
        "    guard top1 drop <= 1%\n"
        "          ^~~~~~~~~~~~~~~"
    )


def test_plan_keeps_budget_and_guard_spans() -> None:
    model, inputs = ZOO["mlp"]()
    plan = resolve(parse_policy(GUARDED, "g.sqz"), ns.import_model(model, inputs), all_passes())
    span = plan.budget_spans["params"]
    assert (str(span), span.end_col) == ("g.sqz:4:10", 23)
    assert plan.guard is not None and plan.guard.span is not None
    assert (str(plan.guard.span), plan.guard.span.end_col) == ("g.sqz:5:9", 29)
    # spans do not take part in equality
    assert plan.guard == Guard("output_error", 0.001)
