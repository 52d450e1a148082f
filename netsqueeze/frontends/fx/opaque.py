"""Ops outside the canonical set: an opaque node whose payload is a picklable torch call."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

from netsqueeze.errors import CaptureError, Diagnostic
from netsqueeze.frontends.fx.state import _Capture, _op_type

# the picklable calls an opaque node runs live in the IR, where both backends read them
from netsqueeze.ir.calls import AtenCall, FnCall, MethodCall, ModuleCall, Slot
from netsqueeze.ir.graph import Value

_Slot = Slot  # the name older pickles use


def _template(cx: _Capture, args: Any, operands: list[Value]) -> Any:
    if isinstance(args, fx.Node):
        if args in cx.consts:
            return cx.consts[args].detach().clone()
        v = cx.env.get(args)
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            if v not in operands:
                operands.append(v)
            return _Slot(operands.index(v))
        if v is None or isinstance(v, list):
            raise CaptureError(Diagnostic(f"'{args.name}' has no tensor value to pass to an opaque op"))
        return v
    if isinstance(args, (list, tuple)):
        return type(args)(_template(cx, a, operands) for a in args)
    if isinstance(args, dict):
        return {k: _template(cx, v, operands) for k, v in args.items()}
    return args


def _is_torch_ao(mod: torch.nn.Module) -> bool:
    name = type(mod).__module__
    return name.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized"))


def _functional(t: torch._ops.OpOverload) -> tuple[str, str]:
    """The out-of-place twin (packet, overload) of an in-place aten op (`index_put_` → `index_put`)."""
    packet, ov = t._overloadpacket.__name__, t._overloadname
    twin = getattr(getattr(torch.ops, t.namespace), packet[:-1], None)
    if twin is not None and ov in twin.overloads():
        return packet[:-1], ov
    return packet, ov


def _opaque(cx: _Capture, nd: fx.Node, *, functional: bool = False) -> Any:
    """An opaque node running `nd`'s torch call; `functional`: an in-place aten op runs out of place
    (the driver rebinds the mutated operand to the result), so the emitted model mutates no tensor."""
    operands: list[Value] = []
    args = _template(cx, tuple(nd.args), operands)
    kwargs = _template(cx, dict(nd.kwargs), operands)
    payload: Any
    if isinstance(nd.target, torch._ops.OpOverload):
        t = nd.target
        packet, ov = _functional(t) if functional else (t._overloadpacket.__name__, t._overloadname)
        payload = AtenCall(t.namespace, packet, ov, args, kwargs)
    elif nd.op == "call_method":
        payload = MethodCall(str(nd.target), args, kwargs)
    elif nd.op == "call_module":
        assert cx.model is not None
        mod = cx.model.get_submodule(str(nd.target))
        payload = ModuleCall(copy.deepcopy(mod), args, kwargs)
    else:
        payload = FnCall(nd.target, args, kwargs)  # type: ignore[arg-type]
    obs = cx.observed.get(nd)
    seq = isinstance(obs, (list, tuple))
    outs: list[Any] = list(obs) if isinstance(obs, (list, tuple)) else [obs]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise CaptureError(Diagnostic(f"op {_op_type(nd)} returns non-tensor values, which the IR cannot hold",
                                      node=nd.name))
    op_type = _op_type(nd) if nd.op != "call_module" else type(payload.module).__name__
    if isinstance(payload, AtenCall):
        op_type = f"{payload.namespace}::{payload.packet}.{payload.overload}"
    if nd.op == "call_module" and _is_torch_ao(payload.module):
        # torch.ao's quantized modules keep their weights packed (an opaque C++ object): netsqueeze runs
        # them as they are and says so, instead of counting them as weightless layers silently
        cls = type(payload.module)
        op_type = f"{cls.__module__}.{cls.__name__}"
        cx.graph.meta.setdefault("notes", []).append(
            f"'{nd.target}' is a torch.ao quantized module ({op_type}): it stays opaque, its packed weights are "
            "not counted and no pass changes it; compile the float model (or its ONNX QDQ export, whose int8 "
            "weights netsqueeze reads) to compress it")
    nid = cx.emit("opaque", operands, {}, op_type=op_type, payload=payload)
    return [(nid, i) for i in range(len(outs))] if seq else (nid, 0)
