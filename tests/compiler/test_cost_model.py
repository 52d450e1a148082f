"""The per-op-kind latency cost model: features per graph, the NNLS fit, the channel-block choice, and the
curve the latency search reads its FLOPs budget from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netsqueeze as ns
from netsqueeze.compiler.cost_model import (
    BLOCKS,
    CostModel,
    Work,
    fit_blocked,
    fit_cost_model,
    graph_work,
    graph_works,
)
from netsqueeze.compiler.latency_budget import bracket_aim, flops_curve, pick_flops, variants
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.ops import node_flops
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext
from tests.zoo import ZOO

KINDS = ("conv 3x3 dense", "conv 1x1 dense", "linear", "memory")
FIXED = 2.5e-4
PER_WORK = {"conv 3x3 dense": 4e-10, "conv 1x1 dense": 7e-10, "linear": 1.1e-9, "memory": 3e-10}
PER_NODE = {"conv 3x3 dense": 2e-5, "conv 1x1 dense": 0.0, "linear": 5e-6, "memory": 1e-6}


def _synthetic(n: int, seed: int = 0) -> list[Work]:
    rng = np.random.default_rng(seed)
    return [Work({k: float(rng.uniform(1e5, 1e7)) for k in KINDS}, {k: int(rng.integers(1, 12)) for k in KINDS})
            for _ in range(n)]


def _time(w: Work) -> float:
    return FIXED + sum(PER_WORK[k] * w.work[k] + PER_NODE[k] * w.count[k] for k in KINDS)


def test_fit_recovers_known_coefficients() -> None:
    works = _synthetic(12)
    m = fit_cost_model([(w, _time(w)) for w in works])
    assert m.folded == () and m.points == 12 and m.block == 1
    assert m.fixed == pytest.approx(FIXED, rel=1e-6, abs=1e-12)
    for k in KINDS:
        assert m.per_work[k] == pytest.approx(PER_WORK[k], rel=1e-6)
        assert m.per_node[k] == pytest.approx(PER_NODE[k], abs=1e-12)
    assert m.residual < 1e-12
    probe = _synthetic(1, seed=7)[0]
    assert m.predict(probe) == pytest.approx(_time(probe), rel=1e-9)


def test_counts_that_never_change_fold_into_the_fixed_cost() -> None:
    # channel-scaled variants keep every node: the per-node costs cannot be told from the fixed cost
    works = [Work({"conv 3x3 dense": 1e6 * s, "memory": 2e5 * s ** 0.5}, {"conv 3x3 dense": 4, "memory": 9})
             for s in (1.0, 0.6, 0.3, 0.1)]
    times = [1e-3 + 4 * 2e-5 + 9 * 1e-6 + 4e-10 * w.work["conv 3x3 dense"] + 3e-10 * w.work["memory"] for w in works]
    m = fit_cost_model(list(zip(works, times)))
    assert m.folded == ("conv 3x3 dense per node", "memory per node")
    assert m.per_node == {}
    assert m.fixed == pytest.approx(1e-3 + 4 * 2e-5 + 9 * 1e-6, rel=1e-6)
    assert m.per_work == pytest.approx({"conv 3x3 dense": 4e-10, "memory": 3e-10}, rel=1e-6)
    assert "not separable, folded into the rest: conv 3x3 dense per node, memory per node" in m.describe()


def test_fit_is_non_negative() -> None:
    # time falling with more work would be noise: the fit keeps every coefficient >= 0
    works = [Work({"linear": f, "memory": b}, {}) for f, b in ((1e6, 1e5), (2e6, 1e5), (1e6, 3e5), (3e6, 2e5))]
    m = fit_cost_model([(w, 1e-3 + 1e-9 * w.work["linear"] - 1e-10 * w.work["memory"]) for w in works])
    assert m.fixed >= 0 and min(m.per_work.values()) >= 0 and m.per_work["memory"] == 0.0


def test_bad_measurements_are_refused() -> None:
    with pytest.raises(NetsqueezeError) as e:
        fit_cost_model([])
    assert e.value.diagnostics[0].message == "the latency cost model needs at least one measurement"
    with pytest.raises(NetsqueezeError) as e:
        fit_cost_model([(Work({"linear": 1.0}, {"linear": 1}), float("nan"))])
    assert e.value.diagnostics[0].message == "latency measurements must be finite and non-negative, got [nan]"


def test_graph_work_counts_every_node_once() -> None:
    model, inputs = ZOO["resnet"]()
    g = ns.import_model(model, inputs)
    w = graph_work(g)
    convs = [n for n in g.nodes() if n.kind == "conv"]
    flops: dict[str, float] = {}
    for n in convs:
        k = int(n.params["weight"].shape[-1])
        flops[f"conv {k}x{k} dense"] = flops.get(f"conv {k}x{k} dense", 0.0) + node_flops(g, n)
    assert {k: v for k, v in w.work.items() if k.startswith("conv")} == flops
    assert sum(v for k, v in w.count.items() if k.startswith("conv")) == len(convs)
    # a batch norm right after a convolution folds into it (fold_bn, runtime fusion): no cost of its own
    bns = [n for n in g.nodes() if n.kind == "batch_norm"]
    assert bns and all(g.node(g.operands(n.id)[0][0]).kind == "conv" for n in bns)
    others = [n for n in g.nodes() if n.kind not in ("input", "output", "constant", "conv", "batch_norm", "linear")]
    assert w.count["memory"] == len(others)
    assert graph_work(g).scaled(64).work["memory"] == pytest.approx(64 * w.work["memory"])


def test_conv_work_in_channel_blocks() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.Conv2d(24, 40, 1),
                                torch.nn.Conv2d(40, 40, 3, padding=1, groups=40))
    g = ns.import_model(model, (torch.randn(1, 3, 8, 8),))
    raw = graph_work(g).work
    by_block = graph_works(g)
    assert set(by_block) == set(BLOCKS) and by_block[1].work == raw
    first = 8 * 8 * 9 * 3 * 24 * 2  # multiply-adds counted as 2 FLOPs
    assert raw["conv 3x3 dense"] - first < first  # the bias adds a little; padding below is relative
    w16 = by_block[16].work
    # 3 input channels (fewer than a block) stay as they are; 24 outputs run as 32, 40 as 48
    assert w16["conv 3x3 dense"] == pytest.approx(raw["conv 3x3 dense"] * 32 / 24)
    assert w16["conv 1x1 dense"] == pytest.approx(raw["conv 1x1 dense"] * (48 / 40) * (32 / 24))
    assert w16["conv 3x3 depthwise"] == pytest.approx(raw["conv 3x3 depthwise"] * 48 / 40)
    assert by_block[8].work["conv 1x1 dense"] == pytest.approx(raw["conv 1x1 dense"] * 1.0)


def test_fit_blocked_finds_the_runtime_block() -> None:
    model, inputs = ZOO["vgg"]()
    g = ns.import_model(model, inputs)
    ctx = PassContext()
    graphs = [g, *[v for _, v in variants(g, ctx)]]
    assert len(graphs) >= 4
    truth = CostModel(1e-4, {k: 3e-10 for k in graph_work(g).work}, {}, block=16)
    points = [(graph_works(x), truth.predict(graph_work(x, 16))) for x in graphs]
    m = fit_blocked(points)
    assert m.block == 16 and m.residual < 1e-12
    assert m.fixed == pytest.approx(1e-4, rel=1e-6)


def test_variants_and_curve() -> None:
    model, inputs = ZOO["vgg"]()
    g = ns.import_model(model, inputs)
    vs = variants(g, PassContext())
    names = [n for n, _ in vs]
    assert names[:3] == ["every group at 75%", "every group at 50%", "every group at 25%"]
    flops0 = graph_stats(g).flops
    ratios = [graph_stats(v).flops / flops0 for _, v in vs[:3]]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 1.0
    curve = flops_curve(g, PassContext(), steps=10)
    fs = [f for f, _ in curve]
    assert fs == sorted(fs) and fs[-1] == 1.0 and len(curve) == 10
    assert curve[-1][1][1].work == graph_work(g).work


def test_pick_flops_reads_the_curve() -> None:
    curve = [(0.1, 0.3), (0.5, 0.6), (1.0, 1.0)]
    assert pick_flops(curve, 0.8) == pytest.approx(0.75)
    assert pick_flops(curve, 0.45) == pytest.approx(0.3)
    assert pick_flops(curve, 0.15) == pytest.approx(0.05)  # below the curve: proportional to its first point
    assert pick_flops(curve, 1.2) == 1.0


def test_a_met_run_far_under_the_target_steps_by_false_position() -> None:
    """The ResNet-style benchmark model at `latency <= 60%` (aiming at 57%): the first run kept 27.9% of the FLOPs at
    48.4% of the latency, and the model's stepped curve aimed at 29.1%, so the search had stopped there. The line
    through that run and the original reaches 57% at 39.9% of the FLOPs; between a met and a missed run the line
    through both, kept in the middle half of the bracket."""
    assert bracket_aim((0.2787, 0.4840), None, 0.57) == pytest.approx(0.2787 + 0.086 * 0.7213 / 0.516)
    assert bracket_aim((0.25, 0.20), None, 0.57) == 0.5  # the line says 59.7%: at most twice the run's FLOPs
    assert bracket_aim((0.28, 0.56), None, 0.57) is None  # 29.6% by the line: no room
    assert bracket_aim((0.30, 0.50), (0.50, 0.70), 0.57) == pytest.approx(0.37)
    assert bracket_aim((0.30, 0.50), (0.50, 0.70), 0.51) == pytest.approx(0.35)  # 31% is under the middle half
    assert bracket_aim((0.30, 0.50), (0.50, 0.50), 0.57) == pytest.approx(0.40)  # a flat bracket: its middle


# ---- the report's note on channel blocks (ONNX Runtime's NCHWc convolutions) ----
def _two_convs() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(32 * 8 * 8, 4)).eval()


@pytest.mark.parametrize(("round_to", "expected"), [
    (8, "ONNX Runtime's CPU convolutions run channels in blocks of 16 on an AVX512 CPU like this one: with these "
        "channel counts they compute 100% of the original's convolution FLOPs, not 57%; `bounds { align = auto }` "
        "(16 here) keeps counts of 16 or more in whole blocks, `round_to = 16` every count"),
    (16, None),
])
def test_report_notes_channel_counts_that_a_blocked_runtime_pads(monkeypatch: pytest.MonkeyPatch, round_to: int,
                                                                 expected: str | None) -> None:
    import netsqueeze.compiler.api as api

    monkeypatch.setattr(api, "cpu_block", lambda: (16, "AVX512"))
    x = torch.randn(128, 1, 8, 8)
    # align = 1: counts in any step (by default those of 16 or more a convolution computes are whole blocks)
    policy = (f"policy p {{\n  calibrate samples 128, batch 64\n  bounds {{ round_to = {round_to}, align = 1 }}\n"
              "  trim on type(conv) { ratio = 0.3 }\n}\n")
    res = ns.compile(_two_convs(), policy, example_inputs=(x[:2],), calibration=x)
    convs = [tuple(m.weight.shape) for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == ([(24, 1, 3, 3), (24, 24, 3, 3)] if round_to == 8 else [(32, 1, 3, 3), (32, 32, 3, 3)])
    notes = [n for n in res.report.notes if "blocks of" in n]
    assert notes == ([expected] if expected else [])
    # 8-channel blocks (AVX2) fit 24 channels: nothing to say
    monkeypatch.setattr(api, "cpu_block", lambda: (8, "AVX2"))
    res = ns.compile(_two_convs(), policy, example_inputs=(x[:2],), calibration=x)
    assert not [n for n in res.report.notes if "blocks of" in n]


def test_block_note_with_align_set_suggests_round_to_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """`align = 16` already holds counts of 16 and more to whole blocks; counts of 8 still pad to 16, and the
    note names the bound that is left."""
    import netsqueeze.compiler.api as api

    monkeypatch.setattr(api, "cpu_block", lambda: (16, "AVX512"))
    x = torch.randn(128, 1, 8, 8)
    policy = ("policy p {\n  calibrate samples 128, batch 64\n  bounds { round_to = 8, align = 16 }\n"
              "  trim on type(conv) { ratio = 0.8 }\n}\n")
    res = ns.compile(_two_convs(), policy, example_inputs=(x[:2],), calibration=x)
    assert [tuple(m.weight.shape) for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)] == [
        (8, 1, 3, 3), (8, 8, 3, 3)]
    assert [n for n in res.report.notes if "blocks of" in n] == [
        "ONNX Runtime's CPU convolutions run channels in blocks of 16 on an AVX512 CPU like this one: with these "
        "channel counts they compute 14% of the original's convolution FLOPs, not 7%; the counts under one block, "
        "which `align` allows, run as one block: `bounds { round_to = 16 }` keeps every count in whole blocks"]


@pytest.mark.parametrize(("block", "cap", "kept"), [(16, "AVX512", 32), (8, "AVX2", 24), (1, "DEFAULT", 24)])
def test_align_auto_is_the_compiling_cpus_block(monkeypatch: pytest.MonkeyPatch, block: int, cap: str,
                                                kept: int) -> None:
    """`bounds { align = auto }` stands for ONNX Runtime's CPU channel block where the compile runs: 24 of 32
    channels (trim's 30%, rounded to 8) go up to a whole block of 16 on AVX-512 and stay on AVX2; the plan says
    what `auto` was, and the report has no block note left to give."""
    import netsqueeze.compiler.api as api
    import netsqueeze.compiler.plan as plan

    monkeypatch.setattr(plan, "cpu_block", lambda: (block, cap))
    monkeypatch.setattr(api, "cpu_block", lambda: (block, cap))
    x = torch.randn(128, 1, 8, 8)
    policy = ("policy p {\n  calibrate samples 128, batch 64\n  bounds { round_to = 8, align = auto }\n"
              "  trim on type(conv) { ratio = 0.3 }\n}\n")
    res = ns.compile(_two_convs(), policy, example_inputs=(x[:2],), calibration=x)
    assert [tuple(m.weight.shape)[:2] for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)] == [
        (kept, 1), (kept, kept)]
    assert res.report.plan is not None
    assert (f"# align = auto: {block}, the channel block of ONNX Runtime's CPU convolutions on this {cap} CPU\n"
            f"bounds round_to=8, align={block}\n") in res.report.plan
    assert not [n for n in res.report.notes if "blocks of" in n]


def test_align_auto_on_a_selector_resolves_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bounds on SELECTOR { align = auto }` resolves the same way (the word quoted or not): the first conv's 24
    kept channels (trim's 30% of 32, rounded to 8) go up to 32 on a 16-channel block, the second conv's stay at 24 (the global bounds' `align = 1` turns off the
    default alignment there)."""
    import netsqueeze.compiler.plan as plan

    monkeypatch.setattr(plan, "cpu_block", lambda: (16, "AVX512"))
    x = torch.randn(128, 1, 8, 8)
    policy = ("policy p {\n  calibrate samples 128, batch 64\n  bounds { round_to = 8, align = 1 }\n"
              "  bounds on \"0\" { align = \"auto\" }\n  trim on type(conv) { ratio = 0.3 }\n}\n")
    res = ns.compile(_two_convs(), policy, example_inputs=(x[:2],), calibration=x)
    assert [tuple(m.weight.shape)[:2] for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)] == [
        (32, 1), (24, 32)]
    assert res.report.plan is not None
    assert "bounds 0: align=16\n" in res.report.plan
