"""The IR: a `Graph` of `Node`s over a networkx MultiDiGraph, with operand order on edge keys."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from netsqueeze.errors import Diagnostic, VerifyError, did_you_mean
from netsqueeze.ir.dims import fmt
from netsqueeze.ir.weights import Weight, clone, require_dense

# graph meta: how a captured torch model nests its outputs (torch pytree spec, serialized), for the emitted module
OUTPUT_TREE = "output_tree"


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor. Sizes are the example's; a dim that is dynamic in the source is a
    `Dim` (an int carrying its expression over the named dynamic dims, see `ir.dims`)."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def numel(self) -> int:
        """The example's element count, a plain int (`Dim`s multiply through sympy: FLOPs counts stay off it)."""
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def symbolic(self) -> str:
        """Like `str`, with dynamic dims by their expression: 'float32[batch, 16, H/2, W/2]'."""
        return f"{self.dtype}[{fmt(self.shape)}]"


@dataclass
class Origin:
    """Where a node came from: for diagnostics and for re-emitting opaque ops verbatim."""

    frontend: str = ""  # "fx", "onnx", "pass:<name>"
    source_name: str = ""  # the module path or ONNX node name
    op_type: str = ""  # aten target, module class, or ONNX op type
    payload: Any = None  # opaque ops: a torch callable or an onnx NodeProto / graphsurgeon node


@dataclass
class Node:
    """One operation. `meta` holds one `TensorMeta` per output, filled by shape inference."""

    id: str
    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Weight] = field(default_factory=dict)  # dense tensors or encoded weights
    meta: list[TensorMeta] = field(default_factory=list)
    origin: Origin = field(default_factory=Origin)
    order: int = 0  # creation order: the deterministic tie-break everywhere

    @property
    def num_outputs(self) -> int:
        return max(1, len(self.meta))

    def dense(self, name: str, *, accept: frozenset[str] = frozenset()) -> torch.Tensor:
        """Param `name` as a dense tensor for arithmetic. An encoded param is a located `WeightFormError`
        unless its form is in `accept` (then it is decoded: the caller computes on a decoded copy)."""
        return require_dense(self.params[name], node=self.id, param=name, accept=accept)


Value = tuple[str, int]  # (producer node id, output index)


