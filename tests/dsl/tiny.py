"""The small hand-built CNN the policy tests resolve against (with the real pass registry)."""

from __future__ import annotations

import torch

from netsqueeze.ir.graph import Graph


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
