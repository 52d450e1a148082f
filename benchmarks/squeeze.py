"""squeeze_fold on full Fashion-MNIST under params and FLOPs budgets, beside Torch-Pruning, in one run.

    .venv/bin/python benchmarks/squeeze.py [--quick] [--ablation] [--models vgg,resnet] [--calib 2048] [--align auto]
        [--sensitivity first_order]

For the VGG-style and the ResNet-style model of benchmarks/common.py (trained once, cached), at 2x, 3x and
5x fewer params and fewer FLOPs (a policy's `budget params|flops <= X%`, `bounds { round_to = 8, align = auto }`), one-shot
(no fine-tuning), on the same calibration images for every method:

- `squeeze_fold` then `fold_bn` (squeezing with the BatchNorms still in place: on the ResNet-style model at 2x
  fewer FLOPs folding first measured 11.9 points lost against 3.4): top-1, achieved params and FLOPs reductions, ONNX Runtime latency speed-ups at
  batch 1 and 64 (the fastest run of each, the original and the compressed models timed in turns round after
  round), compile time, peak memory, the full calibration passes the compile made
  (`CompileReport.calibration_passes`) and compile time over the time of one forward pass of the original model
  over the calibration images (measured in this run);
- Torch-Pruning group-L1 (uniform per-layer ratio, bisected to the same target) one-shot, and the same pruned
  model after re-estimating its BatchNorm statistics on the calibration images;
- at the FLOPs points, `squeeze_fold` followed by label-free `recover` (distillation from the original on the same
  calibration images, `--recover-steps` steps of one batch; not one-shot, no labels; 0 leaves these rows out).

Prints and writes benchmarks/results/squeeze.md (a results table, the issue's targets each with the measured
figure, the squeeze_fold allocations) and squeeze.png (top-1 against FLOPs reduction per model). `--ablation`
adds squeeze_fold's design alternatives at one hard point (3x fewer FLOPs); `--quick` is a smoke run (one model,
2x fewer FLOPs, 512 calibration images, 1000 test images) that writes squeeze-quick.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import RESULTS, accuracy, fashion_mnist, markdown_table, recover_step, trained
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.refit import residual_targets
from netsqueeze.passes.squeeze_fold import Ablation, ablation

ROUND_TO = 8
# kept counts of 16 or more in whole blocks of the runtime's convolutions (`bounds { align = auto }`: ONNX Runtime's
# CPU block on the compiling machine); without it the allocations keep counts the runtime pads (24, 72, 80 on VGG)
ALIGN: int | str = "auto"
SENSITIVITY_SAMPLES = Ablation().sensitivity_samples  # the pass default
TARGETS = (2.0, 3.0, 5.0)  # x fewer params / FLOPs
MEASURES = ("flops", "params")
HARD_POINT = ("flops", 3.0)  # where --ablation measures the design alternatives
# squeeze_fold policy options measured as alternatives (the `Ablation` switches are read from the pass, less
# those a budget-driven compile does not read: `energy_of` defines the `energy` option, which a budget replaces)
POLICY_OPTIONS = ("method", "mode", "search")
NOT_UNDER_BUDGET = ("energy_of",)
CALIB_BATCH = 256
SF = "squeeze_fold"
TP = "TP group-L1"
TP_BN = "TP group-L1 + BN re-est."
SF_REC = "squeeze_fold + recover"
SF_BN = "squeeze_fold + reestimate_bn"
RECOVER_STEPS = 256  # label-free recover after squeeze_fold at the FLOPs points: 32 passes over 2,048 images


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


def bounds_text(round_to: int, align: int | str | None = 1) -> str:
    """The benchmark policy's `bounds` entries (`align`: a block, `auto`: the compiling CPU's, or None: not set, the
    passes' default: 16 for the channels a 2-D convolution computes or reads, `allocation.DEFAULT_ALIGN`)."""
    return f"round_to = {round_to}" + (f", align = {align}" if align is not None else "")


def bounds_stem(name: str, round_to: int, align: int | str | None, default_round_to: int,
                default_align: int | str | None = None) -> str:
    """A results file's stem: `name`, then the bounds that differ from the benchmark's defaults."""
    return name + ("" if round_to == default_round_to else f"-round_to-{round_to}") + (
        "" if align == default_align else f"-align-{align}")


