"""Calibration data: accepted forms, batching, and the activation stream passes read through PassContext."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netsqueeze.compiler.boundary import call_user, check_dense, check_finite, iterate_user
from netsqueeze.errors import Diagnostic, InputMismatchError, NetsqueezeError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.passes.base import ActivationStream, Segment

Batch = tuple[torch.Tensor, ...]
CalibrationSource = Callable[[], Iterator[Batch]]


def _as_batch(item: Any, where: str) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, np.ndarray):
        return (_from_numpy(item, f"calibration {where}"),)
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in item):
        return tuple(t if isinstance(t, torch.Tensor) else _from_numpy(t, f"calibration {where}") for t in item)
    raise InputMismatchError(
        Diagnostic(f"calibration {where} is a {type(item).__name__}; expected a tensor or a tuple of tensors")
    )


def _from_numpy(array: Any, where: str) -> torch.Tensor:
    if not isinstance(array, np.ndarray):
        raise InputMismatchError(f"{where} holds a {type(array).__name__}, expected an array")
    try:
        return torch.from_numpy(array if array.flags.c_contiguous else np.array(array, order="C"))
    except TypeError:
        raise InputMismatchError(f"{where} holds an array of dtype {array.dtype}, expected numbers") from None


def _read_error(path: Path, e: Exception, kind: str = "calibration file") -> InputMismatchError:
    text = str(e).strip()
    if "allow_pickle" in text:
        reason = "it is not a plain NumPy array file (object arrays and pickles are not loaded)"
    elif "Weights only load failed" in text and "Unsupported global" in text:
        reason = "it holds pickled Python objects, which netsqueeze does not load for calibration"
    elif "Weights only load failed" in text:  # not a pickle at all: torch's unpickler met a byte it cannot read
        detail = next((line.strip() for line in text.splitlines()[1:] if line.strip().startswith("Unsupported")), "")
        reason = "it is not a file torch.save wrote" + (f" ({detail})" if detail else "")
    else:
        # an exception type named `error` (struct.error, zipfile's) would read as a second "error:"
        cls = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"
        reason = f"{cls}: {text.splitlines()[0]}" if text else cls
    return InputMismatchError(f"cannot read {kind} '{path}': {reason}")


LABELS = "labels"  # the .npz array that holds a labelled calibration file's labels
_UNNAMED = re.compile(r"arr_\d+")  # the names np.savez(path, a, b) gives arrays passed by position


def _by_name(named: dict[str, torch.Tensor], names: Sequence[str], what: str) -> list[torch.Tensor]:
    """A file's arrays in the model's input order (`names`) when they are named after its inputs, in any order;
    in the file's order when none is named (np.savez's positional arr_0, arr_1, ...). For a model of several
    inputs, an array named after none of them is an error listing the inputs (misspelt names were fed by position:
    one input's data to another), and so is a file naming only some; `labels` (`LABELS`), unless an input's name,
    is left out (a labelled file's labels: `split_labels` takes them). A model of one input takes the file's arrays
    as they are, whatever their names: one array cannot go to the wrong input, and several are too many for it
    (`check_batch` says so)."""
    keys = list(named)
    if len(names) < 2:  # the model's input names unknown, or one input
        return list(named.values())
    given = [k for k in keys if not (k == LABELS and k not in names)] or keys
    if all(_UNNAMED.fullmatch(k) for k in given):  # np.savez(path, a, b): the inputs' order
        return [named[k] for k in given]
    inputs = ", ".join(repr(n) for n in names)
    foreign = [k for k in given if k not in names]
    if foreign and not set(given) & set(names):
        close = [f"'{m[0]}' for '{k}'" for k in foreign if (m := get_close_matches(k, names, n=1, cutoff=0.6))]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        plural = len(given) != 1
        raise InputMismatchError(
            f"{what} names its array{'s' * plural} {', '.join(repr(k) for k in given)}, but the model's inputs are "
            f"{inputs}{hint}: name every array after an input (in any order), or none (np.savez(path, a, b): in the "
            f"inputs' order); an array named '{LABELS}' holds labels")
    if set(given) != set(names):
        raise InputMismatchError(
            f"{what} names its arrays {', '.join(repr(k) for k in keys)}, the model's inputs are "
            f"{inputs}: name every array after an input (in any order), or none "
            "(np.savez(path, a, b): in the inputs' order)")
    return [named[n] for n in names]


def _load_file(path: Path, names: Sequence[str] = (),
               kind: str = "calibration file") -> list[torch.Tensor]:
    """The tensors of a data file, named in messages as `kind` (bench's `--data file`)."""
    if not path.exists():
        raise InputMismatchError(f"{kind} '{path}' does not exist")
    if path.is_dir():
        raise InputMismatchError(f"{kind} '{path}' is a directory")
    if path.suffix not in (".npz", ".npy", ".pt", ".pth"):
        raise InputMismatchError(
            f"{kind} '{path}': unsupported format '{path.suffix}' (use .npz, .npy or .pt)")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if not data.files:
                    raise InputMismatchError(f"{kind} '{path}' holds no arrays")
                return _by_name({k: _from_numpy(data[k], f"{kind} '{path}' (array '{k}')")
                                 for k in data.files}, names, f"{kind} '{path}'")
        if path.suffix == ".npy":
            return [_from_numpy(np.load(path, allow_pickle=False), f"{kind} '{path}'")]
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except InputMismatchError:
        raise
    except Exception as e:
        raise _read_error(path, e, kind) from None
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return list(obj)
    if isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
        return _by_name({str(k): t for k, t in obj.items()}, names, f"{kind} '{path}'")
    raise InputMismatchError(f"{kind} '{path}' holds a {type(obj).__name__}, expected tensors")


def calibration_source(data: Any, *, batch_size: int = 64, samples: int | None = None,
                       names: Sequence[str] = (), kind: str = "calibration file") -> CalibrationSource:
    """Turns what the user passed as `calibration=` into a re-iterable source of input batches.

    Accepts an iterable of batches (tensor or tuple of tensors; a DataLoader yielding
    (inputs, labels) pairs should be mapped to inputs first), one tensor of samples (split
    into batches), or a .npz / .npy / .pt file. At most `samples` rows are read. A file's arrays named after
    the model's inputs (`names`) are fed to those inputs, whatever their order in the file (`_by_name`). Messages
    name a file as `kind`.
    """
    what = "calibration data"
    if isinstance(data, (str, os.PathLike)):
        what = f"{kind} '{data}'"
        tensors = _load_file(Path(data), names, kind)
        data = tensors[0] if len(tensors) == 1 else tuple(tensors)
    if isinstance(data, np.ndarray):
        data = _from_numpy(data, what)
    if isinstance(data, torch.Tensor) or (
        isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data)
    ):
        full: Batch = (data,) if isinstance(data, torch.Tensor) else tuple(data)
        for k, t in enumerate(full):
            name = what if len(full) == 1 else f"{what} (tensor {k})"
            check_dense(t, name)
            if t.dim() == 0:
                raise InputMismatchError(f"{name} is a 0-d tensor (a single number); expected samples [N, ...]")
        if len({t.shape[0] for t in full}) > 1:
            raise InputMismatchError(f"{what}: its tensors have different sample counts "
                                     f"({', '.join(str(t.shape[0]) for t in full)})")
        n = full[0].shape[0] if samples is None else min(samples, full[0].shape[0])

        def split() -> Iterator[Batch]:
            for i in range(0, n, batch_size):
                yield tuple(t[i : min(n, i + batch_size)] for t in full)

        return split
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, dict)):
        raise InputMismatchError(f"calibration data of type {type(data).__name__} is not a tensor, a file "
                                 "or an iterable of batches")
    source: Iterable[Any] = data
    most = 0  # the most batches any pass read
    first: int | None = None  # the batches of the first pass that ran to the end

    def iterate() -> Iterator[Batch]:
        nonlocal most, first
        seen = 0
        count = 0
        items = iterate_user("the calibration iterator", call_user("iter(calibration data)", iter, source))
        for i, item in enumerate(items):
            count = i + 1
            most = max(most, count)
            batch = _as_batch(item, f"batch {i}")
            if any(t.dim() == 0 for t in batch):
                raise InputMismatchError(f"calibration batch {i} holds a 0-d tensor (a single number); "
                                         "expected a batch [N, ...]")
            if samples is not None and seen + batch[0].shape[0] > samples:
                batch = tuple(t[: samples - seen] for t in batch)
            if batch[0].shape[0] == 0:
                break
            seen += batch[0].shape[0]
            yield batch
            if samples is not None and seen >= samples:
                break
        else:  # the data ran out: every pass must see the same batches
            if count < most or (first is not None and count != first):
                was = max(most, first or 0)
                raise InputMismatchError(
                    f"the calibration iterable gave {was} batch{'es' * (was != 1)} on one pass and {count} on a "
                    "later one: the compile reads the data several times; give a list, a tensor or a file")
            first = count if first is None else first

    if isinstance(data, Iterator):
        # a one-shot iterator (a generator): read once and kept, since the compile passes over the data several times
        kept = list(iterate())
        return lambda: iter(kept)
    return iterate



