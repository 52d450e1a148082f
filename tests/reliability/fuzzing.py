"""Seeded, bounded fuzzing of the ONNX frontend and backends, each batch in a child process with a time
and a memory cap.

The parent (`run_onnx_fuzz`) starts children (`python -m tests.reliability.fuzzing onnx START COUNT SEED`);
a child imports netsqueeze once, caps its address space, rebuilds mutants `START..START+COUNT` from the
seed (mutant i depends only on the seed and i, so any case can be replayed alone) and runs each through
`from_onnx`, then `to_onnx` and `to_torch` when it imports. It prints one JSON line per case. A case that
raises anything but a `NetsqueezeError` is an escape (its site is the innermost netsqueeze frame); a case
that runs past the time cap, runs out of memory or kills the child is one too.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
CASE_SECONDS = 10  # time cap of one case
MEMORY_BYTES = 2 << 30  # address space a child may add to what it holds after its imports


# ---- seed models ------------------------------------------------------------------------------------

def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(arr, name)


def _model(g: onnx.GraphProto, opsets: list[onnx.OperatorSetIdProto]) -> onnx.ModelProto:
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 8  # what ONNX Runtime reads
    return m


def cnn_model() -> onnx.ModelProto:
    """Conv, BatchNormalization, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm, Softmax."""
    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["b1"], name="bn1",
                         epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2.w"], ["c2"], name="conv2", kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                         group=2),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1, alpha=1.0, beta=1.0),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    inits = [
        _init("c1.w", _w(r, 4, 3, 3, 3)), _init("c1.b", _w(r, 4)),
        _init("bn.s", np.abs(_w(r, 4)) + 0.5), _init("bn.b", _w(r, 4)), _init("bn.m", _w(r, 4)),
        _init("bn.v", np.abs(_w(r, 4)) + 0.5),
        _init("c2.w", _w(r, 6, 2, 3, 3)), _init("fc.w", _w(r, 5, 6)), _init("fc.b", _w(r, 5)),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return _model(g, [helper.make_opsetid("", 13)])


def shape_model() -> onnx.ModelProto:
    """Shape arithmetic and data movement: Shape, Gather, ConstantOfShape, Reshape, Concat, Split, Slice,
    Transpose, Unsqueeze, Expand, MatMul."""
    r = np.random.default_rng(1)
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"], name="shape"),
        helper.make_node("Gather", ["sh", "zero"], ["n"], name="gather_n", axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "tail"], ["target"], name="cat_shape", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Split", ["flat", "sizes"], ["a", "b"], name="split", axis=1),
        helper.make_node("Slice", ["a", "st", "en", "axs", "stp"], ["a2"], name="slice"),
        helper.make_node("Concat", ["a2", "b"], ["ab"], name="concat", axis=1),
        helper.make_node("ConstantOfShape", ["cshape"], ["ones"], name="cos",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Expand", ["ones", "eshape"], ["big"], name="expand"),
        helper.make_node("Mul", ["ab", "big"], ["m"], name="mul"),
        helper.make_node("MatMul", ["m", "mw"], ["mm"], name="matmul"),
        helper.make_node("Transpose", ["mm"], ["t"], name="transpose", perm=[1, 0]),
        helper.make_node("Gather", ["t", "idx"], ["y"], name="gather_rows", axis=0),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)), _init("ax0", i64(0)), _init("tail", i64(-1)), _init("sizes", i64(20, 28)),
        _init("st", i64(2)), _init("en", i64(100)), _init("axs", i64(1)), _init("stp", i64(1)),
        _init("cshape", i64(1, 46)), _init("eshape", i64(1, 46)), _init("mw", _w(r, 46, 4)),
        _init("idx", np.array(2, np.int64)),
    ]
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    return _model(g, [helper.make_opsetid("", 13)])


def qdq_model() -> onnx.ModelProto:
    """Int8 weights behind DequantizeLinear (per-channel and per-tensor), activation QDQ, a codebook Gather."""
    r = np.random.default_rng(2)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xd", "wd", "cb"], ["c"], name="conv", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("DequantizeLinear", ["fq", "fs", "fz"], ["fd"], name="dq_fc"),
        helper.make_node("Transpose", ["fd"], ["fdt"], name="tr_fc", perm=[1, 0]),
        helper.make_node("Gather", ["cent", "cidx"], ["cw"], name="codebook"),
        helper.make_node("Reshape", ["cw", "cshape"], ["cw2"], name="cb_reshape"),
        helper.make_node("MatMul", ["f", "fdt"], ["h"], name="fc"),
        helper.make_node("MatMul", ["h", "cw2"], ["y"], name="fc2"),
    ]
    inits = [
        _init("xs", np.array(0.05, np.float32)), _init("xz", np.array(0, np.uint8)),
        _init("wq", r.integers(-100, 100, (4, 3, 1, 1)).astype(np.int8)),
        _init("ws", np.abs(_w(r, 4)) * 0.01 + 0.001), _init("cb", _w(r, 4)),
        _init("fq", r.integers(0, 255, (6, 64)).astype(np.uint8)), _init("fs", np.array(0.01, np.float32)),
        _init("fz", np.array(128, np.uint8)),
        _init("cent", _w(r, 8)), _init("cidx", r.integers(0, 8, (18,)).astype(np.int64)),
        _init("cshape", np.array([6, 3], np.int64)),
    ]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    return _model(g, [helper.make_opsetid("", 17)])


def custom_model() -> onnx.ModelProto:
    """Ops ONNX Runtime runs from the com.microsoft domain (opaque to netsqueeze) among default-domain ops."""
    r = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Gelu", ["h"], ["g"], name="ms_gelu", domain="com.microsoft"),
        helper.make_node("FusedMatMul", ["g", "w2"], ["f"], name="ms_fused", domain="com.microsoft", alpha=0.5,
                         transB=1),
        helper.make_node("Add", ["f", "b"], ["y"], name="add"),
    ]
    inits = [_init("w1", _w(r, 8, 16)), _init("w2", _w(r, 4, 16)), _init("b", _w(r, 4))]
    g = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits,
                          value_info=[helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 16]),
                                      helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, 4])])
    return _model(g, [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


SEED_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn": cnn_model, "shapes": shape_model, "qdq": qdq_model, "custom": custom_model,
}


# ---- mutations ----------------------------------------------------------------------------------------

OP_TYPES = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Reshape", "Concat", "Split", "Slice", "Gather", "Transpose",
            "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization",
            "Softmax", "ConstantOfShape", "Expand", "Tile", "Range", "Shape", "Identity", "Clip", "Pad", "Resize",
            "DequantizeLinear", "QuantizeLinear", "LayerNormalization", "ReduceMean", "Cast", "Sum", "Mul", "Div",
            "TopK", "Where", "Constant", "InstanceNormalization", "GroupNormalization", "LRN", "ConvTranspose",
            "Upsample", "LeakyRelu", "HardSigmoid", "Gelu", "Dropout", "NotAnOp", "Loop", "If", "Einsum"]
DOMAINS = ["", "ai.onnx", "com.microsoft", "ai.onnx.ml", "custom.domain", "\u00e9\u00e8", "com.microsoft.nchwc"]
ELEM_TYPES = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 17, 21, 22, 23, 40]
BIG = [0, -1, -7, 1, 2, 3, 7, 64, 1 << 20, 1 << 31, (1 << 63) - 1, -(1 << 63)]


def _nodes(m: onnx.ModelProto) -> Any:
    return m.graph.node


def _pick(rng: random.Random, seq: Any) -> Any:
    return seq[rng.randrange(len(seq))] if len(seq) else None


def _m_attr_type(m: onnx.ModelProto, rng: random.Random) -> str:
    """An attribute's declared type swapped (its value fields kept or replaced)."""
    attrs = [a for n in _nodes(m) for a in n.attribute]
    a = _pick(rng, attrs)
    if a is None:
        return "attr_type:none"
    choice = rng.randrange(6)
    if choice == 0:  # only the type tag changes
        a.type = _pick(rng, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 0, 99])
    elif choice == 1:  # an int where ints were
        a.ClearField("ints"), a.ClearField("floats")
        a.type, a.i = onnx.AttributeProto.INT, _pick(rng, BIG)
    elif choice == 2:  # floats where ints were
        vals = list(a.ints) or [1, 2]
        a.ClearField("ints")
        a.type = onnx.AttributeProto.FLOATS
        a.floats.extend(float(v) + 0.5 for v in vals)
    elif choice == 3:  # a string, possibly not UTF-8
        a.ClearField("ints"), a.ClearField("floats")
        a.type, a.s = onnx.AttributeProto.STRING, _pick(rng, [b"\xff\xfe", b"SAME_LOWER", b"", b"nearest", b"\x00"])
    elif choice == 4:  # a tensor
        a.ClearField("ints"), a.ClearField("floats")
        a.type = onnx.AttributeProto.TENSOR
        a.t.CopyFrom(numpy_helper.from_array(np.array([3, 0], np.int64), "t"))
    else:  # a list of ints
        a.ClearField("floats")
        a.type = onnx.AttributeProto.INTS
        a.ints[:] = [_pick(rng, BIG) for _ in range(rng.randrange(0, 5))]
    return f"attr_type:{a.name}"


