"""HF `transformers` models built from tiny configs with random weights (no network): each one is captured
with torch.export (`netsqueeze.import_model`) and emitted back to torch, and the emitted module must match
the model within 1e-4 relative. A model netsqueeze cannot capture is a strict xfail naming the reason.

The table printed at the end of the run (imports / identity error / opaque ops, conftest.py) is the
per-model record.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import netsqueeze
from netsqueeze.backends.torch import to_torch

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 8, 100
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


class MainOutput(nn.Module):
    """Calls an HF model with named inputs and returns its main tensor (`return_dict=False`, item 0)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model.eval()
        self.names = names

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, xs)), return_dict=False)[0]


def _text(model: nn.Module) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 2:] = 0  # the second sequence is padded: the mask matters
    return MainOutput(model, ("input_ids", "attention_mask")), (ids, mask)


def _image(model: nn.Module, size: int = 32) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return MainOutput(model, ("pixel_values",)), (torch.randn(2, 3, size, size),)


def bert() -> Any:
    return _text(transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=64,
                                                                **TEXT)))


def distilbert() -> Any:
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64)
    return _text(transformers.DistilBertModel(cfg))


def roberta() -> Any:
    return _text(transformers.RobertaModel(transformers.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=64,
                                                                      **TEXT)))


def gpt2() -> Any:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return _text(transformers.GPT2Model(cfg))


def t5_encoder() -> Any:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return _text(transformers.T5EncoderModel(cfg))


def vit() -> Any:
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, **TEXT)
    return _image(transformers.ViTModel(cfg, add_pooling_layer=False))


def resnet() -> Any:
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return _image(transformers.ResNetModel(cfg))


def convnext() -> Any:
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    return _image(transformers.ConvNextModel(cfg))


def mobilenet_v2() -> Any:
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25)
    return _image(transformers.MobileNetV2Model(cfg))


def efficientnet() -> Any:
    cfg = transformers.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                          hidden_dim=320, num_hidden_layers=4)  # 1280 x width
    return _image(transformers.EfficientNetModel(cfg))


def regnet() -> Any:
    cfg = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)
    return _image(transformers.RegNetModel(cfg))


def swin() -> Any:
    # 2 blocks a stage, as every real Swin has: the second shifts its windows (torch.roll)
    cfg = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                  window_size=4)
    return _image(transformers.SwinModel(cfg))


def segformer() -> Any:
    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                       num_attention_heads=[1, 2], decoder_hidden_size=32, strides=[4, 2],
                                       patch_sizes=[7, 3], mlp_ratios=[2, 2])
    return _image(transformers.SegformerModel(cfg))


def wav2vec2() -> Any:
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      feat_extract_norm="group", do_stable_layer_norm=False)
    x = torch.randn(2, 400)
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 300:] = 0
    return MainOutput(transformers.Wav2Vec2Model(cfg), ("input_values", "attention_mask")), (x, mask)


@dataclass(frozen=True)
class Case:
    build: Callable[[], Any]
    slow: bool = False
    opaque: frozenset[str] = frozenset()  # the aten ops allowed to stay opaque (no canonical IR op)
    xfail: str | None = None  # the exact reason netsqueeze cannot capture it (strict)


# a padding mask: its int → bool cast and the -inf fill of masked scores in each layer's SDPA; with the batch
# dynamic (the default) the mask is built at run time from the sizes: arange, index, and, expand
MASK = frozenset({"to.device", "where.ScalarOther", "arange.default", "index.Tensor", "__and__.Tensor",
                  "expand.default"})


CASES: dict[str, Case] = {
    "bert": Case(bert, opaque=MASK),
    "distilbert": Case(distilbert, opaque=MASK),
    # position ids from the input ids: cumsum of (ids != pad) cast to int, gathered token types
    "roberta": Case(roberta, opaque=MASK | {"cumsum.default", "gather.default", "ne.Scalar", "to.dtype",
                                            "type_as.default"}),
    "gpt2": Case(gpt2, opaque=MASK),
    # RMSNorm's rsqrt; the masked position bias as bias·where(mask, 1, 0) + where(mask, 0, min)
    "t5_encoder": Case(t5_encoder, opaque=MASK | {"rsqrt.default", "where.Scalar"}),
    "vit": Case(vit, opaque=frozenset({"expand.default", "where.ScalarOther"})),  # the class token per batch row
    "resnet": Case(resnet),
    "convnext": Case(convnext),
    "mobilenet_v2": Case(mobilenet_v2, slow=True),
    "efficientnet": Case(efficientnet, slow=True),
    "regnet": Case(regnet),
    # the shifted windows: torch.roll, and the attention mask of the shifted blocks expanded per batch row
    "swin": Case(swin, opaque=frozenset({"roll.default", "expand.default"})),
    "segformer": Case(segformer),
    # the feature-vector mask from the input mask: lengths (cumsum, flip, integer div), index_put, repeat
    "wav2vec2": Case(wav2vec2, opaque=frozenset({"where.ScalarOther", "bitwise_not.default", "cumsum.default",
                                                 "div.Tensor_mode", "flip.default", "index_put.default",
                                                 "repeat.default", "to.dtype"}) | MASK | {"zeros.default"}),
}

def _params() -> list[Any]:
    out = []
    for name, case in CASES.items():
        marks = []
        if case.slow:
            marks.append(pytest.mark.slow)
        if case.xfail:
            marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_hf_model_imports_and_emits_torch_identity(name: str, model_table: dict[str, tuple[str, str, str]]) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = CASES[name].build()
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    model_table[name] = ("no", "-", "-")
    graph = netsqueeze.import_model(model, inputs)
    opaque = [n.origin.op_type for n in graph.nodes() if n.kind == "opaque"]
    names = ", ".join(f"{op.removeprefix('aten::')}×{opaque.count(op)}" for op in sorted(set(opaque)))
    model_table[name] = ("yes", "-", f"{len(opaque)}: {names}" if opaque else "0")
    with torch.no_grad():
        out = to_torch(graph)(*inputs)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    model_table[name] = ("yes", f"{err:.1e}", model_table[name][2])
    assert {op.removeprefix("aten::") for op in opaque} <= CASES[name].opaque, f"{name}: new opaque ops {names}"
    assert out.shape == ref.shape
    assert err <= 1e-4, f"{name}: emitted torch module differs by {err:.2e} relative"
    # the batch is dynamic by default: every input's dim 0 is `batch`, and the module runs at batch + 1
    assert [n.attrs.get("dims", (None,))[0] for n in graph.nodes() if n.kind == "input"] == ["batch"] * len(inputs)
    assert not graph.meta.get("notes")
    bigger = tuple(torch.cat([x, x[:1]]) for x in inputs)
    with torch.no_grad():
        want, got = model(*bigger), to_torch(graph)(*bigger)
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
