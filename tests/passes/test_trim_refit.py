"""`trim`'s allocation (global measured ranking, uniform ratio), least-squares refit of the consumers, their
option errors, and BatchNorm kept unfolded for fine-tuning (torch and ONNX emission)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from netsqueeze.errors import BudgetError, NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.trim import Trim, ranking
from tests.passes.graphs import bn as bn_node
from tests.passes.graphs import cnn, conv, input_batches, linear, mlp, run, stream_ctx


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _err(g: Graph, ref: Graph, batches: Sequence[Sequence[torch.Tensor]]) -> float:
    """Relative L2 error of `g`'s outputs against `ref`'s over `batches`."""
    num = den = 0.0
    for b in batches:
        y, y0 = run(g, b)[0], run(ref, b)[0]
        num += float(((y - y0) ** 2).sum())
        den += float((y0**2).sum())
    return (num / den) ** 0.5


def _fidelity(ref: Graph, batches: list[list[torch.Tensor]]):  # type: ignore[no-untyped-def]
    return lambda graph, metric="output_error": _err(graph, ref, batches)


# ---- allocation = uniform ----
def test_uniform_removes_one_ratio_from_every_group() -> None:
    """mlp params: 11·k1 + k1·k2 + 4·k2 + 3 (419 whole). The smallest ratio r with ⌊16r⌋, ⌊12r⌋ removed that
    keeps ≤ 50% is 7/16: k1 = 9, k2 = 12 − ⌊5.25⌋ = 7, 193 params (46.06%); at r = 5/12 (k1 = 10, k2 = 7) 211 > 209.5."""
    g = mlp()
    res = Trim(allocation="uniform").run(g, PassContext(budget={"params": 0.5}))
    assert g.node("fc1").params["weight"].shape == (9, 10)
    assert g.node("fc2").params["weight"].shape == (7, 9)
    assert graph_stats(g).params == 193
    assert res.notes[1].startswith("allocation = uniform: ratio 43.75% of every group's channels removed, the "
                                   "smallest that meets the budget params <= 50.0% (flops ")
    g2 = mlp()
    Trim(allocation="uniform").run(g2, PassContext(budget={"params": 0.3}))  # r = 10/16: k1 = 6, k2 = 5
    assert (g2.node("fc1").params["weight"].shape[0], g2.node("fc2").params["weight"].shape[0]) == (6, 5)
    assert graph_stats(g2).params == 119
    with pytest.raises(BudgetError) as e:
        Trim(allocation="uniform", min_channels=4).run(mlp(), PassContext(budget={"params": 0.05}))
    assert e.value.message == ("trim cannot meet the budget params <= 5.0%: removing 99.9% of every group's channels "
                               "(allocation = uniform) reaches flops 18.6%, params 18.9% of the original; the most "
                               "of its params is at 'fc1' (10.5% of the original params, cut to its minimum), 'fc2' "
                               "(4.8%, cut to its minimum), 'fc3' (3.6%, cut to its minimum)")  # k1 = k2 = 4: 79 params


def test_uniform_says_when_the_bounds_steps_force_it_far_under_the_budget() -> None:
    """round_to = 8: fc1 keeps 16 or 8, fc2 12 or 8. Under params <= 70% the uniform ratios below 50% keep
    (16, 8), 339 params (80.9%), and 50% keeps (8, 8): 187 (44.6%), under 90% of the limit: the note says why."""
    g = mlp()
    res = Trim(allocation="uniform", round_to=8).run(g, PassContext(budget={"params": 0.7}))
    assert graph_stats(g).params == 187
    assert res.notes[1] == (
        "allocation = uniform: ratio 50.00% of every group's channels removed, the smallest that meets the budget "
        "params <= 70.0% (flops 44.4%, params 44.6% of the original); the counts the bounds allow change in coarse "
        "steps: the step before removes less and reaches flops 80.8%, params 80.9%, over the budget "
        "(`allocation = global` lands closer)")


# ---- refit = least_squares ----
def _dependent_mlp() -> Graph:
    """fc1's channels 8..15 are 0.5× channels 0..7 (so after relu too), and fc2 reads them weakly: l1 removes them,
    and the kept channels rebuild them exactly."""
    g = mlp()
    p = g.node("fc1").params
    p["weight"][8:] = 0.5 * p["weight"][:8]
    p["bias"][8:] = 0.5 * p["bias"][:8]
    g.node("fc2").params["weight"][:, 8:] *= 0.1
    return g


def test_refit_is_exact_when_removed_channels_are_combinations_of_kept_ones() -> None:
    batches = input_batches(mlp(), n=4)
    out = {}
    for refit in ("least_squares", "none"):
        g, ref = _dependent_mlp(), _dependent_mlp()
        res = Trim(ratio=0.5, refit=refit).run(g, stream_ctx(batches, selected=frozenset({"fc1"})))  # type: ignore[arg-type]
        assert g.node("fc1").params["weight"].shape == (8, 10) and g.node("fc2").params["weight"].shape == (12, 8)
        out[refit] = (_err(g, ref, batches), res)
    assert out["least_squares"][0] < 1e-5  # float32 weights
    assert out["none"][0] > 0.01  # the means alone lose the removed channels' variation
    assert "consumers of 1 trimmed groups refit by least squares, group by group" in out["least_squares"][1].notes


def test_refit_never_worse_than_bias_compensation_at_a_linear_consumer() -> None:
    """fc2's group feeds fc3, the output: least squares minimises the output error over the calibration data, so
    it is at most that of keeping only the removed channels' means (the same channels removed)."""
    batches = input_batches(mlp(), n=4)
    errs = {}
    for refit in ("least_squares", "none"):
        for crit in ("l1", "random"):
            g, ref = mlp(), mlp()
            Trim(criterion=crit, ratio=0.5, refit=refit).run(  # type: ignore[arg-type]
                g, stream_ctx(batches, selected=frozenset({"fc2"})))
            errs[(refit, crit)] = _err(g, ref, batches)
    for crit in ("l1", "random"):
        assert errs[("least_squares", crit)] <= errs[("none", crit)] + 1e-9
        assert errs[("least_squares", crit)] < 0.9 * errs[("none", crit)]


