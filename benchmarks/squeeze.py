"""Squeeze-and-fold on full Fashion-MNIST, side by side with trim and Torch-Pruning, all in one run.

    .venv/bin/python benchmarks/squeeze.py [--quick]

Trains (once, cached) a VGG-style and a ResNet-style model, compresses them one-shot (no fine-tuning)
and prints/writes benchmarks/results/squeeze.md and squeeze.png: top-1 against params and FLOPs
ratios for squeeze_fold, trim (every criterion) and Torch-Pruning group-L1 / group-Taylor at the
same FLOPs; latency of original and compressed models in torch and ONNX Runtime (CPU, 2 threads,
batch 1 and 64, median of 50 runs) as ratios beside the FLOPs ratio; compile time and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import (
    RESULTS,
    accuracy,
    fashion_mnist,
    markdown_table,
    ort_latency,
    torch_latency,
    trained,
)
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.registry import all_passes
from netsqueeze.passes.squeeze_fold import ablation

ROUND_TO = 8
# each design choice of squeeze_fold against its default, at the hardest point: a policy option
# (`method`, `mode`) or a switch of the pass's private `Ablation` configuration (set with `ablation(...)`)
VARIANTS = ("method = qr", "mode = parallel", "allocation = uniform", "weighting = none", "sensitivity = none",
            "sensitivity = curve", "block_fit = shared")
POLICY_OPTIONS = ("method", "mode")


def _variant(variant: str) -> tuple[str, dict[str, str]]:
    """(the squeeze_fold step, the Ablation changes) of a VARIANTS entry."""
    key, value = (p.strip() for p in variant.split("="))
    if key in POLICY_OPTIONS:
        return f"squeeze_fold {{ {variant} }}", {}
    return "squeeze_fold", {key: value}


class PeakRSS:
    """Peak resident memory growth (MiB) while the block runs, sampled from /proc every 5 ms.

    A lower bound: memory the process freed earlier and reuses does not show as growth."""

    def __enter__(self) -> PeakRSS:
        self.base = self._rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *a: Any) -> None:
        self._stop = True
        self._t.join()
        self.mib = (self.peak - self.base) / 2**20


def flops_params(model: nn.Module) -> tuple[int, int]:
    s = graph_stats(ns.import_model(model, (torch.randn(2, 1, 28, 28),)))
    return s.flops, s.params


def reestimate_bn(model: nn.Module, images: torch.Tensor, batch: int = 256) -> nn.Module:
    """Re-estimates every BatchNorm's running statistics of `model` (in place) on `images`: statistics reset,
    the images forwarded once with only the BatchNorms in train mode and momentum = None (a cumulative average
    over the batches), no gradient; the model is returned in eval mode. Nothing else changes."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
    return model.eval()


def tp_prune(model: nn.Module, data: dict[str, torch.Tensor], flops_keep: float, kind: str,
             round_to: int = ROUND_TO, *, measure: str = "flops",
             bn_calib: torch.Tensor | None = None) -> nn.Module:
    """Torch-Pruning (DepGraph) group pruning with a uniform per-layer ratio (its default), bisected so that the
    pruned model keeps at most `flops_keep` of the original's FLOPs (`measure = "params"`: of its params).
    `kind`: "l1" (group-L1 magnitude) or "taylor" (group-Taylor on 256 labelled training images). Channel
    counts are rounded down to multiples of `round_to` by Torch-Pruning, so the achieved ratio can overshoot
    the target (count it on the returned model). With `bn_calib`, the BatchNorm statistics of the pruned
    model are re-estimated on those images (`reestimate_bn`). The input model is not changed."""
    import torch_pruning as tp

    if measure not in ("flops", "params"):
        raise ValueError(f"measure must be 'flops' or 'params', not {measure!r}")
    col = 0 if measure == "flops" else 1
    base = flops_params(model)[col]
    x = data["train_x"][:256]
    y = data["train_y"][:256]

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        imp = tp.importance.GroupMagnitudeImportance(p=1) if kind == "l1" else tp.importance.GroupTaylorImportance()
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(m, torch.randn(1, 1, 28, 28), importance=imp, pruning_ratio=ratio,
                                      ignored_layers=[last], round_to=round_to if round_to > 1 else None)
        if kind == "taylor":
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        pruner.step()
        m.zero_grad()
        return m.eval()

    # the kept fraction is not monotone in the ratio near its top (a layer that would round to zero channels is
    # left whole), so: a coarse scan for the first ratio that meets the target, then bisection below it
    limit = flops_keep * base
    grid = [i * 0.05 for i in range(20)]
    first = next(((i, m) for i, m in ((i, prune(r)) for i, r in enumerate(grid)) if flops_params(m)[col] <= limit),
                 None)
    if first is None:
        raise ValueError(f"Torch-Pruning ({kind}, round_to {round_to}) cannot keep <= {flops_keep:.1%} of the {measure}")
    i, best = first
    if i > 0:
        lo, hi = grid[i - 1], grid[i]
        for _ in range(7):
            mid = (lo + hi) / 2
            m = prune(mid)
            if flops_params(m)[col] <= limit:
                hi, best = mid, m
            else:
                lo = mid
    if bn_calib is not None:
        reestimate_bn(best, bn_calib)
    return best.eval()


