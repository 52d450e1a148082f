"""ONNX backend: an `ir.Graph` becomes an `onnx.ModelProto` (opset 17+, fp32 or fp16) through onnx-graphsurgeon,
with a symbolic batch dimension on inputs and outputs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import helper

from netsqueeze.errors import Diagnostic, UnsupportedOpError
from netsqueeze.ir.calls import AtenCall, Slot
from netsqueeze.ir.dims import Dim, expr_of, is_dynamic, lower, reshape_plan, symbol_sources
from netsqueeze.ir.graph import Graph, Node, TensorMeta, Value
from netsqueeze.ir.ops import attr
from netsqueeze.ir.tables import registrar
from netsqueeze.ir.weights import SPARSE_LAYOUT_KEY, Affine, Codebook, Sparse, Weight, index_select, pack_bits

MIN_OPSET, MAX_OPSET = 17, 23
TWO_GB = 2**31 - 1
BATCH = "batch"

_NP_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


def _np_dtype(name: str) -> Any:
    if name not in _NP_DTYPES:
        raise UnsupportedOpError(f"dtype '{name}' cannot be exported to ONNX")
    return _NP_DTYPES[name]


class _Exporter:
    def __init__(self, graph: Graph, opset: int, fp16: bool, keep_io_fp32: bool) -> None:
        self.ir = graph
        self.opset = opset
        self.fp16 = fp16
        self.keep_io_fp32 = keep_io_fp32
        self.fdt: Any = np.float16 if fp16 else np.float32
        self.names: set[str] = set()
        self.values: dict[Value, gs.Tensor] = {}
        self.nodes: list[gs.Node] = []
        self.opaque: dict[str, list[bytes]] = {}
        self.domain_opsets: dict[str, int] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.raw: dict[str, onnx.TensorProto] = {}  # initializers graphsurgeon cannot hold (4-bit types)
        self.sparse: dict[str, onnx.SparseTensorProto] = {}
        self.sparse_layouts: dict[str, str] = {}
        self.sparse_dense = False  # write sparse weights as dense initializers (runtimes without sparse_initializer)
        self.tables: dict[int, gs.Tensor] = {}  # shared codebook tables, by identity
        # dynamic dims: where each is read at run time, and the tensors already computed for them
        self.dim_sources = symbol_sources([(n, graph.node(n).meta[0].shape) for n in graph.inputs])
        self.dim_values: dict[str, gs.Tensor] = {}
        self.node_names: set[str] = set()
        self.cur: Node | None = None
        # Graph input/output names are reserved up front so internal tensors never take them.
        self.io_names = {self._io_name(graph.node(n)) for n in [*graph.inputs, *graph.outputs]}

    @staticmethod
    def _io_name(node: Node) -> str:
        return node.origin.source_name if node.origin.frontend == "onnx" and node.origin.source_name else node.id

    # ---- building blocks ---------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names or name in self.io_names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, name: str, value: np.ndarray | torch.Tensor, *, keep: bool = False) -> gs.Tensor:
        """An initializer; float32 data becomes float16 in fp16 mode unless `keep`.

        Big tensors stay out of graphsurgeon (a placeholder Variable) and are written into the
        model once after export: graphsurgeon would copy every weight three times.
        """
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.dtype == np.float32 and self.fp16 and not keep:
            arr = arr.astype(np.float16)
        arr = np.require(arr, requirements="C")  # (ascontiguousarray would make a scalar 1-D)
        if arr.nbytes < 4096:
            return gs.Constant(self.fresh(name), arr)
        v = gs.Variable(self.fresh(name), arr.dtype, arr.shape)
        self.weights[v.name] = arr
        return v

    def weight(self, name: str, w: Weight, *, keep: bool = False) -> gs.Tensor:
        """The one emission point of weights: dense as an initializer, affine-quantized as an integer
        initializer + DequantizeLinear (the QDQ form ONNX Runtime and TensorRT fuse), sparse as a
        `sparse_initializer`, a codebook as Gather(centroids, indices)."""
        if isinstance(w, torch.Tensor):
            return self.const(name, w, keep=keep)
        if isinstance(w, Affine):
            return self._affine(name, w)
        if isinstance(w, Sparse) and self.sparse_dense:
            return self.const(name, w.dense(), keep=keep)
        if isinstance(w, Sparse):
            values = w.values.detach().cpu().numpy()
            if values.dtype == np.float32 and self.fp16 and not keep:
                values = values.astype(np.float16)
            v = gs.Variable(self.fresh(name), values.dtype, list(w.shape))
            sp = onnx.SparseTensorProto()
            sp.values.CopyFrom(onnx.numpy_helper.from_array(values, v.name))
            sp.indices.CopyFrom(onnx.numpy_helper.from_array(w.indices.to(torch.int64).numpy(), v.name + ".indices"))
            sp.dims.extend(w.shape)
            self.sparse[v.name] = sp
            if w.layout != "coo":
                self.sparse_layouts[v.name] = w.layout_tag()
            return v
        if isinstance(w, Codebook):
            key = id(w.centroids)
            if key not in self.tables:  # one initializer per shared table
                self.tables[key] = self.const(f"{w.centroids.name or name}.centroids", w.centroids.values, keep=keep)
            idt = np.uint8 if w.k <= 256 else np.int32
            idx = self.const(f"{name}.indices", w.indices.numpy().astype(idt))
            if idt != np.int32:
                idx = self.op("Cast", [idx], {"to": onnx.TensorProto.INT32}, name=f"{name}/Cast")[0]
            return self.op("Gather", [self.tables[key], idx], {"axis": 0}, name=f"{name}/Gather")[0]
        raise UnsupportedOpError(f"weight '{name}' of form '{w.form}' has no ONNX form")

    def _affine(self, name: str, w: Affine) -> gs.Tensor:
        need = affine_opset(w)
        if self.opset < need:
            raise UnsupportedOpError(Diagnostic(
                f"weight '{name}' is {w.describe()}, which ONNX DequantizeLinear supports from opset {need}; "
                f"export at opset {need} or later", node=self.cur.id if self.cur else None))
        ttype = {("int", 4): onnx.TensorProto.INT4, ("uint", 4): onnx.TensorProto.UINT4,
                 ("int", 8): onnx.TensorProto.INT8, ("uint", 8): onnx.TensorProto.UINT8,
                 ("int", 16): onnx.TensorProto.INT16, ("int", 32): onnx.TensorProto.INT32}[(w.kind, w.bits)]
        store = w.storage()  # packed exactly as ONNX packs 4-bit types: two per byte, low nibble first

        def raw(key: str, shape: tuple[int, ...]) -> gs.Variable:
            v = gs.Variable(self.fresh(f"{name}.{key}"), None, list(shape))
            t = onnx.TensorProto(name=v.name, data_type=ttype, dims=list(shape))
            data = store[key]
            if w.bits == 4 and w.signed:  # storage keeps q - lo; ONNX stores two's complement nibbles
                data = pack_bits((Affine.unpack(data, w.static(), shape) & 0xF), 4)
            t.raw_data = data.contiguous().numpy().tobytes()
            self.raw[v.name] = t
            return v

        inputs = [raw("q", w.shape), self.const(f"{name}.scale", w.scale, keep=True)]
        if w.zero_point is None:  # written out as zeros all the same: ONNX Runtime fuses DQ → Gemm into QGemm only then
            store["zero_point"] = w._pack(torch.zeros(w.scale.shape, dtype=torch.int64))
        inputs.append(raw("zero_point", tuple(w.scale.shape)))
        attrs: dict[str, Any] = {}
        if w.axis is not None:
            attrs["axis"] = w.axis
        if w.block_size:
            attrs["block_size"] = w.block_size
        y = self.op("DequantizeLinear", inputs, attrs, name=f"{name}/DequantizeLinear")[0]
        return self.op("Cast", [y], {"to": onnx.TensorProto.FLOAT16}, name=f"{name}/Cast")[0] if self.fp16 else y

    def size(self, d: int) -> gs.Tensor:
        """A 1-element int64 tensor holding size `d`: a constant, or computed at run time from the graph
        inputs' shapes when `d` is dynamic."""
        if not is_dynamic(d):
            return self.ints("size", [int(d)])
        assert isinstance(d, Dim)

        def symbol(name: str) -> gs.Tensor:
            if name not in self.dim_values:
                nid, axis = self.dim_sources[name]
                shape = self.op("Shape", [self.values[(nid, 0)]], name=f"{nid}/shape")[0]
                self.dim_values[name] = self.op("Gather", [shape, self.ints(f"{nid}.axis{axis}", [axis])],
                                                {"axis": 0}, name=f"{nid}/{name}")[0]
            return self.dim_values[name]

        return lower(d.expr, symbol=symbol, const=lambda c: self.ints("size", [c]),
                     add=lambda a, b: self.op1("Add", [a, b]), mul=lambda a, b: self.op1("Mul", [a, b]),
                     floordiv=lambda a, b: self.op1("Div", [a, b]), mod=lambda a, b: self.op1("Mod", [a, b]))

    def shape_of(self, node: Node, out: tuple[int, ...], src: tuple[int, ...]) -> gs.Tensor:
        """A Reshape target for output shape `out` of an input of shape `src`: constants, 0 (copy) where
        a dynamic dim stays in place, -1 for one dim, run-time computations for other dynamic dims."""
        target = reshape_plan(out, src)
        if all(t is not None for t in target):
            return self.ints(f"{node.id}.shape", [int(t) for t in target])  # type: ignore[arg-type]
        parts = [self.ints(f"{node.id}.shape", [t]) if t is not None else self.size(d) for t, d in zip(target, out)]
        return self.op1("Concat", parts, {"axis": 0})

    def ints(self, name: str, values: list[int] | tuple[int, ...]) -> gs.Constant:
        return gs.Constant(self.fresh(name), np.asarray(list(values), dtype=np.int64))

    def param(self, key: str) -> gs.Tensor:
        assert self.cur is not None
        return self.weight(f"{self.cur.id}.{key}", self.cur.params[key])

    def op(self, op: str, inputs: list[gs.Tensor], attrs: dict[str, Any] | None = None, *, outputs: int = 1,
           name: str | None = None, domain: str | None = None) -> list[gs.Variable]:
        assert self.cur is not None
        base = name or (self.cur.id if self.cur.id not in self.node_names else f"{self.cur.id}/{op}")
        nname = self.fresh(base)
        outs = [gs.Variable(self.fresh(nname if outputs == 1 else f"{nname}:{i}")) for i in range(outputs)]
        self.nodes.append(gs.Node(op, nname, attrs or {}, list(inputs), outs, domain=domain))
        self.node_names.add(nname)
        return outs

    def op1(self, op: str, inputs: list[gs.Tensor], attrs: dict[str, Any] | None = None) -> gs.Variable:
        return self.op(op, inputs, attrs)[0]

    def empty(self) -> gs.Variable:
        return gs.Variable.empty()

    def scalar(self, name: str, v: float) -> gs.Tensor:
        return self.const(name, np.asarray(v, dtype=np.float32))

    # ---- the walk ---------------------------------------------------------------------------------
    def run(self) -> gs.Graph:
        g = self.ir
        batch = None
        inputs: list[gs.Variable] = []
        # with declared dynamic dims each dim says what it is; without, the leading dim is the batch
        symbolic = any(is_dynamic(d) for nid in g.inputs for d in g.node(nid).meta[0].shape)
        for nid in g.inputs:
            node = g.node(nid)
            meta = node.meta[0]
            shape: list[Any] = list(meta.shape)
            if symbolic:
                shape = [_dim_param(d) for d in shape]
            elif shape:
                batch = shape[0] if batch is None else batch
                shape[0] = BATCH
            dt = _np_dtype(meta.dtype)
            cast = self.fp16 and dt == np.float32
            v = gs.Variable(self._io_name(node), np.float32 if cast and self.keep_io_fp32 else
                            (np.float16 if cast else dt), shape)
            self.names.add(v.name)
            inputs.append(v)
            self.values[(nid, 0)] = v
            if cast and self.keep_io_fp32:
                self.cur = node
                self.values[(nid, 0)] = self.op1("Cast", [v], {"to": onnx.TensorProto.FLOAT16})
        for node in g.nodes():
            if node.kind in ("input", "output"):
                continue
            self.cur = node
            emit = EMITTERS.get(node.kind)
            if emit is None:
                raise UnsupportedOpError(Diagnostic(f"op kind '{node.kind}' of node '{node.id}' has no ONNX "
                                                    f"equivalent", node=node.id))
            ins = [self.values[v] for v in g.operands(node.id)]
            outs = emit(self, node, ins)
            for i, t in enumerate(outs):
                self.values[(node.id, i)] = t
        outputs: list[gs.Variable] = []
        taken: set[int] = {id(v) for v in inputs}
        # an ONNX model may list one tensor as two outputs, or an input as an output: the same tensor again
        named: dict[tuple[str, int], gs.Tensor] = {(v.name, id(v)): v for v in inputs}
        for nid in g.outputs:
            node = g.node(nid)
            self.cur = node
            src = self.values[g.operands(nid)[0]]
            meta = node.meta[0]
            dt = _np_dtype(meta.dtype)
            name = self._io_name(node)
            again = named.get((name, id(src)))
            if again is not None:
                outputs.append(again)
                continue
            first = id(src)
            if self.fp16 and dt == np.float32 and self.keep_io_fp32:
                src = self.op1("Cast", [src], {"to": onnx.TensorProto.FLOAT})
            elif self.fp16 and dt == np.float32:
                dt = np.float16
            if isinstance(src, gs.Constant) or src.name in self.weights or id(src) in taken:
                src = self.op1("Identity", [src])
            taken.add(id(src))
            self.names.discard(src.name)
            src.name = name
            shape = list(meta.shape)
            if symbolic:
                shape = [_dim_param(d) for d in shape]
            elif shape and batch is not None and shape[0] == batch:
                shape[0] = BATCH
            src.dtype, src.shape = dt, shape
            outputs.append(src)
            named[(name, first)] = src
        gs_graph = gs.Graph(self.nodes, inputs, outputs, name=g.name, opset=self.opset)
        return gs_graph


