"""The capture paths (torch.export, torch.fx.symbolic_trace fallback) and the driver that walks the
captured graph through the op tables, the module collapsing and the opaque fallback."""

from __future__ import annotations

import contextlib
import inspect
import io
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from netsqueeze.errors import CaptureError, Diagnostic, InputMismatchError, NetsqueezeError, VerifyError
from netsqueeze.frontends.fx.checks import _check_count, _check_inputs, _first_line, _forward_names
from netsqueeze.frontends.fx.collapse import _collapse, _collapse_key, size_nodes
from netsqueeze.frontends.fx.opaque import _opaque
from netsqueeze.frontends.fx.ops import (
    _FUNCS,
    _METHODS,
    _VARARGS,
    HANDLERS,
    _bind,
    _dtype_name,
    _mod_args,
    _schema_for,
)
from netsqueeze.frontends.fx.state import (
    CONTAINERS,
    SYMBOLS,
    _Capture,
    _dtype,
    _infer,
    _is_value,
    _meta,
    _record_check,
    _Scope,
    _Unmappable,
    python_value,
)
from netsqueeze.ir.canonicalize import canonicalize
from netsqueeze.ir.dims import Dim, is_dynamic
from netsqueeze.ir.graph import OUTPUT_TREE, Graph, Origin


# ---- the capture driver ----------------------------------------------------------------------------
def _scope_of(nd: fx.Node) -> tuple[str, str, str] | None:
    stack = nd.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, typ) = list(stack.items())[-1]
    return key, str(path), typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"


def _is_leaf_type(typ: str) -> bool:
    return typ.startswith("torch.nn.modules.") and typ.rsplit(".", 1)[-1] not in CONTAINERS


def _plan_names(cx: _Capture, nodes: list[fx.Node]) -> None:
    """Layer ops take their module's path; functional ops `<scope>.<op>` (made unique on emission)."""
    calls = [n for n in nodes if n.op in ("call_function", "call_method", "call_module")]
    runs: list[list[fx.Node]] = []
    for n in calls:
        if n.op == "call_module":
            cx.scopes[n] = _Scope(str(n.target), True)
            cx.names[n] = str(n.target)
            continue
        sc = _scope_of(n)
        if sc is None:
            cx.scopes[n] = _Scope("", False)
            continue
        _, path, typ = sc
        leaf = _is_leaf_type(typ)
        cx.scopes[n] = _Scope(path, leaf)
        if leaf:
            if runs and runs[-1] and _scope_of(runs[-1][-1]) == sc and runs[-1][-1] is _prev_call(calls, n):
                runs[-1].append(n)
            else:
                runs.append([n])
    for run in runs:
        main = [n for n in run if n.target is not operator.getitem]
        if main:
            cx.names[main[-1]] = cx.scopes[main[-1]].path
        for n in main[:-1]:
            cx.scopes[n] = _Scope(cx.scopes[n].path, False)


def _prev_call(calls: list[fx.Node], n: fx.Node) -> fx.Node | None:
    i = calls.index(n)
    return calls[i - 1] if i else None


