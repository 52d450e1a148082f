"""Where ONNX Runtime spends its time, layer by layer, before and after FLOPs-budgeted squeeze_fold compiles.

    .venv/bin/python benchmarks/ort_profile.py [--models vgg,resnet] [--flops 50,33.33,20] [--threads 1] [--batch 64]

The benchmark models of benchmarks/squeeze.py (trained once, cached), compiled as it compiles them (`squeeze_fold`
then `fold_bn` under `budget flops <= X%`, `bounds { round_to = 8, align = auto }`, the same 2,048 calibration images), both
emitted to ONNX and run by ONNX Runtime's CPU provider (worker threads sleeping, as netsqueeze times) with its
profiler on: per node, the median kernel time over the timed runs, with the shapes the runtime ran (its blocked
convolutions pad channels: a conv cut to 24 channels shows 32 on an AVX-512 CPU) and the multiply-add FLOPs of
those shapes. The summary splits each speed-up's shortfall against the IR's FLOPs reduction in two: the FLOPs the
runtime computes as it pads channels to its blocks, and its speed per FLOP of what is left. The per-node tables say
which layers the runtime runs slowly per FLOP.
The bound table asks whether any allocation could do better on padding alone: over every allocation of channel
counts the benchmark's bounds allow (each group at each allowed count, exhaustively), the highest ratio of the
convolution FLOPs reduction as run (channels padded as `compiler.cost_model.padded_channels` pads them) to the
convolution FLOPs reduction, among allocations whose convolution FLOPs are within 15% under each budget; with every
residual branch kept, and with residual branches removable (`squeeze_fold { branches = remove }`). If the runtime's
time were proportional to the FLOPs it computes, that ratio would be the highest speed-up / FLOPs reduction any
allocation reaches there; a ratio under 0.8 means no allocation in those bounds can meet the issue's 0.8.
Prints the tables and writes benchmarks/results/ort-profile.md.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import fashion_mnist, markdown_table, trained, write_result
from benchmarks.squeeze import ALIGN, CALIB_BATCH, ROUND_TO, bounds_text, onnx_blob
from netsqueeze.compiler.cost_model import conv_flops as ir_conv_flops
from netsqueeze.compiler.cost_model import cpu_block, padded_channels
from netsqueeze.compiler.latency import ort_session_options
from netsqueeze.ir.ops import node_flops
from netsqueeze.passes.allocation import GroupBounds
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.rewrite import branch_removable

WARMUP, RUNS = 5, 40


def profile(blob: bytes, threads: int, batch: int) -> tuple[float, list[dict[str, Any]]]:
    """(fastest whole run in ms, per node: name, op, input/weight/output shapes as run, median kernel ms)."""
    import numpy as np
    import onnxruntime as ort

    so = ort_session_options(threads)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        name = sess.get_inputs()[0].name
        best = math.inf
        for i in range(WARMUP + RUNS):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            if i >= WARMUP:
                best = min(best, (time.perf_counter() - t0) * 1e3)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    times: dict[str, list[float]] = collections.defaultdict(list)
    info: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        times[e["name"]].append(e["dur"] / 1e3)
        shapes = [next(iter(d.values())) for d in e["args"].get("input_type_shape", [])]
        outs = [next(iter(d.values())) for d in e["args"].get("output_type_shape", [])]
        info[e["name"]] = {"node": e["name"].removesuffix("_kernel_time"), "op": e["args"]["op_name"],
                           "input": shapes[0] if shapes else [], "weight": shapes[1] if len(shapes) > 1 else [],
                           "output": outs[0] if outs else []}
    rows = []
    for key, ts in times.items():  # the first WARMUP runs are warm-up: the median of the rest
        rows.append({**info[key], "ms": statistics.median(ts[WARMUP:] or ts)})
    return best, rows


def conv_flops(r: dict[str, Any]) -> int:
    """Multiply-add FLOPs (2 per MAC) of a Conv as the runtime ran it: output elements x (C/g x taps)."""
    if r["op"] != "Conv" or len(r["weight"]) < 3 or not r["output"]:
        return 0
    return 2 * math.prod(r["output"]) * math.prod(r["weight"][1:])


def totals(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """(kernel ms summed over the nodes, conv FLOPs as run) of one profiled model."""
    return sum(r["ms"] for r in rows), sum(conv_flops(r) for r in rows)


def padding_bound(graph: ns.Graph, budgets: list[float], block: int, round_to: int, align: int
                  ) -> list[tuple[str, float, float, float, str]]:
    """Per budget (percent of the original's FLOPs) and branch setting: (setting, budget, best FLOPs-as-run
    reduction / FLOPs reduction, the FLOPs reduction there, its channel counts) over every allocation of the dense
    convolutions' channel groups within the bounds (`round_to`, `align`), convolution FLOPs only."""
    groups = find_groups(graph)
    convs = []  # (FLOPs per input x output channel, input group, output group, input channels, output channels)
    for node in graph.nodes():
        w = node.params.get("weight")
        if node.kind != "conv" or int(node.attrs.get("groups", 1) or 1) != 1 or not isinstance(w, torch.Tensor):
            continue
        out_c, in_c = int(w.shape[0]), int(w.shape[1])
        gid = {(m.role, m.axis): g.id for g in groups for m in g.members if m.node == node.id and m.param == "weight"}
        convs.append((node_flops(graph, node) / (out_c * in_c), gid.get(("consumer", 1)), gid.get(("producer", 0)),
                      in_c, out_c))
    touched = sorted({g for _, gi, go, _, _ in convs for g in (gi, go) if g is not None})
    free = [g for g in touched if groups[g].frozen is None]
    out = []
    for setting in ("kept", "removable"):
        allowed = [GroupBounds(groups[g].size, 1, round_to, align,
                               empty=setting == "removable" and branch_removable(graph, groups[g]) is None).allowed()
                   for g in free]
        if setting == "removable" and all(0 not in a for a in allowed):
            continue
        if math.prod(len(a) for a in allowed) > 2_000_000:
            out.append((setting, math.nan, math.nan, math.nan, "too many allocations to enumerate"))
            continue
        base = sum(a * ci * co for a, _, _, ci, co in convs)
        points = []
        for counts in itertools.product(*allowed):
            c = dict(zip(free, counts, strict=True))
            nominal = run = 0.0
            for a, gi, go, ci, co in convs:
                ci, co = c.get(gi, ci) if gi is not None else ci, c.get(go, co) if go is not None else co
                if ci and co:
                    nominal += a * ci * co
                    out_p, in_p = padded_channels(co, ci, block)
                    run += a * in_p * out_p
            points.append((nominal / base, run / base, counts))
        base_run = sum(a * math.prod(padded_channels(co, ci, block)) for a, _, _, ci, co in convs) / base
        for budget in budgets:
            near = [p for p in points if 0.85 * budget / 100 <= p[0] <= budget / 100]
            if not near:
                out.append((setting, budget, math.nan, math.nan, "no allocation near the budget"))
                continue
            best = max(near, key=lambda p: (base_run / p[1]) * p[0])
            out.append((setting, budget, (base_run / best[1]) * best[0], 1 / best[0],
                        ", ".join(f"{groups[g].producers[0]}: {k}" for g, k in zip(free, best[2], strict=True))))
    return out


