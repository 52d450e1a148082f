"""The `processes` executor's spawned workers and the caller's script: they must not run it again (a script
without an `if __name__ == "__main__":` guard ran once more per worker, its compile and side effects too),
except where a task's function is defined in it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

UNGUARDED = """\
import os
import torch
import netsqueeze as ns

with open({log!r}, "a") as f:
    f.write(f"ran in {{os.getpid()}}\\n")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 4)).eval()
x = torch.randn(256, 16)
res = ns.compile(model, "policy p {{\\n  net_trim {{ }}\\n}}\\n", example_inputs=(x[:2],), calibration=x,
                 executor="processes:2", progress=False)
print("nonzeros", res.report.after.nonzeros)
"""

MAIN_TASK = """\
from netsqueeze.passes.executor import Processes


def square(v: int) -> int:
    return v * v


if __name__ == "__main__":
    with Processes(2) as ex:
        print(ex.map(square, [1, 2, 3, 4]))
"""


def _run(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(text)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_workers_do_not_run_an_unguarded_script_again(tmp_path: Path) -> None:
    """net_trim's solves on 2 spawned workers (the default executor, with as many workers as cores): the script's
    top level ran 3 times, and each worker's compile failed to start its own pool."""
    log = tmp_path / "ran.log"
    out = _run(tmp_path, UNGUARDED.format(log=str(log)))
    assert out.returncode == 0, out.stderr
    assert len(log.read_text().splitlines()) == 1
    assert "bootstrapping" not in out.stderr + out.stdout
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["nonzeros"]


def test_a_task_defined_in_the_script_still_reaches_the_workers(tmp_path: Path) -> None:
    out = _run(tmp_path, textwrap.dedent(MAIN_TASK))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1, 4, 9, 16]"
