"""squeeze_fold calibrated on few images, with and without the shrinkage of its covariances.

With no more calibration rows than a consumer's channels (images x positions for a conv; the last stages of the
benchmark models run at 7x7 and 3x3, so 16 to 32 images), a sample covariance has rank below the channel count
and the search reads the channels as redundant down to that rank. `squeeze_fold` then ranks every group on its
covariance shrunk toward its diagonal (`squeeze_math.shrink`); `ablation(shrinkage=False)` is the pass without.
The compile is benchmarks/squeeze.py's (`squeeze_fold` then `fold_bn`, `bounds { round_to = 8, align = auto }`)
at a FLOPs budget; each size runs on `DRAWS` random draws of the calibration images (the same draws with and
without). Writes benchmarks/results/squeeze-few-samples.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import accuracy, fashion_mnist, markdown_table, trained, write_result
from benchmarks.squeeze import ALIGN, ROUND_TO, bounds_text, run_ns
from netsqueeze.passes.squeeze_fold import ablation

SIZES = (16, 32, 64, 128)
DRAWS = 3
POINTS = (("vgg", 2.0), ("vgg", 3.0), ("resnet", 2.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="calibration images (comma-separated)")
    ap.add_argument("--draws", type=int, default=DRAWS, help="random draws of the calibration images per size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    data = fashion_mnist()
    test = (data["test_x"], data["test_y"])
    rows = []
    for name, target in POINTS:
        model = trained(name, data)
        base = accuracy(model, *test)
        for n in sizes:
            drops: dict[bool, list[float]] = {False: [], True: []}
            rho = 0.0
            for draw in range(args.draws):
                pick = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(100 + draw))[:n]
                calib = data["train_x"][pick]
                for shrinkage in (False, True):
                    with ablation(shrinkage=shrinkage):
                        res, secs, _ = run_ns(model, ["squeeze_fold", "fold_bn"], calib, {"flops": 1.0 / target},
                                              ROUND_TO, ALIGN, 0)
                    drops[shrinkage].append((base - accuracy(res.model, *test)) * 100)
                    if shrinkage:
                        rho = max(rho, res.report.passes[0].result.metrics.get("shrinkage", 0.0))
                    print(f"  {name} flops {target:g}x {n} images draw {draw} shrinkage {shrinkage}: drop "
                          f"{drops[shrinkage][-1]:.2f} pts ({secs:.1f} s)", file=sys.stderr, flush=True)

            def mean(v: list[float]) -> float:
                return sum(v) / len(v)

            rows.append([name, f"flops {target:g}x", str(n), " / ".join(f"{d:.2f}" for d in drops[False]),
                         f"{mean(drops[False]):.2f}", " / ".join(f"{d:.2f}" for d in drops[True]),
                         f"{mean(drops[True]):.2f}", f"{rho:.2f}" if rho else "- (none shrunk)"])
    text = "\n\n".join([
        "# squeeze_fold on few calibration images: covariance shrinkage on and off",
        f"Command: `.venv/bin/python -m benchmarks.squeeze_few_samples {' '.join(sys.argv[1:])}` "
        f"({(time.perf_counter() - t_start) / 60:.1f} min). The compile of benchmarks/squeeze.py (`squeeze_fold` "
        f"then `fold_bn`, `bounds {{ {bounds_text(ROUND_TO, ALIGN)} }}`) on n calibration images, "
        f"{args.draws} random draws of them per n (the same draws for both columns), compile seed 0. Drop = the "
        "original's top-1 minus the compressed model's on the 10,000 test images, in points. `shrinkage off` is "
        "the pass with `ablation(shrinkage=False)`: every covariance read as sampled. ρ: the largest shrinkage "
        "intensity the pass reported over the draws (`metrics['shrinkage']`); none shrunk when every consumer "
        "had more rows than channels.",
        markdown_table(["model", "budget", "calibration images", "drop per draw, shrinkage off",
                        "mean, off", "drop per draw, shrinkage on (default)", "mean, on", "largest ρ"], rows),
    ]) + "\n"
    write_result("squeeze-few-samples.md", text)


if __name__ == "__main__":
    main()