def node_table(runs: dict[str, tuple[float, list[dict[str, Any]]]]) -> str:
    """Per node of every variant: op, shapes as run, median ms, its share of the variant's kernel time and conv
    FLOPs as run, and ms per GFLOP."""
    table = []
    for variant, (_, rows) in runs.items():
        total_ms, total_fl = totals(rows)
        for r in rows:
            fl = conv_flops(r)
            table.append([variant, r["node"], r["op"], "x".join(map(str, r["input"])),
                          "x".join(map(str, r["weight"])) if r["op"] == "Conv" else "-", f"{r['ms']:.3f}",
                          f"{r['ms'] / total_ms:.1%}", f"{fl / max(1, total_fl):.1%}" if fl else "-",
                          f"{r['ms'] / (fl / 1e9):.2f}" if fl else "-"])
    return markdown_table(["variant", "node (as ONNX Runtime fused it)", "op", "input as run", "weight as run",
                           "median ms", "share of time", "share of conv FLOPs", "ms per GFLOP"], table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--flops", default="50,33.33,20", help="FLOPs budgets, percent of the original, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--branches", default="keep", choices=("keep", "remove"),
                    help="squeeze_fold's `branches` option; remove writes ort-profile-branches-remove.md")
    args = ap.parse_args()
    step = "squeeze_fold" if args.branches == "keep" else f"squeeze_fold {{ branches = {args.branches} }}"
    budgets = [float(b) for b in args.flops.split(",")]
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    data = fashion_mnist()
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:2048]]
    block = cpu_block()[0]
    align = block if ALIGN == "auto" else int(ALIGN)
    summary, sections, bound = [], [], []
    for name in args.models.split(","):
        model = trained(name, data)
        graph = ns.import_model(model, calib[:2])
        bound += [[name, setting, f"flops <= {b:g}%", f"{r:.2f}" if r == r else "-", f"{red:.2f}x" if red == red else "-",
                   counts] for setting, b, r, red, counts in padding_bound(graph, budgets, block, ROUND_TO, align)]
        original = profile(onnx_blob(model), args.threads, args.batch)
        ms0, fl0 = totals(original[1])
        for budget in budgets:
            policy = (f"policy bench {{\n  calibrate samples {len(calib)}, batch {CALIB_BATCH}\n  budget flops <= "
                      f"{budget:g}%\n  bounds {{ {bounds_text(ROUND_TO, ALIGN)} }}\n  {step}\n  fold_bn\n}}\n")
            res = ns.compile(model, policy, example_inputs=(calib[:2],), calibration=calib, target="onnx",
                             progress=False)
            squeezed = profile(res.model.SerializeToString(), args.threads, args.batch)
            ir_red = res.report.flops_ratio  # x fewer FLOPs, the IR's count
            ms1, fl1 = totals(squeezed[1])
            run_red = fl0 / max(1, fl1)
            modelled = ir_conv_flops(graph, block) / max(1.0, ir_conv_flops(res.graph, block))
            speed_up = original[0] / squeezed[0]
            summary.append([name, f"flops <= {budget:g}%", f"{ir_red:.2f}x", f"{run_red:.2f}x", f"{modelled:.2f}x",
                            f"{original[0]:.2f}", f"{squeezed[0]:.2f}", f"{speed_up:.2f}x", f"{speed_up / ir_red:.2f}",
                            f"{run_red / ir_red:.2f}", f"{speed_up / run_red:.2f}"])
            sections.append("\n\n".join([
                f"## {name}: flops <= {budget:g}%",
                f"Reached {ir_red:.2f}x fewer FLOPs (the IR's count); the runtime's convolutions compute "
                f"{run_red:.2f}x fewer as it runs them (channels padded to its blocks). Fastest run: "
                f"{original[0]:.2f} ms -> {squeezed[0]:.2f} ms, a {speed_up:.2f}x speed-up ({speed_up / ir_red:.2f} of "
                f"the FLOPs reduction); kernel time summed over nodes {ms0:.2f} -> {ms1:.2f} ms.",
                node_table({"original": original, "squeeze_fold": squeezed})]))
    text = "\n\n".join([
        "# ONNX Runtime per-node profile, before and after squeeze_fold",
        f"Command: `.venv/bin/python benchmarks/ort_profile.py {' '.join(sys.argv[1:])}`, "
        f"{(time.perf_counter() - t_start) / 60:.0f} min. ONNX Runtime CPU, batch {args.batch}, {args.threads} "
        f"thread(s), worker threads sleeping (`session.intra_op.allow_spinning = 0`), profiler on ({RUNS} timed runs "
        f"after {WARMUP} warm-up; per node the median kernel time; ms = the fastest whole run). FLOPs as run are 2 "
        "per multiply-add of the convolutions' shapes as the runtime ran them (channels padded to its blocks); the "
        "IR's count is the compile report's. speed-up / FLOPs red. = (FLOPs as run red. / FLOPs red.) x (speed-up "
        "/ FLOPs as run red.): what padding leaves of the FLOPs reduction, times the runtime's speed per FLOP of "
        "what it computes.",
        markdown_table(["model", "budget", "FLOPs red. (IR)", "FLOPs as run red.", "conv FLOPs as run red., modelled",
                        "original ms", "squeezed ms", "speed-up", "speed-up / FLOPs red.",
                        "FLOPs as run red. / FLOPs red.", "speed-up / FLOPs as run red."], summary),
        "## What padding allows any allocation",
        f"Every allocation of the dense convolutions' channel groups that `bounds {{ {bounds_text(ROUND_TO, ALIGN)} }}` "
        f"allows (align = {align} here), enumerated; channels padded to blocks of {block} as "
        "`compiler.cost_model.padded_channels` pads them (the modelled column above checks that rule against the "
        "shapes the runtime ran); among the allocations whose convolution FLOPs are within 15% under the budget, the "
        "highest convolution FLOPs-as-run reduction / FLOPs reduction: the most of a FLOPs reduction that padding "
        "leaves, so the highest speed-up / FLOPs reduction any allocation there reaches if the runtime's time were "
        "proportional to what it computes. `kept`: every residual branch kept; `removable`: a residual branch may keep "
        "0 channels (removed whole, `branches = remove`). The counts are that allocation's, by each group's first "
        "producer; the bound says nothing of accuracy.",
        markdown_table(["model", "branches", "budget", "best FLOPs as run red. / FLOPs red.", "its conv FLOPs red.",
                        "its channel counts"], bound),
        *sections]) + "\n"
    write_result("ort-profile.md" if args.branches == "keep" else f"ort-profile-branches-{args.branches}.md", text)


if __name__ == "__main__":
    main()
