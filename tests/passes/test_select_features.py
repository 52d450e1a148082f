"""`select_features` / GOA: admission and discarding on synthetic streams, order tolerance, bounded memory,
exact removal with the consumer refit, labelled calibration through compile(), errors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.errors import BudgetError, InputMismatchError, NetsqueezeError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.goa import ClassReservoirs, goa_select
from netsqueeze.passes.select_features import SelectFeatures
from tests.passes.graphs import run


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


# features of the synthetic stream: 1, 4, 6 carry one bit of the 8 classes each (plus noise); 3 = 2·f1 − 1
# duplicates f1; 0, 2, 5, 7, 8 are pure noise
INFORMATIVE, DUPLICATE, NOISE = [1, 4, 6], 3, [0, 2, 5, 7, 8]


def _stream(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 8, (n,), generator=g)
    x = torch.randn(n, 9, generator=g, dtype=torch.float64)
    for f, bit in zip(INFORMATIVE, range(3)):
        x[:, f] = ((y >> bit) & 1).double() + 0.35 * x[:, f]
    x[:, DUPLICATE] = 2 * x[:, 1] - 1
    return x, y


def _reservoirs(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, per_class: int = 128) -> ClassReservoirs:
    res = ClassReservoirs(per_class, seed=0)
    for i in range(0, len(y), 100):
        idx = order[i:i + 100]
        res.update(x[idx], y[idx])
    return res


def test_goa_admits_label_bits_never_noise_or_duplicates_and_is_order_tolerant() -> None:
    """Over 3 orders of the samples (different reservoirs): the kept set is exactly the three label bits
    (tolerance stated for this stream: 0 features of difference); every noise gain stays under 0.05."""
    x, y = _stream(3000)
    kept = []
    for seed in range(3):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        res = goa_select(_reservoirs(x, y, order), 9, threshold=0.05, max_features=9)
        kept.append(res.kept)
        assert res.kept == INFORMATIVE
        assert np.isnan(res.gains[DUPLICATE])  # rejected as a linear function of the kept set
        assert all(res.gains[f] < 0.05 for f in NOISE)
        assert all(res.gains[f] > 0.1 for f in INFORMATIVE)
        assert ("3", "admit") not in [(str(f), a) for f, a in res.history]
    assert kept[0] == kept[1] == kept[2]


def test_goa_duplicate_first_in_stream_still_keeps_one_copy_and_cap_keeps_the_strongest() -> None:
    x, y = _stream(3000)
    res = _reservoirs(x, y, torch.arange(len(y)))
    # the duplicate arrives before its original: the original is then the linear function
    out = goa_select(res, 9, 0.05, 9, order=[3, *[f for f in range(9) if f != 3]])
    assert out.kept == [3, 4, 6]
    assert np.isnan(out.gains[1])
    capped = goa_select(res, 9, 0.05, max_features=2)
    assert len(capped.kept) == 2 and capped.discarded_online == 1
    assert set(capped.kept) <= set(INFORMATIVE)


def test_discards_a_feature_made_redundant_by_a_newcomer() -> None:
    """f0 = one label bit with heavy noise, f1 = the same bit clean: once f1 arrives f0 adds nothing."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (2000,), generator=g)
    b0, b1 = (y & 1).double(), (y >> 1).double()
    x = torch.stack([b0 + 0.8 * torch.randn(2000, generator=g, dtype=torch.float64),
                     b0 + 0.05 * torch.randn(2000, generator=g, dtype=torch.float64),
                     b1 + 0.05 * torch.randn(2000, generator=g, dtype=torch.float64)], 1)
    out = goa_select(_reservoirs(x, y, torch.arange(2000)), 3, 0.05, 3)
    assert (0, "admit") in out.history and (0, "discard") in out.history
    assert out.kept == [1, 2]


def test_reservoir_memory_is_flat_in_the_number_of_samples() -> None:
    held = []
    for n in (2000, 16000):
        x, y = _stream(n)
        r = _reservoirs(x, y, torch.arange(n), per_class=64)
        held.append((r.rows_held, r.seen))
    assert held == [(8 * 64, 2000), (8 * 64, 16000)]