# torch.export's own passes drop these: runtime assertions and shape guards carry no tensor
_DROPPED = frozenset({
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "_functional_assert_async",
    "_functional_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
    "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size", "_print",
})
# queries of a tensor's size: concrete python values in a capture at the example sizes
_SIZE_QUERIES = frozenset({"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "numel"})
# ops whose result depends only on an operand's shape and dtype, never on its values
_SHAPE_ONLY = frozenset({"new_ones", "new_zeros", "new_full", "ones_like", "zeros_like", "full_like",
                         "scalar_tensor"})


def _packet(nd: fx.Node) -> str | None:
    t = nd.target
    return t._overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else None


def _has_dynamic(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_has_dynamic(x) for x in v)
    if isinstance(v, dict):
        return any(_has_dynamic(x) for x in v.values())
    return is_dynamic(v)


def _ir_shape(cx: _Capture, a: fx.Node) -> tuple[int, ...]:
    v = cx.env.get(a)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and v[0] in cx.graph:
        return tuple(cx.graph.meta_of(v).shape)
    return ()


def _fold(cx: _Capture, nd: fx.Node) -> bool:
    """Evaluates an op whose tensor operands are all constants (e.g. `self.w.t()`), a source op with no
    tensor operand (`arange`, `full`; random ones excluded), python arithmetic on sizes, and ops that read
    only an operand's shape (`new_ones(x, ...)`, `zeros_like(x)`) at the example shape."""
    if nd.op not in ("call_function", "call_method"):
        return False
    ins = nd.all_input_nodes
    acts = [i for i in ins if i not in cx.consts and _is_value(cx.env.get(i))]
    packet = _packet(nd)
    shape_only = False
    if acts:
        if packet not in _SHAPE_ONLY or not isinstance(cx.observed.get(nd), torch.Tensor):
            return False
        shape_only = True
        if any(is_dynamic(d) for a in acts for d in _ir_shape(cx, a)):
            return False  # zeros_like(x) of a dynamic x: computed at run time, not fixed at the example's shape
    elif not any(i in cx.consts for i in ins):
        t = nd.target
        if isinstance(t, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in t.tags:
                return False
        elif not (nd.op == "call_function" and getattr(t, "__module__", None) in ("_operator", "math")):
            return False

    def sub(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in cx.consts:
                return cx.consts[a]
            if shape_only and a in acts:
                obs = cx.observed[a]
                return torch.zeros(tuple(int(d) for d in obs.shape), dtype=obs.dtype)
            return python_value(cx.env.get(a))
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, dict):
            return {k: sub(v) for k, v in a.items()}
        return a

    args, kwargs = sub(nd.args), sub(dict(nd.kwargs))
    if _has_dynamic((args, kwargs)) and isinstance(nd.target, torch._ops.OpOverload):
        # expand(cls_token, [batch, -1, -1]): a constant tensor would fix the batch at the example's (python
        # arithmetic on sizes still folds: it keeps the Dims)
        return False
    with torch.no_grad():
        if nd.op == "call_method":
            r = getattr(args[0], str(nd.target))(*args[1:], **kwargs)
        else:
            r = nd.target(*args, **kwargs)  # type: ignore[operator]
    if isinstance(r, torch.Tensor):
        cx.consts[nd] = r.detach().clone()
        return True
    if isinstance(r, (list, tuple)) and r and all(isinstance(x, torch.Tensor) for x in r):
        cx.consts[nd] = r  # type: ignore[assignment]  # getitem on it picks a constant
        return True
    cx.env[nd] = r
    return True


def _convert(cx: _Capture, gm: fx.GraphModule, input_names: list[str], example_inputs: Sequence[torch.Tensor],
             user_outputs: list[Any]) -> Graph:
    nodes = list(gm.graph.nodes)
    _plan_names(cx, nodes)
    groups: dict[fx.Node, tuple[list[fx.Node], str, str]] = {}
    if cx.aten:
        cur_key: tuple[str, str, str] | None = None
        for n in nodes:
            ck = _collapse_key(n) if n.op == "call_function" else None
            if ck is None:
                cur_key = None
                continue
            if ck != cur_key:
                groups[n] = ([n], ck[1], ck[2])
                head = n
                cur_key = ck
            else:
                groups[head][0].append(n)
    done: set[fx.Node] = set()
    inputs = iter(zip(input_names, example_inputs))
    for nd in nodes:
        if nd in done:
            continue
        if nd.op == "placeholder":
            if nd in cx.consts:
                continue
            name, t = next(inputs)
            attrs: dict[str, Any] = {"shape": tuple(t.shape), "dtype": _dtype(t.dtype)}
            if name in cx.input_dims:
                attrs["dims"] = cx.input_dims[name]
            nid = cx.graph.add_node(name, "input", attrs=attrs, origin=Origin("fx", name, "input"))
            cx.graph.node(nid).meta = _infer(cx.graph, nid)
            cx.env[nd] = (nid, 0)
            continue
        if nd.op == "get_attr":
            v = _getattr_path(gm, str(nd.target))
            if isinstance(v, torch.Tensor):
                cx.consts[nd] = v.detach().clone()
                cx.const_names[nd] = str(nd.target)
            else:
                cx.env[nd] = v
            continue
        if nd.op == "output":
            break
        if nd in groups:
            grp, path, typ = groups[nd]
            for sz in size_nodes(cx, grp):
                _convert_node(cx, sz)
            if _collapse(cx, grp, path, typ):
                done.update(grp)
                continue
        _convert_node(cx, nd)
    for i, o in enumerate(user_outputs):
        if not isinstance(o, fx.Node) or not _is_value(cx.env.get(o)) or not isinstance(cx.env[o], tuple):
            raise CaptureError(Diagnostic(f"model output {i} is not a tensor computed from the inputs"))
        cx.graph.add_node("output", "output", [cx.env[o]], origin=Origin("fx", f"output {i}", "output"),
                          unique=True)
    _drop_dead(cx.graph)
    cx.graph.infer_shapes()
    for value, expected, name in cx.checks:
        if value[0] not in cx.graph:
            continue
        got = cx.graph.meta_of(value)
        if got != expected:
            raise CaptureError(Diagnostic(
                f"frontend bug: node '{value[0]}' infers {got} but torch observed {expected} (fx node {name})",
                node=value[0]))
    canonicalize(cx.graph)  # graph rewrites shared with the ONNX frontend (GELU, BatchNorm affine, ...)
    cx.graph.verify()
    return cx.graph


def _drop_dead(graph: Graph) -> None:
    """Removes nodes nothing reads (mask-builder ops a mapped consumer looked through)."""
    kept = {n.id for n in graph.nodes() if n.kind in ("input", "output")}
    live = {v[0] for v in graph.output_values()} | kept
    for nid in reversed(graph.topo_order()):
        if nid in live:
            live.update(graph.producers(nid))
    for nid in reversed(graph.topo_order()):
        if nid not in live:
            graph.remove_node(nid)


def _getattr_path(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _convert_node(cx: _Capture, nd: fx.Node) -> None:
    cx.cur = nd
    cx._main_used = False
    obs = cx.observed.get(nd)
    if nd.target is operator.getitem:
        src, idx = nd.args[0], nd.args[1]
        v = cx.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(src, fx.Node) and src in cx.consts:
            cx.consts[nd] = cx.consts[src][idx]  # type: ignore[index]
        elif isinstance(v, list):
            cx.env[nd] = v[idx]  # type: ignore[index]
        elif _is_value(v):
            _set(cx, nd, _opaque(cx, nd))
        else:
            cx.env[nd] = v[idx]  # type: ignore[index]
        return
    packet0 = _packet(nd)
    if packet0 in _DROPPED:
        cx.env[nd] = None
        return
    if packet0 in _SIZE_QUERIES:
        cx.env[nd] = python_value(obs)
        return
    # python-level values (sizes, shapes) in module-level graphs are concrete: keep them as such
    if not cx.aten and not (isinstance(obs, torch.Tensor) or
                            (isinstance(obs, (list, tuple)) and obs and all(isinstance(o, torch.Tensor)
                                                                            for o in obs))):
        cx.env[nd] = obs
        return
    if _fold(cx, nd):
        return
    packet, a = _resolve(cx, nd)
    inplace = False
    if packet is not None and packet.endswith("_") and not packet.startswith("_") and packet not in HANDLERS \
            and hasattr(torch.ops.aten, packet[:-1]):
        packet, inplace = packet[:-1], True
    result: Any = None
    if packet is not None and packet in HANDLERS:
        first = cx.graph._counter
        try:
            result = HANDLERS[packet](cx, a)
            obs = cx.out_meta()
            if isinstance(obs, torch.Tensor) and isinstance(result, tuple) and len(result) == 2 and \
                    isinstance(result[1], int) and cx.graph.meta_of(result).dtype != _dtype_name(obs.dtype):
                # the canonical op keeps its operand's dtype; torch promoted (int64 tensor * 0.5 is float)
                raise _Unmappable("a result of another dtype than the op's operand")
        except (_Unmappable, VerifyError, KeyError, IndexError, TypeError, ValueError):
            # outside the canonical op's conventions: drop what the handler made, keep it as an opaque call
            for n in sorted((n for n in cx.graph.nodes() if n.order >= first), key=lambda n: -n.order):
                cx.graph.remove_node(n.id)
            result = None
    if result is None:
        result = _opaque(cx, nd, functional=inplace)
    _set(cx, nd, result)
    if inplace and isinstance(nd.args[0], fx.Node):
        cx.env[nd.args[0]] = result  # later readers of the mutated tensor see the new value


def _set(cx: _Capture, nd: fx.Node, result: Any) -> None:
    cx.env[nd] = result
    _record_check(cx, nd, result)


def _resolve(cx: _Capture, nd: fx.Node) -> tuple[str | None, dict[str, Any]]:
    """The aten packet name for a node and its arguments bound by that packet's schema."""
    t = nd.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__, _bind(t._schema, nd.args, dict(nd.kwargs))
    args, kwargs = list(nd.args), dict(nd.kwargs)
    resolved = [_concrete(cx, x) for x in args]
    kw = {k: _concrete(cx, v) for k, v in kwargs.items()}
    if nd.op == "call_module":
        assert cx.model is not None
        mod = cx.model.get_submodule(str(t))
        spec = _mod_args(mod)
        if spec is None:
            if isinstance(mod, nn.MultiheadAttention):
                return None, {}
            return None, {}
        packet, a = spec
        if packet == "adaptive_avg_pool2d":
            a["output_size"] = mod.output_size  # type: ignore[attr-defined]
        a = {k: v for k, v in a.items()}
        first = "indices" if packet == "embedding" else _schema_for(packet).arguments[0].name
        a[first] = args[0] if args else kwargs.get("input")
        return packet, a
    if nd.op == "call_method":
        method = _METHODS.get(str(t))
        if method is None:
            return None, {}
        packet = method
        if (str(t) in _VARARGS and len(args) > 2) or (len(args) == 2 and isinstance(resolved[1], int)
                                                      and str(t) in _VARARGS):
            args = [args[0], list(resolved[1:])]
    else:
        fn = _FUNCS.get(t)
        if fn is None:
            return None, {}
        packet = fn
        if packet in ("add", "sub", "mul", "div") and not isinstance(args[0], fx.Node):
            if packet in ("add", "mul"):
                args = [args[1], args[0]]
            else:
                return None, {}
    args = [a if (isinstance(a, fx.Node) and _is_value(cx.env.get(a))) or (isinstance(a, fx.Node) and a in cx.consts)
            else _concrete(cx, a) for a in args]
    kw = {k: (v if isinstance(v, fx.Node) and (_is_value(cx.env.get(v)) or v in cx.consts) else _concrete(cx, v))
          for k, v in kwargs.items()}
    schema = _schema_for(packet)
    if set(kw) - {a.name for a in schema.arguments} - {"input", "dim", "dims", "shape"}:
        return None, {}  # an argument the mapped overload has not (`div(..., rounding_mode=)`): kept opaque
    return packet, _bind(schema, args, kw)


def _concrete(cx: _Capture, a: Any) -> Any:
    if isinstance(a, fx.Node):
        if a in cx.consts:
            return cx.consts[a]
        v = cx.env.get(a)
        return a if _is_value(v) else v
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(cx, x) for x in a)
    return a


# ---- capture paths -------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        r = super().run_node(n)
        self.values[n] = r
        return r


def _per_tensor(spec: Any) -> list[Any]:
    """torch.export's `dynamic_shapes` flattened to one entry per input tensor (an {axis: Dim} dict, a
    tuple of Dims per axis, or None), through dicts by argument name and tuples of *args."""
    if spec is None:
        return []
    if isinstance(spec, dict) and all(isinstance(k, int) for k in spec):
        return [spec]
    if isinstance(spec, dict):
        return [x for v in spec.values() for x in (_per_tensor(v) if v is not None else [None])]
    if isinstance(spec, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple)) for x in spec):
            return [spec]
        return [x for v in spec for x in (_per_tensor(v) if v is not None else [None])]
    return [spec]


def _dim_names(ep: torch.export.ExportedProgram, user: list[fx.Node], input_names: list[str],
               dynamic_shapes: Any) -> tuple[dict[Any, Any], dict[str, tuple[str | None, ...]]]:
    """torch's size symbol → our dim symbol, and per input the names of its dynamic dims: the names of the
    `torch.export.Dim`s in `dynamic_shapes`, else '<input>_<axis>'."""
    specs = _per_tensor(dynamic_shapes)
    mapping: dict[Any, Any] = {}
    dims: dict[str, tuple[str | None, ...]] = {}
    for i, (nd, iname) in enumerate(zip(user, input_names)):
        val = nd.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        spec = specs[i] if i < len(specs) else None
        names: list[str | None] = []
        for axis, d in enumerate(val.shape):
            expr = d.node.expr if isinstance(d, torch.SymInt) else None
            given = spec.get(axis) if isinstance(spec, dict) else (spec[axis] if isinstance(spec, (list, tuple))
                                                                     and axis < len(spec) else None)
            if expr is not None and not expr.is_Symbol and not expr.is_number:
                # a derived dim (torch.export's suggestion `seq = 10*_seq`): analysed at its example it would be
                # captured static, the emitted model refusing every other size
                raise CaptureError(Diagnostic(
                    f"input '{iname}' axis {axis} is a derived dim ({getattr(given, '__name__', None) or expr}); "
                    "netsqueeze keeps plain dims dynamic only",
                    notes=("declare a plain torch.export.Dim there if the model runs at any size, or leave the axis "
                           "out of dynamic_shapes to capture it at the example's size",)))
            if expr is None or not expr.is_Symbol:
                names.append(None)
                continue
            name = str(getattr(given, "__name__", "") or f"{iname}_{axis}")
            mapping.setdefault(expr, Dim.named(name, 1).expr)
            names.append(name)
        if any(names):
            dims[iname] = tuple(names)
    return mapping, dims


def _suggested_fixes(e: BaseException) -> tuple[str, ...]:
    """The lines of torch.export's "Suggested fixes" in error `e` (how to declare the dims it would accept)."""
    lines = str(e).splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip().startswith("Suggested fixes")), None)
    if at is None:
        return ()
    fixes = []
    for line in lines[at + 1:]:
        if not line.strip():
            break
        fixes.append(line.strip())
    return ("torch.export suggests: " + "; ".join(fixes),) if fixes else ()


