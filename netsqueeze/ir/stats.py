"""Params / FLOPs / bytes accounting per node and for the whole graph."""

from __future__ import annotations

from dataclasses import dataclass

from netsqueeze.ir.dims import expr_of, is_dynamic
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import node_flops, node_nonzeros, node_param_bytes, node_params, node_weight_forms
from netsqueeze.ir.weights import graph_weight_bytes


@dataclass(frozen=True)
class NodeStats:
    id: str
    kind: str
    shapes: tuple[str, ...]
    params: int
    flops: int
    param_bytes: int  # exact stored size, shared tables included (see GraphStats.shared_bytes)
    activation_bytes: int
    nonzeros: int = 0
    forms: str = ""  # encoded params and their forms; '' when every param is dense


@dataclass(frozen=True)
class GraphStats:
    nodes: dict[str, NodeStats]
    shared_bytes: int = 0  # bytes of tables (codebooks) that several nodes share, counted once here

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes.values())

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes.values())

    @property
    def nonzeros(self) -> int:
        return sum(n.nonzeros for n in self.nodes.values())

    @property
    def param_bytes(self) -> int:
        """Exact stored bytes of every param in the graph, each shared table counted once."""
        return sum(n.param_bytes for n in self.nodes.values()) - self.shared_bytes


def example_batch(graph: Graph) -> int:
    """How many samples the graph's FLOPs are counted over: the example's batch when dim 0 of every input is one
    and the same dynamic dim (the batch), else 1 (a model that fixes its dim 0 runs it as one sample). An absolute
    FLOPs budget (`flops <= 300M`) is per sample."""
    shapes = [graph.node(nid).meta[0].shape for nid in graph.inputs if graph.node(nid).meta]
    if shapes and all(s and is_dynamic(s[0]) for s in shapes) and len({expr_of(s[0]) for s in shapes}) == 1:
        return max(1, int(shapes[0][0]))
    return 1


_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4, "bool": 1}


def graph_stats(graph: Graph) -> GraphStats:
    out: dict[str, NodeStats] = {}
    nodes = graph.nodes()
    for node in nodes:
        act = sum(m.numel() * _SIZES.get(m.dtype, 4) for m in node.meta)
        out[node.id] = NodeStats(
            node.id, node.kind, tuple(str(m) for m in node.meta), node_params(node), node_flops(graph, node),
            node_param_bytes(node), act, node_nonzeros(node), node_weight_forms(node),
        )
    # every node's param_bytes counts its tables; the graph counts each shared table once
    total = graph_weight_bytes([w for node in nodes for w in node.params.values()])
    return GraphStats(out, sum(n.param_bytes for n in out.values()) - total)


def format_stats(stats: GraphStats) -> str:
    rows = [("node", "kind", "shape", "params", "FLOPs")]
    for s in stats.nodes.values():
        if s.kind in ("input", "output"):
            continue
        rows.append((s.id, s.kind, ", ".join(s.shapes), f"{s.params:,}", f"{s.flops:,}"))
    rows.append(("total", "", "", f"{stats.params:,}", f"{stats.flops:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
