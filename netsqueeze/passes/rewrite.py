"""The one rewriting routine of structural compression: apply a per-group channel selection to a graph.

Every structural pass (trim, squeeze_fold, custom pruning passes) chooses channels and calls `apply_selection`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError
from netsqueeze.ir import weights
from netsqueeze.ir.graph import Graph, Node, TensorMeta, Value
from netsqueeze.ir.ops import attr, spec
from netsqueeze.ir.weights import WeightFormError
from netsqueeze.passes.base import PassResult
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, Member, find_groups


@dataclass(frozen=True)
class SharedFold:
    """T [k, C]: a consumer's input channel c is rebuilt as A_c ≈ Σ_s A_s·T[s, c] (+ t₀[c]) from the k
    kept channels; every position a channel occupies (a kernel tap, a flattened block position) uses it."""

    t: torch.Tensor


@dataclass(frozen=True)
class BlockFold:
    """T [k, b, C, b] for a consumer whose channels occupy blocks of b positions (flatten→linear):
    feature (c, j) ≈ Σ_{s,i} A[s, i]·T[s, i, c, j], so W'[o, (s, i)] = Σ_{c,j} W[o, (c, j)]·T[s, i, c, j]."""

    t: torch.Tensor


@dataclass(frozen=True)
class GroupFold:
    """T [G, k, C] for a grouped conv consumer (weight slots shared by its G conv groups): conv group
    γ's input slots rebuilt from its own kept slots, W'[o, s] = Σ_c W[o, c]·T[γ(o), s, c]."""

    t: torch.Tensor


Fold = SharedFold | BlockFold | GroupFold


def _as_fold(f: Fold | torch.Tensor) -> Fold:
    """A plain 2-D tensor is shorthand for a `SharedFold`; other shapes must say which fold they are."""
    if isinstance(f, (SharedFold, BlockFold, GroupFold)):
        return f
    if f.dim() != 2:
        raise NetsqueezeError(f"a fold given as a plain tensor must be T [kept, size] (got {list(f.shape)}); "
                              "wrap it as BlockFold [kept, block, size, block] or GroupFold [groups, kept, size]")
    return SharedFold(f)


@dataclass(frozen=True)
class ChannelSelection:
    """What to do with one channel group.

    - `keep`: group channels to keep (any order; applied in ascending order).
    - `fold`: optional reconstruction of the removed channels from the kept ones, folded into every
      consumer: a `SharedFold` T [len(keep), group size] (a plain 2-D tensor is shorthand for one), so
      consumers get W'[o, s] = Σ_c W[o, c]·T[s, c] (per kernel tap for conv, per position of the block
      for flatten→linear), or a `BlockFold` for a consumer whose channels occupy blocks. Rows follow
      ascending `keep`. A mapping {consumer node id: fold} gives each consumer the reconstruction
      measured at its own input (consumers of a residual stream read different values); consumers not
      in it are only sliced.
    - `bias_shift`: optional t₀, the intercept of that reconstruction; consumers' biases get += W·t₀
      (with the original W). A tensor [group size] applies to every consumer; a mapping
      {consumer node id: tensor over that consumer's input axis (original positions)} gives each
      consumer its own (e.g. removed channels' mean activation measured at its input).
    A grouped conv reading the group takes a `GroupFold` only, from the mapping form, so the group
    structure stays; its bias shift is a tensor over all its input channels.
    """

    keep: Sequence[int]
    fold: Fold | torch.Tensor | Mapping[str, Fold | torch.Tensor] | None = None
    bias_shift: torch.Tensor | Mapping[str, torch.Tensor] | None = None


def _key(m: Member) -> tuple[str, str, int]:
    return (m.node, m.param if m.param is not None else f"#{m.output}", m.axis)


def _err(group: ChannelGroup, msg: str) -> NetsqueezeError:
    node = group.producers[0] if group.producers else group.members[0].node
    return NetsqueezeError(Diagnostic(f"channel group {group.id}: {msg}", node=node))


def _positions(m: Member, channels: Sequence[int]) -> list[int]:
    return [p for c in channels for p in m.index[c]]


