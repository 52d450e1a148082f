"""What a policy check said was fine and a compile then refused (or silently ignored), now said by the check,
located in the policy: a pass's option conflicts and options that do nothing, `--set` of a param nothing reads, a bad
`--set` value, an unknown op kind in a `let` no statement uses, a `calibrate data` file that is not there, calibration
arrays named after no input, a `guard top1 drop` that nothing can measure, `input` declarations against the model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch

import netsqueeze as ns
from netsqueeze.cli import main
from netsqueeze.compiler.api import check_declared_inputs, compile_checks, load_policy_file
from netsqueeze.compiler.plan import check_file, resolve
from netsqueeze.dsl import parse_policy
from netsqueeze.errors import Diagnostic
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import all_passes, register_pass, unregister_pass
from tests.dsl.tiny import tiny_cnn
from tests.zoo import ZOO


def _errors(text: str, tmp_path: Path, graph: ns.Graph | None = None, name: str = "p.sqz") -> list[Diagnostic]:
    path = tmp_path / name
    path.write_text(text)
    return check_file(path, graph)


def _one(diags: list[Diagnostic]) -> tuple[str, str]:
    assert len(diags) == 1, [d.format() for d in diags]
    return str(diags[0].span).rsplit("/", 1)[-1], diags[0].message


# ---- 2a: a pass's option conflicts, at check time and located at the option ------------------------------------
@pytest.mark.parametrize("options, where, message", [
    ("ratio = 50%, criterion = l1, gdnt_mode = groups", "p.sqz:2:53",
     "pass 'trim': gdnt_mode = groups applies to criterion = gdnt, not l1"),
    ("ratio = 50%, allocation = uniform", "p.sqz:2:37",
     "pass 'trim': allocation = uniform spreads a flops/params/bytes budget over the groups; with a `ratio` every "
     "group loses that ratio already: give one of them"),
    ("criterion = gdnt, gdnt_mode = groups, allocation = uniform", "p.sqz:2:62",
     "pass 'trim': allocation = uniform ranks whole channels; gdnt_mode = groups sets its own cut"),
    ("ratio = 50%, refit = layer, bias_compensation = false", "p.sqz:2:37",
     "pass 'trim': refit = layer refits the consumers' biases (the intercept): it contradicts "
     "bias_compensation = false"),
], ids=["gdnt_mode", "uniform_ratio", "uniform_groups", "refit_bias"])
def test_trim_option_conflicts_are_policy_errors_at_the_option(options: str, where: str, message: str,
                                                                tmp_path: Path) -> None:
    text = f"policy p {{\n  trim on type(conv) {{ {options} }}\n}}\n"
    assert _one(_errors(text, tmp_path)) == (where, message)  # no model needed
    assert _one(_errors(text, tmp_path, tiny_cnn())) == (where, message)  # `check --model`, `explain`


def test_check_and_explain_exit_2_on_an_option_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("b.sqz").write_text("policy p {\n  trim { ratio = 50%, criterion = l1, gdnt_mode = groups }\n}\n")
    assert main(["check", "b.sqz"]) == 2
    assert capsys.readouterr().err == (
        "b.sqz:2:39: error: pass 'trim': gdnt_mode = groups applies to criterion = gdnt, not l1\n"
        "    trim { ratio = 50%, criterion = l1, gdnt_mode = groups }\n"
        "                                        ^~~~~~~~~~~~~~~~~~\n"
        "1 error(s)\n")


def test_compile_refuses_the_conflict_as_a_policy_error_before_any_pass(tmp_path: Path) -> None:
    model, inputs = ZOO["mlp"]()
    with pytest.raises(ns.PolicyError) as e:  # was a PassError (exit 1) from inside the pipeline
        ns.compile(model, "policy p {\n  fold_bn\n  trim { ratio = 50%, allocation = uniform }\n}\n",
                   example_inputs=inputs)
    assert not isinstance(e.value, ns.PassError)
    assert str(e.value.diagnostics[0].span) == "<policy>:3:23"


@register_pass
@dataclass(frozen=True)
class _Gate(TransformPass):
    """A custom pass whose `width` only applies in mode `wide`."""

    name: ClassVar[str] = "sweep_gate"
    mode: Literal["narrow", "wide"] = "narrow"
    width: int = 4

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        o = {**cls.option_defaults(), **given}
        return [("width", f"width applies to mode = wide, not {o['mode']}")] if "width" in given and \
            o["mode"] != "wide" else []

    def run(self, graph: ns.Graph, ctx: PassContext) -> PassResult:
        return PassResult()


unregister_pass("sweep_gate")


@pytest.fixture
def gate() -> Iterator[None]:
    register_pass(_Gate)
    try:
        yield
    finally:
        unregister_pass("sweep_gate")


def test_any_pass_can_state_its_option_conflicts(gate: None, tmp_path: Path) -> None:
    assert _one(_errors("policy p {\n  sweep_gate { width = 8 }\n}\n", tmp_path)) == (
        "p.sqz:2:16", "pass 'sweep_gate': width applies to mode = wide, not narrow")
    assert _errors("policy p {\n  sweep_gate { mode = wide, width = 8 }\n  sweep_gate\n}\n", tmp_path) == []


# ---- 5: trim options of one criterion, set with another ----------------------------------------------------------
@pytest.mark.parametrize("options, where, message", [
    ("criterion = l2, activation_stat = variance", "p.sqz:2:39",
     "pass 'trim': activation_stat applies to criterion = activation, not l2"),
    ("criterion = l2, gdnt_samples = 10", "p.sqz:2:39", "pass 'trim': gdnt_samples applies to criterion = gdnt, not l2"),
    ("gdnt_child_groups = 3", "p.sqz:2:23", "pass 'trim': gdnt_child_groups applies to criterion = gdnt, not l1"),
    ("criterion = random, gdnt_mode = neuron", "p.sqz:2:43",
     "pass 'trim': gdnt_mode applies to criterion = gdnt, not random"),
    ("criterion = l2, gdnt_layer_cap = 50%", "p.sqz:2:39",
     "pass 'trim': gdnt_layer_cap applies to criterion = gdnt with gdnt_mode = groups, not l2"),
    ("criterion = gdnt, gdnt_layer_cap = 50%", "p.sqz:2:41",
     "pass 'trim': gdnt_layer_cap applies to gdnt_mode = groups, not neuron"),
    ("allocation = global", "p.sqz:2:23",
     "pass 'trim': allocation = global spreads a flops/params/bytes budget over the groups; with a `ratio` every "
     "group loses that ratio already: give one of them"),
], ids=["activation_stat", "gdnt_samples", "gdnt_child_groups", "gdnt_mode", "layer_cap_l2", "layer_cap_neuron",
        "allocation_global"])
def test_an_option_another_criterion_ignores_is_an_error(options: str, where: str, message: str,
                                                         tmp_path: Path) -> None:
    text = f"policy p {{\n  trim {{ ratio = 50%, {options} }}\n}}\n"
    assert _one(_errors(text, tmp_path)) == (where, message)


@pytest.mark.parametrize("options", [
    "criterion = l2", "criterion = activation, activation_stat = variance",
    "criterion = gdnt, gdnt_samples = 10, gdnt_child_groups = 3, gdnt_mode = neuron",
    "criterion = gdnt, gdnt_mode = groups, gdnt_layer_cap = 50%, gdnt_child_groups = 2",
])
def test_options_that_apply_and_defaults_are_no_error(options: str, tmp_path: Path) -> None:
    assert _errors(f"policy p {{\n  trim {{ ratio = 50%, {options} }}\n}}\n", tmp_path) == []


def test_a_criterion_set_through_a_param_is_checked_with_its_options(tmp_path: Path) -> None:
    text = "param c = gdnt\npolicy p {\n  trim { ratio = 50%, criterion = c, gdnt_samples = 10 }\n}\n"
    path = tmp_path / "p.sqz"
    path.write_text(text)
    assert check_file(path) == []
    with pytest.raises(ns.PolicyError) as e:
        resolve(load_policy_file(path, {"c": "l1"}), tiny_cnn(), all_passes())
    assert _one(list(e.value.diagnostics)) == ("p.sqz:3:38", "pass 'trim': gdnt_samples applies to criterion = gdnt, "
                                                             "not l1")


# ---- 2b: guard top1 drop without eval_fn --------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class _Probe(TransformPass):
    """Records that it ran."""

    name: ClassVar[str] = "sweep_probe"
    runs: ClassVar[list[int]] = []

    def run(self, graph: ns.Graph, ctx: PassContext) -> PassResult:
        self.runs.append(1)
        return PassResult()


unregister_pass("sweep_probe")


def test_an_unmeasurable_top1_guard_fails_before_any_pass_runs() -> None:
    model, inputs = ZOO["mlp"]()
    register_pass(_Probe)
    _Probe.runs.clear()
    try:
        with pytest.raises(ns.BudgetError) as e:
            ns.compile(model, "policy p {\n  guard top1 drop <= 1%\n  sweep_probe\n}\n", example_inputs=inputs)
    finally:
        unregister_pass("sweep_probe")
    assert _Probe.runs == []  # the pipeline ran, then the guard could not be measured
    assert str(e.value.diagnostics[0].span) == "<policy>:2:9"
    assert e.value.message == "guard top1 drop cannot be measured: pass eval_fn=... to compile()"


def test_the_check_warns_that_the_command_line_cannot_measure_top1(tmp_path: Path) -> None:
    policy = parse_policy("policy p {\n  guard top1 drop <= 1%\n  fold_bn\n}\n", str(tmp_path / "t.sqz"))
    diags = compile_checks(policy)
    assert [(d.severity, str(d.span).rsplit("/", 1)[-1], d.message, d.notes) for d in diags] == [
        ("warning", "t.sqz:2:9", "guard top1 drop is measured by the eval_fn given to compile() (Python): "
         "`netsqueeze compile` cannot give one and fails on this guard",
         ("on the command line, use `guard output error <= ...`",))]
    assert compile_checks(policy, eval_fn=True) == []


# ---- 2c: `input` declarations against the model, for `check --model` ----------------------------------------------
def test_input_declarations_are_checked_against_a_model_without_compiling(tmp_path: Path) -> None:
    model, inputs = ZOO["mlp"]()
    graph = ns.import_model(model, inputs)
    path = tmp_path / "a.sqz"
    path.write_text("policy p {\n  input x: float32[4, 21]\n  fold_bn\n}\n")
    assert check_file(path, graph) == []  # what `check --model` ran: it said ok, compile refused
    policy = load_policy_file(path)
    diags = compile_checks(policy, graph, eval_fn=True)
    assert [(d.severity, str(d.span).rsplit("/", 1)[-1], d.message) for d in diags] == [
        ("error", "a.sqz:2:3", "input 'x' is declared float32[4, 21] but the model's input 0 ('x') is float32[4, 20]")]
    with pytest.raises(ns.PolicyError) as e:
        check_declared_inputs(policy.inputs, graph)
    assert e.value.diagnostics == tuple(diags)
    path.write_text("policy p {\n  input x: float32[4, 20]\n  fold_bn\n}\n")
    assert compile_checks(load_policy_file(path), graph) == []


def test_check_and_explain_with_a_model_run_the_compile_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`netsqueeze check --model` said ok for a declaration compile refuses; `explain` printed a plan for it."""
    monkeypatch.chdir(tmp_path)
    model = f"{Path(__file__).resolve().parents[1] / 'compiler' / 'zoo_models.py'}:mlp"
    Path("a.sqz").write_text("policy p {\n  input x: float32[4, 21]\n  fold_bn\n}\n")
    wrong = "a.sqz:2:3: error: input 'x' is declared float32[4, 21] but the model's input 0 ('x') is float32[4, 20]"
    assert main(["check", "a.sqz", "--model", model]) == 2
    assert capsys.readouterr().err.startswith(wrong + "\n")
    assert main(["explain", "a.sqz", "--model", model]) == 2
    assert wrong in capsys.readouterr().err
    Path("t.sqz").write_text("policy p {\n  guard top1 drop <= 1%\n  fold_bn\n}\n")
    assert main(["check", "t.sqz"]) == 0  # a warning: from Python with an eval_fn the guard is measured
    out = capsys.readouterr()
    assert out.err.startswith("t.sqz:2:9: warning: guard top1 drop is measured by the eval_fn given to compile()")
    assert out.out == "t.sqz: ok\n"