Emitter = Callable[[_Exporter, Node, list[gs.Tensor]], list[gs.Tensor]]
EMITTERS: dict[str, Emitter] = {}


emitter = registrar(EMITTERS)


def _payload_attrs(op_type: str, attrs: list[bytes], fp16: bool) -> list[onnx.AttributeProto]:
    out = []
    for raw in attrs:
        a = onnx.AttributeProto()
        a.ParseFromString(raw)
        # In fp16 mode float32 tensors are float16; a Cast to float32 would break the types downstream.
        if fp16 and op_type in ("Cast", "EyeLike", "RandomNormalLike", "RandomUniformLike") and a.name in ("to", "dtype") \
                and a.i == onnx.TensorProto.FLOAT:
            a.i = onnx.TensorProto.FLOAT16
        out.append(a)
    return out


def to_onnx(
    graph: Graph,
    *,
    opset: int | None = None,
    precision: Literal["fp32", "fp16"] = "fp32",
    keep_io_fp32: bool = True,
    metadata: Mapping[str, str] | None = None,
    sparse: Literal["initializer", "dense"] = "initializer",
) -> onnx.ModelProto:
    """Emits `graph` as ONNX; fp16 stores weights and computes in half precision (I/O fp32 when `keep_io_fp32`).

    `opset` None: 17, or the lowest opset that can hold every encoded weight (21 for 4-bit, 16-bit and
    block-quantized weights).

    `sparse`: "initializer" writes sparse weights as `sparse_initializer`s (ONNX Runtime densifies them when
    it loads the model; the ONNX checker's full type check and TensorRT do not take a sparse tensor as an
    op input), "dense" writes them as ordinary initializers.

    Raises `UnsupportedOpError` for nodes with no ONNX form (an opaque torch callable, names node and op type).
    """
    if opset is None:
        opset = max([17, *(affine_opset(w) for n in graph.nodes() for w in n.params.values()
                           if isinstance(w, Affine))])
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedOpError(f"cannot export at opset {opset}: netsqueeze emits opsets {MIN_OPSET}..{MAX_OPSET}")
    if precision not in ("fp32", "fp16"):
        raise UnsupportedOpError(f"unknown precision '{precision}' (expected 'fp32' or 'fp16')")
    if sparse not in ("initializer", "dense"):
        raise UnsupportedOpError(f"unknown sparse weight form '{sparse}' (expected 'initializer' or 'dense')")
    ex = _Exporter(graph, opset, precision == "fp16", keep_io_fp32)
    ex.sparse_dense = sparse == "dense"
    gsg = ex.run()
    model = gs.export_onnx(gsg, do_type_check=False)
    for wname, arr in ex.weights.items():
        t = model.graph.initializer.add(name=wname, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.dims.extend(arr.shape)
        t.raw_data = arr.tobytes()
    for raw in ex.raw.values():
        model.graph.initializer.append(raw)
    for sp in ex.sparse.values():
        model.graph.sparse_initializer.append(sp)
    # graphsurgeon lists typed placeholders as value_info; the initializers now define them
    defined = {*ex.raw, *ex.sparse}
    kept = [vi for vi in model.graph.value_info if vi.name not in defined]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    del model.opset_import[:]
    domains = {""} | {str(n.domain) for n in ex.nodes if n.domain}
    for d in sorted(domains):
        model.opset_import.append(helper.make_opsetid(d, opset if d == "" else ex.domain_opsets.get(d, 1)))
    # custom domains (com.microsoft, ...) have no IR-version table of their own: the default domain decides
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    # Opaque nodes get their original attributes back verbatim (graphsurgeon cannot carry raw AttributeProtos).
    for n in model.graph.node:
        if n.name in ex.opaque:
            del n.attribute[:]
            n.attribute.extend(_payload_attrs(n.op_type, ex.opaque[n.name], ex.fp16))
    model.producer_name = "netsqueeze"
    layouts = {SPARSE_LAYOUT_KEY + k: v for k, v in ex.sparse_layouts.items()}
    for k, v in sorted({**(metadata or {}), **layouts}.items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=str(k), value=str(v)))
    infer_shapes_inplace(model)
    return model


