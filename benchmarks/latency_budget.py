"""Measured latency budgets: `budget latency <= X%` on the trained VGG-style Fashion-MNIST model.

For each target: the latency ratio the compile confirmed by measurement, an independent re-measurement of
the emitted ONNX model against the original (fresh sessions, 30 interleaved rounds), FLOPs reached, how many
pipeline runs the cost model needed, held-out top-1 before/after (no fine-tuning, no guard), compile time.
ONNX Runtime CPU, batch 64, 1 thread.

    .venv/bin/python -m benchmarks.latency_budget
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import netsqueeze as ns
from benchmarks.common import fashion_mnist, markdown_table, trained
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.compiler.latency import measure

TARGETS = (0.8, 0.6, 0.4)
POLICY = """policy vgg_latency {{
  runtime {{ threads = 1, batch = 64 }}
  budget latency <= {target:.0%}
  fold_bn
  squeeze_fold on type(conv) | type(linear) except last(type(linear)) {{ round_to = {round_to} }}
}}"""
# ONNX Runtime's CPU convolutions work on blocks of 8 channels (AVX2 NCHWc): odd counts can be slower than more
ROUND_TO = (1, 8)


def top1(proto: object, x: torch.Tensor, y: torch.Tensor) -> float:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 500].numpy()})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y.numpy()).mean())


def main() -> None:
    torch.set_num_threads(1)
    data = fashion_mnist()
    model = trained("vgg", data)
    calib = data["train_x"][:512]
    xt, yt = data["test_x"][:2000], data["test_y"][:2000]
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    example = (xt[:1],)
    original = to_onnx(ns.import_model(model, example, dynamic_shapes=dyn))
    base_top1 = top1(original, xt, yt)
    rows = []
    for round_to, target in [(r, t) for r in ROUND_TO for t in TARGETS]:
        t = time.perf_counter()
        res = ns.compile(model, POLICY.format(target=target, round_to=round_to), example_inputs=example,
                         calibration=calib,
                         target="onnx", dynamic_shapes=dyn, progress=False)
        seconds = time.perf_counter() - t
        lat = {x["model"]: x for x in res.report.latency}
        confirmed = lat["compressed"]["median_ms"] / lat["original"]["median_ms"]
        lo, lc = measure([original, res.model], (xt[:64],), runtime="ort", threads=1, rounds=30)
        runs = next(n for n in res.report.notes if n.startswith("latency budget met")).split(", ")[-1]
        tried = next(n for n in res.report.notes if n.startswith("latency budget runs")).split(": ", 1)[1]
        rows.append([f"<= {target:.0%}", str(round_to), f"{confirmed:.1%}", f"{lc.median_ms / lo.median_ms:.1%} "
                     f"({lo.median_ms:.2f} -> {lc.median_ms:.2f} ms)",
                     f"{res.report.after.flops / res.report.before.flops:.1%}", runs.split()[0],
                     tried, f"{base_top1:.2%} -> {top1(res.model, xt, yt):.2%}", f"{seconds:.0f} s"])
        print(rows[-1], flush=True)
    table = markdown_table(["latency budget", "round_to", "confirmed in compile", "re-measured (ORT b64, 30 rounds)",
                            "FLOPs", "pipeline runs", "runs: FLOPs -> latency", "top-1 (2,000 test images)",
                            "compile"], rows)
    text = ("# Measured latency budgets (VGG-style, Fashion-MNIST, ONNX Runtime CPU, batch 64, 1 thread)\n\n"
            f"{table}\n\nPolicy: fold_bn, then squeeze_fold searching FLOPs (no guard, no fine-tuning); "
            "the compiler fits t = a + b*FLOPs to measurements and reruns the pipeline until the measured "
            "latency meets the budget.\n")
    print(text)
    out = Path(__file__).with_name("results") / "latency_budget.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