class _Part:
    """A re-iterable view of a labelled iterable of batches: each batch's inputs (all tensors but the last)
    or its labels (the last), iterating the user's data afresh each time."""

    def __init__(self, data: Iterable[Any], n_inputs: int, labels: bool) -> None:
        self.data, self.n_inputs, self.labels = data, n_inputs, labels

    def __iter__(self) -> Iterator[Any]:
        items = iterate_user("the calibration iterator", call_user("iter(calibration data)", iter, self.data))
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != self.n_inputs + 1:
                got = f"{len(item)} items" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
                raise InputMismatchError(
                    f"labelled calibration batch {i} is {got}; expected the model's {self.n_inputs} input(s) "
                    "followed by the labels")
            if self.labels:
                yield item[-1]
            else:
                yield item[0] if self.n_inputs == 1 else tuple(item[:-1])


def split_labels(data: Any, n_inputs: int, labelled: bool = False, names: Sequence[str] = (),
                 kind: str = "calibration file") -> tuple[Any, Any]:
    """(inputs, labels) of labelled calibration data: an .npz holding the model's input arrays plus one
    array named `labels` (one row per sample), or, with `labelled`, an iterable of batches `(inputs...,
    labels)` (a DataLoader of (x, y) pairs, a list of tuples). Anything else comes back as it was, with no
    labels. Messages name a file as `kind`."""
    if labelled and not isinstance(data, (str, os.PathLike)):
        if not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, np.ndarray, bytes, dict)):
            raise InputMismatchError(f"labelled calibration data must be an iterable of (inputs..., labels) "
                                     f"batches or a labelled .npz, got a {type(data).__name__}")
        return _Part(data, n_inputs, False), _Part(data, n_inputs, True)
    if not isinstance(data, (str, os.PathLike)) or not str(data).endswith(".npz"):
        return data, None
    path = Path(data)
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.files)
            if LABELS not in keys or len(keys) != n_inputs + 1:
                return data, None
            arrays = {k: _from_numpy(f[k], f"{kind} '{path}' (array '{k}')") for k in keys}
    except InputMismatchError:
        raise
    except Exception:
        return data, None  # calibration_source reads it again and says what is wrong
    labels: torch.Tensor = arrays.pop(LABELS)
    inputs = tuple(_by_name(arrays, names, f"{kind} '{path}'"))
    if labels.dim() == 0 or labels.shape[0] != inputs[0].shape[0]:
        rows = "a 0-d array" if labels.dim() == 0 else f"{labels.shape[0]} rows"
        raise InputMismatchError(f"{kind} '{path}': array '{LABELS}' has {rows} but the inputs have "
                                 f"{inputs[0].shape[0]} samples")
    return (inputs[0] if len(inputs) == 1 else inputs), labels