def _dim_param(d: int) -> Any:
    """An ONNX dim: its size, or for a dynamic dim its expression as the dim_param."""
    return str(expr_of(d)).replace(" ", "") if is_dynamic(d) else int(d)


def affine_opset(w: Affine) -> int:
    """The lowest opset whose DequantizeLinear reads this weight."""
    return 21 if w.bits in (4, 16) or w.block_size else 13 if w.axis is not None else 10


def infer_shapes_inplace(model: onnx.ModelProto) -> None:
    """ONNX shape inference on a weightless copy (initializers stubbed as external data): same value_info,
    without serialising the weights twice."""
    skeleton = onnx.ModelProto()
    graph = model.graph
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    for field in ("node", "input", "output", "sparse_initializer"):
        getattr(skeleton.graph, field).extend(getattr(graph, field))
    skeleton.functions.extend(model.functions)
    for t in graph.initializer:
        stub = skeleton.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="__weights__")
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Writes one file; weights go to an external data file next to it only when the model exceeds 2 GB."""
    path = os.fspath(path)
    if model.ByteSize() < TWO_GB:
        onnx.save_model(model, path)
        return
    # onnx moves the bytes out of the proto it saves: work on a copy so the caller's model stays whole.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)


# ---- emitters -------------------------------------------------------------------------------------------
def _meta(ex: _Exporter, node: Node) -> TensorMeta:
    return node.meta[0]


@emitter("constant")
def _constant(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return [ex.weight(node.id, node.params["value"])]


@emitter("sizes")
def _sizes(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    values, shape = list(node.attrs["values"]), [int(d) for d in node.attrs["shape"]]
    if not values:
        return [ex.const(node.id, np.zeros(shape, np.int64))]
    flat = ex.op1("Concat", [ex.size(d) for d in values], {"axis": 0}) if len(values) > 1 else ex.size(values[0])
    if shape == [len(values)]:
        return [ex.op1("Identity", [flat])]
    return ex.op("Reshape", [flat, ex.ints(f"{node.id}.shape", shape)])


@emitter("identity")
def _identity(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Identity", ins)


_SIMPLE = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish", "add": "Add",
           "sub": "Sub", "mul": "Mul", "div": "Div", "matmul": "MatMul"}


@emitter(*_SIMPLE)
def _simple(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op(_SIMPLE[node.kind], ins)


@emitter("conv", "conv_transpose")
def _conv(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    w = node.params["weight"]
    dims = w.dim() - 2
    attrs: dict[str, Any] = {
        "kernel_shape": list(w.shape[2:]),
        "strides": list(a.get("stride", [1] * dims)),
        "pads": list(a.get("padding", [0] * 2 * dims)),
        "dilations": list(a.get("dilation", [1] * dims)),
        "group": int(attr(node, "groups")),
    }
    if node.kind == "conv_transpose" and any(a.get("output_padding", [0] * dims)):
        attrs["output_padding"] = list(a["output_padding"])
    inputs = [ins[0], ex.param("weight")] + ([ex.param("bias")] if "bias" in node.params else [])
    return ex.op("Conv" if node.kind == "conv" else "ConvTranspose", inputs, attrs)


def _transposed(w: Weight) -> Weight:
    """A 2-D weight transposed, in its own form."""
    return w.t().contiguous() if isinstance(w, torch.Tensor) else w.permute((1, 0))


@emitter("linear")
def _linear(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    x = ex.ir.input_metas(node.id)[0]
    w = node.params["weight"]
    if len(x.shape) == 2:
        inputs = [ins[0], ex.param("weight")] + ([ex.param("bias")] if "bias" in node.params else [])
        return ex.op("Gemm", inputs, {"transB": 1})
    wt = ex.weight(f"{node.id}.weight", _transposed(w))
    if "bias" not in node.params:
        return ex.op("MatMul", [ins[0], wt])
    y = ex.op1("MatMul", [ins[0], wt])
    return ex.op("Add", [y, ex.param("bias")])


@emitter("batch_norm")
def _bn(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    p = node.params
    c = p["running_mean"].shape[0]
    w = ex.param("weight") if "weight" in p else ex.const(f"{node.id}.weight", torch.ones(c))
    b = ex.param("bias") if "bias" in p else ex.const(f"{node.id}.bias", torch.zeros(c))
    return ex.op("BatchNormalization", [ins[0], w, b, ex.param("running_mean"), ex.param("running_var")],
                 {"epsilon": float(node.attrs.get("eps", 1e-5))})


@emitter("layer_norm")
def _ln(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    ns = list(node.attrs["normalized_shape"])
    w = ex.param("weight") if "weight" in node.params else ex.const(f"{node.id}.weight", torch.ones(ns))
    inputs = [ins[0], w] + ([ex.param("bias")] if "bias" in node.params else [])
    return ex.op("LayerNormalization", inputs, {"axis": -len(ns), "epsilon": float(node.attrs.get("eps", 1e-5))})


@emitter("group_norm")
def _gn(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    x = ex.ir.input_metas(node.id)[0]
    c, g = x.shape[1], int(node.attrs["num_groups"])
    eps = float(node.attrs.get("eps", 1e-5))
    w = node.dense("weight") if "weight" in node.params else torch.ones(c)
    b = node.dense("bias") if "bias" in node.params else torch.zeros(c)
    if g == c:
        return ex.op("InstanceNormalization", [ins[0], ex.const(f"{node.id}.weight", w),
                                               ex.const(f"{node.id}.bias", b)], {"epsilon": eps})
    if ex.opset >= 21:
        return ex.op("GroupNormalization", [ins[0], ex.const(f"{node.id}.weight", w), ex.const(f"{node.id}.bias", b)],
                     {"epsilon": eps, "num_groups": g})
    # Before opset 21: normalise [N, G, -1] with InstanceNormalization, then the per-channel affine.
    r = ex.op1("Reshape", [ins[0], ex.ints(f"{node.id}.groups", [0, g, -1])])
    n = ex.op1("InstanceNormalization", [r, ex.const(f"{node.id}.ones", torch.ones(g)),
                                         ex.const(f"{node.id}.zeros", torch.zeros(g))], {"epsilon": eps})
    shape_of = ex.op1("Shape", [ins[0]])
    back = ex.op1("Reshape", [n, shape_of])
    bshape = [c] + [1] * (len(x.shape) - 2)
    y = ex.op1("Mul", [back, ex.const(f"{node.id}.weight", w.reshape(bshape))])
    return ex.op("Add", [y, ex.const(f"{node.id}.bias", b.reshape(bshape))])


@emitter("clip")
def _clip(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    lo, hi = a.get("min"), a.get("max")
    inputs = [ins[0], ex.const(f"{node.id}.min", np.asarray(lo, np.float32)) if lo is not None else ex.empty()]
    if hi is not None:
        inputs.append(ex.const(f"{node.id}.max", np.asarray(hi, np.float32)))
    return ex.op("Clip", inputs)


@emitter("leaky_relu")
def _leaky(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("LeakyRelu", ins, {"alpha": float(node.attrs.get("negative_slope", 0.01))})


@emitter("hardsigmoid")
def _hsig(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("HardSigmoid", ins, {"alpha": float(node.attrs.get("alpha", 1 / 6)),
                                      "beta": float(node.attrs.get("beta", 0.5))})


@emitter("silu")
def _silu(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Mul", [ins[0], ex.op1("Sigmoid", ins)])


@emitter("gelu")
def _gelu(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    approx = str(node.attrs.get("approximate", "none"))
    if ex.opset >= 20:
        return ex.op("Gelu", ins, {"approximate": approx})
    x = ins[0]
    if approx == "tanh":
        # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        x3 = ex.op1("Mul", [ex.op1("Mul", [x, x]), x])
        inner = ex.op1("Add", [x, ex.op1("Mul", [x3, ex.scalar(f"{node.id}.c", 0.044715)])])
        t = ex.op1("Tanh", [ex.op1("Mul", [inner, ex.scalar(f"{node.id}.k", float(np.sqrt(2 / np.pi)))])])
    else:
        t = ex.op1("Erf", [ex.op1("Div", [x, ex.scalar(f"{node.id}.sqrt2", float(np.sqrt(2)))])])
    one = ex.op1("Add", [t, ex.scalar(f"{node.id}.one", 1.0)])
    return ex.op("Mul", [ex.op1("Mul", [x, one]), ex.scalar(f"{node.id}.half", 0.5)])


@emitter("softmax")
def _softmax(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Softmax", ins, {"axis": int(node.attrs["axis"])})


@emitter("lrn")
def _lrn(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    return ex.op("LRN", ins, {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                              "beta": float(a.get("beta", 0.75)), "bias": float(a.get("bias", 1.0))})


@emitter("concat")
def _concat(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Concat", ins, {"axis": int(node.attrs["axis"])})


@emitter("split")
def _split(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    sizes = list(node.attrs["sizes"])
    return ex.op("Split", [ins[0], ex.ints(f"{node.id}.sizes", sizes)], {"axis": int(node.attrs["axis"])},
                 outputs=len(sizes))


@emitter("slice")
def _slice(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    return ex.op("Slice", [ins[0], ex.ints(f"{node.id}.starts", [a["start"]]), ex.ints(f"{node.id}.ends", [a["end"]]),
                           ex.ints(f"{node.id}.axes", [a["axis"]]), ex.ints(f"{node.id}.steps", [a.get("step", 1)])])


@emitter("gather")
def _gather(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Gather", [ins[0], ex.ints(f"{node.id}.indices", list(node.attrs["indices"]))],
                 {"axis": int(node.attrs["axis"])})

@emitter("flatten")
def _flatten(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    rank = len(ex.ir.input_metas(node.id)[0].shape)
    st = node.attrs.get("start_dim", 1) % max(rank, 1)
    en = node.attrs.get("end_dim", -1) % max(rank, 1)
    if en == rank - 1 and st == 1:  # ONNX Flatten is always 2-D, torch's only for start_dim 1
        return ex.op("Flatten", ins, {"axis": 1})
    src, out = ex.ir.input_metas(node.id)[0].shape, _meta(ex, node).shape
    if any(is_dynamic(d) for d in (*src, *out)):
        return ex.op("Reshape", [ins[0], ex.shape_of(node, out, src)])
    # 0 keeps the leading dims symbolic (batch), -1 takes the flattened block.
    tail = list(_meta(ex, node).shape[st + 1:])
    return ex.op("Reshape", [ins[0], ex.ints(f"{node.id}.shape", [0] * st + [-1] + tail)])


@emitter("reshape")
def _reshape(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    src = ex.ir.input_metas(node.id)[0].shape
    out = _meta(ex, node).shape
    if any(is_dynamic(d) for d in (*src, *out)):
        return ex.op("Reshape", [ins[0], ex.shape_of(node, out, src)])
    shape = list(node.attrs["shape"])
    # A leading dim equal to the input's batch dim is written as 0 (copy) so other batch sizes work.
    if shape and src and shape[0] == src[0] > 0:
        shape[0] = 0
    return ex.op("Reshape", [ins[0], ex.ints(f"{node.id}.shape", shape)])


@emitter("transpose")
def _transpose(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Transpose", ins, {"perm": list(node.attrs["perm"])})


@emitter("squeeze", "unsqueeze")
def _squeeze(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    axes = list(node.attrs["axes"])
    if node.kind == "squeeze":
        shape = ex.ir.input_metas(node.id)[0].shape
        axes = [a % len(shape) for a in axes if shape[a] == 1]  # torch ignores non-1 dims; ONNX rejects them
        if not axes:
            return ex.op("Identity", ins)
    return ex.op("Squeeze" if node.kind == "squeeze" else "Unsqueeze", [ins[0], ex.ints(f"{node.id}.axes", axes)])


@emitter("max_pool", "avg_pool")
def _pool(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    kernel = list(a["kernel"])
    dims = len(kernel)
    attrs: dict[str, Any] = {
        "kernel_shape": kernel,
        "strides": list(a.get("stride") or kernel),
        "pads": list(a.get("padding", [0] * 2 * dims)),
        "ceil_mode": int(bool(a.get("ceil_mode", False))),
    }
    if node.kind == "max_pool":
        attrs["dilations"] = list(a.get("dilation", [1] * dims))
        return ex.op("MaxPool", ins, attrs)
    attrs["count_include_pad"] = int(bool(a.get("count_include_pad", True)))
    return ex.op("AveragePool", ins, attrs)


@emitter("adaptive_avg_pool")
def _adaptive(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    x = ex.ir.input_metas(node.id)[0]
    out = list(node.attrs["output_size"])
    if all(o == 1 for o in out):
        return ex.op("GlobalAveragePool", ins)
    sp = x.shape[2:]
    if any(s % o for s, o in zip(sp, out)):
        raise UnsupportedOpError(Diagnostic(f"adaptive_avg_pool '{node.id}': output size {out} does not divide "
                                            f"input size {list(sp)}, which ONNX cannot express", node=node.id))
    k = [s // o for s, o in zip(sp, out)]
    return ex.op("AveragePool", ins, {"kernel_shape": k, "strides": k})


@emitter("mean")
def _mean(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    axes = list(node.attrs["axes"])
    keep = int(bool(node.attrs.get("keepdim", False)))
    if ex.opset >= 18:
        return ex.op("ReduceMean", [ins[0], ex.ints(f"{node.id}.axes", axes)], {"keepdims": keep})
    return ex.op("ReduceMean", ins, {"axes": axes, "keepdims": keep})


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@emitter("pad")
def _pad(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    mode = _PAD_MODES.get(str(a.get("mode", "constant")))
    if mode is None or (mode == "wrap" and ex.opset < 19):
        raise UnsupportedOpError(Diagnostic(f"pad '{node.id}': mode '{a.get('mode')}' has no ONNX form at opset "
                                            f"{ex.opset}", node=node.id))
    inputs = [ins[0], ex.ints(f"{node.id}.pads", list(a["pads"]))]
    if mode == "constant":
        dt = _np_dtype(_meta(ex, node).dtype)
        dt = ex.fdt if dt == np.float32 else dt
        inputs.append(gs.Constant(ex.fresh(f"{node.id}.value"), np.asarray(a.get("value", 0.0), dtype=dt)))
    return ex.op("Pad", inputs, {"mode": mode})


@emitter("resize")
def _resize(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    a = node.attrs
    x = ex.ir.input_metas(node.id)[0]
    mode = str(a.get("mode", "nearest"))
    mode = {"bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    attrs: dict[str, Any] = {
        "mode": mode,
        "coordinate_transformation_mode": str(a.get("coordinate_transformation_mode", "asymmetric" if mode ==
                                                    "nearest" else "half_pixel")),
        "nearest_mode": str(a.get("nearest_mode", "floor")),
    }
    if mode == "cubic":
        attrs["cubic_coeff_a"] = float(a.get("cubic_coeff_a", -0.75))
        attrs["exclude_outside"] = int(a.get("exclude_outside", 0))
    if a.get("scale"):
        scales = np.asarray([1.0, 1.0, *a["scale"]], dtype=np.float32)
        return ex.op("Resize", [ins[0], ex.empty(), gs.Constant(ex.fresh(f"{node.id}.scales"), scales)], attrs)
    size = list(a["size"])
    # sizes that follow the dynamic dims are computed at run time
    target = ex.op1("Concat", [ex.size(d) for d in size], {"axis": 0}) if any(is_dynamic(d) for d in size) \
        else ex.ints(f"{node.id}.sizes", [int(d) for d in size])
    if ex.opset >= 18:
        attrs["axes"] = list(range(2, len(x.shape)))
        return ex.op("Resize", [ins[0], ex.empty(), ex.empty(), target], attrs)
    # Opset 17 wants sizes for every axis: take N and C from the runtime shape to keep the batch free.
    nc = ex.op1("Slice", [ex.op1("Shape", [ins[0]]), ex.ints(f"{node.id}.s0", [0]), ex.ints(f"{node.id}.s1", [2])])
    sizes = ex.op1("Concat", [nc, target], {"axis": 0})
    return ex.op("Resize", [ins[0], ex.empty(), ex.empty(), sizes], attrs)


@emitter("embedding")
def _embedding(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    return ex.op("Gather", [ex.param("weight"), ins[0]], {"axis": 0})


@emitter("quantize", "dequantize")
def _qdq(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    x = ins[0]
    scale = ex.const(f"{node.id}.scale", node.dense("scale"), keep=True)
    zp = ex.const(f"{node.id}.zero_point", node.dense("zero_point"))
    axis = {"axis": int(node.attrs.get("axis", 1))} if node.params["scale"].dim() > 0 else {}
    if node.kind == "quantize":
        if ex.fp16:  # scales stay fp32 so the quantised values are unchanged
            x = ex.op1("Cast", [x], {"to": onnx.TensorProto.FLOAT})
        return ex.op("QuantizeLinear", [x, scale, zp], axis)
    y = ex.op1("DequantizeLinear", [x, scale, zp], axis) if ex.fp16 else None
    if y is not None:
        return ex.op("Cast", [y], {"to": onnx.TensorProto.FLOAT16})
    return ex.op("DequantizeLinear", [x, scale, zp], axis)


@emitter("attention")
def _attention(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    """nn.MultiheadAttention (no mask) written out as projections, scaled dot products and a softmax."""
    a, p = node.attrs, node.params
    mask_meta = ex.ir.input_metas(node.id)[3] if len(ins) > 3 else None
    if mask_meta is not None and len(mask_meta.shape) not in (2, 3):
        raise UnsupportedOpError(Diagnostic(f"attention '{node.id}': a mask of shape {list(mask_meta.shape)} "
                                            "cannot be exported to ONNX", node=node.id))
    h, dh = int(a["num_heads"]), int(a["head_dim"])
    bf = bool(a.get("batch_first", True))
    w = p["in_proj_weight"]
    b = p.get("in_proj_bias")
    heads = []
    for i, t in enumerate(ins[:3]):
        if not bf:  # [L, N, E] → [N, L, E]
            t = ex.op1("Transpose", [t], {"perm": [1, 0, 2]})
        rows = torch.arange(i * h * dh, (i + 1) * h * dh)
        proj = ex.op1("MatMul", [t, ex.weight(f"{node.id}.w{i}", _transposed(index_select(w, 0, rows)))])
        if b is not None:
            proj = ex.op1("Add", [proj, ex.weight(f"{node.id}.b{i}", index_select(b, 0, rows))])
        r = ex.op1("Reshape", [proj, ex.ints(f"{node.id}.heads{i}", [0, 0, h, dh])])
        heads.append(ex.op1("Transpose", [r], {"perm": [0, 2, 3, 1] if i == 1 else [0, 2, 1, 3]}))
    scores = ex.op1("Div", [ex.op1("MatMul", [heads[0], heads[1]]), ex.scalar(f"{node.id}.scale", float(np.sqrt(dh)))])
    if mask_meta is not None:
        mask = ins[3]
        if len(mask_meta.shape) == 3:  # [N·H, L, S] → [N, H, L, S]
            mask = ex.op1("Reshape", [mask, ex.ints(f"{node.id}.mask_shape", [-1, h, *mask_meta.shape[1:]])])
        if mask_meta.dtype == "bool":  # nn.MultiheadAttention: True = may not attend
            neg = ex.const(f"{node.id}.neg_inf", np.asarray(-np.inf, dtype=np.float32))
            scores = ex.op1("Where", [mask, neg, scores])
        else:
            scores = ex.op1("Add", [scores, mask])
    attn = ex.op1("Softmax", [scores], {"axis": -1})
    ctx = ex.op1("Transpose", [ex.op1("MatMul", [attn, heads[2]])], {"perm": [0, 2, 1, 3]})
    merged = ex.op1("Reshape", [ctx, ex.ints(f"{node.id}.merge", [0, 0, h * dh])])
    out = ex.op1("MatMul", [merged, ex.weight(f"{node.id}.out_w", _transposed(p["out_proj_weight"]))])
    if "out_proj_bias" in p:
        out = ex.op1("Add", [out, ex.param("out_proj_bias")])
    if not bf:
        out = ex.op1("Transpose", [out], {"perm": [1, 0, 2]})
    return [out]


# Ops whose newer versions moved attributes to inputs or changed meaning (not just added types), so a
# node imported at an older opset cannot be written verbatim at a newer one.
_REDEFINED = frozenset({
    "Slice", "Split", "Squeeze", "Unsqueeze", "Pad", "Resize", "Upsample", "Clip", "TopK", "Dropout", "Softmax",
    "LogSoftmax", "Hardmax", "Scatter", "MaxUnpool",
})

_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "float64": onnx.TensorProto.DOUBLE,
               "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32, "int8": onnx.TensorProto.INT8,
               "uint8": onnx.TensorProto.UINT8, "bool": onnx.TensorProto.BOOL}
_ATEN_UNARY = {"exp": "Exp", "log": "Log", "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs", "sin": "Sin", "cos": "Cos",
               "erf": "Erf", "floor": "Floor", "ceil": "Ceil", "bitwise_not": "Not", "logical_not": "Not",
               "reciprocal": "Reciprocal", "sign": "Sign"}
_ATEN_LOGICAL = {"__and__": "And", "bitwise_and": "And", "logical_and": "And", "__or__": "Or", "bitwise_or": "Or",
                 "logical_or": "Or", "__xor__": "Xor", "bitwise_xor": "Xor", "logical_xor": "Xor"}
_ATEN_COMPARE = {"eq": ("Equal", False), "ne": ("Equal", True), "gt": ("Greater", False), "lt": ("Less", False),
                 "ge": ("GreaterOrEqual", False), "le": ("LessOrEqual", False)}


def _aten_to_onnx(ex: _Exporter, node: Node, call: AtenCall, ins: list[gs.Tensor]) -> list[gs.Tensor] | None:
    """ONNX for the aten calls torch.export leaves in library models (masks, casts, cumulative sums, ...);
    None for a call it does not know."""
    in_metas = ex.ir.input_metas(node.id)

    out_dt = node.meta[0].dtype

    def arg(a: Any, dtype: str | None = None) -> gs.Tensor:
        """An operand, or a scalar/tensor constant in `dtype` (the first operand's by default)."""
        if isinstance(a, Slot):
            return ins[a.index]
        if isinstance(a, torch.Tensor):  # a constant tensor argument keeps its own dtype
            return ex.const(f"{node.id}.c", a)
        dt = _np_dtype(dtype or (in_metas[0].dtype if in_metas else "float32"))
        if dt == np.float32 and ex.fp16:
            dt = np.float16
        return ex.const(f"{node.id}.c", torch.as_tensor(a).numpy().astype(dt))

    name, a = call.packet, call.args
    if name in ("to", "_to_copy", "type_as"):
        if out_dt not in _ONNX_TYPES:
            return None
        to = onnx.TensorProto.FLOAT16 if out_dt == "float32" and ex.fp16 else _ONNX_TYPES[out_dt]
        return ex.op("Cast", [arg(a[0])], {"to": to})
    if name == "where" and len(a) == 3:  # constants take the result's dtype
        return ex.op("Where", [arg(a[0]), arg(a[1], out_dt), arg(a[2], out_dt)])
    if name in ("view", "reshape", "_unsafe_view") and len(a) == 2 and isinstance(a[1], (list, tuple)):
        sizes = [ex.size(d) if is_dynamic(d) else ex.ints(f"{node.id}.dim", [int(d)]) for d in a[1]]
        return ex.op("Reshape", [arg(a[0]), ex.op1("Concat", sizes, {"axis": 0})])
    if name == "expand" and len(a) >= 2 and isinstance(a[1], (list, tuple)):
        # ONNX Expand broadcasts: a -1 (keep the input's size) is a 1
        sizes = [ex.size(d) if is_dynamic(d) else ex.ints(f"{node.id}.dim", [max(int(d), 1) if int(d) != -1 else 1])
                 for d in a[1]]
        return ex.op("Expand", [arg(a[0]), ex.op1("Concat", sizes, {"axis": 0})])
    def dtype_of(x: Any) -> str:
        if isinstance(x, Slot):
            return in_metas[x.index].dtype
        return str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor) else "int64"

    def stacked(indices: list[Any]) -> gs.Tensor:
        """[..., k] coordinates of x[i0, i1, ...] over the leading axes (a boolean mask: its non-zeros)."""
        if len(indices) == 1 and dtype_of(indices[0]) == "bool":
            return ex.op1("Transpose", [ex.op1("NonZero", [arg(indices[0])])], {"perm": [1, 0]})
        idx = [ex.op1("Cast", [arg(i, "int64")], {"to": onnx.TensorProto.INT64}) for i in indices]
        zero = idx[0]
        for i in idx[1:]:
            zero = ex.op1("Add", [zero, i])
        zero = ex.op1("Mul", [zero, ex.ints(f"{node.id}.zero", [0])])
        last = ex.ints(f"{node.id}.last", [-1])
        parts = [ex.op1("Unsqueeze", [ex.op1("Add", [i, zero]), last]) for i in idx]
        return ex.op1("Concat", parts, {"axis": -1}) if len(parts) > 1 else parts[0]

    if name == "index" and len(a) == 2 and isinstance(a[1], (list, tuple)) and a[1] \
            and all(x is not None for x in a[1]) and not (len(a[1]) == 1 and dtype_of(a[1][0]) == "bool"):
        # x[i0, i1, ...] over the leading axes: the indices broadcast together, then GatherND
        return ex.op("GatherND", [arg(a[0]), stacked(list(a[1]))])
    if name == "index_put" and len(a) >= 3 and isinstance(a[1], (list, tuple)) and a[1] \
            and all(x is not None for x in a[1]) and out_dt in _ONNX_TYPES:
        # x[indices] = values: ScatterND, the values broadcast to what the indices select
        accumulate = bool(a[3]) if len(a) > 3 else bool(call.kwargs.get("accumulate", False))
        data, where = arg(a[0], out_dt), stacked(list(a[1]))
        shape = ex.op1("Shape", [ex.op1("GatherND", [data, where])])
        values = ex.op1("Cast", [arg(a[2], out_dt)], {"to": _ONNX_TYPES[out_dt]})
        updates = ex.op1("Expand", [values, shape])
        return ex.op("ScatterND", [data, where, updates], {"reduction": "add"} if accumulate else {})
    if name == "masked_fill" and len(a) == 3 and isinstance(a[1], Slot) and not isinstance(a[2], Slot):
        return ex.op("Where", [arg(a[1]), arg(a[2], out_dt), arg(a[0])])  # the mask's value where it is set
    if name in ("zeros_like", "ones_like", "full_like") and a and isinstance(a[0], Slot) and out_dt in _ONNX_TYPES:
        # the shape of an operand (a mask expanded to a dynamic batch), filled
        fill = 0.0 if name == "zeros_like" else 1.0 if name == "ones_like" else float(a[1])
        value = onnx.helper.make_tensor("value", _ONNX_TYPES[out_dt], [1], [fill])
        return ex.op("ConstantOfShape", [ex.op1("Shape", [arg(a[0])])], {"value": value})
    if name in ("zeros", "ones", "full") and a and isinstance(a[0], (list, tuple)) and out_dt in _ONNX_TYPES:
        fill = 0.0 if name == "zeros" else 1.0 if name == "ones" else float(a[1])
        sizes = [ex.size(d) if is_dynamic(d) else ex.ints(f"{node.id}.dim", [int(d)]) for d in a[0]]
        shape = ex.op1("Concat", sizes, {"axis": 0}) if sizes else ex.ints(f"{node.id}.shape", [])
        value = onnx.helper.make_tensor("value", _ONNX_TYPES[out_dt], [1], [fill])
        return ex.op("ConstantOfShape", [shape], {"value": value})
    if (name in ("minimum", "maximum") or (name in ("min", "max") and call.overload == "other")) and len(a) == 2:
        return ex.op("Min" if name.startswith("min") else "Max", [arg(a[0], out_dt), arg(a[1], out_dt)])
    if name in ("new_zeros", "new_ones") and len(a) >= 2 and isinstance(a[1], (list, tuple)) and out_dt in _ONNX_TYPES:
        sizes = [ex.size(d) if is_dynamic(d) else ex.ints(f"{node.id}.dim", [int(d)]) for d in a[1]]
        shape = ex.op1("Concat", sizes, {"axis": 0}) if sizes else ex.ints(f"{node.id}.shape", [])
        value = onnx.helper.make_tensor("value", _ONNX_TYPES[out_dt], [1], [1.0 if name == "new_ones" else 0.0])
        return ex.op("ConstantOfShape", [shape], {"value": value})
    if name == "slice" and a and not any(isinstance(x, Slot) for x in a[1:]):
        # x[..., start:end:step] on one axis; a bound may be a dynamic dim (a buffer of positions cut to the sequence)
        axis, start, end = (a[1] if len(a) > 1 else 0), (a[2] if len(a) > 2 else None), (a[3] if len(a) > 3 else None)
        step = a[4] if len(a) > 4 else 1

        def bound(v: Any, default: int) -> gs.Tensor:
            return ex.size(v) if is_dynamic(v) else ex.ints(f"{node.id}.bound", [default if v is None else int(v)])

        return ex.op("Slice", [arg(a[0]), bound(start, 0), bound(end, 2**63 - 1), ex.ints(f"{node.id}.axis", [int(axis)]),
                               ex.ints(f"{node.id}.step", [int(step)])])
    if name == "arange":
        ends = [x for x in a if not isinstance(x, torch.Tensor)]
        start, end, step = (0, ends[0], 1) if len(ends) == 1 else (ends[0], ends[1], ends[2] if len(ends) > 2 else 1)
        dt = out_dt if out_dt in _ONNX_TYPES else "int64"

        def scalar(v: Any) -> gs.Tensor:
            t = ex.size(v) if is_dynamic(v) else ex.ints(f"{node.id}.r", [int(v)])
            t = ex.op1("Squeeze", [t, ex.ints(f"{node.id}.ax", [0])])
            return t if dt == "int64" else ex.op1("Cast", [t], {"to": _ONNX_TYPES[dt]})

        return ex.op("Range", [scalar(start), scalar(end), scalar(step)])
    if name == "rsqrt":
        return ex.op("Reciprocal", [ex.op1("Sqrt", [arg(a[0])])])
    if name in _ATEN_UNARY:
        return ex.op(_ATEN_UNARY[name], [arg(a[0])])
    if name in _ATEN_LOGICAL and len(a) == 2 and out_dt == "bool":
        return ex.op(_ATEN_LOGICAL[name], [arg(a[0], "bool"), arg(a[1], "bool")])
    if name in _ATEN_COMPARE and len(a) == 2:
        op, negate = _ATEN_COMPARE[name]
        y = ex.op1(op, [arg(a[0]), arg(a[1], in_metas[0].dtype)])
        return ex.op("Not", [y]) if negate else [y]
    if name == "cumsum":
        return ex.op("CumSum", [arg(a[0]), ex.ints(f"{node.id}.axis", [int(a[1])])])
    if name == "gather" and len(a) >= 3 and isinstance(a[2], Slot):
        return ex.op("GatherElements", [arg(a[0]), arg(a[2])], {"axis": int(a[1])})
    if name == "repeat" and len(a[1]) == len(in_metas[0].shape):
        return ex.op("Tile", [arg(a[0]), ex.ints(f"{node.id}.repeats", [int(r) for r in a[1]])])
    if name == "roll" and len(a) >= 3 and len(a[1]) == len(a[2]) > 0 and all(
            not is_dynamic(in_metas[0].shape[int(d)]) for d in a[2]):
        # torch.roll(x, shifts, dims): y[i] = x[(i − s) mod n] along each dim, the two slices x[n−s:], x[:n−s] joined
        x = x0 = arg(a[0])
        for s, d in zip(a[1], a[2]):
            n = int(in_metas[0].shape[int(d)])
            s = int(s) % n
            if s:
                def part(lo: int, hi: int, x: gs.Tensor = x, d: int = int(d)) -> gs.Tensor:
                    return ex.op1("Slice", [x, ex.ints(f"{node.id}.lo", [lo]), ex.ints(f"{node.id}.hi", [hi]),
                                            ex.ints(f"{node.id}.a", [d])])

                x = ex.op1("Concat", [part(n - s, n), part(0, n - s)], {"axis": d})
        return [x] if x is not x0 else ex.op("Identity", [x])
    if name == "flip":
        x = arg(a[0])
        for d in a[1]:
            x = ex.op1("Slice", [x, ex.ints(f"{node.id}.s", [-1]), ex.ints(f"{node.id}.e", [-(2**63)]),
                                 ex.ints(f"{node.id}.a", [int(d)]), ex.ints(f"{node.id}.st", [-1])])
        return [x]
    if name == "div" and call.kwargs.get("rounding_mode") == "floor" and out_dt.startswith("float"):
        return ex.op("Floor", [ex.op1("Div", [arg(a[0]), arg(a[1])])])
    if name == "div" and call.kwargs.get("rounding_mode") == "floor" and out_dt.startswith("int"):
        # integer Div truncates: step down where the remainder is non-zero and the signs differ
        x, y = arg(a[0]), arg(a[1], in_metas[0].dtype)
        q = ex.op1("Div", [x, y])
        r = ex.op1("Sub", [x, ex.op1("Mul", [q, y])])
        zero = arg(0, in_metas[0].dtype)
        fix = ex.op1("And", [ex.op1("Not", [ex.op1("Equal", [r, zero])]),
                             ex.op1("Xor", [ex.op1("Less", [r, zero]), ex.op1("Less", [y, zero])])])
        return ex.op("Sub", [q, ex.op1("Cast", [fix], {"to": _ONNX_TYPES[out_dt]})])
    if name == "pow" and len(a) == 2 and not isinstance(a[1], Slot):
        return ex.op("Pow", [arg(a[0]), arg(a[1])])
    return None