def _is_view(nd: Any) -> bool:
    """Whether fx node `nd` is an aten view of another tensor (slice, select, view, transpose, ...; an item of
    split/chunk): its result aliases its input."""
    if not isinstance(nd, fx.Node) or nd.op != "call_function":
        return False
    if nd.target is operator.getitem:
        return _is_view(nd.args[0])
    t = nd.target
    return isinstance(t, torch._ops.OpOverload) and any(
        r.alias_info is not None and not r.alias_info.is_write for r in t._schema.returns)


def _writes_through_a_view(gm: fx.GraphModule) -> bool:
    """Whether an in-place op of `gm` writes into a view (`y[:, 0] = 0`, `y[:, :2] += 1`): the write changes the
    tensor viewed, which only functionalization turns into values (`slice_scatter`, `select_scatter`)."""
    for nd in gm.graph.nodes:
        t = nd.target
        if nd.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.arguments and \
                (info := t._schema.arguments[0].alias_info) is not None and info.is_write and _is_view(nd.args[0]):
            return True
    return False


def _from_exported(ep: torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor], name: str,
                   model: nn.Module | None, dynamic_shapes: Any = None) -> Graph:
    if _writes_through_a_view(ep.graph_module):
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = ep.run_decompositions({})  # functional: no op decomposed, every write through a view a value
    cx = _Capture(name, model, aten=True)
    sig = ep.graph_signature
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    specs = list(sig.input_specs)
    if len(specs) == len(placeholders):
        # the specs follow the placeholders in order; a copied or reloaded program may have renamed the nodes
        lookup = {n.name: str(s.target) for n, s in zip(placeholders, specs) if s.kind.name != "USER_INPUT"
                  and s.target is not None}
        user_names = {n.name for n, s in zip(placeholders, specs) if s.kind.name == "USER_INPUT"}
    else:
        user_names = set(sig.user_inputs)
    trainable = set(sig.inputs_to_parameters.values())
    for n in placeholders:
        if n.name in lookup:
            fqn = lookup[n.name]
            t = ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]
            cx.consts[n] = t.detach().clone()
            cx.const_names[n] = fqn
            if fqn in trainable:
                cx.trainable.add(n)
    user = [n for n in placeholders if n.name in user_names]
    for n in gm.graph.nodes:
        if "val" in n.meta:
            cx.observed[n] = n.meta["val"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    kinds = [s.kind.name for s in sig.output_specs]
    user_outs = [o for o, k in zip(outs, kinds) if k == "USER_OUTPUT"]
    if len(user) != len(example_inputs):
        raise InputMismatchError(Diagnostic(
            f"the model takes {len(user)} tensor inputs ({', '.join(n.name for n in user)}) "
            f"but {len(example_inputs)} example inputs were given"))
    mapping, cx.input_dims = _dim_names(ep, user, [n.name for n in user], dynamic_shapes)
    token = SYMBOLS.set(mapping)
    # reading a size as an int must not specialise torch's symbols (later sizes would lose their dims)
    env = next((v.fake_mode.shape_env for v in cx.observed.values() if getattr(v, "fake_mode", None) is not None
                and v.fake_mode.shape_env is not None), None) if mapping else None
    guard = env.suppress_guards() if env is not None else contextlib.nullcontext()
    try:
        with guard:
            graph = _convert(cx, gm, [n.name for n in user], example_inputs, user_outs)
    finally:
        SYMBOLS.reset(token)
    tree = output_tree(ep.call_spec.out_spec, len(graph.outputs))
    if tree is not None:
        graph.meta[OUTPUT_TREE] = tree
    return graph


def output_tree(spec: Any, n_outputs: int) -> str | None:
    """`spec` (torch.export's output pytree spec) serialized, when the model returns its `n_outputs` tensors
    nested in dicts and lists (or tuples holding them), so the emitted module returns them the same way; None for
    one tensor, a flat tuple, or containers other than dict / list / tuple (left flat, in order)."""
    from torch.utils import _pytree as pytree

    def plain(s: Any) -> bool:
        return s.type is None or (s.type in (dict, list, tuple) and all(plain(c) for c in s.children()))

    if spec is None or not plain(spec) or spec.num_leaves != n_outputs:
        return None
    if spec.type is None or (spec.type is tuple and all(c.type is None for c in spec.children())):
        return None
    return str(pytree.treespec_dumps(spec))


def _from_symbolic(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], name: str) -> Graph:
    cx = _Capture(name, gm, aten=False)
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*example_inputs)
    cx.observed = rec.values
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    res = out_node.args[0]
    outs = list(res) if isinstance(res, (list, tuple)) else [res]
    return _convert(cx, gm, [str(n.target) for n in placeholders], example_inputs, outs)