def grouped_input(graph: Graph, m: Member) -> bool:
    """The input-channel axis of a grouped (not depthwise) conv's weight: one slot per group member."""
    node = graph.node(m.node)
    return (node.kind == "conv" and m.param == "weight" and m.axis == 1 and attr(node, "groups") != 1
            and int(node.params["weight"].shape[1]) > 1)


def _grouped_fold(graph: Graph, group: ChannelGroup, m: Member, keep: list[int], sel: ChannelSelection,
                  fold_of: dict[str, Fold] | None, bias_updates: list[tuple[Member, torch.Tensor]],
                  folds: list[tuple[Member, list[int], Fold]]) -> None:
    """Queues the fold and bias shift of a grouped conv consumer: T [G, len(keep), slots], one
    reconstruction per conv group, so no output mixes channels of another group."""
    if sel.fold is not None and not isinstance(sel.fold, Mapping):
        raise _err(group, f"grouped conv '{m.node}' reads this group: give the fold per consumer "
                          f"({{'{m.node}': T [groups, kept, size]}}), one reconstruction per conv group")
    t = (fold_of or {}).get(m.node)
    shift = sel.bias_shift.get(m.node) if isinstance(sel.bias_shift, Mapping) else None
    g = graph.node(m.node).attrs["groups"]
    if t is not None:
        if not isinstance(t, GroupFold) or tuple(t.t.shape) != (g, len(keep), group.size):
            raise _err(group, f"fold for grouped conv '{m.node}' has shape {list(t.t.shape)}, expected "
                              f"[{g}, {len(keep)}, {group.size}] (one reconstruction per conv group)")
        folds.append((m, keep, t))
    if shift is not None:
        bias_updates.append((m, shift))


def axis_vector(graph: Graph, m: Member, values: torch.Tensor) -> torch.Tensor:
    """A float64 vector over consumer member `m`'s whole input axis holding `values` [C, block] at the
    positions of the group's channels (zeros elsewhere): a `bias_shift` entry for that consumer."""
    full = torch.zeros(graph.node(m.node).params[m.param or "weight"].shape[m.axis], dtype=torch.float64)
    full[torch.tensor([list(q) for q in m.index]).flatten()] = values.flatten().double()
    return full


def _axis_size(graph: Graph, m: Member) -> int:
    """The length of member `m`'s axis: positions of this group and of any other group sharing the axis."""
    node = graph.node(m.node)
    if m.param is not None:
        w = node.params[m.param]
        return int(w.shape[m.axis])
    return int(node.meta[m.output or 0].shape[m.axis])

def _checked_keep(graph: Graph, group: ChannelGroup, sel: ChannelSelection, empty_ok: bool = True) -> list[int]:
    """`sel.keep` sorted, or `NetsqueezeError` unless its channels are distinct indices of `group`; empty only
    where `empty_ok` and the group's axes hold other channels too, or the group is a removable residual branch
    (`branch_removable`)."""
    keep = sorted(set(int(k) for k in sel.keep))
    if len(keep) != len(sel.keep) or (keep and (keep[0] < 0 or keep[-1] >= group.size)):
        raise _err(group, f"keep must be distinct channel indices in 0..{group.size - 1}")
    if not keep and not (empty_ok and (all(m.positions < _axis_size(graph, m) for m in group.members)
                                       or branch_removable(graph, group) is None)):
        raise _err(group, "a selection must keep at least one channel (its axes hold no other channels)"
                   if empty_ok else "a selection must keep at least one channel")
    return keep


def batch_norm_scale(node: Node) -> torch.Tensor:
    """An inference batch norm's per-channel scale, weight / √(running_var + eps), in float64 (weight 1 when it
    has none): what `fold_bn` multiplies into its producer."""
    var = node.dense("running_var").double()
    weight = node.dense("weight").double() if "weight" in node.params else torch.ones_like(var)
    return weight / torch.sqrt(var + float(attr(node, "eps")))


