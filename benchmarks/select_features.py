"""`select_features` on Fashion-MNIST: penultimate features kept vs top-1 for the streaming GOA selection and for
mutual-information top-k, L1 magnitude and random choices, all removed by the same structural rewrite + refit.

    .venv/bin/python benchmarks/select_features.py [--quick] [--models vgg,resnet]

Models: the VGG- and ResNet-style models of benchmarks/common.py (trained 3 epochs, cached). Penultimate
features: VGG's 256 hidden units (`classifier.1`, read by the last linear layer); the ResNet's 64 channels of
the last stage's residual stream (read by `layer3.1.conv1` and, after global pooling, by `fc`), so removing
one shrinks the whole stream. Calibration: the first 5,000 training images with their labels in one .npz
(`labels`), read once (one pass; 1,000 with --quick); top-1 on the 10,000 test images (2,000 with --quick).

Rows: all features; `select_features` with its defaults (GOA keeps what it finds necessary); then at one
quarter of the features (VGG 64, ResNet 16): `select_features { max_features = F/4, min_channels = F/4 }`
(GOA's set, capped, or filled with the rejected features of largest gain); scikit-learn's
`mutual_info_classif` (k-NN estimator, 3 neighbours, random_state 0) top-k on the calibration features;
L1 magnitude (the L1 norm of the weights reading each feature in the last linear layer) top-k; random k
(seeded). Every baseline's set is removed by the same rewrite and least-squares refit as `select_features`
(a benchmark-private subclass that only replaces the choice), so the rows differ only in which features are
kept. Also at GOA's own count. Memory: the reservoir's rows × features and the refit Gram matrices, in float64.
Prints the table and writes benchmarks/results/select.md (select-quick.md with --quick).

`--gdnt`: instead, trim's published GDNT mode (`gdnt_mode = groups`) on the VGG-style model's convs and hidden
linear layer after `fold_bn`, at the published per-layer cap (0.75) and at a raised cap (0.875), with cut
quantiles chosen by one-shot probes on 1,024 images to land near 2x fewer FLOPs (the FLOPs a quantile reaches
depend on the calibration sample: the table gives what each run reached), one-shot and followed by `recover { loss = kl, steps = 938 }` (one epoch-equivalent of batches
of 64 over 4,096 unlabelled calibration images, as benchmarks/recover.py). The peer, Torch-Pruning group-L1
at 2x plus one epoch of fine-tuning, is benchmarks/trim.py's measurement on the same cached model
(benchmarks/results/trim.md). Writes benchmarks/results/select-gdnt.md.
"""

from __future__ import annotations

import os
import sys

# run as a script, this file's folder comes first on sys.path and its name would shadow the standard library's
# `select` (imported by subprocess): drop the folder before anything imports it
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import ClassVar  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns  # noqa: E402
from benchmarks.common import RESULTS, accuracy, fashion_mnist, markdown_table, trained  # noqa: E402
from netsqueeze.passes.dependency import ChannelGroup  # noqa: E402
from netsqueeze.passes.goa import ClassReservoirs, GoaResult  # noqa: E402
from netsqueeze.passes.registry import register_pass  # noqa: E402
from netsqueeze.passes.select_features import SelectFeatures  # noqa: E402

# where the penultimate features are: the selector of their group's producers, the module whose output they
# are (hooked for the baselines' statistics) and the last linear layer reading them
SITES = {
    "vgg": ("classifier.1", "classifier.2", "classifier.3"),
    "resnet": ("layer3.0.downsample.0 | layer3.0.conv2 | layer3.1.conv2", "pool", "fc"),
}
FIXED: dict[str, list[int]] = {}  # the set the benchmark's fixed-choice pass keeps


@register_pass
@dataclass(frozen=True)
class _FixedSelect(SelectFeatures):
    """`select_features` with the choice replaced by `FIXED["keep"]`: the same one pass, removal and refit."""

    name: ClassVar[str] = "bench_select_fixed"

    def _choose(self, g: ChannelGroup, res: ClassReservoirs) -> GoaResult:
        return GoaResult(kept=sorted(FIXED["keep"]), gains=[math.nan] * g.size)


