"""Torch frontend: ids, op mapping, canonical attrs, determinism, fallback capture and its errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import CaptureError, InputMismatchError
from netsqueeze.frontends.fx import from_torch
from tests.zoo import ZOO


def max_err(a: nn.Module, b: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    with torch.no_grad():
        ya, yb = a(*inputs), b(*inputs)
    ya = ya if isinstance(ya, tuple) else (ya,)
    yb = yb if isinstance(yb, tuple) else (yb,)
    assert len(ya) == len(yb)
    return max(float((x - y).abs().max()) for x, y in zip(ya, yb))


class Misc(nn.Module):
    """One of most mapped ops: the capture must contain no opaque node and reproduce the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(4, 8, 4, padding="same")  # even kernel: asymmetric padding
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.gn = nn.GroupNorm(2, 4)
        self.lrn = nn.LocalResponseNorm(3)
        self.ln = nn.LayerNorm(6)
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, seq: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.up(self.dw(F.leaky_relu(self.c2(x), 0.2)))
        y = self.lrn(self.gn(y))
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([F.silu(a), F.hardsigmoid(b), torch.clamp(a, -0.5, 0.5)], dim=1)[:, 1:5]
        y = F.pad(y, (1, 0, 2, 1))
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = F.max_pool2d(y, 3, 2, padding=1)
        z = y.reshape(y.shape[0], 4, -1).permute(0, 2, 1)
        z = torch.softmax(z @ z.transpose(1, 2), dim=-1).unsqueeze(1).squeeze(1)
        s = self.ln(self.c1(seq).transpose(1, 2)) + self.emb(idx)
        s = torch.bmm(s, self.lin(s).transpose(1, 2)) / 3.0 - 1.0
        return z.mean(dim=-1), (1.0 - s).mean(-1), torch.sigmoid(y.flatten(1))


def misc() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return Misc().eval(), (torch.randn(2, 4, 10, 10), torch.randn(2, 4, 7), torch.randint(0, 10, (2, 7)))


def test_resnet_ids_are_module_paths() -> None:
    model, inputs = ZOO["resnet"]()
    g = from_torch(model, inputs)
    ids = {n.id for n in g.nodes()}
    assert {"x", "conv1", "bn1", "layer1.0.conv1", "layer1.0.add", "layer1.0.relu", "layer1.0.relu_1",
            "layer2.0.downsample.0", "layer2.0.downsample.1", "fc", "flatten", "output"} <= ids
    assert g.inputs == ["x"] and g.outputs == ["output"]
    assert g.node("layer2.0.conv1").attrs == {"stride": (2, 2), "padding": (1, 1, 1, 1), "dilation": (1, 1),
                                              "groups": 1}
    assert g.node("layer1.0.add").kind == "add"


def test_transformer_attention_is_one_node() -> None:
    model, inputs = ZOO["transformer"]()
    g = from_torch(model, inputs)
    att = g.by_kind("attention")
    assert [n.id for n in att] == ["layers.0.attn", "layers.1.attn"]
    n = att[0]
    assert n.attrs == {"num_heads": 4, "embed_dim": 16, "head_dim": 4, "batch_first": True}
    assert {k: list(v.shape) for k, v in n.params.items()} == {
        "in_proj_weight": [48, 16], "in_proj_bias": [48], "out_proj_weight": [16, 16], "out_proj_bias": [16]}
    assert len(set(g.operands(n.id))) == 1 and len(g.operands(n.id)) == 3
    assert not g.by_kind("opaque")


def test_unknown_op_is_opaque_and_runs() -> None:
    model, inputs = ZOO["unknown_op"]()
    g = from_torch(model, inputs)
    assert [(n.id, n.origin.op_type) for n in g.by_kind("opaque")] == [
        ("cumsum", "aten::cumsum.default"), ("erfinv", "aten::erfinv.default")]
    x = torch.randn(7, 12)
    assert max_err(model, to_torch(g), (x,)) <= 1e-5
    payload = pickle.loads(pickle.dumps(g.node("cumsum").origin.payload))
    assert torch.equal(payload(x), torch.cumsum(x, dim=1))


