"""Same inputs, same policy, same seed: byte-identical emitted files for both targets and identical
reports apart from timings, across processes (each compile runs in its own interpreter, with its own
hash seed and allocation history, so thread, allocator and set-order effects show).

The regression this guards: squeeze_fold's cascade refit solved its normal equations with
`torch.linalg.lstsq` (LAPACK gelsy), to which PyTorch passes an uninitialised pivot array, so the
flatten→linear fold of the VGG below changed by up to 4e-9 from run to run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]

SQUEEZE = "policy p { fold_bn squeeze_fold { energy = 90% } dead_code }"
TRIM = "policy p { budget flops <= 70% fold_bn trim { criterion = activation } dead_code }"
# (name, model, calibration samples, policy, targets)
CASES: list[tuple[str, str, int, str, tuple[Literal["torch", "onnx"], ...]]] = [
    # flatten→linear with enough samples (128 > 24·2·2 features) for the full block fit: every feature its
    # own column; with gelsy this case changed bytes between runs
    ("zoo vgg squeeze_fold", "vgg", 128, SQUEEZE, ("torch", "onnx")),
    ("zoo vgg trim", "vgg", 32, TRIM, ("torch", "onnx")),
]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, set | frozenset):
        return sorted(map(str, x))
    return x if isinstance(x, str | int | float | bool) or x is None else repr(x)


def _report(report: Any) -> str:
    """The report without its timings: its fields (less `times` and each pass's `seconds`) and its text
    (timing cells, the `time:` line and the tables' rules dropped, runs of spaces collapsed: column widths
    follow the timings)."""
    fields = dataclasses.asdict(report)
    fields.pop("times")
    for rec in fields["passes"]:
        rec.pop("seconds")
    text = re.sub(r"\b\d+(\.\d+)? ms\b", "", str(report))
    text = "\n".join(re.sub(r" +", " ", line) for line in text.splitlines()
                     if not line.startswith("time: ") and line.strip(" -"))
    return json.dumps(_plain(fields), sort_keys=True) + "\n" + text


def _child() -> None:
    """Compiles every case and prints {case -> target: {bytes, report}} as JSON."""
    import torch

    import netsqueeze as ns
    from tests.zoo import ZOO

    out: dict[str, dict[str, str]] = {}
    for name, model_name, samples, policy, targets in CASES:
        for target in targets:
            model, inputs = ZOO[model_name]()
            calib = torch.randn(samples, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
            res = ns.compile(model, policy, example_inputs=inputs, calibration=calib, target=target, seed=0)
            if target == "torch":
                buf = io.BytesIO()
                torch.save(res.model.state_dict(), buf)
                data = buf.getvalue()
            else:
                data = res.model.SerializeToString()
            out[f"{name} -> {target}"] = {"bytes": _digest(data), "report": _report(res.report)}
    print(json.dumps(out))


def _start(hash_seed: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    code = "from tests.reliability.test_determinism import _child; _child()"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, dict[str, str]]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-4000:]
    result: dict[str, dict[str, str]] = json.loads(out.strip().splitlines()[-1])
    return result


def test_two_processes_emit_the_same_bytes() -> None:
    # both at once: they also compete for the cores, as unrelated compiles on one machine do
    procs = [_start("1"), _start("2")]
    first, second = (_result(p) for p in procs)
    assert sorted(first) == sorted(f"{n} -> {t}" for n, _, _, _, ts in CASES for t in ts)
    fold = first["zoo vgg squeeze_fold -> torch"]["report"]
    assert "squeezed" in fold and "fits blocks shared" not in fold  # the full flatten→linear fit ran
    for key in first:
        assert first[key]["bytes"] == second[key]["bytes"], f"{key}: emitted bytes differ between runs"
        assert first[key]["report"] == second[key]["report"], f"{key}: reports differ between runs"


def test_saving_the_same_model_twice_writes_the_same_bytes(tmp_path: Path) -> None:
    """`.pt`/`.pt2` are zip archives whose top folder torch names after the path it writes to: the atomic
    write's temporary name was random, so every save differed."""
    import zipfile

    import torch

    from netsqueeze.compiler.files import save_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    example = (torch.randn(2, 4),)  # a .pt2 stores its example inputs
    for suffix in (".pt", ".pt2"):
        a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        save_model(model, a, example)
        save_model(model, b, example)
        assert a.read_bytes() == b.read_bytes(), suffix
        assert {n.split("/")[0] for n in zipfile.ZipFile(a).namelist()} == {"archive"}