def _m_attr_value(m: onnx.ModelProto, rng: random.Random) -> str:
    """An attribute value out of range, an attribute removed, or a stray attribute added."""
    n = _pick(rng, _nodes(m))
    if n is None:
        return "attr_value:none"
    choice = rng.randrange(4)
    if choice == 0 and n.attribute:
        a = _pick(rng, n.attribute)
        if a.ints:
            a.ints[rng.randrange(len(a.ints))] = _pick(rng, BIG)
        elif a.type == onnx.AttributeProto.INT:
            a.i = _pick(rng, BIG)
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = _pick(rng, [0.0, -1.0, float("nan"), float("inf"), 1e30])
        elif a.type == onnx.AttributeProto.STRING:
            a.s = _pick(rng, [b"\xff", b"bogus", b"", b"SAME_LOWER", b"VALID"])
        return f"attr_value:{n.op_type}.{a.name}"
    if choice == 1 and n.attribute:
        a = _pick(rng, n.attribute)
        n.attribute.remove(a)
        return f"attr_drop:{n.op_type}.{a.name}"
    name = _pick(rng, ["axis", "perm", "kernel_shape", "pads", "strides", "group", "split", "axes", "value",
                       "to", "mode", "shape", "transA", "alpha", "num_outputs", "starts", "ends", "block_size",
                       "allowzero", "keepdims", "dilations", "auto_pad", "epsilon", "num_groups", "storage_order",
                       "ceil_mode", "size", "training_mode", "output_shape", "approximate", "start", "end"])
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    kind = rng.randrange(5)
    if kind == 0:
        n.attribute.append(helper.make_attribute(name, _pick(rng, BIG)))
    elif kind == 1:
        n.attribute.append(helper.make_attribute(name, [_pick(rng, BIG) for _ in range(rng.randrange(0, 6))]))
    elif kind == 2:
        n.attribute.append(helper.make_attribute(name, rng.choice([0.5, -3.0, 1e9])))
    elif kind == 3:
        n.attribute.append(helper.make_attribute(name, rng.choice([b"\xff\xfe", b"SAME_UPPER", b"x"])))
    else:
        n.attribute.append(helper.make_attribute(name, numpy_helper.from_array(
            np.array(rng.choice([[1.0], [], [2.0, 3.0]]), np.float32), "v")))
    return f"attr_add:{n.op_type}.{name}"


