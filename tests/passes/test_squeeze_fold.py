"""squeeze_fold: exact-rank hidden layers squeeze to r channels and reproduce outputs, per consumer type."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.compiler.calibration import activation_stream, calibration_source
from netsqueeze.errors import NetsqueezeError
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.frontier import Prefixes
from netsqueeze.passes.squeeze_fold import SqueezeFold, ablation


def duplicate_rows(w: torch.Tensor, b: torch.Tensor, r: int, gen: torch.Generator) -> None:
    """Makes every output channel a positive multiple of one of the first r: relu keeps the rank at r."""
    n = w.shape[0]
    src = torch.arange(n) % r
    scale = torch.rand(n, generator=gen) + 0.5
    scale[:r] = 1.0
    with torch.no_grad():
        w.copy_(w[src] * scale.view(-1, *[1] * (w.dim() - 1)))
        b.copy_(b[src] * scale)


def mlp(r: int) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    duplicate_rows(m[0].weight, m[0].bias, r, g)
    return m


def cnn(r: int) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=0), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 6)).eval()
    duplicate_rows(m[0].weight, m[0].bias, r, g)
    duplicate_rows(m[2].weight, m[2].bias, 3, g)
    return m


class ResidualSum(nn.Module):
    """Two producers summed, the sum read by a linear layer directly and by another through a relu."""

    def __init__(self, r: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(10, 16)
        self.fc3, self.fc4 = nn.Linear(16, 5), nn.Linear(16, 5)
        # the same duplication pattern in both producers keeps the sum at rank r
        scale = torch.rand(16, generator=g) + 0.5
        scale[:r] = 1.0
        src = torch.arange(16) % r
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                fc.weight.copy_(fc.weight[src] * scale[:, None])
                fc.bias.copy_(fc.bias[src] * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x)) + torch.relu(self.fc2(x))
        return self.fc3(s) + self.fc4(torch.relu(s))


def depthwise(r: int) -> nn.Module:
    """conv -> relu -> depthwise conv -> relu -> pointwise conv: the depthwise conv passes channels
    through, so the group spans it and the fold goes into the pointwise conv."""
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU(),
                      nn.Conv2d(12, 6, 1)).eval()
    scale = torch.rand(12, generator=g) + 0.5
    scale[:r] = 1.0
    src = torch.arange(12) % r
    with torch.no_grad():  # channel c is scale_c times channel src(c) before and after the depthwise conv
        for conv, s in ((m[0], scale), (m[2], torch.ones(12))):
            conv.weight.copy_(conv.weight[src] * (s.view(-1, 1, 1, 1)))
            conv.bias.copy_(conv.bias[src] * scale)
    return m


CASES = {
    "depthwise_passthrough": (depthwise, (3, 6, 6), 4, {"0": 4, "2": 4}),
    "linear": (mlp, (10,), 4, {"0": 4}),
    "conv_and_flatten_linear": (cnn, (3, 8, 8), 5, {"0": 5, "2": 3}),
    "residual_sum_two_consumers": (lambda r: ResidualSum(r).eval(), (10,), 3, {"fc1": 3, "fc2": 3}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_rank_squeezes_to_r_and_reproduces(case: str) -> None:
    build, shape, r, want = CASES[case]
    torch.manual_seed(0)  # the layers' default init draws from the global generator: same model in any test order
    model = build(r)
    torch.manual_seed(5)
    calib = torch.randn(256, *shape)
    x = torch.randn(32, *shape)
    res = ns.compile(model, [SqueezeFold(energy=1 - 1e-6)], example_inputs=(x[:2],), calibration=calib)
    for nid, k in want.items():
        assert res.graph.node(nid).params["weight"].shape[0] == k
    with torch.no_grad():
        err = float((res.model(x) - model(x)).abs().max())
    assert err < 1e-4
    assert res.report.after.params < res.report.before.params


def test_ratio_and_needs_calibration() -> None:
    model = mlp(4)
    x = torch.randn(4, 10)
    res = ns.compile(model, [SqueezeFold(ratio=0.5)], example_inputs=(x,), calibration=torch.randn(128, 10))
    assert res.graph.node("0").params["weight"].shape == (12, 10)
    assert res.graph.node("2").params["weight"].shape == (5, 12)
    with pytest.raises(ns.PassError, match="this pass needs calibration data"):
        ns.compile(model, [SqueezeFold(ratio=0.5)], example_inputs=(x,))


def test_budget_search_meets_flops_budget() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 6)).eval()  # full rank: energy maps smoothly
    calib = torch.randn(128, 3, 8, 8)
    graph = ns.import_model(model, (calib[:2],))
    before = ns.ir.graph_stats(graph)
    ctx = ns.PassContext(stream_fn=activation_stream(calibration_source(calib)), budget={"flops": 0.5},
                         original=graph.copy())
    ns.run_pipeline(graph, [SqueezeFold()], ctx)
    after = ns.ir.graph_stats(graph)
    assert after.flops <= 0.5 * before.flops
    # the search keeps about as much as the budget allows (one channel is ~3% of the FLOPs here)
    assert after.flops > 0.4 * before.flops


def test_search_measured_says_when_it_cannot_measure() -> None:
    """Outside `compile` there is no output-error measurement: `search = measured` says so and the search runs
    on the unweighted reconstruction errors, as `fast` does without the compiler (the same counts)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 6)).eval()
    calib = torch.randn(128, 3, 8, 8)
    shapes = {}
    for search in ("measured", "fast"):
        graph = ns.import_model(model, (calib[:2],))
        ctx = ns.PassContext(stream_fn=activation_stream(calibration_source(calib)), budget={"flops": 0.5},
                             original=graph.copy())
        res = ns.run_pipeline(graph, [SqueezeFold(search=search)], ctx)  # type: ignore[arg-type]
        shapes[search] = tuple(graph.node(n).params["weight"].shape[0] for n in ("0", "2"))
        if search == "measured":
            line = next(n for r in res.records for n in r.result.notes if n.startswith("search"))
            assert line.endswith("(no output-error curves: this compile cannot measure the output error; "
                                 "reconstruction errors unweighted)")
    assert shapes["measured"] == shapes["fast"]


