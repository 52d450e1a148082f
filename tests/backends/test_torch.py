"""Torch backend on the zoo: outputs, other batch sizes, fold_bn, params, state_dict, torch.export, errors."""

from __future__ import annotations

import copy
import io
from functools import cache

import pytest
import torch
from torch import nn

from netsqueeze.backends.torch import EMITTERS, to_torch
from netsqueeze.errors import UnsupportedOpError
from netsqueeze.frontends.fx import from_torch
from netsqueeze.ir import Graph, Origin, TensorMeta, node_params
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dead_code import DeadCode
from netsqueeze.passes.fold_bn import FoldBN
from tests.zoo import ZOO

NAMES = sorted(ZOO)


@cache
def captured(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], Graph]:
    model, inputs = ZOO[name]()
    return model, inputs, from_torch(model, inputs)


def fresh(inputs: tuple[torch.Tensor, ...], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        out.append(torch.randn(shape, generator=g) if t.is_floating_point()
                   else torch.randint(0, int(t.max()) + 1, shape, generator=g))
    return tuple(out)


def max_err(a: nn.Module, b: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    with torch.no_grad():
        ya, yb = a(*inputs), b(*inputs)
    ya = ya if isinstance(ya, tuple) else (ya,)
    yb = yb if isinstance(yb, tuple) else (yb,)
    assert len(ya) == len(yb)
    return max(float((x - y).abs().max()) for x, y in zip(ya, yb))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_outputs_and_batch_sizes(name: str) -> None:
    model, inputs, graph = captured(name)
    em = to_torch(graph)
    assert max_err(model, em, fresh(inputs, inputs[0].shape[0], 1)) <= 1e-5
    assert max_err(model, em, fresh(inputs, 5, 2)) <= 1e-5
    assert max_err(model, em, fresh(inputs, 1, 3)) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name: str) -> None:
    model, _, graph = captured(name)
    em = to_torch(graph)
    assert n_params(em) == sum(node_params(n) for n in graph.nodes()) == n_params(model)
    # the state_dict is exactly the IR's params, at the node ids' paths
    expected = {f"{n.id}.{k}" for n in graph.nodes() for k in n.params}
    assert set(em.state_dict()) == expected


@pytest.mark.parametrize("name", NAMES)
def test_fold_bn_dead_code(name: str) -> None:
    model, inputs, graph = captured(name)
    g = graph.copy()
    ctx = PassContext()
    FoldBN().run(g, ctx)
    DeadCode().run(g, ctx)
    g.verify()
    assert not g.by_kind("batch_norm", "identity")
    em = to_torch(g)
    assert max_err(model, em, fresh(inputs, 3, 4)) <= 1e-4
    assert n_params(em) == sum(node_params(n) for n in g.nodes())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip(name: str) -> None:
    _model, inputs, graph = captured(name)
    em = to_torch(graph)
    buf = io.BytesIO()
    torch.save(em.state_dict(), buf)
    other = to_torch(graph)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = fresh(inputs, 2, 5)
    assert max_err(em, other, x) == 0.0


@pytest.mark.parametrize("name", ["resnet", "transformer", "mobilenetv2", "unknown_op"])
def test_torch_export_of_emitted_module(name: str) -> None:
    model, inputs, graph = captured(name)
    em = to_torch(graph)
    ep = torch.export.export(em, inputs, strict=False)
    assert max_err(model, ep.module(), inputs) <= 1e-5


def test_extra_outputs_and_no_aliasing() -> None:
    model, inputs, graph = captured("resnet")
    em = to_torch(graph, extra_outputs=[("layer1.0.add", 0), ("fc", 0)])
    seen: list[torch.Tensor] = []
    hook = model.get_submodule("layer1.0").register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        out = em(*inputs)
        ref = model(*inputs)
    hook.remove()
    assert isinstance(out, tuple) and len(out) == 3
    assert torch.allclose(out[0], ref, atol=1e-5) and torch.equal(out[2], out[0])
    assert torch.allclose(torch.relu(out[1]), seen[0], atol=1e-5)  # the block's residual sum, before its relu
    single = to_torch(graph, extra_outputs=[])
    assert isinstance(single(*inputs), torch.Tensor)
    before = graph.node("fc").params["weight"].clone()
    with torch.no_grad():
        em.get_parameter("fc.weight").zero_()
    assert torch.equal(graph.node("fc").params["weight"], before)


class SelfAttention(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_pruned_attention_heads() -> None:
    """Dropping heads 2 and 3 equals zeroing their weights in the full module (H·Dh != embed_dim)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    g = from_torch(SelfAttention(mha), (x,))
    att = g.by_kind("attention")[0]
    keep = torch.cat([torch.arange(0, 8) + off for off in (0, 16, 32)])
    with torch.no_grad():
        for off in (0, 16, 32):
            mha.in_proj_weight[off + 8 : off + 16] = 0
            mha.in_proj_bias[off + 8 : off + 16] = 0  # type: ignore[index]
        mha.out_proj.weight[:, 8:] = 0
        ref = mha(x, x, x, need_weights=False)[0]
    att.params["in_proj_weight"] = mha.in_proj_weight.detach()[keep].clone()
    att.params["in_proj_bias"] = mha.in_proj_bias.detach()[keep].clone()  # type: ignore[index]
    att.params["out_proj_weight"] = mha.out_proj.weight.detach()[:, :8].clone()
    att.attrs["num_heads"] = 2
    g.infer_shapes()
    g.verify()
    em = to_torch(g)
    with torch.no_grad():
        assert float((em(x) - ref).abs().max()) <= 1e-5


def test_onnx_style_opaque_is_unsupported() -> None:
    g = Graph("onnx_model")
    g.add_node("x", "input", attrs={"shape": (1, 4), "dtype": "float32"})
    g.add_node("/blk/Weird_0", "opaque", ["x"], origin=Origin("onnx", "/blk/Weird_0", "Weird", payload=None))
    g.node("/blk/Weird_0").meta = [TensorMeta((1, 4))]  # opaque shapes are what the frontend observed
    g.add_node("output", "output", ["/blk/Weird_0"])
    g.infer_shapes()
    g.verify()
    with pytest.raises(UnsupportedOpError) as e:
        to_torch(g)
    assert e.value.diagnostics[0].node == "/blk/Weird_0"
    assert e.value.message == ("opaque node '/blk/Weird_0' (op type 'Weird', from onnx) has no torch "
                               "implementation")


def test_emitter_table_is_extensible() -> None:
    assert {"conv", "linear", "attention", "opaque"} <= set(EMITTERS)
    _model, _inputs, graph = captured("mlp")
    g = graph.copy()
    saved = EMITTERS["relu"]
    try:
        EMITTERS["relu"] = lambda b, node, xs: b.call(torch.nn.functional.relu6, xs[0])
        em = to_torch(g)
        assert any(n.target is torch.nn.functional.relu6 for n in em.graph.nodes)
    finally:
        EMITTERS["relu"] = saved


def test_emitted_module_does_not_touch_input_model() -> None:
    model, _inputs, graph = captured("vgg")
    state = copy.deepcopy(model.state_dict())
    em = to_torch(graph)
    with torch.no_grad():
        for p in em.parameters():
            p.zero_()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _unary_graph(kind: str, attrs: dict[str, object], shape: tuple[int, ...]) -> Graph:
    g = Graph("unary")
    g.add_node("x", "input", attrs={"shape": shape, "dtype": "float32"})
    g.add_node("op", kind, ["x"], attrs=attrs)
    g.add_node("output", "output", ["op"])
    g.infer_shapes()
    return g


def test_onnx_style_attrs() -> None:
    x = torch.randn(2, 3, 5, 5)
    hs = to_torch(_unary_graph("hardsigmoid", {"alpha": 0.2, "beta": 0.5}, (2, 3, 5, 5)))
    assert torch.allclose(hs(x), torch.clamp(0.2 * x + 0.5, 0, 1))
    rs = to_torch(_unary_graph("resize", {"size": (9, 9), "mode": "linear",
                                          "coordinate_transformation_mode": "align_corners"}, (2, 3, 5, 5)))
    ref = torch.nn.functional.interpolate(x, size=(9, 9), mode="bilinear", align_corners=True)
    assert torch.allclose(rs(x), ref)
    with pytest.raises(UnsupportedOpError, match="resize 'op'"):
        to_torch(_unary_graph("resize", {"size": (9, 9), "mode": "linear",
                                         "coordinate_transformation_mode": "asymmetric"}, (2, 3, 5, 5)))


def test_node_ids_that_name_module_attributes_do_not_shadow_them() -> None:
    from netsqueeze.backends.torch import to_torch as emit
    from netsqueeze.ir.graph import Graph as G

    g = G("g")
    g.add_node("x", "input", attrs={"shape": (2, 3)})
    g.add_node("half", "constant", params={"value": torch.full((3,), 0.5)})  # an ONNX initializer name
    g.add_node("eval", "mul", ["x", "half"])
    g.add_node("out", "output", ["eval"])
    g.infer_shapes()
    m = emit(g)
    assert torch.equal(m(torch.ones(2, 3)), torch.full((2, 3), 0.5))
    assert [k for k, _ in m.named_modules()] == ["", "half_"]
    m.half()  # nn.Module.half still works
