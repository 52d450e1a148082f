"""`fold_bn`: folds inference-mode BatchNorm into the preceding conv, conv_transpose or linear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import attr, spec
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import batch_norm_scale


@register_pass
@dataclass(frozen=True)
class FoldBN(TransformPass):
    """Folds y = γ·(Wx + b − μ)/√(σ²+ε) + β into W' = s·W, b' = s·(b − μ) + β with s = γ/√(σ²+ε).

    Exact up to float rounding (computed in float64). Applies when the BatchNorm's only
    operand is a producer output that nothing else reads and the channel axis is the
    producer's output-channel axis (conv: axis 1; linear: only for rank-2 outputs).
    Selected nodes are the BatchNorms to fold (default: all). Guarantees: each folded
    BatchNorm is gone and its producer has a bias.
    """

    name: ClassVar[str] = "fold_bn"
    exact: ClassVar[bool] = True
    preserves: ClassVar[frozenset[str] | None] = frozenset({"shape_inference"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for bn in graph.by_kind("batch_norm"):
            if not ctx.is_selected(bn.id):
                continue
            src, out = graph.operands(bn.id)[0]
            prod = graph.node(src)
            # a producer whose weight has a bias along its output axis (conv, conv_transpose, linear)
            out_axis = spec(prod.kind).bias.get("weight", ("", -1))[1]
            if out_axis < 0 or len(graph.users(src)) != 1:
                continue
            if prod.kind == "linear" and len(prod.meta[0].shape) != 2:
                continue
            if out_axis != 0 and attr(prod, "groups") != 1:  # grouped conv_transpose: out channels per group
                continue
            p, q = prod.params, bn.params
            w = prod.dense("weight").double()
            dt = p["weight"].dtype
            s = batch_norm_scale(bn)
            beta = bn.dense("bias").double() if "bias" in q else torch.zeros_like(s)
            b = prod.dense("bias").double() if "bias" in p else torch.zeros_like(s)
            shape = [1] * w.dim()
            shape[out_axis] = -1
            p["weight"] = (w * s.reshape(shape)).to(dt)
            p["bias"] = (s * (b - bn.dense("running_mean").double()) + beta).to(dt)
            graph.replace_uses((bn.id, 0), (src, out))
            graph.remove_node(bn.id)
            result.removed.add(bn.id)
            result.touched.add(src)
        result.changed = bool(result.removed)
        return result
