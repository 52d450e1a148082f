"""`trim` on full Fashion-MNIST: every criterion against Torch-Pruning group-L1 / group-Taylor at equal FLOPs.

    .venv/bin/python benchmarks/trim.py [--quick] [--ft-samples N] [--models vgg,resnet]

For the VGG-style and the ResNet-style model of benchmarks/common.py (trained once, cached), at 2x, 3x
and 5x FLOPs reduction: `fold_bn` + `trim` with each criterion (gdnt, l1, l2, bn_scale, activation,
random) driven by a policy's global `budget flops <= X%`, and Torch-Pruning's group-L1 and
group-Taylor pruners bisected to the same FLOPs (`benchmarks.squeeze.tp_prune`). FLOPs and params of
every compressed model are counted alike, by importing the emitted torch module into netsqueeze's IR
(`graph_stats`), relative to the original model. Top-1 one-shot (no fine-tuning) and after one
fine-tuning epoch (on a fixed random subset of the training set when `--ft-samples` is set: see the
results file), compile time. Prints the table and writes benchmarks/results/trim.md
(trim-quick.md with --quick: one FLOPs target, 1000 test images, a short fine-tune).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, accuracy, fashion_mnist, fine_tune, markdown_table, trained
from benchmarks.squeeze import flops_params, run_ns, tp_prune

CRITERIA = ("gdnt", "l1", "l2", "bn_scale", "activation", "random")
TP_KINDS = ("l1", "taylor")
CALIB = 512  # calibration images (policy `calibrate samples`): statistics, bias compensation, gdnt


def cell(name: str, method: str, target: float, base: tuple[int, int], model: nn.Module | None, secs: float,
         test: tuple[torch.Tensor, torch.Tensor], ft_data: dict[str, torch.Tensor]) -> list[str]:
    """One table row: achieved FLOPs/params reduction, one-shot top-1, top-1 after fine-tuning, compile time."""
    if model is None:
        return [name, method, f"{target:g}x", "-", "-", "failed", "failed", f"{secs:.1f}", "-"]
    flops, params = flops_params(model)
    one_shot = accuracy(model, *test)
    t0 = time.perf_counter()
    tuned = accuracy(fine_tune(model, ft_data), *test)
    ft_s = time.perf_counter() - t0
    print(f"  {name} {method} {target:g}x: one-shot {one_shot:.2%}, fine-tuned {tuned:.2%} "
          f"(fine-tune {ft_s:.0f} s)", file=sys.stderr, flush=True)
    return [name, method, f"{target:g}x", f"{base[0] / flops:.2f}x", f"{base[1] / params:.2f}x", f"{one_shot:.2%}",
            f"{tuned:.2%}", f"{secs:.1f}", f"{ft_s:.0f}"]


def pipeline(crit: str) -> list[str]:
    """fold_bn first (as in the docs' policies); bn_scale needs the BatchNorms, so it trims before folding."""
    step = f"trim {{ criterion = {crit} }}"
    return [step, "fold_bn"] if crit == "bn_scale" else ["fold_bn", step]


def write_section(path: Path, name: str, section: str) -> str:
    """Replaces (or adds) the `## model: NAME` section of the results file, keeping the other models'."""
    head = "# trim on Fashion-MNIST: criteria vs Torch-Pruning at equal FLOPs\n"
    parts: dict[str, str] = {}
    if path.exists():
        for chunk in path.read_text().split("\n## model: ")[1:]:
            key = chunk.split("\n", 1)[0].strip()
            parts[key] = "## model: " + chunk.split("\n## Discussion", 1)[0].rstrip() + "\n"
    parts[name] = section
    order = [m for m in ("vgg", "resnet") if m in parts] + sorted(set(parts) - {"vgg", "resnet"})
    text = head + "".join("\n" + parts[m] for m in order)
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one FLOPs target (2x), 1000 test images, fine-tune on 256 images")
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--targets", default=None, help="FLOPs reduction factors, comma-separated (default 2,3,5)")
    ap.add_argument("--ft-samples", type=int, default=None,
                    help="fine-tune each cell for one epoch on this fixed random subset of the 60,000 training "
                         "images (default: all of them; --quick: 256)")
    ap.add_argument("--round-to", type=int, default=1,
                    help="channel counts in multiples of this for every method (default 1: no rounding, so "
                         "Torch-Pruning's uniform ratio can meet the same FLOPs as trim)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    data = fashion_mnist()
    n_train = len(data["train_x"])
    test = (data["test_x"][:1000], data["test_y"][:1000]) if args.quick else (data["test_x"], data["test_y"])
    targets = [float(t) for t in (args.targets or ("2" if args.quick else "2,3,5")).split(",")]
    ft_n = args.ft_samples if args.ft_samples is not None else (256 if args.quick else n_train)
    ft_n = min(ft_n, n_train)
    ft_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(1))[:ft_n]
    ft_data = {"train_x": data["train_x"][ft_idx], "train_y": data["train_y"][ft_idx]}
    calib = data["train_x"][torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[:CALIB]]

    out_path = RESULTS / ("trim-quick.md" if args.quick else "trim.md")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = " ".join([".venv/bin/python", "benchmarks/trim.py", *sys.argv[1:]])
    for name in args.models.split(","):
        t_model = time.perf_counter()
        rows: list[list[str]] = []
        failures: list[str] = []
        model = trained(name, data)
        base = flops_params(model)
        # the unpruned model fine-tuned alike: what the extra epoch alone is worth, and its time
        rows.append(cell(name, "original", 1.0, base, copy.deepcopy(model), 0.0, test, ft_data))
        rows[-1][2], rows[-1][7] = "-", "-"
        epoch_s = float(rows[-1][8])
        for target in targets:
            keep = 1.0 / target
            for crit in CRITERIA:
                t0 = time.perf_counter()
                try:
                    res, secs, _ = run_ns(model, pipeline(crit), calib, {"flops": keep}, args.round_to)
                    out: nn.Module | None = res.model
                except Exception as err:  # a failed cell is reported, not fatal
                    secs, out = time.perf_counter() - t0, None
                    failures.append(f"{name} trim {crit} {target:g}x: {type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}")
                    traceback.print_exc()
                rows.append(cell(name, f"trim {crit}", target, base, out, secs, test, ft_data))
            for kind in TP_KINDS:
                t0 = time.perf_counter()
                try:
                    pm: nn.Module | None = tp_prune(model, data, keep, kind, args.round_to)
                except Exception as err:
                    pm = None
                    failures.append(f"{name} torch-pruning {kind} {target:g}x: {type(err).__name__}: {err}")
                    traceback.print_exc()
                rows.append(cell(name, f"torch-pruning group-{kind}", target, base, pm, time.perf_counter() - t0,
                                 test, ft_data))

            ft_label = "after 1 epoch FT" if ft_n == n_train else f"after 1 epoch FT on {ft_n:,}-image subset"
            header = ["model", "method", "target", "FLOPs reduction", "params reduction", "top-1 one-shot", ft_label,
                      "compile s", "fine-tune s"]
            section = "\n\n".join([
                f"## model: {name}",
                *([] if target == targets[-1] else
                  [f"**Incomplete: written after the {target:g}x target; the run went on to the next target.**"]),
                f"Command: `{cmd}` ({name}: {(time.perf_counter() - t_model) / 60:.1f} min; whole run so far "
                f"{(time.perf_counter() - t_start) / 60:.1f} min)",
                f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores shared with other "
                f"jobs (times are noisy), torch {torch.__version__}, {torch.get_num_threads()} threads",
                f"Test images: {len(test[0]):,}; calibration: {CALIB} training images; channel counts rounded to "
                f"multiples of {args.round_to} for every method; fine-tuning: one epoch (AdamW, "
                "lr 5e-4, one-cycle, batch 128, flips) on "
                + ("all 60,000 training images" if ft_n == n_train else
                   f"**a fixed random subset of {ft_n:,} of the 60,000 training images (seed 1), not a full epoch**")
                + f"; fine-tuning the unpruned {name} alike took {epoch_s:.0f} s here (its row).",
                markdown_table(header, rows),
            ]) + "\n"
            if failures:
                section += "\nFailed cells:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
            print(section if target == targets[-1] else f"({name}: {target:g}x done)", flush=True)
            write_section(out_path, name, section)
            print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
