"""fold_bn and dead_code on hand-built graphs, checked against torch.nn.functional."""

import torch
import torch.nn.functional as F

from netsqueeze.ir import Graph
from netsqueeze.passes import PassContext
from netsqueeze.passes.dead_code import DeadCode
from netsqueeze.passes.fold_bn import FoldBN

CONV = {"stride": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}


def bn_params(c: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"weight": torch.rand(c, generator=g) + 0.5, "bias": torch.randn(c, generator=g),
            "running_mean": torch.randn(c, generator=g), "running_var": torch.rand(c, generator=g) + 0.1}


def conv_bn_graph(shared: bool = False) -> Graph:
    g = torch.Generator().manual_seed(1)
    gr = Graph()
    gr.add_node("x", "input", attrs={"shape": (2, 3, 6, 6)})
    gr.add_node("conv", "conv", ["x"], attrs=CONV, params={"weight": torch.randn(5, 3, 3, 3, generator=g)})
    gr.add_node("bn", "batch_norm", ["conv"], attrs={"eps": 1e-5}, params=bn_params(5, g))
    gr.add_node("out", "output", ["bn"])
    if shared:
        gr.add_node("out2", "output", ["conv"])
    gr.infer_shapes()
    return gr


def reference(gr: Graph, x: torch.Tensor) -> torch.Tensor:
    c, b = gr.node("conv").params, gr.node("bn").params
    y = F.conv2d(x, c["weight"], c.get("bias"), padding=1)
    return F.batch_norm(y, b["running_mean"], b["running_var"], b["weight"], b["bias"], False, 0.0, 1e-5)


def test_fold_bn_is_exact() -> None:
    gr = conv_bn_graph()
    x = torch.randn(2, 3, 6, 6)
    want = reference(gr, x)
    res = FoldBN().run(gr, PassContext())
    gr.verify()
    assert res.removed == {"bn"} and res.touched == {"conv"}
    assert [n.kind for n in gr.nodes()] == ["input", "conv", "output"]
    c = gr.node("conv").params
    got = F.conv2d(x, c["weight"], c["bias"], padding=1)
    assert (got - want).abs().max() < 1e-5


def test_fold_bn_skips_shared_producer_and_unselected() -> None:
    gr = conv_bn_graph(shared=True)
    assert not FoldBN().run(gr, PassContext()).changed
    gr = conv_bn_graph()
    assert not FoldBN().run(gr, PassContext(selected=frozenset({"conv"}))).changed


def test_dead_code_removes_unused_and_identity() -> None:
    gr = Graph()
    gr.add_node("x", "input", attrs={"shape": (2, 4)})
    gr.add_node("drop", "identity", ["x"])
    gr.add_node("unused", "relu", ["x"])
    gr.add_node("r", "relu", ["drop"])
    gr.add_node("out", "output", ["r"])
    gr.infer_shapes()
    res = DeadCode().run(gr, PassContext())
    gr.verify()
    assert res.removed == {"drop", "unused"}
    assert gr.operands("r") == [("x", 0)]
