"""`store`: the policy's choice of weight storage format for the compressed model file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import register_pass

STORE_KEY = "store"


@register_pass
@dataclass(frozen=True)
class Store(TransformPass):
    """Chooses how `compile()` encodes the compressed model file (HAM, sHAM, CSR or dense weights; see
    `netsqueeze.backends.storage`), as `compile(store=...)` does: the compile then fills
    `result.stored` and `report.storage` (ψ), and `netsqueeze compile -o model.nsq` writes the file.
    The graph itself is unchanged; a `store=` argument to `compile()` overrides the policy. The last
    `store` statement of a policy wins."""

    name: ClassVar[str] = "store"
    preserves: ClassVar[frozenset[str] | None] = None
    format: Literal["ham", "sham", "csr", "dense"] = "sham"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.meta[STORE_KEY] = self.format
        return PassResult(changed=False, notes=[f"compressed model file: {self.format} weights"])
