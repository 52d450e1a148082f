"""Deterministic text form of a graph, used by `str(graph)`, `netsqueeze inspect` and golden tests."""

from __future__ import annotations

from typing import Any

import torch

from netsqueeze.ir.graph import Graph
from netsqueeze.ir.weights import describe, form_of


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}"
    return str(v)


def print_graph(graph: Graph) -> str:
    lines = [f"graph {graph.name} ({', '.join(graph.inputs)}) -> ({', '.join(graph.outputs)}) {{"]
    for node in graph.nodes():
        ops = ", ".join(f"%{s}" + (f"#{o}" if o else "") for s, o in graph.operands(node.id))
        attrs = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(node.attrs.items()) if not k.startswith("_"))
        params = ", ".join(f"{k}:{list(t.shape)}" + ("" if form_of(t) == "dense" else f" {describe(t)}")
                           for k, t in sorted(node.params.items()))
        outs = ", ".join(str(m) for m in node.meta) or "?"
        head = f"  %{node.id}: {outs} = {node.kind}({ops})"
        extras = [x for x in (f"{{{attrs}}}" if attrs else "", f"<{params}>" if params else "") if x]
        if node.kind == "opaque":
            extras.append(f"[{node.origin.op_type}]")
        lines.append(" ".join([head, *extras]))
    lines.append("}")
    return "\n".join(lines)
