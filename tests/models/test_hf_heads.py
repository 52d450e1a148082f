"""HF attention written as separate q/k/v linears, reshapes to heads, matmuls and softmax: the dependency
analysis couples q, k, v (rows of a head) and the output projection (its columns) into one group per layer
whose channels are whole heads, and trim removes heads with a model that still runs in torch and ORT."""

from __future__ import annotations

import warnings

import numpy as np
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