def align_arg(text: str) -> int | str:
    """`--align`: `auto` or a block of at least 1."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expects auto or an integer >= 1, got {text!r}")
    return int(text)


def residual_targets_arg(ap: argparse.ArgumentParser) -> None:
    """`--residual-targets on|off` (benchmarks/squeeze.py and trim.py): the layer refit's residual targets;
    `residual_stem` names the file."""
    ap.add_argument("--residual-targets", default="on", choices=("on", "off"),
                    help="the layer refit's residual targets (default on: a layer feeding a residual add fits the sum); "
                         "off fits every layer to its own output, as before, and adds -residual_targets-off to the "
                         "file name")


def residual_stem(setting: str) -> str:
    """What `--residual-targets` adds to a results file's stem."""
    return "" if setting == "on" else "-residual_targets-off"


def run_ns(model: nn.Module, passes: list[Any], calib: torch.Tensor, policy_budget: dict[str, float] | None = None,
           round_to: int = ROUND_TO, align: int | str | None = 1, seed: int = 0) -> tuple[ns.CompileResult, float, float]:
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if policy_budget:
            budget = ", ".join(f"{k} <= {v:.4%}" for k, v in policy_budget.items())
            steps = "\n".join(f"  {p}" for p in passes)
            # channel counts in multiples of 8: what vectorised CPU/GPU kernels need to turn fewer FLOPs into speed
            text = (f"policy bench {{\n  calibrate samples {len(calib)}, batch 256\n  budget {budget}\n"
                    f"  bounds {{ {bounds_text(round_to, align)} }}\n{steps}\n}}\n")
            res = ns.compile(model, text, example_inputs=(calib[:2],), calibration=calib, seed=seed)
        else:
            res = ns.compile(model, passes, example_inputs=(calib[:2],), calibration=calib, seed=seed)
    return res, time.perf_counter() - t0, mem.mib


