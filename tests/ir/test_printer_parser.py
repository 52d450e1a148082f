"""The IR text form: `parse_graph(print_graph(g, values=True))` gives back the same graph, bit for bit;
hand-written forms (generators, `of` encodings) read as documented; malformed text is a located error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from netsqueeze.errors import VerifyError
from netsqueeze.ir import Graph, Origin, TensorMeta, parse_graph, print_graph
from netsqueeze.ir.weights import Affine, Centroids, Codebook, Encoded, Sparse, Weight
from tests.passes.graphs import attention, cnn, mlp

HERE = Path(__file__).parent / "golden"
BLESS = os.environ.get("NETSQUEEZE_BLESS") == "1"


def small_cnn() -> Graph:
    """The shape of tests/backends/test_onnx.py's small_cnn: conv, group norm, gelu, pool, flatten, linear."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("cnn")
    g.add_node("x", "input", attrs={"shape": (1, 3, 8, 8), "dtype": "float32"})
    g.add_node("conv", "conv", ["x"], attrs={"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1],
                                             "groups": 1},
               params={"weight": torch.randn(8, 3, 3, 3, generator=gen) * 0.3, "bias": torch.randn(8, generator=gen)})
    g.add_node("gn", "group_norm", ["conv"], attrs={"num_groups": 2, "eps": 1e-5},
               params={"weight": torch.rand(8, generator=gen) + 0.5, "bias": torch.randn(8, generator=gen)})
    g.add_node("act", "gelu", ["gn"], attrs={"approximate": "none"})
    g.add_node("pool", "adaptive_avg_pool", ["act"], attrs={"output_size": [1, 1]})
    g.add_node("flat", "flatten", ["pool"], attrs={"start_dim": 1, "end_dim": -1})
    g.add_node("fc", "linear", ["flat"], params={"weight": torch.randn(5, 8, generator=gen),
                                                 "bias": torch.randn(5, generator=gen)})
    g.add_node("out", "output", ["fc"])
    g.infer_shapes()
    return g


