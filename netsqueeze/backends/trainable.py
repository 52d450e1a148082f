"""A differentiable run of an IR graph in torch, for passes that train weights (`recover`).

The compiler hands it to passes as `PassContext.trainable`; passes cannot import backends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.func import functional_call

from netsqueeze.backends.torch import NODE_PATHS, to_torch
from netsqueeze.errors import Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.weights import Encoded

ParamKey = tuple[str, str]  # (node id, param name)


class GraphFunction:
    """`fn(params, inputs)`: the outputs of `graph` on `inputs`, with `params[(node id, param name)]` (dense
    tensors; gradients flow through them) in place of those params. Every other param keeps its value and
    takes no gradient. The graph runs as emitted for inference (batch norms read their running statistics,
    dropout is off), so training the given params changes nothing else. Encoded params are decoded once:
    the caller that trains one supplies its dense value computed from whatever it trains."""

    def __init__(self, graph: Graph) -> None:
        plain = graph.copy()
        for node in plain.nodes():
            for k, w in list(node.params.items()):
                if isinstance(w, Encoded):
                    node.params[k] = w.dense()
        self.module = to_torch(plain)
        for t in self.module.parameters():
            t.requires_grad_(False)
        paths: dict[str, str] = self.module.meta[NODE_PATHS]
        state = dict(self.module.named_parameters())
        self.slots: dict[ParamKey, str] = {}
        for node in plain.nodes():
            for k in node.params:
                target = f"{paths[node.id]}.{k}" if node.id in paths else ""
                if target in state and state[target].is_floating_point():
                    self.slots[(node.id, k)] = target

    def addressable(self) -> frozenset[ParamKey]:
        """The (node, param) pairs `params` may name: every floating-point param a torch layer holds as a
        parameter (not buffers such as running statistics or constants)."""
        return frozenset(self.slots)

    def __call__(self, params: Mapping[ParamKey, torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        unknown = sorted(set(params) - set(self.slots))
        if unknown:
            node, name = unknown[0]
            raise NetsqueezeError(Diagnostic(f"param '{name}' of node '{node}' cannot be trained: the emitted torch "
                                             "model holds it as a buffer or not at all", node=node))
        out = functional_call(self.module, {self.slots[k]: v for k, v in params.items()}, tuple(inputs),
                              strict=False)
        return list(out) if isinstance(out, tuple) else [out]


def trainable(graph: Graph) -> GraphFunction:
    return GraphFunction(graph)
