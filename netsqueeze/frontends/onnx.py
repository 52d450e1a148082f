"""ONNX frontend: a model file or `onnx.ModelProto`, read through onnx-graphsurgeon, becomes an `ir.Graph`;
constant subgraphs are folded into params, unknown ops become opaque nodes re-emitted verbatim."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from onnx import helper

from netsqueeze.errors import CaptureError, Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph, Origin, TensorMeta, Value
from netsqueeze.ir.ops import infer_node
from netsqueeze.ir.tables import registrar
from netsqueeze.ir.weights import (
    SPARSE_LAYOUT_KEY,
    Affine,
    Centroids,
    Codebook,
    Encoded,
    Sparse,
    WeightFormError,
)

MIN_OPSET, MAX_OPSET = 7, 23
_DEFAULT_DOMAINS = ("", "ai.onnx")

# Any default-domain op whose inputs are all constants is evaluated at import, except these: random ops
# (not deterministic) and Q/DQ (their placement is the quantisation recipe, so they stay nodes).
_NOT_FOLDABLE = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan",
})


def onnx_dtype_name(elem_type: int) -> str:
    """ONNX element type → IR dtype name (torch's spelling: float32, int64, ...)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    return "bfloat16" if elem_type == onnx.TensorProto.BFLOAT16 else str(np.dtype(np_dtype))


def _fail(msg: str, node: str | None = None) -> CaptureError:
    return CaptureError(Diagnostic(msg, node=node))


def load_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Reads a model without ever writing to its file; a given ModelProto is only read, never changed."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise _fail(f"cannot read ONNX model '{path}': no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        proto = onnx.load_from_string(data)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            onnx.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-ish and others for corrupt files
        raise _fail(f"cannot parse ONNX model '{path}': the file is malformed or truncated "
                    f"({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise _fail(f"cannot parse ONNX model '{path}': the file is malformed or truncated (it holds no graph)")
    return proto


def model_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    # IR version 3 files without opset_import mean opset 1; treat as unsupported below.
    return 1


def _node_ids(proto: onnx.ModelProto, reserved: set[str]) -> list[str]:
    """ONNX node names, made unique: a missing name becomes `<OpType>_<index>`, a repeat gets `_1`, `_2`, ..."""
    taken = set(reserved)
    ids = []
    for i, n in enumerate(proto.graph.node):
        base = n.name or f"{n.op_type}_{i}"
        nid, k = base, 1
        while nid in taken:
            nid, k = f"{base}_{k}", k + 1
        taken.add(nid)
        ids.append(nid)
    return ids


def check_structure(proto: onnx.ModelProto, ids: list[str]) -> list[int]:
    """Dangling inputs and cycles are errors naming the node; returns a topological order of node indices."""
    g = proto.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""} \
        | {t.values.name for t in g.sparse_initializer}
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = i
    for i, n in enumerate(g.node):
        for t in n.input:
            if t not in available and t not in producer:
                raise _fail(f"node '{ids[i]}' ({n.op_type}) reads tensor '{t}', which no node, initializer "
                            f"or graph input produces", node=ids[i])
    for o in g.output:
        if o.name not in available and o.name not in producer:
            raise _fail(f"graph output '{o.name}' is not produced by any node")
    deps = [sorted({producer[t] for t in n.input if t in producer and t not in available}) for n in g.node]
    users: list[list[int]] = [[] for _ in g.node]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    indeg = [len(d) for d in deps]
    ready = [i for i, d in enumerate(indeg) if d == 0]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) < len(g.node):
        left = {i for i in range(len(g.node)) if indeg[i] > 0}
        # Walk producer links inside the unresolved set until a node repeats: that is a cycle.
        path: list[int] = []
        seen: dict[int, int] = {}
        cur = min(left)
        while cur not in seen:
            seen[cur] = len(path)
            path.append(cur)
            cur = next(d for d in deps[cur] if d in left)
        cycle = list(reversed(path[seen[cur]:]))
        k = cycle.index(min(cycle))  # start at the node that comes first in the file: deterministic
        cycle = cycle[k:] + cycle[:k]
        names = " -> ".join(ids[i] for i in [*cycle, cycle[0]])
        raise _fail(f"graph has a cycle: {names}", node=ids[cycle[0]])
    return order


def _static_shape(vi: onnx.ValueInfoProto, given: tuple[int, ...] | None) -> tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    if given is None and not vi.type.tensor_type.HasField("shape"):
        raise _fail(f"model input '{vi.name}' declares no shape; pass input_shapes={{'{vi.name}': (...)}}")
    if given is not None:
        if vi.type.tensor_type.HasField("shape") and len(given) != len(dims):
            raise _fail(f"input_shapes['{vi.name}'] has rank {len(given)} but the model input has rank {len(dims)}")
        return tuple(int(d) for d in given)
    # A symbolic dim (batch, sequence) is taken as 1: shapes in the IR are concrete.
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)


