"""The canonical op set: one `OpSpec` per kind with shape inference, FLOPs and channel semantics.

Conventions every frontend and backend share:
- conv / pooling work on N, C, *spatial; `padding` is ONNX-ordered (begins..., ends...).
- linear applies to the last axis; weight is [out, in] as in torch.
- reshape's `shape` uses 0 = copy that input dim and -1 = infer (ONNX semantics).
- FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from netsqueeze.errors import Diagnostic, VerifyError
from netsqueeze.ir import weights
from netsqueeze.ir.graph import Graph, Node, TensorMeta

# How an op relates channels (axis 1, or the last axis for linear/layer_norm) of its inputs and outputs;
# used by dependency analysis. "barrier" stops propagation.
ChannelRule = Literal[
    "source", "sink", "producer", "per_channel", "elementwise", "broadcast", "structural", "barrier"
]

InferFn = Callable[[Node, list[TensorMeta]], list[TensorMeta]]
FlopsFn = Callable[[Node, list[TensorMeta], list[TensorMeta]], int]


@dataclass(frozen=True)
class OpSpec:
    kind: str
    infer: InferFn
    flops: FlopsFn
    channels: ChannelRule
    arity: tuple[int, int | None] = (1, 1)  # min, max number of operands (None = unbounded)
    params: tuple[str, ...] = ()  # required params
    optional_params: tuple[str, ...] = ()
    doc: str = ""


OPS: dict[str, OpSpec] = {}


def _fail(node: Node, msg: str) -> VerifyError:
    return VerifyError(Diagnostic(f"{node.kind} '{node.id}': {msg}", node=node.id))


def _numel(m: TensorMeta) -> int:
    return m.numel()


def _zero(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    return 0


def _per_out(k: int) -> FlopsFn:
    return lambda node, ins, outs: k * sum(_numel(o) for o in outs)


def op(
    kind: str,
    channels: ChannelRule,
    arity: tuple[int, int | None] = (1, 1),
    params: tuple[str, ...] = (),
    optional_params: tuple[str, ...] = (),
    flops: FlopsFn = _zero,
) -> Callable[[InferFn], InferFn]:
    def register(fn: InferFn) -> InferFn:
        OPS[kind] = OpSpec(kind, fn, flops, channels, arity, params, optional_params, (fn.__doc__ or "").strip())
        return fn

    return register


def spec(kind: str) -> OpSpec:
    return OPS.get(kind, OPS["opaque"])


def _axis(node: Node, axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise _fail(node, f"axis {axis} out of range for rank {rank}")
    return a


def broadcast_shapes(node: Node, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {1}
        if len(dims) > 1:
            raise _fail(node, f"shapes {' and '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _same(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    return [ins[0]]


# ---- sources and sinks --------------------------------------------------------------------
@op("input", "source", arity=(0, 0))
def _input(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """A graph input; attrs `shape`, `dtype`."""
    return [TensorMeta(tuple(node.attrs["shape"]), node.attrs.get("dtype", "float32"))]


@op("output", "sink")
def _output(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """A graph output; one operand."""
    return [ins[0]]


@op("constant", "barrier", arity=(0, 0), params=("value",))
def _constant(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """A constant tensor held in params['value']."""
    v = node.params["value"]
    return [TensorMeta(tuple(v.shape), str(v.dtype).removeprefix("torch."))]


# ---- producers -----------------------------------------------------------------------------
def _conv_out(node: Node, size: int, k: int, i: int, dims: int, transposed: bool = False) -> int:
    a = node.attrs
    s, d, p = a["stride"][i], a["dilation"][i], a["padding"][i] + a["padding"][i + dims]
    if transposed:
        return (size - 1) * s - p + d * (k - 1) + a.get("output_padding", (0,) * dims)[i] + 1
    out = (size + p - d * (k - 1) - 1) // s + 1
    if out <= 0:
        raise _fail(node, f"spatial size {size} too small for kernel {k}")
    return out


def _conv_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    w = node.params["weight"]
    per_out = 2 * math.prod(w.shape[1:])
    return per_out * outs[0].numel() + (outs[0].numel() if "bias" in node.params else 0)


@op("conv", "producer", params=("weight",), optional_params=("bias",), flops=_conv_flops)
def _conv(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """N-d convolution; attrs stride, padding (begins+ends), dilation, groups; weight [O, I/g, *k]."""
    x, w = ins[0], node.params["weight"]
    dims = w.dim() - 2
    g = node.attrs.get("groups", 1)
    if len(x.shape) != dims + 2:
        raise _fail(node, f"expects a rank-{dims + 2} input, got {x}")
    if x.shape[1] != w.shape[1] * g:
        raise _fail(node, f"input has {x.shape[1]} channels but weight expects {w.shape[1] * g} ({g} groups)")
    if w.shape[0] % g:
        raise _fail(node, f"{w.shape[0]} output channels are not divisible by {g} groups")
    if "bias" in node.params and node.params["bias"].shape != (w.shape[0],):
        raise _fail(node, f"bias has shape {list(node.params['bias'].shape)}, expected [{w.shape[0]}]")
    sp = tuple(_conv_out(node, x.shape[2 + i], w.shape[2 + i], i, dims) for i in range(dims))
    return [TensorMeta((x.shape[0], w.shape[0], *sp), x.dtype)]


def _conv_t_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    return 2 * math.prod(node.params["weight"].shape[1:]) * ins[0].numel()


@op("conv_transpose", "producer", params=("weight",), optional_params=("bias",), flops=_conv_t_flops)
def _conv_t(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Transposed convolution; weight [I, O/g, *k]."""
    x, w = ins[0], node.params["weight"]
    dims = w.dim() - 2
    g = node.attrs.get("groups", 1)
    if x.shape[1] != w.shape[0]:
        raise _fail(node, f"input has {x.shape[1]} channels but weight expects {w.shape[0]}")
    sp = tuple(_conv_out(node, x.shape[2 + i], w.shape[2 + i], i, dims, True) for i in range(dims))
    return [TensorMeta((x.shape[0], w.shape[1] * g, *sp), x.dtype)]