def _bn_value(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Inference batch norm of `x` [1, C, 1, ...] (or [C])."""
    shape = x.shape if x.dim() == 1 else (1, -1, *[1] * (x.dim() - 2))
    p = {k: node.dense(k).reshape(shape) for k in ("running_mean", "running_var", "weight", "bias") if k in node.params}
    y = (x - p["running_mean"]) / torch.sqrt(p["running_var"] + float(attr(node, "eps")))
    if "weight" in p:
        y = y * p["weight"]
    return y + p["bias"] if "bias" in p else y


# what a removed branch's output may pass through on the way to its add, per channel: the constant goes through it
_POINTWISE: dict[str, Callable[[Node, torch.Tensor], torch.Tensor]] = {
    "batch_norm": _bn_value, "relu": lambda n, x: torch.relu(x), "identity": lambda n, x: x,
    "sigmoid": lambda n, x: torch.sigmoid(x), "tanh": lambda n, x: torch.tanh(x),
    "silu": lambda n, x: torch.nn.functional.silu(x)}
# and what `_to_add` also lets through: a reshape, only after a linear layer and keeping its last axis, which leaves
# the [C] constant as it is
_THROUGH = {**_POINTWISE, "reshape": lambda n, x: x}


def _to_add(graph: Graph, consumer: str) -> tuple[list[str], str, int] | str:
    """The single-user ops (`_POINTWISE`, and `_THROUGH`'s reshape after a linear layer) from `consumer`'s output to the add it feeds, that add and the port;
    a string says why there is no such add."""
    chain: list[str] = []
    v: Value = (consumer, 0)
    while True:
        users = graph.value_users(v)
        if len(users) != 1:
            return f"the output of '{v[0]}' has {len(users)} users, not one add"
        user, port = users[0]
        node = graph.node(user)
        if node.kind in _POINTWISE and len(graph.operands(user)) == 1:
            chain.append(user)
            v = (user, 0)
        elif (node.kind == "reshape" and port == 0 and graph.node(consumer).kind == "linear"
              and graph.meta_of(v).shape[-1:] == node.meta[0].shape[-1:]):
            # a linear layer's rows regrouped (GPT-2's Conv1D: view(-1, C) @ W, then view(B, T, C)): its constant
            # [C] broadcasts over the leading axes whatever their grouping
            chain.append(user)
            v = (user, 0)
        elif node.kind == "add" and len(graph.operands(user)) == 2:
            return chain, user, port
        else:
            return f"the output of '{consumer}' reaches {node.kind} '{user}', not an add"


def branch_removable(graph: Graph, group: ChannelGroup) -> str | None:
    """Why removing every channel of `group` is not a residual branch removal (None: it is).

    It is when the group's channels are all that its producers compute and its consumers read, every consumer
    is a conv (one group) or a linear layer reading one position per channel, and each consumer's output
    reaches, through single-user batch norms and activations (and, after a linear layer, reshapes that keep its
    last axis: GPT-2's Conv1D), one operand of an `add` whose other operand does not depend on the group (the
    block's skip path). Emptied, each consumer computes its bias alone: it and the
    ops after it become the constant that gives (the branch's mean output when the bias holds the removed
    channels' intercept), and the producers and the ops between them and the consumers are deleted. The skip
    path carries the input on, so the model still depends on it: this is how whole residual blocks leave a
    model (depth pruning)."""
    if group.frozen is not None:
        return f"frozen ({group.frozen})"
    cons = group.members_of("consumer")
    if not cons or not group.producers:
        return "no producer or no consumer"
    for m in group.members:
        if m.positions != _axis_size(graph, m):
            return f"'{m.node}' holds other channels on the same axis"
    nodes = list(dict.fromkeys(m.node for m in group.members))  # in order: the first reason is always the same
    consumers = list(dict.fromkeys(m.node for m in cons))
    for m in cons:
        node = graph.node(m.node)
        if m.param != "weight" or m.axis != 1 or node.kind not in ("conv", "linear") or (
                node.kind == "conv" and attr(node, "groups") != 1) or any(len(p) != 1 for p in m.index):
            return f"consumer '{m.node}' is not a conv or linear layer reading one position per channel"
    for nid in (n for n in nodes if n not in consumers):
        if any(u not in nodes for u, _, _ in graph.users(nid)) or nid in graph.outputs:
            return f"'{nid}' has users outside the group"
    producers = set(group.producers)
    for c in consumers:
        found = _to_add(graph, c)
        if isinstance(found, str):
            return found
        _, add, port = found
        other = graph.operands(add)[1 - port]
        if producers & (nx.ancestors(graph.nx, other[0]) | {other[0]}):
            return f"both operands of add '{add}' depend on the group"
        if graph.meta_of(other).shape != graph.meta_of((add, 0)).shape:
            return f"the skip operand of add '{add}' is broadcast"
    return None


def branch_removal(graph: Graph, emptied: Iterable[str]) -> tuple[dict[str, list[str]], set[str]]:
    """What removing the residual branches of the consumers in `emptied` (their input channels all gone) does to
    `graph`'s structure: per consumer, the ops from it to its add (`_to_add`), the last of which (or the consumer)
    becomes a constant in place; and the nodes deleted, every node whose users are all deleted or cut off that way
    (the consumers and the ops before their constants, and upstream whatever only fed them: the branch's producers,
    and in an attention block the projections and the sequence reduction before them), never a graph input or
    output."""
    chains: dict[str, list[str]] = {}
    for nid in emptied:
        found = _to_add(graph, nid)
        assert not isinstance(found, str), found  # `branch_removable` checked it before the rewrite
        chains[nid] = found[0]
    lasts = {(chain[-1] if chain else nid) for nid, chain in chains.items()}
    dead: set[str] = set()
    todo = [src for last in lasts for src, _ in graph.operands(last)]
    while todo:
        src = todo.pop()
        if src in dead or src in lasts or src in graph.outputs or src in graph.inputs:
            continue
        if all(u in dead or u in lasts for u, _, _ in graph.users(src)):
            dead.add(src)
            todo += [s for s, _ in graph.operands(src)]
    return chains, dead


def _remove_branches(graph: Graph, emptied: Sequence[str]) -> None:
    """Each consumer node in `emptied` (its input channels all removed) computes its bias alone: that value, put
    through the ops between it and its add (`_to_add`), becomes a constant node in the last one's place ([1, C,
    1, ...] after a conv, [C] after a linear layer); the nodes that only fed those are deleted (`branch_removal`)."""
    chains, dead = branch_removal(graph, emptied)
    for nid, chain in chains.items():
        node = graph.node(nid)
        shape = tuple(node.params["weight"].shape)  # [out, 0, taps...]: no input channel left to decode
        value = node.dense("bias") if "bias" in node.params else torch.zeros(shape[0], dtype=torch.float32)
        dtype = value.dtype
        if node.kind == "conv":
            value = value.reshape(1, shape[0], *[1] * (len(shape) - 2))
        for c in chain:
            value = _THROUGH[graph.node(c).kind](graph.node(c), value)
        last = graph.node(chain[-1] if chain else nid)
        graph.set_operands(last.id, [])
        last.kind, last.attrs, last.params = "constant", {"trainable": True}, {"value": value.to(dtype)}
    for nid in reversed([n for n in graph.topo_order() if n in dead]):  # users before what they read
        graph.remove_node(nid)


def _check_fold(group: ChannelGroup, keep: list[int], f: Fold) -> None:
    """`NetsqueezeError` unless fold `f` maps `keep` onto the group's channels (its kind's shape)."""
    t = f.t
    ok = {SharedFold: tuple(t.shape) == (len(keep), group.size),
          BlockFold: t.dim() == 4 and tuple(t.shape[::2]) == (len(keep), group.size) and t.shape[1] == t.shape[3],
          GroupFold: t.dim() == 3 and tuple(t.shape[1:]) == (len(keep), group.size)}[type(f)]
    if not ok:
        want = {SharedFold: f"[{len(keep)}, {group.size}]", BlockFold: f"[{len(keep)}, block, {group.size}, block]",
                GroupFold: f"[groups, {len(keep)}, {group.size}]"}[type(f)]
        raise _err(group, f"fold has shape {list(t.shape)}, expected {want} ({type(f).__name__})")


def apply_selection(graph: Graph, groups: ChannelGroups, selection: Mapping[int, ChannelSelection]) -> PassResult:
    """Rewrites every member of every selected group, then re-infers shapes and verifies the graph.

    The extension point for custom pruning passes: compute `groups` with the `dependency` analysis
    (`ctx.analysis(DependencyAnalysis, graph)`), choose per group id the channels to keep (and, to
    reconstruct instead of just delete, a fold matrix and intercept), call this, and return its result.
    Params of producers, norms and biases are sliced along the member axis; consumers' weights are
    folded (if `fold`), bias-compensated (if `bias_shift`) and sliced; attrs that hold channel counts
    (split sizes, slice bounds, reshape targets, depthwise `groups`, instance-norm `num_groups`,
    attention `num_heads`) are updated. Several groups may share one param axis (concat consumers):
    their removals are merged. Raises `NetsqueezeError` naming the node for a frozen group asked to
    shrink, an empty or out-of-range `keep`, or a fold of the wrong shape for its consumer (a grouped
    conv takes one T per conv group). Guarantees: `graph.verify()` passes.
    """
    removed: dict[tuple[str, str, int], set[int]] = {}
    old_meta = {n.id: list(n.meta) for n in graph.nodes()}
    touched: set[str] = set()
    bias_updates: list[tuple[Member, torch.Tensor]] = []
    folds: list[tuple[Member, list[int], Fold]] = []
    emptied: list[str] = []  # consumers of a removed residual branch (`branch_removable`)
    for gid in sorted(selection):
        sel, group = selection[gid], groups[gid]
        keep = _checked_keep(graph, group, sel)
        if not keep and any(m.positions == _axis_size(graph, m) for m in group.members):
            emptied.extend(m.node for m in group.members_of("consumer"))
        kept = set(keep)
        drop = [c for c in range(group.size) if c not in kept]
        if not drop and sel.fold is None and sel.bias_shift is None:
            continue
        if group.frozen is not None:
            raise _err(group, f"is frozen ({group.frozen}) and cannot shrink")
        fold_all = None if sel.fold is None or isinstance(sel.fold, Mapping) else _as_fold(sel.fold)
        fold_of = {k: _as_fold(v) for k, v in sel.fold.items()} if isinstance(sel.fold, Mapping) else None
        for f in list((fold_of or {}).values()) + ([fold_all] if fold_all is not None else []):
            _check_fold(group, keep, f)
        for m in group.members:
            removed.setdefault(_key(m), set()).update(_positions(m, drop))
            touched.add(m.node)
            if grouped_input(graph, m):
                _grouped_fold(graph, group, m, keep, sel, fold_of, bias_updates, folds)
            if m.role != "consumer":
                continue
            shift = sel.bias_shift
            if shift is not None and not isinstance(shift, torch.Tensor):
                if m.node in shift:
                    bias_updates.append((m, shift[m.node]))
            elif shift is not None:
                if shift.shape != (group.size,):
                    raise _err(group, f"bias_shift has shape {list(shift.shape)}, expected [{group.size}]")
                full = torch.zeros(graph.node(m.node).params[m.target].shape[m.axis], dtype=torch.float64)
                for c in range(group.size):
                    full[list(m.index[c])] = float(shift[c])
                bias_updates.append((m, full))
            fold = fold_of.get(m.node) if fold_of is not None else fold_all
            if fold is not None:
                node = graph.node(m.node)
                if node.kind == "conv" and attr(node, "groups") != 1:
                    raise _err(group, f"cannot fold into grouped conv '{m.node}' (not linear in its input channels)")
                if len({len(p) for p in m.index}) != 1:
                    raise _err(group, f"cannot fold into '{m.node}': channels occupy unequal blocks")
                if isinstance(fold, GroupFold):
                    raise _err(group, f"a GroupFold is for grouped conv consumers, not '{m.node}'")
                if isinstance(fold, BlockFold) and fold.t.shape[1] != len(m.index[0]):
                    raise _err(group, f"fold for '{m.node}' has blocks of {fold.t.shape[1]}, its channels occupy "
                                      f"{len(m.index[0])} positions")
                folds.append((m, keep, fold))
    if not removed and not bias_updates and not folds:
        return PassResult(changed=False)
    # biases first: t₀ passes through the original weights
    for m, shift in bias_updates:
        _shift_bias(graph, m, shift)
    for m, keep, f in folds:
        _fold_weight(graph, m, keep, f)
    # a bias the dependency analysis did not see (added since, by this rewrite's compensation or by a pass's
    # refit before it) shrinks with its weight's output axis
    for (nid, target, axis), pos in list(removed.items()):
        if target.startswith("#"):
            continue
        node = graph.node(nid)
        bias = spec(node.kind).bias.get(target)
        if bias is not None and bias[1] == axis and bias[0] in node.params and (nid, bias[0], 0) not in removed:
            removed[(nid, bias[0], 0)] = set(pos)
    for (nid, target, axis), pos in removed.items():
        if not pos or target.startswith("#"):
            continue
        node = graph.node(nid)
        param = node.params[target]
        keep_idx = torch.tensor([i for i in range(param.shape[axis]) if i not in pos], dtype=torch.long)
        try:
            node.params[target] = weights.index_select(param, axis, keep_idx)
        except WeightFormError as e:
            raise WeightFormError(Diagnostic(f"node '{nid}', param '{target}': {e.message}", node=nid)) from None
    _update_attrs(graph, removed, old_meta)
    if emptied:
        _remove_branches(graph, emptied)
        touched = {n for n in touched if n in graph}
    graph.infer_shapes()
    graph.verify()
    return PassResult(changed=True, touched=touched)


def _shift_bias(graph: Graph, m: Member, shift: torch.Tensor) -> None:
    """Adds to consumer member `m`'s bias what its weight makes of the constant input `shift` (float64, over
    the member's whole input axis): a reconstruction's intercept, or removed channels' means."""
    node = graph.node(m.node)
    bias_name, out_axis = spec(node.kind).bias[m.target]
    w = node.dense(m.target).double()
    if grouped_input(graph, m):  # shift over all input channels; output o reads its own group's slice
        per_group = shift.double().reshape(node.attrs["groups"], 1, -1)  # [G, 1, per_in]
        w_g = w.reshape(node.attrs["groups"], -1, *w.shape[1:])  # [G, out/G, per_in, taps...]
        s = per_group.reshape(*per_group.shape, *[1] * (w.dim() - 2))
        delta = (w_g * s).sum(dim=list(range(2, w_g.dim()))).reshape(-1)
    else:
        s = shift.double().reshape([-1 if i == m.axis else 1 for i in range(w.dim())])
        delta = (w * s).sum(dim=[i for i in range(w.dim()) if i != out_axis])
        if node.kind == "conv_transpose":
            # a strided transposed conv spreads each input position's taps over stride-many outputs: an
            # output position sees on average taps / Π stride of them, so a constant input adds that share
            delta = delta / math.prod(node.attrs["stride"])
    if bias_name not in node.params:
        node.params[bias_name] = torch.zeros(w.shape[out_axis], dtype=node.params[m.target].dtype,
                                             device=w.device)
    node.params[bias_name] = (node.dense(bias_name).double() + delta).to(node.params[m.target].dtype)


def _fold_weight(graph: Graph, m: Member, keep: list[int], f: Fold) -> None:
    """Folds reconstruction `f` into consumer member `m`'s weight in place: the kept channels' positions
    take what the removed channels contributed (their positions are sliced away afterwards)."""
    node = graph.node(m.node)
    w = node.dense(m.target)
    t = f.t
    if isinstance(f, GroupFold):  # grouped conv: output group γ gets T[γ]
        wg = w.double().reshape(t.shape[0], -1, *w.shape[1:]).movedim(2, -1)  # [G, out/G, taps..., per_in]
        folded = torch.einsum("go...c,gsc->go...s", wg, t.double())
        out = wg.clone()
        out[..., keep] = folded
        node.params[m.target] = out.movedim(-1, 2).reshape(w.shape).to(w.dtype).contiguous()
        return
    wm = w.double().movedim(m.axis, -1)
    idx = torch.tensor([list(p) for p in m.index])  # [channels, block]
    wc = wm[..., idx]  # [..., channels, block]
    if isinstance(f, BlockFold):  # kept channel s at block position i stands in for channel c at position j
        folded = torch.einsum("...cj,sicj->...si", wc, t.double())
    else:
        folded = torch.einsum("...cj,sc->...sj", wc, t.double())
    wm[..., idx[keep]] = folded
    node.params[m.target] = wm.movedim(-1, m.axis).to(w.dtype).contiguous()


def _update_attrs(graph: Graph, removed: dict[tuple[str, str, int], set[int]],
                  old_meta: dict[str, list[TensorMeta]]) -> None:
    """Rewrites attrs that spell out channel counts (each op's `on_remove`), from the old shapes and the
    removed positions."""

    def gone(nid: str, out: int, axis: int) -> set[int]:
        return removed.get((nid, f"#{out}", axis), set())

    def old(value: Value) -> tuple[int, ...]:
        return old_meta[value[0]][value[1]].shape

    for node in graph.nodes():
        fn = spec(node.kind).on_remove
        if fn is not None:
            fn(graph, node, gone, old)


# ---- a cut in one consumer's view: the group's channels leave what that consumer reads, the rest stay ----------
_CHANNELWISE = frozenset({"relu", "clip", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
                          "hardsigmoid", "identity", "max_pool", "avg_pool", "adaptive_avg_pool"})
_ELEMENTWISE = frozenset({"add", "sub", "mul", "div"})


def view_frontier(graph: Graph, consumer: str) -> list[tuple[Value, str, int]] | str:
    """The edges (value, user, port) nearest the producers from which `consumer`'s input (port 0) is computed by
    ops that act on each channel of axis 1 alone and that nothing else reads: elementwise ops and pooling
    (binary ones on operands of the output's shape; an operand broadcast along axis 1 stays out), and a flatten
    of [N, C, 1, ...]. A gather of axis 1 placed on these edges therefore changes only what `consumer` reads.
    A string says why there is no such cut."""
    out: list[tuple[Value, str, int]] = []
    todo: list[tuple[Value, str, int]] = [(graph.operands(consumer)[0], consumer, 0)]
    while todo:
        v, user, port = todo.pop()
        node = graph.node(v[0])
        shape = graph.meta_of(v).shape
        ins = graph.operands(node.id)
        if len(shape) < 2 or graph.value_users(v) != [(user, port)]:
            out.append((v, user, port))
        elif (node.kind in _CHANNELWISE and len(ins) == 1) or (
                node.kind == "flatten" and attr(node, "start_dim") == 1 and graph.meta_of(ins[0]).shape[1:2] == shape[1:2]):
            todo.append((ins[0], node.id, 0))
        elif node.kind in _ELEMENTWISE:
            for i, o in enumerate(ins):
                s = graph.meta_of(o).shape
                if tuple(s) == tuple(shape):
                    todo.append((o, node.id, i))
                elif len(s) >= len(shape) - 1 and int(s[1 - len(shape) + len(s)]) != 1:
                    return f"{node.kind} '{node.id}' broadcasts operand {i} of shape {list(s)} along the channels"
        else:
            out.append((v, user, port))
    return sorted(out, key=lambda e: (e[1], e[2]))


def cut_view(graph: Graph, group: ChannelGroup, consumer: str, sel: ChannelSelection) -> PassResult:
    """Removes the channels of `group` not in `sel.keep` from what linear `consumer` reads, and from nothing else.

    A `gather` of the kept channels goes on every edge of `view_frontier(graph, consumer)`, so the ops between
    there and `consumer` carry only the kept channels while the group's other consumers (a residual stream's
    next block) still read every channel. The consumer takes `sel`'s bias shift and fold for it exactly as
    `apply_selection` gives them (`_shift_bias`, `_fold_weight`), then keeps the kept channels' columns.
    Channels that only the gathers read afterwards (a residual branch's last conv, which fed the consumer
    alone) are removed through `apply_selection`; a gather left taking every channel in order is bypassed.
    Raises `NetsqueezeError` naming the consumer when the cut cannot be placed."""
    keep = _checked_keep(graph, group, sel, empty_ok=False)
    node = graph.node(consumer)
    values = {(m.node, m.output or 0): m for m in group.members if m.param is None}
    mem = next((m for m in group.members_of("consumer") if m.node == consumer and m.param == "weight"), None)
    found = view_frontier(graph, consumer)
    frontier = [] if isinstance(found, str) else found
    why = found if isinstance(found, str) else None
    if why is None and (node.kind != "linear" or mem is None or any(len(p) != 1 for p in mem.index)
                        or mem.positions != _axis_size(graph, mem)):
        why = "it is not a linear layer reading this group's channels alone, one position each"
    if why is None and any(v not in values for v, _, _ in frontier):
        why = "a value on the way to it does not carry this group's channels"
    if why is None and any(values[v].axis != 1 for v, _, _ in frontier):
        why = "the group's channels are not on axis 1 of the values on the way to it"
    if why is not None:
        raise NetsqueezeError(Diagnostic(f"channel group {group.id}: cannot remove channels from '{consumer}''s "
                                         f"view only: {why}", node=consumer))
    assert mem is not None
    # everything checked before the first change: a bad selection leaves the graph as it was
    per_consumer = isinstance(sel.bias_shift, Mapping)
    shift = sel.bias_shift.get(consumer) if isinstance(sel.bias_shift, Mapping) else sel.bias_shift
    want = int(node.params["weight"].shape[mem.axis]) if per_consumer else group.size
    if shift is not None and tuple(shift.shape) != (want,):
        raise _err(group, f"bias_shift for '{consumer}' has shape {list(shift.shape)}, expected [{want}]")
    given = sel.fold.get(consumer) if isinstance(sel.fold, Mapping) else sel.fold
    fold = None if given is None else _as_fold(given)
    if fold is not None:
        if not isinstance(fold, SharedFold):
            raise _err(group, f"fold for '{consumer}' must be a SharedFold: it reads one position per channel")
        _check_fold(group, keep, fold)
    gathers = []
    for v, user, port in frontier:
        idx = tuple(values[v].index[c][0] for c in keep)
        gid = graph.add_node(f"{user}.select", "gather", [v], attrs={"axis": 1, "indices": idx}, unique=True)
        graph.set_operand(user, port, (gid, 0))
        gathers.append(gid)
    if shift is not None:
        _shift_bias(graph, mem, shift if per_consumer else axis_vector(graph, mem, shift))
    if fold is not None:
        _fold_weight(graph, mem, keep, fold)
    cols = torch.tensor([mem.index[c][0] for c in keep], dtype=torch.long)  # the order the gathers give them
    node.params["weight"] = weights.index_select(node.params["weight"], mem.axis, cols)
    graph.infer_shapes()
    # channels the gathers dropped that nothing else reads: their producers stop computing them
    groups = find_groups(graph)
    fed = {graph.operands(g)[0] for g in gathers}
    dead = {g.id: ChannelSelection(keep=[]) for g in groups if g.frozen is None and not g.members_of("consumer")
            and any(m.param is None and (m.node, m.output or 0) in fed for m in g.members)}
    touched = {consumer, *gathers}
    if dead:
        touched |= apply_selection(graph, groups, dead).touched
    for g in gathers:
        src = graph.operands(g)[0]
        if tuple(graph.node(g).attrs["indices"]) == tuple(range(int(graph.meta_of(src).shape[1]))):
            graph.replace_uses((g, 0), src)
            graph.remove_node(g)
            touched.discard(g)
    graph.infer_shapes()
    graph.verify()
    return PassResult(changed=True, touched=touched)
