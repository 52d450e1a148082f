"""`budget nonzeros <= …` (ratio or absolute count) drives net_trim's ε search, the compile checks it, and an
unreachable one is a located BudgetError stating what the largest ε kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3)).eval(), torch.randn(120, 12, generator=g)


def _compile(budget: str) -> ns.CompileResult:
    m, x = _model()
    pol = f"policy p {{\n  budget {budget}\n  net_trim on type(linear) {{ solver = admm }}\n}}\n"
    return ns.compile(m, pol, example_inputs=(x[:4],), calibration=[x], executor="local")


@pytest.mark.parametrize("budget", ["nonzeros <= 60%", "nonzeros <= 0.25K"])
def test_a_nonzeros_budget_is_met(budget: str) -> None:
    res = _compile(budget)
    before, after = res.report.before.nonzeros, res.report.after.nonzeros
    limit = 0.6 * before if budget.endswith("%") else 250
    assert after <= limit < before  # 12·24 + 24 + 24·3 + 3 = 387 non-zeros before
    assert before == 387
    assert any("ε search: epsilon = " in n for r in res.report.passes for n in r.result.notes)


def test_an_unreachable_nonzeros_budget_is_located() -> None:
    with pytest.raises(ns.BudgetError) as e:
        _compile("nonzeros <= 1%")
    assert "net_trim cannot meet the budget nonzeros <= 1.0%: epsilon = 50% keeps " in str(e.value)