# ---- the pass on a graph ----
def _affine_graph(seed: int = 0) -> tuple[Graph, torch.Tensor]:
    """x[4] → fc1 (8 features; features 4..7 affine functions of 0..3) → relu-free → fc2 (3 outputs)."""
    torch.manual_seed(seed)
    g = Graph("aff")
    x = g.add_node("x", "input", attrs={"shape": (4, 4)})
    w = torch.randn(8, 4)
    b = torch.randn(8)
    mix = torch.randn(4, 4)
    w[4:] = mix @ w[:4]
    b[4:] = mix @ b[:4] + torch.tensor([0.5, -1.0, 2.0, 0.0])
    h = g.add_node("fc1", "linear", [x], params={"weight": w, "bias": b})
    g.add_node("out", "output", [g.add_node("fc2", "linear", [h], params={"weight": torch.randn(3, 8),
                                                                         "bias": torch.randn(3)})])
    g.infer_shapes()
    return g, w


def _labelled_ctx(xs: list[torch.Tensor], ys: list[torch.Tensor], **kw: object) -> PassContext:
    def stream(graph: Graph, values: Sequence[Value]) -> Iterator[list[torch.Tensor]]:
        for xb in xs:
            yield run(graph, [xb], list(values))[len(graph.outputs):]

    return PassContext(stream_fn=stream, labels_fn=lambda: iter(ys), **kw)  # type: ignore[arg-type]


def _sign_labels(g: Graph, xb: torch.Tensor) -> torch.Tensor:
    """16 classes: the signs of fc1's features 0..3, so each of them determines one bit of the label."""
    h = xb @ g.node("fc1").dense("weight")[:4].T + g.node("fc1").dense("bias")[:4]
    return ((h > 0).long() * torch.tensor([1, 2, 4, 8])).sum(1)


def test_removal_and_refit_are_exact_when_dropped_features_are_affine_in_kept_ones() -> None:
    g, _ = _affine_graph()
    ref = g.copy()
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    ys = [_sign_labels(g, xb) for xb in xs]
    # bit 3 tells apart only 8 of the 120 class pairs: its gain (~0.03) is under the default threshold
    out = SelectFeatures(reservoir=32, threshold=0.01).run(g, _labelled_ctx(xs, ys, selected=frozenset({"fc1"})))
    g.verify()
    assert g.node("fc1").params["weight"].shape == (4, 4) and g.node("fc2").params["weight"].shape == (3, 4)
    assert out.metrics["features_removed"] == 4.0
    xt = torch.randn(500, 4, generator=torch.Generator().manual_seed(99))
    a, b = run(ref, [xt])[0], run(g, [xt])[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())
    assert out.metrics["samples_seen"] == 2048.0 and out.metrics["reservoir_rows"] <= 16 * 32


def test_pass_memory_counts_do_not_grow_with_samples_and_same_inputs_give_same_result() -> None:
    def labels(g: Graph, xb: torch.Tensor) -> torch.Tensor:  # 4 classes, each well populated
        return _sign_labels(g, xb) % 4

    rows, kept = [], []
    for n in (4, 32):
        g, _ = _affine_graph()
        xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(n)]
        out = SelectFeatures(reservoir=16).run(g, _labelled_ctx(xs, [labels(g, xb) for xb in xs],
                                                               selected=frozenset({"fc1"})))
        rows.append((out.metrics["reservoir_rows"], out.metrics["samples_seen"]))
        kept.append(g.node("fc1").dense("weight").clone())
    assert rows == [(4 * 16, 1024), (4 * 16, 8192)]
    g, _ = _affine_graph()
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(32)]
    SelectFeatures(reservoir=16).run(g, _labelled_ctx(xs, [labels(g, xb) for xb in xs],
                                                      selected=frozenset({"fc1"})))
    assert torch.equal(g.node("fc1").dense("weight"), kept[1])


def test_bounds_raise_the_kept_count_with_the_best_rejected() -> None:
    g, _ = _affine_graph()
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ys = [_sign_labels(g, xb) for xb in xs]
    SelectFeatures(reservoir=16, min_channels=6).run(g, _labelled_ctx(xs, ys, selected=frozenset({"fc1"})))
    assert g.node("fc1").params["weight"].shape[0] == 6
    g, _ = _affine_graph()
    SelectFeatures(reservoir=16, max_features=2).run(g, _labelled_ctx(xs, ys, selected=frozenset({"fc1"})))
    assert g.node("fc1").params["weight"].shape[0] == 2


