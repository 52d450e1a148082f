"""`trim`: criteria, ratio and budget targets, selection, bias compensation, the gdnt estimator, errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from netsqueeze.errors import BudgetError, NetsqueezeError
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.collectors import Moments, Reservoir, channel_rows
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.friedman_rafsky import cross_edges
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection
from netsqueeze.passes.trim import Trim, gdnt_scores
from tests.passes.graphs import attention, cnn, input_batches, mlp, run, stream_ctx


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    """Gradients off inside these tests only (a module-level switch would leak into other test files)."""
    with torch.no_grad():
        yield


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "activation", "random", "gdnt"])
@pytest.mark.parametrize("make", [mlp, cnn, attention])
def test_every_criterion_halves_every_prunable_group(make, criterion: str) -> None:  # type: ignore[no-untyped-def]
    g = make()
    before = {gr.id: gr.size for gr in find_groups(g).prunable()}
    ctx = stream_ctx(input_batches(g, n=3))
    res = Trim(criterion=criterion, ratio=0.5, gdnt_samples=60)  # type: ignore[arg-type]
    out = res.run(g, ctx)
    g.verify()
    assert out.changed
    after = find_groups(g)
    assert sum(gr.size for gr in after.prunable()) == sum(s - s // 2 for s in before.values())
    y = run(g, input_batches(g, n=1)[0])[0]
    assert torch.isfinite(y).all()


def test_l1_removes_the_channels_their_consumers_read_least() -> None:
    """l1 scores a channel by the consumer columns that read it, not by its producer row: fc1's channels
    3, 7, 11 go, read by fc2 with columns scaled down, while channel 0, whose row in fc1 is scaled down as much,
    stays (its scale is what the refit makes up for)."""
    g = mlp()
    fc1, fc2 = g.node("fc1").params, g.node("fc2").params
    fc2["weight"][:, [3, 7, 11]] *= 1e-3
    fc1["weight"][0] *= 1e-3
    rows = fc1["weight"].clone()
    Trim(ratio=3 / 16 + 1e-6, bias_compensation=False).run(g, PassContext(selected=frozenset({"fc1"})))
    kept = [c for c in range(16) if c not in (3, 7, 11)]
    torch.testing.assert_close(g.node("fc1").params["weight"], rows[kept], rtol=0, atol=0)
    assert g.node("fc2").params["weight"].shape == (12, 13)


@pytest.mark.parametrize("stat", ["mean_abs", "variance"])
def test_activation_weighs_a_channel_by_how_strongly_its_consumers_read_it(stat: str) -> None:
    """fc1's channels 3, 7, 11 are as active as before, but fc2 reads them with columns scaled by 1e-3: what
    they carry into fc2 is least, so they go (activation alone would remove other channels)."""
    g = mlp()
    g.node("fc2").params["weight"][:, [3, 7, 11]] *= 1e-3
    rows = g.node("fc1").params["weight"].clone()
    ctx = stream_ctx(input_batches(g, n=3), selected=frozenset({"fc1"}))
    Trim(criterion="activation", activation_stat=stat, ratio=3 / 16 + 1e-6,  # type: ignore[arg-type]
         bias_compensation=False).run(g, ctx)
    kept = [c for c in range(16) if c not in (3, 7, 11)]
    torch.testing.assert_close(g.node("fc1").params["weight"], rows[kept], rtol=0, atol=0)


def test_gdnt_ties_go_to_the_channels_their_consumers_read_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Friedman–Rafsky estimates are counts, so channels tie; a tie keeps the channel whose consumer
    columns are larger (l2)."""
    import netsqueeze.passes.trim as trim_module

    monkeypatch.setattr(trim_module, "gdnt_scores", lambda p, c, k, seed: torch.full((p.shape[1],), 0.25,
                                                                                   dtype=torch.float64))
    g = mlp()
    g.node("fc2").params["weight"][:, :8] *= 0.5  # channels 0..7 read half as strongly
    rows = g.node("fc1").params["weight"].clone()
    ctx = stream_ctx(input_batches(g, n=3), selected=frozenset({"fc1"}))
    Trim(criterion="gdnt", ratio=0.5, gdnt_samples=60, bias_compensation=False).run(g, ctx)
    torch.testing.assert_close(g.node("fc1").params["weight"], rows[8:], rtol=0, atol=0)


def test_selection_restricts_groups() -> None:
    g = mlp()
    Trim(ratio=0.5).run(g, PassContext(selected=frozenset({"fc2"})))
    assert g.node("fc1").params["weight"].shape[0] == 16 and g.node("fc2").params["weight"].shape[0] == 6


