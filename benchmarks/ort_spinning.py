"""ONNX Runtime's busy-waiting worker threads against sleeping ones: models alone, and timed in turns in one process.

    .venv/bin/python benchmarks/ort_spinning.py [--models vgg,resnet] [--flops 2,3,5] [--threads 2] [--repeats 3]

The benchmark models of benchmarks/squeeze.py (trained once, cached), compiled as it compiles them (`squeeze_fold`
then `fold_bn` under `budget flops <= 1/X`, `bounds { round_to = 8 }`, the same 2,048 calibration images), emitted
to ONNX, timed at batch 64 by ONNX Runtime's CPU provider with `--threads` intra-op threads, once with its default
(`spinning`: the worker threads busy-wait for the next parallel section) and once with
`session.intra_op.allow_spinning = 0` (they sleep; how netsqueeze's `compiler.latency` times), in fresh processes:

- alone: the process holds that one session; the fastest of 60 runs;
- in turns: the process holds the original's session and the squeezed model's, and runs them in turns, 2 runs
  each, 30 rounds, as a side-by-side timing does (the compile's `runtime` block, benchmarks/squeeze.py); the
  fastest run of each.

The settings alternate process by process, `--repeats` times each; a cell is the fastest of its repeats, with the
slowest in brackets. Speed-ups are the original's time over the model's in the same setting and arrangement.
Prints the table and writes benchmarks/results/ort-spinning.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fashion_mnist, markdown_table, trained, write_result
from benchmarks.squeeze import (
    CALIB_BATCH,
    LAT_ROUNDS,
    LAT_RUNS,
    ROUND_TO,
    bounds_text,
    fastest_latency,
    flops_params,
    onnx_blob,
    run_ns,
)

BATCH = 64
ROUNDS, RUNS = LAT_ROUNDS, LAT_RUNS[BATCH]


def child(paths: list[str], threads: int, spinning: bool) -> list[float]:
    """The fastest run (ms) of each ONNX model in `paths`, its sessions in this process timed in turns as
    benchmarks/squeeze.py times them (`fastest_latency`: RUNS runs each, ROUNDS rounds)."""
    blobs = [Path(p).read_bytes() for p in paths]
    return [ms[BATCH] for ms in fastest_latency(blobs, threads, {BATCH: RUNS}, spinning)]


def timed(paths: list[Path], threads: int, spinning: bool) -> list[float]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([str(p) for p in paths]), "--threads",
                          str(threads), "--spinning", str(int(spinning))], capture_output=True, text=True, check=True)
    return [float(v) for v in json.loads(out.stdout.strip().splitlines()[-1])["ms"]]


def cell(xs: list[float]) -> str:
    return f"{min(xs):.2f} ({max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--flops", default="2,3,5", help="FLOPs reductions to squeeze to (default 2,3,5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spinning", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"ms": child(json.loads(args.child), args.threads, bool(args.spinning))}))
        return
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    data = fashion_mnist()
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:2048]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = trained(name, data)
            flops0 = flops_params(model)[0]
            variants: list[tuple[str, float, bytes]] = [("original", 1.0, onnx_blob(model))]
            for t in (float(x) for x in args.flops.split(",")):
                res, _, _ = run_ns(model, ["squeeze_fold", "fold_bn"], calib, {"flops": 1.0 / t}, ROUND_TO)
                variants.append((f"squeeze_fold, flops {t:g}x", flops0 / flops_params(res.model)[0],
                                 onnx_blob(res.model)))
            paths = []
            for i, (_, _, blob) in enumerate(variants):
                paths.append(Path(tmp) / f"{name}_{i}.onnx")
                paths[-1].write_bytes(blob)
            alone: dict[tuple[int, bool], list[float]] = {}
            turns: dict[tuple[int, bool], list[tuple[float, float]]] = {}  # (original, model) in the same process
            for _ in range(args.repeats):
                for i, path in enumerate(paths):
                    for spinning in (True, False):
                        alone.setdefault((i, spinning), []).append(timed([path], args.threads, spinning)[0])
                        if i:
                            o, m = timed([paths[0], path], args.threads, spinning)
                            turns.setdefault((i, spinning), []).append((o, m))
                        print(f"  {name} {variants[i][0]} spinning={spinning}: alone {alone[i, spinning][-1]:.2f} ms"
                              + (f", in turns {turns[i, spinning][-1][1]:.2f} ms" if i else ""),
                              file=sys.stderr, flush=True)
            for i, (label, fr, _) in enumerate(variants):
                row = [name, label, f"{fr:.2f}x", cell(alone[i, True]), cell(alone[i, False])]
                if i == 0:
                    rows.append([*row, *["-"] * 8])
                    continue
                on, off = min(alone[0, True]) / min(alone[i, True]), min(alone[0, False]) / min(alone[i, False])
                t_on = min(o for o, _ in turns[i, True]) / min(m for _, m in turns[i, True])
                t_off = min(o for o, _ in turns[i, False]) / min(m for _, m in turns[i, False])
                rows.append([*row, cell([m for _, m in turns[i, True]]), cell([m for _, m in turns[i, False]]),
                             cell([o for o, _ in turns[i, True]]), cell([o for o, _ in turns[i, False]]),
                             f"{on:.2f}x ({on / fr:.2f})", f"{off:.2f}x ({off / fr:.2f})",
                             f"{t_on:.2f}x ({t_on / fr:.2f})", f"{t_off:.2f}x ({t_off / fr:.2f})"])
    table = markdown_table(
        ["model", "variant", "FLOPs red.", "ms alone, spinning", "ms alone, sleeping", "ms in turns, spinning",
         "ms in turns, sleeping", "original's ms in turns, spinning", "original's ms in turns, sleeping",
         "speed-up alone, spinning (/ FLOPs red.)", "alone, sleeping",
         "in turns, spinning", "in turns, sleeping"], rows)
    text = "\n\n".join([
        "# ONNX Runtime: busy-waiting against sleeping worker threads, alone and timed in turns",
        f"Command: `.venv/bin/python benchmarks/ort_spinning.py {' '.join(sys.argv[1:])}`, "
        f"{(time.perf_counter() - t_start) / 60:.0f} min. ONNX Runtime CPU, batch {BATCH}, {args.threads} threads, "
        "on a 2-core machine. Alone: one session in a fresh process, the fastest of "
        f"{ROUNDS * RUNS} runs. In turns: the original's and the model's sessions in a fresh process, {RUNS} runs "
        f"each in turns for {ROUNDS} rounds, the fastest of each. Each cell: the fastest of {args.repeats} processes, the slowest in brackets; "
        "spinning = ONNX Runtime's default, sleeping = `session.intra_op.allow_spinning = 0`. Models: "
        f"benchmarks/squeeze.py's (`squeeze_fold` then `fold_bn`, `bounds {{ {bounds_text(ROUND_TO)} }}`, 2,048 "
        f"calibration images, batch {CALIB_BATCH}).",
        table,
    ]) + "\n"
    write_result("ort-spinning.md", text)


if __name__ == "__main__":
    main()
