"""The import walk: graphsurgeon nodes in topological order become IR nodes; constants fold into params;
unknown ops become opaque nodes re-emitted verbatim."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import helper

from netsqueeze.errors import CaptureError, Diagnostic, InputMismatchError, NetsqueezeError
from netsqueeze.frontends.onnx.load import (
    _DEFAULT_DOMAINS,
    MAX_OPSET,
    MIN_OPSET,
    _fail,
    _node_ids,
    _static_shape,
    check_contents,
    check_structure,
    check_text,
    load_model,
    model_opset,
    onnx_dtype_name,
    skeleton,
)
from netsqueeze.frontends.onnx.ops import HANDLERS
from netsqueeze.frontends.onnx.torch_ops import _TORCH_OPS, OnnxTorchOp
from netsqueeze.frontends.onnx.weights import _dense_np, _encoded_weight
from netsqueeze.ir.canonicalize import canonicalize
from netsqueeze.ir.dims import Dim, is_dynamic
from netsqueeze.ir.graph import Graph, Origin, TensorMeta, Value
from netsqueeze.ir.ops import ONNX_ELEMENTWISE, infer_node
from netsqueeze.ir.weights import SPARSE_LAYOUT_KEY, Centroids, Encoded, Sparse, WeightFormError

# Any default-domain op whose inputs are all constants is evaluated at import, except these: random ops
# (not deterministic) and Q/DQ (their placement is the quantisation recipe, so they stay nodes).
_NOT_FOLDABLE = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan",
})


# ops whose output has their first input's shape
_SAME_SHAPE = frozenset({"CumSum", "ScatterND", "ScatterElements", "Trilu", "LogSoftmax", "Hardmax", "Softmax",
                         "Clip", "LeakyRelu", "Elu", "Selu", "Softplus", "Mish", "HardSigmoid"})

# IR dtype name → the name in ONNX type strings ("tensor(float)")
_ONNX_TYPE_NAMES = {
    "float32": "float", "float64": "double", "float16": "float16", "bfloat16": "bfloat16", "int8": "int8",
    "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
    "uint64": "uint64", "bool": "bool",
}

# Constant folding makes at most this many elements / bytes per tensor: a small file whose ConstantOfShape,
# Expand, Tile or Range asks for gigabytes is refused, not allocated.
MAX_FOLD_ELEMENTS = 256 * 2**20  # VGG-19 sized weights (400 MB) made by ConstantOfShape still fold
MAX_FOLD_BYTES = 1024 * 2**20
_GROWING = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})


def _fold_shape(op: str, consts: list[Any]) -> tuple[int, ...] | str | None:
    """The output shape folding `op` would make from constant inputs, a problem with them, or None when
    this op's size is not estimated up front."""
    def ints(v: Any, what: str) -> list[int] | str:
        a = np.asarray(v)
        if a.dtype.kind not in "iu" or a.ndim > 1:
            return f"its {what} must be a 1-D integer tensor, not {a.dtype} of shape {list(a.shape)}"
        return [int(x) for x in a.reshape(-1)]

    if op == "ConstantOfShape" and consts:
        dims = ints(consts[0], "shape input")
        if isinstance(dims, str):
            return dims
        if any(d < 0 for d in dims):
            return f"its shape input {dims} has a negative dimension"
        return tuple(dims)
    if op == "Expand" and len(consts) == 2:
        dims = ints(consts[1], "shape input")
        if isinstance(dims, str):
            return dims
        x = list(np.shape(consts[0]))
        rank = max(len(x), len(dims))
        x, dims = [1] * (rank - len(x)) + x, [1] * (rank - len(dims)) + dims
        if any(d < 0 for d in dims):
            return f"its shape input {dims} has a negative dimension"
        return tuple(a if b == 1 else b for a, b in zip(x, dims))
    if op == "Tile" and len(consts) == 2:
        reps = ints(consts[1], "repeats input")
        if isinstance(reps, str):
            return reps
        if any(r < 0 for r in reps):
            return f"its repeats {reps} are negative"
        x = list(np.shape(consts[0]))
        return tuple(a * b for a, b in zip(x, reps)) if len(reps) == len(x) else None
    if op == "Range" and len(consts) == 3:
        start, limit, delta = (np.asarray(c).reshape(-1) for c in consts)
        if start.size != 1 or limit.size != 1 or delta.size != 1:
            return "its start, limit and delta must be scalars"
        if float(delta[0]) == 0:
            return "its delta is 0"
        return (max(int(np.ceil((float(limit[0]) - float(start[0])) / float(delta[0]))), 0),)
    return None


