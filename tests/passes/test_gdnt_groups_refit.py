"""`trim { criterion = gdnt, gdnt_mode = groups }`: the least-squares refit of the cut consumers
(`passes.gdnt_groups.refit`, `refit = auto | least_squares`) and the one order of connections that lets a budget
cut move one connection at a time (`passes.gdnt_groups.ranked`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import netsqueeze.passes.trim as trim_mod
from netsqueeze.ir.graph import Graph
from netsqueeze.passes.trim import Trim
from tests.passes.graphs import run, stream_ctx


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _fixed(table: dict[int, torch.Tensor]):  # type: ignore[no-untyped-def]
    """A `gdnt_group_scores` returning `table[number of parents]` (its first rows and columns: as many as there
    are parent and child groups)."""

    def scores(parents: torch.Tensor, children: torch.Tensor, pg: int, cg: int, seed: int) -> torch.Tensor:
        return table[parents.shape[1]][:min(pg, parents.shape[1]), :min(cg, children.shape[1])].clone()

    return scores


def _dependent_linear() -> Graph:
    """z[4] → fc1 [8]: features 0..3 = z, features 4..7 = z·B (linear combinations of 0..3) → fc2 [6]."""
    gen = torch.Generator().manual_seed(11)
    w1 = torch.cat([torch.eye(4), torch.randn(4, 4, generator=gen)])
    g = Graph("lin")
    x = g.add_node("x", "input", attrs={"shape": (4, 4)})
    h = g.add_node("fc1", "linear", [x], params={"weight": w1, "bias": torch.zeros(8)})
    y = g.add_node("fc2", "linear", [h], params={"weight": torch.randn(6, 8, generator=gen),
                                                 "bias": torch.randn(6, generator=gen)})
    g.add_node("out", "output", [y])
    g.infer_shapes()
    return g


def _dependent_conv(relu: bool = False) -> Graph:
    """x[2, 9, 9] → conv1 [8] (3×3, pad 1): channels 4..7 = linear combinations of channels 0..3 (no bias, so the
    zero padding is a combination too) → (relu, which breaks that) → conv2 [6] (3×3, stride 2, pad 1, bias)."""
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(4, 2, 3, 3, generator=gen)
    mix = torch.randn(4, 4, generator=gen)
    w1 = torch.cat([base, torch.einsum("ij,jchw->ichw", mix, base)])
    g = Graph("conv")
    x = g.add_node("x", "input", attrs={"shape": (4, 2, 9, 9)})
    conv = {"stride": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}
    h = g.add_node("conv1", "conv", [x], params={"weight": w1}, attrs=conv)
    h = g.add_node("relu", "relu", [h]) if relu else h
    y = g.add_node("conv2", "conv", [h], params={"weight": torch.randn(6, 8, 3, 3, generator=gen),
                                                 "bias": torch.randn(6, generator=gen)},
                   attrs={**conv, "stride": (2, 2)})
    g.add_node("out", "output", [y])
    g.infer_shapes()
    return g


def _batches(shape: tuple[int, ...], n: int = 4, seed: int = 2) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(64, *shape, generator=gen) + 0.5] for _ in range(n)]


# parent group 1 (channels 4..7) scores low into both child groups: both its connections are cut and it is removed
_CUT_SECOND_PARENT = {8: torch.tensor([[0.9, 0.8], [0.1, 0.2]], dtype=torch.float64)}


@pytest.mark.parametrize(("make", "node", "shape"), [(_dependent_linear, "fc1", (4,)),
                                                      (_dependent_conv, "conv1", (2, 9, 9))])
def test_refit_is_exact_when_the_cut_inputs_are_combinations_of_the_kept(
        monkeypatch: pytest.MonkeyPatch, make, node: str, shape: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(trim_mod, "gdnt_group_scores", _fixed(_CUT_SECOND_PARENT))
    xt = _batches(shape, n=1, seed=9)[0]
    want = run(make(), xt)[0]
    errs = {}
    for refit in ("auto", "least_squares", "none"):
        g = make()
        res = Trim(criterion="gdnt", gdnt_mode="groups", ratio=0.5, gdnt_child_groups=2, refit=refit).run(
            g, stream_ctx(_batches(shape), selected=frozenset({node})))
        g.verify()
        assert res.metrics["connections_cut"] == 2.0 and res.metrics["channels_removed"] == 4.0
        assert res.metrics["consumers_refit"] == (0.0 if refit == "none" else 1.0)
        assert g.node(node).dense("weight").shape[0] == 4
        errs[refit] = float((run(g, xt)[0] - want).abs().max() / want.abs().max())
    # the refit recovers the cut channels' contribution through the kept ones; the mean alone loses it
    assert errs["auto"] < 1e-4 and errs["least_squares"] < 1e-4
    assert errs["none"] > 0.1


def test_cut_blocks_stay_zero_and_the_refit_beats_the_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """conv2's inputs relu'd (no longer linear combinations), 4 parent groups (channel pairs) × 4 child groups
    (rows {0, 1}, {2, 3}, {4}, {5}); connections (0, 1), (1, 0), (3, 2) cut, no parent group left unconnected:
    the cut blocks are exactly zero after the refit, every other block is non-zero, and the refit's output
    error on held-out inputs is under half the mean-into-bias one."""
    scores = torch.full((4, 4), 0.9, dtype=torch.float64)
    scores[0, 1], scores[1, 0], scores[3, 2] = 0.1, 0.2, 0.3
    monkeypatch.setattr(trim_mod, "gdnt_group_scores", _fixed({8: scores}))
    rows = [[0, 1], [2, 3], [4], [5]]
    xt = _batches((2, 9, 9), n=1, seed=9)[0]
    want = run(_dependent_conv(relu=True), xt)[0]
    errs = {}
    for refit in ("auto", "none"):
        g = _dependent_conv(relu=True)
        res = Trim(criterion="gdnt", gdnt_mode="groups", ratio=0.2, gdnt_child_groups=4, refit=refit).run(
            g, stream_ctx(_batches((2, 9, 9)), selected=frozenset({"conv1"})))
        g.verify()
        assert res.metrics["connections_cut"] == 3.0 and res.metrics["channels_removed"] == 0.0
        w = g.node("conv2").dense("weight")
        for a in range(4):
            for b in range(4):
                blk = w[rows[b]][:, 2 * a:2 * a + 2]
                assert bool((blk == 0).all()) == ((a, b) in ((0, 1), (1, 0), (3, 2))), (refit, a, b)
        errs[refit] = float(((run(g, xt)[0] - want) ** 2).mean() / (want ** 2).mean())
    assert errs["auto"] < 0.5 * errs["none"]


def _mlp() -> Graph:
    """x[16] → fc1 [64] → relu → fc2 [64] → relu → fc3 [10]."""
    gen = torch.Generator().manual_seed(13)
    g = Graph("mlp")
    h = g.add_node("x", "input", attrs={"shape": (4, 16)})
    for name, (i, o) in {"fc1": (16, 64), "fc2": (64, 64), "fc3": (64, 10)}.items():
        h = g.add_node(name, "linear", [h], params={"weight": torch.randn(o, i, generator=gen) / i ** 0.5,
                                                    "bias": torch.zeros(o)})
        if name != "fc3":
            h = g.add_node(f"{name}.relu", "relu", [h])
    g.add_node("out", "output", [h])
    g.infer_shapes()
    return g


def test_a_budget_lands_within_one_parent_group_when_scores_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Friedman–Rafsky scores are counts over n/3 samples: ties are the rule. Here the 16 parent groups of each
    consumer take 4 scores, 4 groups (all their connections) to a score: a threshold among the distinct scores
    moves 4 parent groups at once. Ranked by weight magnitude within a tie, the cut moves one connection at a
    time and lands within one parent group's FLOPs (4 of fc1's or fc2's 64 channels: at most 5.6% of the
    original's) under each target."""
    levels = torch.tensor([0.1, 0.2, 0.3, 0.9], dtype=torch.float64).repeat_interleave(4)
    monkeypatch.setattr(trim_mod, "gdnt_group_scores", _fixed({64: levels[:, None].expand(16, 16)}))
    for target in (0.9, 0.75, 0.6):
        g = _mlp()
        res = Trim(criterion="gdnt", gdnt_mode="groups", gdnt_child_groups=16, gdnt_layer_cap=1.0, refit="none").run(
            g, stream_ctx(_batches((16,)), selected=frozenset({"fc1", "fc2"}), budget={"flops": target}))
        g.verify()
        got = res.metrics["flops_ratio"]
        assert target - 0.056 <= got <= target



