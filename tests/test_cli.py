"""The `netsqueeze` command: inspect, compile, and its error exits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from netsqueeze.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "examples" / "demo_model.py")


def test_inspect_prints_ir_and_stats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", DEMO]) == 0
    out = capsys.readouterr().out
    assert "graph SmallVGG (x) -> (output) {" in out
    assert "%features.0.0: float32[8, 32, 28, 28] = conv(%x)" in out
    assert out.rstrip().splitlines()[-1].split()[0] == "total"


def test_inspect_lists_opaque_ops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return torch.cumsum(self.fc(x), 1)\n"
        "def build():\n"
        "    return M().eval(), (torch.randn(2, 4),)\n"
    )
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "1 opaque op(s)" in out and "cumsum" in out


def test_compile_writes_a_loadable_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.pt"
    before = hashlib.sha256(Path(DEMO).read_bytes()).hexdigest()
    assert main(["compile", DEMO, "-o", str(out)]) == 0
    assert "netsqueeze report" in capsys.readouterr().out
    m = torch.load(out, weights_only=False)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert hashlib.sha256(Path(DEMO).read_bytes()).hexdigest() == before


def test_compile_refuses_to_overwrite_its_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", DEMO, "-o", DEMO]) == 1
    assert "refusing to overwrite the input model" in capsys.readouterr().err


def test_missing_model_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "nope.py"]) == 3  # a model that cannot be loaded is a capture error
    assert capsys.readouterr().err.strip() == "error: model file 'nope.py' does not exist"


def test_compile_to_pt2_and_back_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.pt2"
    assert main(["compile", DEMO, "-o", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary file left
    program = torch.export.load(str(out)).module()
    # exported with the batch dynamic (it was fixed at the example's: a guard failed at any other batch)
    assert program(torch.randn(8, 1, 28, 28)).shape == (8, 10) and program(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 3  # refused (untrusted pickle): a capture error
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to load '{out}': torch.export.load unpickles") and "--trust-pickle" in err
    assert main(["inspect", str(out), "--trust-pickle"]) == 0


def test_compile_replaces_an_existing_output_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    out.chmod(0o640)
    assert main(["compile", DEMO, "-o", str(out)]) == 0
    assert out.read_bytes()[:4] != b"old" and (out.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_module_torch_export_cannot_take_is_a_clear_error_and_nothing_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.sqz"
    policy.write_text("policy p {\n  prune on type(linear) { sparsity = 50% }\n}\n")
    out = tmp_path / "m.pt2"
    assert main(["compile", DEMO, "-p", str(policy), "--sparse", "csr", "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err  # torch may warn first (sparse CSR is beta), once per process
    assert err[err.index("error: "):].startswith(
        f"error: cannot write '{out}': torch.export could not export the compiled module with its dynamic dims (")
    assert "note: write .pt (the pickled module) or .onnx instead" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.sqz"]


def test_bench_json_refuses_to_overwrite_its_data_file_or_a_factory_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --json` checks its path against every input: the `--data` file and the file behind `file.py:factory`
    (which the literal argument does not name), before any work."""
    import numpy as np

    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 1, 28, 28), dtype=np.float32), labels=np.zeros(4, dtype=np.int64))
    model = tmp_path / "demo.py"
    model.write_bytes(Path(DEMO).read_bytes())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (data, model)}
    assert main(["bench", f"{model}:build", "--data", str(data), "--json", str(data)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: refusing to overwrite the data file '{data}': choose another --json path")
    assert main(["bench", f"{model}:build", "--json", str(model)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: refusing to overwrite the model '{model}': choose another --json path")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (data, model)} == before


def test_compile_refuses_to_overwrite_a_calibration_file_named_through_a_param(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`calibrate data d` with `param d = "cal.pt"` names the same file as the literal form: `-o` may not be it."""
    cal = tmp_path / "cal.pt"
    torch.save(torch.randn(8, 1, 28, 28), cal)
    before = hashlib.sha256(cal.read_bytes()).hexdigest()
    pol = tmp_path / "p.sqz"
    pol.write_text('param d = "cal.pt"\npolicy p {\n  calibrate samples 8, batch 4, data d\n  fold_bn\n}\n')
    assert main(["compile", DEMO, "-p", str(pol), "-o", str(cal), "-q"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: refusing to overwrite the calibration file '{cal}': choose another -o path")
    assert hashlib.sha256(cal.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("argv, message", [
    (["bench", DEMO, "--batch", "abc"], "error: --batch expects positive integers separated by commas (1,64), got 'abc'"),
    (["bench", DEMO, "--threads", "0"], "error: --threads and --rounds must be at least 1 (got 0, 15)"),
    (["compile", DEMO, "-o", "m.onnx", "--input-shape", "x=a"], "error: --input-shape expects name=1,3,224,224, got 'x=a'"),
    (["compile", DEMO, "-o", "m.onnx", "--set", "ratio=30%"],
     "error: --set ratio: there is no policy (-p) whose params it would set"),
], ids=["batch", "threads", "input_shape", "set_without_policy"])
def test_usage_errors_exit_2_as_the_readme_says(argv: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message
    assert list(tmp_path.iterdir()) == []


def test_input_shapes_of_a_torch_model_are_an_error_not_ignored() -> None:
    import netsqueeze as ns
    from netsqueeze.errors import InputMismatchError

    with pytest.raises(InputMismatchError) as e:
        ns.import_model(torch.nn.Linear(4, 2), (torch.randn(2, 4),), input_shapes={"bogus": (1, 4)})
    assert str(e.value) == ("error: input_shapes sets an ONNX model's input sizes: a torch model's come from its "
                            "example inputs (and its dynamic dims from dynamic_shapes)")


def test_a_report_json_with_a_malformed_value_is_a_clear_error() -> None:
    from netsqueeze.compiler.report import CompileReport
    from netsqueeze.errors import NetsqueezeError

    with pytest.raises(NetsqueezeError) as e:
        CompileReport.from_json('{"schema": "netsqueeze.report/1", "passes": 5}')
    assert str(e.value).startswith("error: netsqueeze report is ")