def run_ns(model: nn.Module, passes: list[Any], calib: torch.Tensor, policy_budget: dict[str, float] | None = None,
           round_to: int = ROUND_TO) -> tuple[ns.CompileResult, float, float]:
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if policy_budget:
            budget = ", ".join(f"{k} <= {v:.4%}" for k, v in policy_budget.items())
            steps = "\n".join(f"  {p}" for p in passes)
            # channel counts in multiples of 8: what vectorised CPU/GPU kernels need to turn fewer FLOPs into speed
            text = (f"policy bench {{\n  calibrate samples {len(calib)}, batch 256\n  budget {budget}\n"
                    f"  bounds {{ round_to = {round_to} }}\n{steps}\n}}\n")
            res = ns.compile(model, text, example_inputs=(calib[:2],), calibration=calib)
        else:
            res = ns.compile(model, passes, example_inputs=(calib[:2],), calibration=calib)
    return res, time.perf_counter() - t0, mem.mib


def _notes(res: ns.CompileResult) -> list[str]:
    return [n for r in res.report.passes if r.name == "squeeze_fold" for n in r.result.notes]


def latencies(model: nn.Module) -> dict[str, float]:
    import onnx

    from netsqueeze.backends.onnx import to_onnx

    g = ns.import_model(model, (torch.randn(2, 1, 28, 28),))
    proto = to_onnx(g)
    blob = proto.SerializeToString()
    onnx.checker.check_model(proto)
    return {f"{rt}_b{b}": fn(b) for b in (1, 64) for rt, fn in
            (("torch", lambda b: torch_latency(model, b)), ("ort", lambda b: ort_latency(blob, b)))}