# ---- 3: calibration arrays named after no input ----------------------------------------------------------------
class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.a(image) + self.b(mask)


def _two(tmp_path: Path, name: str, **arrays: np.ndarray) -> Any:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    x = torch.randn(2, 6)
    return ns.compile(_Two().eval(), "policy p {\n  fold_bn\n}\n", example_inputs=(x, x), calibration=path)


def _rows(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def test_arrays_named_after_no_input_are_an_error_listing_the_inputs(tmp_path: Path) -> None:
    with pytest.raises(ns.InputMismatchError) as e:  # were fed by position: 'maks' went to 'image'
        _two(tmp_path, "typo.npz", maks=_rows(), imgae=_rows(seed=1))
    assert e.value.message == (
        f"calibration file '{tmp_path / 'typo.npz'}' names its arrays 'maks', 'imgae', but the model's inputs are "
        "'image', 'mask' (did you mean 'mask' for 'maks', 'image' for 'imgae'?): name every array after an input "
        "(in any order), or none (np.savez(path, a, b): in the inputs' order); an array named 'labels' holds labels")


def test_misnamed_arrays_of_other_shapes_are_blamed_on_their_names(tmp_path: Path) -> None:
    with pytest.raises(ns.InputMismatchError) as e:  # the error blamed the shape of 'maks' fed to 'image'
        _two(tmp_path, "typo.npz", maks=_rows()[:, :4], imgae=_rows(seed=1))
    assert e.value.message.startswith(f"calibration file '{tmp_path / 'typo.npz'}' names its arrays 'maks', 'imgae', "
                                      "but the model's inputs are 'image', 'mask'")


def test_named_unnamed_and_labelled_files_still_work(tmp_path: Path) -> None:
    assert _two(tmp_path, "named.npz", mask=_rows(), image=_rows(seed=1)).report.fidelity["output_error"] < 1e-5
    assert _two(tmp_path, "positional.npz", arr_0=_rows(), arr_1=_rows(seed=1)) is not None
    assert _two(tmp_path, "labelled.npz", mask=_rows(), labels=np.zeros(16, np.int64), image=_rows(seed=1)) is not None
    model, inputs = ZOO["mlp"]()
    for name, arrays in (("lab.npz", {"x": np.zeros((8, 20), np.float32), "labels": np.zeros(8, np.int64)}),
                         ("any.npz", {"data": np.zeros((8, 20), np.float32)})):  # one input: one array, any name
        np.savez(tmp_path / name, **arrays)  # type: ignore[arg-type]
        assert ns.compile(model, "policy p {\n  fold_bn\n}\n", example_inputs=inputs,
                          calibration=tmp_path / name) is not None


# ---- 6: --set of a param nothing reads; an unknown op kind in an unused let ---------------------------------------
PARAMS = """\
param ratio = 25%
param width = 4
param unused = width
policy p {
  trim on type(conv) { ratio = 50% }
}
"""


@pytest.mark.parametrize("key", ["ratio", "width"])
def test_setting_a_param_nothing_reads_is_an_error(key: str) -> None:
    with pytest.raises(ns.PolicyError) as e:
        parse_policy(PARAMS, "a.sqz", params={key: "90%" if key == "ratio" else "8"})
    d = e.value.diagnostics[0]
    assert (str(d.span), d.message, d.notes) == (
        "<--set>:1:1", f"parameter '{key}' is set, but no statement of the policy reads it: setting it changes nothing",
        (f"'{key}' is declared at a.sqz:{1 if key == 'ratio' else 2}:7",))


def test_setting_a_param_read_through_another_param_is_fine(tmp_path: Path) -> None:
    text = PARAMS.replace("ratio = 50%", "ratio = r, round_to = unused").replace("param ratio", "param r")
    policy = parse_policy(text, "a.sqz", params={"r": "40%", "width": "2"})
    plan = resolve(policy, tiny_cnn(), all_passes())
    assert (plan.steps[0].instance.ratio, plan.steps[0].instance.round_to) == (0.4, 2)  # type: ignore[attr-defined]


def test_an_unknown_op_kind_in_an_unused_let_is_an_error(tmp_path: Path) -> None:
    text = "policy p {\n  let unused = type(convv)\n  trim on type(conv) { ratio = 50% }\n}\n"
    want = ("p.sqz:2:16", "unknown op kind 'convv' (did you mean 'conv'?)")
    assert _one(_errors(text, tmp_path)) == want  # without a model
    assert _one(_errors(text, tmp_path, tiny_cnn())) == want  # with one
    used = text.replace("type(conv) {", "unused {")
    assert _one(_errors(used, tmp_path, tiny_cnn())) == want  # a used one is said once


# ---- 7D: a bad --set value is located at the --set ----------------------------------------------------------------
def test_a_bad_set_value_is_located_at_the_set(tmp_path: Path) -> None:
    path = tmp_path / "setp.sqz"
    path.write_text("param r = 25%\npolicy p {\n  trim on type(conv) { ratio = r }\n}\n")
    with pytest.raises(ns.PolicyError) as e:
        resolve(load_policy_file(path, {"r": "abc"}), tiny_cnn(), all_passes())
    d = e.value.diagnostics[0]
    assert (str(d.span), d.message, d.notes) == (
        "<--set>:1:3", "option 'ratio' of pass 'trim' expects a number, got the name 'abc'",
        (f"the value of 'r', used at {path}:3:32",))
    assert d.format().splitlines()[1:3] == ["  r=abc", "    ^~~"]


# ---- 13: `calibrate data` ----------------------------------------------------------------------------------------
def test_a_missing_calibrate_data_file_is_a_check_error_at_the_statement(tmp_path: Path) -> None:
    (tmp_path / "pol").mkdir()
    np.savez(tmp_path / "pol" / "calib.npz", x=np.zeros((8, 20), np.float32))
    text = 'policy p {\n  calibrate data "calib_typo.npz"\n  fold_bn\n}\n'
    d = _errors(text, tmp_path, name="pol/p.sqz")
    assert [(str(x.span), x.message, x.notes) for x in d] == [
        (f"{tmp_path}/pol/p.sqz:2:13", f"calibration file '{tmp_path}/pol/calib_typo.npz' does not exist (did you "
         "mean 'calib.npz'?)", ("a relative path is read from the policy file's folder",))]
    assert d[0].span is not None and d[0].span.end_col == 34  # `data "calib_typo.npz"`
    assert _errors(text.replace("calib_typo", "calib"), tmp_path, name="pol/p.sqz") == []


def test_the_compile_locates_a_bad_calibrate_data_file_at_the_statement(tmp_path: Path) -> None:
    model, inputs = ZOO["mlp"]()
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 21), np.float32))
    path = tmp_path / "p.sqz"
    path.write_text('policy p {\n  calibrate data "c.npz"\n  fold_bn\n}\n')
    with pytest.raises(ns.InputMismatchError) as e:
        ns.compile(model, path, example_inputs=inputs)
    assert str(e.value.diagnostics[0].span) == f"{path}:2:13"
    assert e.value.message == "calibration batch 0: input 'x' has shape [8, 21] but the model expects [N, 20]"