def test_refit_on_residual_concat_grouped_and_flatten_graph() -> None:
    """cnn: a residual add, a concat, a depthwise and a grouped conv, flatten→linear; every group halved."""
    batches = input_batches(cnn(), n=3)
    errs = {}
    for refit in ("least_squares", "none"):
        g, ref = cnn(), cnn()
        before = [gr.size for gr in find_groups(g).prunable()]
        Trim(ratio=0.5, refit=refit).run(g, stream_ctx(batches))  # type: ignore[arg-type]
        g.verify()
        after = [gr.size for gr in find_groups(g).prunable()]
        assert after == [s - s // 2 for s in before] and sum(before) == 11
        errs[refit] = _err(g, ref, batches)
    assert errs["least_squares"] < errs["none"]


# ---- the global ranking ----
def test_measured_ranking_meets_the_budget_with_less_error_than_the_mean_rule() -> None:
    batches = input_batches(mlp(), n=4)
    errs, notes = {}, {}
    for rule in ("measured", "mean"):
        g, ref = mlp(), mlp()
        ctx = stream_ctx(batches, budget={"flops": 0.5}, fidelity_fn=_fidelity(ref, batches))
        with ranking(rule):  # type: ignore[arg-type]
            res = Trim(refit="none").run(g, ctx)
        assert res.metrics["flops_ratio"] <= 0.5
        errs[rule], notes[rule] = _err(g, ref, batches), res.notes
    assert notes["measured"][0].startswith("channels ranked across groups by the measured output loss they add per "
                                           "unit of budget (2 groups measured at ratios ")
    assert errs["measured"] <= errs["mean"]
    # without a way to measure (no calibration data), the mean rule with a note
    res = Trim().run(mlp(), PassContext(budget={"flops": 0.5}))
    assert not any(n.startswith("channels ranked across groups by the measured") for n in res.notes)


def test_measure_batches_bounds_the_measurements_to_a_number_of_passes() -> None:
    sizes = [64] * 6 + [32]
    ctx = PassContext(batches_fn=lambda: iter([(torch.zeros(n, 3),) for n in sizes]))
    assert ctx.measure_batches(5, 8.0) == (None, 416)  # 5 measurements over all the data: 5 passes
    assert ctx.measure_batches(21, 8.0) == (2, 128)  # 21 on 2 of 7 batches: 6 passes
    assert ctx.measure_batches(100, 8.0) == (1, 64)  # never less than one batch
    assert PassContext().measure_batches(21, 8.0) == (None, 0)


def test_trim_loss_measurements_cost_a_bounded_number_of_passes_whatever_the_number_of_groups() -> None:
    import netsqueeze as ns
    from tests.passes.graphs import relu_mlp

    model = relu_mlp(10)
    x = torch.randn(1024, 16)
    policy = ("policy p {\n  calibrate samples 1024, batch 64\n  budget flops <= 50%\n"
              "  trim on type(linear) except last(type(linear))\n}\n")
    res = ns.compile(model, policy, example_inputs=(x[:2],), calibration=x)
    note = res.report.passes[0].result.notes[0]
    # 21 measurements (two per group and the start) on 6 of 16 batches: 7.9 passes, not 21
    assert "(10 groups measured at ratios 31.3% and 62.5% on the first 384 calibration samples;" in note
    # (26.95 measuring on all 1,024 samples and running the original again for the output error; 12.89 when the
    # cascade refit also ran the pass-start copy again to move its checkpoint; 12.12 when every candidate ran
    # from the inputs, not from the tensors live at its group's first layer; 8.98 when l1 also weighed the
    # producer rows, which changed the kept sets and so the prefixes' sizes; 9.11 with the group-by-group fold
    # cascade, before refit = layer re-solved every consumer whole; 9.61 when the layer refit also ran each layer
    # on the rewritten side, whose output it never reads; 8.72 when the final measurement ran the compiled graph
    # again, where it reads the layer refit's run of it; 7.74 when the layer refit ran the pass-start graph beside
    # the trimmed one, where the statistics pass now records its targets)
    assert res.report.calibration_passes == pytest.approx(6.74, abs=0.01)
    assert res.report.fidelity["output_error"] < 1e-3


def _bias_free_chain() -> Graph:
    torch.manual_seed(0)
    g = Graph("chain")
    h = g.add_node("x", "input", attrs={"shape": (2, 3, 8, 8)})
    for i, (ci, co) in enumerate([(3, 8), (8, 8), (8, 8)]):
        h = g.add_node(f"relu{i}", "relu", [bn_node(g, f"bn{i}", conv(g, f"conv{i}", h, ci, co, bias=False), co)])
    f = g.add_node("flat", "flatten", [h], attrs={"start_dim": 1})
    g.add_node("out", "output", [linear(g, "fc", f, 8 * 64, 5)])
    g.infer_shapes()
    return g


@pytest.mark.parametrize("percent", [49, 53, 60, 65, 71, 84])
def test_budget_counts_the_bias_the_refit_gives_consumers_without_one(percent: int) -> None:
    # bias-free convs before BatchNorm: the refit's intercept adds a bias to each; the allocation's meter counted
    # them not, and these budgets ended 0.03-0.26% over (0.4903 at 49%)
    batches = input_batches(_bias_free_chain(), n=4)
    g = _bias_free_chain()
    f0 = graph_stats(g).flops
    res = Trim(criterion="l1", refit="least_squares").run(
        g, stream_ctx(batches, budget={"flops": percent / 100}, batches_fn=lambda: iter(batches)))
    assert graph_stats(g).flops / f0 <= percent / 100
    assert res.metrics["flops_ratio"] <= percent / 100
    assert isinstance(g.node("conv2").params.get("bias"), torch.Tensor)  # a consumer refit with an intercept


# ---- option errors ----
def test_bad_option_combinations_are_errors_naming_a_node() -> None:
    cases = [
        (Trim(ratio=0.5, refit="least_squares"), PassContext(),
         "trim: refit = least_squares fits the consumers on calibration data and this compile has none: pass "
         "calibration=... to compile() (netsqueeze compile: --calib FILE), or set refit = none"),
        (Trim(ratio=0.5, refit="least_squares", bias_compensation=False), stream_ctx(input_batches(mlp(), n=1)),
         "trim: refit = least_squares refits the consumers' biases (the intercept): it contradicts "
         "bias_compensation = false"),
        (Trim(ratio=0.5, allocation="uniform"), PassContext(),
         "trim: allocation = uniform spreads a flops/params/bytes budget over the groups; with a `ratio` every "
         "group loses that ratio already: give one of them"),
        (Trim(criterion="gdnt", gdnt_mode="groups", ratio=0.5, refit="least_squares"), PassContext(),
         "trim: refit = least_squares fits the consumers on calibration data and this compile has none: pass "
         "calibration=... to compile() (netsqueeze compile: --calib FILE), or set refit = none"),
    ]
    for p, ctx, msg in cases:
        with pytest.raises(NetsqueezeError) as e:
            p.run(mlp(), ctx)
        assert e.value.message == msg
        assert e.value.diagnostics[0].node == "fc1"
    with pytest.raises(NetsqueezeError) as e:
        Trim(refit="always")  # type: ignore[arg-type]
    assert "option 'refit' of pass 'trim'" in e.value.message


# ---- BatchNorm kept for fine-tuning ----
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))  # a residual stream: conv1, bn1, conv3, bn3
        h = torch.relu(self.bn2(self.conv2(a)))  # a plain group: conv2, bn2
        return self.fc(torch.relu(self.bn3(self.conv3(h)) + a).mean((2, 3)))