def test_search_without_budget_is_an_error() -> None:
    model = mlp(4)
    x = torch.randn(4, 10)
    with pytest.raises(ns.PassError, match="squeeze_fold needs `energy`, `ratio`, a flops/params/bytes `budget` or a `guard`"):
        ns.compile(model, [SqueezeFold()], example_inputs=(x,), calibration=torch.randn(64, 10))


@pytest.mark.parametrize("name", ["resnet", "vgg", "lenet", "mobilenetv2", "transformer", "densenet"])
def test_zoo_models_squeeze_and_still_verify(name: str) -> None:
    from tests.zoo import ZOO

    if name not in ZOO:
        pytest.skip(f"zoo has no {name}")
    model, inputs = ZOO[name]()
    torch.manual_seed(0)
    calib = torch.randn(64, *inputs[0].shape[1:]) if inputs[0].is_floating_point() else inputs[0]
    res = ns.compile(model, [SqueezeFold(energy=0.9)], example_inputs=inputs, calibration=calib)
    res.graph.verify()
    assert res.report.after.params <= res.report.before.params
    with torch.no_grad():
        out = res.model(*inputs)
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()


def test_onnx_input_squeezes_and_runs_in_onnxruntime() -> None:
    import numpy as np
    import onnxruntime as ort

    from netsqueeze.backends.onnx import to_onnx

    model = cnn(5)
    torch.manual_seed(7)
    calib = torch.randn(256, 3, 8, 8)
    onnx_model = to_onnx(ns.import_model(model, (calib[:2],)))
    res = ns.compile(onnx_model, [SqueezeFold(energy=1 - 1e-6)], calibration=calib, target="onnx")
    convs = [n for n in res.graph.nodes() if n.kind == "conv"]
    assert [n.params["weight"].shape[0] for n in convs] == [5, 3]
    x = torch.randn(16, 3, 8, 8)
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_cascade_is_at_least_as_faithful_as_parallel() -> None:
    from tests.zoo import ZOO

    model, inputs = ZOO["vgg"]()
    torch.manual_seed(3)
    calib = torch.randn(256, *inputs[0].shape[1:])
    err = {}
    for mode in ("parallel", "cascade"):
        res = ns.compile(model, [SqueezeFold(ratio=0.4, mode=mode)], example_inputs=inputs, calibration=calib)
        err[mode] = res.report.fidelity["output_error"]
    assert 0 < err["cascade"] <= err["parallel"] * 1.05


