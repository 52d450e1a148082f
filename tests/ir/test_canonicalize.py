"""`ir.canonicalize` on hand-built IR graphs: the engine (matching, captures, one-use interiors, shared
constants, shape guard, fixed point, determinism) and the default rule table."""

from __future__ import annotations

import math

import torch

from netsqueeze.ir.canonicalize import RULES, New, Rule, canonicalize, capture, one_of, op, scalar
from netsqueeze.ir.graph import Graph, Origin, TensorMeta, Value
from netsqueeze.ir.printer import print_graph


def graph(shape: tuple[int, ...] = (2, 8)) -> tuple[Graph, Value]:
    g = Graph("t")
    g.add_node("x", "input", attrs={"shape": shape, "dtype": "float32"})
    return g, ("x", 0)


def const(g: Graph, v: float, shape: tuple[int, ...] = (), name: str = "c") -> Value:
    return (g.add_node(name, "constant", params={"value": torch.full(shape, v)}, unique=True), 0)


def erf(g: Graph, x: Value) -> Value:
    nid = g.add_node("erf", "opaque", [x], origin=Origin("onnx", "erf", "Erf", {"op_type": "Erf", "domain": ""}),
                     unique=True)
    g.node(nid).meta = [g.meta_of(x)] if g.node(x[0]).meta else [TensorMeta((2, 8))]
    return (nid, 0)


def add(g: Graph, kind: str, *ins: Value) -> Value:
    return (g.add_node(kind, kind, list(ins), unique=True), 0)


def erf_gelu(g: Graph, x: Value, half: Value | None = None, half_value: float = 0.5) -> Value:
    """x * 0.5 * (1 + erf(x / sqrt 2)); returns the final mul."""
    d = add(g, "div", x, const(g, math.sqrt(2)))
    a = add(g, "add", erf(g, d), const(g, 1.0))
    h = add(g, "mul", x, half if half is not None else const(g, half_value))
    return add(g, "mul", h, a)


def finish(g: Graph, *outs: Value) -> Graph:
    for o in outs:
        g.add_node("output", "output", [o], unique=True)
    g.infer_shapes()
    g.verify()
    return g


def test_erf_gelu_fires_in_place_of_the_root() -> None:
    g, x = graph()
    y = erf_gelu(g, x)
    root_order = g.node(y[0]).order
    finish(g, y)
    assert canonicalize(g) == ["gelu_erf"]
    assert [(n.id, n.kind) for n in g.nodes()] == [("x", "input"), (y[0], "gelu"), ("output", "output")]
    assert g.node(y[0]).order == root_order and g.node(y[0]).attrs == {"approximate": "none"}
    g.verify()


def test_near_miss_constant_does_not_fire() -> None:
    g, x = graph()
    finish(g, erf_gelu(g, x, half_value=0.49))
    before = print_graph(g)
    assert canonicalize(g) == []
    assert print_graph(g) == before


def test_interior_read_elsewhere_does_not_fire() -> None:
    g, x = graph()
    y = erf_gelu(g, x)
    erf_node = next(n for n in g.nodes() if n.kind == "opaque")
    finish(g, y, (erf_node.id, 0))  # the erf is also a graph output: the chain cannot be deleted
    assert canonicalize(g) == []


def test_shared_constant_is_kept_until_its_last_reader_goes() -> None:
    g, x = graph()
    half = const(g, 0.5, name="half")
    y1 = erf_gelu(g, x, half)
    y2 = erf_gelu(g, add(g, "relu", x), half)
    finish(g, y1, y2)
    assert canonicalize(g) == ["gelu_erf", "gelu_erf"]
    assert "half" not in g and g.by_kind("constant") == [] and len(g.by_kind("gelu")) == 2


def test_a_constant_that_broadcasts_the_result_is_declined() -> None:
    g, x = graph((8,))
    finish(g, erf_gelu(g, x, const(g, 0.5, (1, 1))))  # the output is [1, 8]; gelu(x) would be [8]
    assert canonicalize(g) == []


def test_rules_are_data_and_run_to_a_fixed_point() -> None:
    rule = Rule("relu_relu", op("relu", op("relu", capture("x"))), lambda g, root, m: New("relu", [m["x"]]))
    g, x = graph()
    v = x
    for _ in range(4):
        v = add(g, "relu", v)
    finish(g, v)
    assert canonicalize(g, (rule,)) == ["relu_relu"] * 3
    assert [n.kind for n in g.nodes()] == ["input", "relu", "output"]


def test_captures_with_one_name_bind_one_value() -> None:
    rule = Rule("square", op("mul", capture("x"), capture("x")), lambda g, root, m: New("relu", [m["x"]]))
    g, x = graph()
    same = add(g, "mul", x, x)
    other = add(g, "mul", x, add(g, "sigmoid", x))
    finish(g, same, other)
    assert canonicalize(g, (rule,)) == ["square"]
    assert g.node(same[0]).kind == "relu" and g.node(other[0]).kind == "mul"


def test_one_of_and_commutative_operands() -> None:
    pat = op("add", one_of(op("relu", capture("x")), op("sigmoid", capture("x"))), scalar(0.0))
    rule = Rule("drop_add0", pat, lambda g, root, m: New("identity", [m["x"]]))
    g, x = graph()
    a = add(g, "add", const(g, 0.0), add(g, "sigmoid", x))  # constant first: add is commutative
    b = add(g, "add", add(g, "relu", x), const(g, 1.0))  # not zero
    finish(g, a, b)
    assert canonicalize(g, (rule,)) == ["drop_add0"]
    assert g.node(a[0]).kind == "identity" and g.node(b[0]).kind == "add"


def test_deterministic() -> None:
    def build() -> Graph:
        g, x = graph()
        y = erf_gelu(g, x)
        return finish(g, y, erf_gelu(g, add(g, "relu", y)))

    a, b = build(), build()
    assert canonicalize(a) == canonicalize(b) == ["gelu_erf", "gelu_erf"]
    assert print_graph(a) == print_graph(b)


def test_batch_norm_absorbs_per_channel_mul_add_exactly() -> None:
    g, x = graph((2, 3, 4, 4))
    p = {"weight": torch.rand(3) + 0.5, "bias": torch.randn(3), "running_mean": torch.randn(3),
         "running_var": torch.rand(3) + 0.5}
    bn = g.add_node("bn", "batch_norm", [x], attrs={"eps": 1e-5}, params=p)
    gamma, beta = torch.rand(1, 3, 1, 1) + 0.5, torch.randn(3, 1, 1)
    k1 = g.add_node("k1", "constant", params={"value": gamma.clone()})
    k2 = g.add_node("k2", "constant", params={"value": beta.clone()})
    y = add(g, "add", add(g, "mul", (bn, 0), (k1, 0)), (k2, 0))
    finish(g, y)
    xs = torch.randn(2, 3, 4, 4)
    ref = torch.nn.functional.batch_norm(xs, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                         eps=1e-5) * gamma + beta
    assert canonicalize(g) == ["batch_norm_mul", "batch_norm_add"]
    assert [n.kind for n in g.nodes()] == ["input", "batch_norm", "output"]
    q = g.node("bn").params
    got = torch.nn.functional.batch_norm(xs, q["running_mean"], q["running_var"], q["weight"], q["bias"], eps=1e-5)
    assert float((got - ref).abs().max()) <= 1e-5


def test_default_table_names() -> None:
    assert [r.name for r in RULES] == ["gelu_erf", "gelu_tanh", "batch_norm_mul", "batch_norm_add",
                                       "batch_norm_sub", "batch_norm_div", "linear_bias"]