def default_batch(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[Any, ...] | None:
    """torch.export's `dynamic_shapes` (positional form) for a dynamic batch: dim 0 of every input whose dim 0
    is the first input's, one `Dim('batch')` for all; None when there is no batch to free (a scalar first
    input, or a batch of 1, which torch.export specialises) or the forward's signature cannot be read."""
    if not example_inputs or example_inputs[0].dim() == 0 or int(example_inputs[0].shape[0]) < 2:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    batch = torch.export.Dim("batch")
    n = int(example_inputs[0].shape[0])
    per = [{0: batch} if t.dim() and int(t.shape[0]) == n else None for t in example_inputs]
    spec: list[Any] = []
    for p in params:
        if len(spec) == len(per) or p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
            break
        if p.kind is p.VAR_POSITIONAL:
            spec.append(tuple(per[len(spec):]))
            return tuple(spec)
        spec.append(per[len(spec)])
    return tuple(spec) if len(spec) == len(per) else None


def from_torch(model: nn.Module | fx.GraphModule | torch.export.ExportedProgram,
               example_inputs: tuple[torch.Tensor, ...], *, name: str | None = None,
               dynamic_shapes: Any = None) -> Graph:
    """Captures `model` on `example_inputs` into a verified `Graph` (shapes from the example inputs).

    torch.export (strict=False, aten level) first, torch.fx.symbolic_trace (module level) when export
    fails; ops outside the canonical set become opaque nodes that run the original torch callable.
    The model is left untouched: its training flags are restored and its tensors cloned.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise InputMismatchError(Diagnostic(f"example input {i} is a {type(t).__name__}, not a torch.Tensor"))
    gname = name or type(model).__name__
    if isinstance(model, torch.export.ExportedProgram):
        names = list(model.graph_signature.user_inputs)
        try:
            model.module()(*example_inputs)
        except Exception as e:
            raise InputMismatchError(Diagnostic(
                "example inputs (" + ", ".join(f"'{n}' = {_meta(t)}" for n, t in zip(names, example_inputs))
                + ") do not fit the exported program", notes=(f"reason: {_first_line(e)}",))) from None
        return _from_exported(model, example_inputs, gname, None, dynamic_shapes)
    if not isinstance(model, nn.Module):
        raise CaptureError(Diagnostic(f"cannot capture a {type(model).__name__}: expected an nn.Module, "
                                      "a torch.fx.GraphModule or a torch.export.ExportedProgram"))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()  # the IR is inference-mode (BatchNorm running stats, no dropout)
        names = _forward_names(model, len(example_inputs))
        _check_count(model, len(example_inputs))
        _check_inputs(model, names, example_inputs)
        default = default_batch(model, example_inputs) if dynamic_shapes is None else None
        if default is not None:
            # a dynamic batch unless the user said otherwise; a model that fixes its batch (a literal
            # `view(2, ...)`, a branch on the batch size) is captured at the example's batch, said in a note
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # torch.export logs the constraint violation
                    ep = torch.export.export(model, example_inputs, strict=False, dynamic_shapes=default)
                return _from_exported(ep, example_inputs, gname, model, default)
            except Exception as e:
                fixed_note = (f"the batch (dim 0 of the inputs) is fixed at "
                              f"{int(example_inputs[0].shape[0])}: a dynamic batch does not capture "
                              f"({_first_line(e)[:200]})")
        else:
            fixed_note = None
        try:
            ep = torch.export.export(model, example_inputs, strict=False, dynamic_shapes=dynamic_shapes)
        except Exception as e:
            if dynamic_shapes is not None:  # the fallback below captures every dim static: not what was asked
                ones = [f"input {i} axis {ax}" for i, (x, spec) in enumerate(zip(example_inputs,
                                                                              _per_tensor(dynamic_shapes)))
                        for ax in (spec if isinstance(spec, dict) else ())
                        if isinstance(x, torch.Tensor) and isinstance(ax, int) and ax < x.dim() and x.shape[ax] == 1]
                hint = (f"the example is 1 at {', '.join(ones)}: torch.export fixes a dim whose example is 0 or 1; "
                        "give an example of 2 or more there",) if ones else ()
                raise CaptureError(Diagnostic(
                    f"cannot capture {type(model).__name__} with the given dynamic_shapes: torch.export refuses "
                    f"them ({_first_line(e)[:300]})", notes=(*_suggested_fixes(e), *hint))) from None
            export_error: BaseException = e
        else:
            try:
                g = _from_exported(ep, example_inputs, gname, model, dynamic_shapes)
                if fixed_note is not None:
                    g.meta.setdefault("notes", []).append(fixed_note)
                return g
            except NetsqueezeError:
                raise
            except Exception as e:
                if dynamic_shapes is not None:
                    raise CaptureError(Diagnostic(
                        f"cannot capture {type(model).__name__} with the given dynamic_shapes: its exported program "
                        f"does not lower ({_first_line(e)[:300]}); without dynamic_shapes torch.fx.symbolic_trace "
                        "may capture it with every dim fixed")) from None
                export_error = e
        try:
            gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
            return _from_symbolic(gm, example_inputs, gname)
        except NetsqueezeError:
            raise
        except Exception as e:
            raise CaptureError(Diagnostic(
                f"cannot capture {type(model).__name__}: neither torch.export nor torch.fx.symbolic_trace handles it",
                notes=(f"torch.export: {_first_line(export_error)}",
                       f"torch.fx.symbolic_trace: {_first_line(e)}"))) from None
    finally:
        for m, f in flags.items():
            m.training = f
