"""`passes.allocation`: one bounds rule, one ratio → count rule, metering and bisection for trim and
squeeze_fold; and the policy's seed reaching every random choice of a pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.errors import BudgetError
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.allocation import Budget, GroupBounds, Meter, bisect, bisect_int, group_bounds
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.trim import Trim
from tests.passes.graphs import input_batches, mlp, stream_ctx


def test_clamp_floors_then_rounds_up_within_the_size() -> None:
    b = GroupBounds(size=16, min_keep=3, step=4)
    assert [b.clamp(k) for k in (0, 1, 2, 3, 4, 5, 9, 15, 16, 40)] == [4, 4, 4, 4, 4, 8, 12, 16, 16, 16]
    assert b.smallest == 4
    assert GroupBounds(size=10, min_keep=1, step=8).clamp(9) == 10  # rounding up never exceeds the group
    # min_keep not a multiple of step: the rounding still holds (5 → 8)
    assert GroupBounds(size=16, min_keep=5, step=4).clamp(2) == 8


class _ConvHead(nn.Module):
    """Two 2-D convs of 64 channels, then a linear head with a hidden layer of 40 (groups: conv0's and conv1's
    outputs, which convolutions compute, and the hidden linear layer's, which no convolution touches)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0, self.c1 = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.fc0, self.fc1 = nn.Linear(64, 40), nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(torch.relu(self.c0(x)))).mean((2, 3))
        return self.fc1(torch.relu(self.fc0(x)))


@pytest.mark.parametrize(("bounds", "kept"), [("", [48, 48, 28]), ("bounds { align = 1 }", [45, 45, 28]),
                                              ("bounds { align = 8 }", [48, 48, 32])])
def test_counts_a_convolution_computes_are_whole_blocks_of_16_by_default(bounds: str, kept: list[int]) -> None:
    """With no `align` set, a group a 2-D convolution computes or reads keeps a count of 16 or more in whole blocks
    of 16 (`allocation.DEFAULT_ALIGN`): trim's 30% of 64 channels (45 kept) goes up to 48. An unaligned count runs
    unblocked in ONNX Runtime's CPU convolutions: trimmed to 2x fewer FLOPs the benchmark VGG ran at 0.56x the
    original's speed (batch 64), aligned at 1.66x. The linear layers' 40 keep 28 (no convolution, no block); any
    `align` a bounds sets replaces the default, for every group (`align = 1`: any count)."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    groups = find_groups(ns.import_model(_ConvHead().eval(), (x[:2],)))
    assert [(g.size, g.blocked) for g in groups.prunable()] == [(64, True), (64, True), (40, False)]
    res = ns.compile(_ConvHead().eval(), f"policy p {{\n  calibrate samples 64, batch 32\n  {bounds}\n"
                     "  trim { ratio = 0.3 }\n}\n", example_inputs=(x[:2],), calibration=x, progress=False)
    m = res.model
    assert [m.c0.out_channels, m.c1.out_channels, m.fc0.out_features] == kept
    # what the ratio asked and what the bounds kept are said (a ratio that removes nothing must not pass unsaid)
    notes = [n for r in res.report.passes if r.name == "trim" for n in r.result.notes if n.startswith("ratio")]
    raised = [f"'{n}' {want} -> {got} of {size}" for n, want, got, size in
              zip(("c0", "c1", "fc0"), (45, 45, 28), kept, (64, 64, 40)) if got > want]
    assert notes == ([] if not raised else [
        f"ratio 0.3: the bounds keep more channels than it asks in {len(raised)} group(s), 0 of them whole "
        f"({', '.join(raised)}): counts go up to `min_channels`, to a multiple of `round_to` and, from one block up, "
        "to whole blocks of `align` (16 for the channels of 2-D convolutions unless a bounds sets it; "
        "`bounds { align = 1 }` allows any count)"])


def test_a_conv1d_computes_no_blocked_channels() -> None:
    """ONNX Runtime's blocked (NCHWc) convolutions are 2-D: a 1-D conv's channels keep any count by default."""
    model = nn.Sequential(nn.Conv1d(4, 32, 3), nn.ReLU(), nn.Conv1d(32, 8, 3)).eval()
    groups = find_groups(ns.import_model(model, (torch.randn(2, 4, 16),)))
    assert [(g.size, g.blocked) for g in groups.prunable()] == [(32, False)]


def test_align_keeps_counts_from_one_block_up_in_whole_blocks() -> None:
    """`align = 16` with `round_to = 8`: below one block any multiple of 8, from a block up whole blocks
    only (ONNX Runtime's NCHWc convolutions need input channels below a block or a multiple of it)."""
    b = GroupBounds(size=64, min_keep=1, step=8, align=16)
    assert sorted({b.clamp(k) for k in range(0, 70)}) == [8, 16, 32, 48, 64]
    assert [b.clamp(k) for k in (1, 9, 17, 24, 33, 56, 57)] == [8, 16, 32, 32, 48, 64, 64]
    assert [b.above(k) for k in (8, 16, 32, 48, 64)] == [16, 32, 48, 64, 64]
    assert [b.below(k) for k in (64, 48, 16, 8)] == [48, 32, 8, 8]
    # a group that is not a whole number of blocks keeps its full size at the top: never more than it has
    assert sorted({GroupBounds(size=40, min_keep=1, step=8, align=16).clamp(k) for k in range(41)}) == [8, 16, 32, 40]
    # min_keep above a block is rounded to whole blocks too (20 → 32)
    assert GroupBounds(size=64, min_keep=20, step=1, align=16).clamp(1) == 32
    assert GroupBounds(size=64, min_keep=1, step=1, align=16).clamp(5) == 5
    # align not a multiple of round_to: counts from a block up are multiples of both (8 and 12: 24, 48, ...)
    b = GroupBounds(size=96, min_keep=1, step=8, align=12)
    assert sorted({b.clamp(k) for k in range(97)}) == [8, 24, 48, 72, 96]
    assert all(b.clamp(b.clamp(k)) == b.clamp(k) for k in range(97))


def test_ratio_removes_floor_of_ratio_times_size() -> None:
    b = GroupBounds(size=10, min_keep=1, step=1)
    # 35% of 10 = 3.5 channels: 3 removed (never more than the ratio asks), 7 kept
    assert [b.for_ratio(r) for r in (0.0, 0.1, 0.35, 0.5, 0.55, 0.9, 0.999)] == [10, 9, 7, 5, 5, 1, 1]
    assert GroupBounds(size=16, min_keep=3, step=4).for_ratio(0.9) == 4


def test_pass_options_and_policy_bounds_most_restrictive_wins() -> None:
    g = mlp()
    fc1 = next(gr for gr in find_groups(g).prunable() if gr.producers == ("fc1",))
    assert fc1.size == 16
    ctx = PassContext(bounds={"min_channels": 4, "round_to": 2,
                              "per_node": {"fc1": {"max_ratio": 0.5, "round_to": 4}}})
    assert group_bounds(fc1, ctx) == GroupBounds(16, 8, 4)  # max_ratio 50%: at most 8 of 16 go
    assert group_bounds(fc1, ctx, min_channels=12, round_to=8) == GroupBounds(16, 12, 8)
    assert group_bounds(fc1, PassContext(bounds={"min_channels": 12}), min_channels=4) == GroupBounds(16, 12, 1)
    assert group_bounds(fc1, PassContext(), min_channels=40) == GroupBounds(16, 16, 1)
    # align comes from the policy alone, the largest entry winning
    ctx = PassContext(bounds={"align": 4, "per_node": {"fc1": {"align": 8}}})
    assert group_bounds(fc1, ctx, round_to=2) == GroupBounds(16, 1, 2, 8)


def _hidden_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    return model, torch.randn(256, 8, generator=torch.Generator().manual_seed(1))


def _kept(pass_text: str, bounds: str = "") -> tuple[int, int]:
    model, calib = _hidden_mlp()
    res = ns.compile(model, f"policy p {{\n  {bounds}\n  {pass_text}\n}}\n", example_inputs=(calib[:2],),
                     calibration=calib)
    return res.graph.node("0").params["weight"].shape[0], res.graph.node("2").params["weight"].shape[0]


@pytest.mark.parametrize("pass_name", ["trim", "squeeze_fold"])
def test_trim_and_squeeze_fold_give_the_same_counts(pass_name: str) -> None:
    """The issue's case: policy `bounds { min_channels = 4 }`, pass options `min_channels = 12,
    ratio = 90%` — both passes keep 12 (was 12 under trim, 4 under squeeze_fold)."""
    assert _kept(f"{pass_name} {{ min_channels = 12, ratio = 90% }}", "bounds { min_channels = 4 }") == (12, 10)
    # and the policy's bound wins when it is the more restrictive one
    assert _kept(f"{pass_name} {{ min_channels = 2, ratio = 90% }}", "bounds { min_channels = 6 }") == (6, 6)
    # 35% of 20 = 7 removed → 13; 35% of 10 = 3.5 → 3 removed → 7 (squeeze_fold used to round to 4 → 6)
    assert _kept(f"{pass_name} {{ ratio = 35% }}") == (13, 7)
    # round_to from either source: the larger step
    assert _kept(f"{pass_name} {{ ratio = 90%, round_to = 4 }}", "bounds { round_to = 8 }") == (8, 8)
    # align = 8: 35% of 20 leaves 13 → 16 (a whole block), of 10 leaves 7 (below a block: free)
    assert _kept(f"{pass_name} {{ ratio = 35% }}", "bounds { align = 8 }") == (16, 7)


def test_budget_meets_formats_and_reports() -> None:
    b = Budget.of(PassContext(budget={"flops": 0.5, "params": 0.25, "latency": 0.1}))
    assert dict(b.limits) == {"flops": 0.5, "params": 0.25} and str(b) == "flops <= 50.0%, params <= 25.0%"
    assert b.meets((0.5, 0.25, 1.0)) and not b.meets((0.51, 0.2, 0.1)) and not b.meets((0.4, 0.26, 0.1))
    assert not Budget.of(PassContext()) and Budget({}).meets((9.0, 9.0, 9.0))
    err = b.unreachable("trim", "removing every removable channel", (0.61, 0.3, 0.3), "fc1")
    assert isinstance(err, BudgetError) and err.diagnostics[0].node == "fc1"
    assert err.diagnostics[0].message == ("trim cannot meet the budget flops <= 50.0%, params <= 25.0%: removing "
                                          "every removable channel reaches flops 61.0%, params 30.0% of the original")
    by = Budget.of(PassContext(budget={"bytes": 0.1}))
    assert by.meets((1.0, 1.0, 0.1)) and not by.meets((0.0, 0.0, 0.11))
    assert by.unreachable("trim", "x", (0.5, 0.4, 0.3), None).message == (
        "trim cannot meet the budget bytes <= 10.0%: x reaches flops 50.0%, params 40.0%, bytes 30.0% of the original")


def test_meter_costs_allocations_exactly_once() -> None:
    g = mlp()  # 10 → 16 → 12 → 3
    groups = find_groups(g)
    ids = {gr.producers[0]: gr.id for gr in groups.prunable()}
    meter = Meter(g, groups, graph_stats(g))
    assert meter({}) == meter({ids["fc1"]: 16}) == (1.0, 1.0, 1.0) and meter.measured == 1  # keep-everything
    f, p, b = meter({ids["fc1"]: 8, ids["fc2"]: 6})
    assert p == pytest.approx((10 * 8 + 8 + 8 * 6 + 6 + 6 * 3 + 3) / 419) and b == pytest.approx(p)  # float32
    assert meter.measured == 2
    assert meter({ids["fc2"]: 6, ids["fc1"]: 8}) == (f, p, b) and meter.measured == 2
    assert g.node("fc1").params["weight"].shape == (16, 10)  # measured on copies


def test_bisections_find_the_boundary_from_the_good_side() -> None:
    assert bisect_int(100, 0, lambda t: t >= 37) == 37
    assert bisect_int(0, 100, lambda t: t <= 37) == 37
    assert bisect_int(1, 0, lambda t: t >= 1) == 1
    t = bisect(1.0, 0.0, lambda t: t >= 0.3, 30)
    assert 0.3 <= t < 0.3 + 1e-8
    assert bisect(0.0, 1.0, lambda t: t <= 0.3, 30) == pytest.approx(0.3, abs=1e-8)


# ---- seeds: `calibrate seed` / compile(seed=) reach the passes through PassContext.seed ----
def _random_trim(seed: int) -> torch.Tensor:
    g = mlp()
    Trim(criterion="random", ratio=0.5, bias_compensation=False).run(g, PassContext(seed=seed))
    return g.node("fc1").params["weight"].clone()


def test_trim_random_criterion_follows_the_seed() -> None:
    a, b, c = _random_trim(0), _random_trim(0), _random_trim(1)
    assert torch.equal(a, b)  # one seed repeats bit for bit
    assert a.shape == c.shape == (8, 10) and not torch.equal(a, c)  # two seeds keep different channels


def test_gdnt_reservoir_follows_the_seed() -> None:
    def scores(seed: int) -> torch.Tensor:
        g = mlp()
        ctx = stream_ctx(input_batches(g, n=6))
        ctx.seed = seed
        Trim(criterion="gdnt", ratio=0.5, gdnt_samples=12).run(g, ctx)
        return g.node("fc1").params["weight"].clone()

    a, b = scores(0), scores(0)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, scores(s)) for s in (1, 2, 3))


