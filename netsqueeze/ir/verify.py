"""`Graph.verify()`: structure, operand arity, shapes and param/attr consistency."""

from __future__ import annotations

from netsqueeze.errors import Diagnostic, VerifyError, did_you_mean
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import OPS, REQUIRED, infer_node


def verify(graph: Graph) -> None:
    """Raises `VerifyError` (all problems at once, each naming its node) unless the graph is sound.

    Re-infers every node's shapes and compares them with the recorded `meta`, so a pass that
    changed params without propagating shapes is caught here.
    """
    problems: list[Diagnostic] = []
    order = graph.topo_order()  # raises on cycles
    for nid in order:
        node = graph.node(nid)
        if node.kind not in OPS:
            problems.append(Diagnostic(f"unknown op kind '{node.kind}'", node=nid))
            continue
        ports = sorted(k for _, _, k in graph.nx.in_edges(nid, keys=True))
        if ports != list(range(len(ports))):
            problems.append(Diagnostic(f"'{nid}' has gaps in its input ports {ports}", node=nid))
            continue
        for src, out in graph.operands(nid):
            if out >= graph.node(src).num_outputs:
                problems.append(Diagnostic(f"'{nid}' reads output {out} of '{src}', which has "
                                           f"{graph.node(src).num_outputs}", node=nid))
        if node.kind == "output" and graph.users(nid):
            problems.append(Diagnostic(f"output node '{nid}' has users", node=nid))
        schema = OPS[node.kind].attrs
        if schema is not None:
            for a in sorted(node.attrs):
                if a not in schema and not a.startswith("_"):
                    problems.append(Diagnostic(f"{node.kind} '{nid}' has unknown attribute '{a}'"
                                               f"{did_you_mean(a, schema)}", node=nid))
            for a, default in schema.items():
                if default is REQUIRED and a not in node.attrs:
                    problems.append(Diagnostic(f"{node.kind} '{nid}' is missing attribute '{a}'", node=nid))
        try:
            metas = infer_node(graph, node)
        except VerifyError as e:
            problems.extend(e.diagnostics)
            continue
        if node.meta and metas != node.meta:
            problems.append(Diagnostic(
                f"'{nid}' records shapes {[str(m) for m in node.meta]} but infers {[str(m) for m in metas]}",
                node=nid))
    for nid in graph.inputs:
        if graph.node(nid).kind != "input":
            problems.append(Diagnostic(f"graph input '{nid}' is not an input node", node=nid))
    if not graph.outputs:
        problems.append(Diagnostic("graph has no outputs"))
    for nid in order:
        node = graph.node(nid)
        if node.kind == "input" and nid not in graph.inputs:
            problems.append(Diagnostic(f"input node '{nid}' is not listed as a graph input", node=nid))
        if node.kind == "output" and nid not in graph.outputs:
            problems.append(Diagnostic(f"output node '{nid}' is not listed as a graph output", node=nid))
    if problems:
        raise VerifyError(problems)