def check_batch(graph: Graph, batch: Batch, where: str) -> None:
    """Raises InputMismatchError unless `batch` fits the graph inputs (rank, non-batch dims, dtype kind)."""
    if len(batch) != len(graph.inputs):
        raise InputMismatchError(f"{where} has {len(batch)} tensors but the model takes {len(graph.inputs)} inputs "
                                 f"({', '.join(graph.inputs)})")
    # inputs whose first dims are one dynamic dim (the batch) take batches of one size
    firsts = [(graph.node(nid).attrs.get("dims") or (None,))[0] for nid in graph.inputs]
    sizes = [int(t.shape[0]) for t in batch if t.dim()]
    if len(graph.inputs) > 1 and firsts[0] and len(set(firsts)) == 1 and len(set(sizes)) > 1:
        raise InputMismatchError(f"{where}: the inputs have {', '.join(map(str, sizes))} samples "
                                 f"({', '.join(graph.inputs)}), but the model's inputs share their first dim "
                                 f"'{firsts[0]}'")
    for t, nid in zip(batch, graph.inputs):
        meta = graph.node(nid).meta[0]
        check_dense(t, f"{where}: input '{nid}'")
        if t.dim() == 0:
            raise InputMismatchError(Diagnostic(
                f"{where}: input '{nid}' is a 0-d tensor (a single number); expected a batch "
                f"[N, {', '.join(str(d) for d in meta.shape[1:])}]", node=nid))
        if tuple(t.shape[1:]) != tuple(meta.shape[1:]):
            dims = (graph.node(nid).attrs.get("dims") or ())[1:]
            named = [f"{name} = {int(d)}" if name else str(int(d)) for d, name in
                     itertools.zip_longest(meta.shape[1:], dims)]
            dynamic = [name for name in dims if name]
            raise InputMismatchError(Diagnostic(
                f"{where}: input '{nid}' has shape {list(t.shape)} but the model expects [N, {', '.join(named)}]"
                + (f" ({', '.join(repr(n) for n in dynamic)} {'is a dynamic dim' if len(dynamic) == 1 else 'are dynamic'}"
                   ", but calibration batches take the example inputs' sizes there)" if dynamic else ""), node=nid))
        if t.is_floating_point() != meta.dtype.startswith(("float", "bfloat")):
            raise InputMismatchError(Diagnostic(
                f"{where}: input '{nid}' has dtype {str(t.dtype).removeprefix('torch.')} but the model expects "
                f"{meta.dtype}", node=nid))
        have = str(t.dtype).removeprefix("torch.")
        if t.is_floating_point() and have != meta.dtype:
            raise InputMismatchError(Diagnostic(
                f"{where}: input '{nid}' has dtype {have} but the model expects {meta.dtype}", node=nid,
                notes=(f"convert the data first, e.g. tensor.to(torch.{meta.dtype}) or "
                       f"array.astype(numpy.{meta.dtype})",)))
        check_finite(t, f"{where}: input '{nid}'")