def _guard_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    return m, torch.randn(256, 10, generator=torch.Generator().manual_seed(1))


def _guarded(stmts: str) -> str:
    return f"policy p {{\n  {stmts}\n  squeeze_fold on type(linear) except last(type(linear))\n}}\n"


def test_search_with_guard_finds_the_smallest_model_within_it() -> None:
    model, calib = _guard_model()
    res = {lim: ns.compile(model, _guarded(f"guard output error <= {lim}%"), example_inputs=(calib[:2],),
                           calibration=calib) for lim in (2, 10)}
    before = res[2].report.before.params
    assert before == 1573
    for lim, r in res.items():
        assert r.report.fidelity["output_error"] <= lim / 100
        # the search stops close to the limit: the guard is what bounds the squeeze
        assert r.report.fidelity["output_error"] >= 0.5 * lim / 100
    assert res[10].report.after.params < res[2].report.after.params < before


def test_search_with_budget_and_guard_squeezes_past_the_budget_while_the_guard_holds() -> None:
    model, calib = _guard_model()
    plain = ns.compile(model, _guarded("budget params <= 50%"), example_inputs=(calib[:2],), calibration=calib)
    guarded = ns.compile(model, _guarded("budget params <= 50%\n  guard output error <= 25%"),
                         example_inputs=(calib[:2],), calibration=calib)
    assert plain.report.after.params <= 0.5 * plain.report.before.params
    assert guarded.report.after.params < plain.report.after.params
    assert plain.report.fidelity["output_error"] < guarded.report.fidelity["output_error"] <= 0.25


def test_guard_unreachable_within_budget_is_a_located_error() -> None:
    model, calib = _guard_model()
    with pytest.raises(ns.BudgetError) as e:
        ns.compile(model, _guarded("budget params <= 30%\n  guard output error <= 0.5%"), example_inputs=(calib[:2],),
                   calibration=calib)
    assert str(e.value).startswith(
        "<policy>:4:3: error: pass 'squeeze_fold' (<policy>:4) failed: squeeze_fold cannot meet guard output error "
        "<= 0.50% within the budget params <= 30.0%: the least squeezed candidate reaches ")
    assert "(node '0')\n    squeeze_fold on type(linear) except last(type(linear))\n    ^~~~" in str(e.value)


def test_search_with_top1_guard_uses_eval_fn() -> None:
    model, calib = _guard_model()
    labels = model(calib).argmax(1)
    calls: list[float] = []

    def top1(m: nn.Module) -> float:
        with torch.no_grad():
            acc = float((m(calib).argmax(1) == labels).double().mean())
        calls.append(acc)
        return acc

    res = ns.compile(model, _guarded("guard top1 drop <= 5%"), example_inputs=(calib[:2],), calibration=calib,
                     eval_fn=top1)
    assert len(calls) > 4  # the search measured its candidates through eval_fn
    assert res.report.fidelity["top1_drop"] <= 0.05
    assert res.report.after.params < res.report.before.params


def test_full_block_fit_is_at_least_as_faithful_as_shared_on_flatten_linear() -> None:
    """block_fit = full reconstructs each removed (channel, position) feature from every kept feature,
    a superset of the shared per-position map: on the calibration data its error can only be lower."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 6)).eval()
    calib = torch.randn(512, 3, 6, 6)
    err = {}
    for fit in ("full", "shared"):
        with ablation(block_fit=fit):
            res = ns.compile(model, [SqueezeFold(ratio=0.5, mode="parallel", refit="fold")], example_inputs=(calib[:2],),
                             calibration=calib)
        assert res.graph.node("0").params["weight"].shape == (6, 3, 3, 3)
        assert res.graph.node("3").params["weight"].shape == (6, 6 * 16)
        err[fit] = res.report.fidelity["output_error"]
    assert err["full"] < 0.8 * err["shared"]


def grouped(r: int) -> nn.Module:
    """conv(3→8) -> relu -> conv(8→8, groups=2): in each conv group, slot c is a positive multiple
    of slot c % r, so keeping r slots in every group reconstructs the grouped conv's input exactly."""
    g = torch.Generator().manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 2 * 2, 4)).eval()
    src = torch.tensor([gam * 4 + c % r for gam in range(2) for c in range(4)])
    scale = (torch.rand(4, generator=g) + 0.5).repeat(2)  # the same per slot in both groups: ranks pool
    scale[src == torch.arange(8)] = 1.0
    with torch.no_grad():
        m[0].weight.copy_(m[0].weight[src] * scale.view(-1, 1, 1, 1))
        m[0].bias.copy_(m[0].bias[src] * scale)
    return m