def test_trim_without_fold_bn_emits_trimmed_batchnorms_that_reestimate() -> None:
    import netsqueeze as ns
    from netsqueeze.backends.onnx import to_onnx

    torch.manual_seed(0)
    net = _Net()
    for bn in (net.bn1, net.bn2, net.bn3):  # non-trivial statistics and affine params
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def compile_(steps: str) -> ns.CompileResult:
        return ns.compile(net, f"policy p {{\n  calibrate samples 32\n{steps}\n}}\n", example_inputs=(x[:2],),
                          calibration=x)

    kept = compile_("  trim { ratio = 25% }")
    folded = compile_("  trim { ratio = 25% }\n  fold_bn")
    bns = {n: m for n, m in kept.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert sorted((n, m.num_features) for n, m in bns.items()) == [("bn1", 12), ("bn2", 12), ("bn3", 12)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    torch.testing.assert_close(kept.model(x), folded.model(x), atol=1e-5, rtol=0)
    kinds = [n.op_type for n in to_onnx(kept.graph).graph.node]
    assert kinds.count("BatchNormalization") == 3
    # re-estimation: reset, cumulative average (momentum None), one train-mode pass gives the batch statistics
    seen: dict[str, torch.Tensor] = {}
    bn1 = bns["bn1"]
    bn1.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0].detach()))
    before = bn1.running_mean.clone()
    bn1.reset_running_stats()
    bn1.momentum = None
    kept.model.train()
    kept.model(x)
    kept.model.eval()
    assert not torch.allclose(bn1.running_mean, before)
    torch.testing.assert_close(bn1.running_mean, seen["in"].mean((0, 2, 3)), atol=1e-5, rtol=0)
    assert int(bn1.num_batches_tracked) == 1
    assert not any(k.endswith("num_batches_tracked") for k in kept.model.state_dict())  # the IR's params only


