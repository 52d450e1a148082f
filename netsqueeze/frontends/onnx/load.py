"""Reading an ONNX model: the file (never written to), its opset, node ids, and structure checks."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from netsqueeze.errors import CaptureError, Diagnostic

MIN_OPSET, MAX_OPSET = 7, 23
_DEFAULT_DOMAINS = ("", "ai.onnx")


def onnx_dtype_name(elem_type: int, what: str = "a tensor", node: str | None = None) -> str:
    """ONNX element type → IR dtype name (torch's spelling: float32, int64, ...); an element type ONNX does
    not define is a `CaptureError` naming `what`."""
    try:
        np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError, TypeError):
        raise _fail(f"{what} has element type {elem_type}, which ONNX does not define", node=node) from None
    return "bfloat16" if elem_type == onnx.TensorProto.BFLOAT16 else str(np.dtype(np_dtype))


def _fail(msg: str, node: str | None = None) -> CaptureError:
    return CaptureError(Diagnostic(msg, node=node))


def _graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from g.initializer
    for t in g.sparse_initializer:
        yield from (t.values, t.indices)
    yield from _node_tensors(g.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for n in nodes:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _graph_tensors(g)


def _external_locations(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, `location`) of every tensor whose data the model keeps in another file, in file order."""
    tensors = itertools.chain(_graph_tensors(proto.graph), *(_node_tensors(f.node) for f in proto.functions))
    out = []
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = next((e.value for e in t.external_data if e.key == "location"), "")
            out.append((t.name, where))
    return out


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external-data files an ONNX model file names (beside the model, as ONNX resolves them), each once;
    none for a file that cannot be read (loading it says why)."""
    try:
        proto = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception:
        return []
    base = Path(os.path.dirname(os.fspath(path)))
    return list(dict.fromkeys(base / where for _, where in _external_locations(proto) if where))


def load_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Reads a model without ever writing to its file; a given ModelProto is only read, never changed. An
    external-data file the model names that is missing is a `CaptureError` naming it."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise _fail(f"cannot read ONNX model '{path}': no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-ish and others for corrupt files
        raise _fail(f"cannot parse ONNX model '{path}': the file is malformed or truncated "
                    f"({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise _fail(f"cannot parse ONNX model '{path}': the file is malformed or truncated (it holds no graph)")
    external = _external_locations(proto)
    for name, where in external:
        file = os.path.join(os.path.dirname(path), where)
        if where and not os.path.exists(file):
            raise _fail(f"cannot read ONNX model '{path}': the external data file '{file}' it references "
                        f"(tensor '{name}') does not exist")
        if where and not os.path.isfile(file):
            raise _fail(f"cannot read ONNX model '{path}': the external data file '{file}' it references "
                        f"(tensor '{name}') is not a regular file")
    try:
        if external:
            onnx.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
    except Exception as e:  # a location outside the model's directory, data past the end of the file, ...
        raise _fail(f"cannot read ONNX model '{path}': its external data cannot be loaded "
                    f"({type(e).__name__}: {e})") from None
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


_A = onnx.AttributeProto
_T = onnx.TensorProto
# the field that holds each attribute type's value
_ATTR_FIELDS = {_A.FLOAT: "f", _A.INT: "i", _A.STRING: "s", _A.TENSOR: "t", _A.GRAPH: "g",
                _A.SPARSE_TENSOR: "sparse_tensor", _A.TYPE_PROTO: "tp", _A.FLOATS: "floats", _A.INTS: "ints",
                _A.STRINGS: "strings", _A.TENSORS: "tensors", _A.GRAPHS: "graphs",
                _A.SPARSE_TENSORS: "sparse_tensors", _A.TYPE_PROTOS: "type_protos"}
_SCALAR_FIELDS = ("f", "i", "s", "t", "g", "sparse_tensor", "tp")
_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
# element types stored several to a byte: bits per element
_SUB_BYTE_BITS = {getattr(_T, k): b for k, b in (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2),
                                                 ("INT2", 2)) if hasattr(_T, k)}
_UNSIZED = {getattr(_T, k) for k in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(_T, k)}


def _attr_code(t: object) -> int:
    """A schema's attribute type (a pybind enum) as the AttributeProto type number."""
    return int(t.value)  # type: ignore[attr-defined]


def _attr_type_name(t: int) -> str:
    return _A.AttributeType.Name(t) if t in _A.AttributeType.values() else str(t)


def tensor_problem(t: onnx.TensorProto) -> str | None:
    """What is wrong with a tensor's element type, dims and data (phrased to follow its name), or None."""
    dt = t.data_type
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(dt)).itemsize
    except (KeyError, ValueError, TypeError):
        return f"has element type {dt}, which ONNX does not define"
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        return f"has negative dims {dims}"
    if t.data_location == _T.EXTERNAL or dt in _UNSIZED:
        return None
    n = math.prod(dims)
    tname = _T.DataType.Name(dt)
    bits = _SUB_BYTE_BITS.get(dt)
    if t.HasField("raw_data"):
        if dt == _T.STRING:
            return "is a STRING tensor with raw data"
        need = -(-n * bits // 8) if bits else n * itemsize
        if len(t.raw_data) != need:
            return f"holds {len(t.raw_data)} bytes of data, but its dims {dims} and type {tname} need {need}"
        return None
    field = helper.tensor_dtype_to_field(dt)
    for other in _DATA_FIELDS:
        if other != field and len(getattr(t, other)):
            return f"stores its data in {other}, which does not hold {tname} values"
    per_value = 2 if dt in (_T.COMPLEX64, _T.COMPLEX128) else 1
    need = -(-n * bits // 8) if bits else n * per_value  # sub-byte types: packed bytes, one per int32_data entry
    have = len(getattr(t, field))
    if have != need:
        return f"holds {have} values, but its dims {dims} and type {tname} need {need}"
    return None


def _check_attribute(a: onnx.AttributeProto, where: str, nid: str) -> None:
    field = _ATTR_FIELDS.get(a.type)
    if field is None:
        raise _fail(f"{where}: attribute '{a.name}' has attribute type {a.type}, which ONNX does not define", nid)
    for other in _SCALAR_FIELDS:
        if other != field and a.HasField(other):
            raise _fail(f"{where}: attribute '{a.name}' is declared {_attr_type_name(a.type)} but holds a value in "
                        f"field '{other}'", nid)
    for other in set(_ATTR_FIELDS.values()) - set(_SCALAR_FIELDS) - {field}:
        if len(getattr(a, other)):
            raise _fail(f"{where}: attribute '{a.name}' is declared {_attr_type_name(a.type)} but holds values in "
                        f"field '{other}'", nid)
    for raw in [a.s] if a.type == _A.STRING else list(a.strings) if a.type == _A.STRINGS else []:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(f"{where}: attribute '{a.name}' is not UTF-8 text ({raw[:16]!r})", nid) from None
    for t in [a.t] if a.type == _A.TENSOR else list(a.tensors) if a.type == _A.TENSORS else []:
        problem = tensor_problem(t)
        if problem:
            raise _fail(f"{where}: the tensor of attribute '{a.name}' {problem}", nid)


def _arity(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo} or more" if hi >= 2**31 - 1 else f"{lo} to {hi}"


def check_node(n: onnx.NodeProto, nid: str, opset: int) -> None:
    """Attributes well-formed (type tag, value field, UTF-8 text, tensor data); for default-domain ops with a
    schema at `opset`: attribute names and types, required attributes, input and output counts."""
    where = f"node '{nid}' ({n.op_type})"
    for a in n.attribute:
        _check_attribute(a, where, nid)
    if (n.domain or "") not in _DEFAULT_DOMAINS:
        return
    try:
        schema = onnx.defs.get_schema(n.op_type, opset, "")
    except onnx.defs.SchemaError:
        return  # not an ONNX op at this opset: kept opaque, or refused, later
    names = set()
    for a in n.attribute:
        spec = schema.attributes.get(a.name)
        if spec is None:
            raise _fail(f"{where} has attribute '{a.name}', which {n.op_type} (opset {opset}) does not define", nid)
        if _attr_code(spec.type) != a.type:
            raise _fail(f"{where}: attribute '{a.name}' is {_attr_type_name(a.type)}, but {n.op_type} takes "
                        f"{_attr_type_name(_attr_code(spec.type))}", nid)
        if a.name in names:
            raise _fail(f"{where} has attribute '{a.name}' twice", nid)
        names.add(a.name)
    for name, spec in schema.attributes.items():
        if spec.required and name not in names:
            raise _fail(f"{where} lacks the required attribute '{name}'", nid)
    ins = list(n.input)
    while ins and not ins[-1]:
        ins.pop()
    if not schema.min_input <= len(ins) <= schema.max_input:
        raise _fail(f"{where} has {len(ins)} inputs; {n.op_type} (opset {opset}) takes "
                    f"{_arity(schema.min_input, schema.max_input)}", nid)
    for i, name in enumerate(ins):
        if not name and schema.inputs and i < len(schema.inputs) \
                and schema.inputs[i].option == onnx.defs.OpSchema.FormalParameterOption.Single:
            raise _fail(f"{where}: input {i} ('{schema.inputs[i].name}') is required but left empty", nid)
    outs = list(n.output)
    while outs and not outs[-1]:
        outs.pop()
    if not max(schema.min_output, 1) <= len(outs) <= schema.max_output:
        raise _fail(f"{where} has {len(outs)} outputs; {n.op_type} (opset {opset}) gives "
                    f"{_arity(max(schema.min_output, 1), schema.max_output)}", nid)


def _check_value_info(vi: onnx.ValueInfoProto, what: str) -> None:
    if not vi.type.HasField("tensor_type"):
        raise _fail(f"{what} '{vi.name}' is not a tensor ({vi.type.WhichOneof('value') or 'no type'}); "
                    f"netsqueeze imports tensor inputs and outputs only")
    tt = vi.type.tensor_type
    if tt.elem_type:
        onnx_dtype_name(tt.elem_type, f"{what} '{vi.name}'")
    elif what == "model input":
        raise _fail(f"{what} '{vi.name}' has no element type (elem_type 0)")
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value < 0:
            raise _fail(f"{what} '{vi.name}' has a negative dimension {d.dim_value}")


def check_contents(proto: onnx.ModelProto, ids: list[str], opset: int) -> None:
    """What the frontend reads, validated before it reads it: initializers (element type, dims, data size),
    graph inputs, outputs and value_info (tensor types), and every node (`check_node`)."""
    g = proto.graph
    for t in g.initializer:
        problem = tensor_problem(t)
        if problem:
            raise _fail(f"initializer '{t.name}' {problem}")
    for vis, what in ((g.input, "model input"), (g.output, "model output")):
        for vi in vis:
            _check_value_info(vi, what)
    for vi in g.value_info:
        if vi.type.HasField("tensor_type"):
            _check_value_info(vi, "value_info entry")
    for i, n in enumerate(g.node):
        check_node(n, ids[i], opset)


def _text_problem(v: object) -> bool:
    return not isinstance(v, str)  # protobuf hands back bytes for a string field that is not UTF-8


def _check_graph_text(g: onnx.GraphProto, where: str) -> None:
    if _text_problem(g.name):
        raise _fail(f"{where} has a name that is not UTF-8 text ({g.name!r})")
    for field in ("input", "output", "value_info", "initializer"):
        for i, item in enumerate(getattr(g, field)):
            if _text_problem(item.name):
                raise _fail(f"{where}: {field} {i} has a name that is not UTF-8 text ({item.name!r})")
    for i, n in enumerate(g.node):
        label = n.name if isinstance(n.name, str) and n.name else f"#{i}"
        for what, v in (("name", n.name), ("op type", n.op_type), ("domain", n.domain)):
            if _text_problem(v):
                raise _fail(f"{where}: node {label} has a{'n' if what == 'op type' else ''} {what} that is not "
                            f"UTF-8 text ({v!r})", node=label)
        for t in [*n.input, *n.output]:
            if _text_problem(t):
                raise _fail(f"{where}: node {label} ({n.op_type}) names a tensor that is not UTF-8 text ({t!r})",
                            node=label)
        for a in n.attribute:
            if _text_problem(a.name):
                raise _fail(f"{where}: node {label} ({n.op_type}) has an attribute name that is not UTF-8 text "
                            f"({a.name!r})", node=label)
            for sub in [a.g] if a.type == _A.GRAPH else list(a.graphs):
                _check_graph_text(sub, f"{where}, subgraph of node {label}")


def check_text(proto: onnx.ModelProto) -> None:
    """Every name the frontend reads is text: protobuf keeps a string field that is not UTF-8 as bytes."""
    for imp in proto.opset_import:
        if _text_problem(imp.domain):
            raise _fail(f"the model imports an opset of a domain that is not UTF-8 text ({imp.domain!r})")
    for what, v in (("producer name", proto.producer_name), ("producer version", proto.producer_version)):
        if _text_problem(v):
            raise _fail(f"the model's {what} is not UTF-8 text ({v!r})")
    for p in proto.metadata_props:
        if _text_problem(p.key) or _text_problem(p.value):
            raise _fail(f"the model's metadata entry {p.key!r} is not UTF-8 text")
    _check_graph_text(proto.graph, "the graph")


def given_shape_problem(vi: onnx.ValueInfoProto, given: Sequence[int]) -> str | None:
    """What is wrong with sizes `given` for model input `vi` (phrased to follow the name of what gave them): a
    rank other than the input's, or a size other than one the model fixes; None when they fit."""
    if not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if len(given) != len(dims):
        return f"has rank {len(given)} but the model input has rank {len(dims)}"
    for axis, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0 and int(given[axis]) != d.dim_value:
            return f"gives {int(given[axis])} for axis {axis}, which the model fixes at {d.dim_value}"
    return None


def declared_inputs(path: str | os.PathLike[str]) -> list[onnx.ValueInfoProto] | None:
    """The inputs an ONNX model file declares (initializers excluded), read without its external data; None for
    a file that cannot be read (loading it says why)."""
    try:
        proto = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception:
        return None
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def _static_shape(vi: onnx.ValueInfoProto, given: tuple[int, ...] | None, source: str | None = None
                  ) -> tuple[tuple[int, ...], tuple[str | None, ...], list[str]]:
    """(example sizes, the name of each dynamic dim or None, notes) of a model input.

    A dim the file leaves open (a `dim_param` or no value) stays dynamic under its `dim_param` (or
    '<input>_<axis>'); its size for analysis comes from `given` (input_shapes / the example inputs). Without
    one, a leading (batch) dim is taken as 1 with a note; any other open dim is an error naming it. `source`
    says what gave `given` when it was not `input_shapes` (an example input).
    """
    what = source or f"input_shapes['{vi.name}']"
    dims = vi.type.tensor_type.shape.dim
    if given is None and not vi.type.tensor_type.HasField("shape"):
        raise _fail(f"model input '{vi.name}' declares no shape; pass input_shapes={{'{vi.name}': (...)}}")
    if given is not None and (problem := given_shape_problem(vi, given)):
        raise _fail(f"{what} {problem}")
    if not vi.type.tensor_type.HasField("shape"):
        return tuple(int(d) for d in given or ()), (None,) * len(given or ()), []
    sizes: list[int] = []
    names: list[str | None] = []
    notes: list[str] = []
    for axis, d in enumerate(dims):
        fixed = d.HasField("dim_value") and d.dim_value > 0
        name = None if fixed else (d.dim_param or f"{vi.name}_{axis}")
        if given is not None:
            sizes.append(int(given[axis]))
        elif fixed:
            sizes.append(int(d.dim_value))
        elif axis == 0:
            sizes.append(1)
            notes.append(f"input '{vi.name}': dynamic dim '{name}' (axis 0) analysed at size 1 (no example size "
                         "given); it stays dynamic in the emitted model")
        else:
            raise _fail(f"model input '{vi.name}' has the dynamic dim '{name}' (axis {axis}) and no size for it: "
                        f"pass example_inputs or input_shapes={{'{vi.name}': (...)}}")
        names.append(name)
    return tuple(sizes), tuple(names), notes


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
