"""A pass defined outside netsqueeze, registered, and run through `compile()`.

Run it: `.venv/bin/python examples/custom_pass.py`. It zeroes the smallest weights of the
selected linear and conv layers (unstructured magnitude pruning) and reports the sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.passes.fold_bn import FoldBN


@ns.register_pass
@dataclass(frozen=True)
class MagnitudeSparsify(ns.TransformPass):
    """Zeroes the `fraction` smallest-magnitude weights of each selected linear/conv layer.

    Needs: nothing. Guarantees: shapes unchanged; each touched layer's weight has at least
    `fraction` zeros. Options are dataclass fields, so policies can call it by name:
    `magnitude_sparsify on type(linear) { fraction = 50% }`.
    """

    name: ClassVar[str] = "magnitude_sparsify"
    fraction: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})

    def run(self, graph: ns.Graph, ctx: ns.PassContext) -> ns.PassResult:
        result = ns.PassResult()
        zeros = total = 0
        for node in graph.nodes():
            if node.kind not in ("linear", "conv") or not ctx.is_selected(node.id):
                continue
            w = node.dense("weight")  # a located error if an earlier pass stored it encoded
            k = int(self.fraction * w.numel())
            if k == 0:
                continue
            cut = w.abs().flatten().kthvalue(k).values
            node.params["weight"] = torch.where(w.abs() <= cut, torch.zeros_like(w), w)
            zeros += int((node.params["weight"] == 0).sum())
            total += w.numel()
            result.touched.add(node.id)
        result.changed = bool(result.touched)
        result.metrics["sparsity"] = zeros / max(1, total)
        result.notes.append(f"sparsity {zeros / max(1, total):.1%} over {len(result.touched)} layers")
        return result


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()
    return model, (torch.randn(4, 1, 8, 8),)


def main() -> ns.CompileResult:
    model, inputs = build()
    result = ns.compile(model, [FoldBN(), MagnitudeSparsify(fraction=0.5)], example_inputs=inputs)
    print(result.report)
    return result


if __name__ == "__main__":
    main()