class _Importer:
    """Walks the graphsurgeon nodes in topological order, emitting IR nodes and folding constants."""

    def __init__(self, proto: onnx.ModelProto, name: str, input_shapes: dict[str, tuple[int, ...]]) -> None:
        self.proto = proto
        self.opset = model_opset(proto)
        self.graph = Graph(name)
        self.vals: dict[str, Value] = {}
        self.consts: dict[str, Any] = {}  # tensor name → np.ndarray, or an Encoded weight (QDQ, sparse, codebook)
        self.centroids: dict[str, Centroids] = {}  # codebook tables by tensor name: shared tables stay shared
        self.input_shapes = input_shapes
        self.skip: set[int] = set()
        self.fused: dict[int, Callable[[], None]] = {}
        self.value_info: dict[str, TensorMeta] = {}
        self.owned: dict[int, str] = {}  # id(array) → name: arrays made at import, not yet handed to a node
        self.cur_id = ""
        self.cur_op = ""
        self.nodes: list[Any] = []  # graphsurgeon nodes, in file order
        self.ids: list[str] = []
        self.reserved: set[str] = set()
        self.protos: list[onnx.NodeProto] = []

    # ---- helpers used by the op handlers ----------------------------------------------------
    def const(self, t: gs.Tensor) -> Any:
        """The constant value of `t` (an ndarray or an `Encoded` weight), or None."""
        if t.name in self.consts:
            return self.consts[t.name]
        if isinstance(t, gs.Constant):
            arr = np.asarray(t.values)
            self.consts[t.name] = arr
            self.owned[id(arr)] = t.name
            return arr
        return None

    def take(self, arr: np.ndarray | torch.Tensor | Encoded) -> torch.Tensor | Encoded:
        """A torch tensor for a param: the first user of an import-made array gets it without a copy."""
        if isinstance(arr, (torch.Tensor, Encoded)):
            return arr
        return _to_torch(arr, owned=self.owned.pop(id(arr), None) is not None)

    def is_const(self, t: gs.Tensor) -> bool:
        return self.const(t) is not None

    def value(self, t: gs.Tensor) -> Value:
        """The IR value of a tensor; constants become (shared) constant nodes on first use."""
        if t.name in self.vals:
            return self.vals[t.name]
        arr = self.const(t)
        if arr is None:
            raise _fail(f"node '{self.cur_id}' ({self.cur_op}) reads '{t.name}', which is not defined",
                        node=self.cur_id)
        base = t.name or f"{self.cur_id}/const"
        if base in self.reserved:  # ONNX node names own their ids; a tensor of the same name yields
            base = f"{base}/value"
        nid = self.graph.add_node(base, "constant",
                                  params={"value": self.take(arr)},
                                  origin=Origin("onnx", t.name, "Constant"), unique=True)
        self._infer(nid)
        self.vals[t.name] = (nid, 0)
        return (nid, 0)

    def meta(self, t: gs.Tensor) -> TensorMeta:
        arr = self.const(t)
        if isinstance(arr, Encoded):
            return TensorMeta(arr.shape, str(arr.dtype).removeprefix("torch."))
        if arr is not None:
            return TensorMeta(tuple(arr.shape), str(arr.dtype))
        return self.graph.meta_of(self.value(t))

    def emit(self, kind: str, inputs: list[Value], attrs: dict[str, Any] | None = None,
             params: Mapping[str, Any] | None = None, *, suffix: str = "") -> Value:
        nid = self.cur_id + (f"/{suffix}" if suffix else "")
        ps = {k: self.take(v) for k, v in (params or {}).items()}
        nid = self.graph.add_node(nid, kind, inputs, attrs=attrs, params=ps,
                                  origin=Origin("onnx", self.cur_id, self.cur_op), unique=True)
        self._infer(nid)
        return (nid, 0)

    def _infer(self, nid: str) -> None:
        node = self.graph.node(nid)
        try:
            node.meta = infer_node(self.graph, node)
        except NetsqueezeError as e:
            raise _fail(f"node '{self.cur_id}' ({self.cur_op}): {e.message}", node=self.cur_id) from None

    # ---- the walk ---------------------------------------------------------------------------------
    def run(self) -> Graph:
        proto = self.proto
        opset = self.opset
        g = self.graph
        g.meta.update({"frontend": "onnx", "opset": opset, "producer": proto.producer_name,
                       "ir_version": int(proto.ir_version)})
        inits = {t.name for t in proto.graph.initializer}
        real_inputs = [i for i in proto.graph.input if i.name not in inits]
        unknown = set(self.input_shapes) - {i.name for i in real_inputs}
        if unknown:
            raise _fail(f"input_shapes names unknown inputs {sorted(unknown)}; the model's inputs are "
                        f"{[i.name for i in real_inputs]}")
        shapes = {i.name: _static_shape(i, self.input_shapes.get(i.name)) for i in real_inputs}
        ids = _node_ids(proto, {i.name for i in real_inputs})
        order = check_structure(proto, ids)
        self._shape_inference(shapes)

        for i in real_inputs:
            tt = i.type.tensor_type
            nid = g.add_node(i.name, "input", attrs={"shape": shapes[i.name], "dtype": onnx_dtype_name(tt.elem_type)},
                             origin=Origin("onnx", i.name, "input"))
            self._infer(nid)
            self.vals[i.name] = (nid, 0)

        self._sparse_initializers()
        gsg = gs.import_onnx(proto)
        nodes = list(gsg.nodes)
        protos = list(proto.graph.node)
        if len(nodes) != len(protos):
            raise _fail("onnx-graphsurgeon imported a different number of nodes than the file holds")
        self.nodes, self.ids, self.protos = nodes, ids, protos
        self.reserved = set(ids)
        self._find_patterns(order)
        for idx in order:
            if idx in self.skip:
                continue
            n, self.cur_id, self.cur_op = nodes[idx], ids[idx], nodes[idx].op
            if idx in self.fused:
                self.fused[idx]()
                continue
            if (n.domain or "") in _DEFAULT_DOMAINS and self._fold(n, protos[idx]):
                continue
            handler = HANDLERS.get(n.op) if (n.domain or "") in _DEFAULT_DOMAINS else None
            if handler is None or not handler(self, n):
                self._opaque(n, protos[idx])

        g.meta["input_names"] = [i.name for i in real_inputs]
        g.meta["output_names"] = [o.name for o in proto.graph.output]
        for o in proto.graph.output:
            self.cur_id, self.cur_op = o.name, "output"
            src = self.value(gs.Variable(o.name)) if o.name in self.vals else self._const_output(o.name, gsg)
            nid = g.add_node(o.name, "output", [src], origin=Origin("onnx", o.name, "output"), unique=True)
            self._infer(nid)
        _absorb_affine_into_bn(g)
        try:
            g.infer_shapes()
            g.verify()
        except NetsqueezeError as e:
            raise CaptureError(list(e.diagnostics)) from None
        return g

    def _sparse_initializers(self) -> None:
        """`sparse_initializer`s become sparse weights (COO, or the layout netsqueeze recorded when it wrote them)."""
        layouts = {p.key.removeprefix(SPARSE_LAYOUT_KEY): p.value for p in self.proto.metadata_props
                   if p.key.startswith(SPARSE_LAYOUT_KEY)}
        for sp in self.proto.graph.sparse_initializer:
            name = sp.values.name
            dims = tuple(int(d) for d in sp.dims)
            try:
                values = torch.from_numpy(np.array(onnx.numpy_helper.to_array(sp.values)).reshape(-1).copy())
                idx = np.asarray(onnx.numpy_helper.to_array(sp.indices), dtype=np.int64)
                if idx.ndim == 2:  # [nnz, rank] coordinates → flat positions
                    idx = np.ravel_multi_index(tuple(idx.T), dims)
                order = np.argsort(idx, kind="stable")
                w = Sparse(values[torch.from_numpy(order)], torch.from_numpy(idx[order].copy()), dims)
                layout = layouts.get(name, "coo").split(":")
                if layout[0] != "coo":
                    nm = [int(v) for v in layout[1:]] or [0, 0]
                    w = Sparse.from_dense(w.dense(), layout[0], nm[0], nm[1]) if layout[0] == "nm" else \
                        Sparse.from_dense(w.dense(), layout[0])
            except (ValueError, IndexError, WeightFormError) as e:
                raise _fail(f"sparse initializer '{name}' is malformed: {e}") from None
            self.consts[name] = w

    def _const_output(self, name: str, gsg: gs.Graph) -> Value:
        t = gsg.tensors().get(name)
        if t is None or self.const(t) is None:
            raise _fail(f"graph output '{name}' is not produced by any node")
        return self.value(t)

    def _shape_inference(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """ONNX shape inference at the fixed input shapes: output shapes of opaque nodes come from here."""
        m = skeleton(self.proto)
        for i in m.graph.input:
            if i.name in shapes:
                shape = i.type.tensor_type.shape
                shape.Clear()
                for v in shapes[i.name]:
                    shape.dim.add(dim_value=v)
        try:
            inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception:
            return  # opaque nodes then fail below with a precise message
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            if tt.elem_type and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                self.value_info[vi.name] = TensorMeta(tuple(d.dim_value for d in tt.shape.dim),
                                                      onnx_dtype_name(tt.elem_type))

    # ---- constant folding ---------------------------------------------------------------------
    def _fold(self, n: gs.Node, proto: onnx.NodeProto) -> bool:
        enc = _encoded_weight(self, n)
        if enc is not None:
            self.consts[n.outputs[0].name] = enc
            return True
        if n.op in _NOT_FOLDABLE:
            return False
        if n.op == "Shape":
            # Shapes are static in the IR, so Shape of any known tensor is a constant.
            if n.inputs[0].name not in self.vals and self.const(n.inputs[0]) is None:
                return False
            dims = np.array(self.meta(n.inputs[0]).shape, dtype=np.int64)
            start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
            self.consts[n.outputs[0].name] = dims[start:end if end is None else int(end)]
            return True
        ins = [t for t in n.inputs if t.name]
        if not all(self.is_const(t) for t in ins):
            return False
        if n.op == "ConstantOfShape":
            v = n.attrs.get("value")
            fill = np.asarray(v.values).reshape(-1) if v is not None else np.zeros(1, np.float32)
            shape = tuple(int(d) for d in self.consts[ins[0].name])
            self.consts[n.outputs[0].name] = np.full(shape, fill[0], dtype=fill.dtype)
            self.owned[id(self.consts[n.outputs[0].name])] = n.outputs[0].name
            return True
        if n.op in ("Identity", "Dropout"):
            self.consts[n.outputs[0].name] = self.consts[ins[0].name]
            return True
        if n.op == "Constant" and isinstance(n.attrs.get("value"), gs.Constant):
            arr = np.asarray(n.attrs["value"].values)
            self.consts[n.outputs[0].name] = arr
            self.owned[id(arr)] = n.outputs[0].name
            return True
        feeds = {t.name: _dense_np(self.consts[t.name]) for t in ins}
        try:
            outs = _evaluate(proto, feeds, self.opset)
        except Exception:
            return False
        for t, v in zip(n.outputs, outs):
            self.consts[t.name] = np.asarray(v)
        return True

    # ---- fallback --------------------------------------------------------------------------------
    def _opaque(self, n: gs.Node, proto: onnx.NodeProto) -> None:
        """Kept verbatim: payload holds what the ONNX backend needs to re-emit the node."""
        inputs = [t for t in n.inputs]
        while inputs and not inputs[-1].name:
            inputs.pop()
        if any(not t.name for t in inputs):
            raise _fail(f"node '{self.cur_id}' ({n.op}) skips an optional input in the middle; "
                        f"netsqueeze cannot keep such an unknown op", node=self.cur_id)
        outer = sorted(_outer_names(proto))
        if outer:
            raise _fail(f"node '{self.cur_id}' ({n.op}) reads {', '.join(repr(o) for o in outer[:3])} from the "
                        f"enclosing graph inside its subgraph; netsqueeze cannot keep such an op", node=self.cur_id)
        metas = []
        for t in n.outputs:
            if t.name not in self.value_info:
                raise _fail(f"node '{self.cur_id}' ({n.op}) is not a supported op and ONNX shape inference "
                            f"cannot tell the shape of its output '{t.name}'", node=self.cur_id)
            metas.append(self.value_info[t.name])
        payload_type = OnnxTorchOp if (n.domain or "") in _DEFAULT_DOMAINS and n.op in _TORCH_OPS else dict
        payload = payload_type({
            "op_type": n.op,
            "domain": n.domain or "",
            "attributes": [a.SerializeToString() for a in proto.attribute],
            "opset": self.opset,
            "domain_opset": next((int(i.version) for i in self.proto.opset_import if i.domain == (n.domain or "")), 1),
            "num_outputs": len(n.outputs),
            "output_names": [t.name for t in n.outputs],
        })
        nid = self.graph.add_node(self.cur_id, "opaque", [self.value(t) for t in inputs],
                                  origin=Origin("onnx", self.cur_id, n.op, payload), unique=True)
        node = self.graph.node(nid)
        node.meta = metas
        for i, t in enumerate(n.outputs):
            if t.name:
                self.vals[t.name] = (nid, i)

    # ---- multi-node patterns ----------------------------------------------------------------------
    def _find_patterns(self, order: list[int]) -> None:
        index = {id(n): i for i, n in enumerate(self.nodes)}
        outputs = {o.name for o in self.proto.graph.output}

        def sole_user(t: gs.Tensor) -> Any:
            return t.outputs[0] if len(t.outputs) == 1 and t.name not in outputs else None

        def producer(t: gs.Tensor) -> Any:
            return t.inputs[0] if len(t.inputs) == 1 else None

        def peek(t: gs.Tensor) -> np.ndarray | None:
            """A constant's value before the walk has folded anything: initializers and Constant nodes."""
            arr = self.const(t)
            src = producer(t)
            if arr is None and src is not None and src.op == "Constant" and isinstance(src.attrs.get("value"), gs.Constant):
                return np.asarray(src.attrs["value"].values)
            return arr

        def scalar(n: gs.Node, want: float) -> gs.Tensor | None:
            """The non-constant operand of a binary node whose other operand is the scalar `want`."""
            if len(n.inputs) != 2:
                return None
            for a, b in ((0, 1), (1, 0)):
                arr = peek(n.inputs[b])
                if arr is not None and arr.size == 1 and abs(float(arr.reshape(-1)[0]) - want) < 1e-3 \
                        and peek(n.inputs[a]) is None:
                    return n.inputs[a]  # type: ignore[no-any-return]
            return None

        for i in order:
            erf = self.nodes[i]
            if erf.op != "Erf" or (erf.domain or "") not in _DEFAULT_DOMAINS:
                continue
            pre = producer(erf.inputs[0])
            if pre is None or sole_user(erf.inputs[0]) is not erf:
                continue
            x = scalar(pre, math.sqrt(2)) if pre.op == "Div" else scalar(pre, 1 / math.sqrt(2)) \
                if pre.op == "Mul" else None
            add = sole_user(erf.outputs[0])
            if x is None or add is None or add.op != "Add" or scalar(add, 1.0) is not erf.outputs[0]:
                continue
            m1 = sole_user(add.outputs[0])
            if m1 is None or m1.op != "Mul" or pre is None:
                continue
            other = m1.inputs[1] if m1.inputs[0] is add.outputs[0] else m1.inputs[0]
            chain = [pre, erf, add, m1]
            if other is x:  # x * (1 + erf) * 0.5
                m2 = sole_user(m1.outputs[0])
                if m2 is None or m2.op != "Mul" or scalar(m2, 0.5) is not m1.outputs[0]:
                    continue
                chain.append(m2)
            elif scalar(m1, 0.5) is add.outputs[0]:  # (1 + erf) * 0.5 * x
                m2 = sole_user(m1.outputs[0])
                if m2 is None or m2.op != "Mul" or x not in m2.inputs:
                    continue
                chain.append(m2)
            else:  # (x * 0.5) * (1 + erf)
                h = producer(other)
                if h is None or h.op != "Mul" or scalar(h, 0.5) is not x or sole_user(other) is not m1:
                    continue
                chain.append(h)
            if any(index[id(c)] in self.skip or index[id(c)] in self.fused for c in chain):
                continue
            last = max(chain, key=lambda c: order.index(index[id(c)]))
            inner = {id(t) for c in chain for t in c.inputs}
            out = next(c.outputs[0] for c in chain if id(c.outputs[0]) not in inner)
            for c in chain:
                self.skip.add(index[id(c)])
            self.skip.discard(index[id(last)])

            def fuse(x: gs.Tensor = x, out: gs.Tensor = out) -> None:
                self.vals[out.name] = self.emit("gelu", [self.value(x)], {"approximate": "none"})

            self.fused[index[id(last)]] = fuse


def _per_channel(g: Graph, node_id: str, value: Value, c: int, rank: int) -> torch.Tensor | None:
    """The [C] vector of a mul/add operand that is a constant of shape [C, 1, ...] or [1, C, 1, ...]."""
    (a, _), (b, _) = g.operands(node_id)
    other = b if a == value[0] else a
    node = g.node(other)
    if node.kind != "constant" or len(g.users(other)) != 1:
        return None
    v = node.params["value"]
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.numel() != c or tuple(v.shape) not in (
            (c,) + (1,) * (rank - 2), (1, c) + (1,) * (rank - 2)):
        return None
    return v.reshape(c)


def _absorb_affine_into_bn(g: Graph) -> None:
    """BatchNorm → Mul(γ) → Add(β) with per-channel constants (Caffe2 exports) becomes one BatchNorm.

    Exact: weight·γ and bias·γ + β. Channel analysis then sees one per-channel op instead of two
    broadcasts against constants.
    """
    for bn in g.by_kind("batch_norm"):
        users = g.users(bn.id)
        if len(users) != 1 or g.node(users[0][0]).kind != "mul":
            continue
        mul = g.node(users[0][0])
        rank, c = len(bn.meta[0].shape), bn.meta[0].shape[1]
        gamma = _per_channel(g, mul.id, (bn.id, 0), c, rank)
        add_users = g.users(mul.id)
        if gamma is None or len(add_users) != 1 or g.node(add_users[0][0]).kind != "add":
            continue
        add = g.node(add_users[0][0])
        beta = _per_channel(g, add.id, (mul.id, 0), c, rank)
        if beta is None or mul.meta != bn.meta or add.meta != bn.meta:
            continue
        w = bn.dense("weight") if "weight" in bn.params else torch.ones(c)
        b = bn.dense("bias") if "bias" in bn.params else torch.zeros(c)
        bn.params["weight"], bn.params["bias"] = w * gamma, b * gamma + beta
        consts = [s for s, _ in g.operands(mul.id) + g.operands(add.id) if g.node(s).kind == "constant"]
        g.replace_uses((add.id, 0), (bn.id, 0))
        g.remove_node(add.id)
        g.remove_node(mul.id)
        for k in consts:
            g.remove_node(k)


def _attr(payload: dict[str, Any], name: str, default: Any) -> Any:
    for raw in payload["attributes"]:
        a = onnx.AttributeProto()
        a.ParseFromString(raw)
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(p: dict[str, Any], x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = [int(a) for a in axes.tolist()] if axes is not None else _attr(p, "axes", None)
        keep = bool(_attr(p, "keepdims", 1))
        if not ax:
            if _attr(p, "noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        return fn(x, dim=tuple(ax), keepdim=keep)

    return run


def _cumsum(p: dict[str, Any], x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    ax = int(axis)
    y = torch.flip(x, (ax,)) if _attr(p, "reverse", 0) else x
    y = torch.cumsum(y, ax)
    if _attr(p, "exclusive", 0):
        y = y - (torch.flip(x, (ax,)) if _attr(p, "reverse", 0) else x)
    return torch.flip(y, (ax,)) if _attr(p, "reverse", 0) else y


def _cast(p: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(_attr(p, "to", 1))))
    return x.to(torch.from_numpy(np.zeros(0, np_dtype)).dtype)


def _plain(fn: Any) -> Callable[..., torch.Tensor]:
    return lambda p, *xs: fn(*xs)


# Unknown-to-the-IR ONNX ops that still have an exact torch form, so onnx→torch keeps working through them
# (e.g. the Pow/Sqrt of a LayerNorm exported at an old opset). Each takes the payload and the operands.
_TORCH_OPS: dict[str, Callable[..., Any]] = {
    **{k: _plain(f) for k, f in {
        "Pow": torch.pow, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Erf": torch.erf,
        "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos,
        "Tan": torch.tan, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
        "Softplus": F.softplus, "Mish": F.mish, "Where": torch.where, "Equal": torch.eq, "Less": torch.lt,
        "Greater": torch.gt, "Not": torch.logical_not, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
    }.items()},
    "Max": lambda p, *xs: functools.reduce(torch.maximum, xs),
    "Min": lambda p, *xs: functools.reduce(torch.minimum, xs),
    "Elu": lambda p, x: F.elu(x, float(_attr(p, "alpha", 1.0))),
    "Cast": _cast,
    "CumSum": _cumsum,
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
}


class OnnxTorchOp(dict):  # type: ignore[type-arg]
    """The payload of an opaque ONNX node (op type, domain, attributes, ...) that torch can also run.

    A dict like every ONNX payload, so the ONNX backend re-emits it verbatim; callable, so the torch
    backend runs it.
    """

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return _TORCH_OPS[self["op_type"]](self, *xs)  # type: ignore[no-any-return]


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Tensors a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    free: set[str] = set()
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {""}
            for n in sub.node:
                free |= {t for t in n.input if t not in local} | (_outer_names(n) - local)
                local |= set(n.output)
    return free


def _evaluate(proto: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    node = onnx.NodeProto()
    node.CopyFrom(proto)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in feeds.items()]
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], "fold", ins, outs),
                              opset_imports=[helper.make_opsetid("", max(opset, 7))])
    res = ReferenceEvaluator(model).run(None, feeds)
    return [np.asarray(r) for r in res]


