"""Stand-in passes (trim, squeeze_fold, net_trim, quantize) and a small hand-built CNN for the policy tests.

The stand-ins have the option fields of the real passes but do nothing; they are never put
into the global registry, so they cannot collide with the real ones as those land.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import Pass, PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import all_passes

RATIO = {"min": 0, "max": 1, "unit": "ratio"}


class _Noop(TransformPass):
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult()


@dataclass(frozen=True)
class Trim(_Noop):
    """Stand-in for `trim`."""

    name: ClassVar[str] = "trim"
    criterion: Literal["gdnt", "l1", "l2", "bn_scale", "activation", "random"] = "l1"
    ratio: float = field(default=0.5, metadata=RATIO)
    round_to: int = field(default=1, metadata={"min": 1})
    min_channels: int = field(default=1, metadata={"min": 1})


@dataclass(frozen=True)
class SqueezeFold(_Noop):
    """Stand-in for `squeeze_fold`."""

    name: ClassVar[str] = "squeeze_fold"
    energy: float = field(default=0.995, metadata=RATIO)
    ratio: float | None = None
    method: Literal["qr", "greedy"] = "qr"
    ridge: bool = False


@dataclass(frozen=True)
class NetTrim(_Noop):
    """Stand-in for `net_trim`."""

    name: ClassVar[str] = "net_trim"
    epsilon: float = field(metadata=RATIO)
    mode: Literal["parallel", "cascade"] = "parallel"
    max_iter: int = field(default=200, metadata={"min": 1, "unit": "count"})


@dataclass(frozen=True)
class Quantize(_Noop):
    """Stand-in for `quantize`."""

    name: ClassVar[str] = "quantize"
    weights: tuple[str, ...] = ("int8",)
    activations: str = "int8"
    bits: list[int] = field(default_factory=lambda: [8])
    time_limit: float = field(default=1.0, metadata={"min": 0, "unit": "duration"})


def passes() -> dict[str, type[Pass]]:
    out = dict(all_passes())
    for cls in (Trim, SqueezeFold, NetTrim, Quantize):
        out[cls.name] = cls
    return out


def tiny_cnn() -> Graph:
    """stem -> residual block -> strided block with a depthwise conv -> pool -> two linears."""
    torch.manual_seed(0)
    g = Graph("tiny_cnn")

    def conv(id: str, x: str, cin: int, cout: int, k: int = 3, groups: int = 1) -> str:
        return g.add_node(id, "conv", [x], attrs={"stride": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1),
                                                  "groups": groups},
                          params={"weight": torch.zeros(cout, cin // groups, k, k), "bias": torch.zeros(cout)})

    x = g.add_node("x", "input", attrs={"shape": (1, 3, 8, 8)})
    h = conv("stem.conv", x, 3, 16)
    h = g.add_node("stem.bn", "batch_norm", [h], attrs={"eps": 1e-5}, params={
        "running_mean": torch.zeros(16), "running_var": torch.ones(16),
        "weight": torch.ones(16), "bias": torch.zeros(16)})
    s = g.add_node("stem.relu", "relu", [h])
    h = conv("layer1.conv1", s, 16, 16)
    h = g.add_node("layer1.relu1", "relu", [h])
    h = conv("layer1.conv2", h, 16, 16)
    h = g.add_node("layer1.add", "add", [s, h])
    h = g.add_node("layer1.relu2", "relu", [h])
    h = conv("layer2.conv1", h, 16, 32)
    h = conv("layer2.dw", h, 32, 32, groups=32)
    h = g.add_node("layer2.relu", "relu", [h])
    h = g.add_node("pool", "adaptive_avg_pool", [h], attrs={"output_size": (1, 1)})
    h = g.add_node("flatten", "flatten", [h], attrs={"start_dim": 1})
    h = g.add_node("fc1", "linear", [h], params={"weight": torch.zeros(64, 32), "bias": torch.zeros(64)})
    h = g.add_node("fc_relu", "relu", [h])
    h = g.add_node("fc2", "linear", [h], params={"weight": torch.zeros(10, 64), "bias": torch.zeros(10)})
    g.add_node("out", "output", [h])
    return g
