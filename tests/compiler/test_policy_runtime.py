"""Policy features that act at compile time: calibration files, per-node bounds, located pass errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import netsqueeze as ns
from tests.zoo import ZOO


def test_calibrate_data_is_loaded_relative_to_the_policy(tmp_path: Path) -> None:
    model, inputs = ZOO["mlp"]()
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((64, 20), dtype=np.float32))
    pol = tmp_path / "p.sqz"
    pol.write_text('policy p {\n  calibrate data "calib.npz", samples 64\n  squeeze_fold { ratio = 25% }\n}\n')
    res = ns.compile(model, pol, example_inputs=inputs)
    assert res.graph.node("fc1").params["weight"].shape == (24, 20)


def test_bounds_on_a_node_limit_trim(tmp_path: Path) -> None:
    model, inputs = ZOO["mlp"]()
    pol = tmp_path / "b.sqz"
    pol.write_text("policy b {\n  bounds { max_ratio = 50% }\n  bounds on fc1 { max_ratio = 0% }\n"
                   "  trim { ratio = 50% }\n}\n")
    res = ns.compile(model, pol, example_inputs=inputs)
    assert res.graph.node("fc1").params["weight"].shape == (32, 20)  # fc1 may lose nothing
    assert res.graph.node("fc2").params["weight"].shape == (8, 32)  # fc2 follows the global bound


def test_budget_failure_inside_a_pass_points_at_its_invocation(tmp_path: Path) -> None:
    model, inputs = ZOO["mlp"]()
    pol = tmp_path / "t.sqz"
    pol.write_text("policy t {\n  budget flops <= 1%\n  trim on type(linear) { criterion = l1 }\n}\n")
    with pytest.raises(ns.PassError) as e:
        ns.compile(model, pol, example_inputs=inputs)
    text = str(e.value)
    assert isinstance(e.value, ns.BudgetError)  # where it failed (PassError) and what (BudgetError)
    assert text.startswith(f"{pol}:3:3: error: pass 'trim' ({pol}:3) failed: trim cannot meet the budget")
    assert "  trim on type(linear) { criterion = l1 }\n    ^" in text
