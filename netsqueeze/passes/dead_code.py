"""`dead_code`: removes nodes whose results no graph output needs, and identity nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadCode(TransformPass):
    """Deletes nodes that no graph output depends on, and bypasses `identity` nodes (dropout).

    Graph inputs are kept even when unused, so the model's signature does not change.
    Guarantees: every remaining non-input node reaches an output.
    """

    name: ClassVar[str] = "dead_code"
    exact: ClassVar[bool] = True
    remove_identity: bool = True
    preserves: ClassVar[frozenset[str] | None] = frozenset({"shape_inference"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if self.remove_identity:
            for node in graph.by_kind("identity"):
                if not ctx.is_selected(node.id):
                    continue
                graph.replace_uses((node.id, 0), graph.operands(node.id)[0])
        live: set[str] = set()
        stack = list(graph.outputs)
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(graph.producers(n))
        for nid in reversed(graph.topo_order()):
            if nid not in live and nid not in graph.inputs:
                graph.remove_node(nid)
                result.removed.add(nid)
        result.changed = bool(result.removed)
        return result
