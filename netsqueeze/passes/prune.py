"""`prune`: unstructured magnitude pruning of conv/linear weights, per layer or global, to a sparsity or a
bytes budget; pruned weights are stored sparse (CSR)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from netsqueeze.errors import BudgetError, Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.stats import graph_stats
from netsqueeze.ir.weights import Sparse, Weight, graph_weight_bytes
from netsqueeze.passes.allocation import Budget, bisect_int
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import register_pass

# the ops whose `weight` holds the connections unstructured pruning removes
WEIGHTED = ("conv", "conv_transpose", "linear")


def weighted_nodes(graph: Graph, ctx: PassContext, pass_name: str) -> list[Node]:
    """The selected conv/linear nodes with a `weight`, in graph order; a selection that names none of them
    is an error naming the pass."""
    nodes = [n for n in graph.nodes() if n.kind in WEIGHTED and "weight" in n.params and ctx.is_selected(n.id)]
    if not nodes and ctx.selected is not None:
        raise NetsqueezeError(Diagnostic(
            f"{pass_name}: the selected nodes have no conv or linear weight (selected: "
            f"{', '.join(sorted(ctx.selected)[:5]) or 'none'})"))
    return nodes


def magnitude_order(w: torch.Tensor) -> torch.Tensor:
    """Flat positions of `w` by increasing |w|, ties by position (a stable sort): the first k are the
    k weights at or below the percentile that pruning k of them cuts at."""
    return torch.sort(w.detach().reshape(-1).abs().to(torch.float64), stable=True).indices


def pruned(w: torch.Tensor, order: torch.Tensor, count: int) -> torch.Tensor:
    """`w` with the first `count` positions of `order` set to zero."""
    flat = w.detach().reshape(-1).clone()
    flat[order[:count]] = 0
    return flat.reshape(w.shape)


@register_pass
@dataclass(frozen=True)
class Prune(TransformPass):
    """Unstructured magnitude pruning (Han et al., "Learning both weights and connections", NeurIPS 2015;
    the pruning step of Marinò et al., "Compression strategies and space-conscious representations for
    deep neural networks", ICPR 2020).

    Needs: nothing but the weights (no calibration data). Acts on the `weight` of every selected conv,
    conv_transpose and linear node, dense or already sparse; a weight that is already shared or quantized
    is a located `WeightFormError` (prune before `share_weights` / quantization).

    Target: `sparsity` (the fraction of a weight's entries that are zero afterwards, zeros already there
    included), or else the policy's `budget bytes <= X%`, met by bisection on the sparsity (`scope =
    layer`) or on the global count (`scope = global`), each candidate measured by its exact stored size.
    `scope = layer` removes, in every layer, the ⌊sparsity·n⌉ entries of smallest |w| (the paper's cut at
    the p-th percentile of |W|, ties broken by position so the count is exact); `scope = global` ranks
    |w| across all selected layers with one threshold.

    Guarantees: every pruned weight is a `Sparse` CSR weight (values + column indices + row pointers over
    a [shape[0], -1] view) whose non-zeros are exactly the kept entries, unchanged; biases untouched.
    """

    name: ClassVar[str] = "prune"
    sparsity: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio",
                                                            "doc": "fraction of each weight set to zero"})
    scope: Literal["layer", "global"] = "layer"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = weighted_nodes(graph, ctx, self.name)
        budget = Budget.of(ctx)
        if self.sparsity is None:
            if not budget:
                raise NetsqueezeError(Diagnostic("prune: needs a `sparsity` or a `budget bytes` in the policy"))
            if "bytes" not in budget.limits:
                raise BudgetError(Diagnostic(
                    f"prune cannot meet the budget {budget}: unstructured pruning changes neither FLOPs nor the "
                    "parameter count, only the stored bytes (`budget bytes <= X%`)"))
        if not nodes:
            return PassResult(changed=False, notes=["no conv or linear weight to prune"])
        weights = {n.id: n.dense("weight", accept=frozenset({"sparse"})) for n in nodes}
        orders = {nid: magnitude_order(w) for nid, w in weights.items()}
        sizes = {nid: w.numel() for nid, w in weights.items()}
        if self.sparsity is not None:
            counts = self._counts(self.sparsity, weights, orders)
        else:
            counts = self._budget(graph, ctx, budget, weights, orders)
        result = PassResult(changed=True)
        zeros = 0
        for n in nodes:
            sp = Sparse.from_dense(pruned(weights[n.id], orders[n.id], counts[n.id]), "csr")
            n.params["weight"] = sp
            zeros += sizes[n.id] - sp.nnz()
            result.touched.add(n.id)
        total = sum(sizes.values())
        result.metrics["sparsity"] = zeros / max(1, total)
        result.notes.append(f"{len(nodes)} weights pruned to {zeros / max(1, total):.2%} zeros "
                            f"({total - zeros:,} of {total:,} kept)")
        return result

    def _counts(self, sparsity: float, weights: dict[str, torch.Tensor],
                orders: dict[str, torch.Tensor]) -> dict[str, int]:
        """Entries to zero per weight for a sparsity: per layer, or by one global magnitude threshold."""
        if self.scope == "layer":
            return {nid: round(sparsity * w.numel()) for nid, w in weights.items()}
        return self._global_counts(round(sparsity * sum(w.numel() for w in weights.values())), weights, orders)

    @staticmethod
    def _global_counts(count: int, weights: dict[str, torch.Tensor],
                       orders: dict[str, torch.Tensor]) -> dict[str, int]:
        """The `count` smallest |w| over all weights (ties by layer order, then position), split per weight."""
        ids = list(weights)
        mags = torch.cat([weights[nid].detach().reshape(-1).abs().to(torch.float64) for nid in ids])
        owner = torch.cat([torch.full((weights[nid].numel(),), i, dtype=torch.int64) for i, nid in enumerate(ids)])
        chosen = owner[torch.sort(mags, stable=True).indices[:count]]
        per = torch.bincount(chosen, minlength=len(ids))
        return {nid: int(per[i]) for i, nid in enumerate(ids)}

    def _budget(self, graph: Graph, ctx: PassContext, budget: Budget, weights: dict[str, torch.Tensor],
                orders: dict[str, torch.Tensor]) -> dict[str, int]:
        """The smallest pruning (bisection) whose graph meets `budget bytes`, measured exactly."""
        base = max(1, graph_stats(ctx.original or graph).param_bytes)
        others: list[Weight] = [w for n in graph.nodes() for k, w in n.params.items()
                                if not (n.id in weights and k == "weight")]
        total = sum(w.numel() for w in weights.values())
        steps = total if self.scope == "global" else 100_000

        def counts(t: int) -> dict[str, int]:
            if self.scope == "global":
                return self._global_counts(t, weights, orders)
            return self._counts(t / steps, weights, orders)

        def reached(t: int) -> float:
            cand = [Sparse.from_dense(pruned(weights[nid], orders[nid], c), "csr") for nid, c in counts(t).items()]
            return graph_weight_bytes([*others, *cand]) / base

        limit = budget.limits["bytes"]
        top = reached(steps)
        if top > limit + 1e-12:
            raise BudgetError(Diagnostic(
                f"prune cannot meet the budget {budget}: pruning every selected weight reaches bytes {top:.1%} "
                "of the original", node=next(iter(weights))))
        if reached(0) <= limit + 1e-12:
            return counts(0)
        return counts(bisect_int(steps, 0, lambda t: reached(t) <= limit + 1e-12))
