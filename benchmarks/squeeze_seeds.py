"""squeeze_fold's one-shot top-1 across compile seeds, at the FLOPs points issue 17's drop targets name.

    flock /tmp/bench.lock nice -n 5 .venv/bin/python -m benchmarks.squeeze_seeds [--seeds 5]

benchmarks/squeeze.py compiles each point once, with seed 0. The layer refit draws its fitting rows (positions of
each calibration sample) and its held-out share at random, seeded by the compile's seed, so another seed keeps other
weights at the same channel counts. This runs the squeeze.py compile (`squeeze_fold` then `fold_bn`, `budget flops
<= X%`, `bounds { round_to = 8, align = auto }`, the same 2,048 calibration images) with seeds 0..N-1 at VGG 2x / 3x
and ResNet 2x fewer FLOPs, and reports each seed's top-1 drop on the 10,000 test images, their mean and range, and
how many seeds meet the target. Writes benchmarks/results/squeeze-seeds.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import accuracy, fashion_mnist, markdown_table, trained, write_result
from benchmarks.squeeze import ALIGN, ROUND_TO, run_ns

CALIB = 2048
# (model, FLOPs reduction, the most points it may lose): issue 17's one-shot targets
POINTS = (("vgg", 2.0, 1.0), ("vgg", 3.0, 2.0), ("resnet", 2.0, 2.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5, help="compile seeds 0..N-1 (default 5)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    data = fashion_mnist()
    test = (data["test_x"], data["test_y"])
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:CALIB]]
    rows = []
    for name, target, limit in POINTS:
        model = trained(name, data)
        base = accuracy(model, *test)
        drops = []
        for seed in range(args.seeds):
            res, secs, _ = run_ns(model, ["squeeze_fold", "fold_bn"], calib, {"flops": 1.0 / target}, ROUND_TO,
                                  ALIGN, seed)
            drops.append((base - accuracy(res.model, *test)) * 100)
            print(f"  {name} flops {target:g}x seed {seed}: drop {drops[-1]:.2f} pts ({secs:.1f} s)", file=sys.stderr,
                  flush=True)
        mean = sum(drops) / len(drops)
        rows.append([name, f"flops {target:g}x", f"<= {limit:g}", " / ".join(f"{d:.2f}" for d in drops),
                     f"{mean:.2f}", f"{min(drops):.2f}–{max(drops):.2f}",
                     f"{sum(d <= limit for d in drops)}/{len(drops)}", "met" if mean <= limit else "**missed**"])
    text = "\n\n".join([
        "# squeeze_fold one-shot top-1 drop across compile seeds",
        f"Command: `.venv/bin/python -m benchmarks.squeeze_seeds {' '.join(sys.argv[1:])}` "
        f"({(time.perf_counter() - t_start) / 60:.1f} min). The compile of benchmarks/squeeze.py (`squeeze_fold` then "
        f"`fold_bn`, `bounds {{ round_to = {ROUND_TO}, align = {ALIGN} }}`, {CALIB:,} calibration images) with each "
        "compile seed (the layer refit's rows and held-out share are drawn by it); drop = the original's top-1 minus "
        "the compressed model's, on the 10,000 test images, in points; squeeze.md's rows are seed 0.",
        markdown_table(["model", "budget", "target drop (pts)", "drop per seed", "mean", "range", "seeds within",
                        "target on the mean"], rows),
    ]) + "\n"
    write_result("squeeze-seeds.md", text)


if __name__ == "__main__":
    main()
