"""Torch models are captured with a dynamic batch unless told otherwise: `import_model`/`compile` without
`dynamic_shapes` give every input whose dim 0 is the first input's a `batch` dim, the emitted modules run at
other batch sizes, and a model that fixes its batch (a literal `view(2, ...)`) is captured at the example's batch
with a note saying why. nn.MultiheadAttention stays one `attention` node under the dynamic batch, its heads a
channel group."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import netsqueeze
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.passes.dependency import find_groups
from tests.frontends.onnx_models import run
from tests.zoo import ZOO


def _inputs(g: netsqueeze.Graph) -> list[tuple[str, tuple[str | None, ...] | None]]:
    return [(n.id, n.attrs.get("dims")) for n in g.nodes() if n.kind == "input"]


def test_multihead_attention_collapses_under_the_default_dynamic_batch() -> None:
    model, (tokens,) = ZOO["transformer"]()
    g = netsqueeze.import_model(model, (tokens,))
    assert _inputs(g) == [("tokens", ("batch", None))]
    assert [n.id for n in g.nodes() if n.kind == "attention"] == ["layers.0.attn", "layers.1.attn"]
    assert not [n for n in g.nodes() if n.kind == "opaque"]
    heads = {gr.producers: gr.size for gr in find_groups(g).prunable()}
    assert heads[("layers.0.attn",)] == 4 and heads[("layers.1.attn",)] == 4
    bigger = torch.cat([tokens, tokens.flip(0), tokens[:1]])  # batch 5
    with torch.no_grad():
        want = model(bigger).numpy()
        got = to_torch(g)(bigger).numpy()
    (y,) = run(to_onnx(g), bigger.numpy())
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + table.sum()


def test_only_inputs_sharing_the_first_inputs_batch_get_it() -> None:
    g = netsqueeze.import_model(_TwoInputs().eval(), (torch.randn(2, 4), torch.randn(5, 3)))
    assert _inputs(g) == [("x", ("batch", None)), ("table", None)]
    assert not g.meta.get("notes")


class _FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(2, -1) * 2.0


def test_a_model_that_fixes_its_batch_is_captured_at_the_example_batch_with_a_note() -> None:
    g = netsqueeze.import_model(_FixedBatch(), (torch.randn(2, 3, 4),))
    assert _inputs(g) == [("x", None)]
    (note,) = g.meta["notes"]
    assert note.startswith("the batch (dim 0 of the inputs) is fixed at 2: a dynamic batch does not capture "
                           "(UserError: Constraints violated (batch)!")
    res = netsqueeze.compile(_FixedBatch(), "policy p { }", example_inputs=(torch.randn(2, 3, 4),))
    assert res.report.notes == [note]


def test_batch_of_one_and_an_explicit_empty_spec_stay_static_without_a_note() -> None:
    model, (x,) = ZOO["mlp"]()
    for xs, spec in (((x[:1],), None), ((x,), {})):
        g = netsqueeze.import_model(model, xs, dynamic_shapes=spec)
        assert _inputs(g) == [("x", None)] and not g.meta.get("notes")


def test_an_opaque_expand_to_the_batch_keeps_the_batch_dim() -> None:
    # ViT's cls token is expanded to the batch (an opaque aten::expand): its recorded shape must keep the batch
    # Dim, else the shapes after it say 2 while the attention reshapes keep the Dim, and a graph segment starting
    # after the embeddings (squeeze_fold's layer refit after a removed MLP block) had no feed to read it from
    import warnings

    from netsqueeze.backends.torch import to_torch_segment
    from netsqueeze.ir.dims import is_dynamic
    from tests.models.test_hf_capture import CASES

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, (x,) = CASES["vit"].build()
        g = netsqueeze.import_model(model, (x,))
    expand = g.node("model.embeddings.expand")
    assert expand.kind == "opaque" and is_dynamic(expand.meta[0].shape[0]) and expand.meta[0].shape[1:] == (1, 32)
    assert g.node("model.layers.0.attention.reshape").meta[0].shape[1:] == (17, 4, 8)
    feed = ("model.embeddings.dropout", 0)
    bigger = torch.cat([x, x[:1]])  # batch 3
    with torch.no_grad():
        h = to_torch(g, extra_outputs=[feed, ("model.layers.0.attention.reshape", 0)])(bigger)
        (got,) = to_torch_segment(g, [feed], [("model.layers.0.attention.reshape", 0)])(h[1])
    assert tuple(got.shape) == (3, 17, 4, 8) and torch.allclose(got, h[2])