def features(model: nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    out: list[torch.Tensor] = []
    h = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: out.append(o.flatten(1)))
    with torch.no_grad():
        for i in range(0, len(x), 500):
            model(x[i:i + 500])
    h.remove()
    return torch.cat(out).double()


def policy(n: int, body: str) -> str:
    return f"policy bench {{\n  calibrate samples {n}, batch 250\n  {body}\n}}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--gdnt", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = fashion_mnist()
    if args.gdnt:
        gdnt(data, args.quick)
        return
    n_cal, n_test = (1000, 2000) if args.quick else (5000, 10000)
    xc, yc = data["train_x"][:n_cal], data["train_y"][:n_cal]
    xt, yt = data["test_x"][:n_test], data["test_y"][:n_test]
    tmp = Path(tempfile.mkdtemp())
    cal = tmp / "cal.npz"
    np.savez(cal, x=xc.numpy(), labels=yc.numpy())
    header = ["model", "features", "kept", "top-1 %", "Δ vs all (pt)", "compile s", "notes"]
    rows: list[list[str]] = []
    out = RESULTS / ("select-quick.md" if args.quick else "select.md")

    def write() -> None:
        table = markdown_table(header, rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# select_features vs feature-selection baselines (Fashion-MNIST)\n\n"
                       f"{n_cal} labelled calibration images (one pass), top-1 on {n_test} test images; "
                       f"{platform.machine()}, torch threads 1.\n\n{table}\n")
        print(table, flush=True)

    def one(name: str) -> None:
        model = trained(name, data)
        sel, module, head = SITES[name]
        base = 100 * accuracy(model, xt, yt)
        feats = features(model, module, xc)
        n_feat = feats.shape[1]
        k = n_feat // 4
        rows.append([name, "all", str(n_feat), f"{base:.2f}", "0.00", "-", ""])
        write()

        def run(label: str, text: str, note: str = "") -> tuple[ns.CompileResult, float]:
            t0 = time.perf_counter()
            res = ns.compile(model, policy(n_cal, text), example_inputs=(xc[:4],), calibration=cal)
            secs = time.perf_counter() - t0
            acc = 100 * accuracy(res.model, xt, yt)
            kept = int(res.graph.node(head).params["weight"].shape[1])
            rows.append([name, label, str(kept), f"{acc:.2f}", f"{acc - base:+.2f}", f"{secs:.1f}", note])
            write()
            return res, acc

        def fixed(label: str, keep: list[int]) -> None:
            FIXED["keep"] = keep
            run(label, f"bench_select_fixed on {sel}")

        goa, _ = run("select_features (GOA, defaults)", f"select_features on {sel}")
        m = goa.report.passes[0].result.metrics
        consumers = 1 if name == "vgg" else 2
        mem = (m["reservoir_rows"] * n_feat + consumers * (n_feat + 1) ** 2) * 8 / 2**20
        rows[-1][-1] = (f"one pass over {int(m['samples_seen'])} samples; reservoir {int(m['reservoir_rows'])} rows "
                        f"× {n_feat}; memory {mem:.2f} MiB (reservoir + {consumers} Gram); "
                        f"{int(m['dependency_estimates'])} dependency estimates; "
                        f"{int(m['group' + str(_gid(goa)) + '_discarded_online'])} discarded online")
        write()
        k_goa = int(m[f"group{_gid(goa)}_kept"])
        mi = _mutual_info(feats.numpy(), yc.numpy())
        w = dict(model.named_modules())[head].weight.detach().double().abs().sum(0)
        rnd = torch.randperm(n_feat, generator=torch.Generator().manual_seed(0)).tolist()
        for kk in sorted({k, k_goa}, reverse=True):
            tag = f"k={kk}" + (" (F/4)" if kk == k else " (GOA's count)")
            if kk == k:
                run(f"select_features, max_features = min_channels = {k}",
                    f"select_features on {sel} {{ max_features = {k}, min_channels = {k} }}")
            fixed(f"mutual_info_classif top-k, {tag}", _top(mi, kk))
            fixed(f"L1 magnitude top-k, {tag}", _top(w.numpy(), kk))
            fixed(f"random, {tag}", sorted(rnd[:kk]))

    for name in args.models.split(","):
        one(name)