class PassCount:
    """How much of the calibration data a compile ran models over, in full passes of the model: a whole
    model over one batch counts 1 / batches, a part of it (`PassContext.segment`) its share of the model's
    FLOPs. The report's `calibration_passes`; forward passes only (a backward counts as nothing extra)."""

    def __init__(self, source: CalibrationSource | None) -> None:
        self.source = source
        self.units = 0.0  # batch-sized runs of the whole model
        self._batches: int | None = None

    def add(self, units: float) -> None:
        self.units += units

    @property
    def batches(self) -> int:
        """The calibration batches (0 without a source), counted once."""
        if self.source is None:
            return 0
        if self._batches is None:
            self._batches = max(1, sum(1 for _ in self.source()))
        return self._batches

    @property
    def passes(self) -> float:
        # units add up per batch in floats: rounded so that whole passes read whole (3.0, not 3.000000000000001)
        return round(self.units / self.batches, 9) if self.source is not None else 0.0


def check_static_batch(graph: Graph, batch: Batch, where: str) -> None:
    """An input whose batch dim is static (no dynamic dim on axis 0: an ONNX file exported without dynamic axes, a
    torch capture from an example batch of 1) while `batch` has another number of rows: the model may run all the same (nothing in it
    reads the batch size), so it is tried on `batch`, and an InputMismatchError naming the input and its declared
    size says so when it does not, where a pass would fail on it later."""
    static = [(nid, int(meta.shape[0]), int(t.shape[0])) for t, nid in zip(batch, graph.inputs)
              if (meta := graph.node(nid).meta[0]).shape and t.dim() > 0 and int(t.shape[0]) != int(meta.shape[0])
              and not (graph.node(nid).attrs.get("dims") or (None,))[0]]
    if not static:
        return
    from netsqueeze.backends.torch import to_torch

    try:  # torch.fx prints the generated code's traceback to stderr before raising: the error below says it all
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            to_torch(graph)(*batch)
    except NetsqueezeError:
        raise  # the model cannot run in torch at all (an ONNX op without a torch equivalent): that error says so
    except Exception as e:  # whatever the model raises at that size, the cause is the batch
        nid, size, rows = static[0]
        reason = (str(e).strip().splitlines() or [""])[0]
        dynamic = ("give an example batch of 2 or more (the capture fixes a batch dim whose example is 1)"
                   if graph.node(nid).origin.frontend == "fx" else
                   "give the model a dynamic batch dim (ONNX: a dim_param on axis 0 of the input, e.g. "
                   "torch.onnx.export(..., dynamic_axes={'x': {0: 'batch'}}))")
        raise InputMismatchError(Diagnostic(
            f"{where}: input '{nid}' has {rows} rows, but the model's batch dim is static at {size} and it does not "
            f"run at {rows} ({type(e).__name__}: {reason})", node=nid,
            notes=(f"calibrate with batches of {size} (policy `calibrate batch {size}`), or {dynamic}",))) from None


def activation_stream(source: CalibrationSource, count: PassCount | None = None) -> ActivationStream:
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
            if count is not None:
                count.add(1.0)
            yield list(outs[n_out:])

    return stream


def segment_runner(count: PassCount | None = None) -> Callable[[Graph, Sequence[Value], Sequence[Value]], Segment]:
    """The PassContext segment: `graph`'s nodes from `feeds` to `fetch` emitted to torch; every call counts
    its share of the whole model's FLOPs (one batch) in `count`."""

    def make(graph: Graph, feeds: Sequence[Value], fetch: Sequence[Value]) -> Segment:
        from netsqueeze.backends.torch import to_torch_segment
        from netsqueeze.ir.ops import node_flops

        module = to_torch_segment(graph, feeds, fetch)
        total = sum(node_flops(graph, n) for n in graph.nodes())
        ran = module.meta["segment_nodes"]
        part = sum(node_flops(graph, graph.node(nid)) for nid in ran)
        share = part / total if total else 0.0

        def run(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            out = module(*tensors)
            if count is not None:
                count.add(share)
            return list(out)

        return run

    return make