def _to_torch(arr: np.ndarray, owned: bool = False) -> torch.Tensor:
    """`owned`: the array was made for this one use, so torch may take it without a copy."""
    if arr.dtype == np.uint16 or arr.dtype.kind == "V":
        raise CaptureError(f"constant of unsupported dtype {arr.dtype}")
    if owned and arr.flags.c_contiguous and arr.flags.writeable:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr, order="C", copy=True))


def _stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """Same name, type and dims, data marked external: enough for shape inference, no bytes copied."""
    stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
    stub.data_location = onnx.TensorProto.EXTERNAL
    stub.external_data.add(key="location", value="__weights__")
    return stub


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without weight bytes (initializers and big Constant values stubbed)."""
    m = onnx.ModelProto(ir_version=proto.ir_version, producer_name=proto.producer_name)
    m.opset_import.extend(proto.opset_import)
    m.functions.extend(proto.functions)
    g = proto.graph
    for field in ("input", "output", "value_info", "sparse_initializer"):
        getattr(m.graph, field).extend(getattr(g, field))
    m.graph.initializer.extend(_stub(t) if t.ByteSize() > 4096 else t for t in g.initializer)
    for n in g.node:
        big = n.op_type == "Constant" and any(a.name == "value" and a.t.ByteSize() > 4096 for a in n.attribute)
        if not big:
            m.graph.node.append(n)
            continue
        copy = m.graph.node.add(op_type=n.op_type, name=n.name, domain=n.domain)
        copy.input.extend(n.input)
        copy.output.extend(n.output)
        copy.attribute.add(name="value", type=onnx.AttributeProto.TENSOR).t.CopyFrom(
            _stub(next(a.t for a in n.attribute if a.name == "value")))
    return m


Handler = Callable[[_Importer, gs.Node], bool]
HANDLERS: dict[str, Handler] = {}


handles = registrar(HANDLERS)


def from_onnx(
    model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    name: str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Graph:
    """Imports an ONNX model into the IR; symbolic input dims are 1 unless `input_shapes` gives them.

    Raises `CaptureError` for unreadable files, unsupported opsets, dangling inputs and cycles.
    """
    proto = load_model(model)
    opset = model_opset(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise _fail(f"unsupported ONNX opset {opset} (netsqueeze supports opsets {MIN_OPSET}..{MAX_OPSET})")
    gname = name or proto.graph.name or (os.path.splitext(os.path.basename(os.fspath(model)))[0]
                                         if not isinstance(model, onnx.ModelProto) else "graph")
    return _Importer(proto, gname, dict(input_shapes or {})).run()

# ---- op handlers: each returns False to leave the node opaque -------------------------------------------
_ABSENT = object()
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


_INT_TYPES = {np.dtype(np.int8): (8, True), np.dtype(np.uint8): (8, False), np.dtype(np.int16): (16, True),
              np.dtype(np.int32): (32, True)}


def _int_type(arr: np.ndarray) -> tuple[int, bool] | None:
    """(bits, signed) of an integer array a weight may be stored in, 4-bit types included."""
    name = str(arr.dtype)
    if name in ("int4", "uint4"):
        return 4, name == "int4"
    return _INT_TYPES.get(arr.dtype)


def _is_float(w: Any) -> bool:
    return isinstance(w, Encoded) or w.dtype in _FLOATS


def _np_float(w: Any) -> Any:
    return np.dtype(str(w.dtype).removeprefix("torch.")) if isinstance(w, Encoded) else w.dtype


def _transposed(w: Any) -> Any:
    return w.permute((1, 0)) if isinstance(w, Encoded) else w.T


def _dense_np(v: Any) -> np.ndarray:
    return v.dense().numpy() if isinstance(v, Encoded) else v  # type: ignore[no-any-return]


def _ints_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr).astype(np.int64))


def _encoded_weight(imp: _Importer, n: gs.Node) -> Encoded | None:
    """A constant subgraph that is a stored weight, kept in its form instead of folded to floats:
    DequantizeLinear of an integer initializer, Gather(centroids, indices) of constants, and a
    Transpose of either (exporters transpose dequantized weights)."""
    if (n.domain or "") not in _DEFAULT_DOMAINS or not n.outputs:
        return None
    ins = [imp.const(t) if t.name else None for t in n.inputs]
    try:
        if n.op == "DequantizeLinear" and len(ins) >= 2 and isinstance(ins[0], np.ndarray) \
                and isinstance(ins[1], np.ndarray) and _int_type(ins[0]) and ins[1].dtype == np.float32:
            x, scale = ins[0], ins[1]
            zp = ins[2] if len(ins) > 2 else None
            if zp is not None and (not isinstance(zp, np.ndarray) or zp.dtype != x.dtype):
                return None
            bits, signed = _int_type(x)  # type: ignore[misc]
            block = int(n.attrs.get("block_size", 0))
            per_tensor = scale.size == 1 and scale.ndim <= 1 and not block
            axis = None if per_tensor else int(n.attrs.get("axis", 1)) % max(x.ndim, 1)
            shape = () if per_tensor else scale.shape
            z = None if zp is None or not np.any(zp.astype(np.int64)) else _ints_tensor(zp).reshape(shape)
            return Affine(_ints_tensor(x), torch.from_numpy(scale.astype(np.float32).reshape(shape).copy()), z,
                          axis, block, bits, signed)
        if n.op == "Gather" and len(ins) == 2 and isinstance(ins[0], np.ndarray) and ins[0].ndim == 1 \
                and ins[0].dtype in _FLOATS and isinstance(ins[1], np.ndarray) and ins[1].dtype.kind in "iu" \
                and int(n.attrs.get("axis", 0)) == 0 and ins[1].size and int(ins[1].min()) >= 0:
            name = n.inputs[0].name
            if name not in imp.centroids:
                imp.centroids[name] = Centroids(torch.from_numpy(ins[0].copy()), name)
            return Codebook(_ints_tensor(ins[1]), imp.centroids[name])
        if n.op == "Transpose" and len(ins) == 1 and isinstance(ins[0], Encoded):
            perm = n.attrs.get("perm")
            return ins[0].permute(tuple(int(p) for p in perm) if perm is not None
                                  else tuple(reversed(range(ins[0].dim()))))
    except WeightFormError:
        return None
    return None


def _in(n: gs.Node, i: int) -> gs.Tensor | None:
    return n.inputs[i] if i < len(n.inputs) and n.inputs[i].name else None


def _const_in(imp: _Importer, n: gs.Node, i: int) -> Any:
    """The constant at input i, None when the input is absent, _ABSENT when it is not a constant."""
    t = _in(n, i)
    if t is None:
        return None
    arr = imp.const(t)
    return _ABSENT if arr is None else arr


def _ints(v: Any) -> list[int]:
    return [int(a) for a in np.asarray(v).reshape(-1)]


def _bind(imp: _Importer, n: gs.Node, v: Value, i: int = 0) -> bool:
    imp.vals[n.outputs[i].name] = v
    return True


def _used(imp: _Importer, t: gs.Tensor) -> bool:
    return bool(t.outputs) or t.name in {o.name for o in imp.proto.graph.output}


def _single_output(imp: _Importer, n: gs.Node) -> bool:
    return all(not t.name or not _used(imp, t) for t in n.outputs[1:])


def _auto_pads(imp: _Importer, n: gs.Node, spatial: tuple[int, ...], kernel: list[int], stride: list[int],
               dilation: list[int]) -> list[int] | None:
    auto = n.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    dims = len(kernel)
    if auto in ("NOTSET", ""):
        return _ints(n.attrs.get("pads", [0] * 2 * dims))
    if auto == "VALID":
        return [0] * 2 * dims
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, stride, dilation):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


@handles("Conv")
def _conv(imp: _Importer, n: gs.Node) -> bool:
    w, b = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if w is None or w is _ABSENT or b is _ABSENT or not _is_float(w):
        return False
    x = imp.meta(n.inputs[0])
    dims = len(w.shape) - 2
    kernel = _ints(n.attrs.get("kernel_shape", w.shape[2:]))
    stride = _ints(n.attrs.get("strides", [1] * dims))
    dilation = _ints(n.attrs.get("dilations", [1] * dims))
    pads = _auto_pads(imp, n, x.shape[2:], kernel, stride, dilation)
    params = {"weight": w} | ({"bias": b} if b is not None else {})
    attrs = {"stride": stride, "padding": pads, "dilation": dilation, "groups": int(n.attrs.get("group", 1))}
    return _bind(imp, n, imp.emit("conv", [imp.value(n.inputs[0])], attrs, params))


@handles("ConvTranspose")
def _conv_t(imp: _Importer, n: gs.Node) -> bool:
    w, b = _const_in(imp, n, 1), _const_in(imp, n, 2)
    auto = n.attrs.get("auto_pad", "NOTSET")
    if w is None or w is _ABSENT or b is _ABSENT or "output_shape" in n.attrs or auto not in ("NOTSET", "VALID") \
            or not _is_float(w):
        return False
    dims = len(w.shape) - 2
    attrs = {
        "stride": _ints(n.attrs.get("strides", [1] * dims)),
        "padding": _ints(n.attrs.get("pads", [0] * 2 * dims)) if auto == "NOTSET" else [0] * 2 * dims,
        "dilation": _ints(n.attrs.get("dilations", [1] * dims)),
        "groups": int(n.attrs.get("group", 1)),
        "output_padding": _ints(n.attrs.get("output_padding", [0] * dims)),
    }
    params = {"weight": w} | ({"bias": b} if b is not None else {})
    return _bind(imp, n, imp.emit("conv_transpose", [imp.value(n.inputs[0])], attrs, params))


@handles("Gemm")
def _gemm(imp: _Importer, n: gs.Node) -> bool:
    b, c = _const_in(imp, n, 1), _const_in(imp, n, 2)
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    if b is None or b is _ABSENT or c is _ABSENT or len(b.shape) != 2 or not _is_float(b) \
            or imp.is_const(n.inputs[0]) or isinstance(c, Encoded) or (isinstance(b, Encoded) and alpha != 1.0):
        return False
    w = b if int(n.attrs.get("transB", 0)) else _transposed(b)
    if alpha != 1.0:
        w = w * w.dtype.type(alpha)
    params: dict[str, Any] = {"weight": w if isinstance(w, Encoded) else np.ascontiguousarray(w)}
    if c is not None and beta != 0.0:
        if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
            return False  # a per-row bias is not a linear layer's bias
        params["bias"] = np.broadcast_to(c.reshape(-1) * c.dtype.type(beta), (w.shape[0],)).astype(w.dtype)
    x = imp.value(n.inputs[0])
    if int(n.attrs.get("transA", 0)):
        x = imp.emit("transpose", [x], {"perm": [1, 0]}, suffix="transA")
    return _bind(imp, n, imp.emit("linear", [x], {}, params))


@handles("MatMul")
def _matmul(imp: _Importer, n: gs.Node) -> bool:
    a, b = n.inputs[0], n.inputs[1]
    wb = imp.const(b)
    if wb is not None and len(wb.shape) == 2 and not imp.is_const(a) and _is_float(wb) \
            and len(imp.meta(a).shape) >= 2:
        wt = _transposed(wb)
        params: dict[str, Any] = {"weight": wt if isinstance(wt, Encoded) else np.ascontiguousarray(wt)}
        out = n.outputs[0]
        add = out.outputs[0] if len(out.outputs) == 1 and not _used_as_output(imp, out) else None
        if add is not None and add.op == "Add" and (add.domain or "") in _DEFAULT_DOMAINS:
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            bias = imp.const(other)
            if isinstance(bias, np.ndarray) and bias.size == wb.shape[1] and bias.shape[-1:] == (wb.shape[1],) \
                    and other is not out and bias.dtype == _np_float(wb):
                params["bias"] = bias.reshape(-1)
                v = imp.emit("linear", [imp.value(a)], {}, params)
                imp.skip.add(next(i for i, m in enumerate(imp.nodes) if m is add))
                imp.vals[add.outputs[0].name] = v
                return _bind(imp, n, v)
        return _bind(imp, n, imp.emit("linear", [imp.value(a)], {}, params))
    return _bind(imp, n, imp.emit("matmul", [imp.value(a), imp.value(b)]))


def _used_as_output(imp: _Importer, t: gs.Tensor) -> bool:
    return t.name in {o.name for o in imp.proto.graph.output}


@handles("BatchNormalization")
def _bn(imp: _Importer, n: gs.Node) -> bool:
    ps = [_const_in(imp, n, i) for i in range(1, 5)]
    if any(p is None or p is _ABSENT for p in ps) or not _single_output(imp, n) \
            or int(n.attrs.get("training_mode", 0)) or int(n.attrs.get("spatial", 1)) != 1:
        return False
    params = dict(zip(("weight", "bias", "running_mean", "running_var"), ps))
    return _bind(imp, n, imp.emit("batch_norm", [imp.value(n.inputs[0])],
                                  {"eps": float(n.attrs.get("epsilon", 1e-5))}, params))


@handles("LayerNormalization")
def _ln(imp: _Importer, n: gs.Node) -> bool:
    scale, bias = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if scale is None or scale is _ABSENT or bias is _ABSENT or not _single_output(imp, n):
        return False
    shape = imp.meta(n.inputs[0]).shape
    axis = int(n.attrs.get("axis", -1)) % len(shape)
    ns = list(shape[axis:])
    params = {"weight": np.broadcast_to(scale, ns).copy()}
    if bias is not None:
        params["bias"] = np.broadcast_to(bias, ns).copy()
    return _bind(imp, n, imp.emit("layer_norm", [imp.value(n.inputs[0])],
                                  {"normalized_shape": ns, "eps": float(n.attrs.get("epsilon", 1e-5))}, params))


@handles("InstanceNormalization", "GroupNormalization")
def _gn(imp: _Importer, n: gs.Node) -> bool:
    scale, bias = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if scale is None or scale is _ABSENT or bias is None or bias is _ABSENT:
        return False
    c = imp.meta(n.inputs[0]).shape[1]
    groups = c if n.op == "InstanceNormalization" else int(n.attrs["num_groups"])
    if scale.size == groups != c:  # opset 18 GroupNormalization: one scale per group
        scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    if scale.size != c or bias.size != c:
        return False
    return _bind(imp, n, imp.emit("group_norm", [imp.value(n.inputs[0])],
                                  {"num_groups": groups, "eps": float(n.attrs.get("epsilon", 1e-5))},
                                  {"weight": scale.reshape(-1), "bias": bias.reshape(-1)}))


_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish"}


@handles(*_UNARY)
def _unary(imp: _Importer, n: gs.Node) -> bool:
    return _bind(imp, n, imp.emit(_UNARY[n.op], [imp.value(n.inputs[0])]))


@handles("Identity", "Dropout")
def _identity(imp: _Importer, n: gs.Node) -> bool:
    if not _single_output(imp, n):
        return False
    return _bind(imp, n, imp.emit("identity", [imp.value(n.inputs[0])]))


@handles("LeakyRelu")
def _leaky(imp: _Importer, n: gs.Node) -> bool:
    return _bind(imp, n, imp.emit("leaky_relu", [imp.value(n.inputs[0])],
                                  {"negative_slope": float(n.attrs.get("alpha", 0.01))}))


@handles("HardSigmoid")
def _hsig(imp: _Importer, n: gs.Node) -> bool:
    attrs = {"alpha": float(n.attrs.get("alpha", 0.2)), "beta": float(n.attrs.get("beta", 0.5))}
    return _bind(imp, n, imp.emit("hardsigmoid", [imp.value(n.inputs[0])], attrs))


@handles("Gelu")
def _gelu(imp: _Importer, n: gs.Node) -> bool:
    approx = n.attrs.get("approximate", "none")
    return _bind(imp, n, imp.emit("gelu", [imp.value(n.inputs[0])], {"approximate": str(approx)}))


@handles("Clip")
def _clip(imp: _Importer, n: gs.Node) -> bool:
    if imp.opset < 11:
        lo, hi = n.attrs.get("min"), n.attrs.get("max")
    else:
        lo_a, hi_a = _const_in(imp, n, 1), _const_in(imp, n, 2)
        if lo_a is _ABSENT or hi_a is _ABSENT:
            return False
        lo = None if lo_a is None else float(np.asarray(lo_a).reshape(-1)[0])
        hi = None if hi_a is None else float(np.asarray(hi_a).reshape(-1)[0])
    attrs = {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)}
    if attrs["min"] == 0.0 and attrs["max"] is None:
        return _bind(imp, n, imp.emit("relu", [imp.value(n.inputs[0])]))
    return _bind(imp, n, imp.emit("clip", [imp.value(n.inputs[0])], attrs))


@handles("Softmax")
def _softmax(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    x = imp.value(n.inputs[0])
    if imp.opset >= 13:
        return _bind(imp, n, imp.emit("softmax", [x], {"axis": int(n.attrs.get("axis", -1))}))
    # Before opset 13 softmax normalises over all axes from `axis` on (the input seen as 2-D).
    axis = int(n.attrs.get("axis", 1)) % len(shape)
    if all(d == 1 for d in shape[axis + 1:]) and axis < len(shape):
        return _bind(imp, n, imp.emit("softmax", [x], {"axis": axis}))
    if axis == len(shape) - 1:
        return _bind(imp, n, imp.emit("softmax", [x], {"axis": -1}))
    flat = imp.emit("flatten", [x], {"start_dim": axis, "end_dim": -1}, suffix="flatten")
    sm = imp.emit("softmax", [flat], {"axis": -1}, suffix="softmax")
    return _bind(imp, n, imp.emit("reshape", [sm], {"shape": [0] * axis + list(shape[axis:])}))


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@handles(*_BINARY)
def _binary(imp: _Importer, n: gs.Node) -> bool:
    return _bind(imp, n, imp.emit(_BINARY[n.op], [imp.value(n.inputs[0]), imp.value(n.inputs[1])]))


@handles("Sum")
def _sum(imp: _Importer, n: gs.Node) -> bool:
    vals = [imp.value(t) for t in n.inputs]
    if len(vals) == 1:
        return _bind(imp, n, imp.emit("identity", vals))
    acc = vals[0]
    for i, v in enumerate(vals[1:], 1):
        acc = imp.emit("add", [acc, v], suffix="" if i == len(vals) - 1 else f"add{i}")
    return _bind(imp, n, acc)


@handles("Concat")
def _concat(imp: _Importer, n: gs.Node) -> bool:
    ins = [t for t in n.inputs if (t.name and imp.meta(t).numel() > 0) or len(n.inputs) == 1]
    return _bind(imp, n, imp.emit("concat", [imp.value(t) for t in ins], {"axis": int(n.attrs.get("axis", 1))}))


@handles("Split")
def _split(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    axis = int(n.attrs.get("axis", 0)) % len(shape)
    sizes: Any = n.attrs.get("split") if imp.opset < 13 else _const_in(imp, n, 1)
    if sizes is _ABSENT:
        return False
    if sizes is None:
        k = int(n.attrs.get("num_outputs", len(n.outputs)))
        step = -(-shape[axis] // k)
        sizes = [min(step, shape[axis] - i * step) for i in range(k)]
    v = imp.emit("split", [imp.value(n.inputs[0])], {"axis": axis, "sizes": _ints(sizes)})
    for i in range(len(n.outputs)):
        _bind(imp, n, (v[0], i), i)
    return True


@handles("Slice")
def _slice(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    if imp.opset < 10:
        starts, ends = n.attrs["starts"], n.attrs["ends"]
        axes, steps = n.attrs.get("axes"), None
    else:
        starts, ends, axes, steps = (_const_in(imp, n, i) for i in range(1, 5))
        if any(a is _ABSENT for a in (starts, ends, axes, steps)):
            return False
    st, en = _ints(starts), _ints(ends)
    ax = _ints(axes) if axes is not None else list(range(len(st)))
    sp = _ints(steps) if steps is not None else [1] * len(st)
    x = imp.value(n.inputs[0])
    todo = [(a % len(shape), s, e, p) for a, s, e, p in zip(ax, st, en, sp)]
    # INT64 sentinels for "to the end" clip to the axis; python slice semantics handle the rest.
    lim = 1 << 62
    todo = [(a, max(-lim, min(lim, s)), max(-lim, min(lim, e)), p) for a, s, e, p in todo]
    for i, (a, s, e, p) in enumerate(todo):
        x = imp.emit("slice", [x], {"axis": a, "start": s, "end": e, "step": p},
                     suffix="" if i == len(todo) - 1 else f"axis{a}")
    if not todo:
        x = imp.emit("identity", [x])
    return _bind(imp, n, x)


@handles("Flatten")
def _flatten(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    axis = int(n.attrs.get("axis", 1)) % (rank + 1) if rank else 0
    x = imp.value(n.inputs[0])
    if axis == 0:
        f = imp.emit("flatten", [x], {"start_dim": 0, "end_dim": -1}, suffix="flatten")
        return _bind(imp, n, imp.emit("unsqueeze", [f], {"axes": [0]}))
    if axis == rank:
        f = imp.emit("flatten", [x], {"start_dim": 0, "end_dim": -1}, suffix="flatten")
        return _bind(imp, n, imp.emit("unsqueeze", [f], {"axes": [1]}))
    if axis == 1:
        return _bind(imp, n, imp.emit("flatten", [x], {"start_dim": 1, "end_dim": -1}))
    inner = imp.emit("flatten", [x], {"start_dim": axis, "end_dim": -1}, suffix="inner")
    return _bind(imp, n, imp.emit("flatten", [inner], {"start_dim": 0, "end_dim": axis - 1}))


@handles("Reshape")
def _reshape(imp: _Importer, n: gs.Node) -> bool:
    shape = n.attrs.get("shape") if imp.opset < 5 else _const_in(imp, n, 1)
    if shape is None or shape is _ABSENT:
        return False
    target = _ints(shape)
    if int(n.attrs.get("allowzero", 0)) and 0 in target:
        return False
    return _bind(imp, n, imp.emit("reshape", [imp.value(n.inputs[0])], {"shape": target}))


@handles("Transpose")
def _transpose(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    perm = _ints(n.attrs.get("perm", list(range(rank))[::-1]))
    return _bind(imp, n, imp.emit("transpose", [imp.value(n.inputs[0])], {"perm": perm}))


def _axes(imp: _Importer, n: gs.Node) -> Any:
    return n.attrs.get("axes") if imp.opset < 13 else _const_in(imp, n, 1)


@handles("Squeeze")
def _squeeze(imp: _Importer, n: gs.Node) -> bool:
    shape = imp.meta(n.inputs[0]).shape
    axes = _axes(imp, n)
    if axes is _ABSENT:
        return False
    ax = _ints(axes) if axes is not None else [i for i, d in enumerate(shape) if d == 1]
    return _bind(imp, n, imp.emit("squeeze", [imp.value(n.inputs[0])], {"axes": [a % len(shape) for a in ax]}))


@handles("Unsqueeze")
def _unsqueeze(imp: _Importer, n: gs.Node) -> bool:
    axes = _axes(imp, n)
    if axes is None or axes is _ABSENT:
        return False
    rank = len(imp.meta(n.inputs[0]).shape) + len(_ints(axes))
    ax = sorted(a % rank for a in _ints(axes))
    return _bind(imp, n, imp.emit("unsqueeze", [imp.value(n.inputs[0])], {"axes": ax}))


@handles("MaxPool", "AveragePool")
def _pool(imp: _Importer, n: gs.Node) -> bool:
    if not _single_output(imp, n) or int(n.attrs.get("storage_order", 0)):
        return False
    x = imp.meta(n.inputs[0])
    kernel = _ints(n.attrs["kernel_shape"])
    dims = len(kernel)
    stride = _ints(n.attrs.get("strides", [1] * dims))
    dilation = _ints(n.attrs.get("dilations", [1] * dims))
    pads = _auto_pads(imp, n, x.shape[2:], kernel, stride, dilation)
    attrs: dict[str, Any] = {"kernel": kernel, "stride": stride, "padding": pads,
                             "ceil_mode": bool(n.attrs.get("ceil_mode", 0))}
    if n.op == "MaxPool":
        attrs["dilation"] = dilation
        return _bind(imp, n, imp.emit("max_pool", [imp.value(n.inputs[0])], attrs))
    if any(d != 1 for d in dilation):
        return False
    attrs["count_include_pad"] = bool(n.attrs.get("count_include_pad", 0))
    return _bind(imp, n, imp.emit("avg_pool", [imp.value(n.inputs[0])], attrs))


@handles("GlobalAveragePool")
def _gap(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    return _bind(imp, n, imp.emit("adaptive_avg_pool", [imp.value(n.inputs[0])], {"output_size": [1] * (rank - 2)}))


@handles("ReduceMean")
def _reduce_mean(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    axes = n.attrs.get("axes") if imp.opset < 18 else _const_in(imp, n, 1)
    if axes is _ABSENT:
        return False
    if axes is None or len(_ints(axes)) == 0:
        if int(n.attrs.get("noop_with_empty_axes", 0)):
            return _bind(imp, n, imp.emit("identity", [imp.value(n.inputs[0])]))
        axes = list(range(rank))
    attrs = {"axes": sorted(a % rank for a in _ints(axes)), "keepdim": bool(n.attrs.get("keepdims", 1))}
    return _bind(imp, n, imp.emit("mean", [imp.value(n.inputs[0])], attrs))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@handles("Pad")
def _pad(imp: _Importer, n: gs.Node) -> bool:
    rank = len(imp.meta(n.inputs[0]).shape)
    mode = n.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in _PAD_MODES:
        return False
    if imp.opset < 11:
        pads, value = _ints(n.attrs.get("pads", n.attrs.get("paddings", []))), float(n.attrs.get("value", 0.0))
    else:
        p, v, axes = _const_in(imp, n, 1), _const_in(imp, n, 2), _const_in(imp, n, 3)
        if p is None or p is _ABSENT or v is _ABSENT or axes is _ABSENT:
            return False
        pads = _ints(p)
        value = 0.0 if v is None or np.asarray(v).size == 0 else float(np.asarray(v).reshape(-1)[0])
        if axes is not None:
            ax = [a % rank for a in _ints(axes)]
            full = [0] * 2 * rank
            for i, a in enumerate(ax):
                full[a], full[a + rank] = pads[i], pads[i + len(ax)]
            pads = full
    attrs = {"pads": pads, "mode": _PAD_MODES[mode], "value": value}
    return _bind(imp, n, imp.emit("pad", [imp.value(n.inputs[0])], attrs))


@handles("Resize", "Upsample")
def _resize(imp: _Importer, n: gs.Node) -> bool:
    x = imp.meta(n.inputs[0])
    rank = len(x.shape)
    def s(key: str, default: str) -> str:
        v = n.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    mode = s("mode", "nearest")
    if n.op == "Upsample" or imp.opset < 11:
        scales = n.attrs.get("scales") if imp.opset < 9 else _const_in(imp, n, 1)
        sizes: Any = None
        ctm, nearest = "asymmetric", "floor"  # Upsample/Resize-10 semantics
    else:
        scales, sizes = _const_in(imp, n, 2), _const_in(imp, n, 3)
        ctm, nearest = s("coordinate_transformation_mode", "half_pixel"), s("nearest_mode", "round_prefer_floor")
        if n.attrs.get("axes") is not None or int(n.attrs.get("antialias", 0)) \
                or s("keep_aspect_ratio_policy", "stretch") != "stretch" or ctm == "tf_crop_and_resize":
            return False
    if scales is _ABSENT or sizes is _ABSENT or mode not in ("nearest", "linear", "cubic"):
        return False
    attrs: dict[str, Any] = {"mode": mode, "coordinate_transformation_mode": ctm, "nearest_mode": nearest}
    if mode == "cubic":
        attrs["cubic_coeff_a"] = float(n.attrs.get("cubic_coeff_a", -0.75))
        attrs["exclude_outside"] = int(n.attrs.get("exclude_outside", 0))
    if sizes is not None and np.asarray(sizes).size:
        sz = _ints(sizes)
        if len(sz) != rank or tuple(sz[:2]) != tuple(x.shape[:2]):
            return False
        attrs["size"] = sz[2:]
    elif scales is not None and np.asarray(scales).size:
        sc = [float(v) for v in np.asarray(scales).reshape(-1)]
        if len(sc) != rank or sc[:2] != [1.0, 1.0]:
            return False
        attrs["scale"] = sc[2:]
    else:
        return False
    return _bind(imp, n, imp.emit("resize", [imp.value(n.inputs[0])], attrs))


@handles("LRN")
def _lrn(imp: _Importer, n: gs.Node) -> bool:
    attrs = {"size": int(n.attrs["size"]), "alpha": float(n.attrs.get("alpha", 1e-4)),
             "beta": float(n.attrs.get("beta", 0.75)), "bias": float(n.attrs.get("bias", 1.0))}
    return _bind(imp, n, imp.emit("lrn", [imp.value(n.inputs[0])], attrs))


@handles("Gather")
def _gather(imp: _Importer, n: gs.Node) -> bool:
    table, idx = imp.const(n.inputs[0]), n.inputs[1]
    if table is not None and len(table.shape) == 2 and int(n.attrs.get("axis", 0)) == 0 and not imp.is_const(idx) \
            and _is_float(table):
        return _bind(imp, n, imp.emit("embedding", [imp.value(idx)], {}, {"weight": table}))
    ind = imp.const(idx)
    if isinstance(ind, np.ndarray) and ind.ndim == 0 and table is None:
        # x[..., i, ...] along `axis`: a one-element slice, then the axis dropped.
        shape = imp.meta(n.inputs[0]).shape
        axis = int(n.attrs.get("axis", 0)) % len(shape)
        i = int(ind) % shape[axis]
        sl = imp.emit("slice", [imp.value(n.inputs[0])], {"axis": axis, "start": i, "end": i + 1, "step": 1},
                      suffix="slice")
        return _bind(imp, n, imp.emit("squeeze", [sl], {"axes": [axis]}))
    return False


@handles("QuantizeLinear", "DequantizeLinear")
def _qdq(imp: _Importer, n: gs.Node) -> bool:
    scale, zp = _const_in(imp, n, 1), _const_in(imp, n, 2)
    if scale is None or scale is _ABSENT or zp is _ABSENT or int(n.attrs.get("block_size", 0)):
        return False
    if zp is None:
        zp = np.zeros(scale.shape, np.uint8)
    if zp.dtype not in (np.int8, np.uint8) or scale.dtype != np.float32:
        return False
    kind = "quantize" if n.op == "QuantizeLinear" else "dequantize"
    attrs = {"axis": int(n.attrs.get("axis", 1))}
    if n.op == "QuantizeLinear" and int(n.attrs.get("saturate", 1)) != 1:
        return False
    return _bind(imp, n, imp.emit(kind, [imp.value(n.inputs[0])], attrs, {"scale": scale, "zero_point": zp}))