def test_compile_seed_and_policy_seed_reach_trim() -> None:
    model, calib = _hidden_mlp()

    def kept(policy: str, seed: int = 0) -> torch.Tensor:
        res = ns.compile(model, policy, example_inputs=(calib[:2],), seed=seed)
        return res.graph.node("0").params["weight"]

    plain = "policy p {\n  trim { criterion = random, ratio = 50% }\n}\n"
    seeded = "policy p {\n  calibrate seed 7\n  trim { criterion = random, ratio = 50% }\n}\n"
    assert torch.equal(kept(plain, seed=7), kept(plain, seed=7))
    assert not torch.equal(kept(plain, seed=7), kept(plain, seed=8))
    assert torch.equal(kept(seeded), kept(plain, seed=7))  # the policy's seed, as compile(seed=7)


@pytest.mark.parametrize("name", ["vgg", "resnet", "densenet", "mobilenetv2", "transformer"])
def test_dry_run_meter_equals_the_real_rewrite(name: str) -> None:
    """The meter's shape-only dry run costs an allocation exactly as slicing a real copy does."""
    from netsqueeze.frontends.fx import from_torch
    from netsqueeze.ir.stats import graph_stats
    from netsqueeze.passes.rewrite import ChannelSelection, apply_selection
    from tests.zoo import ZOO

    model, x = ZOO[name]()
    g = from_torch(model, x)
    groups = find_groups(g)
    base = graph_stats(g)
    meter = Meter(g, groups, base)
    gen = torch.Generator().manual_seed(0)
    prunable = [gr for gr in groups.prunable() if gr.size > 1]
    assert prunable
    for _ in range(3):
        counts = {gr.id: int(torch.randint(1, gr.size + 1, (1,), generator=gen)) for gr in prunable}
        real = g.copy()
        apply_selection(real, groups, {gid: ChannelSelection(keep=list(range(k))) for gid, k in counts.items()
                                       if k < groups[gid].size})
        st = graph_stats(real)
        assert meter(counts) == (st.flops / base.flops, st.params / base.params, st.param_bytes / base.param_bytes)
    assert graph_stats(g) == base  # the skeleton never touched the graph's weights