def test_round_to_and_min_channels() -> None:
    g = mlp()
    Trim(ratio=0.9, round_to=4, min_channels=3).run(g, PassContext())
    assert g.node("fc1").params["weight"].shape[0] == 4  # 16 → 2 → rounded up to 4
    assert g.node("fc2").params["weight"].shape[0] == 4  # 12 → 2 → 3 (floor) → rounded to 4


def test_flops_budget_met_by_global_ranking() -> None:
    g = cnn()
    f0 = graph_stats(g).flops
    ctx = PassContext(budget={"flops": 0.6})
    res = Trim(criterion="l1").run(g, ctx)
    f1 = graph_stats(g).flops
    assert f1 <= 0.6 * f0 and res.metrics["flops_ratio"] == pytest.approx(f1 / f0)
    assert f1 > 0.4 * f0  # the search stops near the budget, not at the floor


def test_unsatisfiable_budget_states_what_was_reached() -> None:
    g = mlp()
    with pytest.raises(BudgetError) as e:
        Trim().run(g, PassContext(budget={"params": 0.01}))
    assert e.value.diagnostics[0].message == (
        "trim cannot meet the budget params <= 1.0%: removing every removable channel reaches flops 4.2%, "
        "params 4.5% of the original; the most of its params is at 'fc1' (2.6% of the original params, cut to its "
        "minimum), 'fc3' (1.4%, cut to its minimum), 'fc2' (0.5%, cut to its minimum)")
    assert e.value.diagnostics[0].node == "fc1"  # the first of them


def test_an_unsatisfiable_budget_says_when_the_bounds_hold_it_and_what_one_channel_per_group_reaches() -> None:
    with pytest.raises(BudgetError) as e:
        Trim(round_to=8).run(mlp(), PassContext(budget={"params": 0.3}))
    assert e.value.diagnostics[0].message == (
        "trim cannot meet the budget params <= 30.0%: removing every removable channel reaches flops 44.4%, "
        "params 44.6% of the original; its bounds (min_channels, round_to, align) hold it there: one channel per "
        "group would reach flops 4.2%, params 4.5%; the most of its params is at 'fc1' (21.0% of the original "
        "params, cut to its minimum), 'fc2' (17.2%, cut to its minimum), 'fc3' (6.4%, cut to its minimum)")


def test_a_criterion_that_falls_back_to_l1_in_every_group_says_so_once() -> None:
    """The mlp has no norm layer: bn_scale ranks every group by l1, and one note says it (one per group before,
    which a report's pass table cut short)."""
    res = Trim(criterion="bn_scale", ratio=0.25).run(mlp(), PassContext())
    assert [n for n in res.notes if "fell back" in n] == [
        "bn_scale fell back to l1 in every group (2), no norm layer: group(s) 1, 2; bn_scale reads batch/group/layer "
        "norms: put trim before fold_bn"]


def test_bad_options_are_errors_naming_a_node() -> None:
    g = mlp()
    with pytest.raises(NetsqueezeError) as e:  # checked when the pass is built, as the policy checker does
        Trim(ratio=1.0)
    assert e.value.message == "option 'ratio' of pass 'trim' must be between 0 and 0.999 (0% to 99.9%), got '1.0'"
    with pytest.raises(NetsqueezeError, match="needs a `ratio`"):
        Trim().run(g, PassContext())
    with pytest.raises(NetsqueezeError, match="calibration"):
        Trim(ratio=0.5, criterion="activation").run(g, PassContext())


def test_bias_compensation_restores_removed_means() -> None:
    """A hidden layer whose low-variance channels carry large means: compensation keeps the output close."""
    torch.manual_seed(3)
    g = mlp()
    fc1 = g.node("fc1").params
    fc1["weight"][8:] *= 0.01  # channels 8..15 nearly constant …
    fc1["bias"][8:] = 2.0  # … at a large mean
    batches = input_batches(g, n=4)
    ref = [run(g, b)[0] for b in batches]

    def err(comp: bool) -> float:
        h = g.copy()
        Trim(criterion="activation", activation_stat="variance", ratio=0.5, bias_compensation=comp).run(
            h, stream_ctx(batches, selected=frozenset({"fc1"})))
        return max(float((run(h, b)[0] - r).abs().max()) for b, r in zip(batches, ref))

    assert err(True) < 0.05 < err(False)


def test_fr_statistic_and_gdnt_rank_dependent_neurons() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 2))
    assert cross_edges(a, a + 100.0) == 1  # separated clouds: one bridge
    torch.manual_seed(0)
    n = 300
    parents = torch.randn(n, 4, dtype=torch.float64)
    children = torch.stack([parents[:, 0] * 2 + 0.05 * torch.randn(n, dtype=torch.float64),
                            parents[:, 2] - 0.05 * torch.randn(n, dtype=torch.float64)], 1)
    s = gdnt_scores(parents, children, child_groups=2, seed=0)
    assert s[0] > 0.5 and s[2] > 0.5 and s[1] < 0.3 and s[3] < 0.3