def test_global_ranking_trusts_a_loss_fit_only_as_deep_as_it_was_measured() -> None:
    """A group whose two measurements removed 2 of its 8 channels at almost no loss is cut 2 deep, not 4: the
    fit is not extrapolated while channels within another group's measured range can meet the budget; past
    every measured range it is (a budget the measured cuts cannot meet is still met)."""
    from types import SimpleNamespace
    from typing import Any

    from netsqueeze.passes.allocation import Budget, GroupBounds

    groups: list[Any] = [SimpleNamespace(id=i, size=8, producers=[f"g{i}"]) for i in (0, 1)]
    bounds = {i: GroupBounds(8, 1, 1) for i in (0, 1)}
    scores = {i: torch.arange(1.0, 9.0) for i in (0, 1)}

    def meter(counts: dict[int, int]) -> tuple[float, float, float]:
        r = sum(counts.get(i, 8) for i in (0, 1)) / 16
        return (r, r, r)

    losses = {0: (1e-6, 1.0, 1.0, 2), 1: (1.0, 1.0, 1.0, 8)}  # (a, p, cost, channels the deeper cut removed)
    kept = Trim()._budget(groups, scores, bounds, Budget({"flops": 0.75}), meter, losses)
    assert {g: sel.keep for g, sel in kept.items()} == {0: [2, 3, 4, 5, 6, 7], 1: [2, 3, 4, 5, 6, 7]}
    losses = {0: (1e-6, 1.0, 1.0, 2), 1: (1.0, 1.0, 1.0, 2)}
    kept = Trim()._budget(groups, scores, bounds, Budget({"flops": 0.5}), meter, losses)
    assert {g: len(sel.keep) for g, sel in kept.items()} == {0: 2, 1: 6}  # beyond both: the fit decides