class Graph:
    """A dataflow graph. Edge key = consumer input port; edge attr `out` = producer output index.

    Graph inputs are nodes of kind `input`; graph outputs are nodes of kind `output` with
    one operand each, in `self.outputs` order. Passes use these methods, never `self.nx`.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.nx: nx.MultiDiGraph = nx.MultiDiGraph()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self._counter = 0
        self.meta: dict[str, Any] = {}  # graph-level facts: source frontend, opset, OUTPUT_TREE, ...

    # ---- construction -------------------------------------------------------------
    def add_node(
        self,
        id: str,
        kind: str,
        inputs: Iterable[Value | str] = (),
        *,
        attrs: dict[str, Any] | None = None,
        params: Mapping[str, Weight] | None = None,
        origin: Origin | None = None,
        unique: bool = False,
    ) -> str:
        """Adds a node fed by `inputs` (operand order = list order) and returns its id.

        With `unique=True` an id that is taken gets a numeric suffix instead of an error.
        """
        if unique:
            id = self.fresh_id(id)
        elif id in self.nx:
            raise VerifyError(Diagnostic(f"duplicate node id '{id}'", node=id))
        node = Node(id, kind, dict(attrs or {}), dict(params or {}), [], origin or Origin(), self._counter)
        self._counter += 1
        self.nx.add_node(id, node=node)
        for port, v in enumerate(inputs):
            src, out = (v, 0) if isinstance(v, str) else v
            self.connect(src, id, port, out)
        if kind == "input":
            self.inputs.append(id)
        elif kind == "output":
            self.outputs.append(id)
        return id

    def fresh_id(self, base: str) -> str:
        if base not in self.nx:
            return base
        i = 1
        while f"{base}_{i}" in self.nx:
            i += 1
        return f"{base}_{i}"

    def connect(self, src: str, dst: str, port: int, out: int = 0) -> None:
        for n in (src, dst):
            if n not in self.nx:
                raise VerifyError(Diagnostic(f"edge refers to unknown node '{n}'", node=dst))
        if self.nx.has_edge(src, dst, key=port) or any(p == port for _, _, p in self.nx.in_edges(dst, keys=True)):
            raise VerifyError(Diagnostic(f"input port {port} of '{dst}' is already connected", node=dst))
        self.nx.add_edge(src, dst, key=port, out=out)

    def disconnect(self, dst: str, port: int) -> Value:
        for s, _, k, d in list(self.nx.in_edges(dst, keys=True, data=True)):
            if k == port:
                self.nx.remove_edge(s, dst, key=k)
                return (s, int(d["out"]))
        raise VerifyError(Diagnostic(f"input port {port} of '{dst}' is not connected", node=dst))

    def set_operand(self, dst: str, port: int, value: Value) -> None:
        self.disconnect(dst, port)
        self.connect(value[0], dst, port, value[1])

    def set_operands(self, dst: str, values: Iterable[Value]) -> None:
        for s, _, k in list(self.nx.in_edges(dst, keys=True)):
            self.nx.remove_edge(s, dst, key=k)
        for port, (s, o) in enumerate(values):
            self.connect(s, dst, port, o)

    def remove_node(self, id: str) -> None:
        if self.users(id):
            raise VerifyError(Diagnostic(f"cannot remove '{id}': it still has users", node=id))
        self.nx.remove_node(id)
        if id in self.inputs:
            self.inputs.remove(id)
        if id in self.outputs:
            self.outputs.remove(id)

    def replace_uses(self, old: Value, new: Value) -> None:
        """Points every consumer of `old` at `new` instead."""
        for dst, port, out in self.users(old[0]):
            if out == old[1] and dst != new[0]:
                self.set_operand(dst, port, new)

    # ---- queries ------------------------------------------------------------------
    def __contains__(self, id: object) -> bool:
        return id in self.nx

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def node(self, id: str) -> Node:
        try:
            return self.nx.nodes[id]["node"]  # type: ignore[no-any-return]
        except KeyError:
            raise VerifyError(
                Diagnostic(f"no node '{id}' in the graph{did_you_mean(id, self.nx.nodes)}", node=id)
            ) from None

    def nodes(self) -> list[Node]:
        """All nodes in a deterministic topological order."""
        return [self.node(n) for n in self.topo_order()]

    def operands(self, id: str) -> list[Value]:
        edges = sorted(self.nx.in_edges(id, keys=True, data=True), key=lambda e: e[2])
        return [(s, int(d["out"])) for s, _, _, d in edges]

    def users(self, id: str) -> list[tuple[str, int, int]]:
        """(consumer id, input port, producer output index), sorted by consumer order then port."""
        edges = [(d, k, int(a["out"])) for _, d, k, a in self.nx.out_edges(id, keys=True, data=True)]
        return sorted(edges, key=lambda e: (self.node(e[0]).order, e[1]))

    def value_users(self, value: Value) -> list[tuple[str, int]]:
        return [(d, p) for d, p, o in self.users(value[0]) if o == value[1]]

    def producers(self, id: str) -> list[str]:
        return sorted({s for s, _ in self.operands(id)}, key=lambda n: self.node(n).order)

    def consumers(self, id: str) -> list[str]:
        return sorted({d for d, _, _ in self.users(id)}, key=lambda n: self.node(n).order)

    def meta_of(self, value: Value) -> TensorMeta:
        node = self.node(value[0])
        if value[1] >= len(node.meta):
            raise VerifyError(Diagnostic(f"output {value[1]} of '{node.id}' has no shape yet", node=node.id))
        return node.meta[value[1]]

    def input_metas(self, id: str) -> list[TensorMeta]:
        return [self.meta_of(v) for v in self.operands(id)]

    def topo_order(self) -> list[str]:
        try:
            return list(nx.lexicographical_topological_sort(self.nx, key=lambda n: self.node(n).order))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(self.nx)
            names = " -> ".join(str(e[0]) for e in cycle)
            raise VerifyError(Diagnostic(f"graph has a cycle: {names}", node=str(cycle[0][0]))) from None

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes())

    def by_kind(self, *kinds: str) -> list[Node]:
        return [n for n in self.nodes() if n.kind in kinds]

    def output_values(self) -> list[Value]:
        return [self.operands(o)[0] for o in self.outputs]

    # ---- whole-graph operations -------------------------------------------------------
    def copy(self) -> Graph:
        """A deep copy: params are cloned, so passes on the copy never touch the original."""
        g = Graph(self.name)
        g.nx = nx.MultiDiGraph()
        for n, data in self.nx.nodes(data=True):
            node: Node = data["node"]
            payload = node.origin.payload
            new = Node(
                node.id,
                node.kind,
                copy.deepcopy(node.attrs),
                {k: clone(v) for k, v in node.params.items()},
                list(node.meta),
                Origin(node.origin.frontend, node.origin.source_name, node.origin.op_type, payload),
                node.order,
            )
            g.nx.add_node(n, node=new)
        for s, d, k, a in self.nx.edges(keys=True, data=True):
            g.nx.add_edge(s, d, key=k, out=a["out"])
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g._counter = self._counter
        g.meta = copy.deepcopy(self.meta)
        return g

    def assign(self, other: Graph) -> None:
        """Replaces this graph's contents with `other`'s, in place (a pass keeping the better of two candidates)."""
        g = other.copy()
        self.name, self.nx, self.inputs, self.outputs = g.name, g.nx, g.inputs, g.outputs
        self._counter, self.meta = g._counter, g.meta

    def verify(self) -> None:
        from netsqueeze.ir.verify import verify

        verify(self)

    def infer_shapes(self) -> None:
        from netsqueeze.ir.ops import infer_shapes

        infer_shapes(self)

    def __str__(self) -> str:
        from netsqueeze.ir.printer import print_graph

        return print_graph(self)
