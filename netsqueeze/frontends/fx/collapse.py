"""Module collapsing: the aten ops of one nn.MultiheadAttention / nn.LocalResponseNorm call become one node."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from netsqueeze.frontends.fx.state import _Capture, _is_value, _record_check, _Scope

_COLLAPSE = ("MultiheadAttention", "LocalResponseNorm")


def _collapse_key(nd: fx.Node) -> tuple[str, str, str] | None:
    """The outermost module in the stack whose aten ops become one IR node (attention, lrn)."""
    for key, (path, typ) in (nd.meta.get("nn_module_stack") or {}).items():
        name = typ if isinstance(typ, str) else typ.__qualname__
        if name.rsplit(".", 1)[-1] in _COLLAPSE and name.startswith("torch.nn"):
            return key, str(path), name.rsplit(".", 1)[-1]
    return None


def _is_size(cx: _Capture, n: fx.Node) -> bool:
    """A node that evaluates to a python size (int or symbolic size), not a tensor."""
    return isinstance(cx.observed.get(n), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def size_nodes(cx: _Capture, group: list[fx.Node]) -> list[fx.Node]:
    """The nodes of a collapsible call that compute sizes: evaluated one by one before the call collapses."""
    return [n for n in group if _is_size(cx, n)]


def _collapse(cx: _Capture, group: list[fx.Node], path: str, typ: str) -> bool:
    """Maps the aten ops of one nn.MultiheadAttention / nn.LocalResponseNorm call onto one node."""
    inside = set(group)
    ext: list[fx.Node] = []
    params: dict[str, torch.Tensor] = {}
    for n in group:
        for i in n.all_input_nodes:
            if i in inside:
                continue
            if i in cx.consts:
                params[cx.const_names.get(i, i.name)] = cx.consts[i]
            elif i not in ext and not _is_size(cx, i):
                ext.append(i)
    # sizes the call reads or computes (a dynamic batch's `sym_size`, `4 * batch`) are no operands: the caller
    # has already evaluated them, and later layers may share them
    outs = [n for n in group if any(u not in inside for u in n.users) and not _is_size(cx, n)]
    if len(outs) != 1 or not all(_is_value(cx.env.get(e)) and isinstance(cx.env[e], tuple) for e in ext):
        return False
    mod = None
    if cx.model is not None:
        try:
            mod = cx.model.get_submodule(path)
        except AttributeError:
            mod = None
    cx.cur = group[0]
    cx.scopes[group[0]] = _Scope(path, True)
    cx.names[group[0]] = path
    cx._main_used = False
    out = outs[0]
    if typ == "LocalResponseNorm":
        if not isinstance(mod, nn.LocalResponseNorm) or len(ext) != 1:
            return False
        cx.observed[group[0]] = cx.observed[out]
        nid = cx.emit("lrn", [cx.env[ext[0]]], {"size": int(mod.size), "alpha": float(mod.alpha),
                                                 "beta": float(mod.beta), "bias": float(mod.k)}, op_type=typ)
    else:
        byname = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if k.count(".") >= 1 else k: v
                  for k, v in params.items()}
        byname.update({k.rsplit(".", 1)[-1]: v for k, v in params.items()})
        if "in_proj_weight" not in byname or len(ext) not in (1, 3) or "out_proj.weight" not in byname:
            return False
        weights = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
        if any(not any(k == w or k.endswith("." + w) for w in weights) for k in params):
            return False  # a constant the attention reads besides its weights (a mask buffer): left uncollapsed
        out_proj = [n for n in group if any(i in cx.consts and cx.const_names.get(i, i.name).endswith("out_proj.weight")
                                            for i in n.all_input_nodes)]
        after = set(out_proj)
        for n in group:  # in graph order: the out_proj product and what the call computes from it
            if n not in after and any(i in after for i in n.all_input_nodes):
                after.add(n)
        if out not in after:
            return False  # the caller reads the attention weights, not the attention: left uncollapsed
        if isinstance(mod, nn.MultiheadAttention) and (mod.bias_k is not None or mod.add_zero_attn):
            return False
        sdpa = [n for n in group if "scaled_dot_product_attention" in str(n.target)]
        if isinstance(mod, nn.MultiheadAttention):
            heads, batch_first = mod.num_heads, mod.batch_first
        elif len(sdpa) == 1:
            heads, batch_first = int(cx.observed[sdpa[0].args[0]].shape[1]), True  # type: ignore[index]
        else:
            return False
        w = byname["in_proj_weight"]
        p = {"in_proj_weight": w.detach().clone(), "out_proj_weight": byname["out_proj.weight"].detach().clone()}
        if "in_proj_bias" in byname:
            p["in_proj_bias"] = byname["in_proj_bias"].detach().clone()
        if "out_proj.bias" in byname:
            p["out_proj_bias"] = byname["out_proj.bias"].detach().clone()
        qkv = [cx.env[e] for e in ext] * (3 if len(ext) == 1 else 1)
        cx.observed[group[0]] = cx.observed[out]
        nid = cx.emit("attention", qkv, {"num_heads": int(heads), "embed_dim": int(w.shape[1]),
                                         "head_dim": int(w.shape[0]) // (3 * int(heads)),
                                         "batch_first": bool(batch_first)}, p, op_type=typ)
    for n in group:
        cx.env[n] = None
    cx.env[out] = (nid, 0)
    _record_check(cx, out, (nid, 0))
    return True
