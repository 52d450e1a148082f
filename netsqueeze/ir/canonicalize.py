"""`canonicalize`: the graph rewrites every frontend needs, run once at the end of import.

Each rewrite is data: a named `Rule` pairs a `Pat` (op kinds, operand structure, constant predicates,
named captures) with a rewrite function. `canonicalize` scans the nodes in the graph's deterministic
topological order, tries the rules in table order on each node as the root of a match, and repeats
until no rule fires (a fixed point: every rewrite removes nodes, so it terminates).

Matching rules:
- a `Pat` with `kinds` matches a value produced by a node of one of those kinds; `operands` (when
  given) must match the node's operands in order, or in either order for commutative kinds (add, mul);
- a `Pat` with a `name` binds the value; a name used twice must bind the same value;
- `capture(name)` matches any value and binds it; it is the boundary of the match (never removed);
- every matched op node other than the root and constants must have no user outside the match
  (one use), so the rewrite may delete it; constants are deleted when nothing reads them any more.

A rewrite gets the graph, the root node and the bindings and returns the value that replaces the
root's output (an existing node it updated, or a `New` node built in the root's place under the
root's id), or None to decline. It must not change the graph before it knows it will not decline.
A `New` node whose inferred shape differs from the root's is declined, so a pattern whose constants
broadcast the result to a larger shape never fires.

Not here: weights stored as ONNX DequantizeLinear / Gather(centroids, indices) / Transpose subgraphs of
constants become encoded weights during the ONNX importer's constant folding
(`netsqueeze.frontends.onnx.weights`): they are ONNX constants that never become IR nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from netsqueeze.ir.graph import Graph, Node, Origin, TensorMeta, Value
from netsqueeze.ir.weights import Encoded

__all__ = ["RULES", "New", "Pat", "Rule", "call", "canonicalize", "capture", "one_of", "op", "scalar"]

COMMUTATIVE = frozenset({"add", "mul"})
REL_TOL = 1e-4  # how close a written constant must be to the value a pattern asks for


# ---- patterns ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pat:
    """One node of a pattern (see the module docstring)."""

    kinds: frozenset[str] | None = None  # None: any value (a capture)
    operands: tuple[Pat, ...] | None = None  # None: the operands are not inspected
    name: str | None = None
    where: Callable[[Graph, Node], bool] | None = None
    alts: tuple[Pat, ...] = ()  # one_of: the first alternative that matches (with backtracking)
    commutative: bool = False


def op(kind: str | tuple[str, ...], *operands: Pat, name: str | None = None,
       where: Callable[[Graph, Node], bool] | None = None) -> Pat:
    """A node of `kind` whose operands match `operands` (either order for add / mul)."""
    kinds = frozenset((kind,) if isinstance(kind, str) else kind)
    return Pat(kinds, tuple(operands) if operands else None, name, where,
               commutative=len(operands) == 2 and kinds <= COMMUTATIVE)


def capture(name: str) -> Pat:
    """Any value, bound to `name`."""
    return Pat(name=name)


def one_of(*alts: Pat) -> Pat:
    return Pat(alts=tuple(alts))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(b))


def constant_value(g: Graph, node: Node) -> torch.Tensor | None:
    """The dense floating-point value of a constant node, or None."""
    if node.kind != "constant":
        return None
    v = node.params.get("value")
    if not isinstance(v, torch.Tensor) or isinstance(v, Encoded) or not v.is_floating_point():
        return None
    return v


def scalar(value: float, name: str | None = None) -> Pat:
    """A floating-point constant with one element, equal to `value` within `REL_TOL`."""

    def ok(g: Graph, node: Node) -> bool:
        v = constant_value(g, node)
        return v is not None and v.numel() == 1 and _close(float(v.reshape(-1)[0]), value)

    return Pat(frozenset({"constant"}), None, name, ok)


def constant(name: str) -> Pat:
    """Any dense floating-point constant, bound to `name` (the rewrite checks its shape)."""
    return Pat(frozenset({"constant"}), None, name, lambda g, n: constant_value(g, n) is not None)


def call_name(node: Node) -> str | None:
    """The function an opaque node calls, lower-case and without namespace/overload: 'erf' for the ONNX
    op Erf (default domain), aten::erf.default, torch.erf and Tensor.erf alike."""
    if node.kind != "opaque":
        return None
    payload = node.origin.payload
    if isinstance(payload, Mapping) and payload.get("domain", "") not in ("", "ai.onnx"):
        return None
    t = node.origin.op_type
    t = t.split("::", 1)[1].split(".", 1)[0] if "::" in t else t.rsplit(".", 1)[-1]
    return t.lower() or None


def call(fn: str, *operands: Pat, name: str | None = None,
         where: Callable[[Graph, Node], bool] | None = None) -> Pat:
    """An opaque node calling `fn` (see `call_name`)."""

    def ok(g: Graph, node: Node) -> bool:
        return call_name(node) == fn and (where is None or where(g, node))

    return Pat(frozenset({"opaque"}), tuple(operands) if operands else None, name, ok)


# ---- matching ------------------------------------------------------------------------------------
Bindings = dict[str, Value]


@dataclass
class Match:
    values: Bindings
    nodes: list[str]  # the matched op and constant nodes (not the captures), root first

    def __getitem__(self, name: str) -> Value:
        return self.values[name]


def _match(g: Graph, p: Pat, v: Value, m: Match, root: bool) -> Iterator[Match]:
    if p.alts:
        for alt in p.alts:
            yield from _match(g, alt, v, m, root)
        return
    if p.name is not None and p.name in m.values and m.values[p.name] != v:
        return
    node = g.node(v[0])
    if p.kinds is not None:
        if node.kind not in p.kinds or (p.where is not None and not p.where(g, node)):
            return
        if not root and node.kind != "constant" and len(g.users(node.id)) != 1:
            return  # read outside the match: the rewrite could not delete it
    elif p.where is not None and not p.where(g, node):
        return
    values = dict(m.values)
    if p.name is not None:
        values[p.name] = v
    nodes = [*m.nodes, node.id] if p.kinds is not None and node.id not in m.nodes else list(m.nodes)
    here = Match(values, nodes)
    if p.operands is None or p.kinds is None:
        yield here
        return
    ops = g.operands(node.id)
    if len(ops) != len(p.operands):
        return
    orders = [ops, ops[::-1]] if p.commutative and ops[0] != ops[1] else [ops]
    for order in orders:
        yield from _match_all(g, p.operands, order, here)


def _match_all(g: Graph, pats: tuple[Pat, ...], vals: list[Value], m: Match) -> Iterator[Match]:
    if not pats:
        yield m
        return
    for first in _match(g, pats[0], vals[0], m, False):
        yield from _match_all(g, pats[1:], vals[1:], first)


# ---- rewriting -----------------------------------------------------------------------------------
@dataclass
class New:
    """A node built in place of the root: same id, creation order and source location."""

    kind: str
    inputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


Rewrite = Callable[[Graph, Node, Match], "Value | New | None"]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pat
    rewrite: Rewrite


def _infer(g: Graph, nid: str) -> list[TensorMeta]:
    from netsqueeze.ir.ops import infer_node

    return infer_node(g, g.node(nid))


def _new_meta(g: Graph, new: New) -> list[TensorMeta] | None:
    """The shape `new` would have, found on a scratch node that is removed again (None: invalid)."""
    tmp = g.add_node(f"{new.kind}~canonicalize", new.kind, new.inputs, attrs=new.attrs, params=new.params,
                     unique=True)
    try:
        return _infer(g, tmp)
    except Exception:
        return None
    finally:
        g.remove_node(tmp)


def _apply(g: Graph, root: Node, m: Match, result: Value | New) -> bool:
    if isinstance(result, New):
        meta = _new_meta(g, result)
        if meta is None or meta != root.meta:
            return False
        users = [(d, p) for d, p, _ in g.users(root.id)]
        for d, p in users:
            g.disconnect(d, p)
        _sweep(g, m)
        nid = g.add_node(root.id, result.kind, result.inputs, attrs=result.attrs, params=result.params,
                         origin=Origin(root.origin.frontend, root.origin.source_name, root.origin.op_type))
        node = g.node(nid)
        node.order = root.order  # keeps the deterministic node order of the import
        node.meta = meta
        for d, p in users:
            g.connect(nid, d, p)
        return True
    g.replace_uses((root.id, 0), result)
    _sweep(g, m)
    return True


def _sweep(g: Graph, m: Match) -> None:
    """Removes the matched nodes nothing reads any more (interior ops, then their constants)."""
    left = [n for n in m.nodes if n in g]
    changed = True
    while changed:
        changed = False
        for n in list(left):
            if not g.users(n) and g.node(n).kind not in ("input", "output"):
                g.remove_node(n)
                left.remove(n)
                changed = True


def canonicalize(g: Graph, rules: tuple[Rule, ...] | None = None) -> list[str]:
    """Applies `rules` (default: `RULES`) to a fixed point; returns the names of the rules that fired,
    in order. Deterministic: nodes in topological order, rules in table order."""
    table = RULES if rules is None else rules
    by_kind: dict[str, list[Rule]] = {}
    for r in table:
        for k in sorted(_root_kinds(r.pattern)):
            by_kind.setdefault(k, []).append(r)
    fired: list[str] = []
    limit = len(g) + 1
    for _ in range(limit):
        changed = False
        for nid in [n.id for n in g.nodes()]:
            if nid not in g:
                continue
            node = g.node(nid)
            for r in by_kind.get(node.kind, []):
                if _try(g, node, r):
                    fired.append(r.name)
                    changed = True
                    break
        if not changed:
            return fired
    raise RuntimeError(f"canonicalize did not reach a fixed point in {limit} rounds")  # pragma: no cover


def _root_kinds(p: Pat) -> frozenset[str]:
    if p.alts:
        return frozenset().union(*(_root_kinds(a) for a in p.alts))
    return p.kinds or frozenset()


def _try(g: Graph, node: Node, r: Rule) -> bool:
    if node.num_outputs != 1:
        return False
    for m in _match(g, r.pattern, (node.id, 0), Match({}, []), True):
        result = r.rewrite(g, node, m)
        if result is not None and _apply(g, node, m, result):
            return True
    return False


# ---- the rules -------------------------------------------------------------------------------------
def _gelu_forms(one_plus: Pat) -> Pat:
    """x · 0.5 · (1 + f) in the orders exporters write it; `one_plus` matches (1 + f) and reads capture x."""
    x = capture("x")
    return one_of(
        op("mul", op("mul", x, scalar(0.5)), one_plus),  # (x * 0.5) * (1 + f)
        op("mul", op("mul", x, one_plus), scalar(0.5)),  # (x * (1 + f)) * 0.5
        op("mul", op("mul", one_plus, scalar(0.5)), x),  # ((1 + f) * 0.5) * x
    )


def _erf_gelu_pattern() -> Pat:
    x = capture("x")
    scaled = one_of(op("div", x, scalar(math.sqrt(2.0))), op("mul", x, scalar(1 / math.sqrt(2.0))))
    return _gelu_forms(op("add", call("erf", scaled), scalar(1.0)))


def _cube_exponent(g: Graph, node: Node) -> bool:
    """pow(x, 3): the exponent is the second operand (ONNX Pow) or the call's second argument (torch)."""
    ops = g.operands(node.id)
    if len(ops) == 2:
        v = constant_value(g, g.node(ops[1][0]))
        return v is not None and v.numel() == 1 and float(v.reshape(-1)[0]) == 3.0
    args = getattr(node.origin.payload, "args", None)
    return len(ops) == 1 and isinstance(args, tuple) and len(args) == 2 and not isinstance(args[1], torch.Tensor) \
        and isinstance(args[1], (int, float)) and float(args[1]) == 3.0 and not getattr(node.origin.payload, "kwargs", {})