class _Importer:
    """Walks the graphsurgeon nodes in topological order, emitting IR nodes and folding constants."""

    def __init__(self, proto: onnx.ModelProto, name: str, input_shapes: dict[str, tuple[int, ...]],
                 shape_sources: dict[str, str] | None = None) -> None:
        self.proto = proto
        self.opset = model_opset(proto)
        self.graph = Graph(name)
        self.vals: dict[str, Value] = {}
        self.consts: dict[str, Any] = {}  # tensor name → np.ndarray, or an Encoded weight (QDQ, sparse, codebook)
        self.centroids: dict[str, Centroids] = {}  # codebook tables by tensor name: shared tables stay shared
        self.sym: dict[str, np.ndarray] = {}  # shape constants with dynamic dims: object arrays of Dim/int
        self.sym_value_info: dict[str, tuple[str | None, ...]] = {}  # dim_params ONNX inference propagated
        self.dim_names: set[str] = set()
        self.input_shapes = input_shapes
        self.shape_sources = shape_sources or {}  # input name → what gave its sizes, when not input_shapes
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
        if t.name in self.sym:  # sizes that follow the dynamic dims: computed at run time, never baked
            sym = self.sym[t.name]
            nid = self.graph.add_node(base, "sizes", attrs={"values": tuple(sym.reshape(-1)), "shape": sym.shape},
                                      origin=Origin("onnx", t.name, "Shape"), unique=True)
        else:
            nid = self.graph.add_node(base, "constant", params={"value": self.take(arr)},
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
        ids = _node_ids(proto, {i.name for i in real_inputs})
        order = check_structure(proto, ids)
        check_contents(proto, ids, opset)
        declared = {i.name: _static_shape(i, self.input_shapes.get(i.name), self.shape_sources.get(i.name))
                    for i in real_inputs}
        shapes = {k: v[0] for k, v in declared.items()}
        seen: dict[str, tuple[int, str, int]] = {}
        for k, (shape, dim_names, _) in declared.items():
            for axis, (size, dim) in enumerate(zip(shape, dim_names)):
                if not dim:
                    continue
                first = seen.setdefault(dim, (int(size), k, axis))
                if first[0] != int(size):
                    raise InputMismatchError(Diagnostic(
                        f"dynamic dim '{dim}' is {first[0]} in input '{first[1]}' (axis {first[2]}) but {int(size)} "
                        f"in input '{k}' (axis {axis}): a named dim takes one size in the example inputs",
                        node=k))
        for _, _, notes in declared.values():
            if notes:
                g.meta.setdefault("notes", []).extend(notes)
        self._shape_inference(shapes)
        self._symbolic_inference({k: v[1] for k, v in declared.items()})

        for i in real_inputs:
            tt = i.type.tensor_type
            attrs: dict[str, Any] = {"shape": shapes[i.name], "dtype": onnx_dtype_name(tt.elem_type)}
            if any(declared[i.name][1]):
                attrs["dims"] = declared[i.name][1]
            nid = g.add_node(i.name, "input", attrs=attrs, origin=Origin("onnx", i.name, "input"))
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
        for idx in order:
            n, self.cur_id, self.cur_op = nodes[idx], ids[idx], nodes[idx].op
            if (n.domain or "") in _DEFAULT_DOMAINS:
                self._check_types(n)
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
        canonicalize(g)  # graph rewrites shared with the torch frontend (GELU, BatchNorm affine, ...)
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
        missing = [o for n in self.proto.graph.node for o in n.output if o and o not in self.value_info]
        if missing:
            self._measure_shapes(shapes, missing)

    def _symbolic_inference(self, names: dict[str, tuple[str | None, ...]]) -> None:
        """ONNX shape inference with the dynamic input dims left symbolic: which output dims of the ops
        netsqueeze keeps opaque are the input's dynamic dims (`dim_param`s ONNX propagated), so those stay
        `Dim`s in the IR instead of the example's sizes."""
        if not any(any(v) for v in names.values()):
            return
        m = skeleton(self.proto)
        for i in m.graph.input:
            if i.name in names and i.type.tensor_type.HasField("shape"):
                for d, name in zip(i.type.tensor_type.shape.dim, names[i.name]):
                    if name:
                        d.Clear()
                        d.dim_param = name
        try:
            inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception:
            return
        self.dim_names = {n for v in names.values() for n in v if n}
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                self.sym_value_info[vi.name] = tuple(d.dim_param if d.HasField("dim_param") else None
                                                     for d in tt.shape.dim)

    def _with_dims(self, name: str, meta: TensorMeta) -> TensorMeta:
        """`meta` with the dims symbolic inference found to be dynamic input dims made `Dim`s."""
        params = self.sym_value_info.get(name)
        if params is None or len(params) != len(meta.shape):
            return meta
        shape = tuple(Dim.named(p, d) if p in self.dim_names else d for p, d in zip(params, meta.shape))
        return TensorMeta(shape, meta.dtype)

    def _measure_shapes(self, shapes: dict[str, tuple[int, ...]], names: list[str]) -> None:
        """Shapes ONNX shape inference cannot tell (GatherElements, Expand, ops of other frameworks), measured
        by running the model in ONNX Runtime once on example data of the input shapes (random floats, integer
        inputs zero, booleans true). A model ONNX Runtime cannot run leaves them unknown: the ops that need
        them then fail with a precise message."""
        try:
            import onnxruntime as ort

            m = onnx.ModelProto()
            m.CopyFrom(self.proto)
            known = {o.name for o in m.graph.output}
            for name in names:
                if name not in known:
                    m.graph.output.append(onnx.ValueInfoProto(name=name))
            so = ort.SessionOptions()
            so.log_severity_level = 4
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            feeds: dict[str, np.ndarray] = {}
            for i in sess.get_inputs():
                shape = shapes.get(i.name)
                if shape is None:
                    return
                dt = onnx.helper.tensor_dtype_to_np_dtype(next(
                    x.type.tensor_type.elem_type for x in self.proto.graph.input if x.name == i.name))
                feeds[i.name] = (rng.standard_normal(shape).astype(dt) if np.issubdtype(dt, np.floating)
                                 else np.ones(shape, dt) if dt == np.bool_ else np.zeros(shape, dt))
            outs = sess.run(names, feeds)
        except Exception:  # onnxruntime refuses or fails on the model: nothing measured
            return
        for name, arr in zip(names, outs):
            a = np.asarray(arr)
            if a.dtype.kind in "biuf":
                self.value_info[name] = TensorMeta(tuple(int(d) for d in a.shape), str(a.dtype))

    def _dtype_of(self, t: gs.Tensor) -> str | None:
        if t.name in self.consts or isinstance(t, gs.Constant):
            arr = self.const(t)
            return None if arr is None else str(arr.dtype).removeprefix("torch.")
        if t.name in self.vals:
            return self.graph.meta_of(self.vals[t.name]).dtype
        return None

    def _check_types(self, n: gs.Node) -> None:
        """Inputs bound to one type variable of the op's schema (Conv's X, W and B are all T) have one element
        type, and each is a type the schema allows: a mismatch is an error naming the node."""
        try:
            schema = onnx.defs.get_schema(n.op, self.opset, "")
        except onnx.defs.SchemaError:
            return
        if not schema.inputs:
            return
        seen: dict[str, tuple[int, str]] = {}
        for i, t in enumerate(n.inputs):
            if not t.name:
                continue
            formal = schema.inputs[min(i, len(schema.inputs) - 1)]
            dtype = self._dtype_of(t)
            onnx_name = _ONNX_TYPE_NAMES.get(dtype or "")
            if onnx_name is None:
                continue
            allowed = set(formal.types)
            if allowed and f"tensor({onnx_name})" not in allowed and all(a.startswith("tensor(") for a in allowed):
                raise _fail(f"node '{self.cur_id}' ({n.op}): input {i} ('{t.name}') is {dtype}, which {n.op} does "
                            f"not take for '{formal.name}'", node=self.cur_id)
            first = seen.setdefault(formal.type_str, (i, dtype or ""))
            if first[1] != dtype:
                raise _fail(f"node '{self.cur_id}' ({n.op}): input {i} ('{t.name}') is {dtype} but input {first[0]} "
                            f"is {first[1]}; {n.op} takes one element type for {formal.type_str}", node=self.cur_id)

    # ---- constant folding ---------------------------------------------------------------------
    def _fold(self, n: gs.Node, proto: onnx.NodeProto) -> bool:
        enc = _encoded_weight(self, n)
        if enc is not None:
            self.consts[n.outputs[0].name] = enc
            return True
        if n.op in _NOT_FOLDABLE:
            return False
        if n.op == "Shape":
            # Shape of any known tensor is a constant at the example sizes; its dynamic dims are kept beside
            # it (`self.sym`), so shape arithmetic built on it stays symbolic
            if n.inputs[0].name not in self.vals and self.const(n.inputs[0]) is None:
                return False
            shape = self.meta(n.inputs[0]).shape
            start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
            picked = list(shape)[start:end if end is None else int(end)]
            self.consts[n.outputs[0].name] = np.array([int(d) for d in picked], dtype=np.int64)
            if any(is_dynamic(d) for d in picked):
                arr = np.empty(len(picked), dtype=object)
                arr[:] = picked
                self.sym[n.outputs[0].name] = arr
            return True
        ins = [t for t in n.inputs if t.name]
        if not all(self.is_const(t) for t in ins):
            return False
        if any(t.name in self.sym for t in ins):
            return self._fold_symbolic(n, ins)
        self._check_fold_size(n, [_dense_np(self.consts[t.name]) for t in ins] if n.op in _GROWING else [],
                              sum(math.prod(self.meta(t).shape) for t in ins))
        if n.op == "ConstantOfShape":
            v = n.attrs.get("value")
            fill = np.asarray(v.values).reshape(-1) if v is not None else np.zeros(1, np.float32)
            if fill.size != 1:
                raise _fail(f"node '{self.cur_id}' (ConstantOfShape): its value must hold one element, not "
                            f"{fill.size}", node=self.cur_id)
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

    def _fold_symbolic(self, n: gs.Node, ins: list[gs.Tensor]) -> bool:
        """Shape arithmetic on dynamic dims (Shape → Gather/Slice/Concat/Unsqueeze/Mul/... → Reshape): evaluated
        on `Dim`s, so the result stays symbolic. Any other op reading a dynamic size is not folded: a
        constant would fix the size at the example's."""
        vals = [self.sym[t.name] if t.name in self.sym else np.asarray(self.consts[t.name]).astype(object)
                for t in ins]
        a = n.attrs
        try:
            if n.op in ("Identity", "Cast") and (n.op == "Identity" or int(a.get("to", 0)) in (6, 7)):
                out = vals[0]
            elif n.op == "Gather":
                out = np.take(vals[0], np.asarray(self.consts[ins[1].name]).astype(np.int64), axis=int(a.get("axis", 0)))
            elif n.op == "Concat":
                out = np.concatenate([v.reshape(-1) if v.ndim == 0 else v for v in vals], axis=int(a.get("axis", 0)))
            elif n.op in ("Unsqueeze", "Squeeze"):
                target = list(np.shape(vals[0]))
                axes = [int(x) for x in (a["axes"] if "axes" in a else
                                         (np.asarray(self.consts[ins[1].name]).reshape(-1) if len(ins) > 1 else []))]
                if n.op == "Unsqueeze":
                    for ax in sorted(x % (len(target) + len(axes)) for x in axes):
                        target.insert(ax, 1)
                else:
                    target = [d for i, d in enumerate(target) if (i not in [x % len(target) for x in axes])
                              and not (not axes and d == 1)]
                out = vals[0].reshape(target)
            elif n.op == "Slice" and vals[0].ndim == 1:
                starts, ends = (int(np.asarray(self.consts[t.name]).reshape(-1)[0]) for t in ins[1:3])
                steps = int(np.asarray(self.consts[ins[4].name]).reshape(-1)[0]) if len(ins) > 4 else 1
                out = vals[0][slice(starts, None if ends >= 2**62 else ends, steps)]
            elif n.op == "Reshape" and ins[1].name not in self.sym:
                target = [int(x) for x in np.asarray(self.consts[ins[1].name]).reshape(-1)]
                target = [vals[0].shape[i] if x == 0 and not int(a.get("allowzero", 0)) else x
                          for i, x in enumerate(target)]
                out = vals[0].reshape(target)
            elif n.op == "Equal" and len(vals) == 2:
                # a size never equals a negative number (the exporters' `-1` sentinels of expand): decided
                # for every size; any other comparison depends on the size, so it is not folded
                pairs = np.broadcast_arrays(vals[0], vals[1])
                if any(is_dynamic(x) and not (isinstance(y, (int, np.integer)) and not is_dynamic(y) and y < 0)
                       for p0, p1 in [pairs, pairs[::-1]] for x, y in zip(p0.reshape(-1), p1.reshape(-1))):
                    return False
                out = np.vectorize(lambda x, y: int(x) == int(y), otypes=[bool])(*pairs)
                self.consts[n.outputs[0].name] = out
                return True
            elif n.op == "Where" and len(vals) == 3 and ins[0].name not in self.sym:
                out = np.where(np.asarray(self.consts[ins[0].name]).astype(bool), vals[1], vals[2])
            elif n.op in ("Mul", "Add", "Sub", "Div") and len(vals) == 2:
                fn = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.floor_divide}[n.op]
                out = fn(vals[0], vals[1])
            else:
                return False
        except (KeyError, IndexError, ValueError, TypeError):
            return False
        out = np.asarray(out, dtype=object)
        self.consts[n.outputs[0].name] = np.asarray([int(d) for d in out.reshape(-1)], dtype=np.int64).reshape(out.shape)
        if any(is_dynamic(d) for d in out.reshape(-1)):
            self.sym[n.outputs[0].name] = out
        return True

    def _check_fold_size(self, n: gs.Node, consts: list[Any], in_elements: int) -> None:
        """Refuses to fold a node whose output would be too big (or whose size inputs are malformed), before
        anything is allocated: from its constant inputs for the ops that grow tensors, otherwise from
        ONNX shape inference. Weights already in the file (a Constant, a Cast or Transpose of an
        initializer) are not refused: only an output bigger than the limit and than its inputs together."""
        if n.op == "Constant":
            return
        shape = _fold_shape(n.op, consts)
        if isinstance(shape, str):
            raise _fail(f"node '{self.cur_id}' ({n.op}): {shape}", node=self.cur_id)
        sizes = [(shape, 4)] if shape is not None else []
        for t in n.outputs:
            m = self.value_info.get(t.name)
            if m is not None:
                sizes.append((m.shape, _itemsize(m.dtype)))
        for dims, itemsize in sizes:
            count = math.prod(dims)
            if count > in_elements and (count > MAX_FOLD_ELEMENTS or count * itemsize > MAX_FOLD_BYTES):
                raise _fail(f"node '{self.cur_id}' ({n.op}) would fold to a constant of shape {list(dims)} "
                            f"({count} elements); netsqueeze folds constants of up to {MAX_FOLD_ELEMENTS} elements "
                            f"and {MAX_FOLD_BYTES >> 20} MiB", node=self.cur_id)

    def _dynamic_shape(self, n: gs.Node, inputs: list[gs.Tensor], measured: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape of an opaque op whose inputs have dynamic dims that ONNX shape inference lost
        (its input came from an op it cannot type): elementwise ops broadcast their inputs' shapes, Expand
        broadcasts its input with the target sizes, Tile multiplies by the repeats. The dynamic dims are kept
        as `Dim`s when the result agrees with the measured shape; otherwise (and for any other op) the
        measured shape stands. Gather and GatherElements take their indices' shape, ConstantOfShape its sizes."""
        def shape_of(t: gs.Tensor) -> tuple[int, ...]:
            return tuple(self.meta(t).shape) if t.name not in self.vals else self.graph.meta_of(self.vals[t.name]).shape

        def sizes(t: gs.Tensor) -> list[int] | None:
            if t.name in self.sym:
                return list(self.sym[t.name].reshape(-1))
            arr = self.const(t)
            return [int(x) for x in np.asarray(arr).reshape(-1)] if isinstance(arr, np.ndarray) else None

        def broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
            rank = max(len(sh) for sh in shapes)
            out: list[int] = []
            for col in zip(*[(1,) * (rank - len(sh)) + tuple(sh) for sh in shapes]):
                big = [d for d in col if int(d) != 1]
                # a dynamic dim at 1 (a batch sized 1 when no example says otherwise) broadcast with a fixed 1 stays
                # dynamic: at another size the fixed 1 is what broadcasts
                out.append(next((d for d in big if is_dynamic(d)), big[0] if big else
                                next((d for d in col if is_dynamic(d)), col[0])))
            return tuple(out)

        try:
            if n.op in ONNX_ELEMENTWISE and inputs:
                out = broadcast([shape_of(t) for t in inputs])
            elif n.op in _SAME_SHAPE and inputs:
                out = shape_of(inputs[0])
            elif n.op == "ConstantOfShape" and len(inputs) == 1 and sizes(inputs[0]) is not None:
                out = tuple(sizes(inputs[0]) or ())
            elif n.op == "Expand" and len(inputs) == 2 and sizes(inputs[1]) is not None:
                out = broadcast([shape_of(inputs[0]), tuple(sizes(inputs[1]) or ())])
            elif n.op == "Gather" and len(inputs) == 2:
                data, idx = shape_of(inputs[0]), shape_of(inputs[1])
                axis = int(n.attrs.get("axis", 0)) % len(data)
                out = data[:axis] + idx + data[axis + 1:]
            elif n.op == "GatherElements" and len(inputs) == 2:
                out = shape_of(inputs[1])
            elif n.op == "Slice" and len(inputs) >= 3 and all(sizes(t) is not None for t in inputs[1:]):
                out = self._sliced(shape_of(inputs[0]), *(sizes(t) or [] for t in inputs[1:]))
            elif n.op == "Tile" and len(inputs) == 2 and sizes(inputs[1]) is not None:
                reps = sizes(inputs[1]) or []
                out = tuple(d if int(r) == 1 else d * r for d, r in zip(shape_of(inputs[0]), reps))
            else:
                return measured
        except (KeyError, ValueError, TypeError, IndexError, NetsqueezeError):
            return measured
        return out if tuple(int(d) for d in out) == tuple(int(d) for d in measured) else measured

    @staticmethod
    def _sliced(shape: tuple[int, ...], starts: list[int], ends: list[int], axes: list[int] | None = None,
                steps: list[int] | None = None) -> tuple[int, ...]:
        """Slice's output shape where a bound follows a dynamic dim: `x[0:end]` with step 1, a start that is
        a constant >= 0 and an end that is a size within the axis, is `end - start` long at every size (the
        length is measured otherwise)."""
        out = list(shape)
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        for a, s, e, p in zip(axes, starts, ends, steps):
            a = int(a) % len(shape)
            if not (is_dynamic(s) or is_dynamic(e)):
                out[a] = len(range(*slice(int(s), int(e), int(p)).indices(int(shape[a]))))
            elif int(p) == 1 and not is_dynamic(s) and int(s) >= 0 and is_dynamic(e) and int(s) <= int(e) <= int(shape[a]):
                out[a] = e - s if int(s) else e
            else:
                raise ValueError("a bound the length cannot follow")
        return tuple(out)

    def _range_length(self, inputs: list[gs.Tensor]) -> int:
        """The length of `Range(start, limit, delta)` whose bounds follow a dynamic dim (`arange(seq)` of
        attention masks and position ids): a `Dim` expression, so what is built on it stays dynamic."""
        start, limit, delta = (self.sym[t.name].reshape(-1)[0] if t.name in self.sym
                               else int(np.asarray(self.consts[t.name]).reshape(-1)[0]) for t in inputs)
        if is_dynamic(delta) or int(delta) == 0:
            raise _fail(f"node '{self.cur_id}' (Range): its delta must be a nonzero constant", node=self.cur_id)
        d = int(delta)
        span = limit - start
        length = span if d == 1 else (span + (d - 1)) // d if d > 0 else (-span + (-d - 1)) // -d
        if int(length) < 0:
            raise _fail(f"node '{self.cur_id}' (Range) is empty at the example sizes ({int(length)} elements)",
                        node=self.cur_id)
        return length  # type: ignore[no-any-return]

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
            metas.append(self._with_dims(t.name, self.value_info[t.name]))
        if len(metas) == 1:  # dims ONNX shape inference lost on the way (its input came from an untyped op)
            ruled = self._dynamic_shape(n, inputs, metas[0].shape)
            metas[0] = TensorMeta(tuple(r if is_dynamic(r) else d for r, d in zip(ruled, metas[0].shape)),
                                  metas[0].dtype)
        if n.op == "Range" and len(inputs) == 3 and all(self.is_const(t) for t in inputs) \
                and any(t.name in self.sym for t in inputs):
            metas[0] = TensorMeta((self._range_length(inputs),), metas[0].dtype)
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


def _itemsize(dtype: str) -> int:
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 2 if dtype == "bfloat16" else 1


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


def from_onnx(
    model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    name: str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    example_shapes: Sequence[tuple[int, ...]] | None = None,
) -> Graph:
    """Imports an ONNX model into the IR. Open (dynamic) input dims stay dynamic; their sizes for analysis
    come from `input_shapes` (by input name) or `example_shapes` (the example inputs' shapes, in the model's
    input order; `input_shapes` wins).

    Raises `CaptureError` for unreadable files, unsupported opsets, dangling inputs and cycles.
    """
    proto = load_model(model)
    sources: dict[str, str] = {}  # input name → the example input that gave its sizes
    if example_shapes is not None:
        inits = {t.name for t in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in inits]
        if len(example_shapes) != len(names):
            raise InputMismatchError(f"{len(example_shapes)} example inputs given, but the ONNX model has "
                                     f"{len(names)} inputs ({', '.join(names)})")
        sources = {n: f"example input {i} ('{n}', shape {list(s)})"
                   for i, (n, s) in enumerate(zip(names, example_shapes)) if n not in (input_shapes or {})}
        input_shapes = {**dict(zip(names, (tuple(s) for s in example_shapes))), **(input_shapes or {})}
    check_text(proto)
    opset = model_opset(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise _fail(f"unsupported ONNX opset {opset} (netsqueeze supports opsets {MIN_OPSET}..{MAX_OPSET})")
    gname = name or proto.graph.name or (os.path.splitext(os.path.basename(os.fspath(model)))[0]
                                         if not isinstance(model, onnx.ModelProto) else "graph")
    return _Importer(proto, gname, dict(input_shapes or {}), sources).run()
