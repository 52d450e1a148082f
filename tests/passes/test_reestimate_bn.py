"""`reestimate_bn`: statistics equal to a sequential torch reference, kept only when they lower the measured
metric, the top-1 change metric, the streamed fallback, and its errors."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.compiler.api import measure_output_error
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.dead_code import DeadCode
from netsqueeze.passes.reestimate_bn import ReestimateBN
from tests.passes.graphs import stream_ctx


class Net(nn.Module):
    """conv+BN+ReLU twice, global average pool, a 4-class head; BatchNorm statistics that do not fit the data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        for b in (self.b1, self.b2):
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
            b.weight.data.uniform_(0.5, 1.5)
            b.bias.data.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def data(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@torch.no_grad()
def sequential_reference(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` with each BatchNorm's statistics set, in order, to its input's mean and population variance over
    `x` as the model with the earlier ones already set computes it (float64 sums)."""
    m = copy.deepcopy(model).eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)):
        got: list[torch.Tensor] = []
        h = bn.register_forward_pre_hook(lambda _m, inp, got=got: got.append(inp[0].double()))
        m(x)
        h.remove()
        a = torch.cat(got).movedim(1, -1).reshape(-1, bn.num_features)
        bn.running_mean.copy_(a.mean(0))
        bn.running_var.copy_(a.var(0, unbiased=False))
    return m


def compile_(model: nn.Module, steps: list[object] | str, x: torch.Tensor) -> ns.CompileResult:
    return ns.compile(model, steps, example_inputs=(x[:2],), calibration=x)  # type: ignore[arg-type]


def notes(res: ns.CompileResult) -> list[str]:
    return [n for r in res.report.passes if r.name == "reestimate_bn" for n in r.result.notes]


def test_statistics_equal_the_sequential_reference() -> None:
    model, x = Net(), data()
    res = compile_(model, "policy p {\n  calibrate batch 32\n  reestimate_bn { keep = always }\n}\n", x)
    want = sequential_reference(model, x)
    t = data(40, seed=2)
    with torch.no_grad():
        assert (res.model(t) - want(t)).abs().max() < 1e-4
        assert (res.model(t) - model(t)).abs().max() > 0.1  # the statistics did change
    assert notes(res) == ["re-estimated 2 BatchNorms on the calibration data"]
    assert (res.report.after.params, res.report.after.flops) == (res.report.before.params, res.report.before.flops)
    # one model pass for the statistics (layer by layer, up to the last BatchNorm), two for the final output error
    assert 2.9 < res.report.calibration_passes <= 3.0


class Seq(nn.Module):
    """BatchNorm1d on the input [N, 4, 16], a conv1d, a skip that stays live across two BatchNorms, a BatchNorm1d
    on a [N, 8] vector and a 3-class head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.b0, self.c1, self.b1 = nn.BatchNorm1d(4), nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.c2, self.b2 = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.fc1, self.b3, self.fc2 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(self.b0(x))))
        h = torch.relu(self.b2(self.c2(h)) + h)
        return self.fc2(torch.relu(self.b3(self.fc1(h.mean(2)))))


def test_batchnorm1d_skips_and_uneven_batches_match_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import netsqueeze.passes.reestimate_bn as mod

    model = Seq()
    x = torch.randn(50, 4, 16, generator=torch.Generator().manual_seed(4)) * 3 + 1
    want = sequential_reference(model, x)
    pol = "policy p {\n  calibrate batch 16\n  reestimate_bn { keep = always }\n}\n"  # batches 16, 16, 16, 2
    t = torch.randn(30, 4, 16, generator=torch.Generator().manual_seed(5))
    for limit, note in ((mod.LIMIT_BYTES, ""), (20_000, " (2 streamed from the inputs)")):
        # 20,000 bytes: the checkpoints at the input BatchNorm (50 x 4 x 16 floats) and at the vector one (50 x 8)
        # fit, the two between them (50 x 8 x 16, with the skip) do not: walked, streamed, streamed, walked
        monkeypatch.setattr(mod, "LIMIT_BYTES", limit)
        res = compile_(model, pol, x)
        assert notes(res) == [f"re-estimated 4 BatchNorms on the calibration data{note}"]
        with torch.no_grad():
            assert (res.model(t) - want(t)).abs().max() < 1e-4


@dataclass(frozen=True)
class Shrink(TransformPass):
    """Scales the first conv's output channels by 0.1: what a BatchNorm after it can undo exactly (up to eps)."""

    name: ClassVar[str] = "test_shrink"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        conv = next(n for n in graph.nodes() if n.kind == "conv")
        conv.params["weight"] = conv.dense("weight") * 0.1
        return PassResult(changed=True, touched={conv.id})


def fitted() -> tuple[nn.Module, torch.Tensor]:
    """Net with statistics that fit its calibration data: re-estimating them again changes nothing."""
    x = data()
    return sequential_reference(Net(), x), x


def test_kept_when_it_lowers_the_top1_change() -> None:
    model, x = fitted()
    res = compile_(model, [Shrink(), ReestimateBN()], x)
    m = res.report.passes[-1].result.metrics if res.report.passes[-1].name == "reestimate_bn" else \
        next(r.result.metrics for r in res.report.passes if r.name == "reestimate_bn")
    assert m["top1_change_before"] > 0.1 and m["top1_change_after"] == 0.0
    assert notes(res) == [f"re-estimated 2 BatchNorms on the calibration data: top1_change "
                          f"{m['top1_change_before']:.4g} → 0, kept"]
    t = data(40, seed=2)
    with torch.no_grad():
        assert (res.model(t) - model(t)).abs().max() < 1e-3  # the shrink undone
    # the compile report keeps its own metrics: a rank-2 output need not be class scores
    assert set(res.report.fidelity) == {"output_error", "max_abs_error"}


def test_a_guard_that_held_must_still_hold() -> None:
    model, x = fitted()
    graph = ns.import_model(model, (x[:2],))
    measured: list[tuple[str, str]] = []

    def fidelity(g: Graph, metric: str, batches: int | None = None) -> float:
        changed = not torch.equal(g.node(bn).params["running_mean"], graph0.node(bn).params["running_mean"])
        measured.append((metric, "after" if changed else "before"))
        return {("top1_change", False): 0.2, ("top1_change", True): 0.1,
                ("output_error", False): 0.01, ("output_error", True): 0.05}[(metric, changed)]

    graph0 = graph.copy()
    bn = next(n.id for n in graph.by_kind("batch_norm"))
    shifted = [[x[:48] + 0.5]]
    ctx = stream_ctx(shifted, batches_fn=lambda: iter([tuple(b) for b in shifted]), fidelity_fn=fidelity,
                     guard=("output_error", 0.02))
    res = ReestimateBN().run(graph, ctx)
    assert measured == [("top1_change", "before"), ("output_error", "before"), ("top1_change", "after"),
                        ("output_error", "after")]
    assert res.notes == ["re-estimated 2 BatchNorms on the calibration data (2 streamed from the inputs): "
                         "top1_change 0.2 → 0.1, the guard no longer holds (0.05): the statistics before it are kept"]
    assert not res.changed and all(torch.equal(graph.node(n.id).params[k], graph0.node(n.id).params[k])
                                   for n in graph.by_kind("batch_norm") for k in ("running_mean", "running_var"))
    # without the guard the same measurements keep the new statistics
    ctx = stream_ctx(shifted, batches_fn=lambda: iter([tuple(b) for b in shifted]), fidelity_fn=fidelity)
    res = ReestimateBN().run(graph, ctx)
    assert res.changed and res.notes[0].endswith("top1_change 0.2 → 0.1, kept")


def test_not_kept_when_it_does_not_lower_the_metric() -> None:
    # the statistics already fit: re-estimating on other data (a shifted subset) cannot lower a zero change
    model, x = fitted()
    res = compile_(model, [ReestimateBN(metric="output_error")], x[:48] + 0.3)
    m = next(r.result.metrics for r in res.report.passes if r.name == "reestimate_bn")
    assert m["output_error_before"] == 0.0 and m["output_error_after"] > 0.0
    assert notes(res)[0].endswith("not lower: the statistics before it are kept")
    t = data(40, seed=2)
    with torch.no_grad():
        assert torch.equal(res.model(t), compile_(model, [DeadCode()], x).model(t))


def test_a_model_without_class_scores_is_judged_by_the_output_error() -> None:
    class Features(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 5, 8, 8]: no class axis
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))

    x = data()
    model = sequential_reference(Features(), x)
    res = compile_(model, [Shrink(), ReestimateBN()], x)
    m = next(r.result.metrics for r in res.report.passes if r.name == "reestimate_bn")
    assert set(m) == {"output_error_before", "output_error_after", "batch_norms"}
    assert m["output_error_after"] < 1e-3 < m["output_error_before"]
    assert res.report.fidelity["output_error"] < 1e-3


def test_top1_change_counts_differing_predictions() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0], [5.0, 3.0]])
    got = measure_output_error(lambda i, batch: [a], lambda i, batch: [b], lambda: iter([[torch.zeros(4, 1)]]))
    assert got["top1_change"] == 0.5
    # [batch, tokens, vocabulary]: every token is a prediction
    got = measure_output_error(lambda i, batch: [a.reshape(2, 2, 2)], lambda i, batch: [b.reshape(2, 2, 2)],
                               lambda: iter([[torch.zeros(2, 1)]]))
    assert got["top1_change"] == 0.5
    # rank 4 (feature maps) and a single score per sample are not class scores
    got = measure_output_error(lambda i, batch: [a.reshape(1, 2, 2, 2), a[:, :1]],
                               lambda i, batch: [b.reshape(1, 2, 2, 2), b[:, :1]], lambda: iter([[torch.zeros(2, 1)]]))
    assert "top1_change" not in got


def test_streamed_fallback_gives_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    import netsqueeze.passes.reestimate_bn as mod

    model, x = Net(), data()
    pol = "policy p {\n  calibrate batch 32\n  reestimate_bn { keep = always }\n}\n"
    walked = compile_(model, pol, x)
    monkeypatch.setattr(mod, "LIMIT_BYTES", 0)  # no checkpoint fits: every BatchNorm streams from the inputs
    streamed = compile_(model, pol, x)
    assert notes(streamed) == ["re-estimated 2 BatchNorms on the calibration data (2 streamed from the inputs)"]
    t = data(40, seed=2)
    with torch.no_grad():
        assert (walked.model(t) - streamed.model(t)).abs().max() < 1e-5


def test_errors_and_nothing_to_do() -> None:
    model, x = Net(), data()
    with pytest.raises(NetsqueezeError) as err:
        ns.compile(model, [ReestimateBN()], example_inputs=(x[:2],))
    assert str(err.value).splitlines()[0].endswith(
        "reestimate_bn needs calibration data: pass calibration=... to compile() (netsqueeze compile: --calib FILE)")
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    res = compile_(plain, [ReestimateBN()], x)
    assert notes(res) == ["no BatchNorm selected: nothing to re-estimate"]
    bad = x.clone()
    bad[50, 0, 0, 0] = float("nan")
    for keep in ("better", "always"):
        with pytest.raises(NetsqueezeError) as err:
            compile_(model, [ReestimateBN(keep=keep)], bad)  # type: ignore[arg-type]
        assert str(err.value) == "error: calibration batch 0: input 'x' contains NaN (1 of 12288 values)"
    # past the first batch: every batch a pass reads is checked as it is read, naming it and the input
    with pytest.raises(NetsqueezeError) as err:
        ns.compile(model, "policy p {\n  calibrate batch 32\n  reestimate_bn { keep = always }\n}\n",
                   example_inputs=(x[:2],), calibration=bad)
    assert str(err.value).splitlines()[0] == (
        "<policy>:3:3: error: pass 'reestimate_bn' (<policy>:3) failed: calibration batch 1: input 'x' contains NaN "
        "(1 of 6144 values)")


def test_onnx_input_gets_the_same_statistics(tmp_path: Path) -> None:
    import warnings

    import onnx
    import onnxruntime as ort

    model, x = Net(), data()
    f = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # training=PRESERVE keeps the BatchNorms as nodes (the exporter folds them into the convs otherwise)
        torch.onnx.export(model, (x[:2],), str(f), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False)
    res = ns.compile(onnx.load(str(f)), [ReestimateBN(keep="always")], example_inputs=(x[:2],), calibration=x,
                     target="onnx")
    assert len(res.graph.by_kind("batch_norm")) == 2
    t = data(40, seed=2)
    out = ort.InferenceSession(res.model.SerializeToString()).run(None, {"x": t.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - sequential_reference(model, x)(t).numpy()).max() < 1e-4


def test_one_value_per_channel_is_refused_not_a_zero_variance() -> None:
    # one calibration sample into a BatchNorm1d: its variance would be 0 and outputs grew 300-fold
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(1, 8)
    with pytest.raises(NetsqueezeError) as err:
        ns.compile(m, "policy p { reestimate_bn { keep = always } }", example_inputs=(x,), calibration=x)
    assert str(err.value).splitlines()[0] == (
        "<policy>:1:12: error: pass 'reestimate_bn' (<policy>:1) failed: reestimate_bn: 1 value per channel reached "
        "this BatchNorm (one calibration sample of a per-sample feature); its variance needs at least 2: give more "
        "calibration samples (node '1')")
