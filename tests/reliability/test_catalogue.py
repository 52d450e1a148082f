"""A catalogue of bad inputs through the CLI and the API (issue 12).

Every case asserts the exit code (CLI) or the exception, the error type, the place or name in the
message, and that no file in the working directory was created or changed. Then: interrupts
during a write leave the previous output (or none), never a truncated file.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import netsqueeze as ns
import netsqueeze.cli as cli
from netsqueeze.compiler import api
from netsqueeze.errors import FileError, InternalError, NonFiniteError, UsageError, UserCodeError
from netsqueeze.passes.dead_code import DeadCode
from netsqueeze.passes.fold_bn import FoldBN

ROOT = Path(__file__).resolve().parents[2]

MODEL = """\
import torch


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def build():
    torch.manual_seed(0)
    return M().eval(), (torch.randn(2, 4),)
"""
POLICY = "policy p {\n  fold_bn\n  dead_code\n}\n"


class Evil:
    """A pickle payload: unpickling it creates the file 'pwned'."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, ("pwned", "w"))


class EvilSystem:
    """A payload naming a module the weights-only reader blocks outright (torch words that refusal otherwise)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and link under `root`: content hash (or link target) and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("-> " + os.readlink(p), st.st_mtime_ns)
        elif p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
        else:
            out[str(p.relative_to(root)) + "/"] = ("dir", 0)
    return out


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with a model file, a policy, calibration data and assorted bad files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(MODEL)
    (tmp_path / "p.sqz").write_text(POLICY)
    (tmp_path / "lib.sqz").write_text("param r = 50%\n")
    (tmp_path / "imp.sqz").write_text('import "lib.sqz"\n' + POLICY)
    (tmp_path / "sub").mkdir()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    np.save(tmp_path / "calib.npy", x.numpy())
    torch.save(x, tmp_path / "calib.pt")
    (tmp_path / "alias.pt").symlink_to("calib.pt")
    (tmp_path / "model_alias.pt").symlink_to("m.py")
    bad = x.clone()
    bad[3, 1] = float("nan")
    np.save(tmp_path / "nan.npy", bad.numpy())
    inf = x.clone()
    inf[0, 0] = float("inf")
    np.save(tmp_path / "inf.npy", inf.numpy())
    np.save(tmp_path / "f64.npy", x.double().numpy())
    np.save(tmp_path / "f16.npy", x.half().numpy())
    np.save(tmp_path / "scalar.npy", np.float32(3.0))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "wide.npy", torch.randn(16, 5).numpy())
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file at all")
    (tmp_path / "calib.txt").write_text("1 2 3 4\n")
    torch.save({"weights": x, "layer": torch.nn.Linear(4, 3)}, tmp_path / "objects.pt")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3)), tmp_path / "module.pt")
    torch.save(Evil(), tmp_path / "evil.pt")
    torch.save(EvilSystem(), tmp_path / "evil_system.pt")
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"layer": [1, 2]}, protocol=4))  # not torch's format
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "state.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage" * 8)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "text.pt").write_bytes(b"garbage bytes, not a torch file")  # was 'holds pickled Python objects'
    (tmp_path / "garbage.pt2").write_bytes(b"PK\x03\x04 not an archive")
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    (tmp_path / "notes.txt").write_text("a regular file\n")
    (tmp_path / "latin1.sqz").write_bytes("# caf\xe9\n".encode("latin-1") + POLICY.encode())
    (tmp_path / "syntax.sqz").write_text("policy p {\n  fold_bn(\n}\n")
    yield tmp_path
    assert not (tmp_path / "pwned").exists(), "a pickle payload ran"


def user_file(ws: Path, name: str, body: str) -> None:
    (ws / name).write_text(body)


# ---- the CLI catalogue ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    code: int
    error: type[ns.NetsqueezeError] | None  # None: argparse usage error
    message: str  # a fragment of stderr that names the file, input or place
    setup: Callable[[Path], None] | None = None
    notes: tuple[str, ...] = field(default=())  # fragments expected after the message (tracebacks)


C = ["compile", "m.py"]
RAISING = MODEL + "\ndef broken():\n    raise ValueError('boom in the factory')\n"
CASES = [
    # outputs that would overwrite an input
    Case("out-is-model", [*C, "-o", "m.py"], 1, FileError,
         "error: refusing to overwrite the input model 'm.py': choose another -o path"),
    Case("out-is-model-factory-form", ["compile", "m.py:build", "-o", "m.py"], 1, FileError,
         "refusing to overwrite the input model 'm.py'"),
    Case("out-is-model-through-symlink", [*C, "-o", "model_alias.pt"], 1, FileError,
         "refusing to overwrite the input model 'm.py'"),
    Case("report-is-model", [*C, "-o", "out.pt", "--report", "m.py"], 1, FileError,
         "error: refusing to overwrite the input model 'm.py': choose another --report path"),
    Case("report-json-is-output", [*C, "-o", "out.pt", "--report-json", "out.pt"], 1, FileError,
         "error: refusing to overwrite the output model 'out.pt': choose another --report-json path"),
    Case("out-is-policy", [*C, "-p", "p.sqz", "-o", "p.sqz"], 1, FileError,
         "refusing to overwrite the policy file 'p.sqz'"),
    Case("out-is-policy-import", [*C, "-p", "imp.sqz", "-o", "lib.sqz"], 1, FileError,
         "refusing to overwrite the policy import 'lib.sqz'"),
    Case("out-is-calib", [*C, "--calib", "calib.pt", "-o", "calib.pt"], 1, FileError,
         "refusing to overwrite the calibration file 'calib.pt'"),
    Case("out-is-calib-through-symlink", [*C, "--calib", "calib.pt", "-o", "alias.pt"], 1, FileError,
         "refusing to overwrite the calibration file 'calib.pt'"),
    Case("out-is-policy-calib-data", [*C, "-p", "data.sqz", "-o", "calib.pt"], 1, FileError,
         "refusing to overwrite the calibration file 'calib.pt'",
         setup=lambda ws: user_file(ws, "data.sqz", 'policy p {\n  calibrate data "calib.pt"\n  fold_bn\n}\n')),
    # bad output paths and formats
    Case("out-unknown-suffix", [*C, "-o", "model.txt"], 1, FileError,
         "output 'model.txt' has suffix '.txt': the suffix decides the format (use .onnx, .pt, .pth, .pt2 or .nsq)"),
    Case("out-no-suffix", [*C, "-o", "model"], 1, FileError, "output 'model' has no suffix"),
    Case("out-missing-dir", [*C, "-o", "nodir/m.pt"], 1, FileError,
         "output 'nodir/m.pt': directory 'nodir' does not exist"),
    Case("out-is-dir", [*C, "-o", "sub"], 1, FileError, "output 'sub' is a directory"),
    Case("out-under-a-file", [*C, "-o", "notes.txt/m.pt"], 1, FileError,
         "output 'notes.txt/m.pt': 'notes.txt' is a file, not a directory"),
    Case("out-deep-under-a-file", [*C, "-o", "notes.txt/a/b/m.pt"], 1, FileError,
         "'notes.txt' is a file, not a directory"),
    Case("target-contradicts-suffix", [*C, "--target", "onnx", "-o", "out.pt"], 2, UsageError,
         "--target onnx does not match the output 'out.pt': its suffix '.pt' writes a torch model"),
    # bad options
    Case("negative-input-shape", [*C, "-o", "out.pt", "--input-shape", "x=1,-3"], 2, UsageError,
         "--input-shape expects a name and positive dims (name=1,3,224,224), got 'x=1,-3'"),
    Case("zero-input-shape", [*C, "-o", "out.pt", "--input-shape", "x=0,4"], 2, UsageError,
         "got 'x=0,4'"),
    Case("garbage-input-shape", [*C, "-o", "out.pt", "--input-shape", "x=a,b"], 2, UsageError,
         "--input-shape expects name=1,3,224,224, got 'x=a,b'"),
    Case("int8-precision", [*C, "-o", "out.pt", "--precision", "int8"], 2, None, "invalid choice: 'int8'"),
    Case("bad-set", [*C, "-p", "p.sqz", "-o", "out.pt", "--set", "r"], 2, ns.PolicyError,
         "--set expects key=value, got 'r'"),
    # model files
    Case("model-missing", ["compile", "nope.py", "-o", "out.pt"], 3, ns.CaptureError,
         "model file 'nope.py' does not exist"),
    Case("model-is-dir", ["compile", "sub", "-o", "out.pt"], 3, ns.CaptureError, "model file 'sub' is a directory"),
    Case("model-unknown-suffix", ["compile", "model.h5", "-o", "out.pt"], 3, ns.CaptureError,
         "unsupported model file 'model.h5'"),
    Case("model-syntax-error", ["compile", "syn.py", "-o", "out.pt"], 3, ns.CaptureError,
         "importing 'syn.py' failed: SyntaxError", setup=lambda ws: user_file(ws, "syn.py", "def build(:\n"),
         notes=("syn.py",)),
    Case("model-import-raises", ["compile", "imp.py", "-o", "out.pt"], 3, ns.CaptureError,
         "importing 'imp.py' failed: ZeroDivisionError: division by zero",
         setup=lambda ws: user_file(ws, "imp.py", "import torch\nx = 1 / 0\n"),
         notes=("Traceback (most recent call last):", 'imp.py", line 2')),
    Case("factory-raises", ["compile", "r.py:broken", "-o", "out.pt"], 1, UserCodeError,
         "model factory 'broken' in 'r.py' raised ValueError: boom in the factory",
         setup=lambda ws: user_file(ws, "r.py", RAISING),
         notes=("Traceback (most recent call last):", "in broken", "ValueError: boom in the factory")),
    Case("factory-missing", ["compile", "m.py:nothere", "-o", "out.pt"], 3, ns.CaptureError,
         "'m.py' defines no model factory (looked for nothere)"),
    Case("factory-returns-int", ["compile", "i.py", "-o", "out.pt"], 3, ns.CaptureError,
         "factory 'build' in 'i.py' returned int, expected an nn.Module",
         setup=lambda ws: user_file(ws, "i.py", "def build():\n    return 42\n")),
    Case("example-inputs-raises", ["compile", "e.py", "-o", "out.pt"], 1, UserCodeError,
         "example_inputs() in 'e.py' raised KeyError: 'shape'",
         setup=lambda ws: user_file(ws, "e.py", MODEL.replace("return M().eval(), (torch.randn(2, 4),)",
                                                              "return M().eval()")
                                    + "\ndef example_inputs():\n    return {}['shape']\n"),
         notes=("in example_inputs",)),
    Case("example-inputs-not-tensors", ["compile", "s.py", "-o", "out.pt"], 1, UserCodeError,
         "example_inputs() in 's.py' gave str as example input 0; expected a torch.Tensor",
         setup=lambda ws: user_file(ws, "s.py", MODEL.replace("return M().eval(), (torch.randn(2, 4),)",
                                                              "return M().eval()")
                                    + "\ndef example_inputs():\n    return 'x'\n")),
    Case("example-inputs-nan", ["compile", "n.py", "-o", "out.pt"], 1, NonFiniteError,
         "example input 0 contains NaN (8 of 8 values)",
         setup=lambda ws: user_file(ws, "n.py", MODEL.replace("torch.randn(2, 4)", "torch.full((2, 4), float('nan'))"))),
    Case("calibration-fn-raises", ["compile", "c.py", "-o", "out.pt"], 1, UserCodeError,
         "calibration() in 'c.py' raised OSError: no data here",
         setup=lambda ws: user_file(ws, "c.py", MODEL + "\ndef calibration():\n    raise OSError('no data here')\n"),
         notes=("in calibration", "OSError: no data here")),
    Case("calibration-fn-inf", ["compile", "c.py", "-o", "out.pt"], 1, NonFiniteError,
         "calibration batch 0: input 'x' contains Inf (1 of 64 values)",
         setup=lambda ws: user_file(ws, "c.py", MODEL + "\ndef calibration():\n"
                                    "    t = torch.zeros(16, 4)\n    t[2, 2] = float('-inf')\n    return t\n")),
    Case("pt-full-pickle", ["compile", "module.pt", "-o", "out.pt"], 3, ns.CaptureError,
         "refusing to load 'module.pt': it is a full pickle (it names torch.nn.modules.container.Sequential), and "
         "unpickling can run arbitrary code; if you trust this file, pass --trust-pickle"),
    Case("pt-payload", ["compile", "evil.pt", "-o", "out.pt"], 3, ns.CaptureError,
         "refusing to load 'evil.pt': it is a full pickle (it names io.open)"),
    Case("pt-payload-inspect", ["inspect", "evil.pt"], 3, ns.CaptureError, "refusing to load 'evil.pt'"),
    Case("pt-payload-blocked-module", ["compile", "evil_system.pt", "-o", "out.pt"], 3, ns.CaptureError,
         f"refusing to load 'evil_system.pt': it is a full pickle (it names {os.system.__module__}.system), and "
         "unpickling can run arbitrary code; if you trust this file, pass --trust-pickle"),
    Case("pt-garbage", ["compile", "garbage.pt", "-o", "out.pt"], 3, ns.CaptureError,
         "cannot load 'garbage.pt': the weights-only reader cannot read it (Unsupported operand 103): not a torch "
         "file, or a full pickle; if you trust this file, pass --trust-pickle"),
    Case("pt-plain-pickle", ["compile", "plain.pth", "-o", "out.pt"], 3, ns.CaptureError,
         "cannot load 'plain.pth': the weights-only reader cannot read it (Unsupported operand 149): not a torch "
         "file, or a full pickle; if you trust this file, pass --trust-pickle"),
    Case("pt-state-dict", ["compile", "state.pt", "-o", "out.pt"], 3, ns.CaptureError,
         "'state.pt' holds a OrderedDict, not an nn.Module"),
    Case("pt2-untrusted", ["compile", "garbage.pt2", "-o", "out.pt"], 3, ns.CaptureError,
         "refusing to load 'garbage.pt2': torch.export.load unpickles parts of a .pt2 archive"),
    Case("pt2-corrupt-trusted", ["compile", "garbage.pt2", "--trust-pickle", "-o", "out.pt"], 3, ns.CaptureError,
         "cannot load 'garbage.pt2'"),
    # calibration files
    Case("calib-missing", [*C, "--calib", "nope.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration file 'nope.npy' does not exist"),
    Case("calib-dir", [*C, "--calib", "sub", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration file 'sub' is a directory"),
    Case("calib-unknown-format", [*C, "--calib", "calib.txt", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration file 'calib.txt': unsupported format '.txt' (use .npz, .npy or .pt)"),
    Case("calib-nan", [*C, "--calib", "nan.npy", "-o", "out.pt"], 1, NonFiniteError,
         "calibration batch 0: input 'x' contains NaN (1 of 64 values)"),
    Case("calib-inf", [*C, "--calib", "inf.npy", "-o", "out.pt"], 1, NonFiniteError,
         "calibration batch 0: input 'x' contains Inf (1 of 64 values)"),
    Case("calib-float64", [*C, "--calib", "f64.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration batch 0: input 'x' has dtype float64 but the model expects float32",
         notes=("array.astype(numpy.float32)",)),
    Case("calib-float16", [*C, "--calib", "f16.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration batch 0: input 'x' has dtype float16 but the model expects float32"),
    Case("calib-scalar", [*C, "--calib", "scalar.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration file 'scalar.npy' is a 0-d tensor (a single number); expected samples [N, ...]"),
    Case("calib-junk-pt", [*C, "--calib", "junk.pt", "-o", "out.pt"], 1, ns.InputMismatchError,
         "cannot read calibration file 'junk.pt': struct.error: unpack requires a buffer of 4 bytes"),
    Case("calib-object-array", [*C, "--calib", "obj.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "cannot read calibration file 'obj.npy': it is not a plain NumPy array file"),
    Case("calib-garbage-npy", [*C, "--calib", "garbage.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "cannot read calibration file 'garbage.npy'"),
    Case("calib-strings", [*C, "--calib", "strings.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration file 'strings.npy' holds an array of dtype <U1, expected numbers"),
    Case("calib-wrong-shape", [*C, "--calib", "wide.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration batch 0: input 'x' has shape [16, 5] but the model expects [N, 4]"),
    Case("calib-empty", [*C, "--calib", "empty.npy", "-o", "out.pt"], 1, ns.InputMismatchError,
         "calibration data is empty"),
    Case("calib-pickled-objects", [*C, "--calib", "objects.pt", "-o", "out.pt"], 1, ns.InputMismatchError,
         "cannot read calibration file 'objects.pt': it holds pickled Python objects"),
    Case("calib-not-torch", [*C, "--calib", "text.pt", "-o", "out.pt"], 1, ns.InputMismatchError,
         "cannot read calibration file 'text.pt': it is not a file torch.save wrote (Unsupported operand 103)"),
    # policies
    Case("policy-missing", [*C, "-p", "nope.sqz", "-o", "out.pt"], 2, ns.PolicyError,
         "error: cannot read policy 'nope.sqz': no such file"),
    Case("policy-is-dir", [*C, "-p", "sub", "-o", "out.pt"], 2, ns.PolicyError,
         "cannot read policy 'sub': it is a directory"),
    Case("policy-not-utf8", [*C, "-p", "latin1.sqz", "-o", "out.pt"], 2, ns.PolicyError,
         "cannot read policy 'latin1.sqz': not UTF-8 text (byte 5)"),
    Case("policy-syntax", [*C, "-p", "syntax.sqz", "-o", "out.pt"], 2, ns.PolicyError, "syntax.sqz:"),
    Case("budget-not-met", [*C, "-p", "tight.sqz", "-o", "out.pt"], 1, ns.BudgetError,
         "tight.sqz:2:10: error: budget params <= 10.0% not met",
         setup=lambda ws: user_file(ws, "tight.sqz", "policy p {\n  budget params <= 10%\n  fold_bn\n}\n")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_catalogue(case: Case, ws: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    if case.setup is not None:
        case.setup(ws)
    seen: list[BaseException] = []
    printer = cli._print_error

    def record(e: ns.NetsqueezeError, verbose: bool) -> None:
        seen.append(e)
        printer(e, verbose)

    monkeypatch.setattr(cli, "_print_error", record)
    before = snapshot(ws)
    if case.error is None:
        with pytest.raises(SystemExit) as exc:
            cli.main(case.argv)
        code = exc.value.code
    else:
        code = cli.main(case.argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.message in err
    if case.error is not None:
        assert len(seen) == 1 and type(seen[0]) is case.error, seen
        assert err.startswith(str(seen[0]))
    tail = err[err.index(case.message) + len(case.message):]
    for fragment in case.notes:
        assert fragment in tail
    assert "Traceback" not in err or case.notes  # a user's traceback only, never netsqueeze's
    assert snapshot(ws) == before


def test_catalogue_is_large_enough() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert len({c.id for c in API_CASES}) == len(API_CASES) >= 20


# ---- the API catalogue ----------------------------------------------------------------------------------
def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval(), (torch.randn(2, 4),)


def nan_model(weight: bool = False) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """An MLP whose output is NaN: through a NaN weight (refused by name before any run), or, with finite
    weights, through 0 / 0 of its activations."""
    model, inputs = mlp()
    if weight:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        return model, inputs

    class ZeroOverZero(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0 / (x * 0)

    return torch.nn.Sequential(*model, ZeroOverZero()).eval(), inputs


class RaisingLoader:
    """A data loader whose second batch fails."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield torch.randn(4, 4)
        raise RuntimeError("the loader broke")