def test_misc_ops_map_to_canonical_ops() -> None:
    model, inputs = misc()
    g = from_torch(model, inputs)
    kinds = {n.kind for n in g.nodes()}
    assert "opaque" not in kinds, [n.origin.op_type for n in g.by_kind("opaque")]
    assert {"conv", "conv_transpose", "group_norm", "lrn", "split", "concat", "slice", "pad", "resize",
            "max_pool", "reshape", "transpose", "matmul", "softmax", "unsqueeze", "squeeze", "layer_norm",
            "embedding", "linear", "div", "sub", "clip", "leaky_relu", "silu", "hardsigmoid", "mean",
            "flatten", "constant"} <= kinds
    assert g.node("c2").attrs["padding"] == (1, 1, 2, 2)  # ONNX order: begins, then ends
    assert g.node("c1").attrs["padding"] == (2, 2) and g.node("c1").attrs["dilation"] == (2,)
    assert g.node("pad").attrs["pads"] == (0, 0, 2, 1, 0, 0, 1, 0)
    assert g.node("reshape").attrs["shape"] == (0, 4, -1)
    em = to_torch(g)
    assert max_err(model, em, inputs) <= 1e-5
    other = (torch.randn(5, 4, 10, 10), torch.randn(5, 4, 7), torch.randint(0, 10, (5, 7)))
    assert max_err(model, em, other) <= 1e-5


@pytest.mark.parametrize("name", ["vgg", "transformer", "mobilenetv2"])
def test_printed_ir_is_deterministic(name: str) -> None:
    model, inputs = ZOO[name]()
    assert str(from_torch(model, inputs)) == str(from_torch(ZOO[name]()[0], inputs))


def test_model_is_not_modified() -> None:
    model, inputs = ZOO["resnet"]()
    model.train()
    model.get_submodule("layer1").eval()
    flags = {k: m.training for k, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    g = from_torch(model, inputs)
    assert {k: m.training for k, m in model.named_modules()} == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # params are cloned: editing the IR leaves the model alone
    g.node("conv1").params["weight"].zero_()
    assert model.get_parameter("conv1.weight").abs().sum() > 0


def test_symbolic_trace_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("export disabled for this test")

    for name in ("resnet", "lenet", "mobilenetv2", "unknown_op"):
        model, inputs = ZOO[name]()
        expected = {n.id for n in from_torch(model, inputs).nodes() if n.kind in ("conv", "linear", "batch_norm")}
        monkeypatch.setattr(torch.export, "export", no_export)
        g = from_torch(model, inputs)
        monkeypatch.undo()
        assert {n.id for n in g.nodes() if n.kind in ("conv", "linear", "batch_norm")} == expected
        assert max_err(model, to_torch(g), inputs) <= 1e-5


def test_exported_program_and_graph_module_inputs() -> None:
    model, inputs = ZOO["vgg"]()
    ep = torch.export.export(model, inputs, strict=False)
    g = from_torch(ep, inputs)
    # a module is captured with a dynamic batch by default; a program exported with a static one keeps it
    assert str(g).replace("ExportedProgram", "VGG") == str(from_torch(model, inputs, dynamic_shapes={}))
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, inputs, strict=False, dynamic_shapes=({0: batch},))
    assert str(from_torch(ep, inputs, dynamic_shapes=({0: batch},))).replace("ExportedProgram", "VGG") == \
        str(from_torch(model, inputs))
    gm = torch.fx.symbolic_trace(model)
    assert max_err(model, to_torch(from_torch(gm, inputs)), inputs) <= 1e-5


def test_wrong_shape_input() -> None:
    model, _ = ZOO["lenet"]()
    with pytest.raises(InputMismatchError) as e:
        from_torch(model, (torch.randn(2, 3, 28, 28),))
    assert e.value.message == ("example input 'x' (given float32[2, 3, 28, 28]) does not fit the model: "
                               "layer 'conv1' (Conv2d) expects [N, 1, H, W]")
    assert "reason: RuntimeError" in str(e.value) and e.value.diagnostics[0].node == "conv1"