@pytest.mark.parametrize("name", ["vgg", "resnet", "densenet", "mobilenetv2", "transformer"])
def test_meter_sums_node_costs_seen_before_exactly_as_a_dry_run(name: str) -> None:
    """An allocation whose every node was costed at its groups' counts before is summed without a dry run,
    to the same figures; each group drawn from two counts, 16 allocations."""
    from netsqueeze.frontends.fx import from_torch
    from tests.zoo import ZOO

    model, x = ZOO[name]()
    g = from_torch(model, x)
    groups = find_groups(g)
    base = graph_stats(g)
    fast, slow = Meter(g, groups, base), Meter(g, groups, base)
    slow._additive = False  # every allocation by its own dry run
    prunable = [gr for gr in groups.prunable() if gr.size > 1]
    gen = torch.Generator().manual_seed(1)
    for _ in range(16):
        counts = {gr.id: (gr.size, max(1, gr.size // 2))[int(torch.randint(0, 2, (1,), generator=gen))]
                  for gr in prunable}
        assert fast(counts) == slow(counts)
    assert fast.measured == slow.measured == slow.dry_runs
    assert fast.dry_runs < slow.dry_runs if name == "vgg" else fast.dry_runs <= slow.dry_runs


@pytest.mark.parametrize(("pass_name", "expected"), [("trim", [48, 48, 16]), ("squeeze_fold", [64, 32, 32])])
def test_align_holds_under_a_flops_budget_search(pass_name: str, expected: list[int]) -> None:
    """Both passes search their counts for `budget flops <= 50%` inside `round_to = 8, align = 16`: every
    kept count is 8 or a whole number of 16-channel blocks (with `round_to = 8` alone they keep 40, 56, 16
    and 56, 40, 24), and the budget holds. trim's bisection alone stops at 48, 48, 8: its last removal takes
    the third group down a whole step, and giving channels back while the budget holds restores it to 16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(48, 5)).eval()
    calib = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    policy = ("policy p {\n  calibrate samples 64, batch 32\n  budget flops <= 50%\n"
              f"  bounds {{ round_to = 8, align = 16 }}\n  {pass_name}\n}}\n")
    res = ns.compile(model, policy, example_inputs=(calib[:2],), calibration=calib)
    kept = [int(m.weight.shape[0]) for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert kept == expected
    before, after = graph_stats(ns.compile(model, [], example_inputs=(calib[:2],)).graph), graph_stats(res.graph)
    assert after.flops <= 0.5 * before.flops


class _GroupedReaders(torch.nn.Module):
    """Three 8-channel convs; conv2 has 2 conv groups and conv3 4, so conv1's and conv2's channel groups are
    their readers' weight slots: 4 units of 2 channels and 2 units of 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.relu(self.conv3(x)).flatten(1))


@pytest.mark.parametrize(("body", "kept"), [
    ("trim { ratio = 50%, round_to = 4 }", (4, 4, 4)),  # 4 channels = 2 units of conv1's group, 1 of conv2's
    ("trim { ratio = 75%, min_channels = 4 }", (4, 4, 4)),
    ("squeeze_fold { ratio = 50%, round_to = 4 }", (4, 4, 4)),
])
def test_bounds_count_channels_when_a_grouped_conv_reads_the_group(body: str, kept: tuple[int, ...]) -> None:
    import netsqueeze as ns

    m = _GroupedReaders().eval()
    cal = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = ns.compile(m, f"policy p {{ {body} }}", example_inputs=(cal[:4],), calibration=cal, progress=False)
    assert (res.model.conv1.out_channels, res.model.conv2.out_channels, res.model.conv3.out_channels) == kept


class _Skip(nn.Module):
    """out = skip(x) + fc2(relu(fc1(x))): `skip` reads the inputs and writes the outputs, so no group shrinks it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.skip, self.fc1, self.fc2 = nn.Linear(256, 16), nn.Linear(256, 128), nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.fc2(torch.relu(self.fc1(x)))


def test_an_unmeetable_budget_names_the_nodes_that_hold_it_and_is_placed_at_the_first() -> None:
    """`skip` holds 10.5% of the params whatever the pass removes: a 10% budget is out of reach, and the error says
    where the rest sits (the first group's producer, fc1, was named before, though it is cut to one channel)."""
    g = ns.import_model(_Skip().eval(), (torch.randn(2, 256),))
    with pytest.raises(BudgetError) as e:
        Trim().run(g, PassContext(budget={"params": 0.1}))
    d = e.value.diagnostics[0]
    assert (d.message, d.node) == (
        "trim cannot meet the budget params <= 10.0%: removing every removable channel reaches flops 11.2%, params "
        "11.3% of the original; the most of its params is at 'skip' (10.5% of the original params, in no group it "
        "can shrink), 'fc1' (0.7%, cut to its minimum), 'fc2' (0.1%, cut to its minimum)", "skip")