def _m_inputs(m: onnx.ModelProto, rng: random.Random) -> str:
    """Node inputs dangling, dropped, emptied, duplicated or added (arity)."""
    n = _pick(rng, _nodes(m))
    if n is None:
        return "inputs:none"
    choice = rng.randrange(5)
    names = [t for nd in _nodes(m) for t in nd.input] + [t.name for t in m.graph.initializer]
    if choice == 0 and n.input:
        n.input[rng.randrange(len(n.input))] = "dangling"
    elif choice == 1 and n.input:
        del n.input[rng.randrange(len(n.input)):]
    elif choice == 2 and n.input:
        n.input[rng.randrange(len(n.input))] = ""
    elif choice == 3:
        n.input.append(_pick(rng, names) or "x")
    elif n.input:
        n.input[rng.randrange(len(n.input))] = _pick(rng, names) or "x"
    return f"inputs:{n.op_type}"


def _m_outputs(m: onnx.ModelProto, rng: random.Random) -> str:
    """Node outputs removed, duplicated, renamed; graph outputs dropped or renamed."""
    n = _pick(rng, _nodes(m))
    choice = rng.randrange(4)
    if choice == 0 and n is not None and n.output:
        del n.output[rng.randrange(len(n.output)):]
    elif choice == 1 and n is not None:
        n.output.append(_pick(rng, ["extra", "", n.output[0] if n.output else "x"]))
    elif choice == 2 and m.graph.output:
        m.graph.output[0].name = _pick(rng, ["x", "nothing", "", m.graph.node[0].output[0]])
    elif n is not None and n.output:
        n.output[0] = _pick(rng, ["x", "y", "renamed", m.graph.initializer[0].name if m.graph.initializer else "q"])
    return "outputs"