def _tanh_gelu_pattern() -> Pat:
    x = capture("x")
    cube = one_of(call("pow", x, constant("exponent"), where=_cube_exponent), call("pow", x, where=_cube_exponent),
                  op("mul", x, op("mul", x, x)), op("mul", op("mul", x, x), x))
    inner = op("add", x, op("mul", cube, scalar(0.044715)))
    return _gelu_forms(op("add", op("tanh", op("mul", inner, scalar(math.sqrt(2.0 / math.pi)))), scalar(1.0)))


def _gelu(approximate: str) -> Rewrite:
    def rewrite(g: Graph, root: Node, m: Match) -> New:
        return New("gelu", [m["x"]], {"approximate": approximate})

    return rewrite


def _per_channel(g: Graph, value: Value, c: int, rank: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The [C] vector of a constant of shape [C, 1, ...] or [1, C, 1, ...] (per channel of a rank-`rank`
    N, C, ... tensor), or None."""
    v = constant_value(g, g.node(value[0]))
    if v is None or v.dtype != dtype or v.numel() != c or tuple(v.shape) not in (
            (c,) + (1,) * (rank - 2), (1, c) + (1,) * (rank - 2)):
        return None
    return v.reshape(c)


def _bn_affine(kind: str) -> Rewrite:
    """batch_norm → mul / add / sub / div by a per-channel constant: one batch_norm (exact arithmetic on
    weight and bias), so the channel analysis sees one per-channel op instead of a broadcast."""

    def rewrite(g: Graph, root: Node, m: Match) -> Value | None:
        bn = g.node(m["bn"][0])
        if not bn.meta or root.meta != bn.meta or any(isinstance(bn.params.get(k), Encoded)
                                                      for k in ("weight", "bias")):
            return None
        shape = bn.meta[0].shape
        if len(shape) < 2:
            return None
        c = shape[1]
        w = bn.params["weight"] if "weight" in bn.params else torch.ones(c)
        b = bn.params["bias"] if "bias" in bn.params else torch.zeros(c)
        assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
        k = _per_channel(g, m["k"], c, len(shape), w.dtype)
        if k is None or (kind == "div" and bool((k == 0).any())):
            return None
        if kind == "mul":
            w, b = w * k, b * k
        elif kind == "div":
            w, b = w / k, b / k
        elif kind == "add":
            b = b + k
        else:
            b = b - k
        bn.params["weight"], bn.params["bias"] = w, b
        return (bn.id, 0)

    return rewrite


def _bn_rule(kind: str) -> Rule:
    return Rule(f"batch_norm_{kind}", op(kind, op("batch_norm", name="bn"), constant("k")), _bn_affine(kind))


def _linear_bias(g: Graph, root: Node, m: Match) -> Value | None:
    """linear without bias → add of a constant along the output features (x @ W + b): one linear."""
    lin = g.node(m["lin"][0])
    w = lin.params.get("weight")
    if "bias" in lin.params or w is None or not lin.meta or root.meta != lin.meta:
        return None
    out = int(w.shape[0])
    b = constant_value(g, g.node(m["b"][0]))
    if b is None or b.dtype != w.dtype or b.numel() != out or tuple(b.shape[-1:]) != (out,):
        return None
    lin.params["bias"] = b.reshape(out).clone()
    return (lin.id, 0)


RULES: tuple[Rule, ...] = (
    Rule("gelu_erf", _erf_gelu_pattern(), _gelu("none")),
    Rule("gelu_tanh", _tanh_gelu_pattern(), _gelu("tanh")),
    *(_bn_rule(k) for k in ("mul", "add", "sub", "div")),
    Rule("linear_bias", op("add", op("linear", name="lin"), constant("b")), _linear_bias),
)
