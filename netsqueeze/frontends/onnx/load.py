"""Reading an ONNX model: the file (never written to), its opset, node ids, and structure checks."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper

from netsqueeze.errors import CaptureError, Diagnostic

MIN_OPSET, MAX_OPSET = 7, 23
_DEFAULT_DOMAINS = ("", "ai.onnx")


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
