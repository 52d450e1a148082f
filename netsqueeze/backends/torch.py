"""Torch backend: emits an IR `Graph` as a `torch.fx.GraphModule` of real torch.nn layers.

Per-kind emitters live in `EMITTERS`; `@emitter("kind")` adds or replaces one (e.g. from a pass package).
"""

from __future__ import annotations

import copy
import keyword
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from netsqueeze.backends.torch_modules import (
    Attention,
    Opaque,
    ParamHolder,
    SparseLinear,
    WithEncodedParams,
    resize_nearest,
)
from netsqueeze.errors import Diagnostic, NetsqueezeError, UnsupportedOpError
from netsqueeze.ir.calls import AtenCall, Slot
from netsqueeze.ir.dims import expr_of, fmt, is_dynamic, lower, reshape_plan, symbol_sources
from netsqueeze.ir.graph import OUTPUT_TREE, Graph, Node, Value
from netsqueeze.ir.ops import BUFFERS, attr
from netsqueeze.ir.tables import registrar
from netsqueeze.ir.weights import Encoded, Sparse

__all__ = ["EMITTERS", "Emitter", "ModuleBuilder", "emitter", "to_torch"]


# names a part of a module path may not take: nn.Module's and GraphModule's attributes (graph, code, meta,
# recompile, ...), Python keywords and `self` (the generated forward's code names submodules by their paths)
_MODULE_ATTRS = frozenset(dir(nn.Module())) | frozenset(dir(fx.GraphModule)) | frozenset(keyword.kwlist) | {
    "self", "graph", "meta", "code", "_code", "_graph"}
NODE_PATHS = "netsqueeze.node_paths"  # key of `GraphModule.meta`: node id → the module path holding its params


class ModuleBuilder:
    """What an emitter sees: the fx graph under construction and the module tree it fills."""

    def __init__(self, graph: Graph, sparse: Literal["decode", "csr"] = "decode") -> None:
        self.ir = graph
        self.sparse = sparse
        self.fx = fx.Graph()
        self.root = nn.Module()
        self._paths: dict[str, str] = {}
        self._taken: set[str] = set()
        # the paths of the nodes that hold params: a node emitted earlier must not take a path inside one
        # (a gather 'fc.select' before linear 'fc' would push 'fc' off its own name)
        self._owned = {".".join(self._parts(n.id)) for n in graph.nodes() if n.params}
        self.inputs: dict[str, fx.Node] = {}  # graph input id → placeholder
        self.dim_sources = symbol_sources([(n, graph.node(n).meta[0].shape) for n in graph.inputs])
        self._dims: dict[str, fx.Node] = {}

    def size(self, d: int) -> Any:
        """Size `d` in the emitted code: an int, or for a dynamic dim a value computed from the inputs' sizes."""
        if not is_dynamic(d):
            return int(d)

        def symbol(name: str) -> fx.Node:
            if name not in self._dims:
                nid, axis = self.dim_sources[name]
                self._dims[name] = self.fx.call_method("size", (self.inputs[nid], axis))
            return self._dims[name]

        return lower(expr_of(d), symbol=symbol, const=int, add=lambda a, b: self.call(operator.add, a, b),
                     mul=lambda a, b: self.call(operator.mul, a, b),
                     floordiv=lambda a, b: self.call(operator.floordiv, a, b),
                     mod=lambda a, b: self.call(operator.mod, a, b))

    def target_shape(self, x: fx.Node, out: tuple[int, ...], src: tuple[int, ...]) -> list[Any]:
        """Reshape arguments for output shape `out` of `x` (shape `src`): ints, `x.size(i)` where a
        dynamic dim stays in place, -1 for one other dynamic dim, computed sizes for the rest."""
        plan = reshape_plan(out, src)
        return [self.fx.call_method("size", (x, i)) if t == 0 and is_dynamic(out[i]) else
                self.size(out[i]) if t is None else t for i, t in enumerate(plan)]

    def path(self, node: Node) -> str:
        """A module path for the node: its id where that is a valid, free dotted path."""
        if node.id in self._paths:
            return self._paths[node.id]
        parts = self._parts(node.id)
        cand = ".".join(parts)
        if not self._free(cand) or any(".".join(parts[:i]) in self._owned for i in range(1, len(parts))):
            cand = re.sub(r"\W", "_", node.id)
            base, i = cand, 1
            while not self._free(cand):
                cand, i = f"{base}_{i}", i + 1
        self._taken.add(cand)
        self._paths[node.id] = cand
        return cand

    @staticmethod
    def _parts(nid: str) -> list[str]:
        # a part that names an nn.Module attribute ('half', 'eval', ...) would shadow it
        return [p + "_" if p in _MODULE_ATTRS else p for p in (re.sub(r"\W", "_", q) or "_" for q in nid.split("."))]

    def _free(self, cand: str) -> bool:
        # a module path may neither repeat nor sit inside / above another module's path
        return not any(t == cand or t.startswith(cand + ".") or cand.startswith(t + ".") for t in self._taken)

    def add_module(self, node: Node, module: nn.Module) -> str:
        path = self.path(node)
        parent: nn.Module = self.root
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], module)
        return path

    def call_module(self, node: Node, module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None
                    ) -> fx.Node:
        return self.fx.call_module(self.add_module(node, module), tuple(args), kwargs or {})

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self.fx.call_function(fn, args, kwargs)

    def params(self, node: Node) -> fx.Node:
        """Registers the node's params on a holder module; returns its get_attr base path."""
        return self.fx.get_attr(self.add_module(node, ParamHolder(node.params, BUFFERS)))

    def param(self, node: Node, name: str) -> fx.Node:
        """The node's param `name` as a value in the emitted graph (an encoded param is decoded there)."""
        if node.id not in self._paths:
            self.add_module(node, ParamHolder(node.params, BUFFERS))
        target = f"{self._paths[node.id]}.{name}"
        if isinstance(node.params[name], Encoded):
            return self.fx.call_module(target, (), {})
        return self.fx.get_attr(target)


