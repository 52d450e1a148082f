"""Calibration data: accepted forms, batching, and the activation stream passes read through PassContext."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netsqueeze.errors import Diagnostic, InputMismatchError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.passes.base import ActivationStream

Batch = tuple[torch.Tensor, ...]
CalibrationSource = Callable[[], Iterator[Batch]]


def _as_batch(item: Any, where: str) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, np.ndarray):
        return (torch.from_numpy(item),)
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in item):
        return tuple(t if isinstance(t, torch.Tensor) else torch.from_numpy(t) for t in item)
    raise InputMismatchError(
        Diagnostic(f"calibration {where} is a {type(item).__name__}; expected a tensor or a tuple of tensors")
    )


def _load_file(path: Path) -> list[torch.Tensor]:
    if not path.exists():
        raise InputMismatchError(f"calibration file '{path}' does not exist")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return [torch.from_numpy(data[k]) for k in data.files]
    if path.suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in obj):
            return list(obj)
        if isinstance(obj, dict) and all(isinstance(t, torch.Tensor) for t in obj.values()):
            return list(obj.values())
        raise InputMismatchError(f"calibration file '{path}' holds a {type(obj).__name__}, expected tensors")
    if path.suffix == ".npy":
        return [torch.from_numpy(np.load(path))]
    raise InputMismatchError(f"calibration file '{path}': unsupported format '{path.suffix}' (use .npz, .npy or .pt)")


def calibration_source(data: Any, *, batch_size: int = 64, samples: int | None = None) -> CalibrationSource:
    """Turns what the user passed as `calibration=` into a re-iterable source of input batches.

    Accepts an iterable of batches (tensor or tuple of tensors; a DataLoader yielding
    (inputs, labels) pairs should be mapped to inputs first), one tensor of samples (split
    into batches), or a .npz / .npy / .pt file. At most `samples` rows are read.
    """
    if isinstance(data, (str, Path)):
        tensors = _load_file(Path(data))
        data = tensors[0] if len(tensors) == 1 else tuple(tensors)
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor) or (
        isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data)
    ):
        full: Batch = (data,) if isinstance(data, torch.Tensor) else tuple(data)
        n = full[0].shape[0] if samples is None else min(samples, full[0].shape[0])

        def split() -> Iterator[Batch]:
            for i in range(0, n, batch_size):
                yield tuple(t[i : min(n, i + batch_size)] for t in full)

        return split
    if not isinstance(data, Iterable):
        raise InputMismatchError(f"calibration data of type {type(data).__name__} is not iterable")
    source: Iterable[Any] = data

    def iterate() -> Iterator[Batch]:
        seen = 0
        for i, item in enumerate(source):
            batch = _as_batch(item, f"batch {i}")
            if samples is not None and seen + batch[0].shape[0] > samples:
                batch = tuple(t[: samples - seen] for t in batch)
            if batch[0].shape[0] == 0:
                break
            seen += batch[0].shape[0]
            yield batch
            if samples is not None and seen >= samples:
                break

    return iterate


def check_batch(graph: Graph, batch: Batch, where: str) -> None:
    """Raises InputMismatchError unless `batch` fits the graph inputs (rank, non-batch dims, dtype kind)."""
    if len(batch) != len(graph.inputs):
        raise InputMismatchError(f"{where} has {len(batch)} tensors but the model takes {len(graph.inputs)} inputs "
                                 f"({', '.join(graph.inputs)})")
    for t, nid in zip(batch, graph.inputs):
        meta = graph.node(nid).meta[0]
        if tuple(t.shape[1:]) != tuple(meta.shape[1:]):
            raise InputMismatchError(Diagnostic(
                f"{where}: input '{nid}' has shape {list(t.shape)} but the model expects "
                f"[N, {', '.join(str(d) for d in meta.shape[1:])}]", node=nid))
        if t.is_floating_point() != meta.dtype.startswith(("float", "bfloat")):
            raise InputMismatchError(Diagnostic(
                f"{where}: input '{nid}' has dtype {str(t.dtype).removeprefix('torch.')} but the model expects "
                f"{meta.dtype}", node=nid))


def activation_stream(source: CalibrationSource) -> ActivationStream:
    """The PassContext stream: runs the graph (emitted to torch) per batch and yields the tapped values."""

    def stream(graph: Graph, values: Sequence[Value]) -> Iterator[list[torch.Tensor]]:
        from netsqueeze.backends.torch import to_torch

        module = to_torch(graph, extra_outputs=list(values))
        n_out = len(graph.outputs)
        for i, batch in enumerate(source()):
            check_batch(graph, batch, f"calibration batch {i}")
            # no_grad only around the call: a `with` spanning the yield would leave gradients off in the
            # consumer's code (grad mode is thread-global) until the generator is closed
            with torch.no_grad():
                outs = module(*batch)
            yield list(outs[n_out:])

    return stream
