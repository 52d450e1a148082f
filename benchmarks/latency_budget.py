"""Measured latency budgets and their cost models, on the trained VGG- and ResNet-style Fashion-MNIST models.

1. Prediction error. Both cost models are fitted on the same measurements (the original and the channel-scaled
   calibration variants of `latency_budget.variants`, timed side by side): the per-op-kind model
   (`compiler.cost_model`) and the single line t = a + b·FLOPs. They then predict the latency ratio of pipeline
   results they never saw (fold_bn + squeeze_fold at several FLOPs budgets, round_to 1 and 8), measured side by
   side with the original: the table gives both predictions and their errors.
2. The search. `budget latency <= 80/60/40%` compiled with `runtime { cost_model = per_kind }` and `= line`: the
   pipeline run at which the target was first met, runs in all, the ratio the compile confirmed, an independent
   re-measurement of the emitted ONNX model (fresh sessions, 30 interleaved rounds), FLOPs kept and held-out
   top-1 (no fine-tuning, no guard).

ONNX Runtime CPU, batch 64, 1 thread.

    .venv/bin/python -m benchmarks.latency_budget            # both parts, both models
    .venv/bin/python -m benchmarks.latency_budget --quick    # VGG only, fewer points
    .venv/bin/python -m benchmarks.latency_budget --parts search --cost-models per_kind   # rerun a part

Results accumulate in benchmarks/results/latency_budget.json (each part with the time it ran); the markdown
table is rendered from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import netsqueeze as ns
from benchmarks.common import fashion_mnist, markdown_table, trained
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.compiler.cost_model import fit_blocked, graph_works
from netsqueeze.compiler.latency import measure
from netsqueeze.compiler.latency_budget import fit, variants
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext

BATCH = 64
TARGETS = (0.8, 0.6, 0.4)
FLOPS_BUDGETS = (0.8, 0.6, 0.4, 0.25)
SEARCH = """policy latency {{
  runtime {{ threads = 1, batch = {batch}, cost_model = {model} }}
  budget latency <= {target:.0%}{bounds}
  fold_bn
  squeeze_fold on type(conv) | type(linear) except last(type(linear)) {{ round_to = {round_to} }}
}}"""
FIXED = """policy flops {{
  budget flops <= {budget:.0%}
  fold_bn
  squeeze_fold on type(conv) | type(linear) except last(type(linear)) {{ round_to = {round_to} }}
}}"""
DYN = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}


def top1(proto: object, x: torch.Tensor, y: torch.Tensor) -> float:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 500].numpy()})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y.numpy()).mean())


def prediction(name: str, model: torch.nn.Module, data: dict[str, torch.Tensor], quick: bool) -> tuple[list[list[str]], str]:
    """Rows of the prediction table for one model, and the fitted per-kind coefficients."""
    xt = data["test_x"]
    example = (xt[:2],)  # 2: torch.export fixes a batch dim whose example is 1
    g0 = ns.import_model(model, example, dynamic_shapes=DYN)
    inputs = (xt[:BATCH],)
    calib = variants(g0, PassContext())
    lat = measure([g0, *[g for _, g in calib]], inputs, runtime="ort", threads=1, rounds=21)
    t0 = lat[0].median_ms / 1e3
    works = [graph_works(g, BATCH) for g in [g0, *[g for _, g in calib]]]
    per_kind = fit_blocked([(w, x.median_ms / 1e3) for w, x in zip(works, lat)])
    flops0 = graph_stats(g0).flops
    flops = [graph_stats(g).flops * BATCH for g in [g0, *[g for _, g in calib]]]
    a, b = fit([(f, x.median_ms / 1e3) for f, x in zip(flops, lat)])
    tests: list[tuple[int, str, Graph]] = []
    budgets = FLOPS_BUDGETS[1::2] if quick else FLOPS_BUDGETS
    for round_to in (1, 8):
        for fb in budgets:
            res = ns.compile(model, FIXED.format(budget=fb, round_to=round_to), example_inputs=example,
                             calibration=data["train_x"][:512], dynamic_shapes=DYN, progress=False)
            tests.append((round_to, f"flops <= {fb:.0%}, round_to {round_to}", res.graph))
    timed = measure([g0, *[g for _, _, g in tests]], inputs, runtime="ort", threads=1, rounds=21)
    rows = []
    p0k, p0l = per_kind.predict(works[0][per_kind.block]), a + b * flops0 * BATCH
    errs: dict[int, list[tuple[float, float]]] = {}
    for (round_to, label, g), x in zip(tests, timed[1:]):
        measured = x.median_ms / timed[0].median_ms
        pk = per_kind.predict(graph_works(g, BATCH)[per_kind.block]) / p0k
        pl = (a + b * graph_stats(g).flops * BATCH) / p0l
        errs.setdefault(round_to, []).append((abs(pk - measured), abs(pl - measured)))
        rows.append([name, label, f"{graph_stats(g).flops / flops0:.1%}", f"{measured:.1%}", f"{pk:.1%}",
                     f"{pk - measured:+.1%}", f"{pl:.1%}", f"{pl - measured:+.1%}"])
        print(rows[-1], flush=True)
    for round_to, e in errs.items():
        rows.append([name, f"**mean abs error, round_to {round_to}**", "", "", "",
                     f"**{statistics.mean(k for k, _ in e):.1%}**", "", f"**{statistics.mean(x for _, x in e):.1%}**"])
    fitted = (f"{name}: per-kind {per_kind.describe()}; line a = {a * 1e3:.3g} ms, b = {b * 1e12:.4g} ps/FLOP "
              f"(calibration: the original at {t0 * 1e3:.2f} ms and {len(calib)} variants: "
              f"{', '.join(n for n, _ in calib)})")
    return rows, fitted


def search(name: str, model: torch.nn.Module, data: dict[str, torch.Tensor], targets: tuple[float, ...],
           round_tos: tuple[int, ...], cm: str, align: int | None = None) -> list[list[str]]:
    xt, yt = data["test_x"][:2000], data["test_y"][:2000]
    example = (xt[:2],)  # 2: torch.export fixes a batch dim whose example is 1
    original = to_onnx(ns.import_model(model, example, dynamic_shapes=DYN))
    base_top1 = top1(original, xt, yt)
    rows = []
    for round_to in round_tos:
        for target in targets:
            t = time.perf_counter()
            try:
                res = ns.compile(model, SEARCH.format(batch=BATCH, model=cm, target=target, round_to=round_to,
                                               bounds="" if align is None else f"\n  bounds {{ align = {align} }}"),
                                 example_inputs=example, calibration=data["train_x"][:512], target="onnx",
                                 dynamic_shapes=DYN, progress=False)
            except NetsqueezeError as e:  # a miss is a result too
                rows.append([name, f"<= {target:.0%}", str(round_to), cm, "0", "", "", "", "",
                             e.diagnostics[0].message.replace("|", "/"), "", f"{time.perf_counter() - t:.0f} s"])
                print(rows[-1], flush=True)
                continue
            seconds = time.perf_counter() - t
            lat = {x["model"]: x for x in res.report.latency}
            confirmed = lat["compressed"]["median_ms"] / lat["original"]["median_ms"]
            lo, lc = measure([original, res.model], (xt[:BATCH],), runtime="ort", threads=1, rounds=30)
            runs_note = next(n for n in res.report.notes if n.startswith("latency budget runs"))
            runs = runs_note.split("): ", 1)[1].split(", ")
            ratios = [float(r.rsplit("-> ", 1)[1].rstrip("%")) / 100 if "-> " in r else 2.0 for r in runs]
            first = next((i + 1 for i, r in enumerate(ratios) if r <= target), 0)
            rows.append([name, f"<= {target:.0%}", str(round_to), cm, str(first), str(len(runs)),
                         f"{confirmed:.1%}", f"{lc.median_ms / lo.median_ms:.1%}",
                         f"{res.report.after.flops / res.report.before.flops:.1%}", "; ".join(runs),
                         f"{base_top1:.2%} -> {top1(res.model, xt, yt):.2%}", f"{seconds:.0f} s"])
            print(rows[-1], flush=True)
    return rows


def render(res: dict, align: int | None = None) -> str:  # type: ignore[type-arg]
    """The results' markdown: the prediction part where it was run, the searches (`align`: their bounds)."""
    predicted = "rows" in res["prediction"]
    pred = markdown_table(["model", "pipeline result", "FLOPs", "measured latency", "per-kind predicts", "error",
                           "line predicts", "error"], res["prediction"]["rows"]) if predicted else ""
    search_rows = [r for cm in ("per_kind", "line") for r in res["search"].get(cm, {}).get("rows", [])]
    search_rows.sort(key=lambda r: (r[0] != "vgg", -float(r[1].split()[1].rstrip("%")), r[3] != "per_kind"))
    runs = markdown_table(["model", "latency budget", "round_to", "cost model", "first met at run", "runs",
                           "confirmed in compile", "re-measured (30 rounds)", "FLOPs",
                           "runs: FLOPs: predicted -> measured", "top-1 (2,000 test images)", "compile"], search_rows)
    summary = []
    for cm in ("per_kind", "line"):
        rows = res["search"].get(cm, {}).get("rows", [])
        met = [r for r in rows if r[4] != "0"]
        if rows:
            summary.append(f"- `{cm}`: {len(met)} of {len(rows)} budgets met" + (
                f", first met at run {statistics.mean(int(r[4]) for r in met):.1f} and "
                f"{statistics.mean(int(r[5]) for r in met):.1f} runs in all on average over those met" if met else ""))
    when = "; ".join([f"prediction: {res['prediction']['when']}" for _ in range(predicted)]
                     + [f"{cm} searches: {res['search'][cm]['when']}" for cm in ("per_kind", "line")
                        if cm in res["search"]])
    return ("# Measured latency budgets and cost models (Fashion-MNIST, ONNX Runtime CPU, batch 64, 1 thread)\n\n"
            "Latency ratios are of the original model, timed side by side with it in one process. Other jobs "
            "shared the 2-core machine during these runs (benchmarks and tests of other work), so single figures "
            f"carry several percent of noise. Runs (UTC): {when}.\n\n"
            + ("## Prediction error: per-op-kind model vs single line\n\n"
               "Both fitted on the same measurements (the original and its channel-scaled calibration variants); "
               "predicting pipeline results (fold_bn + squeeze_fold at a FLOPs budget) they never saw.\n\n"
               f"{pred}\n\nFitted coefficients:\n\n" + "\n".join(f"- {c}" for c in res["prediction"]["fitted"])
               + "\n\n" if predicted else "")
            + "## Searches for a latency budget\n\n"
            "fold_bn, then squeeze_fold searching FLOPs"
            + ("" if align is None else f" under `bounds {{ align = {align} }}`") + " (no guard, no fine-tuning); `runs` is the number of "
            "pipeline runs the search made, `first met at run` the first whose measured latency met the budget "
            "(0: none did); the `line` search's runs show FLOPs -> measured (it predicts no ratio per run).\n\n"
            + "\n".join(summary) + f"\n\n{runs}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="VGG only, fewer points (development)")
    ap.add_argument("--parts", default="prediction,search", help="which parts to run (the others are kept from "
                    "results/latency_budget.json; 'none' renders the markdown from it)")
    ap.add_argument("--cost-models", default="per_kind,line", help="the searches' cost models to run")
    ap.add_argument("--align", type=int, default=None, help="the searches' `bounds { align }` (default: not set, the "
                    "passes' default, whole blocks of 16 for convolutions' counts of 16 or more; 1: any count); "
                    "another value writes latency_budget-align-N.json/.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = fashion_mnist()
    names = ("vgg",) if args.quick else ("vgg", "resnet")
    parts = set(args.parts.split(","))
    stem = ("latency_budget_quick" if args.quick else "latency_budget") + (
        "" if args.align is None else f"-align-{args.align}")
    store = Path(__file__).with_name("results") / f"{stem}.json"
    res = json.loads(store.read_text()) if store.exists() else {"prediction": {}, "search": {}}
    now = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if "prediction" in parts:
        pred_rows: list[list[str]] = []
        fitted: list[str] = []
        for name in names:
            rows, coef = prediction(name, trained(name, data), data, args.quick)
            pred_rows += rows
            fitted.append(coef)
            print(coef, flush=True)
        res["prediction"] = {"rows": pred_rows, "fitted": fitted, "when": now}
    if "search" in parts:
        for cm in args.cost_models.split(","):
            rows = []
            for name in names:
                rows += search(name, trained(name, data), data, TARGETS[:1] if args.quick else TARGETS, (8,), cm,
                               args.align)
            res["search"][cm] = {"rows": rows, "when": now}
    store.parent.mkdir(exist_ok=True)
    store.write_text(json.dumps(res, indent=1))
    text = render(res, args.align)
    print(text)
    (store.parent / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
