"""How squeeze_fold's search should learn how much each group's reconstruction error reaches the outputs:
measured (`output`: each group squeezed alone, the output error measured, twice) against the first-order
estimate (`first_order`: one backward pass of a random projection of the outputs, inside the statistics pass),
on both benchmark models at several calibration sizes, one-shot, under FLOPs budgets. `auto` (the default
until this table showed the estimate as good or better where `auto` measures; the default is now `first_order`)
measures when `SqueezeFold._measure_cost` estimates the measurements at most `SENSITIVITY_PASSES` model passes
over the calibration data, else estimates; the `auto` column says which it picked.

    .venv/bin/python benchmarks/squeeze_sensitivity.py [--calib 256,512,1024,2048] [--targets 2,3,5]
        → benchmarks/results/squeeze-sensitivity.md

Same models, calibration subset (the first N of benchmarks/squeeze.py's fixed random order of the training
images), policy (`squeeze_fold` then `fold_bn`, `bounds { round_to = 8 }`, batches of 256) and test set as
benchmarks/squeeze.py; torch with 1 thread; compile seconds on a 2-core machine (noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import accuracy, fashion_mnist, markdown_table, trained, write_result
from benchmarks.squeeze import _notes, run_ns
from netsqueeze.passes.squeeze_fold import SENSITIVITY_PASSES, ablation

WAYS = {"output": "measured output sensitivity", "first_order": "first-order estimate"}


def weighting(res: ns.CompileResult) -> str:
    """Which sensitivity the compile's search used, read from its note."""
    line = next((n for n in _notes(res) if n.startswith("search")), "")
    return next((k for k, words in WAYS.items() if words in line), "?")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", default="256,512,1024,2048", help="calibration sizes (images)")
    ap.add_argument("--targets", default="2,3,5", help="FLOPs reductions")
    ap.add_argument("--models", default="vgg,resnet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    data = fashion_mnist()
    order = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))
    test = (data["test_x"], data["test_y"])
    rows: list[list[str]] = []
    wins = {"output": 0, "first_order": 0, "tie": 0}
    for name in args.models.split(","):
        model = trained(name, data)
        base = accuracy(model, *test)
        for n in (int(c) for c in args.calib.split(",")):
            calib = data["train_x"][order[:n]]
            for target in (float(t) for t in args.targets.split(",")):
                got = {}
                res, secs, _ = run_ns(model, ["squeeze_fold", "fold_bn"], calib, {"flops": 1.0 / target})
                auto = weighting(res)
                got[auto] = (res, secs)
                other = "first_order" if auto == "output" else "output"
                with ablation(sensitivity=other):
                    got[other] = run_ns(model, ["squeeze_fold", "fold_bn"], calib, {"flops": 1.0 / target})[:2]
                drops = {k: 100 * (base - accuracy(r.model, *test)) for k, (r, _) in got.items()}
                best = min(drops.values())
                ahead = [k for k, d in drops.items() if d <= best + 0.05]
                wins["tie" if len(ahead) == 2 else ahead[0]] += 1
                row = [name, f"{n:,}", f"{target:g}x", auto]
                for k in WAYS:
                    r, s = got[k]
                    row += [f"{drops[k]:+.2f}", f"{r.report.flops_ratio:.2f}x", f"{s:.1f}",
                            f"{r.report.calibration_passes:.1f}"]
                rows.append(row)
                print(" | ".join(row), file=sys.stderr, flush=True)
    header = ["model", "calib. images", "FLOPs target", "auto picks"]
    for k in WAYS:
        header += [f"{k}: drop (pts)", f"{k}: FLOPs red.", f"{k}: compile s", f"{k}: calib. passes"]
    minutes = (time.perf_counter() - t_start) / 60
    text = "\n\n".join([
        "# squeeze_fold: measured output sensitivity against the first-order estimate",
        f"Command: `.venv/bin/python benchmarks/squeeze_sensitivity.py {' '.join(sys.argv[1:])}`, {minutes:.0f} min. "
        "Models, calibration subset, policy (`squeeze_fold` then `fold_bn` under `budget flops <= X%`, "
        "`bounds { round_to = 8, align = 1 }`, batches of 256) and test set (10,000 images) as benchmarks/squeeze.py. "
        "`output`: each group squeezed alone and the output error measured, over the leading 256 calibration "
        "samples, twice; `first_order`: one backward pass of a random projection of the outputs over the same "
        "samples, inside the statistics pass. `auto picks`: what `auto` chose (the default before `first_order`; it measures when the "
        f"measurements are estimated at most {SENSITIVITY_PASSES:g} model passes over the calibration data). "
        "drop = original top-1 less the one-shot model's, in points; compile s on 1 torch thread of a noisy "
        "2-core machine; calib. passes = `CompileReport.calibration_passes` (forward passes: the first-order "
        "estimate's backward pass is not counted).",
        markdown_table(header, rows),
        f"Within 0.05 points of the better drop: `output` alone at {wins['output']} points, `first_order` alone "
        f"at {wins['first_order']}, both at {wins['tie']}.",
    ])
    write_result("squeeze-sensitivity.md", text)


if __name__ == "__main__":
    main()
