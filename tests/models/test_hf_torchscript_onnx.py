"""HF models exported by torch's TorchScript ONNX exporter (`torch.onnx.export(..., dynamo=False)`) with dynamic
axes (batch, and the sequence of text and audio models), imported by netsqueeze and emitted again as ONNX and as
torch: each runs at the export's sizes, at batch + 1 and (text, audio) at a longer sequence, matching ONNX
Runtime on the exported file within 1e-4 relative. The exports build masks, position ids and class tokens with
Shape → Gather → Concat chains, Range, Expand, Where(Equal(shape, -1)) and Slice to the sequence length; the
importer keeps those sizes symbolic, so no batch or sequence length of the example is baked in."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from tests.frontends.onnx_models import run
from tests.models.test_hf_capture import CASES

# model → the dynamic axes of its inputs (text and audio: batch and sequence; ViT: batch, its size is fixed)
AXES = {"bert": {0: "batch", 1: "seq"}, "distilbert": {0: "batch", 1: "seq"}, "gpt2": {0: "batch", 1: "seq"},
        "t5_encoder": {0: "batch", 1: "seq"}, "vit": {0: "batch"}, "wav2vec2": {0: "batch", 1: "seq"},
        "regnet": {0: "batch"}, "efficientnet": {0: "batch"}}
SLOW = {"t5_encoder", "efficientnet"}


def _export(model: torch.nn.Module, xs: tuple[torch.Tensor, ...], axes: dict[int, str]) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(xs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, buf, input_names=names, output_names=["out"], dynamo=False, opset_version=17,
                          dynamic_axes={**{n: axes for n in names}, "out": {0: "batch"}})
    model.eval()  # the exporter may leave it in training mode
    return onnx.load_from_string(buf.getvalue())


def _sizes(xs: tuple[torch.Tensor, ...], axes: dict[int, str]) -> list[tuple[torch.Tensor, ...]]:
    """The example, batch + 1 (the first row again), and batch + 1 with the sequence 1.5x (its first half again)."""
    bigger = tuple(torch.cat([x, x[:1]]) for x in xs)
    out = [xs, bigger]
    if 1 in axes:
        out.append(tuple(torch.cat([x, x[:, :x.shape[1] // 2]], 1) for x in bigger))
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in AXES])
def test_torchscript_export_round_trips_at_other_batch_and_sequence_sizes(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES[name].build()
    m = _export(model, xs, AXES[name])
    graph = from_onnx(m, example_shapes=[tuple(x.shape) for x in xs])
    inputs = [n for n in graph.nodes() if n.kind == "input"]
    assert [n.attrs["dims"] for n in inputs] == [tuple(AXES[name].get(i) for i in range(x.dim())) for x in xs]
    emitted, module = to_onnx(graph), to_torch(graph)
    for batch in _sizes(xs, AXES[name]):
        (want,) = run(m, *[x.numpy() for x in batch])
        (y,) = run(emitted, *[x.numpy() for x in batch])
        with torch.no_grad():
            yt = module(*batch).numpy()
        scale = float(np.abs(want).max())
        shapes = [tuple(x.shape) for x in batch]
        assert y.shape == yt.shape == want.shape, shapes
        assert float(np.abs(y - want).max()) <= 1e-4 * scale, (shapes, "ONNX")
        assert float(np.abs(yt - want).max()) <= 1e-4 * scale, (shapes, "torch")