def test_mismatch_between_layers_blames_no_layer() -> None:
    """Inputs that every layer accepts but the forward's own code rejects (an add of 8x8 and 4x4 maps) are not
    blamed on the last layer that ran, whose input fit."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.a(image)) + torch.relu(self.b(mask))

    with pytest.raises(InputMismatchError) as e:
        from_torch(Two().eval(), (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)))
    assert e.value.message == ("example inputs ('image' = float32[2, 3, 8, 8], 'mask' = float32[2, 3, 4, 4]) do "
                               "not fit the model: its forward failed after layer 'b' (Conv2d) returned, outside "
                               "any layer")
    assert e.value.diagnostics[0].node is None
    assert "reason: RuntimeError: The size of tensor a (8) must match the size of tensor b (4)" in str(e.value)


def test_wrong_dtype_input() -> None:
    model, _ = ZOO["mlp"]()
    with pytest.raises(InputMismatchError) as e:
        from_torch(model, (torch.randn(4, 20, dtype=torch.float64),))
    assert e.value.message == ("example input 'x' (given float64[4, 20]) does not fit the model: "
                               "layer 'fc1' (Linear) expects float32[..., 20]")


def test_wrong_input_count() -> None:
    model, inputs = ZOO["mlp"]()
    with pytest.raises(InputMismatchError) as e:
        from_torch(model, (*inputs, *inputs))
    assert e.value.message == "MLP.forward takes 1 inputs (x) but 2 example inputs were given"


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_uncapturable_model() -> None:
    with pytest.raises(CaptureError) as e:
        from_torch(DataDependent(), (torch.randn(2, 3),))
    text = str(e.value)
    assert "neither torch.export nor torch.fx.symbolic_trace" in text
    assert "torch.export:" in text and "torch.fx.symbolic_trace: TraceError" in text


def test_eval_dropout_is_identity() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.ReLU()).eval()
    g = from_torch(model, (torch.randn(2, 4),))
    assert [n.kind for n in g.nodes()] == ["input", "linear", "identity", "relu", "output"]


class IntTimesHalf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long() * 0.5 + x.long().clamp(0.5, 2.5)


def test_an_op_torch_promotes_to_another_dtype_is_kept_opaque_and_computes_what_torch_does() -> None:
    """int64 * 0.5 is float in torch; the canonical op keeps its operand's dtype (it made 0.5 an int 0): such a
    node is kept opaque, where the capture failed with "frontend bug: node 'mul' infers int64"."""
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 5.0, 7.0]])
    g = from_torch(IntTimesHalf(), (x,))
    assert g.meta_of(g.operands(g.outputs[0])[0]).dtype == "float32"
    assert torch.equal(to_torch(g)(x), IntTimesHalf()(x))
    assert to_torch(g)(x)[1].tolist() == [3.0, 5.0, 6.0]  # 2·0.5 + 2, 5·0.5 + 2.5, 7·0.5 + 2.5


class FloorDiv(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.div(x, 2, rounding_mode="floor") + x.div(3, rounding_mode="trunc")


def test_symbolic_trace_keeps_a_div_rounding_mode() -> None:
    """The symbolic_trace path (torch.export's fallback) bound `div(x, 2, rounding_mode="floor")` to the div.Tensor
    overload, which has no rounding mode, and lowered a true division (error 0.998): such calls stay opaque."""
    import torch.fx as fx

    from netsqueeze.frontends.fx.capture import _from_symbolic

    x = torch.linspace(-9, 9, 12).reshape(2, 6)
    g = _from_symbolic(fx.symbolic_trace(FloorDiv()), (x,), "FloorDiv")
    assert torch.equal(to_torch(g)(x), FloorDiv()(x))
    assert to_torch(g)(x)[0, :2].tolist() == [-8.0, -6.0]  # floor(-9/2) + trunc(-9/3), floor(-3.68) + trunc(-2.45)
