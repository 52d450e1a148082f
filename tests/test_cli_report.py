"""What users see from the command line: --report/--report-json/--quiet/--verbose, --version, `python -m
netsqueeze`, progress bars only on a terminal, and an interrupted write that leaves the old file."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import netsqueeze as ns
from netsqueeze.cli import main
from netsqueeze.compiler.progress import Progress, enabled
from tests.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]
MODEL = """import torch
def build():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(),
                            torch.nn.Linear(16, 3)).eval()
    return m, (torch.randn(2, 12),)
def calibration():
    return torch.randn(128, 12, generator=torch.Generator().manual_seed(1))
"""
POLICY = """policy p {
  budget flops <= 70%
  guard output error <= 40%
  squeeze_fold on type(linear)
}"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "m.py").write_text(MODEL)
    (tmp_path / "p.sqz").write_text(POLICY)
    return tmp_path / "m.py", tmp_path / "p.sqz"


def test_compile_writes_html_and_json_reports_quietly(files: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, policy = files
    out, html, js = tmp_path / "small.onnx", tmp_path / "r.html", tmp_path / "r.json"
    assert main(["compile", str(model), "-p", str(policy), "-o", str(out), "--report", str(html),
                 "--report-json", str(js), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    rep = ns.CompileReport.from_json(js.read_text())
    assert rep.after.flops <= 0.7 * rep.before.flops and rep.fidelity["output_error"] <= 0.4
    assert html.read_text().startswith("<!DOCTYPE html>") and "fc" not in rep.model_name
    g = onnx.load(str(out)).graph
    assert sum(n.op_type == "Gemm" for n in g.node) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py", "p.sqz", "r.html", "r.json", "small.onnx"]


def test_compile_prints_report_and_every_written_file(files: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, policy = files
    out, js = tmp_path / "small.pt", tmp_path / "r.json"
    assert main(["compile", str(model), "-p", str(policy), "-o", str(out), "--report-json", str(js), "-v"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("netsqueeze report: ") and cap.out.rstrip().endswith(f"wrote {out}, {js}")
    # --verbose logs each candidate the search measured, and only to stderr
    logged = [ln for ln in cap.err.splitlines() if ln.startswith("search candidate ")]
    assert len(logged) == len(json.loads(js.read_text())["search"]) >= 2
    assert logged[0].startswith("search candidate 1: output error ")


def test_report_paths_are_checked_before_any_work(files: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, policy = files
    assert main(["compile", str(model), "-p", str(policy), "-o", str(tmp_path / "o.onnx"),
                 "--report", str(policy)]) == 1
    assert "refusing to overwrite the policy file" in capsys.readouterr().err
    assert main(["compile", str(model), "-p", str(policy), "-o", str(tmp_path / "o.onnx"),
                 "--report", str(tmp_path / "r"), "--report-json", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --report and --report-json both name '{tmp_path / 'r'}'"
    assert not (tmp_path / "o.onnx").exists()


def test_an_error_mid_write_leaves_the_previous_output(files: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = files
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")

    def half_written(proto: onnx.ModelProto, path: str) -> None:
        Path(path).write_bytes(proto.SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", half_written)
    assert main(["compile", str(model), "-o", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"error: cannot write '{out}': No space left on device"
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.py", "p.sqz"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"netsqueeze {ns.__version__}\n"


def test_python_dash_m_runs_check() -> None:
    r = subprocess.run([sys.executable, "-m", "netsqueeze", "check", "examples/demo.sqz"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    # the demo's policy guards top-1, which its Python script measures through eval_fn: the command line cannot
    assert (r.returncode, r.stdout, r.stderr) == (0, "examples/demo.sqz: ok\n", (
        "examples/demo.sqz:7:9: warning: guard top1 drop is measured by the eval_fn given to compile() (Python): "
        "`netsqueeze compile` cannot give one and fails on this guard\n"
        "    guard top1 drop <= 1%\n"
        "          ^~~~~~~~~~~~~~~\n"
        "  note: on the command line, use `guard output error <= ...`\n"))


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_off_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert enabled(None, io.StringIO()) is False and enabled(None, _Tty()) is True
    assert enabled(False, _Tty()) is False and enabled(True, io.StringIO()) is True
    model, inputs = ZOO["mlp"]()
    calib = torch.randn(96, 20, generator=torch.Generator().manual_seed(0))
    ns.compile(model, "policy p { squeeze_fold on type(linear) { energy = 99% } }", example_inputs=inputs,
               calibration=calib)  # progress=None: stderr is captured, not a terminal
    assert capsys.readouterr().err == ""


def test_progress_bars_count_batches_when_on() -> None:
    sink = _Tty()
    bars = Progress(True, file=sink)

    def stream(graph: object, values: object) -> object:
        yield from ([torch.zeros(1)] for _ in range(3))

    assert len(list(bars.stream(stream, 3)(None, [1, 2]))) == 3  # type: ignore[arg-type]
    assert bars.bars_made == 1 and "calibration (2 tapped values)" in sink.getvalue() and "0/3" in sink.getvalue()
    off = Progress(False, file=sink)
    before = sink.getvalue()
    list(off.stream(stream, 3)(None, [1]))  # type: ignore[arg-type]
    assert off.bars_made == 0 and sink.getvalue() == before
