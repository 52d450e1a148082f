"""Saving and loading compressed models: `save(graph, path, store=...)` writes the compressed model file
atomically; `load(path)` reads it back into a torch module (weights decoded, or linear layers kept
compressed and computing on their HAM/sHAM form)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from netsqueeze.backends.storage import STORES, Store, decode_model, encode_model, stored_matrices
from netsqueeze.compiler.files import check_output_path, write_bytes
from netsqueeze.errors import FileError, NetsqueezeError
from netsqueeze.ir.graph import Graph


def check_store(store: Any) -> Store:
    """`store` if it names a storage format, else a `NetsqueezeError` listing them."""
    if store not in STORES:
        raise NetsqueezeError(f"unknown store {store!r} (use {', '.join(repr(s) for s in STORES)})")
    return store  # type: ignore[no-any-return]


def check_save_path(path: Any, sources: Sequence[tuple[str, str | os.PathLike[str]]] = ()) -> Path:
    """`path` if a compressed model file can be written there: a str or PathLike ending in `.nsq` (another
    suffix names another format: netsqueeze reads `.onnx`, `.pt`, `.py` ... as those), none of the files the
    compile read (`sources`: (role, path) pairs), in an existing, writable directory; else a `FileError`."""
    if not isinstance(path, (str, os.PathLike)):
        raise FileError(f"a compressed model file path is a str or os.PathLike, got {type(path).__name__}")
    if Path(path).suffix.lower() != ".nsq":
        raise FileError(f"'{os.fspath(path)}': a compressed model file ends in .nsq (netsqueeze.load reads it; "
                        "other suffixes name other formats)")
    return check_output_path(path, sources, option="save")


def save(graph: Graph, path: str | os.PathLike[str], store: Store = "ham") -> dict[str, dict[str, float]]:
    """Writes `graph` as a compressed model file (atomically: a failed write leaves the old file) and
    returns per 'node/param' its stored and fp32 bytes."""
    if not isinstance(graph, Graph):
        raise NetsqueezeError(f"netsqueeze.save writes a netsqueeze graph (a compile's result.graph), got "
                              f"{type(graph).__name__}; a compile's result.save(path) writes its model file")
    target = check_save_path(path)
    data, figures = encode_model(graph, check_store(store))
    write_bytes(target, data)
    return figures


def load_graph(path: str | os.PathLike[str]) -> Graph:
    """The graph of a compressed model file, every weight decoded to a dense tensor."""
    return decode_model(_read(path), what=f"'{path}'")[0]


def _read(path: str | os.PathLike[str]) -> bytes:
    if not isinstance(path, (str, os.PathLike)):
        raise FileError(f"a compressed model file path is a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise FileError(f"compressed model file '{p}' does not exist") from None
    except OSError as e:
        raise FileError(f"cannot read '{p}': {e.strerror or e}") from None


def load(path: str | os.PathLike[str], *, compressed: bool = False) -> fx.GraphModule:
    """A compressed model file as a torch module. By default every weight is decoded (outputs bit-identical
    to the model that was saved); with `compressed=True` the linear layers stored as ham/sham stay
    compressed in memory (`CompressedLinear`) and compute on the coded form."""
    from netsqueeze.backends.ham_linear import CompressedLinear
    from netsqueeze.backends.torch import NODE_PATHS, to_torch

    data = _read(path)
    graph, _ = decode_model(data, what=f"'{path}'")
    module = to_torch(graph)
    if not compressed:
        return module
    mats = stored_matrices(data)
    for node in graph.nodes():
        entry = mats.get(f"{node.id}/weight")
        w = node.params.get("weight")
        # the compressed-domain product reads float32 symbol tables; other dtypes stay decoded
        if node.kind != "linear" or entry is None or entry[0] not in ("ham", "sham") or \
                not isinstance(w, torch.Tensor) or w.dtype != torch.float32:
            continue
        store, blob, shape = entry
        layer = CompressedLinear(blob, store, shape[1], shape[0], node.params.get("bias"))  # type: ignore[arg-type]
        parent, _, leaf = module.meta[NODE_PATHS].get(node.id, node.id).rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, layer)
    return module


def attach_store(result: Any, store: Store) -> None:
    """For `compile(store=...)`: encodes the compiled graph, keeps the file's bytes on the result
    (`result.save(path)` writes them) and records the weights' stored bytes, fp32 bytes and ψ (and ψ of
    the linear layers alone) in `result.report.storage`."""
    data, figures = encode_model(result.graph, check_store(store))
    result.stored = data
    linear = {f"{n.id}/weight" for n in result.graph.nodes() if n.kind == "linear"}
    total = sum(f["bytes"] for f in figures.values())
    fp32 = sum(f["fp32_bytes"] for f in figures.values())
    fc = sum(f["bytes"] for k, f in figures.items() if k in linear)
    fc32 = sum(f["fp32_bytes"] for k, f in figures.items() if k in linear)
    result.report.storage = {"file_bytes": float(len(data)), "weight_bytes": total, "fp32_bytes": fp32,
                             "psi": total / max(1.0, fp32), "linear_psi": fc / fc32 if fc32 else 0.0}