def test_errors_name_the_problem() -> None:
    g, _ = _affine_graph()
    xs = [torch.randn(64, 4)]
    with pytest.raises(NetsqueezeError) as e:
        SelectFeatures().run(g, PassContext(stream_fn=_labelled_ctx(xs, []).stream_fn, selected=frozenset({"fc1"})))
    assert e.value.message == ("select_features needs labelled calibration data: an .npz holding the model's "
                               "inputs and an integer array 'labels' (one class per sample)")
    with pytest.raises(InputMismatchError) as e2:
        SelectFeatures().run(g, _labelled_ctx(xs, [torch.rand(64)], selected=frozenset({"fc1"})))
    assert e2.value.message == ("select_features: calibration labels must be one class index per sample "
                                "(integers of shape [N]); got float32 of shape [64]")
    with pytest.raises(InputMismatchError) as e3:
        SelectFeatures().run(g, _labelled_ctx(xs, [torch.zeros(63, dtype=torch.long)], selected=frozenset({"fc1"})))
    assert e3.value.message == ("select_features: calibration batch 0 has 63 labels but the features read by "
                                "'fc2' have 64 rows (one label per row is needed)")
    with pytest.raises(NetsqueezeError) as e4:
        SelectFeatures(max_fraction=1.5)
    assert "option 'max_fraction' of pass 'select_features'" in e4.value.message


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x)))


def test_compile_reads_a_labelled_npz_and_keeps_the_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = _Net().eval()
    with torch.no_grad():  # 8 of the 16 hidden units copy others (scaled): the head refit folds them back
        m.body.weight[8:] = 1.5 * m.body.weight[:8]
        m.body.bias[8:] = 1.5 * m.body.bias[:8]
    x = torch.randn(2048, 6, generator=torch.Generator().manual_seed(3))
    y = m(x).argmax(1)
    path = tmp_path / "xy.npz"
    np.savez(path, x=x.numpy(), labels=y.numpy())
    # GOA alone keeps a minimal subset of the 8 distinct units (5 here); min_channels = 8 fills up with the
    # rejected units of largest gain, the scaled copies (linearly redundant) last: the refit is then exact
    r = ns.compile(m, "policy p { select_features on body { min_channels = 8 } }", example_inputs=(x[:4],),
                   calibration=path)
    assert r.graph.node("body").params["weight"].shape == (8, 6)
    assert torch.allclose(r.model(x), m(x), atol=1e-4)
    r = ns.compile(m, "policy p { select_features on body }", example_inputs=(x[:4],), calibration=path)
    assert r.graph.node("body").params["weight"].shape == (5, 6)
    assert r.report.passes[0].result.metrics["group1_admitted"] == 5.0


def test_onnx_input_is_selected_and_refit_alike(tmp_path: Path) -> None:
    import warnings

    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    m = _Net().eval()
    m.body.weight[8:] = 1.5 * m.body.weight[:8]
    m.body.bias[8:] = 1.5 * m.body.bias[:8]
    x = torch.randn(2048, 6, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "xy.npz"
    np.savez(path, x=x.numpy(), labels=m(x).argmax(1).numpy())
    f = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x[:4],), str(f), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    r = ns.compile(onnx.load(str(f)),
                   "policy p { select_features on first(type(linear)) { min_channels = 8 } }",
                   example_inputs=(x[:4],), calibration=path, target="onnx")
    first = next(n for n in r.graph.nodes() if n.kind == "linear")
    assert first.dense("weight").shape == (8, 6)
    assert isinstance(r.model, onnx.ModelProto)
    out = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert np.abs(out - m(x).numpy()).max() < 1e-4


# ---- budgets ----
def test_budget_sets_the_largest_kept_count_that_meets_it() -> None:
    """params: fc1 5k (k features × 4 inputs + k biases) + fc2 3k + 3, of 67 with all 8 features."""
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for limit, k in ((0.7, 5), (0.5, 3), (0.2, 1)):
        g, _ = _affine_graph()
        ref = g.copy()
        ys = [_sign_labels(g, xb) for xb in xs]
        out = SelectFeatures(reservoir=16).run(g, _labelled_ctx(xs, ys, selected=frozenset({"fc1"}),
                                                                budget={"params": limit}))
        g.verify()
        assert g.node("fc1").params["weight"].shape == (k, 4), limit
        assert out.metrics["params_ratio"] == pytest.approx((8 * k + 3) / 67) and (8 * k + 3) / 67 <= limit
        assert (8 * (k + 1) + 3) / 67 > limit  # the largest count: one more feature misses the budget
        if k >= 4:  # GOA's set filled with independent features first: the 4 dropped are affine in the kept
            xt = torch.randn(300, 4, generator=torch.Generator().manual_seed(7))
            assert torch.allclose(run(ref, [xt])[0], run(g, [xt])[0], rtol=1e-4, atol=1e-4)
    g, _ = _affine_graph()
    SelectFeatures(reservoir=16, max_features=2).run(g, _labelled_ctx(xs, [_sign_labels(g, xb) for xb in xs],
                                                                      selected=frozenset({"fc1"}),
                                                                      budget={"params": 0.7}))
    assert g.node("fc1").params["weight"].shape == (2, 4)  # max_features caps the budget's count


