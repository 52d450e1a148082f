"""A fold fit on fewer calibration rows than a few per coefficient follows the calibration data: the output error
measured on that data (and an `output error` guard) then understates the error on new inputs. The pass and the
compile report say so; with enough rows they say nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns

PASS_NOTE = ("1 fold(s) fit on fewer than 4 calibration rows per coefficient (the fewest: '2', 48 kept channels on "
             "{rows} rows): they follow the calibration data, so the output error measured on it understates the "
             "error on new inputs; calibrate on more samples")
REPORT_NOTE = ("the output error is measured on the calibration data, which 1 fold(s) were fit on with fewer than 4 "
               "rows per coefficient (the passes' notes name them): it understates the error on new inputs{guard}; "
               "calibrate on more samples")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def _compile(stmt: str, samples: int, guard: str = "") -> ns.CompileResult:
    calib = torch.randn(samples, 8, generator=torch.Generator().manual_seed(1))
    policy = f"policy p {{ calibrate samples {samples}, batch 32\n {guard}\n {stmt} }}"
    return ns.compile(_model(), policy, example_inputs=(calib[:2],), calibration=calib, progress=False)


def _error(model: nn.Module, out: object, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = model(x), out(x)  # type: ignore[operator]
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("stmt", ["trim { ratio = 25% }", "trim { ratio = 25%, refit = least_squares }",
                                  "squeeze_fold { ratio = 25% }", "squeeze_fold { ratio = 25%, refit = fold }"])
def test_a_fold_on_fewer_rows_than_four_per_coefficient_is_named_and_the_report_says_its_error_understates(
        stmt: str) -> None:
    res = _compile(stmt, 64)
    notes = [n for r in res.report.passes for n in r.result.notes]
    assert PASS_NOTE.format(rows=64) in notes
    assert REPORT_NOTE.format(guard="") in res.report.notes
    # what the note warns of: 48 kept channels interpolate 64 samples, so the error measured on them is far
    # below the error on new inputs
    new = torch.randn(1024, 8, generator=torch.Generator().manual_seed(2))
    assert res.report.fidelity["output_error"] < 0.5 * _error(_model(), res.model, new)


def test_the_report_says_an_output_error_guard_understates_too() -> None:
    res = _compile("squeeze_fold { ratio = 25% }", 64, guard="guard output error <= 50%")
    assert REPORT_NOTE.format(guard=", and so does the guard") in res.report.notes


@pytest.mark.parametrize("stmt", ["trim { ratio = 25% }", "squeeze_fold { ratio = 25% }"])
def test_with_four_rows_per_coefficient_nothing_is_said(stmt: str) -> None:
    res = _compile(stmt, 196)  # 4 x (48 + 1)
    assert not any("rows per coefficient" in n for r in res.report.passes for n in r.result.notes)
    assert not any("rows per coefficient" in n for n in res.report.notes)
    assert "short_fits" not in res.report.passes[-1].result.metrics


def test_trim_without_a_refit_fits_nothing_and_says_nothing() -> None:
    res = _compile("trim { ratio = 25%, refit = none }", 64)
    assert not any("rows per coefficient" in n for n in res.report.notes)

