"""`ir.canonicalize` on both import routes: each pattern, written in torch and as the equivalent ONNX
model, fires through `netsqueeze.frontends.fx` and `netsqueeze.frontends.onnx` alike and the outputs stay
those of the source model (<= 1e-5); near misses do not fire."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.fx import from_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.graph import Graph
from tests.frontends.onnx_models import run

SQ, ISQ, K = math.sqrt(2.0), 1 / math.sqrt(2.0), math.sqrt(2.0 / math.pi)
C = 3


class Fn(nn.Module):
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class BnThen(nn.Module):
    """BatchNorm2d, then elementwise ops with per-channel constants (`then` gets the module for them)."""

    def __init__(self, then: Callable[[BnThen, torch.Tensor], torch.Tensor], const_shape: tuple[int, ...]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.bn = nn.BatchNorm2d(C)
        with torch.no_grad():
            self.bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
            self.bn.bias.copy_(torch.randn(C, generator=g))
            self.bn.running_mean.copy_(torch.randn(C, generator=g))
            self.bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
        self.k1 = nn.Parameter(torch.rand(const_shape, generator=g) + 0.5)
        self.k2 = nn.Parameter(torch.randn(const_shape, generator=g))
        self.then = then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self, self.bn(x))


# ---- the equivalent ONNX models -------------------------------------------------------------------
def f32(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def onnx_model(nodes: list[tuple[str, list[str], str]], shape: tuple[int, ...], inits: dict[str, np.ndarray]
               ) -> onnx.ModelProto:
    """nodes: (op, inputs, output); the last node writes 'y'."""
    protos = [helper.make_node(op, ins, [out], name=f"{op}_{i}") for i, (op, ins, out) in enumerate(nodes)]
    g = helper.make_graph(protos, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(m)


def erf_gelu(form: str, half: float = 0.5) -> tuple[nn.Module, onnx.ModelProto]:
    consts = {"sq": f32(SQ), "isq": f32(ISQ), "one": f32(1.0), "c05": f32(half)}
    if form == "x*0.5*(1+erf(x/sqrt2))":
        fn = lambda x: x * half * (1.0 + torch.erf(x / SQ))  # noqa: E731
        nodes = [("Div", ["x", "sq"], "d"), ("Erf", ["d"], "e"), ("Add", ["e", "one"], "a"),
                 ("Mul", ["x", "c05"], "h"), ("Mul", ["h", "a"], "y")]
    elif form == "x*(1+erf(x*isqrt2))*0.5":
        fn = lambda x: x * (1.0 + torch.erf(x * ISQ)) * half  # noqa: E731
        nodes = [("Mul", ["x", "isq"], "d"), ("Erf", ["d"], "e"), ("Add", ["one", "e"], "a"),
                 ("Mul", ["x", "a"], "m"), ("Mul", ["m", "c05"], "y")]
    else:  # "(1+erf(x/sqrt2))*0.5*x"
        fn = lambda x: (1.0 + torch.erf(x / SQ)) * half * x  # noqa: E731
        nodes = [("Div", ["x", "sq"], "d"), ("Erf", ["d"], "e"), ("Add", ["e", "one"], "a"),
                 ("Mul", ["a", "c05"], "m"), ("Mul", ["m", "x"], "y")]
    return Fn(fn), onnx_model(nodes, (2, 16), consts)


def tanh_gelu(cube: str, coeff: float = 0.044715) -> tuple[nn.Module, onnx.ModelProto]:
    consts = {"three": f32(3.0), "c": f32(coeff), "k": f32(K), "one": f32(1.0), "c05": f32(0.5)}
    if cube == "pow":
        fn = lambda x: 0.5 * x * (1.0 + torch.tanh(K * (x + coeff * torch.pow(x, 3.0))))  # noqa: E731
        head = [("Pow", ["x", "three"], "p")]
    else:
        fn = lambda x: 0.5 * x * (1.0 + torch.tanh(K * (x + coeff * (x * x * x))))  # noqa: E731
        head = [("Mul", ["x", "x"], "x2"), ("Mul", ["x2", "x"], "p")]
    nodes = [*head, ("Mul", ["c", "p"], "cp"), ("Add", ["x", "cp"], "s"), ("Mul", ["k", "s"], "ks"),
             ("Tanh", ["ks"], "t"), ("Add", ["one", "t"], "a"), ("Mul", ["c05", "x"], "h"), ("Mul", ["h", "a"], "y")]
    return Fn(fn), onnx_model(nodes, (2, 16), consts)


def bn_then(ops: tuple[str, str], const_shape: tuple[int, ...] = (1, C, 1, 1)) -> tuple[nn.Module, onnx.ModelProto]:
    torch_op = {"Mul": torch.mul, "Add": torch.add, "Sub": torch.sub, "Div": torch.div}

    def then(m: BnThen, y: torch.Tensor) -> torch.Tensor:
        return torch_op[ops[1]](torch_op[ops[0]](y, m.k1), m.k2)

    mod = BnThen(then, const_shape)
    bn = mod.bn
    inits = {"w": f32(bn.weight.detach()), "b": f32(bn.bias.detach()), "m": f32(bn.running_mean),
             "v": f32(bn.running_var), "k1": f32(mod.k1.detach()), "k2": f32(mod.k2.detach())}
    nodes = [("BatchNormalization", ["x", "w", "b", "m", "v"], "bn"), (ops[0], ["bn", "k1"], "t"),
             (ops[1], ["t", "k2"], "y")]
    return mod, onnx_model(nodes, (2, C, 5, 5), inits)


# ---- the checks --------------------------------------------------------------------------------------
def kinds(g: Graph) -> list[str]:
    return [n.kind for n in g.nodes()]


def check_routes(mod: nn.Module, model: onnx.ModelProto, expect: list[str] | None, absent: str | None = None
                 ) -> tuple[Graph, Graph]:
    """Both routes import; kinds are `expect` (or lack `absent`); outputs match the source model (<= 1e-5)."""
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2
    mod = mod.eval()
    graphs = (from_torch(mod, (x,)), from_onnx(model))
    with torch.no_grad():
        ref_torch = mod(x)
    ref_onnx = torch.from_numpy(run(model, x.numpy())[0])
    assert float((ref_torch - ref_onnx).abs().max()) <= 1e-5  # the two sources are the same function
    for g, ref in zip(graphs, (ref_torch, ref_onnx)):
        if expect is not None:
            assert kinds(g) == expect, (g.meta.get("frontend", "fx"), kinds(g))
        if absent is not None:
            assert absent not in kinds(g)
        with torch.no_grad():
            got = to_torch(g)(x)
        assert float((got - ref).abs().max()) <= 1e-5
    return graphs


ERF_FORMS = ["x*0.5*(1+erf(x/sqrt2))", "x*(1+erf(x*isqrt2))*0.5", "(1+erf(x/sqrt2))*0.5*x"]


@pytest.mark.parametrize("form", ERF_FORMS)
def test_erf_gelu_is_one_gelu_on_both_routes(form: str) -> None:
    for g in check_routes(*erf_gelu(form), ["input", "gelu", "output"]):
        (gelu,) = g.by_kind("gelu")
        assert gelu.attrs["approximate"] == "none"


@pytest.mark.parametrize("form", ERF_FORMS)
def test_erf_gelu_near_miss_does_not_fire(form: str) -> None:
    for g in check_routes(*erf_gelu(form, half=0.49), None, absent="gelu"):
        assert any(n.kind == "opaque" for n in g.nodes())  # the erf stays what it was


@pytest.mark.parametrize("cube", ["pow", "x*x*x"])
def test_tanh_gelu_is_one_gelu_on_both_routes(cube: str) -> None:
    for g in check_routes(*tanh_gelu(cube), ["input", "gelu", "output"]):
        (gelu,) = g.by_kind("gelu")
        assert gelu.attrs["approximate"] == "tanh"


def test_tanh_gelu_near_miss_does_not_fire() -> None:
    check_routes(*tanh_gelu("pow", coeff=0.04), None, absent="gelu")


@pytest.mark.parametrize("ops", [("Mul", "Add"), ("Div", "Sub"), ("Add", "Mul")])
def test_batch_norm_then_per_channel_constants_is_one_batch_norm(ops: tuple[str, str]) -> None:
    for g in check_routes(*bn_then(ops), ["input", "batch_norm", "output"]):
        assert g.by_kind("constant") == []


@pytest.mark.parametrize("shape", [(1, C, 5, 1), (C, 5, 5)])
def test_batch_norm_then_non_per_channel_constant_does_not_fire(shape: tuple[int, ...]) -> None:
    for g in check_routes(*bn_then(("Mul", "Add"), shape), None):
        assert kinds(g).count("batch_norm") == 1 and "mul" in kinds(g) and "add" in kinds(g)


class MatMulAdd(nn.Module):
    def __init__(self, bias_shape: tuple[int, ...]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 8, generator=g))
        self.b = nn.Parameter(torch.randn(bias_shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


def matmul_add(bias_shape: tuple[int, ...]) -> tuple[nn.Module, onnx.ModelProto]:
    mod = MatMulAdd(bias_shape)
    inits = {"W": f32(mod.w.detach()), "B": f32(mod.b.detach())}
    return mod, onnx_model([("MatMul", ["x", "W"], "mm"), ("Add", ["mm", "B"], "y")], (2, 16), inits)


def test_matmul_then_bias_add_is_one_linear() -> None:
    for g in check_routes(*matmul_add((8,)), ["input", "linear", "output"]):
        (lin,) = g.by_kind("linear")
        assert set(lin.params) == {"weight", "bias"}


def test_bias_that_broadcasts_to_a_higher_rank_does_not_join() -> None:
    for g in check_routes(*matmul_add((1, 1, 8)), ["input", "linear", "constant", "add", "output"]):
        assert set(g.by_kind("linear")[0].params) == {"weight"}