def test_budget_unreachable_within_the_bounds_is_a_located_budget_error() -> None:
    g, _ = _affine_graph()
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ys = [_sign_labels(g, xb) for xb in xs]
    with pytest.raises(BudgetError) as e:
        SelectFeatures(reservoir=16, min_channels=6).run(
            g, _labelled_ctx(xs, ys, selected=frozenset({"fc1"}), budget={"params": 0.7, "flops": 0.9}))
    assert e.value.message == ("select_features cannot meet the budget flops <= 90.0%, params <= 70.0%: keeping "
                               "the fewest features the bounds allow reaches flops 75.6%, params 76.1% of the "
                               "original")
    assert e.value.diagnostics[0].node == "fc1"  # flops 15k + 3 of 123, params 8k + 3 of 67, at k = 6
    with pytest.raises(NetsqueezeError) as e2:
        SelectFeatures().run(g, _labelled_ctx(xs, ys, selected=frozenset({"fc1"}), budget={"flops": 1.5}))
    assert e2.value.message == "select_features: budget flops = 1.5 must be a ratio in (0, 1]"


def test_compile_meets_a_params_budget(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = _Net().eval()
    x = torch.randn(1024, 6, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "xy.npz"
    np.savez(path, x=x.numpy(), labels=m(x).argmax(1).numpy())
    # params: body 7k, head 4k + 4, of 180: 50% keeps 7 of the 16 hidden units
    r = ns.compile(m, "policy p {\n  budget params <= 50%\n  select_features on body\n}", example_inputs=(x[:4],),
                   calibration=path)
    assert r.graph.node("body").params["weight"].shape == (7, 6)
    assert r.graph.node("head").params["weight"].shape == (4, 7)


def _residual_graph(inputs: int = 4) -> Graph:
    """x[inputs] → fc1 [8] = h; s = h + relu(fc2(h)); fc3(s) [3]: h's 8 features form one group read by fc2 and
    fc3 (with 4 inputs h spans 4 dimensions, so any 5 features rebuild the rest exactly)."""
    torch.manual_seed(1)
    g = Graph("res")
    x = g.add_node("x", "input", attrs={"shape": (4, inputs)})
    h = g.add_node("fc1", "linear", [x], params={"weight": torch.randn(8, inputs), "bias": torch.randn(8)})
    a = g.add_node("relu", "relu", [g.add_node("fc2", "linear", [h], params={"weight": 0.5 * torch.randn(8, 8),
                                                                            "bias": torch.randn(8)})])
    s = g.add_node("add", "add", [h, a])
    g.add_node("out", "output", [g.add_node("fc3", "linear", [s], params={"weight": torch.randn(3, 8),
                                                                        "bias": torch.randn(3)})])
    g.infer_shapes()
    return g


def test_linear_consumer_behind_another_is_refit_on_what_it_reads_after_the_removal() -> None:
    """fc3 reads the kept features through fc2's block, which the removal changed: after the pass its weights
    are the ridge least-squares fit (with intercept; the ridge one of `refit.RIDGES`) of the original fc3 outputs
    on its new inputs, on the data (`refit.refit_layers`, which re-solves fc2 first). h spans 8 dimensions here,
    so the removal loses what only the dropped features carried and the refit has something to win."""
    from tests.passes.test_layer_refit import _matches_one, _ridge_solutions

    g = _residual_graph(inputs=8)
    ref = g.copy()
    xs = [torch.randn(256, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ys = [_sign_labels(g, xb) % 4 for xb in xs]
    out = SelectFeatures(reservoir=16, max_features=5, min_channels=5).run(
        g, _labelled_ctx(xs, ys, selected=frozenset({"fc1", "fc2"})))
    g.verify()
    # fc2 is linear in what it reads: its fold (the kept features' least-squares rebuild of the rest) is its
    # least-squares refit already, so the refit does no better on held-out rows and fc2 stays as folded
    assert g.node("fc3").params["weight"].shape == (3, 5) and out.metrics["layers_refit"] == 1.0
    x = torch.cat(xs)
    z = run(g, [x], [("add", 0)])[-1].double()
    target = run(ref, [x])[0].double()
    got = torch.cat([g.node("fc3").dense("weight").double().T, g.node("fc3").dense("bias").double()[None]])
    assert _matches_one(got, _ridge_solutions(z, target))
    assert "layer refit: 'fc2' kept as it is: its refit was no better on held-out calibration rows" in out.notes
    assert "layer refit: 1 of 2 layers refit whole by least squares to the pass-start outputs" in out.notes


def test_scope_consumer_cuts_the_last_layers_view_only_and_refits_it_by_least_squares() -> None:
    """h (fc1's 8 features) is read by fc2 and, through the add, by fc3: with `scope = consumer` a gather of the
    kept features goes on the add's h operand, fc2 keeps reading all 8 and computes only the kept rows (the
    others fed the add alone), and fc3 is the least-squares fit (with intercept) of its original outputs on
    the kept features of the add's original output."""
    g = _residual_graph()
    ref = g.copy()
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ys = [_sign_labels(g, xb) % 4 for xb in xs]
    out = SelectFeatures(reservoir=16, max_features=5, min_channels=5, scope="consumer").run(
        g, _labelled_ctx(xs, ys, selected=frozenset({"fc1", "fc2"})))
    g.verify()
    gathers = [n for n in g.nodes() if n.kind == "gather"]
    assert len(gathers) == 1 and g.operands(gathers[0].id) == [("fc1", 0)] and g.users(gathers[0].id) == [("add", 0, 0)]
    keep = list(gathers[0].attrs["indices"])
    assert len(keep) == 5 and keep == sorted(keep)
    assert g.node("fc1").params["weight"].shape == (8, 4) and torch.equal(g.node("fc1").params["weight"],
                                                                          ref.node("fc1").params["weight"])
    assert torch.equal(g.node("fc2").params["weight"], ref.node("fc2").params["weight"][keep])
    assert g.node("fc3").params["weight"].shape == (3, 5) and "layers_refit" not in out.metrics
    x = torch.cat(xs)
    s = run(ref, [x], [("add", 0)])[-1].double()
    a = torch.cat([s[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    want = torch.linalg.lstsq(a, run(ref, [x])[0].double()).solution
    got = torch.cat([g.node("fc3").dense("weight").double().T, g.node("fc3").dense("bias").double()[None]])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), float((got - want).abs().max())
    assert out.notes[-1] == ("group 1: features removed from 'fc3''s view only (scope = consumer); its other "
                             "consumers read all 8")
    assert out.metrics["params_ratio"] == pytest.approx((40 + 45 + 18) / (40 + 72 + 27))  # fc1, fc2 5 rows, fc3


def test_scope_consumer_fill_follows_the_consumers_output_and_refuses_a_budget() -> None:
    """Past GOA's own set, the kept features are the ones fc3's output needs most (greedy least squares on the
    streamed Gram): with fc3 reading features 2 and 6 alone, and GOA capped at one, the second kept is whichever
    of them GOA did not keep. A budget is refused: it meters the group cut, not the view cut."""
    g = _residual_graph()
    w3 = torch.zeros(3, 8)
    w3[:, 2], w3[:, 6] = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 1.0, -1.0])
    g.node("fc3").params["weight"] = w3
    xs = [torch.randn(256, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ys = [_sign_labels(g, xb) % 4 for xb in xs]
    ref = g.copy()
    SelectFeatures(reservoir=16, max_features=2, min_channels=2, threshold=1.0, scope="consumer").run(
        g, _labelled_ctx(xs, ys, selected=frozenset({"fc1", "fc2"})))
    assert list(next(n for n in g.nodes() if n.kind == "gather").attrs["indices"]) == [2, 6]
    xt = torch.randn(300, 4, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(run(ref, [xt])[0], run(g, [xt])[0], rtol=1e-4, atol=1e-4)
    g = _residual_graph()
    with pytest.raises(NetsqueezeError) as e:
        SelectFeatures(reservoir=16, scope="consumer").run(
            g, _labelled_ctx(xs, ys, selected=frozenset({"fc1", "fc2"}), budget={"params": 0.7}))
    assert e.value.message == ("select_features: scope = consumer removes features from the classifier's view only, "
                               "which a flops/params/bytes budget does not meter; use scope = group under a budget")


class _TinyResNet(nn.Module):
    """stem conv (8) = s; t = relu(c2(relu(c1(s))) + s); fc(pool(t)): s's 8 channels are read by c1 and, after
    the add and the pooling, by fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        t = torch.relu(self.c2(torch.relu(self.c1(s))) + s)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(t, 1), 1))


def test_scope_consumer_on_torch_and_onnx_inputs_gives_the_same_model(tmp_path: Path) -> None:
    """Both routes: a gather of the kept 3 features on the add's shortcut, c2 computing 3 channels, the stem and
    c1 untouched, fc [4, 3]; the two compiled models agree (1e-4), and the torch one equals the original's c1
    on the stem (the stream is not cut)."""
    import warnings

    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    m = _TinyResNet().eval()
    x = torch.randn(512, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "xy.npz"
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()  # 4 classes from the input
    np.savez(path, x=x.numpy(), labels=y.numpy())
    text = ("policy p { select_features on first(type(conv)) | last(type(conv)) { max_features = 3, "
            "min_channels = 3, scope = consumer } }")
    r = ns.compile(m, text, example_inputs=(x[:4],), calibration=path)
    f = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x[:4],), str(f), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    ro = ns.compile(onnx.load(str(f)), text,
                    example_inputs=(x[:4],), calibration=path, target="onnx")
    for res in (r, ro):
        convs = [n for n in res.graph.nodes() if n.kind == "conv"]
        assert [tuple(n.dense("weight").shape) for n in convs] == [(8, 1, 3, 3), (8, 8, 3, 3), (3, 8, 3, 3)]
        gathers = [n for n in res.graph.nodes() if n.kind == "gather"]
        assert len(gathers) == 1 and len(gathers[0].attrs["indices"]) == 3
        assert next(n for n in res.graph.nodes() if n.kind == "linear").dense("weight").shape == (4, 3)
    assert torch.equal(r.graph.node("c1").dense("weight"), m.c1.weight) and torch.equal(
        r.graph.node("stem").dense("weight"), m.stem.weight)
    assert isinstance(ro.model, onnx.ModelProto)
    out = ort.InferenceSession(ro.model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert np.abs(out - r.model(x).numpy()).max() < 1e-4


def test_scope_consumer_needs_a_linear_reader_one_position_per_feature(tmp_path: Path) -> None:
    class ConvHead(_TinyResNet):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = torch.relu(self.stem(x))
            return self.head(torch.relu(self.c2(torch.relu(self.c1(s))) + s)).mean((2, 3))

    torch.manual_seed(0)
    m = ConvHead().eval()
    x = torch.randn(256, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "xy.npz"
    np.savez(path, x=x.numpy(), labels=((x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()).numpy())
    with pytest.raises(NetsqueezeError) as e:
        ns.compile(m, "policy p { select_features on stem | c2 { max_features = 3, scope = consumer } }",
                   example_inputs=(x[:4],), calibration=path)
    d = e.value.diagnostics[0]
    assert d.message == ("pass 'select_features' (<policy>:1) failed: select_features: scope = consumer cuts the view of the group's last linear consumer, "
                         "reading one position per feature; group 1 is read by 'head' (conv)") and d.node == "head"


def test_a_layer_refit_after_its_own_outputs_were_cut_reproduces_only_the_kept_ones() -> None:
    """c1 is re-solved (it reads the cut stream) and its outputs were cut as group 2: the fit targets the
    original c1's kept output channels (it crashed on a [1, 1, 3, 3] reshape of all 8)."""
    gen = torch.Generator().manual_seed(0)
    cal = torch.randn(64, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    torch.manual_seed(0)
    res = ns.compile(_TinyResNet().eval(), "policy p { select_features { max_features = 4, min_channels = 4 } }",
                     example_inputs=(cal[:4],), calibration=[(cal[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)],
                     labelled=True, progress=False)
    shapes = {n: tuple(m.weight.shape) for n, m in res.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert shapes == {"stem": (4, 1, 3, 3), "c1": (4, 4, 3, 3), "c2": (4, 4, 3, 3), "fc": (4, 4)}
    notes = [n for p in res.report.passes for n in p.result.notes]
    assert "layer refit: 2 of 2 layers refit whole by least squares to the pass-start outputs" in notes
    assert bool(torch.isfinite(res.model(cal)).all())
