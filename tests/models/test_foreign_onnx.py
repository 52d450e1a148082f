"""ONNX models exported by frameworks other than PyTorch (see tests/data/foreign/README.md for where each came
from): PaddlePaddle's paddle2onnx (PP-OCRv2's direction classifier) and Caffe2's onnx-caffe2 (SqueezeNet and
DenseNet-121 from the onnx wheel). Each imports, is emitted as ONNX and as torch, and matches ONNX Runtime on the
original within 1e-4 relative at two input sizes (batch and spatial size); `trim` 30% gives a model that verifies,
keeps the output shape at both sizes and has fewer parameters, its torch and ONNX forms agreeing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir import graph_stats
from netsqueeze.passes import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.trim import Trim
from tests.frontends.onnx_models import light_path, randomized, run

FOREIGN = Path(__file__).resolve().parent.parent / "data" / "foreign"


def _relaxed(m: onnx.ModelProto, names: list[str | None]) -> onnx.ModelProto:
    """The model with its image input's dims named in `names` declared dynamic (and the output's batch): the
    files fix them although their graphs run at any size."""
    inits = {t.name for t in m.graph.initializer}
    x = next(i for i in m.graph.input if i.name not in inits)
    for d, name in zip(x.type.tensor_type.shape.dim, names):
        if name:
            d.Clear()
            d.dim_param = name
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[0].Clear()
        o.type.tensor_type.shape.dim[0].dim_param = "N"
    return m


# name → (loader, exporter recorded in the file, dims made dynamic, two input shapes, slow)
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str, list[str | None], list[tuple[int, ...]], bool]] = {
    "pp_ocr_v2_cls": (lambda: onnx.load(str(FOREIGN / "pp_ocr_v2_cls.onnx")), "PaddlePaddle",
                      ["N", None, None, "W"], [(2, 3, 32, 192), (3, 3, 32, 256)], False),
    "squeezenet": (lambda: randomized(light_path("squeezenet")), "onnx-caffe2", ["N", None, "H", "W"],
                   [(1, 3, 64, 64), (2, 3, 96, 80)], False),
    "densenet121": (lambda: randomized(light_path("densenet121")), "onnx-caffe2", ["N", None, "H", "W"],
                    [(1, 3, 64, 64), (2, 3, 96, 80)], True),
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if c[4] else []) for n, c in CASES.items()])
def test_foreign_onnx_round_trips_at_two_sizes_and_trims(name: str) -> None:
    load, producer, names, sizes, _ = CASES[name]
    m = load()
    assert m.producer_name == producer
    m = _relaxed(m, names)
    graph = from_onnx(m, example_shapes=[sizes[0]])
    (x_node,) = [n for n in graph.nodes() if n.kind == "input"]
    assert x_node.attrs["dims"] == tuple(names)
    emitted, module = to_onnx(graph), to_torch(graph)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    for x in xs:
        (want,) = run(m, x)
        (y,) = run(emitted, x)
        with torch.no_grad():
            yt = module(torch.from_numpy(x)).numpy()
        assert y.shape == yt.shape == want.shape
        assert _rel(y, want) <= 1e-4 and _rel(yt, want) <= 1e-4, (name, x.shape, _rel(y, want), _rel(yt, want))

    assert find_groups(graph).prunable(), f"{name}: no prunable channel group"
    trimmed = graph.copy()
    assert Trim(criterion="l1", ratio=0.3).run(trimmed, PassContext()).changed
    trimmed.verify()
    assert graph_stats(trimmed).params < 0.8 * graph_stats(graph).params
    emitted, module = to_onnx(trimmed), to_torch(trimmed)
    for x in xs:
        (want,) = run(m, x)
        (y,) = run(emitted, x)
        with torch.no_grad():
            yt = module(torch.from_numpy(x)).numpy()
        assert y.shape == want.shape
        assert _rel(yt, y) <= 1e-4