def _linear_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    w = node.params["weight"]
    rows = ins[0].numel() // w.shape[1]
    return rows * (2 * w.numel() + (w.shape[0] if "bias" in node.params else 0))


@op("linear", "producer", params=("weight",), optional_params=("bias",), flops=_linear_flops)
def _linear(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """y = x Wᵀ + b on the last axis; weight [out, in]."""
    x, w = ins[0], node.params["weight"]
    if x.shape[-1] != w.shape[1]:
        raise _fail(node, f"input has {x.shape[-1]} features but weight expects {w.shape[1]}")
    if "bias" in node.params and node.params["bias"].shape != (w.shape[0],):
        raise _fail(node, f"bias has shape {list(node.params['bias'].shape)}, expected [{w.shape[0]}]")
    return [TensorMeta((*x.shape[:-1], w.shape[0]), x.dtype)]


def _matmul_shape(node: Node, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    a1, b1 = len(a) == 1, len(b) == 1
    a2 = (1, *a) if a1 else a
    b2 = (*b, 1) if b1 else b
    if a2[-1] != b2[-2]:
        raise _fail(node, f"cannot multiply {list(a)} by {list(b)}")
    batch = broadcast_shapes(node, [a2[:-2], b2[:-2]]) if (a2[:-2] or b2[:-2]) else ()
    out = (*batch, a2[-2], b2[-1])
    if a1:
        out = out[:-2] + out[-1:]
    if b1:
        out = out[:-1]
    return out


@op("matmul", "barrier", arity=(2, 2), flops=lambda n, i, o: 2 * o[0].numel() * i[0].shape[-1])
def _matmul(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """torch.matmul of two activations."""
    return [TensorMeta(_matmul_shape(node, ins[0].shape, ins[1].shape), ins[0].dtype)]


def _attn_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    e = node.attrs["embed_dim"]
    inner = node.attrs["num_heads"] * node.attrs["head_dim"]  # shrinks when heads are pruned
    q = ins[0]
    bf = node.attrs.get("batch_first", True)
    l_q = q.shape[1] if bf else q.shape[0]
    l_k = ins[1].shape[1] if bf else ins[1].shape[0]
    b = q.numel() // (l_q * q.shape[-1])
    proj = 2 * (l_q * e * inner + 2 * l_k * e * inner + l_q * inner * e)
    return b * (proj + 4 * l_q * l_k * inner)


@op(
    "attention",
    "structural",
    arity=(3, 4),
    params=("in_proj_weight", "out_proj_weight"),
    optional_params=("in_proj_bias", "out_proj_bias"),
    flops=_attn_flops,
)
def _attention(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Multi-head attention (query, key, value[, mask]); attrs num_heads, embed_dim, head_dim, batch_first.

    in_proj_weight is [3·H·Dh, E] (q, k, v stacked), out_proj_weight is [E, H·Dh].
    """
    a = node.attrs
    h, dh = a["num_heads"], a["head_dim"]
    w = node.params["in_proj_weight"]
    if w.shape[0] != 3 * h * dh:
        raise _fail(node, f"in_proj_weight has {w.shape[0]} rows, expected 3·{h}·{dh}")
    if node.params["out_proj_weight"].shape[1] != h * dh:
        raise _fail(node, f"out_proj_weight has {node.params['out_proj_weight'].shape[1]} columns, expected {h * dh}")
    if ins[0].shape[-1] != w.shape[1]:
        raise _fail(node, f"query has {ins[0].shape[-1]} features but in_proj_weight expects {w.shape[1]}")
    return [TensorMeta((*ins[0].shape[:-1], node.params["out_proj_weight"].shape[0]), ins[0].dtype)]


@op("embedding", "producer", params=("weight",))
def _embedding(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Table lookup; weight [num_embeddings, dim]; input integer indices."""
    return [TensorMeta((*ins[0].shape, node.params["weight"].shape[1]), "float32")]


# ---- normalisation -------------------------------------------------------------------------
def _check_vec(node: Node, names: tuple[str, ...], c: int) -> None:
    for k in names:
        if k in node.params and tuple(node.params[k].shape) != (c,):
            raise _fail(node, f"param '{k}' has shape {list(node.params[k].shape)}, expected [{c}]")


@op("batch_norm", "per_channel", params=("running_mean", "running_var"), optional_params=("weight", "bias"),
    flops=_per_out(2))
def _bn(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Inference-mode batch norm over axis 1; attrs eps."""
    _check_vec(node, ("running_mean", "running_var", "weight", "bias"), ins[0].shape[1])
    return [ins[0]]


@op("layer_norm", "per_channel", optional_params=("weight", "bias"), flops=_per_out(5))
def _ln(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Layer norm over the trailing `normalized_shape`; attrs eps."""
    ns = tuple(node.attrs["normalized_shape"])
    if tuple(ins[0].shape[-len(ns):]) != ns:
        raise _fail(node, f"normalized_shape {list(ns)} does not match input {ins[0]}")
    for k in ("weight", "bias"):
        if k in node.params and tuple(node.params[k].shape) != ns:
            raise _fail(node, f"param '{k}' has shape {list(node.params[k].shape)}, expected {list(ns)}")
    return [ins[0]]


@op("group_norm", "per_channel", optional_params=("weight", "bias"), flops=_per_out(5))
def _gn(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Group norm over axis 1 with `num_groups`; instance norm is num_groups == C."""
    c = ins[0].shape[1]
    if c % node.attrs["num_groups"]:
        raise _fail(node, f"{c} channels are not divisible by {node.attrs['num_groups']} groups")
    _check_vec(node, ("weight", "bias"), c)
    return [ins[0]]


# ---- elementwise -------------------------------------------------------------------------------
for _k, _cost in [("relu", 1), ("clip", 1), ("leaky_relu", 2), ("gelu", 8), ("silu", 4), ("sigmoid", 4),
                  ("tanh", 4), ("hardswish", 4), ("hardsigmoid", 3), ("identity", 0)]:
    op(_k, "elementwise", flops=_per_out(_cost))(_same)


@op("lrn", "barrier", flops=_per_out(6))
def _lrn(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Local response norm across channels; attrs size, alpha, beta, bias (torch nn.LocalResponseNorm's k).

    Mixes neighbouring channels, so channel analysis treats it as a barrier.
    """
    return [ins[0]]


@op("softmax", "barrier", flops=_per_out(5))
def _softmax(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Softmax along `axis`; couples the whole axis, so it is a barrier when that axis is the channel axis."""
    _axis(node, node.attrs["axis"], len(ins[0].shape))
    return [ins[0]]


def _binary(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    dtype = ins[0].dtype if ins[0].dtype.startswith("float") or len(ins) == 1 else ins[1].dtype
    return [TensorMeta(broadcast_shapes(node, [m.shape for m in ins]), dtype)]


for _k in ("add", "sub", "mul", "div"):
    op(_k, "broadcast", arity=(2, 2), flops=_per_out(1))(_binary)


# ---- structure ---------------------------------------------------------------------------------
@op("concat", "structural", arity=(1, None))
def _concat(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Concatenate along `axis`."""
    rank = len(ins[0].shape)
    ax = _axis(node, node.attrs["axis"], rank)
    for m in ins[1:]:
        if len(m.shape) != rank or any(a != b for i, (a, b) in enumerate(zip(m.shape, ins[0].shape)) if i != ax):
            raise _fail(node, f"cannot concatenate {ins[0]} and {m} along axis {ax}")
    shape = list(ins[0].shape)
    shape[ax] = sum(m.shape[ax] for m in ins)
    return [TensorMeta(tuple(shape), ins[0].dtype)]


@op("split", "structural")
def _split(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Split along `axis` into pieces of `sizes`; one output per piece."""
    ax = _axis(node, node.attrs["axis"], len(ins[0].shape))
    sizes = list(node.attrs["sizes"])
    if sum(sizes) != ins[0].shape[ax]:
        raise _fail(node, f"sizes {sizes} do not add up to {ins[0].shape[ax]}")
    outs = []
    for s in sizes:
        shape = list(ins[0].shape)
        shape[ax] = s
        outs.append(TensorMeta(tuple(shape), ins[0].dtype))
    return outs


def slice_len(size: int, start: int, end: int, step: int) -> int:
    return len(range(*slice(start, end, step).indices(size)))


@op("slice", "structural")
def _slice(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """x[start:end:step] along `axis` (python slice semantics, clamped)."""
    a = node.attrs
    ax = _axis(node, a["axis"], len(ins[0].shape))
    shape = list(ins[0].shape)
    shape[ax] = slice_len(shape[ax], a["start"], a["end"], a.get("step", 1))
    return [TensorMeta(tuple(shape), ins[0].dtype)]


@op("flatten", "structural")
def _flatten(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Flatten dims start_dim..end_dim (torch semantics)."""
    s = list(ins[0].shape)
    st = _axis(node, node.attrs.get("start_dim", 1), len(s)) if s else 0
    en = _axis(node, node.attrs.get("end_dim", -1), len(s)) if s else 0
    return [TensorMeta((*s[:st], math.prod(s[st : en + 1]), *s[en + 1 :]), ins[0].dtype)]


def reshape_target(node: Node, src: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    out = [src[i] if d == 0 else d for i, d in enumerate(shape)]
    if out.count(-1) > 1:
        raise _fail(node, "more than one -1 in the target shape")
    total = math.prod(src)
    if -1 in out:
        rest = math.prod(d for d in out if d != -1)
        if rest == 0 or total % rest:
            raise _fail(node, f"cannot reshape {list(src)} to {list(shape)}")
        out[out.index(-1)] = total // rest
    if math.prod(out) != total:
        raise _fail(node, f"cannot reshape {list(src)} ({total} elements) to {list(shape)}")
    return tuple(out)


@op("reshape", "structural")
def _reshape(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Reshape to `shape` (0 copies the input dim, -1 is inferred)."""
    return [TensorMeta(reshape_target(node, ins[0].shape, tuple(node.attrs["shape"])), ins[0].dtype)]


@op("transpose", "structural")
def _transpose(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Permute axes by `perm`."""
    perm = node.attrs["perm"]
    if sorted(perm) != list(range(len(ins[0].shape))):
        raise _fail(node, f"perm {list(perm)} does not fit rank {len(ins[0].shape)}")
    return [TensorMeta(tuple(ins[0].shape[p] for p in perm), ins[0].dtype)]


@op("squeeze", "structural")
def _squeeze(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Drop size-1 `axes`."""
    rank = len(ins[0].shape)
    axes = {_axis(node, a, rank) for a in node.attrs["axes"]}
    return [TensorMeta(tuple(d for i, d in enumerate(ins[0].shape) if i not in axes or d != 1), ins[0].dtype)]


@op("unsqueeze", "structural")
def _unsqueeze(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Insert size-1 `axes` (positions in the output)."""
    shape = list(ins[0].shape)
    rank = len(shape) + len(node.attrs["axes"])
    for a in sorted(_axis(node, a, rank) for a in node.attrs["axes"]):
        shape.insert(a, 1)
    return [TensorMeta(tuple(shape), ins[0].dtype)]


def _pool_out(node: Node, x: TensorMeta, kernel: tuple[int, ...]) -> list[TensorMeta]:
    a = node.attrs
    dims = len(kernel)
    stride = a.get("stride") or kernel
    pad = a.get("padding", (0,) * 2 * dims)
    dil = a.get("dilation", (1,) * dims)
    sp = []
    for i in range(dims):
        span = x.shape[2 + i] + pad[i] + pad[i + dims] - dil[i] * (kernel[i] - 1) - 1
        o = (-(-span // stride[i]) if a.get("ceil_mode") else span // stride[i]) + 1
        if a.get("ceil_mode") and (o - 1) * stride[i] >= x.shape[2 + i] + pad[i]:
            o -= 1
        if o <= 0:
            raise _fail(node, f"input {x} too small for kernel {list(kernel)}")
        sp.append(o)
    return [TensorMeta((*x.shape[:2], *sp), x.dtype)]


def _pool_flops(node: Node, ins: list[TensorMeta], outs: list[TensorMeta]) -> int:
    return outs[0].numel() * math.prod(node.attrs["kernel"])


@op("max_pool", "elementwise", flops=_pool_flops)
def _maxpool(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Max pooling; attrs kernel, stride, padding (begins+ends), dilation, ceil_mode."""
    return _pool_out(node, ins[0], tuple(node.attrs["kernel"]))


@op("avg_pool", "elementwise", flops=_pool_flops)
def _avgpool(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Average pooling; attrs kernel, stride, padding, ceil_mode, count_include_pad."""
    return _pool_out(node, ins[0], tuple(node.attrs["kernel"]))


@op("adaptive_avg_pool", "elementwise", flops=lambda n, i, o: i[0].numel())
def _adaptive(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Adaptive average pooling to `output_size`; global average pooling is output_size all ones."""
    return [TensorMeta((*ins[0].shape[:2], *node.attrs["output_size"]), ins[0].dtype)]


@op("mean", "structural", flops=lambda n, i, o: i[0].numel())
def _mean(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Mean over `axes`, keeping them when `keepdim`."""
    rank = len(ins[0].shape)
    axes = {_axis(node, a, rank) for a in node.attrs["axes"]}
    keep = node.attrs.get("keepdim", False)
    shape = tuple(1 if i in axes else d for i, d in enumerate(ins[0].shape) if keep or i not in axes)
    return [TensorMeta(shape, ins[0].dtype)]


@op("pad", "elementwise")
def _pad(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Constant/reflect/replicate padding; `pads` ONNX-ordered over all axes (begins..., ends...)."""
    pads = node.attrs["pads"]
    rank = len(ins[0].shape)
    if len(pads) != 2 * rank:
        raise _fail(node, f"pads {list(pads)} do not fit rank {rank}")
    return [TensorMeta(tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(ins[0].shape)), ins[0].dtype)]


@op("resize", "elementwise")
def _resize(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Spatial resize by `size` or `scale` (per spatial axis); `mode` nearest or linear."""
    x = ins[0]
    if node.attrs.get("size"):
        sp = tuple(node.attrs["size"])
    else:
        sp = tuple(math.floor(d * s) for d, s in zip(x.shape[2:], node.attrs["scale"]))
    return [TensorMeta((*x.shape[:2], *sp), x.dtype)]


@op("quantize", "elementwise", params=("scale", "zero_point"))
def _quant(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Affine quantisation to int8/uint8 (`axis` for per-channel scales)."""
    return [TensorMeta(ins[0].shape, str(node.params["zero_point"].dtype).removeprefix("torch."))]


@op("dequantize", "elementwise", params=("scale", "zero_point"))
def _dequant(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """Affine dequantisation back to float32."""
    return [TensorMeta(ins[0].shape, "float32")]


@op("opaque", "barrier", arity=(0, None))
def _opaque(node: Node, ins: list[TensorMeta]) -> list[TensorMeta]:
    """An op the IR does not know: run verbatim; its output shapes are what the frontend observed."""
    if not node.meta:
        raise _fail(node, "opaque node has no recorded output shapes")
    return list(node.meta)


def infer_node(graph: Graph, node: Node) -> list[TensorMeta]:
    s = spec(node.kind)
    ins = graph.input_metas(node.id)
    lo, hi = s.arity
    if len(ins) < lo or (hi is not None and len(ins) > hi):
        raise _fail(node, f"has {len(ins)} operands, expected {lo if hi == lo else f'{lo}..{hi or chr(110)}'}")
    for p in s.params:
        if p not in node.params:
            raise _fail(node, f"missing param '{p}'")
    try:
        return s.infer(node, ins)
    except VerifyError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _fail(node, f"malformed attributes or params ({type(e).__name__}: {e})") from None


def infer_shapes(graph: Graph) -> None:
    """Fills `meta` of every node in topological order."""
    for node in graph.nodes():
        node.meta = infer_node(graph, node)


def node_flops(graph: Graph, node: Node) -> int:
    return int(spec(node.kind).flops(node, graph.input_metas(node.id), node.meta))


# Params that torch keeps as buffers, not nn.Parameters: not counted as parameters.
BUFFERS = frozenset({"running_mean", "running_var", "scale", "zero_point", "value"})


def node_params(node: Node) -> int:
    """Trainable parameters (what `sum(p.numel() for p in module.parameters())` counts)."""
    if node.kind == "constant":
        return 0
    return sum(int(t.numel()) for k, t in node.params.items() if k not in BUFFERS)


def node_param_bytes(node: Node, *, tables: bool = True) -> int:
    """Exact stored bytes of the node's params (encoded forms at their encoded size)."""
    return sum(weights.nbytes(t, tables=tables) for t in node.params.values())


def node_nonzeros(node: Node) -> int:
    """Non-zero parameter values (trainable params only, as `node_params` counts them)."""
    if node.kind == "constant":
        return 0
    return sum(weights.nnz(t) for k, t in node.params.items() if k not in BUFFERS)


def node_weight_forms(node: Node) -> str:
    """The params' storage forms, e.g. 'weight: int8 per-axis(0)', for reports; '' when all are dense."""
    return ", ".join(f"{k}: {weights.describe(t)}" for k, t in sorted(node.params.items())
                     if weights.form_of(t) != "dense")

