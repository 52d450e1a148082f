"""`shape_inference`: (re)computes every node's output shapes and dtypes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from netsqueeze.ir.graph import Graph, TensorMeta
from netsqueeze.passes.base import AnalysisPass, PassContext
from netsqueeze.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class ShapeInference(AnalysisPass[dict[str, list[TensorMeta]]]):
    """Infers shapes and dtypes of every value from the graph inputs down.

    Needs: input nodes with shapes. Guarantees: every node's `meta` is current; returns the
    side table node id -> output metas.
    """

    name: ClassVar[str] = "shape_inference"

    def compute(self, graph: Graph, ctx: PassContext) -> dict[str, list[TensorMeta]]:
        graph.infer_shapes()
        return {n.id: list(n.meta) for n in graph.nodes()}
