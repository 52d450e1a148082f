"""The NetworkX-based IR shared by every frontend, pass and backend."""

from netsqueeze.ir.graph import Graph, Node, Origin, TensorMeta, Value
from netsqueeze.ir.ops import OPS, OpSpec, infer_shapes, node_flops, node_params, spec
from netsqueeze.ir.parser import load_graph, parse_graph
from netsqueeze.ir.printer import print_graph
from netsqueeze.ir.stats import GraphStats, NodeStats, format_stats, graph_stats

__all__ = [
    "OPS", "Graph", "GraphStats", "Node", "NodeStats", "OpSpec", "Origin", "TensorMeta", "Value",
    "format_stats", "graph_stats", "infer_shapes", "load_graph", "node_flops", "node_params", "parse_graph",
    "print_graph", "spec",
]