def _m_initializer(m: onnx.ModelProto, rng: random.Random) -> str:
    """An initializer's dims, data type or data edited so they no longer agree."""
    t = _pick(rng, m.graph.initializer)
    if t is None:
        return "init:none"
    choice = rng.randrange(7)
    if choice == 0 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = _pick(rng, BIG)
    elif choice == 1:
        t.dims.append(_pick(rng, [0, 1, 2, 1 << 40]))
    elif choice == 2:
        t.data_type = _pick(rng, ELEM_TYPES)
    elif choice == 3:
        raw = t.raw_data
        t.raw_data = raw[: rng.randrange(len(raw) + 1)] if raw else b"\x01\x02\x03"
    elif choice == 4:  # data moved into a typed field that does not match the type
        arr = numpy_helper.to_array(t).reshape(-1)
        t.ClearField("raw_data")
        if rng.random() < 0.5:
            t.float_data.extend(float(v) for v in arr[: max(0, arr.size - 1)])
        else:
            t.int64_data.extend(int(v) for v in arr.astype(np.int64))
    elif choice == 5:
        del t.dims[:]
    else:
        t.raw_data = t.raw_data + b"\x00" * rng.randrange(1, 9)
    return f"init:{t.name}"


def _m_op(m: onnx.ModelProto, rng: random.Random) -> str:
    n = _pick(rng, _nodes(m))
    if n is None:
        return "op:none"
    n.op_type = _pick(rng, OP_TYPES)
    return f"op:{n.op_type}"


def _m_opset(m: onnx.ModelProto, rng: random.Random) -> str:
    choice = rng.randrange(4)
    if choice == 0:
        for imp in m.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = rng.choice([1, 6, 7, 9, 10, 11, 12, 13, 16, 17, 18, 19, 21, 23, 24, 99, -1])
    elif choice == 1:
        del m.opset_import[:]
    elif choice == 2:
        m.opset_import.append(helper.make_opsetid(_pick(rng, DOMAINS), rng.choice([-1, 0, 1, 1000])))
    else:
        m.ir_version = rng.choice([0, 1, 3, 7, 10, 11, 99, -5])
    return "opset"


def _m_domain(m: onnx.ModelProto, rng: random.Random) -> str:
    n = _pick(rng, _nodes(m))
    if n is None:
        return "domain:none"
    n.domain = _pick(rng, DOMAINS)
    if rng.random() < 0.5:
        m.opset_import.append(helper.make_opsetid(n.domain, rng.choice([1, 2, 17])))
    return f"domain:{n.op_type}"