@pytest.mark.parametrize("mode", ["cascade", "parallel"])
def test_grouped_conv_consumer_folds_per_conv_group(mode: str) -> None:
    """A grouped conv reads its channels through weight slots shared by its conv groups: the slot is
    removed in every group and each group's inputs are rebuilt from its own kept slots (T per group),
    so the group structure stays and the outputs are reproduced."""
    model = grouped(2)
    torch.manual_seed(9)
    calib = torch.randn(256, 3, 6, 6)
    x = torch.randn(32, 3, 6, 6)
    res = ns.compile(model, [SqueezeFold(energy=1 - 1e-6, mode=mode)],  # type: ignore[arg-type]
                     example_inputs=(x[:2],), calibration=calib)
    assert res.graph.node("0").params["weight"].shape == (4, 3, 3, 3)
    assert res.graph.node("2").params["weight"].shape[:2] == (8, 2)
    assert res.graph.node("2").attrs["groups"] == 2
    with torch.no_grad():
        assert float((res.model(x) - model(x)).abs().max()) < 1e-4


class TwoBranches(nn.Module):
    """Two identical-looking branches; the first reaches the output scaled by 0.01."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.a1, self.a2 = nn.Linear(10, 24), nn.Linear(24, 5)
        self.b1, self.b2 = nn.Linear(10, 24), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.01 * self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


@pytest.mark.parametrize("sensitivity", ["output", "curve", "first_order"])
def test_search_weights_groups_by_their_effect_on_the_outputs(sensitivity: str) -> None:
    model = TwoBranches().eval()
    calib = torch.randn(512, 10, generator=torch.Generator().manual_seed(3))
    text = "policy p {\n  budget params <= 50%\n  squeeze_fold on a1 | b1\n}\n"
    res = {}
    for s in (sensitivity, "none"):
        with ablation(sensitivity=s):
            res[s] = ns.compile(model, text, example_inputs=(calib[:2],), calibration=calib)
    kept = {s: (r.graph.node("a1").params["weight"].shape[0], r.graph.node("b1").params["weight"].shape[0])
            for s, r in res.items()}
    # blind to the 0.01, `none` splits the budget evenly; measured sensitivity spends it on branch b
    assert abs(kept["none"][0] - kept["none"][1]) <= 4, kept
    assert kept[sensitivity][0] <= 3 and kept[sensitivity][1] >= 20, kept
    assert res[sensitivity].report.fidelity["output_error"] < 0.5 * res["none"].report.fidelity["output_error"]
    for r in res.values():
        assert r.report.after.params <= 0.5 * r.report.before.params


def test_the_first_order_estimate_runs_backward_in_the_statistics_pass() -> None:
    # the gradients come from the forward pass that collects the statistics: no pass of its own, the same
    # passes as a search that weighs nothing (and the original's outputs kept from that pass all the same)
    from tests.zoo import ZOO

    model, inputs = ZOO["vgg"]()
    calib = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    text = "policy p {\n  calibrate samples 64, batch 16\n  budget flops <= 60%\n  squeeze_fold\n}\n"
    res = {}
    for s in ("first_order", "none"):
        with ablation(sensitivity=s):
            res[s] = ns.compile(model, text, example_inputs=inputs, calibration=calib, progress=False)
    notes = next(r for r in res["first_order"].report.passes if r.name == "squeeze_fold").result.notes
    assert any("after a first-order estimate of every group's output error" in n for n in notes)
    # (the refit's share of the model differs by 3e-6 with the counts)
    assert res["first_order"].report.calibration_passes == pytest.approx(res["none"].report.calibration_passes,
                                                                         abs=1e-3)
    # statistics 1 (which also records the layer refit's targets: `refit.Recorder`), the refit's run of the squeezed
    # graph 1; the final measurement reads that run (3.0 when the refit ran the pass-start graph beside it)
    assert res["none"].report.calibration_passes == pytest.approx(2.0, abs=1e-2)
    counts = {s: [n.params["weight"].shape[0] for n in r.graph.nodes() if n.kind == "conv"] for s, r in res.items()}
    assert counts["first_order"] != counts["none"]  # the estimate moved the allocation


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b, self.c = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize(("samples", "share", "weighting"), [
    (1024, 0.25, "after weighting groups by measured output sensitivity"),
    (256, 1.0, "after a first-order estimate of every group's output error")])
def test_auto_measures_output_sensitivity_only_within_its_pass_budget_and_the_default_estimates(
        samples: int, share: float, weighting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # measuring costs at most, over the 256 sensitivity samples, one run up to the last group's producer and two
    # runs of each group's candidate from its producer on: 0.944 passes on 1,024 samples (measured), 3.776 on 256
    # (over 3); a candidate whose prefix `Prefixes` does not keep (over its memory limit, or without a layer-by-layer
    # runner) runs whole; what the measurements cost in fact stays under the bound
    from netsqueeze.ir.stats import graph_stats

    model = Chain().eval()
    x = torch.randn(samples, 10, generator=torch.Generator().manual_seed(2))
    graph = ns.import_model(model, (x[:2],))
    flops = {n.id: n.flops for n in graph_stats(graph).nodes.values()}
    topo = graph.topo_order()
    after = {nid: sum(flops[m] for m in topo[i:]) for i, nid in enumerate(topo)}
    total = after[topo[0]]
    expected = share * ((total - after["b"]) + 2 * (after["a"] + after["b"])) / total
    groups = find_groups(graph)
    gids = [g.id for g in groups if g.producers in (("a",), ("b",))]
    assert len(gids) == 2

    def batches() -> Iterator[tuple[torch.Tensor]]:
        return iter([(x[i : i + 256],) for i in range(0, samples, 256)])

    ctx = PassContext(batches_fn=batches)  # no layer-by-layer runner: every candidate runs whole
    assert SqueezeFold()._measure_cost(graph, groups, gids, ctx) == pytest.approx(share * 4, rel=1e-12)
    ctx = PassContext(batches_fn=batches, segment_fn=lambda *_: lambda tensors: [])
    assert SqueezeFold()._measure_cost(graph, groups, gids, ctx) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.944 if samples == 1024 else 3.776, abs=1e-3)
    # b's prefix keeps relu(a(x)) over the 256 sensitivity samples (a's starts at the input: it runs whole)
    monkeypatch.setattr(Prefixes, "limit_bytes", 256 * 32 * 4)
    assert SqueezeFold()._measure_cost(graph, groups, gids, ctx) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(Prefixes, "limit_bytes", 256 * 32 * 4 - 1)  # no prefix kept: four whole runs
    assert SqueezeFold()._measure_cost(graph, groups, gids, ctx) == pytest.approx(share * 4, rel=1e-12)
    monkeypatch.undo()
    text = f"policy p {{\n  calibrate samples {samples}, batch 256\n  budget params <= 60%\n  squeeze_fold\n}}\n"
    with ablation(sensitivity="auto"):
        res = ns.compile(model, text, example_inputs=(x[:2],), calibration=x, progress=False)
    notes = next(r for r in res.report.passes if r.name == "squeeze_fold").result.notes
    assert any(weighting in n for n in notes), notes
    # the default estimates, whatever measuring would cost
    res = ns.compile(model, text, example_inputs=(x[:2],), calibration=x, progress=False)
    notes = next(r for r in res.report.passes if r.name == "squeeze_fold").result.notes
    assert any("after a first-order estimate of every group's output error" in n for n in notes), notes
    passes = {}
    for s in ("output", "none"):
        with ablation(sensitivity=s):
            passes[s] = ns.compile(model, text, example_inputs=(x[:2],), calibration=x,
                                   progress=False).report.calibration_passes
    assert 0 < passes["output"] - passes["none"] <= expected


def test_the_first_order_estimate_needs_a_float_output_and_a_budget_before_any_pass() -> None:
    # an argmax-only model has nothing to project: the estimate is skipped, not a crash ("stack expects a
    # non-empty TensorList"); without a budget or guard the error comes before the statistics pass
    class ArgMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(10, 32), nn.Linear(32, 24), nn.Linear(24, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x))))).argmax(1)

    torch.manual_seed(0)
    model = ArgMax().eval()
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    head = "policy p {\n  calibrate samples 64, batch 16\n"
    with ablation(sensitivity="first_order"):
        res = ns.compile(model, head + "  budget params <= 60%\n  squeeze_fold\n}\n", example_inputs=(x[:2],),
                         calibration=x, progress=False)
        assert res.report.after.params <= 0.6 * res.report.before.params
        notes = next(r for r in res.report.passes if r.name == "squeeze_fold").result.notes
        assert not any("first-order" in n for n in notes)
        with pytest.raises(NetsqueezeError) as e:
            ns.compile(model, head + "  squeeze_fold\n}\n", example_inputs=(x[:2],), calibration=x, progress=False)
    assert str(e.value).splitlines()[0] == (
        "<policy>:3:3: error: pass 'squeeze_fold' (<policy>:3) failed: squeeze_fold needs `energy`, `ratio`, a "
        "flops/params/bytes `budget` or a `guard`")


def test_the_first_order_statistics_pass_names_a_bad_batch() -> None:
    # it reads the batches itself (no stream): each is checked as it is read
    from tests.zoo import ZOO

    model, inputs = ZOO["vgg"]()
    calib = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    calib[40, 0, 0, 0] = float("nan")
    text = "policy p {\n  calibrate samples 64, batch 16\n  budget flops <= 60%\n  squeeze_fold\n}\n"
    with ablation(sensitivity="first_order"), pytest.raises(NetsqueezeError) as e:
        ns.compile(model, text, example_inputs=inputs, calibration=calib, progress=False)
    assert str(e.value).splitlines()[0] == (
        "<policy>:4:3: error: pass 'squeeze_fold' (<policy>:4) failed: calibration batch 2: input 'x' contains NaN "
        "(1 of 12288 values)")


@pytest.mark.parametrize(("batch", "points"), [(32, "32 points on 352"), (512, "22 points on 512")])
def test_search_measured_takes_output_error_curves_within_the_measurement_passes(batch: int, points: str) -> None:
    """`search = measured` measures every group's output-error curve within 24 model passes: in batches of 32,
    16 counts per group on the leading 11 batches (33 measurements of 11/16 of a pass: 22.7 passes); in one
    batch of 512, 11 counts per group (23 measurements of the whole batch; 12 counts would make 25). Either
    way at most 24 passes more than the search without any sensitivity, and the budget goes to the branch
    that reaches the outputs."""
    model = TwoBranches().eval()
    calib = torch.randn(512, 10, generator=torch.Generator().manual_seed(3))
    head = f"policy p {{\n  calibrate samples 512, batch {batch}\n  budget params <= 50%\n  squeeze_fold on a1 | b1"
    measured = ns.compile(model, head + " { search = measured }\n}\n", example_inputs=(calib[:2],), calibration=calib,
                          progress=False)
    with ablation(sensitivity="none"):
        blind = ns.compile(model, head + "\n}\n", example_inputs=(calib[:2],), calibration=calib, progress=False)
    notes = next(r for r in measured.report.passes if r.name == "squeeze_fold").result.notes
    assert any(f"after measuring output-error curves ({points} calibration samples)" in n for n in notes)
    assert measured.report.calibration_passes <= blind.report.calibration_passes + 24
    assert measured.graph.node("a1").params["weight"].shape[0] == 1
    assert measured.graph.node("b1").params["weight"].shape[0] == 22
    assert measured.report.after.params <= 0.5 * measured.report.before.params


@pytest.mark.parametrize("options, message", [
    ("energy = 99%, search = measured", "search = measured weighs the groups when a budget or guard sets the kept "
     "counts; with `energy` they are fixed: give one of them"),
    ("energy = 99%, ratio = 50%", "give `energy` or `ratio`, not both: `ratio` fixes every group's count and "
     "`energy` would do nothing"),  # ratio won silently before
], ids=["measured_energy", "energy_ratio"])
def test_options_that_fix_the_counts_twice_are_policy_errors_at_the_option(options: str, message: str) -> None:
    model = TwoBranches().eval()
    calib = torch.randn(64, 10, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ns.PolicyError) as e:  # before any pass runs: `netsqueeze check` finds it too
        ns.compile(model, f"policy p {{\n  squeeze_fold {{ {options} }}\n}}\n",
                   example_inputs=(calib[:2],), calibration=calib, progress=False)
    assert str(e.value).splitlines()[0] == f"<policy>:2:32: error: pass 'squeeze_fold': {message}"
    with pytest.raises(NetsqueezeError) as f:  # a pass built from Python is refused when it runs
        kw = dict(energy=0.99, search="measured") if "search" in options else dict(energy=0.99, ratio=0.5)
        ns.compile(model, [SqueezeFold(**kw)], example_inputs=(calib[:2],), calibration=calib, progress=False)
    assert f"squeeze_fold: {message}" in str(f.value)


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_layer_by_layer_cascade_equals_streaming_each_group_whole(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cascade run layer by layer over the data (checkpointed frontier) fits the same folds as
    streaming both graphs whole once per group, at a fraction of the model passes."""
    import netsqueeze.passes.squeeze_fold as sf
    from tests.zoo import ZOO

    model, inputs = ZOO[name]()
    calib = torch.randn(96, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(4))
    step = [SqueezeFold(ratio=0.4, mode="cascade", refit="fold")]
    layered = ns.compile(model, step, example_inputs=inputs, calibration=calib, progress=False)
    monkeypatch.setattr(sf._Frontier, "limit_bytes", 0)  # no checkpoint fits: every group streams
    capped = ns.compile(model, step, example_inputs=inputs, calibration=calib, progress=False)
    notes = next(r for r in capped.report.passes if r.name == "squeeze_fold").result.notes
    assert any("streamed both graphs whole" in n for n in notes)
    monkeypatch.setattr(sf._Frontier, "open", staticmethod(lambda *a, **k: None))
    streamed = ns.compile(model, step, example_inputs=inputs, calibration=calib, progress=False)
    x = torch.randn(8, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b, c = layered.model(x), streamed.model(x), capped.model(x)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    assert (c - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    assert layered.report.params_ratio == streamed.report.params_ratio
    groups = len(next(r for r in streamed.report.passes if r.name == "squeeze_fold").result.notes[-1].split(","))
    # streaming: one pass to collect, two per group, one for the output error (the original's outputs come from
    # the collecting pass); layer by layer: far fewer
    assert streamed.report.calibration_passes == pytest.approx(1 + 2 * groups + 1)
    assert layered.report.calibration_passes < 0.6 * streamed.report.calibration_passes


def test_cascade_runs_the_pass_start_copy_once_over_a_chain() -> None:
    """Layer by layer, the pass-start copy's tensors at the next group's checkpoint come out of the run that
    fetched this group's consumer inputs, so moving the checkpoint runs only the graph being squeezed."""
    from tests.passes.graphs import relu_mlp

    model = relu_mlp(6)
    x = torch.randn(512, 16)
    res = ns.compile(model, [SqueezeFold(ratio=0.5, refit="fold")], example_inputs=(x[:2],), calibration=x,
                     progress=False)
    assert res.report.passes[0].result.notes[-1] == "squeezed 6 groups (cascade): " + ", ".join(["32->16"] * 6)
    # one pass to collect, one for the output error, the squeezed graph's share, and the pass-start copy once
    # up to the last consumer's input (5.13 when moving the checkpoint ran the copy a second time)
    assert res.report.calibration_passes == pytest.approx(4.33, abs=0.01)


@dataclasses.dataclass(frozen=True)
class _PrefixProbe(ns.TransformPass):
    """Measures every prunable group's half-width candidate twice: whole, and from the live tensors at the
    group's first node (`frontier.Prefixes`, every position kept by one run); records both in `seen`."""

    name: ClassVar[str] = "prefix_probe"
    seen: list[tuple[float, float]] = dataclasses.field(default_factory=list, compare=False)
    from_prefix: list[bool] = dataclasses.field(default_factory=list, compare=False)

    def run(self, graph: ns.Graph, ctx: ns.PassContext) -> ns.PassResult:
        from netsqueeze.passes.dependency import DependencyAnalysis
        from netsqueeze.passes.frontier import Prefixes, first_positions
        from netsqueeze.passes.rewrite import ChannelSelection, apply_selection

        groups = ctx.analysis(DependencyAnalysis, graph)
        start = first_positions(graph.topo_order(), groups.prunable())
        prefixes = Prefixes(graph, ctx, start.values(), 2)
        for g in groups.prunable():
            cand = graph.copy()
            apply_selection(cand, groups, {g.id: ChannelSelection(keep=list(range(max(1, g.size // 2))))})
            feeds = prefixes.feeds(start[g.id])
            whole = ctx.fidelity(cand, "output_error", 2)
            part = ctx.fidelity(cand, "output_error", 2, feeds) if feeds is not None else whole
            self.seen.append((float(whole or 0.0), float(part or 0.0)))
            self.from_prefix.append(feeds is not None)
        return ns.PassResult()


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_a_candidate_measured_from_its_prefix_has_the_whole_runs_output_error(name: str) -> None:
    from tests.zoo import ZOO

    model, inputs = ZOO[name]()
    calib = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(4))
    probe = _PrefixProbe()
    ns.compile(model, [probe], example_inputs=inputs, calibration=calib, progress=False)
    # most candidates change the outputs and run from a prefix (not the first group: only the inputs are live)
    assert sum(w > 1e-4 and p for (w, _), p in zip(probe.seen, probe.from_prefix)) >= 3
    for whole, part in probe.seen:
        assert part == pytest.approx(whole, rel=1e-5)


class _ConcatIntoGroups(torch.nn.Module):
    """6 + 4 channels concatenated into a conv of 2 groups (5 channels each): the 6-channel part spans both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 4, 1)
        self.c = torch.nn.Conv2d(10, 8, 3, padding=1, groups=2)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def test_concat_parts_across_conv_groups_are_left_alone_with_a_note() -> None:
    import netsqueeze as ns

    m = _ConcatIntoGroups().eval()
    cal = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = ns.compile(m, "policy p { squeeze_fold { ratio = 50% } }", example_inputs=(cal[:4],), calibration=cal,
                     progress=False)
    notes = [n for p in res.report.passes for n in p.result.notes]
    assert any(n.endswith("grouped conv 'c' reads its channels across conv-group boundaries; left alone")
               for n in notes)
    shapes = {n: tuple(mod.weight.shape) for n, mod in res.model.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    assert shapes == {"a": (6, 1, 3, 3), "b": (4, 1, 1, 1), "c": (4, 5, 3, 3)}  # c's own output group squeezed


def test_the_search_line_says_what_it_met_the_budget_at_after_the_weighting() -> None:
    """The line gave the Lagrange t of the first, unweighted search as "t = ..." before the first-order weighting
    moved it; it now gives the final one, as the price λ of a unit of budget (uniform allocation: the energy)."""
    import re

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    calib = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    lines = []
    for kw in ({}, {"allocation": "uniform"}):
        with ablation(**kw):
            res = ns.compile(model, "policy p { calibrate samples 512, batch 64\n budget params <= 50%\n squeeze_fold }",
                             example_inputs=(calib[:2],), calibration=calib, progress=False)
        lines += [n for p in res.report.passes for n in p.result.notes if n.startswith("search")]
    assert re.fullmatch(r"search \(lagrange\): budget met at λ = 10\^-?[0-9.]+ \(error per unit of budget\) after a "
                        r"first-order estimate of every group's output error \(a backward pass in the statistics "
                        r"pass\)", lines[0])
    assert lines[1] == "search (uniform): budget met at energy 0.912"
