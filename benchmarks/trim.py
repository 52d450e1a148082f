"""`trim` on full Fashion-MNIST, one-shot: criteria, allocation and refit against Torch-Pruning, in one run.

    flock /tmp/bench.lock nice -n 5 .venv/bin/python -m benchmarks.trim [--quick] [--models vgg,resnet]
        [--points flops:2,flops:3] [--fine-tune N] [--out NAME]

For the VGG-style and the ResNet-style model of benchmarks/common.py (trained once, cached), under a policy's
global `budget flops <= X%` and `budget params <= X%` at 2x, 3x and 5x: `fold_bn` + `trim` with its defaults
(global allocation ranked by measured loss per unit of budget, every consumer re-solved whole by least squares
to the original layer's outputs: `refit = layer`) for each
criterion (fewer at 3x/5x and under params budgets, to keep the run short; `random`, the sanity floor every
criterion must beat; every criterion runs with `SEEDS` compile seeds, since the layer refit's sampled rows and
held-out share are seeded (and `gdnt`'s split of its samples, and `random`'s draw): a criterion is judged by the
mean of its draws against `random`'s, and seed by seed, each against `random`'s draw of the same seed); at FLOPs
targets the ablations of
the new choices on `l1` (allocation = uniform, refit = least_squares (the group-by-group fold alone, the default
before `layer`), refit = none, the previous ranking rule score / group mean, and
both old choices together: trim as it was); Torch-Pruning group-L1 with its uniform ratio bisected to the same
budget (`benchmarks.squeeze.tp_prune`), one-shot and with its BatchNorm statistics re-estimated on the same
calibration images (`benchmarks.squeeze.reestimate_bn`). Per row: achieved params/FLOPs reductions (counted
alike for every method by importing the model into netsqueeze's IR), top-1 on the 10,000 test images, ONNX
Runtime latency speed-ups at batch 1 and 64 (2 threads, median) and the batch-64 speed-up over the FLOPs
reduction, compile time and the compile's full calibration passes (`report.calibration_passes`).
`--fine-tune N`: adds top-1 after one epoch on a fixed subset of N training images, with trim's BatchNorms kept
(no `fold_bn`: trimmed, not folded) so they retrain as Torch-Pruning's do. `--points`: only these budget points
(measure:target, comma-separated). Writes benchmarks/results/trim.md (trim-round_to-R-align-A.md with
`--round-to R --align A`, trim-align-1.md with `--align 1`: any count, the default before counts were aligned; a -quick suffix with --quick: ResNet-style at 2x FLOPs only, 2,000 test images;
`--out NAME`: benchmarks/results/NAME.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import (
    RESULTS,
    accuracy,
    fashion_mnist,
    fine_tune,
    markdown_table,
    ort_latency,
    trained,
)
from benchmarks.squeeze import (
    bounds_stem,
    bounds_text,
    flops_params,
    reestimate_bn,
    residual_stem,
    residual_targets_arg,
    run_ns,
    tp_prune,
)
from netsqueeze.compiler.files import atomic_write
from netsqueeze.passes.refit import residual_targets
from netsqueeze.passes.trim import ranking

CALIB = 512  # calibration images (policy `calibrate samples`), also the peers' BatchNorm re-estimation data
TARGETS = (2.0, 3.0, 5.0)
# (measure, target) -> criteria run with trim's defaults; the rest of the grid is kept small for run time
CRITERIA = {("flops", 2.0): ("l1", "l2", "bn_scale", "activation", "gdnt", "random"),
            ("flops", 3.0): ("l1", "l2", "bn_scale", "activation", "random"),
            ("flops", 5.0): ("l1", "bn_scale", "random")}
PARAMS_CRITERIA = ("l1", "random")
# a trim compile's top-1 depends on its seed for every criterion (the layer refit draws its rows and its held-out
# share at random, seeded; `random` and `gdnt` draw their choice too): each criterion runs with this many compile
# seeds (0 is timed and is the `trim CRITERION` row) and is judged by the mean of its draws against `random`'s
SEEDS = 5
# the new choices against the old ones, on l1 at FLOPs targets: (label, trim options, ranking rule)
ABLATIONS = {2.0: (("allocation = uniform", "allocation = uniform", "measured"),
                   ("refit = least_squares (the fold alone)", "refit = least_squares", "measured"),
                   ("refit = none", "refit = none", "measured"),
                   ("ranking score / group mean", "", "mean"),
                   ("as before (mean ranking, no refit)", "refit = none", "mean")),
             3.0: (("allocation = uniform", "allocation = uniform", "measured"),),
             5.0: (("allocation = uniform", "allocation = uniform", "measured"),)}


def pipeline(crit: str, options: str, keep_bn: bool) -> list[str]:
    """fold_bn first (as in the docs' policies), except for bn_scale (it reads the BatchNorms: trim first) and
    when the BatchNorms are kept for fine-tuning."""
    opts = ", ".join(o for o in (f"criterion = {crit}", options) if o)
    step = f"trim {{ {opts} }}"
    if keep_bn:
        return [step]
    return [step, "fold_bn"] if crit == "bn_scale" else ["fold_bn", step]


def ort_ms(model: nn.Module) -> tuple[float, float, float]:
    """ONNX Runtime latency (ms) of `model`, emitted through netsqueeze's ONNX backend: at batch 1 and 64 with the
    worker threads sleeping between parallel sections, and at batch 64 with ONNX Runtime's default busy-waiting."""
    from netsqueeze.backends.onnx import to_onnx

    blob = to_onnx(ns.import_model(model, (torch.randn(2, 1, 28, 28),))).SerializeToString()
    return (ort_latency(blob, 1, runs=30, spinning=False), ort_latency(blob, 64, runs=20, spinning=False),
            ort_latency(blob, 64, runs=20))


@dataclass(frozen=True)
class Base:
    """The original model's figures, which every row of that model is relative to."""

    name: str
    fp: tuple[int, int]
    acc: float
    lat: tuple[float, float, float]
    model: nn.Module


def add_row(rows: list[list[str]], timed: list[tuple[list[str], Base, nn.Module, float]], base: Base,
            test: tuple[torch.Tensor, torch.Tensor], ft_data: dict[str, torch.Tensor] | None, width: int, budget: str,
            method: str, m: nn.Module | None, secs: float, passes: float | None, acc_by: dict[str, float],
            timed_row: bool = True) -> None:
    """Appends one table row for compressed model `m` (None: a failed cell), its latency cells left for
    `time_rows` (or "-" when not `timed_row`); records its top-1 in `acc_by`."""
    if m is None:
        rows.append([base.name, budget, method, "-", "-", "failed", *["-"] * (width - 6)])
        return
    fp = flops_params(m)
    acc = accuracy(m, *test)
    acc_by[method] = acc
    fr = base.fp[0] / fp[0]
    ft = [f"{accuracy(fine_tune(copy.deepcopy(m), ft_data), *test):.2%}"] if ft_data is not None else []
    rows.append([base.name, budget, method, f"{base.fp[1] / fp[1]:.2f}x", f"{fr:.2f}x", f"{acc:.2%}",
                 f"{(base.acc - acc) * 100:.2f}", *ft, *(["", "", "", ""] if timed_row else ["-"] * 4), f"{secs:.1f}",
                 "-" if passes is None else f"{passes:.1f}"])
    if timed_row:
        timed.append((rows[-1], base, m, fr))
    print(f"  {base.name} {budget} {method}: {acc:.2%}, {fr:.2f}x FLOPs, {secs:.1f} s", file=sys.stderr, flush=True)


def draws_of(acc_by: dict[str, float], crit: str) -> list[float]:
    """`crit`'s top-1 per compile seed, in seed order (seed 0 is the `trim CRIT` row)."""
    return [a for m, a in acc_by.items() if m == f"trim {crit}" or m.startswith(f"trim {crit}, seed ")]


def random_verdict(acc_by: dict[str, float], crits: list[str]) -> str | None:
    """Whether every criterion in `crits` beats `random`: the mean of its draws over the compile seeds against the
    mean of `random`'s (the floor), with each draw's range, and per criterion how many seeds it beats `random`'s
    draw of the same seed (the same refit rows); None without a random draw."""
    floor = draws_of(acc_by, "random")
    if not floor:
        return None
    mean = sum(floor) / len(floor)
    own = {c: v for c in crits if (v := draws_of(acc_by, c))}
    lost = [f"{c} {sum(v) / len(v):.2%}" for c, v in own.items() if sum(v) / len(v) <= mean]
    return (f"every criterion's mean over {len(floor)} seeds beats random's ({mean:.2%}; draws "
            f"{min(floor):.2%}–{max(floor):.2%}): " + ("met" if not lost else "missed by " + ", ".join(lost))
            + "; means (draws): " + ", ".join(f"{c} {sum(v) / len(v):.2%} ({min(v):.2%}–{max(v):.2%})"
                                             for c, v in own.items())
            + "; seeds beating random's same seed: "
            + ", ".join(f"{c} {sum(a > b for a, b in zip(v, floor))}/{min(len(v), len(floor))}" for c, v in own.items()))


def time_rows(timed: list[tuple[list[str], Base, nn.Module, float]]) -> list[tuple[str, float, float]]:
    """Fills the latency cells after every compile: each model timed right after its original, so both see the
    same load on a shared machine (speed-up = original / compressed). Returns each row's (method, batch-64 speed-up
    over its FLOPs reduction with the worker threads sleeping, the same busy-waiting), as its cells show them."""
    out = []
    for cells, base, m, fr in timed:
        ref, lat = ort_ms(base.model), ort_ms(m)
        b64, spin = ref[1] / lat[1], ref[2] / lat[2]
        cells[-6:-2] = [f"{ref[0] / lat[0]:.2f}x", f"{b64:.2f}x", f"{b64 / fr:.2f}", f"{spin:.2f}x ({spin / fr:.2f})"]
        out.append((cells[2], round(b64 / fr, 2), round(spin / fr, 2)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="ResNet-style at 2x FLOPs only, 2,000 test images")
    ap.add_argument("--models", default=None, help="comma-separated (default vgg,resnet; --quick: resnet)")
    ap.add_argument("--points", default=None, metavar="M:T,...",
                    help="only these budget points, e.g. flops:2,flops:3 (default: flops and params at 2, 3, 5)")
    ap.add_argument("--out", default=None, metavar="NAME", help="write benchmarks/results/NAME.md")
    ap.add_argument("--fine-tune", type=int, default=0, metavar="N",
                    help="also fine-tune every model one epoch on a fixed subset of N training images (trim's "
                         "BatchNorms then kept, not folded)")
    ap.add_argument("--round-to", type=int, default=1,
                    help="trim's `bounds { round_to }` (default 1: counts not rounded; the peer is never rounded)")
    ap.add_argument("--align", type=int, default=None,
                    help="trim's `bounds { align }` (default: not set, the pass default: counts of 16 or more that a "
                         "convolution computes in whole blocks of 16, ONNX Runtime's AVX-512 conv blocks; 1: any count)")
    residual_targets_arg(ap)
    args = ap.parse_args()
    settings = contextlib.ExitStack()  # what the whole run compiles with
    settings.enter_context(residual_targets(args.residual_targets == "on"))
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    data = fashion_mnist()
    n_test = 2000 if args.quick else len(data["test_x"])
    test = (data["test_x"][:n_test], data["test_y"][:n_test])
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:CALIB]]
    ft_idx = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(1))[:args.fine_tune]
    ft_data = {"train_x": data["train_x"][ft_idx], "train_y": data["train_y"][ft_idx]}
    models = (args.models or ("resnet" if args.quick else "vgg,resnet")).split(",")
    points = [("flops", 2.0)] if args.quick else [(m, t) for m in ("flops", "params") for t in TARGETS]
    if args.points:
        wanted = [(m, float(t)) for m, t in (p.split(":") for p in args.points.split(","))]
        unknown = [f"{m}:{t:g}" for m, t in wanted if (m, t) not in points]
        if unknown:
            ap.error(f"--points: no such budget point {', '.join(unknown)} (measures flops, params; targets "
                     f"{', '.join(f'{t:g}' for t in TARGETS)})")
        points = [p for p in points if p in wanted]
    keep_bn = args.fine_tune > 0

    header = ["model", "budget", "method", "params red.", "FLOPs red.", "top-1 one-shot", "drop (pts)",
              *(["top-1 after FT"] if keep_bn else []), "ORT b1 speed-up", "ORT b64 speed-up", "b64 / FLOPs red.",
              "ORT b64 speed-up, spinning (/ FLOPs red.)", "compile s", "calib. passes"]
    rows: list[list[str]] = []
    timed: list[tuple[list[str], Base, nn.Module, float]] = []
    failures: list[str] = []
    verdicts: list[str] = []
    for name in models:
        model = trained(name, data)
        base_fp = flops_params(model)
        base_acc = accuracy(model, *test)
        base_lat = ort_ms(model)
        rows.append([name, "-", "original", "1.00x", "1.00x", f"{base_acc:.2%}", "-",
                     *([f"{accuracy(fine_tune(copy.deepcopy(model), ft_data), *test):.2%}"] if keep_bn else []),
                     f"{base_lat[0]:.2f} ms", f"{base_lat[1]:.2f} ms", "-", f"{base_lat[2]:.2f} ms", "-", "-"])

        base = Base(name, base_fp, base_acc, base_lat, model)
        row = partial(add_row, rows, timed, base, test, ft_data if keep_bn else None, len(header))

        for measure, target in points:
            keep = 1.0 / target
            budget = f"{measure} {target:g}x"
            acc_by: dict[str, float] = {}
            crits = CRITERIA[(measure, target)] if measure == "flops" else PARAMS_CRITERIA
            runs = [(f"trim {c}", c, "", "measured", 0) for c in crits]
            runs += [(f"trim {c}, seed {k}", c, "", "measured", k) for c in crits for k in range(1, SEEDS)]
            if measure == "flops":
                runs += [(f"trim l1, {label}", "l1", opts, rule, 0) for label, opts, rule in ABLATIONS[target]]
            for method, crit, opts, rule, seed in runs:
                t0 = time.perf_counter()
                try:
                    with ranking(rule) if rule != "measured" else contextlib.nullcontext():  # type: ignore[arg-type]
                        res, secs, _ = run_ns(model, pipeline(crit, opts, keep_bn), calib, {measure: keep},
                                              args.round_to, args.align, seed)
                    out: nn.Module | None = res.model
                    passes = getattr(res.report, "calibration_passes", None)
                except Exception as err:  # a failed cell is reported, not fatal
                    out, secs, passes = None, time.perf_counter() - t0, None
                    failures.append(f"{name} {budget} {method}: {type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}")
                    traceback.print_exc()
                row(budget, method, out, secs, passes, acc_by, timed_row=seed == 0)
            t0 = time.perf_counter()
            try:
                pm: nn.Module | None = tp_prune(model, data, keep, "l1", 1, measure=measure)
            except Exception as err:
                pm = None
                failures.append(f"{name} {budget} torch-pruning: {type(err).__name__}: {err}")
                traceback.print_exc()
            secs = time.perf_counter() - t0
            row(budget, "torch-pruning group-L1", pm, secs, None, acc_by)
            t1 = time.perf_counter()
            pm_bn = reestimate_bn(copy.deepcopy(pm), calib) if pm is not None else None
            row(budget, "torch-pruning group-L1 + BN re-estimation", pm_bn, secs + time.perf_counter() - t1, None,
                acc_by)
            verdict = random_verdict(acc_by, [c for c in crits if c != "random"])
            if verdict:
                verdicts.append(f"- {name} {budget}: {verdict}")

    speed = [(off, spin) for method, off, spin in time_rows(timed) if method.startswith("trim")]
    ratios, ratios_spin = [off for off, _ in speed], [spin for _, spin in speed]
    text = "\n\n".join([
        "# trim on Fashion-MNIST, one-shot: criteria, allocation and refit vs Torch-Pruning",
        f"Command: `.venv/bin/python -m benchmarks.trim {' '.join(sys.argv[1:])}` "
        f"({(time.perf_counter() - t_start) / 60:.1f} min). Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"shared with other jobs (compile times and latencies are noisy), torch {torch.__version__}, 1 thread for "
        "compiles, ONNX Runtime at 2 threads (median of 30 runs at batch 1, 20 at batch 64) with the worker threads "
        "sleeping between parallel sections (`session.intra_op.allow_spinning = 0`, as netsqueeze's own timings "
        "run), and at batch 64 also with ONNX Runtime's default busy-waiting (`spinning`), timed after every "
        "compile, each model right after its original; the original's row shows its latencies.",
        f"Test images: {n_test:,}; calibration: {CALIB} training images (statistics, refit, the loss measurements "
        "and Torch-Pruning's BatchNorm re-estimation); "
        + ("channel counts as trim's defaults allow (those of 16 or more that a convolution computes in multiples "
           "of 16, any other count), Torch-Pruning's not rounded" if args.round_to == 1 and args.align is None else
           "channel counts not rounded" if args.round_to == args.align == 1 else
           f"trim's channel counts within `bounds {{ {bounds_text(args.round_to, args.align)} }}`, Torch-Pruning's "
           "not rounded") + "; budgets are policy budgets "
        "(`budget flops <= 50%` is the 2x row). trim rows use the pass defaults (global allocation ranked by "
        "measured loss per unit of budget, `refit = auto`: `layer`, every consumer re-solved whole) unless the row names an option. "
        + ("Top-1 after FT: one epoch on a fixed subset of "
           f"{args.fine_tune:,} training images, trim's BatchNorms kept (no fold_bn)." if keep_bn else
           "One-shot only (no fine-tuning: run with --fine-tune N for it)."),
        markdown_table(header, rows),
        "## Targets",
        "\n".join(verdicts) + "\n" + (
            "\n".join(f"- ORT batch-64 speed-up >= 0.8 x the FLOPs reduction, {how}: {sum(x >= 0.8 for x in rs)} of "
                      f"{len(rs)} trim rows (lowest {min(rs):.2f}, median {sorted(rs)[len(rs) // 2]:.2f})"
                      for how, rs in (("spinning off", ratios), ("ORT's default spinning", ratios_spin)))
            if ratios else ""),
        *(["Failed cells:\n\n" + "\n".join(f"- {f}" for f in failures)] if failures else []),
    ]) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = bounds_stem("trim", args.round_to, args.align, 1, None)
    stem += residual_stem(args.residual_targets)
    out_path = RESULTS / (f"{args.out}.md" if args.out else f"{stem}-quick.md" if args.quick else f"{stem}.md")
    atomic_write(out_path, lambda tmp: tmp.write_text(text))
    print(f"wrote {out_path}")
    settings.close()


if __name__ == "__main__":
    main()
