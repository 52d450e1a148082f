"""IR: construction, verify diagnostics, deterministic printing, accounting."""

import pytest
import torch

from netsqueeze.errors import VerifyError
from netsqueeze.ir import Graph, graph_stats


def small_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph("small")
    g.add_node("x", "input", attrs={"shape": (2, 3, 8, 8)})
    g.add_node("conv", "conv", ["x"], attrs={"stride": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1),
                                             "groups": 1}, params={"weight": torch.randn(4, 3, 3, 3),
                                                                    "bias": torch.zeros(4)})
    g.add_node("relu", "relu", ["conv"])
    g.add_node("add", "add", ["relu", "relu"])  # the same value twice
    g.add_node("flat", "flatten", ["add"], attrs={"start_dim": 1})
    g.add_node("fc", "linear", ["flat"], params={"weight": torch.randn(10, 256)})
    g.add_node("out", "output", ["fc"])
    g.infer_shapes()
    return g


def test_shapes_and_operand_order() -> None:
    g = small_graph()
    g.verify()
    assert g.node("fc").meta[0].shape == (2, 10)
    assert g.operands("add") == [("relu", 0), ("relu", 0)]
    assert [u[0] for u in g.users("relu")] == ["add", "add"]


def test_printer_is_deterministic() -> None:
    a, b = str(small_graph()), str(small_graph())
    assert a == b
    assert "%conv: float32[2, 4, 8, 8] = conv(%x) {dilation=[1, 1], groups=1, padding=[1, 1, 1, 1], stride=[1, 1]}" in a


def test_stats() -> None:
    s = graph_stats(small_graph())
    assert s.nodes["conv"].params == 4 * 3 * 9 + 4
    assert s.nodes["fc"].params == 2560
    assert s.params == 112 + 2560
    # conv: 2·27 per output element + bias, 2·4·8·8 outputs; linear: 2·2560 per row, 2 rows
    assert s.nodes["conv"].flops == 2 * 27 * 512 + 512
    assert s.nodes["fc"].flops == 2 * 2 * 2560


def test_verify_catches_stale_shapes_and_names_the_node() -> None:
    g = small_graph()
    g.node("fc").params["weight"] = torch.randn(10, 100)
    with pytest.raises(VerifyError) as e:
        g.verify()
    assert str(e.value) == "node 'fc': error: linear 'fc': input has 256 features but weight expects 100"


def test_verify_reports_every_problem() -> None:
    g = small_graph()
    g.node("conv").params["bias"] = torch.zeros(5)
    g.node("fc").params["weight"] = torch.randn(10, 100)
    with pytest.raises(VerifyError) as e:
        g.verify()
    assert [d.node for d in e.value.diagnostics] == ["conv", "fc"]


def test_cycle_is_reported() -> None:
    g = small_graph()
    g.set_operand("conv", 0, ("relu", 0))
    with pytest.raises(VerifyError, match="graph has a cycle: conv -> relu"):
        g.verify()


def test_duplicate_id_and_unknown_node() -> None:
    g = small_graph()
    with pytest.raises(VerifyError, match="duplicate node id 'relu'"):
        g.add_node("relu", "relu", ["conv"])
    with pytest.raises(VerifyError, match=r"no node 'rleu' in the graph \(did you mean 'relu'\?\)"):
        g.node("rleu")


def test_copy_is_deep() -> None:
    g = small_graph()
    h = g.copy()
    h.node("conv").params["weight"].zero_()
    h.remove_node("out")
    assert g.node("conv").params["weight"].abs().sum() > 0
    assert "out" in g and g.outputs == ["out"]


def test_conv_transpose_flops_count_its_bias_as_conv_does() -> None:
    """ConvTranspose2d(3, 5, 3, stride=2) on 1x3x4x4: 2·(5·3·3)·(3·4·4) = 4,320 multiply-add FLOPs, and its bias
    once per output element (1·5·9·9 = 405): 4,725; without a bias, 4,320."""
    from torch import nn

    import netsqueeze as ns
    from netsqueeze.ir.stats import graph_stats

    x = torch.randn(1, 3, 4, 4)
    for bias, flops in ((True, 4725), (False, 4320)):
        g = ns.import_model(nn.Sequential(nn.ConvTranspose2d(3, 5, 3, stride=2, bias=bias)), (x,),
                            dynamic_shapes={"input": {}})
        assert graph_stats(g).flops == flops


def test_params_count_the_models_parameters_that_are_used_as_tensors() -> None:
    """A layer scale (`x * gamma`) and a position embedding (`x + pos`) are nn.Parameters the capture holds as
    constants: graph_stats counts them as `module.parameters()` does (it counted only the conv's 224 of 288)."""
    from torch import nn

    import netsqueeze as ns
    from netsqueeze.ir.stats import graph_stats

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.1))
            self.pos = nn.Parameter(torch.zeros(1, 8, 4, 4))
            self.register_buffer("shift", torch.ones(1, 8, 1, 1))  # a buffer: not a parameter

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.conv(x) * self.gamma + self.pos) - self.shift

    m = Scaled().eval()
    g = ns.import_model(m, (torch.randn(2, 3, 4, 4),))
    assert sum(p.numel() for p in m.parameters()) == 224 + 8 + 128
    assert graph_stats(g).params == 360