def test_collectors_stream_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 5, 3, 3)
    mo = Moments()
    for chunk in x.split(3):
        mo.update(channel_rows(chunk, 1))
    full = channel_rows(x, 1)
    torch.testing.assert_close(mo.mean, full.mean(0))
    torch.testing.assert_close(mo.mean_abs, full.abs().mean(0))
    torch.testing.assert_close(mo.var, full.var(0, unbiased=False))
    assert channel_rows(x, 1, spatial_mean=True).shape == (7, 5)
    res = Reservoir(10, seed=0)
    for chunk in torch.arange(1000.0).reshape(-1, 1).split(37):
        res.update(chunk)
    sample = res.sample()
    assert sample.shape == (10, 1) and len(set(sample.flatten().tolist())) == 10 and sample.max() > 100


# ---- acceptance on the zoo (torch frontend and backend) ----
ZOO_NAMES = ["mlp", "lenet", "vgg", "resnet", "densenet", "mobilenetv2", "transformer", "unknown_op"]


def _torch_runner(graph, inputs, values):  # type: ignore[no-untyped-def]
    from netsqueeze.backends.torch import to_torch

    out = to_torch(graph, extra_outputs=values)(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_half_trim_is_exact_on_zeroed_channels(name: str) -> None:
    from netsqueeze.backends.torch import to_torch
    from netsqueeze.frontends.fx import from_torch
    from tests.passes.graphs import zero_channels
    from tests.zoo import ZOO

    model, x = ZOO[name]()
    g = from_torch(model, x)
    groups = find_groups(g)
    sel = {gr.id: ChannelSelection(keep=list(range(0, gr.size, 2))) for gr in groups.prunable() if gr.size > 1}
    for gid, s in sel.items():
        zero_channels(g, groups[gid], [c for c in range(groups[gid].size) if c not in s.keep])
    before = to_torch(g)(*x)
    # zeroed channels are 0 at the consumers' inputs, except behind sigmoid (0.5): pass that constant
    # through the consumers' biases, the intercept path of the rewrite
    taps = [(gid, m, v) for gid in sel for m in groups[gid].members_of("consumer")
            for v in groups[gid].members if v.param is None
            and g.node(m.node).kind in ("conv", "linear") and (v.node, v.output) == g.operands(m.node)[0]]
    acts = _torch_runner(g, x, [(v.node, v.output or 0) for _, _, v in taps])[1:]
    shifts: dict[int, dict[str, torch.Tensor]] = {}
    for (gid, m, v), a in zip(taps, acts):
        mean = channel_rows(a, v.axis).mean(0)
        shift = torch.zeros(g.node(m.node).params["weight"].shape[m.axis], dtype=torch.float64)
        for c in range(groups[gid].size):
            if c not in sel[gid].keep:
                shift[list(m.index[c])] = mean[list(v.index[c])]
        shifts.setdefault(gid, {})[m.node] = shift
    sel = {gid: ChannelSelection(keep=s.keep, bias_shift=shifts.get(gid)) for gid, s in sel.items()}
    p0 = graph_stats(g).params
    apply_selection(g, groups, sel)
    g.verify()
    m = to_torch(g)
    after = m(*x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    st = graph_stats(g)
    assert sum(p.numel() for p in m.parameters()) == st.params
    assert (st.params < p0) == bool(sel)


@pytest.mark.parametrize("name", ["vgg", "resnet", "transformer"])
def test_zoo_trim_with_calibration(name: str) -> None:
    from netsqueeze.backends.torch import to_torch
    from netsqueeze.frontends.fx import from_torch
    from tests.zoo import ZOO

    model, x = ZOO[name]()
    g = from_torch(model, x)
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for t in x] for _ in range(3)]
    f0 = graph_stats(g).flops
    # refit = none: the zoo models' refit costs ~15 s here (this context has no layer-by-layer runner, so it
    # streams both graphs per group); tests/passes/test_trim_refit.py
    # covers it on residual/concat/grouped graphs
    res = Trim(criterion="gdnt", ratio=0.5, gdnt_samples=30, refit="none").run(
        g, stream_ctx(batches, runner=_torch_runner))
    g.verify()
    m = to_torch(g)
    assert torch.isfinite(m(*x)).all()
    assert sum(p.numel() for p in m.parameters()) == graph_stats(g).params
    assert res.metrics["flops_ratio"] == pytest.approx(graph_stats(g).flops / f0)