def encoded() -> Graph:
    """Every weight form, odd ids, a split read through `#k`, an opaque node and a tensor attribute."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 4, generator=gen)
    shared = Centroids(torch.tensor([-0.5, 0.0, 0.25, 1.0]), "shared")
    g = Graph("enc 'odd' name")
    g.add_node("in/x", "input", attrs={"shape": (2, 4)})
    g.add_node("fc.0", "linear", ["in/x"], params={"weight": Affine.quantize(w, axis=0),
                                                  "bias": torch.tensor([0.1, -0.0, 1e-30, 3.0, 0.5, 2.5, -1.0, 7.0])})
    g.add_node("fc.1", "linear", ["fc.0"], params={"weight": Affine.quantize(torch.randn(8, 8, generator=gen), bits=4,
                                                                             axis=1, block_size=3, symmetric=False)})
    g.add_node("onnx::Split_3", "split", ["fc.1"], attrs={"axis": -1, "sizes": [4, 4]})
    g.add_node("fc.2", "linear", [("onnx::Split_3", 1)],
               params={"weight": Sparse.from_dense(torch.tensor([[0.0, 1.5, 0.0, -2.0]] * 3), "csr")})
    g.add_node("fc.3", "linear", [("onnx::Split_3", 0)],
               params={"weight": Sparse.from_dense(torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 1.0]] * 3)[:, :4]
                                                   .contiguous(), "nm", 2, 4),
                       "bias": Affine.quantize(torch.randn(3, generator=gen), bits=8, signed=False, symmetric=False)})
    g.add_node("c1", "linear", ["fc.2"], params={"weight": Codebook(torch.randint(0, 4, (3, 3), generator=gen), shared)})
    g.add_node("c2", "linear", ["fc.3"], params={"weight": Codebook(torch.randint(0, 4, (3, 3), generator=gen), shared,
                                                                    huffman=True)})
    g.add_node("c3", "linear", ["c1"], params={
        "weight": Codebook(torch.randint(0, 2, (2, 3), generator=gen), Centroids(torch.tensor([1.0, -1.0]))),
        "bias": Sparse.from_dense(torch.tensor([0.0, 2.0]), "coo")})
    g.add_node("op", "opaque", ["c2", "c3"], attrs={"table": torch.arange(6, dtype=torch.int64).reshape(2, 3),
                                                    "mode": "a'b\"c", "flag": True, "none": None, "eps": float("inf"),
                                                    "pair": (1,), "nested": [(1, 2.5), []]},
               origin=Origin("onnx", "op", "Custom::Thing"))
    g.node("op").meta = [TensorMeta((2, 3)), TensorMeta((2,), "int64")]
    g.add_node("out", "output", ["op"])
    g.add_node("out2", "output", [("op", 1)])
    g.infer_shapes()
    g.verify()
    return g


def _same_weight(a: Weight, b: Weight) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # bits: -0.0 too
        return
    assert isinstance(a, Encoded) and isinstance(b, Encoded)
    sa, sb = a.storage(), b.storage()
    assert sa.keys() == sb.keys() and a.static() == b.static() and a.nbytes() == b.nbytes()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.dense(), b.dense())


def _round_trip(g: Graph) -> Graph:
    text = print_graph(g, values=True)
    h = parse_graph(text)
    assert print_graph(h, values=True) == text
    assert str(h) == str(g)
    assert h.name == g.name and h.inputs == g.inputs and h.outputs == g.outputs
    assert [n.id for n in h.nodes()] == [n.id for n in g.nodes()]
    for n in g.nodes():
        m = h.node(n.id)
        assert (m.kind, m.meta, h.operands(n.id)) == (n.kind, n.meta, g.operands(n.id))
        assert m.params.keys() == n.params.keys()
        for k in n.params:
            _same_weight(n.params[k], m.params[k])
        assert {k: v for k, v in n.attrs.items() if not isinstance(v, torch.Tensor)} == \
               {k: v for k, v in m.attrs.items() if not isinstance(v, torch.Tensor)}
        assert all(type(v) is type(m.attrs[k]) for k, v in n.attrs.items())
    return h


@pytest.mark.parametrize("make", [mlp, cnn, attention, small_cnn, encoded], ids=lambda f: f.__name__)
def test_round_trip_is_exact(make) -> None:  # type: ignore[no-untyped-def]
    _round_trip(make())


def test_round_trip_keeps_encoded_details() -> None:
    h = _round_trip(encoded())
    c1, c2 = h.node("c1").params["weight"], h.node("c2").params["weight"]
    assert isinstance(c1, Codebook) and isinstance(c2, Codebook)
    assert c1.centroids is c2.centroids and c1.centroids.name == "shared" and c2.huffman
    c3 = h.node("c3").params["weight"]
    assert isinstance(c3, Codebook) and c3.centroids.name == ""
    assert h.node("op").origin.op_type == "Custom::Thing"
    table = h.node("op").attrs["table"]
    assert isinstance(table, torch.Tensor) and torch.equal(table, torch.arange(6).reshape(2, 3))
    assert h.operands("fc.2") == [("onnx::Split_3", 1)]


def test_exact_floats_of_every_float_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    g = Graph("floats")
    g.add_node("x", "input", attrs={"shape": (3,)})
    specials = torch.tensor([0.1, -0.0, float("inf"), -float("inf"), 1e-45, 3.4028234663852886e38, 1 / 3])
    for i, dt in enumerate((torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        vals = torch.cat([torch.randn(64, generator=gen) * 10 ** torch.randint(-30, 30, (64,), generator=gen),
                          specials.to(torch.float64)]).to(dt)
        g.add_node(f"c{i}", "constant", params={"value": vals})
        g.add_node(f"o{i}", "output", [f"c{i}"])
    g.add_node("o", "output", ["x"])
    g.infer_shapes()
    _round_trip(g)


def test_default_printing_is_unchanged() -> None:
    g = mlp()
    assert str(g).splitlines()[2] == "  %fc1: float32[4, 16] = linear(%x) <bias:[16], weight:[16, 10]>"
    assert print_graph(g) == str(g)


HAND_WRITTEN = """\
// a graph written by hand: generators and `of` encodings
graph net (x) -> (out) {
  %x = input() {shape=(2, 6)}
  %fc1: f32[2, 4] = linear(%x) <
    weight = int8 per-axis(0) of f32[4, 6] arange(start=-3, step=0.25),
    bias = f32[4] [0.5, -1, 2e-3, 0]
  >
  %fc2 = linear(%fc1) <weight = 2:4 of f32[3, 4] [[1, 0, 0, 2], [0, 0, 3, 4], [5, 0, 6, 0]], bias = f32[3] zeros>
  %fc3 = linear(%fc2) <weight = f32[2, 3] randn(seed=3, scale=0.5), bias = f32[2] full(0.25)>
  %out = output(%fc3)
}
"""


def test_hand_written_form() -> None:
    g = parse_graph(HAND_WRITTEN)
    w1 = g.node("fc1").params["weight"]
    assert isinstance(w1, Affine) and w1.axis == 0
    want = torch.arange(24, dtype=torch.float64).reshape(4, 6) * 0.25 - 3
    assert torch.equal(w1.dense(), Affine.quantize(want.float(), axis=0).dense())
    w2 = g.node("fc2").params["weight"]
    assert isinstance(w2, Sparse) and w2.describe() == "2:4"
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.equal(g.node("fc3").params["weight"], expected)  # type: ignore[arg-type]
    assert torch.equal(g.node("fc3").params["bias"], torch.full((2,), 0.25))  # type: ignore[arg-type]
    assert str(g).splitlines()[2] == "  %fc1: float32[2, 4] = linear(%x) <bias:[4], weight:[4, 6] int8 per-axis(0)>"
    _round_trip(g)


@pytest.mark.parametrize("path", sorted(HERE.glob("*.ir")), ids=lambda p: p.stem)
def test_golden_exact_form(path: Path) -> None:
    """Each hand-written `golden/*.ir` reads to exactly the exact form in its `.exact` file."""
    actual = print_graph(parse_graph(path.read_text(), file=path.name), values=True)
    expected = path.with_suffix(".exact")
    if BLESS:
        expected.write_text(actual)
    assert actual == expected.read_text()
    _round_trip(parse_graph(actual))


def _error(text: str) -> str:
    with pytest.raises(VerifyError) as e:
        parse_graph(text, file="t.ir")
    return str(e.value)


G = "graph g (x) -> (out) {\n  %x = input() {shape=(2, 3)}\n"


@pytest.mark.parametrize(("body", "message"), [
    ("  %y = relu(%x\n}", "t.ir:4:1: error: expected ',' or ')', found '}'\n  }\n  ^"),
    ("  %y = rleu(%x)\n  %out = output(%y)\n}",
     "t.ir:3:8: error: unknown op kind 'rleu' (did you mean 'relu'?)\n    %y = rleu(%x)\n         ^~~~"),
    ("  %out = output(%z)\n}",
     "t.ir:3:17: error: unknown operand '%z'\n    %out = output(%z)\n                  ^~"),
    ("  %y = relu(%x)\n  %out = output(%y#2)\n}",
     "t.ir:4:17: error: '%y' has 1 output: there is no '#2'\n    %out = output(%y#2)\n                  ^~~~"),
    ("  %y = relu(%x) {a=}\n  %out = output(%y)\n}",
     "t.ir:3:20: error: expected a value, found '}'\n    %y = relu(%x) {a=}\n                     ^"),
    ("  %y = linear(%x) <weight = f32[2, 3] [[1, 2, 3], [4, 5]]>\n  %out = output(%y)\n}",
     "t.ir:3:39: error: ragged tensor literal: rows of different shapes\n"
     "    %y = linear(%x) <weight = f32[2, 3] [[1, 2, 3], [4, 5]]>\n"
     "                                        ^~~~~~~~~~~~~~~~~~~"),
    ("  %y = linear(%x) <weight = f32[2, 3] [1, 2, 3]>\n  %out = output(%y)\n}",
     "t.ir:3:39: error: values of shape [3] do not fit float32[2, 3]\n"
     "    %y = linear(%x) <weight = f32[2, 3] [1, 2, 3]>\n"
     "                                        ^~~~~~~~~"),
    ("  %y = linear(%x) <weight = f32[2, 3] randm(seed=1)>\n  %out = output(%y)\n}",
     "t.ir:3:39: error: unknown generator 'randm' (did you mean 'rand' or 'randn' or 'randint'?) (expected a "
     "literal or one of arange, full, ones, rand, randint, randn, zeros)\n"
     "    %y = linear(%x) <weight = f32[2, 3] randm(seed=1)>\n"
     "                                        ^~~~~"),
    ("  %y = linear(%x) <weight = f32[3, 3] randn(sed=1)>\n  %out = output(%y)\n}",
     "t.ir:3:45: error: randn has no argument 'sed' (did you mean 'seed'?) (it takes seed, scale, mean)\n"
     "    %y = linear(%x) <weight = f32[3, 3] randn(sed=1)>\n"
     "                                              ^~~"),
    ("  %y: float32[2, 5] = linear(%x) <weight = f32[4, 3] ones>\n  %out = output(%y)\n}",
     "t.ir:3:7: error: '%y' is written as float32[2, 5] but shape inference gives float32[2, 4]\n"
     "    %y: float32[2, 5] = linear(%x) <weight = f32[4, 3] ones>\n"
     "        ^~~~~~~~~~~~~"),
    ("  %y = linear(%x) <weight = int8 per-axis(0) {q = i8[2, 3] [1, 2, 3, 4, 5, 6], scale = f32[3] ones}>\n"
     "  %out = output(%y)\n}",
     "t.ir:3:29: error: scale of shape [3] does not fit a int8 per-axis(0) weight of shape [2, 3] (expected [2])\n"
     "    %y = linear(%x) <weight = int8 per-axis(0) {q = i8[2, 3] [1, 2, 3, 4, 5, 6], scale = f32[3] ones}>\n"
     "                              ^~~~"),
    ("  %out = output(%x)\n  %x = relu(%out)\n}",
     "t.ir:4:4: error: node '%x' is defined twice (first at t.ir:2:4)\n    %x = relu(%out)\n     ^"),
])
def test_malformed_text_is_a_located_error(body: str, message: str) -> None:
    assert _error(G + body) == message


def test_verify_problems_are_located_at_their_node() -> None:
    """Shape inference and `verify()` problems name the node and point at its id."""
    e = _error(G + "  %y = linear(%x) <weight = f32[4, 5] ones>\n  %out = output(%y)\n}")
    assert e.startswith("t.ir:3:4: error: linear 'y': ") and e.endswith(
        " (node 'y')\n    %y = linear(%x) <weight = f32[4, 5] ones>\n     ^")


def test_header_must_list_inputs_and_outputs() -> None:
    assert _error("graph g (x) -> (y) {\n  %x = input() {shape=(1,)}\n  %out = output(%x)\n}") == (
        "t.ir:1:17: error: 'y' is listed as a graph output but is not an output node\n"
        "  graph g (x) -> (y) {\n                  ^")
    assert _error("graph g (x) -> () {\n  %x = input() {shape=(1,)}\n  %out = output(%x)\n}").startswith(
        "t.ir:3:4: error: output node '%out' is missing from the graph's outputs")


@pytest.mark.parametrize("name", ["mlp", "resnet", "transformer", "unknown_op"])
def test_round_trip_of_captured_models(name: str) -> None:
    """Graphs from the torch frontend (opaque nodes included: their op type travels, their payload does not)."""
    from netsqueeze.compiler.api import import_model
    from tests.zoo import ZOO

    model, inputs = ZOO[name]()
    _round_trip(import_model(model, inputs))


def test_a_size_that_follows_dynamic_dims_round_trips_and_the_saved_model_runs_at_other_sizes(tmp_path: Path) -> None:
    # the printer wrote Dim(12, 2*s), which the parser refused: a saved model could not be loaded
    import netsqueeze as ns
    from netsqueeze.ir.dims import expr_of

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(x.shape[0], x.shape[1] * 2, 4))

    m = M().eval()
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}
    r = ns.compile(m, "policy p { fold_bn }", example_inputs=(torch.randn(2, 6, 8),), dynamic_shapes=(dims,))
    text = print_graph(r.graph, values=True)
    assert "shape=(0, dim(12, '2*s'), -1)" in text
    (reshape,) = [n for n in parse_graph(text).nodes() if n.kind == "reshape"]
    size = reshape.attrs["shape"][1]
    assert int(size) == 12 and str(expr_of(size)) == "2*s" and expr_of(size).free_symbols.pop().is_positive
    ns.save(r.graph, tmp_path / "m.nsq", store="ham")
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.equal(ns.load(tmp_path / "m.nsq")(x), m(x))
    with pytest.raises(VerifyError, match=re.escape("dim(...) takes an example size and an expression string")):
        parse_graph(text.replace("dim(12, '2*s')", "dim('2*s', 12)"))
