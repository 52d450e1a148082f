"""HF attention written as separate q/k/v linears, reshapes to heads, matmuls and softmax: the dependency
analysis couples q, k, v (rows of a head) and the output projection (its columns) into one group per layer
whose channels are whole heads, and trim removes heads with a model that still runs in torch and ORT."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

import netsqueeze
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.passes import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.trim import Trim
from tests.frontends.onnx_models import run
from tests.models.test_hf_capture import CASES

# model → (q, k, v producers of layer 0, the output projection reading the heads)
HEADS = {
    "bert": (("model.encoder.layer.0.attention.self.query", "model.encoder.layer.0.attention.self.key",
              "model.encoder.layer.0.attention.self.value"), "model.encoder.layer.0.attention.output.dense"),
    "distilbert": (("model.transformer.layer.0.attention.q_lin", "model.transformer.layer.0.attention.k_lin",
                    "model.transformer.layer.0.attention.v_lin"), "model.transformer.layer.0.attention.out_lin"),
    "vit": (("model.layers.0.attention.q_proj", "model.layers.0.attention.k_proj",
             "model.layers.0.attention.v_proj"), "model.layers.0.attention.o_proj"),
    # no biases; the per-head relative position bias, masked by the padding mask, is sliced with the heads
    "t5_encoder": (("model.encoder.block.0.layer.0.SelfAttention.q", "model.encoder.block.0.layer.0.SelfAttention.k",
                    "model.encoder.block.0.layer.0.SelfAttention.v"), "model.encoder.block.0.layer.0.SelfAttention.o"),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_are_channel_groups_and_trim_removes_whole_heads(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES[name].build()
        g = netsqueeze.import_model(model, xs)
    qkv, out_proj = HEADS[name]
    group = next(gr for gr in find_groups(g).prunable() if set(gr.producers) == set(qkv))
    assert group.size == 4  # the heads
    consumer = next(m for m in group.members if m.node == out_proj and m.role == "consumer")
    assert [len(p) for p in consumer.index] == [8] * 4  # each head: head_dim = 8 columns of the projection
    Trim(criterion="l1", ratio=0.5).run(g, PassContext())
    g.verify()
    for node in qkv:
        assert g.node(node).params["weight"].shape[0] == 16  # 2 of 4 heads kept, 8 rows each
    assert g.node(out_proj).params["weight"].shape[1] == 16
    with torch.no_grad():
        y = to_torch(g)(*xs).numpy()
        ref = model(*xs).numpy()
    assert y.shape == ref.shape
    assert np.abs(run(to_onnx(g), *[x.numpy() for x in xs])[0] - y).max() <= 1e-5 * max(1.0, float(np.abs(y).max()))


def test_t5_trimmed_heads_equal_the_model_with_those_heads_silenced() -> None:
    """Removing heads is exact: the trimmed graph computes what the HF model computes with the removed heads'
    columns of the output projection (and the removed ReLU channels' columns of `wo`) zeroed, at another batch
    too (the batch stays dynamic)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES["t5_encoder"].build()
        g = netsqueeze.import_model(model, xs)
    Trim(criterion="l1", ratio=0.5).run(g, PassContext())
    g.verify()
    hf = model.model.encoder  # type: ignore[union-attr]
    for i, block in enumerate(hf.block):
        attn = block.layer[0].SelfAttention
        kept = g.node(f"model.encoder.block.{i}.layer.0.SelfAttention.q").params["weight"]
        rows = [next(r for r in range(32) if torch.equal(attn.q.weight[r], k)) for k in kept]
        heads = sorted({r // 8 for r in rows})
        assert len(heads) == 2 and rows == [h * 8 + j for h in heads for j in range(8)]
        mlp = block.layer[1].DenseReluDense  # trim halves its ReLU channels too: silence the removed ones
        kept_wi = g.node(f"model.encoder.block.{i}.layer.1.DenseReluDense.wi").params["weight"]
        channels = {next(r for r in range(64) if torch.equal(mlp.wi.weight[r], k)) for k in kept_wi}
        assert len(channels) == 32
        with torch.no_grad():
            for h in set(range(4)) - set(heads):
                attn.o.weight[:, h * 8:(h + 1) * 8] = 0.0
            for c in set(range(64)) - channels:
                mlp.wo.weight[:, c] = 0.0
    bigger = tuple(torch.cat([x, x[:1]]) for x in xs)
    with torch.no_grad():
        want = model(*bigger).numpy()
        got = to_torch(g)(*bigger).numpy()
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


def _torchscript_onnx(model: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, buf, input_names=["ids"], output_names=["out"], dynamo=False, opset_version=17,
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}, "out": {0: "batch"}})
    model.eval()
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("route", ["netsqueeze", "torchscript"])
def test_heads_of_an_onnx_model_masked_by_where_are_channel_groups(route: str) -> None:
    """BERT as ONNX (netsqueeze's own emission, or torch's TorchScript exporter): its attention scores pass an
    ONNX `Where` (the mask), kept opaque. An elementwise ONNX op passes channels as the torch capture's `where`
    does, so the heads are groups there too (they were frozen: 'passes opaque op ... (Where)'), and trimming them
    gives the model the torch import gives."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES["bert"].build()
        g_torch = netsqueeze.import_model(model, xs)
    g_onnx = netsqueeze.import_model(to_onnx(g_torch) if route == "netsqueeze" else _torchscript_onnx(model, xs), xs)
    assert any(n.kind == "opaque" and n.origin.op_type == "Where" for n in g_onnx.nodes())
    sizes = {name: sorted(gr.size for gr in find_groups(g).prunable()) for name, g in (("torch", g_torch),
                                                                                          ("onnx", g_onnx))}
    assert sizes["onnx"] == sizes["torch"] == [4, 4, 64, 64]  # 2 layers: heads and the MLP's channels
    for g in (g_torch, g_onnx):
        Trim(criterion="l1", ratio=0.5).run(g, PassContext())
        g.verify()
    with torch.no_grad():
        want = to_torch(g_torch)(*xs).numpy()
        got = to_torch(g_onnx)(*xs).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    assert np.abs(run(to_onnx(g_onnx), *[x.numpy() for x in xs])[0] - want).max() <= 1e-5 * max(
        1.0, float(np.abs(want).max()))