def variants() -> list[str]:
    """squeeze_fold's design alternatives, `key = value`: every non-default value of its Literal policy options
    in POLICY_OPTIONS and of the Literal switches of its `Ablation` configuration, read from the pass."""
    from netsqueeze.passes.registry import all_passes

    out: list[str] = []
    for cls, keys in ((all_passes()[SF], POLICY_OPTIONS), (Ablation, None)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if ((keys is not None and f.name not in keys) or f.name in NOT_UNDER_BUDGET
                    or typing.get_origin(hints.get(f.name)) is not typing.Literal):
                continue
            out += [f"{f.name} = {v}" for v in typing.get_args(hints[f.name]) if v != f.default]
    return out


def _variant(variant: str) -> tuple[str, dict[str, str]]:
    """(the squeeze_fold step, the Ablation changes) of a `variants()` entry."""
    key, value = (p.strip() for p in variant.split("="))
    if key in POLICY_OPTIONS:
        return f"{SF} {{ {variant} }}", {}
    return SF, {key: value}


def _notes(res: ns.CompileResult) -> list[str]:
    return [n for r in res.report.passes if r.name in (SF, "reestimate_bn") for n in r.result.notes]


def forward_seconds(model: nn.Module, calib: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of one forward pass of `model` (torch, no gradient) over `calib` in batches of 256."""
    times = []
    with torch.no_grad():
        model(calib[:CALIB_BATCH])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(calib), CALIB_BATCH):
                model(calib[i : i + CALIB_BATCH])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


LAT_ROUNDS = 30  # latency rounds; in each, every model runs LAT_RUNS[batch] times in turn


LAT_RUNS = {1: 10, 64: 2}


def fastest_latency(blobs: list[bytes], threads: int = 2, batches: dict[int, int] | None = None,
                    spinning: bool = True) -> list[dict[int, float]]:
    """ONNX Runtime CPU latency (ms) per model and batch: the fastest of LAT_ROUNDS x LAT_RUNS runs,
    the models timed in turns round after round. On a machine shared with other jobs a run is slowed by what else
    runs, never sped up, so the fastest run is the figure that other jobs disturb least (a median moves with the
    load, differently for models timed at different moments). `spinning=False`: the worker threads sleep between
    parallel sections instead of busy-waiting (ONNX Runtime's default; `compiler.latency.ort_session_options`)."""
    import numpy as np
    import onnxruntime as ort

    from netsqueeze.compiler.latency import ort_session_options

    batches = batches or LAT_RUNS
    so = ort_session_options(threads, spinning)
    sessions = [ort.InferenceSession(b, so, providers=["CPUExecutionProvider"]) for b in blobs]
    feeds = {b: np.random.default_rng(0).standard_normal((b, 1, 28, 28), dtype=np.float32) for b in batches}
    best = [{b: float("inf") for b in batches} for _ in blobs]
    for s in sessions:  # warm-up
        for b in batches:
            s.run(None, {s.get_inputs()[0].name: feeds[b]})
    for _ in range(LAT_ROUNDS):
        for i, s in enumerate(sessions):
            name = s.get_inputs()[0].name
            for b, runs in batches.items():
                for _ in range(runs):
                    t0 = time.perf_counter()
                    s.run(None, {name: feeds[b]})
                    best[i][b] = min(best[i][b], (time.perf_counter() - t0) * 1000)
    return best


def onnx_blob(model: nn.Module) -> bytes:
    from netsqueeze.backends.onnx import to_onnx

    return to_onnx(ns.import_model(model, (torch.randn(2, 1, 28, 28),))).SerializeToString()  # type: ignore[no-any-return]


@dataclass
class Point:
    """One compressed model of the results table."""

    model: str
    measure: str  # the budget: "flops" | "params"
    target: float  # x fewer
    method: str
    params_red: float = 0.0
    flops_red: float = 0.0
    top1: float = 0.0
    drop: float = 0.0  # points
    secs: float = 0.0
    mib: float = 0.0
    passes: float | None = None
    fwd_ratio: float | None = None
    fwd_s: float | None = None  # the original's forward pass over the calibration data, timed just before
    lat: dict[int, float] = field(default_factory=dict)  # ORT speed-up by batch, 2 threads, spinning off (squeeze_fold)
    lat_spin: float | None = None  # ORT speed-up at batch 64, 2 threads, ORT's default spinning
    lat1: float | None = None  # ORT speed-up at batch 64, 1 thread
    failed: str = ""
    module: nn.Module | None = None

    @property
    def budget(self) -> str:
        return f"{self.measure} {self.target:g}x"


@dataclass
class Base:
    model: str
    top1: float
    flops: int
    params: int
    fwd_s: float
    lat_ms: dict[int, float] = field(default_factory=dict)
    lat_spin_ms: float = 0.0
    lat1_ms: float = 0.0


def measured(p: Point, base: Base, m: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> Point:
    f, pr = flops_params(m)
    p.flops_red, p.params_red = base.flops / f, base.params / pr
    p.top1 = accuracy(m, *test)
    p.drop = (base.top1 - p.top1) * 100
    p.module = m
    print(f"  {p.model} {p.budget} {p.method}: {p.top1:.2%} ({p.drop:+.2f}), {p.params_red:.2f}x params, "
          f"{p.flops_red:.2f}x FLOPs, {p.secs:.1f} s", file=sys.stderr, flush=True)
    return p


# `Ablation` fields every squeeze_fold compile of the run takes (`--sensitivity`), under a point's own `changes`
BASE_CHANGES: dict[str, Any] = {}


def squeeze_point(model: nn.Module, base: Base, measure: str, target: float, calib: torch.Tensor,
                  test: tuple[torch.Tensor, torch.Tensor], method: str = SF, step: str = SF,
                  changes: dict[str, str] | None = None, round_to: int = ROUND_TO,
                  align: int | str = ALIGN) -> tuple[Point, list[str]]:
    p = Point(base.model, measure, target, method)
    # the forward pass the compile time is compared with, timed next to it: the 2-core machine's speed drifts
    # by tens of percent over a run, and both figures see the same drift
    p.fwd_s = forward_seconds(model, calib)
    try:
        with ablation(**{**BASE_CHANGES, **(changes or {})}):
            res, p.secs, p.mib = run_ns(model, [step, "fold_bn"], calib, {measure: 1.0 / target}, round_to, align)
    except ns.NetsqueezeError as err:
        p.failed = str(err).splitlines()[0][:100]
        print(f"  {p.model} {p.budget} {method}: failed: {p.failed}", file=sys.stderr, flush=True)
        return p, []
    passes = getattr(res.report, "calibration_passes", None)
    p.passes = float(passes) if passes else None
    p.fwd_ratio = p.secs / p.fwd_s
    return measured(p, base, res.model, test), _notes(res)


def peer_points(model: nn.Module, base: Base, measure: str, target: float, data: dict[str, torch.Tensor],
                calib: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], round_to: int) -> list[Point]:
    p, q = Point(base.model, measure, target, TP), Point(base.model, measure, target, TP_BN)
    t0 = time.perf_counter()
    try:
        with PeakRSS() as mem:
            pm = tp_prune(model, data, 1.0 / target, "l1", round_to, measure=measure)
    except ValueError as err:
        p.failed = q.failed = str(err)
        return [p, q]
    p.secs, p.mib = time.perf_counter() - t0, mem.mib
    measured(p, base, pm, test)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        bm = reestimate_bn(copy.deepcopy(pm), calib)
    q.secs, q.mib = p.secs + time.perf_counter() - t0, max(p.mib, mem.mib)
    return [p, measured(q, base, bm, test)]


def fmt_row(p: Point) -> list[str]:
    if p.failed:
        return [p.model, p.budget, p.method, "-", "-", "failed", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                p.failed]
    b1, b64, spin, t1 = p.lat.get(1), p.lat.get(64), p.lat_spin, p.lat1
    return [p.model, p.budget, p.method, f"{p.params_red:.2f}x", f"{p.flops_red:.2f}x", f"{p.top1:.2%}",
            f"{p.drop:+.2f}", "-" if b1 is None else f"{b1:.2f}x", "-" if b64 is None else f"{b64:.2f}x",
            "-" if b64 is None else f"{b64 / p.flops_red:.2f}",
            "-" if spin is None else f"{spin:.2f}x ({spin / p.flops_red:.2f})",
            "-" if t1 is None else f"{t1:.2f}x ({t1 / p.flops_red:.2f})", f"{p.secs:.1f}",
            "-" if p.fwd_ratio is None else f"{p.fwd_ratio:.1f}", "-" if p.passes is None else f"{p.passes:.1f}",
            f"{p.mib:.0f}"]


HEADER = ["model", "budget", "method", "params red.", "FLOPs red.", "top-1", "drop (pts)", "ORT b1 speed-up",
          "ORT b64 speed-up", "b64 speed-up / FLOPs red.", "ORT b64 speed-up, spinning (/ FLOPs red.)",
          "ORT b64 speed-up, 1 thread (/ FLOPs red.)", "compile s", "compile / forward", "calib. passes", "peak MiB"]


def find(points: list[Point], model: str, measure: str, target: float, method: str) -> Point | None:
    return next((p for p in points if (p.model, p.measure, p.target, p.method) == (model, measure, target, method)
                 and not p.failed), None)


def verdicts(points: list[Point], bases: list[Base], n_calib: int) -> list[list[str]]:
    """The issue's targets, each with the figure measured in this run and met / missed."""
    rows: list[list[str]] = []

    def add(target: str, figure: str, ok: bool | None) -> None:
        rows.append([target, figure, "not measured" if ok is None else ("met" if ok else "**missed**")])

    for model, t, limit in (("vgg", 2.0, 1.0), ("vgg", 3.0, 2.0), ("resnet", 2.0, 2.0)):
        p = find(points, model, "flops", t, SF)
        name = f"{model}: {t:g}x fewer FLOPs at <= {limit:g} pt drop"
        if p is None:
            add(name, "no squeeze_fold result", None)
        else:
            add(name, f"{p.drop:+.2f} pts at {p.flops_red:.2f}x FLOPs",
                p.drop <= limit and p.flops_red >= t * 0.995)
    for model, t, limit in (("vgg", 2.0, 1.0), ("vgg", 3.0, 2.0), ("resnet", 2.0, 2.0)):
        b = find(points, model, "flops", t, SF_BN)
        if b is not None:  # one-shot and label-free too, but not the default pipeline: reported beside it
            add(f"{model}: {t:g}x fewer FLOPs at <= {limit:g} pt drop, with reestimate_bn after squeeze_fold",
                f"{b.drop:+.2f} pts at {b.flops_red:.2f}x FLOPs", b.drop <= limit and b.flops_red >= t * 0.995)
    r = find(points, "resnet", "flops", 2.0, SF_REC)
    if r is not None:  # the same target, reached by a pipeline that is not one-shot: reported, never substituted
        add("resnet: 2x fewer FLOPs at <= 2 pt drop, with label-free recover after squeeze_fold (not one-shot)",
            f"{r.drop:+.2f} pts at {r.flops_red:.2f}x FLOPs, compile {r.secs:.0f} s", r.drop <= 2.0)
    for base in bases:
        for t in TARGETS:
            p, q = find(points, base.model, "flops", t, SF), find(points, base.model, "flops", t, TP_BN)
            name = f"{base.model} {t:g}x FLOPs: squeeze_fold drop <= 1/2 of TP + BN re-est.'s"
            if p is None or q is None:
                if p is not None or q is not None or any(x.measure == "flops" and x.target == t for x in points):
                    add(name, f"squeeze_fold {'-' if p is None else f'{p.drop:+.2f}'}, TP + BN re-est. "
                        f"{'failed' if q is None else f'{q.drop:+.2f}'}", None)
                continue
            add(name, f"{p.drop:+.2f} vs {q.drop:+.2f} pts (limit {q.drop / 2:+.2f}; FLOPs {p.flops_red:.2f}x vs "
                f"{q.flops_red:.2f}x)", p.drop <= q.drop / 2)
    for base in bases:
        sf = [p for p in points if p.model == base.model and p.method == SF and not p.failed and 64 in p.lat]
        if not sf:
            continue
        for how, speed in (("2 threads, spinning off", lambda p: p.lat[64]),
                           ("2 threads, ORT's default spinning", lambda p: p.lat_spin or 0.0),
                           ("1 thread", lambda p: p.lat1 or 0.0)):
            worst = min(sf, key=lambda p: speed(p) / p.flops_red)
            add(f"{base.model}: ORT b64 speed-up >= 0.8 x FLOPs red. (every squeeze_fold row), {how}",
                f"worst {speed(worst) / worst.flops_red:.2f} ({worst.budget}: {speed(worst):.2f}x at "
                f"{worst.flops_red:.2f}x FLOPs)", speed(worst) / worst.flops_red >= 0.8)
    for base in bases:
        sf = [p for p in points if p.model == base.model and p.method == SF and not p.failed]
        if not sf:
            continue
        slow = max(sf, key=lambda p: p.secs)
        add(f"{base.model}: squeeze_fold compile <= 30 s at 2,048 calibration images",
            f"max {slow.secs:.1f} s ({slow.budget}) at {n_calib:,} images", slow.secs <= 30 if n_calib == 2048 else None)
        far = max(sf, key=lambda p: p.fwd_ratio or 0.0)
        add(f"{base.model}: squeeze_fold compile <= 10x one forward pass over the calibration data",
            f"max {far.fwd_ratio:.1f}x ({far.budget}: {far.secs:.1f} s against a forward pass of {far.fwd_s or 0:.2f} s "
            "timed just before it)", (far.fwd_ratio or 0.0) <= 10)
    return rows


def plot(points: list[Point], bases: list[Base], out: Path) -> None:
    """One panel per model: top-1 (one-shot) against FLOPs reduction for every method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4.5), squeeze=False)
    for ax, base in zip(axes[0], bases):
        series = [(f"{SF} (FLOPs budgets)", SF, ("flops",)), (f"{SF} (params budgets)", SF, ("params",)),
                  (f"{SF_BN} (FLOPs budgets)", SF_BN, ("flops",)),
                  (f"{SF_REC} (FLOPs budgets, label-free)", SF_REC, ("flops",)),
                  (TP, TP, MEASURES), (TP_BN, TP_BN, MEASURES)]
        for label, method, measures in series:
            pts = sorted((p.flops_red, p.top1 * 100) for p in points
                         if p.model == base.model and p.method == method and p.measure in measures and not p.failed)
            if not pts:
                continue
            bold = method == SF
            ax.plot([1.0] + [x for x, _ in pts], [base.top1 * 100] + [y for _, y in pts], marker="o",
                    lw=3 if bold and "FLOPs" in label else 1.5, ls="-" if bold else "--", label=label)
        ax.set_title(f"{base.model}: one-shot top-1 vs FLOPs reduction")
        ax.set_xlabel("FLOPs reduction (x)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one model (vgg unless --models), 2x fewer FLOPs, 512 calibration images, "
                         "1000 test images; writes squeeze-quick.md")
    ap.add_argument("--models", default=None, help="comma-separated, of vgg,resnet (default both; --quick: vgg)")
    ap.add_argument("--calib", type=int, default=None, help="calibration images (default 2048; --quick: 512)")
    ap.add_argument("--ablation", action="store_true",
                    help=f"also squeeze_fold's design alternatives at {HARD_POINT[0]} {HARD_POINT[1]:g}x")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for compiles and forward passes")
    ap.add_argument("--round-to", type=int, default=ROUND_TO,
                    help=f"squeeze_fold's `bounds {{ round_to }}` (default {ROUND_TO}; 16 matches ONNX Runtime's "
                         "AVX-512 conv blocks); a value other than the default writes squeeze-round_to-N.md")
    ap.add_argument("--recover-steps", type=int, default=None,
                    help=f"steps of the squeeze_fold + label-free recover rows at the FLOPs points (default "
                         f"{RECOVER_STEPS}, --quick: 16; 0: no such rows)")
    ap.add_argument("--align", type=align_arg, default=ALIGN,
                    help="squeeze_fold's `bounds { align }` (default auto: ONNX Runtime's CPU channel block on this "
                         "machine, 16 with AVX-512, 8 with AVX2; 1: none); another value adds -align-N to the file "
                         "name")
    ap.add_argument("--sensitivity", default="first_order", choices=("first_order", "auto", "output"),
                    help="squeeze_fold's sensitivity ablation (default first_order, the pass's default); another "
                         "writes squeeze-sensitivity-<it>.md")
    ap.add_argument("--sensitivity-samples", type=int, default=SENSITIVITY_SAMPLES,
                    help=f"calibration samples of squeeze_fold's sensitivity estimate (default {SENSITIVITY_SAMPLES}, the "
                         "pass's default); another writes squeeze-sensitivity_samples-<it>.md")
    ap.add_argument("--search", default="fast", choices=("fast", "measured"),
                    help="squeeze_fold's `search` option (default fast); measured writes squeeze-search-measured.md")
    ap.add_argument("--reestimate-bn", type=int, default=1, choices=(0, 1),
                    help="1 (default): also a squeeze_fold + reestimate_bn row at every point; 0: none")
    ap.add_argument("--branches", default="keep", choices=("keep", "remove"),
                    help="squeeze_fold's `branches` option (default keep); remove lets the search remove residual "
                         "branches whole and adds -branches-remove to the file name")
    residual_targets_arg(ap)
    ap.add_argument("--peer-round-to", type=int, default=1,
                    help="Torch-Pruning's round_to (default 1: its uniform ratio then lands on the target)")
    args = ap.parse_args()
    settings = contextlib.ExitStack()  # what the whole run compiles with
    settings.enter_context(residual_targets(args.residual_targets == "on"))
    if args.recover_steps is None:
        args.recover_steps = 16 if args.quick else RECOVER_STEPS
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    data = fashion_mnist()
    n_test = 1000 if args.quick else len(data["test_x"])
    test = (data["test_x"][:n_test], data["test_y"][:n_test])
    n_calib = args.calib or (512 if args.quick else 2048)
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:n_calib]]
    models = (args.models or ("vgg" if args.quick else "vgg,resnet")).split(",")
    grid = [("flops", 2.0)] if args.quick else [(m, t) for m in MEASURES for t in TARGETS]
    hard = grid[-1] if args.quick else HARD_POINT

    opts = [f"search = {args.search}"] * (args.search != "fast") + [f"branches = {args.branches}"] * (
        args.branches != "keep")
    sf_step = f"{SF} {{ {', '.join(opts)} }}" if opts else SF
    points: list[Point] = []
    bases: list[Base] = []
    ablations: list[Point] = []
    alloc: list[str] = []
    BASE_CHANGES["sensitivity"] = args.sensitivity  # every squeeze_fold compile below
    BASE_CHANGES["sensitivity_samples"] = args.sensitivity_samples
    for name in models:
        model = trained(name, data)
        f0, p0 = flops_params(model)
        base = Base(name, accuracy(model, *test), f0, p0, forward_seconds(model, calib))
        bases.append(base)
        print(f"{name}: top-1 {base.top1:.2%}, forward pass over {n_calib} images {base.fwd_s:.2f} s",
              file=sys.stderr, flush=True)
        for measure, t in grid:
            p, notes = squeeze_point(model, base, measure, t, calib, test, step=sf_step, round_to=args.round_to,
                                     align=args.align)
            points.append(p)
            alloc.append(f"- {name} {p.budget}: " + ("; ".join(notes) or p.failed or "-"))
            if args.reestimate_bn:
                b, notes = squeeze_point(model, base, measure, t, calib, test, SF_BN, f"{sf_step}\n  reestimate_bn",
                                         round_to=args.round_to, align=args.align)
                points.append(b)
                alloc.append(f"- {name} {b.budget} + reestimate_bn: "
                             + ("; ".join(n for n in notes if n.startswith("re-estimated")) or b.failed or "-"))
            if args.recover_steps and measure == "flops":
                r, _ = squeeze_point(model, base, measure, t, calib, test, SF_REC,
                                     f"{sf_step}\n  {recover_step(args.recover_steps)}", round_to=args.round_to,
                                     align=args.align)
                points.append(r)
            points += peer_points(model, base, measure, t, data, calib, test, args.peer_round_to)
            if args.ablation and (measure, t) == hard:
                for v in variants():
                    step, changes = _variant(v)
                    a, notes = squeeze_point(model, base, measure, t, calib, test, f"{SF} {v}", step, changes,
                                             round_to=args.round_to, align=args.align)
                    ablations.append(a)
                    alloc.append(f"- {name} {a.budget} {v}: " + ("; ".join(notes) or a.failed or "-"))
        # ONNX Runtime latency: the original and every squeeze_fold model of this model, timed in turns
        timed = [p for p in points if p.model == name and p.method == SF and p.module is not None]
        blobs = [onnx_blob(model)] + [onnx_blob(p.module) for p in timed if p.module]
        lat = fastest_latency(blobs, spinning=False)
        spin = fastest_latency(blobs, batches={64: LAT_RUNS[64]})
        lat1 = fastest_latency(blobs, threads=1, batches={64: LAT_RUNS[64]})
        base.lat_ms, base.lat_spin_ms, base.lat1_ms = lat[0], spin[0][64], lat1[0][64]
        for p, ms, ms_spin, ms1 in zip(timed, lat[1:], spin[1:], lat1[1:]):
            p.lat = {b: lat[0][b] / ms[b] for b in ms}
            p.lat_spin = spin[0][64] / ms_spin[64]
            p.lat1 = lat1[0][64] / ms1[64]
        for p in points + ablations:
            p.module = None  # free the models

    originals = markdown_table(
        ["model", "top-1", "params", "FLOPs", f"forward pass over {n_calib:,} images (s)", "ORT b1 ms", "ORT b64 ms",
         "ORT b64 ms, spinning", "ORT b64 ms, 1 thread"],
        [[b.model, f"{b.top1:.2%}", f"{b.params:,}", f"{b.flops:,}", f"{b.fwd_s:.2f}", f"{b.lat_ms[1]:.3f}",
          f"{b.lat_ms[64]:.2f}", f"{b.lat_spin_ms:.2f}", f"{b.lat1_ms:.2f}"] for b in bases])
    order = {SF: 0, SF_BN: 1, SF_REC: 2, TP: 3, TP_BN: 4}
    rows = [fmt_row(p) for p in sorted(points, key=lambda p: (models.index(p.model), MEASURES.index(p.measure),
                                                                p.target, order[p.method]))]
    minutes = (time.perf_counter() - t_start) / 60
    parts = [
        "# squeeze_fold on Fashion-MNIST: params and FLOPs budgets, beside Torch-Pruning (one-shot, no fine-tuning)",
        f"Command: `.venv/bin/python benchmarks/squeeze.py {' '.join(sys.argv[1:])}`, {minutes:.0f} min. "
        f"Test images: {n_test:,}; calibration: {n_calib:,} training images (a fixed random subset), the same for "
        f"every method. squeeze_fold: `{sf_step}` then `fold_bn` under the policy's `budget flops|params <= X%` "
        f"with `bounds {{ {bounds_text(args.round_to, args.align)} }}`, `calibrate samples {n_calib}, batch {CALIB_BATCH}`. "
        f"{TP}: Torch-Pruning's group-L1 magnitude importance with one uniform per-layer ratio (its default; the "
        f"classifier's output layer kept), the ratio bisected to the same budget, round_to {args.peer_round_to}; "
        f"{TP_BN}: that model after re-estimating every BatchNorm's statistics on the calibration images "
        "(statistics reset, one pass in train mode with a cumulative average, no gradient). "
        + (f"{SF_BN} (one-shot, label-free): `squeeze_fold`, then `reestimate_bn` (every BatchNorm's statistics "
           "re-estimated on the calibration images in graph order, kept only when they lower the share of calibration "
           "predictions that differ from the original's; the pass's note says which), then `fold_bn`; same shapes, "
           "not timed again. " if args.reestimate_bn else "")
        + (f"{SF_REC} (FLOPs points; not one-shot): `squeeze_fold`, then `{recover_step(args.recover_steps)}` "
           f"(label-free distillation from the original on the same calibration images: "
           f"{args.recover_steps * CALIB_BATCH / n_calib:g} passes over them), then `fold_bn`; its model has the "
           "squeeze_fold row's shapes, so it is not timed again. " if args.recover_steps else "") +
        f"Compile s and the forward pass: wall time, torch with {args.threads} thread(s), on a 2-core machine "
        "shared with other jobs (noisy); compile / forward = compile s over one forward pass of the original model "
        "over the calibration images in batches of 256 (median of 3), timed just before that compile (the machine's "
        "speed drifts over a run; the originals table gives one such time per model); calib. passes = `CompileReport.calibration_passes`; peak "
        "MiB = RSS growth during the compile (a lower bound: reused memory does not show). ORT speed-ups: "
        "original / compressed, ONNX Runtime CPU, 2 threads with the worker threads sleeping between parallel "
        "sections (`session.intra_op.allow_spinning = 0`, as netsqueeze's own timings run); at batch 64 "
        "also with ONNX Runtime's default, the threads busy-waiting (`spinning`), and on 1 thread (no worker "
        f"threads); each the fastest of {LAT_ROUNDS} rounds that time the "
        f"original and every squeeze_fold model of a model in turns ({LAT_RUNS[1]} runs a round at batch 1, "
        f"{LAT_RUNS[64]} at batch 64): the figure other jobs on the machine disturb least. Why both: with the "
        "threads busy-waiting, the sessions timed in turns in this process slow each other, the faster models the "
        "most, while with the threads sleeping a model's time in turns stays close to its time alone "
        "(benchmarks/ort_spinning.py).",
        "## Original models",
        originals,
        "## Results",
        markdown_table(HEADER, rows),
        "## Targets (issue 17), from the rows above",
        markdown_table(["target", "measured", "verdict"], verdicts(points, bases, n_calib)),
    ]
    if ablations:
        parts += [f"## squeeze_fold design alternatives at {hard[0]} {hard[1]:g}x (the default is the `squeeze_fold` "
                  "row of the results)", markdown_table(HEADER, [fmt_row(a) for a in ablations])]
    parts += ["## squeeze_fold allocations (the pass's report notes)", "\n".join(alloc)]
    text = "\n\n".join(parts) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = bounds_stem("squeeze", args.round_to, args.align, ROUND_TO, ALIGN)
    stem += "" if args.search == "fast" else f"-search-{args.search}"
    stem += "" if args.sensitivity == "first_order" else f"-sensitivity-{args.sensitivity}"
    stem += "" if args.sensitivity_samples == SENSITIVITY_SAMPLES else f"-sensitivity_samples-{args.sensitivity_samples}"
    stem += "" if args.branches == "keep" else f"-branches-{args.branches}"
    stem += residual_stem(args.residual_targets)
    out = RESULTS / (f"{stem}-quick.md" if args.quick else f"{stem}.md")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    plot(points, bases, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    settings.close()


if __name__ == "__main__":
    main()