def plot_results(md: Path) -> None:
    """One panel per model: top-1 (one-shot) against FLOPs reduction for every method, from the results table."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for line in md.read_text().splitlines():
        c = [x.strip() for x in line.strip("|").split("|")]
        if len(c) != 9 or not c[4].endswith("x") or not c[5].endswith("%"):
            continue
        if " = " in c[1]:  # design variants: in the table, not the plot
            continue
        series.setdefault(c[0], {}).setdefault(c[1], []).append((float(c[4][:-1]), float(c[5][:-1])))
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    for ax, (model, methods) in zip(axes[0], series.items()):
        for method, pts in sorted(methods.items()):
            pts.sort()
            bold = method == "squeeze_fold"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=3 if bold else 1,
                    color="black" if bold else None, label=method)
        ax.set_title(f"{model}: one-shot top-1 vs FLOPs reduction")
        ax.set_xlabel("FLOPs reduction (x)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(md.with_suffix(".png"), dpi=110, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer points, 1000 test images (smoke run)")
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the results table")
    args = ap.parse_args()
    if args.plot_only:
        plot_results(RESULTS / ("squeeze-quick.md" if args.quick else "squeeze.md"))
        return
    t_start = time.perf_counter()
    torch.manual_seed(0)
    data = fashion_mnist()
    test_x, test_y = (data["test_x"][:1000], data["test_y"][:1000]) if args.quick else (data["test_x"], data["test_y"])
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:2048]]
    # squeeze_fold points: params budgets (2x, 3x and the paper's 4.9x smaller), found by the pass's search
    budgets = [0.204] if args.quick else [0.5, 0.333, 0.204]
    trim_criteria = [c for c in ("l1", "l2", "bn_scale", "activation", "gdnt", "random") if "trim" in all_passes()]
    rows: list[list[str]] = []
    lat_rows: list[list[str]] = []
    lat0: dict[str, float] = {}
    # timed together at the end of the run, after every compile: (model name, variant, FLOPs ratio, module)
    to_time: list[tuple[str, str, float, nn.Module]] = []
    alloc: list[str] = []  # what each squeeze_fold compile kept, from its report

    def row(name: str, method: str, setting: str, pr: float, fr: float, acc: float, base_acc: float,
            secs: float, mib: float) -> None:
        rows.append([name, method, setting, f"{pr:.2f}x", f"{fr:.2f}x", f"{acc:.2%}", f"{(base_acc - acc) * 100:+.2f}",
                     f"{secs:.1f}", f"{mib:.0f}"])

    for name in args.models.split(","):
        model = trained(name, data)
        base_acc = accuracy(model, test_x, test_y)
        base_flops, base_params = flops_params(model)
        rows.append([name, "original", "-", "1.00x", "1.00x", f"{base_acc:.2%}", "-", "-", "-"])
        to_time.append((name, "original", 1.0, model))
        for b in budgets:
            res, secs, mib = run_ns(model, ["fold_bn", "squeeze_fold"], calib, {"params": b})
            acc = accuracy(res.model, test_x, test_y)
            fr, pr = res.report.flops_ratio, res.report.params_ratio
            row(name, "squeeze_fold", f"params <= {b:.1%}", pr, fr, acc, base_acc, secs, mib)
            alloc.append(f"- {name} squeeze_fold params <= {b:.1%}: " + "; ".join(_notes(res)))
            to_time.append((name, f"squeeze_fold params <= {b:.1%}", fr, res.model))
            if b == budgets[-1]:  # the design choices, measured at the hardest point
                for variant in VARIANTS:
                    step, changes = _variant(variant)
                    with ablation(**changes):
                        vres, vsecs, vmib = run_ns(model, ["fold_bn", step], calib, {"params": b})
                    row(name, f"squeeze_fold {variant}", f"params <= {b:.1%}", vres.report.params_ratio,
                        vres.report.flops_ratio, accuracy(vres.model, test_x, test_y), base_acc, vsecs, vmib)
                    alloc.append(f"- {name} squeeze_fold {variant} params <= {b:.1%}: " + "; ".join(_notes(vres)))
            keep = 1.0 / fr
            for crit in trim_criteria:
                try:
                    tres, tsecs, tmib = run_ns(model, ["fold_bn", f"trim {{ criterion = {crit} }}"], calib,
                                               {"flops": keep})
                except ns.NetsqueezeError as err:
                    rows.append([name, f"trim {crit}", f"FLOPs {fr:.2f}x", "-", "-", "failed", "-", "-",
                                 str(err).splitlines()[0][:60]])
                    continue
                tacc = accuracy(tres.model, test_x, test_y)
                row(name, f"trim {crit}", f"FLOPs {fr:.2f}x", tres.report.params_ratio, tres.report.flops_ratio, tacc,
                    base_acc, tsecs, tmib)
            for kind in ("l1", "taylor"):
                t0 = time.perf_counter()
                with PeakRSS() as mem:
                    pm = tp_prune(model, data, keep, kind)
                secs = time.perf_counter() - t0
                f2, p2 = flops_params(pm)
                pacc = accuracy(pm, test_x, test_y)
                row(name, f"torch-pruning group-{kind}", f"FLOPs {fr:.2f}x", base_params / p2, base_flops / f2, pacc,
                    base_acc, secs, mem.mib)

    for name, variant, fr, m in to_time:
        lat = latencies(m)
        if variant == "original":
            lat0 = lat
            lat_rows.append([name, "original", "1.00x"] + [f"{lat0[k]:.2f} ms" for k in sorted(lat0)])
        else:
            lat_rows.append([name, variant, f"{fr:.2f}x"] +
                            [f"{lat0[k] / lat[k]:.2f}x ({lat[k]:.2f} ms)" for k in sorted(lat0)])
    header = ["model", "method", "setting", "params ratio", "FLOPs ratio", "top-1", "drop (pts)", "compile s",
              "peak MiB"]
    lat_header = ["model", "model variant", "FLOPs ratio"] + [f"speed-up {k}" for k in sorted(lat0)]
    text = "\n\n".join([
        "# squeeze-and-fold on Fashion-MNIST (one-shot, no fine-tuning)",
        f"test images: {len(test_x)}; calibration: {len(calib)} training images; CPU, 2 threads; channel counts "
        f"rounded to multiples of {ROUND_TO} for every method; peak MiB = RSS growth during the compile (a lower "
        "bound: reused memory does not show); compile s is wall time on a 2-core machine that may be shared "
        f"with other jobs (noisy). Command: `.venv/bin/python benchmarks/squeeze.py {' '.join(sys.argv[1:])}`, "
        f"{(time.perf_counter() - t_start) / 60:.0f} min",
        markdown_table(header, rows),
        "## latency (median of 50 runs; speed-up = original / compressed; timed together after every compile)",
        markdown_table(lat_header, lat_rows),
        "## squeeze_fold allocations (the pass's report notes: channels kept per group, how the search ended)",
        "\n".join(alloc),
    ]) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("squeeze-quick.md" if args.quick else "squeeze.md")
    out.write_text(text)
    plot_results(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