@dataclass(frozen=True)
class ApiCase:
    id: str
    kwargs: Callable[[], dict[str, Any]]  # compile() arguments besides the model (mlp unless `model` given)
    error: type[ns.NetsqueezeError]
    message: str
    note: str | None = None  # a fragment of the attached traceback note


GUARD_TOP1 = "policy p {\n  guard top1 drop <= 1%\n  fold_bn\n}\n"
API_CASES = [
    ApiCase("policy-int", lambda: {"policy": 42}, ns.NetsqueezeError,
            "policy is a int: expected a policy file path, policy text, a parsed Policy or a list of Pass instances"),
    ApiCase("policy-pass-class", lambda: {"policy": [FoldBN]}, ns.NetsqueezeError,
            "policy list entry FoldBN is a Pass class: pass an instance, FoldBN()"),
    ApiCase("policy-missing-file", lambda: {"policy": "nope.sqz"}, ns.PolicyError,
            "cannot read policy 'nope.sqz': no such file"),
    ApiCase("target", lambda: {"target": "tflite"}, ns.NetsqueezeError, "unknown target 'tflite'"),
    ApiCase("precision-int8", lambda: {"precision": "int8"}, ns.NetsqueezeError,
            "unknown precision 'int8' (use 'fp32' or 'fp16'; int8 is a pass: put `quantize` or `quantize_weights` in the policy)"),
    ApiCase("input-shapes", lambda: {"input_shapes": {"x": (1, -3)}}, ns.InputMismatchError,
            "input shape for 'x' is [1, -3]: dims must be positive integers"),
    ApiCase("example-nan", lambda: {"example_inputs": (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]),)},
            NonFiniteError, "example input 0 contains NaN (1 of 4 values)"),
    ApiCase("example-inf", lambda: {"example_inputs": torch.full((2, 4), float("inf"))},
            NonFiniteError, "example input 0 contains Inf (8 of 8 values)"),
    ApiCase("example-str", lambda: {"example_inputs": ("x",)}, ns.InputMismatchError,
            "example input 0 is a str, not a torch.Tensor"),
    ApiCase("example-dict", lambda: {"example_inputs": {"x": 1}}, ns.InputMismatchError,
            "example_inputs is a dict; expected a tensor or a tuple of tensors"),
    ApiCase("calib-0d", lambda: {"calibration": torch.tensor(1.0)}, ns.InputMismatchError,
            "calibration data is a 0-d tensor (a single number); expected samples [N, ...]"),
    ApiCase("calib-0d-batch", lambda: {"calibration": [torch.tensor(1.0)]}, ns.InputMismatchError,
            "calibration batch 0 holds a 0-d tensor (a single number)"),
    ApiCase("calib-float64-batches", lambda: {"calibration": [torch.randn(4, 4, dtype=torch.float64)]},
            ns.InputMismatchError, "calibration batch 0: input 'input' has dtype float64 but the model expects float32"),
    ApiCase("calib-nan-tensor", lambda: {"calibration": torch.full((8, 4), float("nan"))}, NonFiniteError,
            "calibration batch 0: input 'input' contains NaN (32 of 32 values)"),
    ApiCase("calib-int", lambda: {"calibration": 42}, ns.InputMismatchError,
            "calibration data of type int is not a tensor, a file or an iterable of batches"),
    ApiCase("calib-item-str", lambda: {"calibration": ["abc"]}, ns.InputMismatchError,
            "calibration batch 0 is a str; expected a tensor or a tuple of tensors"),
    ApiCase("calib-iterator-raises", lambda: {"calibration": RaisingLoader()}, UserCodeError,
            "the calibration iterator (producing item 1) raised RuntimeError: the loader broke",
            note="in __iter__"),
    ApiCase("calib-ragged-tuple", lambda: {"calibration": (torch.randn(8, 4), torch.randn(6, 4))},
            ns.InputMismatchError, "calibration data: its tensors have different sample counts (8, 6)"),
    ApiCase("eval-fn-str", lambda: {"policy": GUARD_TOP1, "eval_fn": lambda m: "high"}, UserCodeError,
            "eval_fn on the original model returned 'high' (str); expected a number"),
    ApiCase("eval-fn-none", lambda: {"policy": GUARD_TOP1, "eval_fn": lambda m: None}, UserCodeError,
            "eval_fn on the original model returned None (NoneType); expected a number"),
    ApiCase("eval-fn-nan", lambda: {"policy": GUARD_TOP1, "eval_fn": lambda m: math.nan}, NonFiniteError,
            "eval_fn on the original model returned nan; expected a finite number"),
    ApiCase("eval-fn-inf-tensor", lambda: {"eval_fn": lambda m: torch.tensor(float("inf"))}, NonFiniteError,
            "eval_fn on the original model returned inf; expected a finite number"),
    ApiCase("eval-fn-raises", lambda: {"eval_fn": lambda m: m.nope()}, UserCodeError,
            "eval_fn on the original model raised AttributeError", note="<lambda>"),
    ApiCase("eval-fn-not-callable", lambda: {"eval_fn": 3}, ns.NetsqueezeError,
            "eval_fn is a int, not a function of the model"),
    ApiCase("pt-untrusted", lambda: {"model": "module.pt", "policy": []}, ns.CaptureError,
            "refusing to load 'module.pt': it is a full pickle"),
    ApiCase("pt2-untrusted", lambda: {"model": "garbage.pt2", "policy": []}, ns.CaptureError,
            "refusing to load 'garbage.pt2'"),
    ApiCase("original-output-nan", lambda: {"model": nan_model(), "calibration": torch.randn(8, 4)}, NonFiniteError,
            "the original model's output 0 on calibration batch 0 contains NaN"),
    ApiCase("weight-nan", lambda: {"model": nan_model(weight=True), "calibration": torch.randn(8, 4)}, NonFiniteError,
            "param 'weight' of node '0' holds 1 NaN or Inf value(s) of 32: the model's weights must be finite"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_catalogue(case: ApiCase, ws: Path) -> None:
    kwargs = case.kwargs()
    model: Any = kwargs.pop("model", None)
    policy = kwargs.pop("policy", [FoldBN(), DeadCode()])
    if model is None:
        model, inputs = mlp()
        kwargs.setdefault("example_inputs", inputs)
    elif isinstance(model, tuple):
        model, inputs = model
        kwargs.setdefault("example_inputs", inputs)
    before = snapshot(ws)
    with pytest.raises(case.error) as exc:
        ns.compile(model, policy, **kwargs)
    assert type(exc.value) is case.error
    assert case.message in str(exc.value)
    if case.note is not None:
        assert any(case.note in n for n in getattr(exc.value, "__notes__", []))
    assert snapshot(ws) == before


# ---- things that must work, and the guard ----------------------------------------------------------------
def test_trusted_pickle_loads(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "in.sqz").write_text("policy p {\n  input x: float32[2, 4]\n  fold_bn\n}\n")
    assert cli.main(["compile", "module.pt", "--trust-pickle", "-p", "in.sqz", "-o", "out.onnx"]) == 0
    model, _ = api.load_model_file("module.pt", trust_pickle=True)
    assert isinstance(model, torch.nn.Sequential)
    assert (ws / "out.onnx").stat().st_size > 0


def test_policy_with_a_byte_order_mark(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "bom.sqz").write_bytes(b"\xef\xbb\xbf" + POLICY.encode())
    assert cli.main(["compile", "m.py", "-p", "bom.sqz", "-o", "out.pt"]) == 0, capsys.readouterr().err
    assert torch.load(ws / "out.pt", weights_only=False)(torch.randn(2, 4)).shape == (2, 3)
    assert [p.name for p in ws.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    res = ns.compile(*mlp()[:1], "bom.sqz", example_inputs=mlp()[1])
    assert [r.name for r in res.report.passes] == ["fold_bn", "dead_code"]


def test_nan_fidelity_fails_the_guard() -> None:
    guard = type("G", (), {"metric": "output_error", "limit": 0.05, "span": None})()
    with pytest.raises(ns.BudgetError, match=re.escape("guard output error <= 5.00% not met: reached nan%")):
        api._check_guard(guard, {"output_error": math.nan})
    model, inputs = mlp()
    graph = ns.import_model(model, inputs)
    measure = api._Fidelity(graph, None, lambda m: math.nan)
    with pytest.raises(NonFiniteError, match="eval_fn on the original model returned nan"):
        measure(graph, "top1_drop")
    calls = iter([0.9, math.inf])
    measure = api._Fidelity(graph, None, lambda m: next(calls))
    with pytest.raises(NonFiniteError, match="eval_fn on the candidate model returned inf"):
        measure(graph, "top1_drop")


def test_a_model_that_updates_its_buffers_comes_back_unchanged() -> None:
    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("running", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            self.running.mul_(0.9).add_(x.mean(0))
            return self.fc(x)

    model = Counting().eval()
    x = torch.randn(2, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_before = x.clone()
    ns.compile(model, [FoldBN()], example_inputs=(x,), calibration=torch.randn(8, 4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before)


def test_internal_error_names_the_stage_and_asks_for_a_report(ws: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("lost node")

    monkeypatch.setattr(api, "graph_stats", broken)
    before = snapshot(ws)
    assert cli.main(["compile", "m.py", "-o", "out.pt"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: internal error while importing the model: KeyError: 'lost node'\n"
                          "  note: this is a bug in netsqueeze: please report it")
    assert "Traceback" not in err
    assert cli.main(["compile", "m.py", "-o", "out.pt", "--verbose"]) == 4
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "KeyError: 'lost node'" in err
    with pytest.raises(InternalError, match="internal error while importing the model"):
        ns.compile(*mlp()[:1], [], example_inputs=mlp()[1])
    assert snapshot(ws) == before


def test_unexpected_exception_outside_compile_is_an_internal_error(ws: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "out.pt").write_bytes(b"OLD")
    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)  # f: the open temporary file
        f.flush()
        f.truncate(100)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "save", half_then_fail)
    before = snapshot(ws)
    assert cli.main(["compile", "m.py", "-o", "out.pt"]) == 4
    assert "error: internal error: RuntimeError: disk on fire\n" in capsys.readouterr().err
    assert snapshot(ws) == before  # the old output is intact and no temporary file is left


def test_keyboard_interrupt_during_the_write_keeps_the_old_output(ws: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "out.onnx").write_bytes(b"OLD")
    import onnx

    def interrupted(model: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    before = snapshot(ws)
    assert cli.main(["compile", "m.py", "-o", "out.onnx"]) == 130
    assert capsys.readouterr().err.endswith("interrupted\n")
    assert snapshot(ws) == before


# ---- interrupts in a child process ----------------------------------------------------------------------
CHILD = """\
import signal, sys, time
import torch
signal.signal(signal.SIGINT, signal.default_int_handler)
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)  # f: the open temporary file
    f.flush()
    with open(f.name, "rb") as fh:
        data = fh.read()
    with open(f.name, "wb") as fh:  # half the bytes, then a stall: a kill now truncates whatever file this is
        fh.write(data[: len(data) // 2])
        fh.flush()
        print("WRITING", flush=True)
        for _ in range(600):  # short sleeps: a signal that lands on a torch worker thread is only acted on
            time.sleep(0.1)   # by the main thread between bytecodes, not during one long sleep
        fh.write(data[len(data) // 2:])

torch.save = slow_save
from netsqueeze.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(proc: subprocess.Popen[str], marker: str, timeout: float) -> None:
    """Blocks until the child prints `marker` (read on a thread, so a silent hang cannot block the test)."""
    done = threading.Event()
    found: list[bool] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == marker:
                found.append(True)
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not (done.wait(timeout) and found):
        proc.kill()
        raise AssertionError(f"child never started writing: {proc.communicate()[1]}")


def test_signals_during_a_write_never_leave_a_truncated_output(ws: Path) -> None:
    """Three children stall half-way through writing their output; each gets a signal. SIGINT and SIGTERM
    exit 130/143 and clean up; SIGKILL cannot, but the output is still the old file (or none)."""
    sigs = {"int": (signal.SIGINT, 130), "term": (signal.SIGTERM, 143), "kill": (signal.SIGKILL, -9)}
    old = {"int": True, "term": False, "kill": True}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {}
    for key in sigs:
        out = ws / f"{key}.pt"
        if old[key]:
            out.write_bytes(b"OLD")
        procs[key] = subprocess.Popen([sys.executable, "-c", CHILD, "compile", "m.py", "-o", out.name],
                                      cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for key, (sig, code) in sigs.items():
            proc = procs[key]
            _wait_for(proc, "WRITING", 60)
            proc.send_signal(sig)
            proc.wait(30)
            assert proc.returncode == code, (key, proc.communicate())
            out = ws / f"{key}.pt"
            if old[key]:
                assert out.read_bytes() == b"OLD"
            else:
                assert not out.exists()
            leftovers = [p.name for p in ws.iterdir() if p.name.startswith(f".{key}.")]
            assert leftovers == [] or sig == signal.SIGKILL, leftovers  # SIGKILL cannot clean up its temp file
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def test_pickle_payloads_do_not_run(ws: Path) -> None:
    with pytest.raises(ns.CaptureError, match=re.escape("refusing to load 'evil.pt'")):
        api.load_model_file("evil.pt")
    assert not (ws / "pwned").exists()
    assert pickle.dumps(Evil())  # the payload is real: a trusted load would run it
