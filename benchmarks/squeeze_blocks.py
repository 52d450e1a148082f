"""Why squeeze_fold's FLOPs cuts turn into less ONNX Runtime speed than the FLOPs ratio: latency of two 3x3
convolutions (C -> C -> C channels, 28x28, batch 64) against C, in ONNX Runtime CPU with 1 and 2 threads.

    .venv/bin/python benchmarks/squeeze_blocks.py     → benchmarks/results/squeeze-blocks.md

Each figure is the fastest of 15 rounds x 2 runs, the sizes timed in turns (a shared machine slows runs, never
speeds them up), with ONNX Runtime's worker threads sleeping between runs as netsqueeze times (busy-waiting, the
sessions timed in turns slow each other: benchmarks/ort_spinning.py). On a CPU whose ONNX Runtime convolutions
work on blocks of channels, time steps with the block count rather than with C^2, so a channel count that is an
odd multiple of 8 costs as much as the next multiple of 16 when the block is 16 channels (AVX-512).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import markdown_table, write_result
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.compiler.latency import ort_session_options

CHANNELS = (16, 24, 32, 40, 48, 56, 64)
ROUNDS = 15


def main() -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    blobs = []
    for c in CHANNELS:
        m = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)).eval()
        blobs.append(to_onnx(ns.import_model(m, (torch.randn(2, c, 28, 28),))).SerializeToString())
    feeds = [np.random.default_rng(0).standard_normal((64, c, 28, 28), dtype=np.float32) for c in CHANNELS]
    best: dict[int, list[float]] = {}
    for threads in (1, 2):
        so = ort_session_options(threads)  # the worker threads sleep between runs (compiler.latency)
        sessions = [ort.InferenceSession(b, so, providers=["CPUExecutionProvider"]) for b in blobs]
        best[threads] = [float("inf")] * len(sessions)
        for _ in range(ROUNDS):
            for i, (s, x) in enumerate(zip(sessions, feeds)):
                name = s.get_inputs()[0].name
                for _ in range(2):
                    t0 = time.perf_counter()
                    s.run(None, {name: x})
                    best[threads][i] = min(best[threads][i], (time.perf_counter() - t0) * 1000)
    ref = CHANNELS.index(32)
    rows = [[str(c), f"{(c / 32) ** 2:.2f}"] + [f"{best[t][i]:.2f} ms ({best[t][i] / best[t][ref]:.2f})" for t in (1, 2)]
            for i, c in enumerate(CHANNELS)]
    text = "\n\n".join([
        "# ONNX Runtime convolution time against channel count",
        f"Command: `.venv/bin/python benchmarks/squeeze_blocks.py`. Two 3x3 convolutions C -> C -> C, 28x28, batch 64, "
        f"random weights; ONNX Runtime {ort.__version__} CPU; the fastest of {ROUNDS} rounds x 2 runs, sizes timed "
        "in turns, the worker threads sleeping between runs (`session.intra_op.allow_spinning = 0`); in brackets: "
        "relative to C = 32. Machine: 2-core x86-64 with AVX-512, shared with other jobs.",
        markdown_table(["C", "FLOPs (rel. to C = 32)", "1 thread", "2 threads"], rows),
    ]) + "\n"
    write_result("squeeze-blocks.md", text)


if __name__ == "__main__":
    main()