def _m_io(m: onnx.ModelProto, rng: random.Random) -> str:
    """Graph input types and shapes edited, inputs removed or duplicated."""
    g = m.graph
    choice = rng.randrange(5)
    vi = _pick(rng, g.input)
    if vi is None:
        return "io:none"
    tt = vi.type.tensor_type
    if choice == 0:
        tt.elem_type = _pick(rng, ELEM_TYPES)
    elif choice == 1 and tt.shape.dim:
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        if rng.random() < 0.3:
            d.dim_param = "N"
        else:
            d.dim_value = _pick(rng, BIG)
    elif choice == 2:
        tt.shape.dim.add().dim_value = rng.choice([0, 1, 5])
    elif choice == 3:
        g.input.append(g.input[0])
    else:
        vi.type.ClearField("tensor_type")
        vi.type.sequence_type.elem_type.tensor_type.elem_type = 1
    return "io"


def _m_constant(m: onnx.ModelProto, rng: random.Random) -> str:
    """A node replaced by (or fed from) a constant-producing op with hostile values: big shapes for
    ConstantOfShape/Expand/Tile/Range, empty or odd Constant values."""
    g = m.graph
    i = rng.randrange(len(g.node)) if g.node else 0
    first = g.input[0].name if g.input else "x"
    huge = rng.choice([[1 << 31], [1 << 16, 1 << 16], [-1, 4], [0], [3, 1 << 40], [2048, 2048, 512]])
    choice = rng.randrange(5)
    if choice == 0:
        g.initializer.append(numpy_helper.from_array(np.array(huge, np.int64), "fz_shape"))
        node = helper.make_node("ConstantOfShape", ["fz_shape"], ["fz_out"], name="fz_cos")
    elif choice == 1:
        g.initializer.append(numpy_helper.from_array(np.array(huge, np.int64), "fz_shape"))
        g.initializer.append(numpy_helper.from_array(np.ones((1,), np.float32), "fz_one"))
        node = helper.make_node("Expand", ["fz_one", "fz_shape"], ["fz_out"], name="fz_expand")
    elif choice == 2:
        g.initializer.append(numpy_helper.from_array(np.array(huge[:1], np.int64), "fz_reps"))
        g.initializer.append(numpy_helper.from_array(np.ones((3,), np.float32), "fz_one"))
        node = helper.make_node("Tile", ["fz_one", "fz_reps"], ["fz_out"], name="fz_tile")
    elif choice == 3:
        g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "fz_start"))
        g.initializer.append(numpy_helper.from_array(np.array(abs(huge[0]) or 5, np.int64), "fz_limit"))
        g.initializer.append(numpy_helper.from_array(np.array(rng.choice([1, 0, -1]), np.int64), "fz_delta"))
        node = helper.make_node("Range", ["fz_start", "fz_limit", "fz_delta"], ["fz_out"], name="fz_range")
    else:
        node = helper.make_node("Constant", [], ["fz_out"], name="fz_const")
        kind = rng.randrange(3)
        if kind == 0:
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(0, np.float32))))
        elif kind == 1:
            node.attribute.append(helper.make_attribute("value_ints", [1, 2, 3]))
        # kind 2: a Constant with no value at all
    g.node.insert(i, node)
    # feed the constant somewhere: into the next node's first input or as a graph output
    if rng.random() < 0.5 and i + 1 < len(g.node) and g.node[i + 1].input:
        g.node[i + 1].input[rng.randrange(len(g.node[i + 1].input))] = "fz_out"
    else:
        g.output.append(helper.make_empty_tensor_value_info("fz_out"))
    del first
    return f"constant:{node.op_type}"


def _m_names(m: onnx.ModelProto, rng: random.Random) -> str:
    """Node names and tensor names duplicated, emptied or unusual."""
    n = _pick(rng, _nodes(m))
    if n is None:
        return "names:none"
    n.name = _pick(rng, ["", "x", "y", n.input[0] if n.input else "a", "conv1", "a/b", "\u00e9", "half"])
    return "names"


PROTO_MUTATORS: list[Callable[[onnx.ModelProto, random.Random], str]] = [
    _m_attr_type, _m_attr_value, _m_inputs, _m_outputs, _m_initializer, _m_op, _m_opset, _m_domain, _m_io,
    _m_constant, _m_names,
]


