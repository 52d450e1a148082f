"""`netsqueeze bench`: models side by side: file size, params, FLOPs, measured latency (median, p90) and, with
labelled data, top-1 and agreement with the first model."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from netsqueeze.compiler.api import import_model, load_model_file
from netsqueeze.compiler.calibration import LABELS, check_batch, split_labels
from netsqueeze.compiler.files import is_onnx_file, model_source
from netsqueeze.compiler.latency import Runtime, measure, runner
from netsqueeze.errors import InputMismatchError, UsageError
from netsqueeze.ir.dims import is_dynamic
from netsqueeze.ir.stats import graph_stats

MAX_BATCH = 2**31 - 1  # the largest batch --batch takes; the inputs must also fit in memory (`_Model.inputs`)


def parse_batches(text: str) -> list[int]:
    """`--batch`: distinct batch sizes from 1 to `MAX_BATCH`, comma-separated; anything else is a `UsageError`."""
    usage = f"--batch expects positive integers separated by commas (1,64), got '{text}'"
    out: list[int] = []
    for k, item in enumerate(text.split(","), 1):
        if not item.strip():
            raise UsageError(f"--batch '{text}': item {k} is empty; give batch sizes separated by commas (1,64)")
        try:
            b = int(item)
        except ValueError:
            raise UsageError(usage) from None
        if b < 1:
            raise UsageError(usage)
        if b > MAX_BATCH:
            raise UsageError(f"--batch '{text}': batch size {item.strip()} is too large (at most {MAX_BATCH})")
        if b in out:
            raise UsageError(f"--batch '{text}' gives batch size {b} twice")
        out.append(b)
    return out


def _memory_bytes() -> int | None:
    """This machine's physical memory, where the platform says."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


class _Model:
    """One benchmarked model: its graph at batch `b` (imported per batch size) and its file size."""

    def __init__(self, path: str, trust_pickle: bool) -> None:
        self.path = path
        self.is_onnx = is_onnx_file(path)
        self.obj: Any = path
        self.example: tuple[torch.Tensor, ...] | None = None
        if not self.is_onnx:
            self.obj, self.example = load_model_file(path, trust_pickle=trust_pickle)
        self.graph = import_model(self.obj, self.example)  # a missing or unreadable file: its loader's error
        self.size = model_source(path).stat().st_size

    def inputs(self, batch: int, data: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        need = sum(batch * math.prod(int(d) for d in self.graph.node(nid).meta[0].shape[1:])
                   * _itemsize(self.graph.node(nid).meta[0].dtype) for nid in self.graph.inputs)
        memory = _memory_bytes()
        if memory is not None and need > memory:
            raise UsageError(f"--batch {batch}: the inputs of '{self.path}' at batch {batch} take {need / 2**30:,.1f} "
                             f"GiB, more than this machine's {memory / 2**30:,.1f} GiB of memory")
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


def _itemsize(dtype: str) -> int:
    """Bytes per element of an input `_Model.inputs` makes: random float32 for a floating-point input."""
    t = getattr(torch, dtype, torch.float32)
    return 4 if not isinstance(t, torch.dtype) or t.is_floating_point else t.itemsize


def _check_labels(labels: torch.Tensor, data: str) -> torch.Tensor:
    """`labels` as class indices (int64, one per sample), or an InputMismatchError naming the file and the first
    value that is not one: a fraction, a negative number, NaN."""
    where = f"--data file '{data}': array '{LABELS}'"
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1:
        raise InputMismatchError(f"{where} has shape {list(labels.shape)}: top-1 needs one class index per sample, "
                                 f"shape [{labels.shape[0]}]")
    if labels.is_complex():
        raise InputMismatchError(f"{where} holds complex numbers, not class indices")
    values = labels.to(torch.float64) if labels.is_floating_point() else labels.to(torch.int64)
    bad = ~torch.isfinite(values) | (values != values.round()) if labels.is_floating_point() \
        else torch.zeros_like(values, dtype=torch.bool)
    bad |= values < 0
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        v = values[row].item()
        raise InputMismatchError(f"{where} holds {v:g} at row {row}, which is not a class index (a whole number "
                                 "from 0)")
    return values.to(torch.int64)


def _predict(model: _Model, runtime: Runtime, xs: Sequence[torch.Tensor],
             chunk: int = 256) -> tuple[torch.Tensor, int]:
    """The class each sample is given (argmax of the first output) and the number of classes."""
    preds = []
    classes = 0
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
        classes = int(first.shape[1])
    return torch.cat(preds), classes


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
        loaded, labels = split_labels(data, len(names), names=names, kind="--data file")
        batch = next(iter(calibration_source(loaded, batch_size=1 << 30, names=names, kind="--data file")()))
        if labels is not None:
            labels = _check_labels(labels, data)
        for m in models:
            check_batch(m.graph, batch, f"--data '{data}'")
        xs = tuple(batch)
    rows: list[dict[str, Any]] = []
    for m in models:
        st = graph_stats(m.graph)
        rows.append({"model": m.path, "bytes": m.size, "params": st.params, "flops": m.flops_per_sample(),
                     "latency": {}})
    if xs is not None:  # before the timing: a label no model can give is an error, not a top-1 of 0%
        preds = [_predict(m, runtime, xs) for m in models]
        for row, m, (p, classes) in zip(rows, models, preds):
            if labels is not None:
                if labels.shape[0] != p.shape[0]:
                    raise InputMismatchError(f"--data: {labels.shape[0]} labels for {p.shape[0]} samples")
                if int(labels.max()) >= classes:
                    row_at = int((labels >= classes).nonzero()[0, 0])
                    raise InputMismatchError(
                        f"--data file '{data}': array '{LABELS}' holds {int(labels[row_at])} at row {row_at}, but "
                        f"'{m.path}' outputs {classes} class scores (class indices 0 to {classes - 1})")
                row["top1"] = float((p == labels).float().mean())
            row["agreement"] = float((p == preds[0][0]).float().mean())
    for b in batches:
        runnables = [m.runnable(runtime, b, xs) for m in models]
        inputs = models[0].inputs(b, xs)
        for row, lat in zip(rows, measure(runnables, inputs, runtime=runtime, threads=threads, rounds=rounds)):
            row["latency"][str(b)] = {"median_ms": lat.median_ms, "p90_ms": lat.p90_ms}
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