# (gdnt ratio = the cut quantile, per-layer cap): the published cap at its largest cut, and a raised cap (probed
# on 1,024 images: 1.72x and 1.99x fewer FLOPs; on the benchmark's 4,096 they reached 2.14x and 1.78x)
GDNT_CONFIGS = [(0.99, 0.75), (0.7, 0.875)]


def gdnt(data: dict[str, torch.Tensor], quick: bool) -> None:
    model = trained("vgg", data)
    n_cal, n_test, steps = (512, 2000, 20) if quick else (4096, 10000, 938)
    xc = data["train_x"][:n_cal]
    xt, yt = data["test_x"][:n_test], data["test_y"][:n_test]
    base = 100 * accuracy(model, xt, yt)
    header = ["method", "FLOPs reduction", "params reduction", "top-1 one-shot", "top-1 recovered", "recovery",
              "compile s"]
    rows = [["original", "1.00x", "1.00x", f"{base:.2f}%", "-", "-", "-"]]
    out = RESULTS / ("select-gdnt-quick.md" if quick else "select-gdnt.md")

    def write() -> None:
        table = markdown_table(header, rows)
        out.write_text(f"# trim gdnt_mode = groups (published GDNT) + recover, VGG-style, Fashion-MNIST\n\n"
                       f"{n_cal} unlabelled calibration images, top-1 on {n_test} test images, torch threads 1. "
                       f"Peer (benchmarks/results/trim.md, same model): Torch-Pruning group-L1 at 2.03x FLOPs, "
                       f"one-shot 45.37%, after one epoch of fine-tuning 92.48%.\n\n{table}\n")
        print(table, flush=True)

    for ratio, cap in GDNT_CONFIGS:
        trim = (f"fold_bn\n  trim on type(conv) | type(linear) except last(type(linear)) {{ criterion = gdnt, "
                f"gdnt_mode = groups, ratio = {ratio}, gdnt_layer_cap = {cap} }}")
        one = policy(n_cal, trim).replace("batch 250", "batch 64")
        rec = policy(n_cal, f"{trim}\n  recover {{ loss = kl, steps = {steps} }}").replace("batch 250", "batch 64")
        t0 = time.perf_counter()
        r1 = ns.compile(model, one, example_inputs=(xc[:4],), calibration=xc)
        t1 = time.perf_counter() - t0
        m = next(p for p in r1.report.passes if p.name == "trim").result.metrics
        acc1 = 100 * accuracy(r1.model, xt, yt)
        t0 = time.perf_counter()
        r2 = ns.compile(model, rec, example_inputs=(xc[:4],), calibration=xc)
        t2 = time.perf_counter() - t0
        acc2 = 100 * accuracy(r2.model, xt, yt)
        rows.append([f"gdnt groups, ratio {ratio}, cap {cap}", f"{1 / m['flops_ratio']:.2f}x",
                     f"{1 / m['params_ratio']:.2f}x", f"{acc1:.2f}%", f"{acc2:.2f}%",
                     f"recover kl, {steps} steps of 64", f"{t1:.0f} + {t2:.0f}"])
        write()


def _gid(res: ns.CompileResult) -> int:
    keys = [key for key in res.report.passes[0].result.metrics if key.startswith("group") and key.endswith("_kept")]
    return int(keys[0][len("group"):-len("_kept")])


def _top(score: np.ndarray, k: int) -> list[int]:
    return sorted(int(i) for i in np.argsort(-score, kind="stable")[:k])


def _mutual_info(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from sklearn.feature_selection import mutual_info_classif

    return np.asarray(mutual_info_classif(x, y, n_neighbors=3, random_state=0))


if __name__ == "__main__":
    main()