Emitter = Callable[[ModuleBuilder, Node, list[fx.Node]], "fx.Node | list[fx.Node]"]
EMITTERS: dict[str, Emitter] = {}


emitter = registrar(EMITTERS)


def _p(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


def _set_params(m: nn.Module, node: Node, names: dict[str, str] | None = None) -> nn.Module:
    """Copies the node's params into `m` (cloned), by IR name or through `names` (IR -> module).

    Encoded params stay encoded: `m` is wrapped so that they are decoded on each call."""
    encoded: dict[str, Encoded] = {}
    for k, t in node.params.items():
        attr = (names or {}).get(k, k)
        if isinstance(t, Encoded):
            encoded[attr] = t
        elif k in BUFFERS:
            getattr(m, attr).data = t.detach().clone()
        else:
            setattr(m, attr, _p(t))
    return WithEncodedParams(m, encoded) if encoded else m


def _sym(pads: Sequence[int], dims: int) -> bool:
    return tuple(pads[:dims]) == tuple(pads[dims:])


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    return out


@emitter("conv")
def _conv(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    w = node.params["weight"]
    dims = w.dim() - 2
    a = node.attrs
    g = attr(node, "groups")
    pads = tuple(a.get("padding", (0,) * 2 * dims))
    cls: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    m = cls(w.shape[1] * g, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("stride", (1,) * dims)),
            padding=pads[:dims] if _sym(pads, dims) else 0, dilation=tuple(a.get("dilation", (1,) * dims)),
            groups=g, bias="bias" in node.params, dtype=w.dtype)
    x = xs[0]
    if not _sym(pads, dims):
        x = b.call(F.pad, x, _torch_pad(pads[:dims], pads[dims:]))
    return b.call_module(node, _set_params(m, node), [x])


@emitter("conv_transpose")
def _conv_t(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    w = node.params["weight"]
    dims = w.dim() - 2
    a = node.attrs
    g = attr(node, "groups")
    pads = tuple(a.get("padding", (0,) * 2 * dims))
    if not _sym(pads, dims):
        raise UnsupportedOpError(Diagnostic(f"conv_transpose '{node.id}' has asymmetric padding {list(pads)}, "
                                            "which torch cannot express", node=node.id))
    cls: Any = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    m = cls(w.shape[0], w.shape[1] * g, tuple(w.shape[2:]), stride=tuple(a.get("stride", (1,) * dims)),
            padding=pads[:dims], output_padding=tuple(a.get("output_padding", (0,) * dims)), groups=g,
            bias="bias" in node.params, dilation=tuple(a.get("dilation", (1,) * dims)), dtype=w.dtype)
    return b.call_module(node, _set_params(m, node), [xs[0]])


@emitter("linear")
def _linear(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    w = node.params["weight"]
    if b.sparse == "csr" and isinstance(w, Sparse) and not isinstance(node.params.get("bias"), Encoded):
        bias = node.params.get("bias")
        return b.call_module(node, SparseLinear(w.dense(), bias if isinstance(bias, torch.Tensor) else None), [xs[0]])
    m = nn.Linear(w.shape[1], w.shape[0], bias="bias" in node.params, dtype=w.dtype)
    return b.call_module(node, _set_params(m, node), [xs[0]])


@emitter("batch_norm")
def _bn(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    p = node.params
    rank = len(node.meta[0].shape) if node.meta else 4
    affine = "weight" in p and "bias" in p
    if ("weight" in p) != ("bias" in p):  # half-affine: no torch layer matches, use the functional form
        w = b.param(node, "weight") if "weight" in p else None
        bias = b.param(node, "bias") if "bias" in p else None
        return b.call(F.batch_norm, xs[0], b.param(node, "running_mean"), b.param(node, "running_var"), w, bias,
                      False, 0.0, node.attrs.get("eps", 1e-5))
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)
    c = p["running_mean"].shape[0]
    m = cls(c, eps=node.attrs.get("eps", 1e-5), affine=affine, dtype=p["running_mean"].dtype)
    # counts train-mode batches, so statistics can be re-estimated (reset_running_stats, momentum = None); not
    # persistent: the state_dict holds exactly the IR's params
    m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long), persistent=False)
    m.eval()
    return b.call_module(node, _set_params(m, node), [xs[0]])


@emitter("layer_norm")
def _ln(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    p = node.params
    m = nn.LayerNorm(tuple(node.attrs["normalized_shape"]), eps=node.attrs.get("eps", 1e-5),
                     elementwise_affine="weight" in p, bias="bias" in p)
    if "bias" in p and "weight" not in p:
        return b.call(F.layer_norm, xs[0], tuple(node.attrs["normalized_shape"]), None, b.param(node, "bias"),
                      node.attrs.get("eps", 1e-5))
    return b.call_module(node, _set_params(m, node), [xs[0]])


@emitter("group_norm")
def _gn(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    p = node.params
    c = node.meta[0].shape[1]
    if ("weight" in p) != ("bias" in p):
        return b.call(F.group_norm, xs[0], node.attrs["num_groups"], b.param(node, "weight") if "weight" in p
                      else None, b.param(node, "bias") if "bias" in p else None, node.attrs.get("eps", 1e-5))
    m = nn.GroupNorm(node.attrs["num_groups"], c, eps=node.attrs.get("eps", 1e-5), affine="weight" in p)
    return b.call_module(node, _set_params(m, node), [xs[0]])


@emitter("embedding")
def _embedding(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    w = node.params["weight"]
    return b.call_module(node, _set_params(nn.Embedding(w.shape[0], w.shape[1], dtype=w.dtype), node), [xs[0]])


@emitter("attention")
def _attention(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    a, p = node.attrs, node.params
    m = Attention(a["embed_dim"], a["num_heads"], a["head_dim"], a.get("batch_first", True),
                  "in_proj_bias" in p, "out_proj_bias" in p)
    return b.call_module(node, _set_params(m, node), xs)


@emitter("lrn")
def _lrn(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    m = nn.LocalResponseNorm(a["size"], alpha=a.get("alpha", 1e-4), beta=a.get("beta", 0.75), k=a.get("bias", 1.0))
    return b.call_module(node, m, xs)


def _unary(fn: Callable[..., Any], **fixed: Any) -> Emitter:
    def emit(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
        return b.call(fn, xs[0], **fixed)

    return emit


def _binary(fn: Callable[..., Any]) -> Emitter:
    def emit(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
        return b.call(fn, xs[0], xs[1])

    return emit


_UNARY: list[tuple[str, Callable[..., Any]]] = [
    ("relu", F.relu), ("silu", F.silu), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
    ("hardswish", F.hardswish)]
_BINARY: list[tuple[str, Callable[..., Any]]] = [
    ("add", torch.add), ("sub", torch.sub), ("mul", torch.mul), ("div", torch.div), ("matmul", torch.matmul)]
@emitter("hardsigmoid")
def _hardsigmoid(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    alpha, beta = float(node.attrs.get("alpha", 1 / 6)), float(node.attrs.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-9 and beta == 0.5:
        return b.call(F.hardsigmoid, xs[0])
    return b.call(torch.clamp, b.call(torch.add, b.call(torch.mul, xs[0], alpha), beta), 0.0, 1.0)


for _k, _fn in _UNARY:
    EMITTERS[_k] = _unary(_fn)
for _k, _fn in _BINARY:
    EMITTERS[_k] = _binary(_fn)


@emitter("identity")
def _identity(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return xs[0]


@emitter("gelu")
def _gelu(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(F.gelu, xs[0], approximate=node.attrs.get("approximate", "none"))


@emitter("leaky_relu")
def _leaky(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(F.leaky_relu, xs[0], node.attrs.get("negative_slope", 0.01))


@emitter("clip")
def _clip(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    if lo is not None and hi is not None and float(lo) <= float(hi):
        return b.call(F.hardtanh, xs[0], float(lo), float(hi))  # min above max: clamp gives max, as ONNX Clip
    return b.call(torch.clamp, xs[0], lo, hi)


@emitter("softmax")
def _softmax(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(torch.softmax, xs[0], node.attrs["axis"])


@emitter("concat")
def _concat(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(torch.cat, list(xs), node.attrs["axis"])


@emitter("split")
def _split(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    parts = b.call(torch.split, xs[0], list(node.attrs["sizes"]), node.attrs["axis"])
    return [b.call(operator.getitem, parts, i) for i in range(len(node.attrs["sizes"]))]


@emitter("slice")
def _slice(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    rank = len(node.meta[0].shape)
    ax = a["axis"] % rank
    step = a.get("step", 1)
    if step > 0:
        return b.call(operator.getitem, xs[0], (slice(None),) * ax + (slice(a["start"], a["end"], step),))
    # torch slicing has no negative steps: flip the axis and slice forwards
    size = b.ir.input_metas(node.id)[0].shape[ax]
    if step == -1 and is_dynamic(size) and expr_of(node.meta[0].shape[ax]) == expr_of(size):
        return b.call(torch.flip, xs[0], (ax,))  # the whole axis reversed, at every size of it
    size = int(size)
    r = range(*slice(a["start"], a["end"], step).indices(size))
    first = size - 1 - r[0] if len(r) else 0
    fwd = slice(first, first + (len(r) - 1) * -step + 1, -step) if len(r) else slice(0, 0)
    return b.call(operator.getitem, b.call(torch.flip, xs[0], (ax,)), (slice(None),) * ax + (fwd,))


@emitter("gather")
def _gather(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    rank = len(node.meta[0].shape)
    holder = ParamHolder({"indices": torch.tensor(list(node.attrs["indices"]), dtype=torch.int64)}, BUFFERS)
    index = b.fx.get_attr(f"{b.add_module(node, holder)}.indices")
    return b.call(torch.index_select, xs[0], node.attrs["axis"] % rank, index)

@emitter("flatten")
def _flatten(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(torch.flatten, xs[0], node.attrs.get("start_dim", 1), node.attrs.get("end_dim", -1))


@emitter("reshape")
def _reshape(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    src, out = b.ir.input_metas(node.id)[0].shape, node.meta[0].shape
    if any(is_dynamic(d) for d in (*src, *out)):
        return b.fx.call_method("reshape", (xs[0], *b.target_shape(xs[0], out, src)))
    # 0 copies the input dim at run time, so the batch size is not baked in
    shape = [b.fx.call_method("size", (xs[0], i)) if d == 0 else int(d) for i, d in enumerate(node.attrs["shape"])]
    return b.fx.call_method("reshape", (xs[0], *shape) if shape else (xs[0], ()))  # () : to a scalar


@emitter("transpose")
def _transpose(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(torch.permute, xs[0], tuple(node.attrs["perm"]))


@emitter("squeeze")
def _squeeze(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(torch.squeeze, xs[0], tuple(node.attrs["axes"]))


@emitter("unsqueeze")
def _unsqueeze(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    rank = len(node.meta[0].shape)
    x = xs[0]
    for ax in sorted(a % rank for a in node.attrs["axes"]):
        x = b.call(torch.unsqueeze, x, ax)
    return x


def _pool_pad(b: ModuleBuilder, node: Node, x: fx.Node, dims: int, value: float) -> tuple[fx.Node, tuple[int, ...]]:
    pads = tuple(node.attrs.get("padding", (0,) * 2 * dims))
    if _sym(pads, dims):
        return x, pads[:dims]
    return b.call(F.pad, x, _torch_pad(pads[:dims], pads[dims:]), "constant", value), (0,) * dims


@emitter("max_pool")
def _max_pool(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    k = tuple(a["kernel"])
    dims = len(k)
    x, pad = _pool_pad(b, node, xs[0], dims, float("-inf"))
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    return b.call(fn, x, k, tuple(a.get("stride") or k), pad, tuple(a.get("dilation", (1,) * dims)),
                  bool(a.get("ceil_mode", False)))


@emitter("avg_pool")
def _avg_pool(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    k = tuple(a["kernel"])
    dims = len(k)
    pads = tuple(a.get("padding", (0,) * 2 * dims))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    stride, ceil = tuple(a.get("stride") or k), bool(a.get("ceil_mode", False))
    x, pad = _pool_pad(b, node, xs[0], dims, 0.0)
    if _sym(pads, dims) or a.get("count_include_pad", True):
        return b.call(fn, x, k, stride, pad, ceil, bool(a.get("count_include_pad", True)))
    # asymmetric padding excluded from the count (ONNX's default): torch pools only symmetric padding,
    # so pad explicitly and divide the window sums by the pooled count of real (unpadded) positions
    ones = b.call(torch.ones_like, b.call(operator.getitem, xs[0], (slice(None, 1), slice(None, 1))))
    ones_p, _ = _pool_pad(b, node, ones, dims, 0.0)
    num = b.call(fn, x, k, stride, pad, ceil, True)
    return b.call(torch.div, num, b.call(fn, ones_p, k, stride, pad, ceil, True))


@emitter("adaptive_avg_pool")
def _adaptive(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    size = tuple(node.attrs["output_size"])
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    return b.call(fn, xs[0], size)


@emitter("mean")
def _mean(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.call(torch.mean, xs[0], tuple(node.attrs["axes"]), bool(node.attrs.get("keepdim", False)))


@emitter("pad")
def _pad(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    pads = list(node.attrs["pads"])
    rank = len(pads) // 2
    tp = _torch_pad(pads[:rank], pads[rank:])
    mode = node.attrs.get("mode", "constant")
    while len(tp) > 2 and tp[-2:] == [0, 0] and mode != "constant":
        tp = tp[:-2]  # reflect/replicate accept spatial axes only
    if mode == "constant":
        return b.call(F.pad, xs[0], tp, "constant", float(node.attrs.get("value", 0.0)))
    return b.call(F.pad, xs[0], tp, mode)


@emitter("resize")
def _resize(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    mode = str(a.get("mode", "nearest"))
    dims = len(node.meta[0].shape) - 2
    ctm = str(a.get("coordinate_transformation_mode", "asymmetric" if mode == "nearest" else "half_pixel"))
    kw: dict[str, Any] = {}
    if mode == "nearest":
        nearest = str(a.get("nearest_mode", "floor"))
        if ctm != "asymmetric" or nearest != "floor":  # F.interpolate's "nearest-exact" rounds ties up only
            sizes = tuple(b.size(d) for d in node.meta[0].shape[2:])
            scales = None if a.get("size") else tuple(float(s) for s in a["scale"])
            return b.call(resize_nearest, xs[0], sizes, scales, ctm, nearest)
        kw["mode"] = "nearest"
    elif mode in ("linear", "cubic") and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kw["mode"] = {1: "linear", 2: "bilinear", 3: "trilinear"}[dims] if mode == "linear" else "bicubic"
        kw["align_corners"] = ctm == "align_corners" or bool(a.get("align_corners", False))
        if mode == "cubic" and (float(a.get("cubic_coeff_a", -0.75)) != -0.75 or a.get("exclude_outside")):
            kw = {}
    if not kw or (kw["mode"] == "bicubic" and dims != 2):
        raise UnsupportedOpError(Diagnostic(
            f"resize '{node.id}': mode '{mode}' with coordinate_transformation_mode '{ctm}' has no torch "
            "equivalent", node=node.id))
    if a.get("size"):
        kw["size"] = tuple(b.size(d) for d in a["size"])  # sizes following the dynamic dims: from x.size()
    else:
        kw["scale_factor"] = tuple(float(s) for s in a["scale"])
    return b.call(F.interpolate, xs[0], **kw)


@emitter("sizes")
def _sizes(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    values, shape = list(node.attrs["values"]), tuple(int(d) for d in node.attrs["shape"])
    t = b.call(torch.tensor, [b.size(d) for d in values], dtype=torch.int64)
    return b.fx.call_method("reshape", (t, shape))


@emitter("constant")
def _constant(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    return b.param(node, "value")


def _qshape(node: Node, t: fx.Node, b: ModuleBuilder, rank: int) -> fx.Node:
    if node.params["scale"].dim() == 0 or "axis" not in node.attrs:
        return t
    shape = [1] * rank
    shape[node.attrs["axis"] % rank] = -1
    return b.fx.call_method("reshape", (t, *shape))


@emitter("quantize")
def _quantize(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    rank = len(node.meta[0].shape)
    dt = node.params["zero_point"].dtype
    info = torch.iinfo(dt)
    s = _qshape(node, b.param(node, "scale"), b, rank)
    z = _qshape(node, b.param(node, "zero_point"), b, rank)
    q = b.call(torch.add, b.call(torch.round, b.call(torch.div, xs[0], s)), z)
    return b.fx.call_method("to", (b.call(torch.clamp, q, info.min, info.max), dt))


@emitter("dequantize")
def _dequantize(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node:
    rank = len(node.meta[0].shape)
    s = _qshape(node, b.param(node, "scale"), b, rank)
    z = _qshape(node, b.param(node, "zero_point"), b, rank)
    # to the scale's dtype: float32, or float16 in a module emitted at precision fp16 (.half() converts it)
    x = b.call(torch.sub, b.fx.call_method("type_as", (xs[0], s)), z)
    return b.call(torch.mul, x, s)


@emitter("opaque")
def _opaque(b: ModuleBuilder, node: Node, xs: list[fx.Node]) -> fx.Node | list[fx.Node]:
    fn = node.origin.payload
    if fn is None or not callable(fn) or isinstance(fn, type):
        raise UnsupportedOpError(Diagnostic(
            f"opaque node '{node.id}' (op type '{node.origin.op_type or '?'}', from "
            f"{node.origin.frontend or 'unknown'}) has no torch implementation", node=node.id))
    fn, xs = _runtime_sizes(b, fn, xs)
    out = b.call_module(node, Opaque(copy.deepcopy(fn), node.origin.op_type), xs)
    if len(node.meta) > 1:
        return [b.call(operator.getitem, out, i) for i in range(len(node.meta))]
    return out


def _runtime_sizes(b: ModuleBuilder, fn: Any, xs: list[fx.Node]) -> tuple[Any, list[fx.Node]]:
    """An aten call whose arguments hold dynamic sizes (a `view` to [batch, 64, -1, 16]) gets them as extra
    operands computed from the inputs' sizes at run time, instead of the example's values."""
    if not isinstance(fn, AtenCall):
        return fn, xs
    extra: list[fx.Node] = []

    def sub(a: Any) -> Any:
        if is_dynamic(a):
            extra.append(b.size(a))
            return Slot(len(xs) + len(extra) - 1)
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, dict):
            return {k: sub(v) for k, v in a.items()}
        return a

    call = AtenCall(fn.namespace, fn.packet, fn.overload, sub(fn.args), sub(fn.kwargs))
    return (call, [*xs, *extra]) if extra else (fn, xs)


def _check_inputs(b: ModuleBuilder, graph: Graph) -> None:
    """With declared dynamic dims, the emitted forward checks the inputs' rank and fixed dims first, so
    a shape the model cannot handle is a clear error instead of a wrong result."""
    metas = {nid: graph.node(nid).meta[0] for nid in graph.inputs}
    if not any(is_dynamic(d) for m in metas.values() for d in m.shape):
        return
    for nid, m in metas.items():
        x = b.inputs[nid]
        shape = f"[{fmt(m.shape)}]"
        b.call(torch._assert, b.call(operator.eq, b.fx.call_method("dim", (x,)), len(m.shape)),
               f"input '{nid}' must have rank {len(m.shape)} (shape {shape})")
        for axis, d in enumerate(m.shape):
            if not is_dynamic(d):
                b.call(torch._assert, b.call(operator.eq, b.fx.call_method("size", (x, axis)), int(d)),
                       f"input '{nid}' axis {axis} must be {int(d)} (shape {shape})")


def _emit(b: ModuleBuilder, graph: Graph, env: dict[Value, fx.Node], nodes: Sequence[Node]) -> list[fx.Node]:
    """Emits `nodes` (topological order) into `b`, reading operands from `env` and adding their outputs
    to it; returns the operands of the output nodes among them, in `graph.outputs` order (a rewrite can put
    the outputs' computations in another topological order)."""
    outs: dict[str, fx.Node] = {}
    for node in nodes:
        if node.kind == "input":
            continue
        args = [env[v] for v in graph.operands(node.id)]
        if node.kind == "output":
            outs[node.id] = args[0]
            continue
        emit = EMITTERS.get(node.kind)
        if emit is None:
            raise UnsupportedOpError(Diagnostic(f"the torch backend has no emitter for op kind '{node.kind}' "
                                                f"(node '{node.id}')", node=node.id))
        r = emit(b, node, args)
        for i, fxn in enumerate(r if isinstance(r, list) else [r]):
            env[(node.id, i)] = fxn
    return [outs[o] for o in graph.outputs if o in outs]


def to_torch_segment(graph: Graph, feeds: Sequence[Value], fetch: Sequence[Value]) -> fx.GraphModule:
    """The nodes of `graph` that compute `fetch` from `feeds`, as an eval-mode GraphModule: forward takes
    the feeds' tensors positionally and returns the list of fetched tensors. Only the ancestors of `fetch`
    up to `feeds` are emitted (their ids: `meta["segment_nodes"]`); a dynamic dim is read from the first feed that carries it. A fetched value
    that needs a graph input not among `feeds` is a `NetsqueezeError`."""
    feed_set = set(feeds)
    need: set[str] = set()
    todo = [v for v in fetch if v not in feed_set]
    while todo:
        nid = todo.pop()[0]
        if nid in need:
            continue
        if graph.node(nid).kind == "input":
            raise NetsqueezeError(Diagnostic(f"segment: value of input '{nid}' is needed but not fed", node=nid))
        need.add(nid)
        todo.extend(v for v in graph.operands(nid) if v not in feed_set and v[0] not in need)
    b = ModuleBuilder(graph)
    env: dict[Value, fx.Node] = {}
    metas = []
    for i, v in enumerate(feeds):
        key = f"feed_{i}"
        env[v] = b.inputs[key] = b.fx.placeholder(key)
        metas.append((key, graph.node(v[0]).meta[v[1]].shape))
    b.dim_sources = symbol_sources(metas)
    _emit(b, graph, env, [n for n in graph.nodes() if n.id in need])
    b.fx.output([env[v] for v in fetch])
    gm = fx.GraphModule(b.root, b.fx, class_name="Segment")
    gm.meta["segment_nodes"] = frozenset(need)  # the node ids it runs
    gm.eval()
    return gm


def to_torch(graph: Graph, *, extra_outputs: Sequence[Value] = (),
             sparse: Literal["decode", "csr"] = "decode", nested: bool = False) -> fx.GraphModule:
    """Emits `graph` as an eval-mode GraphModule whose layers sit at the node ids' dotted paths.

    Forward takes the graph inputs positionally and returns one tensor for one output, else a
    tuple; with `extra_outputs` it always returns `(*outputs, *extras)`; with `nested`, the outputs nested as
    the captured model returned them (dicts and lists: graph meta `output_tree`), when they still match it.
    Params are cloned.
    `sparse`: a linear layer with a sparse weight decodes it to a dense weight with zeros on each call
    (`decode`, the same arithmetic as the dense layer), or keeps a `torch.sparse_csr` weight and
    multiplies with it (`csr`, `SparseLinear`).
    """
    b = ModuleBuilder(graph, sparse)
    env: dict[Value, fx.Node] = {}
    used_names: set[str] = set()
    for nid in graph.inputs:
        name = re.sub(r"\W", "_", nid)
        if not name or name[0].isdigit() or name in used_names:
            name = f"input_{len(used_names)}"
        used_names.add(name)
        env[(nid, 0)] = b.inputs[nid] = b.fx.placeholder(name)
    _check_inputs(b, graph)
    outs = _emit(b, graph, env, graph.nodes())
    extras = [env[(v[0], v[1])] for v in extra_outputs]
    tree = graph.meta.get(OUTPUT_TREE) if nested and not extras else None
    if extras:
        b.fx.output((*outs, *extras))
    elif tree is not None and (spec := pytree.treespec_loads(tree)).num_leaves == len(outs):
        b.fx.output(pytree.tree_unflatten(list(outs), spec))
    else:
        b.fx.output(outs[0] if len(outs) == 1 else tuple(outs))
    gm = fx.GraphModule(b.root, b.fx, class_name=re.sub(r"\W", "_", graph.name) or "Emitted")
    gm.meta[NODE_PATHS] = dict(b._paths)  # node id → module path, for views that address params by node
    gm.eval()
    return gm