class _ResidualCNN(torch.nn.Module):
    """c1 (16) → relu → c2 + skip → relu → c3 (16, stride 2) → relu → fc on 8x8 inputs of 2 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + h)
        return self.fc(torch.relu(self.c3(h)).flatten(1))

def test_compile_refits_through_segments_and_beats_the_mean() -> None:
    """Through `compile` (the compiler's segments feed the refit): a small CNN with a residual block, cut by
    gdnt groups to 70% of its FLOPs; `refit = auto` refits every observed consumer and lowers the output error
    on held-out inputs by over 15% against `refit = none` (random weights and inputs: little of a cut input is
    predictable from the kept ones), both meeting the budget with the same channels."""
    import netsqueeze as ns

    torch.manual_seed(0)

    model = _ResidualCNN().eval()
    gen = torch.Generator().manual_seed(1)
    calib, held = torch.randn(1024, 2, 8, 8, generator=gen), torch.randn(256, 2, 8, 8, generator=gen)
    want = model(held)
    errs, metrics = {}, {}
    for refit in ("auto", "none"):
        policy = ("policy p {\n  calibrate samples 1024, batch 128\n  budget flops <= 70%\n  trim on type(conv) { "
                  f"criterion = gdnt, gdnt_mode = groups, gdnt_child_groups = 4, refit = {refit} }}\n}}\n")
        res = ns.compile(model, policy, example_inputs=(calib[:2],), calibration=calib)
        m = next(p for p in res.report.passes if p.name == "trim").result.metrics
        assert m["flops_ratio"] <= 0.7
        metrics[refit] = m
        errs[refit] = float(((res.model(held) - want) ** 2).mean() / (want ** 2).mean())
    assert metrics["auto"]["consumers_refit"] == 3.0 and metrics["none"]["consumers_refit"] == 0.0
    assert metrics["auto"]["channels_removed"] == metrics["none"]["channels_removed"] > 0
    assert errs["auto"] < 0.85 * errs["none"], errs


def test_closer_cut_skips_a_connection_whose_cut_overshoots() -> None:
    """One entry, ranks 0..7 (parent group × child group); each column's strongest (ranks 3 and 7) is never
    walked. A stand-in meter: each cut takes 10% of the FLOPs, and cutting rank 2 also removes a parent group
    (another 50%). Budget 75%: the threshold search meets it first at ranks < 3 (20%, 55 points under); the
    walk from ranks < 2 skips rank 2 and lands at ranks {0, 1, 4}: 70%."""
    from netsqueeze.passes import gdnt_groups
    from netsqueeze.passes.allocation import Budget

    ranks = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]], dtype=torch.float64)
    table: list[Any] = [(None, 0, [], [], ranks)]
    walked: list[float] = []

    def reach(masks: list[torch.Tensor]) -> tuple[float, float, float]:
        cut = {float(r) for r in ranks[masks[0]]} - {3.0, 7.0}
        walked.append(len(cut))
        flops = 1.0 - 0.1 * len(cut) - (0.5 if 2.0 in cut else 0.0)
        return flops, 1.0, 1.0

    got = gdnt_groups.closer_cut(table, 2.0, reach, Budget({"flops": 0.75}))
    assert got is not None
    masks, reached = got
    assert sorted(float(r) for r in ranks[masks[0]]) == [0.0, 1.0, 4.0]
    assert reached == pytest.approx((0.7, 1.0, 1.0))
    assert len(walked) == 4  # ranks 2, 4, 5, 6: the strongest two are never walked


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_zoo_model_with_batchnorm_refits_layer_by_layer(name: str) -> None:
    """Convs without a bias (BatchNorm after them): the refit gives them one, which the dependency analysis did
    not see; it shrinks with the conv's removed output channels (it used to fail verification: 'bias has shape
    [8], expected [6]'). The consumers are refit side by side layer by layer: a few passes, not two per
    consumer (measured 6.7 / 6.9; 9.8 / 19.0 when each consumer ran both graphs from the inputs)."""
    import netsqueeze as ns
    from tests.zoo import ZOO

    model, x = ZOO[name]()
    calib = torch.randn(256, *x[0].shape[1:], generator=torch.Generator().manual_seed(0))
    res = ns.compile(model, "policy p {\n calibrate samples 256, batch 64\n budget flops <= 60%\n"
                     " trim on type(conv) { criterion = gdnt, gdnt_mode = groups, gdnt_layer_cap = 0.9 }\n}\n",
                     example_inputs=(calib[:2],), calibration=calib, progress=False)
    res.graph.verify()
    assert res.report.after.flops <= 0.6 * res.report.before.flops
    assert res.report.calibration_passes <= 8
    notes = next(r for r in res.report.passes if r.name == "trim").result.notes
    assert any(n.startswith("gdnt refit: ") and "consumers refit by ridge least squares" in n for n in notes)


def test_gdnt_groups_on_an_onnx_input_matches_the_torch_route_and_answers_to_the_guard(tmp_path: Any) -> None:
    """The same small residual CNN, captured from torch and from its ONNX export, cut by GDNT groups to 70% of
    its FLOPs with the refit: the same channel counts per conv and outputs within 1e-4 of each other (ONNX
    Runtime for the ONNX route). A guard the cut misses is a `BudgetError` at the guard line naming what was
    reached."""
    import warnings

    import onnx
    import onnxruntime as ort

    import netsqueeze as ns
    from netsqueeze.errors import BudgetError

    torch.manual_seed(0)

    model = _ResidualCNN().eval()
    calib = torch.randn(512, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    f = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (calib[:2],), str(f), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    body = ("  calibrate samples 512, batch 128\n  budget flops <= 70%\n  trim on type(conv) { criterion = gdnt, "
            "gdnt_mode = groups, gdnt_child_groups = 4 }\n")
    rt = ns.compile(model, f"policy p {{\n{body}}}\n", example_inputs=(calib[:2],), calibration=calib)
    ro = ns.compile(onnx.load(str(f)), f"policy p {{\n{body}}}\n", example_inputs=(calib[:2],), calibration=calib,
                    target="onnx")
    shapes = [[tuple(n.dense("weight").shape) for n in r.graph.nodes() if n.kind in ("conv", "linear")]
              for r in (rt, ro)]
    assert shapes[0] == shapes[1] and shapes[0] != [(16, 2, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3), (5, 256)]
    assert rt.report.after.flops <= 0.7 * rt.report.before.flops
    assert isinstance(ro.model, onnx.ModelProto)
    out = ort.InferenceSession(ro.model.SerializeToString()).run(None, {"x": calib.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - rt.model(calib).numpy()).max() < 1e-4
    with pytest.raises(BudgetError) as e:
        ns.compile(model, f"policy p {{\n{body}  guard output error <= 0.01%\n}}\n", example_inputs=(calib[:2],),
                   calibration=calib)
    d = e.value.diagnostics[0]
    assert d.span is not None and (d.span.line, d.span.col) == (5, 9)
    assert d.message.startswith("guard output error <= 0.01% not met: reached ") and d.message.endswith("%")
    assert float(d.message.rsplit(" ", 1)[1].rstrip("%")) > 1.0  # the cut's error, far over the limit


def test_a_cap_of_zero_cuts_nothing_and_changes_nothing() -> None:
    """With no connection cut, each child group's refit is no better on held-out rows than the layer as it is (it
    changed the outputs by 37% on 64 samples): the model comes out as it went in."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10)).eval()
    cal = torch.randn(64, 1, 8, 8)
    import netsqueeze as ns

    res = ns.compile(m, "policy p { trim { criterion = gdnt, gdnt_mode = groups, ratio = 50%, gdnt_layer_cap = 0 } }",
                     example_inputs=(cal[:4],), calibration=cal, progress=False)
    fresh = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(fresh)
        assert float((res.model(fresh) - ref).norm() / ref.norm()) < 1e-5
