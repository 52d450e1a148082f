"""Same-numbers check for changes that must not move results: the benchmark VGG (trained once, cached)
through squeeze_fold at params <= 20.4% and <= 50% and trim l1 at flops <= 65%, top-1 on the full
Fashion-MNIST test set. Run it before and after a change (e.g. in a `git worktree` of the old commit
sharing `benchmarks/cache`) and compare the tables.

    .venv/bin/python benchmarks/regression.py      → benchmarks/results/regression.md
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, accuracy, fashion_mnist, markdown_table, trained  # noqa: E402
from benchmarks.squeeze import run_ns  # noqa: E402

CASES = [(["fold_bn", "squeeze_fold"], {"params": 0.204}), (["fold_bn", "squeeze_fold"], {"params": 0.5}),
         (["fold_bn", "trim { criterion = l1 }"], {"flops": 0.65})]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data = fashion_mnist()
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:2048]]
    model = trained("vgg", data)
    rows = [["original", "-", "1.000x", "1.000x", f"{accuracy(model, data['test_x'], data['test_y']):.2%}", "-"]]
    for passes, budget in CASES:
        t0 = time.perf_counter()
        res, _, _ = run_ns(model, passes, calib, budget)
        acc = accuracy(res.model, data["test_x"], data["test_y"])
        rows.append([passes[-1], ", ".join(f"{k} <= {v:.1%}" for k, v in budget.items()),
                     f"{res.report.params_ratio:.3f}x", f"{res.report.flops_ratio:.3f}x", f"{acc:.2%}",
                     f"{time.perf_counter() - t0:.0f}"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    table = markdown_table(["method", "budget", "params", "FLOPs", "top-1", "s"], rows)
    print(table)
    out = RESULTS / "regression.md"
    out.write_text(f"# Same-numbers check (commit {commit.strip() or '?'})\n\nVGG-style, full Fashion-MNIST "
                   f"test set, 2,048 calibration images, channel counts rounded to 8.\n\n{table}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
