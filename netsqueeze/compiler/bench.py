"""`netsqueeze bench`: models side by side: file size, params, FLOPs, measured latency (median, p90) and, with
labelled data, top-1 and agreement with the first model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netsqueeze.compiler.api import import_model, load_model_file
from netsqueeze.compiler.calibration import check_batch, split_labels
from netsqueeze.compiler.latency import Runtime, measure, runner
from netsqueeze.errors import InputMismatchError, UsageError
from netsqueeze.ir.dims import is_dynamic
from netsqueeze.ir.stats import graph_stats


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        out = []
    if not out or any(b < 1 for b in out):
        raise UsageError(f"--batch expects positive integers separated by commas (1,64), got '{text}'")
    return out


class _Model:
    """One benchmarked model: its graph at batch `b` (imported per batch size) and its file size."""

    def __init__(self, path: str, trust_pickle: bool) -> None:
        self.path = path
        self.is_onnx = path.endswith(".onnx")
        self.obj: Any = path
        self.example: tuple[torch.Tensor, ...] | None = None
        if not self.is_onnx:
            self.obj, self.example = load_model_file(path, trust_pickle=trust_pickle)
        self.graph = import_model(self.obj, self.example)  # a missing or unreadable file: its loader's error
        self.size = Path(path.rsplit(":", 1)[0] if ".py:" in path else path).stat().st_size

    def inputs(self, batch: int, data: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        out = []
        for k, nid in enumerate(self.graph.inputs):
            meta = self.graph.node(nid).meta[0]
            shape = (batch, *[int(d) for d in meta.shape[1:]])
            if data is not None and data[k].shape[0] >= batch and tuple(data[k].shape[1:]) == shape[1:]:
                out.append(data[k][:batch])
            elif meta.dtype.startswith("float"):
                out.append(torch.randn(shape, generator=g))
            else:
                out.append(torch.zeros(shape, dtype=getattr(torch, meta.dtype)))
        return tuple(out)

    def flops_per_sample(self) -> int:
        """FLOPs of one sample: the graph at batch 1 (the model's own fixed batch divided out otherwise)."""
        fixed = [self.graph.node(n).meta[0].shape[0] for n in self.graph.inputs]
        if self.is_onnx and any(not is_dynamic(d) and d != 1 for d in fixed):
            return graph_stats(self.graph).flops // max(1, int(fixed[0]))
        graph = self.graph if self.is_onnx else import_model(self.obj, self.inputs(1, None))
        return graph_stats(graph).flops

    def runnable(self, runtime: Runtime, batch: int, data: Sequence[torch.Tensor] | None) -> Any:
        """What `latency.runner` times: the ONNX file itself, else the graph captured at this batch size."""
        if self.is_onnx and runtime == "ort":
            for nid in self.graph.inputs:
                fixed = self.graph.node(nid).meta[0].shape[0]
                if not is_dynamic(fixed) and fixed != batch:
                    raise InputMismatchError(f"'{self.path}': input '{nid}' has a fixed batch size of {fixed}; "
                                             f"it cannot run at batch {batch} (--batch)")
            return self.path
        if isinstance(self.obj, torch.nn.Module) and runtime == "torch":
            return self.obj.eval()
        xs = self.inputs(batch, data)
        return import_model(self.obj, xs, input_shapes={n: tuple(x.shape) for n, x in zip(self.graph.inputs, xs)}
                            if self.is_onnx else None)


def _predict(model: _Model, runtime: Runtime, xs: Sequence[torch.Tensor], chunk: int = 256) -> torch.Tensor:
    preds = []
    n = xs[0].shape[0]
    for i in range(0, n, chunk):
        part = tuple(x[i:i + chunk] for x in xs)
        target: Any = model.runnable(runtime, part[0].shape[0], part)
        out = runner(target, part, runtime)()
        first = torch.as_tensor(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))
        if first.dim() != 2 or first.shape[0] != part[0].shape[0]:
            raise InputMismatchError(f"--data: '{model.path}' outputs shape {list(first.shape)} for "
                                     f"{part[0].shape[0]} samples, not class scores [N, classes]: top-1 and "
                                     "agreement need them")
        preds.append(first.argmax(-1))
    return torch.cat(preds)


def bench(paths: Sequence[str | os.PathLike[str]], *, data: str | None = None, runtime: Runtime = "ort",
          batches: Sequence[int] = (1,), threads: int = 1, rounds: int = 15,
          trust_pickle: bool = False) -> list[dict[str, Any]]:
    """One row per model: path, bytes, params, flops (of one sample), latency per batch size ({batch: {median_ms, p90_ms}})
    and, with `data` (an .npz of inputs plus `labels`), top1 and agreement (same argmax as the first model)."""
    models = [_Model(os.fspath(p), trust_pickle) for p in paths]
    xs: tuple[torch.Tensor, ...] | None = None
    labels: torch.Tensor | None = None
    if data is not None:
        from netsqueeze.compiler.calibration import calibration_source

        names = models[0].graph.inputs
        loaded, labels = split_labels(data, len(names), names=names)
        batch = next(iter(calibration_source(loaded, batch_size=1 << 30, names=names)()))
        for m in models:
            check_batch(m.graph, batch, f"--data '{data}'")
        xs = tuple(batch)
    rows: list[dict[str, Any]] = []
    for m in models:
        st = graph_stats(m.graph)
        rows.append({"model": m.path, "bytes": m.size, "params": st.params, "flops": m.flops_per_sample(),
                     "latency": {}})
    for b in batches:
        runnables = [m.runnable(runtime, b, xs) for m in models]
        inputs = models[0].inputs(b, xs)
        for row, lat in zip(rows, measure(runnables, inputs, runtime=runtime, threads=threads, rounds=rounds)):
            row["latency"][str(b)] = {"median_ms": lat.median_ms, "p90_ms": lat.p90_ms}
    if xs is not None:
        preds = [_predict(m, runtime, xs) for m in models]
        for row, p in zip(rows, preds):
            if labels is not None:
                if labels.shape[0] != p.shape[0]:
                    raise InputMismatchError(f"--data: {labels.shape[0]} labels for {p.shape[0]} samples")
                row["top1"] = float((p == labels.reshape(-1)).float().mean())
            row["agreement"] = float((p == preds[0]).float().mean())
    return rows


def format_table(rows: Sequence[dict[str, Any]], runtime: str, threads: int) -> str:
    batches = list(rows[0]["latency"]) if rows else []
    head = ["model", "size", "params", "FLOPs/sample", *[f"{runtime} b{b} median / p90 ms" for b in batches]]
    extra = [k for k in ("top1", "agreement") if rows and k in rows[0]]
    head += extra
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"], f"{r['bytes'] / 1e6:.2f} MB", f"{r['params']:,}", f"{r['flops']:,}"]
        cells += [f"{r['latency'][b]['median_ms']:.3f} / {r['latency'][b]['p90_ms']:.3f}" for b in batches]
        cells += [f"{r[k]:.2%}" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{runtime}, {threads} thread(s); models timed side by side in interleaved rounds")
    return "\n".join(lines)