def _bit_flips(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _byte_edits(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    i = rng.randrange(len(b))
    choice = rng.randrange(3)
    if choice == 0:
        b[i] = rng.choice([0x00, 0xFF, 0x80, 0x7F])
    elif choice == 1:
        del b[i: i + rng.randint(1, 16)]
    else:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(b)


def mutant(seed: int, index: int) -> tuple[str, bytes]:
    """Mutant `index` of the run with `seed`: (a description, the model bytes)."""
    rng = random.Random(f"{seed}:{index}")
    name = rng.choice(sorted(SEED_MODELS))
    m = SEED_MODELS[name]()
    steps: list[str] = []
    kind = rng.random()
    if kind < 0.75:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mut = rng.choice(PROTO_MUTATORS)
            try:
                steps.append(mut(m, rng))
            except (IndexError, ValueError, TypeError, AttributeError) as e:  # a mutator that does not apply
                steps.append(f"{mut.__name__}:skipped({type(e).__name__})")
    data = m.SerializeToString()
    if kind >= 0.75 or rng.random() < 0.1:
        r = rng.random()
        if r < 0.5:
            data, step = _bit_flips(data, rng), "bitflip"
        elif r < 0.8:
            data, step = _byte_edits(data, rng), "bytes"
        else:
            data, step = data[: rng.randrange(1, len(data))], "truncate"
        steps.append(step)
    return f"{name}:{'+'.join(steps)}", data


# ---- the child ------------------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the per-case alarm; a BaseException so that no `except Exception` in the code under test
    swallows it."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout(f"case ran past {CASE_SECONDS} s")


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _site(tb: Any) -> str:
    """The innermost frame inside netsqueeze (`path:line (function)`), or the innermost frame at all."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/netsqueeze/" in f.filename and "/tests/" not in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename.split("/netsqueeze/", 1)[-1] if ours else os.path.basename(f.filename)
    return f"{'netsqueeze/' if ours else ''}{path}:{f.lineno} ({f.name})"


def run_case(data: bytes, path: Path) -> str:
    """Runs one mutant; returns 'ok' or the NetsqueezeError type name; other exceptions propagate."""
    from netsqueeze.backends.onnx import to_onnx
    from netsqueeze.backends.torch import to_torch
    from netsqueeze.errors import NetsqueezeError
    from netsqueeze.frontends.onnx import from_onnx

    path.write_bytes(data)
    try:
        g = from_onnx(path)
    except NetsqueezeError as e:
        return f"import:{type(e).__name__}"
    outcome = "ok"
    for stage, fn in (("to_onnx", to_onnx), ("to_torch", to_torch)):
        try:
            fn(g)
        except NetsqueezeError as e:
            outcome = f"{stage}:{type(e).__name__}" if outcome == "ok" else outcome
    return outcome


def child_main(start: int, count: int, seed: int) -> None:
    import torch

    import netsqueeze.backends.onnx
    import netsqueeze.backends.torch
    import netsqueeze.frontends.onnx  # noqa: F401  imports before the memory cap

    torch.set_num_threads(1)
    cap = _vm_size() + MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    signal.signal(signal.SIGALRM, _alarm)
    out = sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        for i in range(start, start + count):
            desc, data = mutant(seed, i)
            print(json.dumps({"start": i}), file=out, flush=True)
            # a hang inside C code the alarm cannot interrupt ends the child (the parent reports the case)
            faulthandler.dump_traceback_later(CASE_SECONDS + 5, exit=True)
            signal.alarm(CASE_SECONDS)
            rec: dict[str, Any] = {"i": i, "desc": desc}
            try:
                rec["outcome"] = run_case(data, path)
            except (Exception, CaseTimeout) as e:
                rec.update(outcome="ESCAPE", exc=type(e).__name__, msg=str(e)[:300], site=_site(e.__traceback__))
            finally:
                signal.alarm(0)
                faulthandler.cancel_dump_traceback_later()
            print(json.dumps(rec), file=out, flush=True)


# ---- policies ---------------------------------------------------------------------------------------------

EXAMPLES = ROOT / "examples"
POLICY_TOKENS = ["policy", "{", "}", "(", ")", "[", "]", ",", "=", "<=", ">=", "on", "where", "except", "|", "&",
                 "type(conv)", "all", "let", "param", "import", "budget", "guard", "bounds", "calibrate", "input",
                 "trim", "fold_bn", "dead_code", "float32[", "\n", "#", "*", "%", "..", '"', "re\"", "\\"]
POLICY_NUMBERS = ["0", "-1", "1e400", "-0", "1e-400", "99999999999999999999999", "0.0000001", "150%", "-5%",
                  "nan", "inf", "0x10", "1_000", "4.5M", "12ms", "3.", ".5", "1e", "2**64", "9" * 400]
POLICY_UNICODE = ["\u00e9", "\u200b", "\ufeff", "\U0001f600", "\u0301", "\u2028", "\x00", "\t", "\r", "\u00a0",
                  "\u0130", "\ud7ff", "\uff10"]


def policy_mutant(seed: int, index: int) -> tuple[str, str, bytes]:
    """Policy mutant `index` of the run with `seed`: (the example it came from, a description, the bytes)."""
    rng = random.Random(f"policy:{seed}:{index}")
    name = rng.choice(sorted(p.name for p in EXAMPLES.glob("*.sqz")))
    text = (EXAMPLES / name).read_text()
    steps = []
    for _ in range(rng.choice([1, 1, 2, 3, 5])):
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(7)
        if op == 0:  # insert a character or a token
            tok = rng.choice([rng.choice(POLICY_TOKENS), chr(rng.randrange(32, 127)), rng.choice(POLICY_UNICODE)])
            text, step = text[:i] + tok + text[i:], "insert"
        elif op == 1:
            text, step = text[:i] + text[i + rng.randint(1, 12):], "delete"
        elif op == 2 and len(text) > 2:  # swap two neighbouring characters
            i = min(i, len(text) - 2)
            text, step = text[:i] + text[i + 1] + text[i] + text[i + 2:], "swap"
        elif op == 3:  # duplicate a token
            words = list(re_tokens(text))
            if words:
                a, b = rng.choice(words)
                text, step = text[:b] + " " + text[a:b] + text[b:], "duplicate"
            else:
                step = "duplicate:none"
        elif op == 4:  # a number out of range
            nums = [(m.start(), m.end()) for m in _NUMBER.finditer(text)]
            if nums:
                a, b = rng.choice(nums)
                text, step = text[:a] + rng.choice(POLICY_NUMBERS) + text[b:], "number"
            else:
                step = "number:none"
        elif op == 5:  # a line repeated or dropped
            lines = text.split("\n")
            k = rng.randrange(len(lines))
            lines[k:k + 1] = [] if rng.random() < 0.5 else [lines[k], lines[k]]
            text, step = "\n".join(lines), "line"
        else:
            text, step = text[:i] + rng.choice(POLICY_UNICODE) + text[i:], "unicode"
        steps.append(step)
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:  # bytes that are not UTF-8
        k = rng.randrange(len(data) + 1)
        data, _ = data[:k] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + data[k:], steps.append("bytes")
    return name, "+".join(steps), data


import re as _re  # noqa: E402

_WORD = _re.compile(r"[A-Za-z_][A-Za-z0-9_.*]*|\d+(?:\.\d+)?%?|[{}()\[\],=]")
_NUMBER = _re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?[%A-Za-z]*")


def re_tokens(text: str) -> Iterator[tuple[int, int]]:
    return ((m.start(), m.end()) for m in _WORD.finditer(text))


def run_policy_case(data: bytes, path: Path, schemas: Any) -> str:
    """Parses and checks one policy file; 'ok' or the error type; an unlocated error is an AssertionError."""
    from netsqueeze.dsl import check_policy, load_policy
    from netsqueeze.errors import NetsqueezeError

    path.write_bytes(data)
    try:
        check_policy(load_policy(path), schemas)
    except NetsqueezeError as e:
        for d in e.diagnostics:
            text = d.format()
            if d.span is None or d.span.line < 1 or d.span.col < 1 or not text.startswith(f"{d.span.file}:"):
                raise AssertionError(f"unlocated {type(e).__name__}: {text[:200]}") from None
        return type(e).__name__
    return "ok"


def policy_child_main(start: int, count: int, seed: int) -> None:
    from netsqueeze.compiler.plan import schemas_of
    from netsqueeze.passes.registry import all_passes

    schemas = schemas_of(all_passes())
    cap = _vm_size() + MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp:
        for f in EXAMPLES.iterdir():  # the examples next to the mutant, so imports resolve
            if f.is_file():
                (Path(tmp) / f.name).write_bytes(f.read_bytes())
        for i in range(start, start + count):
            name, desc, data = policy_mutant(seed, i)
            path = Path(tmp) / f"fuzz_{name}"
            print(json.dumps({"start": i}), flush=True)
            faulthandler.dump_traceback_later(CASE_SECONDS + 5, exit=True)
            signal.alarm(CASE_SECONDS)
            rec: dict[str, Any] = {"i": i, "desc": f"{name}:{desc}"}
            try:
                rec["outcome"] = run_policy_case(data, path, schemas)
            except (Exception, CaseTimeout) as e:
                rec.update(outcome="ESCAPE", exc=type(e).__name__, msg=str(e)[:300], site=_site(e.__traceback__))
            finally:
                signal.alarm(0)
                faulthandler.cancel_dump_traceback_later()
            print(json.dumps(rec), flush=True)


# ---- the parent ---------------------------------------------------------------------------------------------

@dataclass
class FuzzResult:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    escapes: list[dict[str, Any]] = field(default_factory=list)

    def sites(self) -> collections.Counter[str]:
        return collections.Counter(f"{e.get('exc')} at {e.get('site')}" for e in self.escapes)

    def report(self) -> str:
        lines = [f"{sum(self.outcomes.values())} cases: " + ", ".join(
            f"{k} {v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: (-kv[1], kv[0])))]
        sites = self.sites()
        if sites:
            lines.append(f"{len(self.escapes)} escapes at {len(sites)} sites:")
            for s, k in sites.most_common():
                ex = next(e for e in self.escapes if f"{e.get('exc')} at {e.get('site')}" == s)
                lines.append(f"  {k:4d}  {s}  e.g. case {ex['i']} {ex.get('desc', '')}: {ex.get('msg', '')[:160]}")
        return "\n".join(lines)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_child(kind: str, start: int, count: int, seed: int) -> Iterator[dict[str, Any]]:
    """Runs one child over cases start..start+count; yields records, and one ESCAPE record for a case that
    killed the child (crash, hard hang, memory), after which the caller restarts past it."""
    cmd = [sys.executable, "-m", "tests.reliability.fuzzing", kind, str(start), str(count), str(seed)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=count * (CASE_SECONDS + 6) + 60)
    current: int | None = None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if "start" in rec:
            current = rec["start"]
            continue
        current = None
        yield rec
    if proc.returncode != 0 or current is not None:
        yield {"i": current if current is not None else start, "outcome": "ESCAPE", "exc": f"child rc {proc.returncode}",
               "site": "child process", "msg": proc.stderr[-600:], "seconds": time.monotonic() - t0,
               "died": True}


def run_fuzz(kind: str, total: int, seed: int, batch: int = 50, jobs: int = 2) -> FuzzResult:
    """Runs cases 0..total in children of `batch` cases, `jobs` children at a time."""
    from concurrent.futures import ThreadPoolExecutor

    res = FuzzResult()

    def batch_records(start: int) -> list[dict[str, Any]]:
        end = min(start + batch, total)
        recs: list[dict[str, Any]] = []
        while start < end:
            done = start
            for rec in _run_child(kind, start, end - start, seed):
                recs.append(rec)
                done = rec["i"] + 1
            start = max(done, start + 1)
        return recs

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for recs in pool.map(batch_records, range(0, total, batch)):
            for rec in recs:
                res.outcomes[rec["outcome"]] += 1
                if rec["outcome"] == "ESCAPE":
                    res.escapes.append(rec)
    return res


def main(argv: list[str]) -> int:
    kind, start, count, seed = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if kind == "onnx":
        child_main(start, count, seed)
    elif kind == "policy":
        policy_child_main(start, count, seed)
    else:
        raise SystemExit(f"unknown fuzz kind {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