@emitter("opaque")
def _opaque(ex: _Exporter, node: Node, ins: list[gs.Tensor]) -> list[gs.Tensor]:
    o = node.origin
    payload = o.payload
    if isinstance(payload, AtenCall) and payload.namespace == "aten" and len(node.meta) == 1:
        outs = _aten_to_onnx(ex, node, payload, ins)
        if outs is not None:
            return outs
    if o.frontend != "onnx" or not isinstance(payload, dict) or "op_type" not in payload:
        raise UnsupportedOpError(Diagnostic(
            f"node '{node.id}' is an opaque {o.frontend or 'unknown'} op ({o.op_type or 'unknown op type'}) with no "
            f"ONNX equivalent", node=node.id))
    op_type, domain = str(payload["op_type"]), str(payload.get("domain", ""))
    if domain in ("", "ai.onnx"):
        src = int(payload.get("opset", ex.opset))
        try:
            then = onnx.defs.get_schema(op_type, src, "").since_version
            now = onnx.defs.get_schema(op_type, ex.opset, "").since_version
        except onnx.defs.SchemaError:
            then = now = -1
        if then != now and (op_type in _REDEFINED or op_type.startswith("Reduce")):
            raise UnsupportedOpError(Diagnostic(
                f"node '{node.id}' ({op_type}) was imported at opset {src} and its definition changed by opset "
                f"{ex.opset}; netsqueeze cannot re-emit it verbatim", node=node.id))
    else:
        ex.domain_opsets.setdefault(domain, int(payload.get("domain_opset", 1)))
    outs = ex.op(op_type, ins, outputs=int(payload.get("num_outputs", len(node.meta))), domain=domain or None)
    ex.opaque[ex.nodes[-1].name] = list(payload.get("attributes", []))
    if ex.fp16:
        for t, m in zip(outs, node.meta):
            if m.dtype == "float32":
                t.dtype = np.float16
    return list(outs)
