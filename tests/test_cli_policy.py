"""The `netsqueeze` command with policies: check (exit 2, every error at once), explain on a model file,
compile with `--set` overrides, unknown `--set` keys, and a budget the pipeline misses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from netsqueeze.cli import main

ROOT = Path(__file__).resolve().parents[1]
MLP = f"{ROOT / 'tests' / 'compiler' / 'zoo_models.py'}:mlp"

POLICY = """\
param r = 25%

policy mlp_trim {
  input x: float32[4, 20]
  trim on fc1 | fc2 { criterion = l1, ratio = r }
  dead_code
}
"""


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    Path("p.sqz").write_text(POLICY)
    torch.save(torch.randn(64, 20, generator=torch.Generator().manual_seed(0)), "calib.pt")
    return "p.sqz"


def test_check_reports_every_error_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.sqz").write_text("policy p {\n  trm\n  trim { ration = 1 }\n  squeeze_fold { energy = 12ms }\n}\n")
    assert main(["check", "bad.sqz"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "bad.sqz:2:3: error: unknown pass 'trm' (did you mean 'trim'?)\n"
        "    trm\n"
        "    ^~~\n"
        "bad.sqz:3:10: error: unknown option 'ration' for pass 'trim' (did you mean 'ratio' or 'criterion' or 'allocation'?)\n"
        "    trim { ration = 1 }\n"
        "           ^~~~~~\n"
        "bad.sqz:4:27: error: wrong unit for option 'energy' of pass 'squeeze_fold': expected a ratio "
        "(a number or a percentage), got a duration '12ms'\n"
        "    squeeze_fold { energy = 12ms }\n"
        "                            ^~~~\n"
        "3 error(s)\n"
    )


def test_check_with_model_reports_selectors_that_match_nothing(policy: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    Path("miss.sqz").write_text(POLICY.replace("fc1 | fc2", "fc1 | fc9"))
    assert main(["check", "miss.sqz"]) == 0  # without a model, selectors cannot be resolved
    assert main(["check", "miss.sqz", "--model", MLP]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miss.sqz:5:17: error: ")
    assert "'fc9'" in err and "fc1" in err and "    trim on fc1 | fc9 { criterion = l1, ratio = r }\n" in err
    assert err.endswith("1 error(s)\n")


def test_explain_on_a_model_file(policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", policy, "--model", MLP, "--set", "r=50%"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("policy mlp_trim (sha256 ")
    assert lines[1:3] == ["whole graph (no 'on': the pass decides which nodes it touches):",
                          "  2. dead_code(remove_identity=True)  [p.sqz:6]"]
    step = lines[lines.index("  fc1 (linear)") + 1]
    assert step.startswith("    1. trim(criterion='l1', ratio=0.5, ") and step.endswith("  [p.sqz:5]")
    assert lines[lines.index("  fc3 (linear)") + 1] == "    -"


def test_compile_set_overrides_a_param(policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", MLP, "-p", policy, "--calib", "calib.pt", "-o", "out.pt", "--set", "r=50%"]) == 0
    out = capsys.readouterr().out
    assert "1. trim(criterion='l1', ratio=0.5, " in out
    m = torch.load("out.pt", weights_only=False)
    # fc1: 32 -> 16 neurons, fc2: 16 -> 8
    assert (m.fc1.out_features, m.fc2.in_features, m.fc2.out_features, m.fc3.in_features) == (16, 16, 8, 8)
    assert m(torch.randn(3, 20)).shape == (3, 5)


def test_compile_unknown_set_key(policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", MLP, "-p", policy, "-o", "out.pt", "--set", "ratio=50%"]) == 2
    assert capsys.readouterr().err == (
        "<--set>:1:1: error: unknown parameter 'ratio' (declared: r)\n"
        "  ratio=50%\n"
        "  ^~~~~\n"
    )
    assert main(["compile", MLP, "-p", policy, "-o", "out.pt", "--set", "r"]) == 2
    assert "--set expects key=value, got 'r'" in capsys.readouterr().err
    assert not Path("out.pt").exists()


def test_compile_budget_not_met_exits_1(policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("tight.sqz").write_text(POLICY.replace("  dead_code\n", "  dead_code\n  budget params <= 10%\n"))
    assert main(["compile", MLP, "-p", "tight.sqz", "--calib", "calib.pt", "-o", "out.pt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tight.sqz:7:10: error: budget params <= 10.0% not met: the pipeline reached ")
    assert err.endswith("    budget params <= 10%\n           ^~~~~~~~~~~~~\n")
    assert not Path("out.pt").exists()
