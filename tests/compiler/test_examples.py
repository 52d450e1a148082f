"""The example policies of examples/*.sqz compiled for real on the zoo models they are written for:
budget and guard met (checked against the numbers in the policy), policy hash and plan in the
report, the emitted module consistent with the report, and `netsqueeze check` / `explain` on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import netsqueeze as ns
from netsqueeze.cli import main
from netsqueeze.compiler.plan import resolve
from netsqueeze.dsl import load_policy
from netsqueeze.passes.registry import all_passes
from tests.zoo import ZOO

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = Path(__file__).with_name("zoo_models.py")
CALIBRATION_SAMPLES = 256

# example -> (zoo model, factory in zoo_models.py)
EXAMPLES = {
    "vgg_edge": ("vgg", "build"),
    "resnet_trim": ("resnet", "resnet"),
    "transformer_ffn": ("transformer", "transformer"),
}


def calibration(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A few hundred random samples shaped like the model's example input (token ids for the transformer)."""
    x = inputs[0]
    g = torch.Generator().manual_seed(0)
    shape = (CALIBRATION_SAMPLES, *x.shape[1:])
    if x.is_floating_point():
        return torch.randn(shape, generator=g)
    return torch.randint(0, 50, shape, generator=g)


def test_every_example_is_covered() -> None:
    assert sorted(p.stem for p in (ROOT / "examples").glob("*.sqz")) == sorted([*EXAMPLES, "demo"])


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_compiles_within_budget_and_guard(example: str) -> None:
    path = str(ROOT / "examples" / f"{example}.sqz")
    model, inputs = ZOO[EXAMPLES[example][0]]()
    res = ns.compile(model, path, example_inputs=inputs, calibration=calibration(inputs))
    rep = res.report

    # the limits as the policy states them, resolved on the same model
    plan = resolve(load_policy(path), ns.import_model(model, inputs), all_passes())
    assert plan.budget and plan.guard is not None and plan.guard.metric == "output_error"
    reached = {"flops": rep.after.flops / rep.before.flops, "params": rep.after.params / rep.before.params}
    for metric, limit in plan.budget.items():
        assert reached[metric] <= limit, (metric, reached[metric], limit)
    assert rep.after.params < rep.before.params and rep.after.flops < rep.before.flops
    assert 0.0 <= rep.fidelity["output_error"] <= plan.guard.limit
    assert rep.fidelity["max_abs_error"] >= 0.0

    # policy hash and resolved plan go into the report
    assert rep.policy_hash == load_policy(path).hash() == plan.policy_hash
    assert rep.plan == plan.to_text()
    assert f"policy sha256: {rep.policy_hash}" in str(rep) and "resolved plan:" in str(rep)
    assert [r.name for r in rep.passes] == [s.pass_name for s in plan.steps]

    # the emitted module is the reported graph: its params and its output error on the calibration data
    assert sum(p.numel() for p in res.model.parameters()) == rep.after.params
    cal = calibration(inputs)
    with torch.no_grad():
        y, y2 = model(cal), res.model(cal)
    err = float(torch.linalg.vector_norm(y2 - y) / torch.linalg.vector_norm(y))
    assert err == pytest.approx(rep.fidelity["output_error"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_check_and_explain(example: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "examples" / f"{example}.sqz")
    model_arg = f"{MODEL_FILE}:{EXAMPLES[example][1]}"
    assert main(["check", path]) == 0
    assert main(["check", path, "--model", model_arg]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n{path}: ok\n"
    assert main(["explain", path, "--model", model_arg]) == 0
    out = capsys.readouterr().out
    policy = load_policy(path)
    assert out.startswith(f"policy {policy.name} (sha256 {policy.hash()[:16]})\nwhole graph")
    first = next(i for i in policy.invocations if i.selector is not None)
    assert f"{path}:{first.span.line}]" in out or f"{path}:{first.span.line} over" in out
