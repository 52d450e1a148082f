"""Budgets users state: absolute params/FLOPs/bytes (accepted, converted once to ratios of the original, met or
refused with a located message) and the measured latency budget with its `runtime` block."""

from __future__ import annotations

import pytest
import torch

import netsqueeze as ns
import netsqueeze.compiler.latency_budget as latency_budget
from netsqueeze.compiler.cost_model import conv_flops
from netsqueeze.compiler.latency import Latency
from netsqueeze.compiler.latency_budget import fit
from netsqueeze.compiler.plan import resolve
from netsqueeze.dsl import parse_policy
from netsqueeze.errors import BudgetError, PolicyError
from netsqueeze.ir.stats import example_batch, graph_stats
from netsqueeze.passes.registry import all_passes
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def vgg() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    model, inputs = ZOO["vgg"]()
    calib = torch.randn(128, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    return model, inputs, calib


def _plan(text: str, vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]) -> object:
    model, inputs, _ = vgg
    return resolve(parse_policy(text, "p.sqz"), ns.import_model(model, inputs), all_passes())


@pytest.mark.parametrize("item, metric, absolute", [
    ("params <= 20K", "params", 20_000.0),
    ("flops <= 1.5M", "flops", 1_500_000.0),
    ("bytes <= 40 KB", "bytes", 40_000.0),
    ("bytes <= 0.04MB", "bytes", 40_000.0),
])
def test_absolute_budget_is_a_ratio_of_the_original(vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor],
                                                    item: str, metric: str, absolute: float) -> None:
    model, inputs, _ = vgg
    g = ns.import_model(model, inputs)
    st = graph_stats(g)
    # FLOPs per sample: the example batch's over its size
    total = {"params": st.params, "flops": st.flops // example_batch(g), "bytes": st.param_bytes}[metric]
    plan = _plan(f"policy p {{\n  budget {item}\n  fold_bn\n}}", vgg)
    assert plan.budget_absolute == {metric: absolute}  # type: ignore[attr-defined]
    assert plan.budget == {metric: pytest.approx(min(1.0, absolute / total))}  # type: ignore[attr-defined]


def test_absolute_budget_met_and_missed(vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]) -> None:
    model, inputs, calib = vgg
    res = ns.compile(model, "policy p {\n  budget params <= 6K\n  fold_bn\n  trim on type(conv)\n}",
                     example_inputs=inputs, calibration=calib, progress=False)
    assert res.report.after.params <= 6_000 < res.report.before.params
    with pytest.raises(BudgetError) as e:
        ns.compile(model, "policy p {\n  budget params <= 6K\n  fold_bn\n}", example_inputs=inputs,
                   calibration=calib, progress=False)
    reached = ns.compile(model, "policy p {\n  fold_bn\n}", example_inputs=inputs).report
    total = reached.before.params
    assert e.value.diagnostics[0].format().splitlines()[:3] == [
        f"<policy>:2:10: error: budget params <= 6,000 not met: the pipeline reached {reached.after.params:,} "
        f"params ({reached.after.params / total:.1%} of the original {total:,})",
        "    budget params <= 6K",
        "           ^~~~~~~~~~~~"]


@pytest.mark.parametrize("item, message", [
    ("flops <= 2 MB", "wrong unit for budget metric 'flops': expected a ratio (a number or a percentage) or a "
                      "count (e.g. 300M), got a byte size '2MB'"),
    ("params <= 5 ms", "wrong unit for budget metric 'params': expected a ratio (a number or a percentage) or a "
                       "count (e.g. 4.5M), got a duration '5ms'"),
    ("bytes <= 3M", "wrong unit for budget metric 'bytes': expected a ratio (a number or a percentage) or a byte "
                    "size (e.g. 2 MB), got a count '3M'"),
    ("latency <= 2K", "wrong unit for budget metric 'latency': expected a ratio (a number or a percentage) or a "
                      "duration (e.g. 5 ms), got a count '2K'"),
    ("latency <= 0 ms", "budget metric 'latency' must be greater than 0, got '0ms'"),
    ("latency <= 150%", "budget metric 'latency' must be more than 0 and at most 1 (above 0%, up to 100%), got '150%'"),
])
def test_bad_budgets_are_refused_where_written(vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor],
                                               item: str, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        _plan(f"policy p {{\n  budget {item}\n  fold_bn\n}}", vgg)
    d = e.value.diagnostics[0]
    assert d.message == message and d.span is not None and (d.span.line, d.span.col) == (2, item.index("<=") + 13)


def test_runtime_block_and_latency_forms(vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]) -> None:
    plan = _plan("policy p {\n  runtime { threads = 2, batch = 64 }\n  budget latency <= 5 ms\n  fold_bn\n}", vgg)
    assert plan.runtime == {"threads": 2, "batch": 64} and plan.budget_absolute == {"latency": 0.005}  # type: ignore[attr-defined]
    assert plan.budget == {}  # type: ignore[attr-defined]  # the passes never see latency
    plan = _plan("policy p {\n  budget latency <= 60%\n  fold_bn\n}", vgg)
    assert plan.budget == {"latency": 0.6} and plan.runtime == {}  # type: ignore[attr-defined]


def test_cost_model_fit() -> None:
    assert fit([(100.0, 2.0)]) == (0.0, 0.02)
    a, b = fit([(100.0, 3.0), (50.0, 2.0), (0.0, 1.0)])
    assert a == pytest.approx(1.0) and b == pytest.approx(0.02)


def test_latency_budget_measured_when_met_and_located_when_missed() -> None:
    model, inputs = ZOO["mlp"]()
    res = ns.compile(model, "policy p {\n  runtime { threads = 1, batch = 8 }\n  budget latency <= 100 s\n  dead_code\n}",
                     example_inputs=inputs, progress=False)
    lat = {x["model"]: x for x in res.report.latency}
    assert (lat["original"]["runtime"], lat["original"]["batch"], lat["original"]["threads"]) == ("torch", 8, 1)
    assert 0 < lat["compressed"]["median_ms"] < 100_000
    assert res.report.notes[-2].endswith("1 pipeline run(s)")
    assert res.report.notes[-1].startswith("latency budget runs (FLOPs -> measured latency, of the original): 100.0% -> ")
    with pytest.raises(BudgetError) as e:
        ns.compile(model, "policy p {\n  budget latency <= 1 us\n  dead_code\n}", example_inputs=inputs,
                   target="onnx", progress=False)
    d = e.value.diagnostics[0]
    assert d.message.startswith("budget latency <= 0.001 ms not met: measured ")
    assert d.message.endswith("on ort, batch 4, 1 thread(s), after 4 run(s) of the pipeline")
    assert d.span is not None and (d.span.line, d.span.col) == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("cost_model", ["per_kind", "line"])
def test_latency_budget_met_on_a_zoo_model(vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor],
                                           capsys: pytest.CaptureFixture[str], cost_model: str) -> None:
    model, inputs, calib = vgg
    res = ns.compile(model, f"policy p {{\n  runtime {{ threads = 1, batch = 256, cost_model = {cost_model} }}\n"
                            "  budget latency <= 70%\n  fold_bn\n  squeeze_fold on type(conv)\n}",
                     example_inputs=inputs, calibration=calib, target="onnx", progress=False)
    lat = {x["model"]: x for x in res.report.latency}
    assert {x["runtime"] for x in lat.values()} == {"ort"} and lat["original"]["batch"] == 256
    ratio = lat["compressed"]["median_ms"] / lat["original"]["median_ms"]
    runs = int(next(n for n in res.report.notes if n.startswith("latency budget met: ")).split(", ")[-1].split()[0])
    with capsys.disabled():  # shown with `pytest -s`: the figure the test accepted
        print(f"\nmeasured latency ratio {ratio:.1%} (budget 70%, ORT CPU, batch 256, 1 thread, {cost_model} "
              f"cost model, {runs} pipeline run(s))")
    assert ratio <= 0.7
    assert any(n.startswith("latency budget met: measured ") and f"({ratio:.1%})" in n for n in res.report.notes)
    assert res.report.after.flops < res.report.before.flops
    model_notes = [n for n in res.report.notes if n.startswith("latency cost model (per op kind, ort, batch 256): ")]
    predicted = [n for n in res.report.notes if n.startswith("latency budget runs (FLOPs: predicted -> measured")]
    if cost_model == "line":
        assert model_notes == predicted == []
        return
    # the fitted coefficients, and the predicted and measured ratio of every run
    assert len(model_notes) == 1 and " ps/FLOP" in model_notes[0] and "NNLS on " in model_notes[0]
    assert len(predicted) == 1 and len(predicted[0].split("): ", 1)[1].split(", ")) == runs
    assert f"-> {ratio:.1%}" in predicted[0]


class _ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.c1, self.b1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 10, 3, padding=1), nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b3(self.c3(torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.mark.parametrize("cost_model", ["per_kind", "line"])
def test_a_latency_budget_the_original_meets_runs_the_passes_at_full_flops(cost_model: str) -> None:
    """`latency <= 500 ms` holds for the original: the passes run under flops <= 100% (they had no budget at all,
    and trim / squeeze_fold refused to run without one)."""
    x, cal = torch.randn(2, 3, 8, 8), torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in ("trim { }", "squeeze_fold { }"):
        res = ns.compile(_ConvBN().eval(), f"policy p {{\n  runtime {{ cost_model = {cost_model} }}\n  budget latency "
                         f"<= 500 ms\n  {step}\n}}", example_inputs=(x,), calibration=cal, target="torch",
                         progress=False)
        assert res.report.after.flops == res.report.before.flops


@pytest.mark.parametrize("cost_model", ["per_kind", "line"])
def test_a_latency_budget_the_passes_cannot_reach_is_an_error_at_the_latency_budget(cost_model: str) -> None:
    """The FLOPs limit the latency search chose is ours, not the user's: when the passes cannot reach it the error is
    at the latency budget (2:3), saying so, with the pass's reason (it was the pass's error at a FLOPs budget the
    policy never wrote)."""
    x, cal = torch.randn(2, 3, 8, 8), torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(BudgetError) as e:
        ns.compile(_ConvBN().eval(), f"policy p {{\n  budget latency <= 30%\n  runtime {{ cost_model = {cost_model} }}"
                   "\n  trim { min_channels = 8 }\n}", example_inputs=(x,), calibration=cal, target="torch",
                   progress=False)
    d = e.value.diagnostics[0]
    assert (d.span.line, d.span.col) == (2, 10)
    assert d.message.startswith("budget latency <= 30% of the original not met: the passes cannot reach the FLOPs "
                                "it needs (")
    assert "trim cannot meet the budget flops <= " in d.message
    # min_channels = 8 holds it: what one channel per group would reach is said
    assert ": removing every removable channel reaches flops 39.9%, params 47.3% of the original; its bounds " \
           "(min_channels, round_to, align) hold it there: one channel per group would reach flops 1.5%, params " \
           "3.2%; the most of its flops is at " in d.message


class _Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.convs = nn.ModuleList([nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                                    nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 32, 3, padding=1)])
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = torch.relu(c(x))
        return self.fc(x.mean((2, 3)))


def _blocked_latency_search(monkeypatch: pytest.MonkeyPatch, cost_model: str, percent: int, bounds: str,
                            runs: str) -> ns.CompileResult:
    """`_Wide` squeezed under `budget latency <= percent%` and `bounds`, timed by a stand-in for a runtime that
    computes convolutions in channel blocks of 16 (0.2 ms + 0.1 ms per million padded conv FLOPs); asserts the
    report's line of runs is `runs`."""
    def timer(models: list[object], inputs: tuple[torch.Tensor, ...], *, runtime: str = "ort", threads: int = 1,
              rounds: int = 15, **_: object) -> list[Latency]:
        b = int(inputs[0].shape[0])
        return [Latency(runtime, b, threads, 0.2 + conv_flops(m, 16) * b * 1e-7, 0.0, rounds) for m in models]

    monkeypatch.setattr(latency_budget, "measure", timer)
    x, cal = torch.randn(2, 3, 8, 8), torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = ns.compile(_Wide().eval(), f"policy p {{\n  runtime {{ batch = 4, cost_model = {cost_model} }}\n"
                     f"  budget latency <= {percent}%\n  {bounds}\n  squeeze_fold {{ round_to = 8 }}\n}}",
                     example_inputs=(x,), calibration=cal, target="torch", progress=False)
    shown = "FLOPs: predicted -> measured latency" if cost_model == "per_kind" else "FLOPs -> measured latency"
    assert f"latency budget runs ({shown}, of the original): {runs}" in res.report.notes
    return res


@pytest.mark.parametrize(("cost_model", "percent", "runs"), [
    ("per_kind", 70, "55.9%: 56.8% -> 56.8%, 64.5%: 68.8% -> 68.8%"),
    ("per_kind", 50, "27.2%: 37.1% -> 37.1%, 38.7%: 42.3% -> 42.3%, 43.0%: 52.0% -> 52.0%"),
    ("line", 90, "83.5% -> 100.0%, 41.2% -> 42.3%, 68.1% -> 68.8%, 74.3% -> 80.8%"),
])
def test_a_latency_search_steps_by_false_position_between_measured_runs(monkeypatch: pytest.MonkeyPatch,
                                                                       cost_model: str, percent: int,
                                                                       runs: str) -> None:
    """A runtime that computes convolutions in channel blocks of 16 (`_blocked_latency_search`), the counts
    unaligned (`align = 1`: the runs land between blocks). `per_kind`'s curve scales every group at once, so it
    climbs in steps and saw no room to keep more above a first run that met the target far under it: the search
    stopped at 56.8% for 70% and 37.1% for 50%.
    The line search bisected, and ended at 68.8% for 90%. After a met run both now step by false position between
    measured runs (the original the first bracket's end), and keep the met run with the most FLOPs."""
    res = _blocked_latency_search(monkeypatch, cost_model, percent, "bounds { align = 1 }", runs)
    lat = {x["model"]: x["median_ms"] for x in res.report.latency}
    kept = max((float(r.split("%")[0]), float(r.rsplit("-> ", 1)[1].rstrip("%"))) for r in runs.split(", ")
               if float(r.rsplit("-> ", 1)[1].rstrip("%")) <= percent)
    assert round(100 * res.report.after.flops / res.report.before.flops, 1) == kept[0]
    assert round(100 * lat["compressed"] / lat["original"], 1) == kept[1]


@pytest.mark.parametrize(("cost_model", "percent", "runs"), [
    ("per_kind", 70, "55.9%: 56.8% -> 56.8%, 55.9%: 56.8% -> 56.8%"),
    ("line", 50, "41.2% -> 42.3%, 41.2% -> 42.3%"),
])
def test_a_latency_search_stops_when_a_run_rebuilds_an_earlier_model(monkeypatch: pytest.MonkeyPatch,
                                                                       cost_model: str, percent: int,
                                                                       runs: str) -> None:
    """Counts in whole blocks of 16 (the default `align` for convolutions) move in steps of a block: the budget the
    search aimed at next built the model it had (55.9% of the FLOPs for 70%: 64 -> 48 and 64 -> 32 channels; the
    next allowed step, 64 -> 48 twice, is 68.1%). The bracket was then unchanged, so every run after it rebuilt that
    model again: four identical runs. The search stops at the first repeat."""
    _blocked_latency_search(monkeypatch, cost_model, percent, "", runs)


@pytest.mark.parametrize("batch", [2, 8])
def test_an_absolute_flops_budget_is_per_sample_whatever_the_example_batch(batch: int) -> None:
    """`flops <= 0.3K` was a share of the example batch's FLOPs: nothing cut at batch 2, a model 9x under the limit at
    batch 8. Per sample, both examples give the same budget and the same model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    res = ns.compile(model, "policy p {\n  calibrate samples 64, batch 32\n  budget flops <= 0.3K\n  trim { }\n}",
                     example_inputs=(x[:batch],), calibration=x, progress=False)
    per_sample = res.report.before.flops // batch
    assert per_sample == 2 * (8 * 16 + 16 * 4) + 16 + 4 + 16  # multiply-adds, biases, the ReLU
    assert res.report.budget["flops"] == pytest.approx(300 / per_sample)
    assert res.report.after.flops // batch <= 300


@pytest.mark.parametrize("target, runtime", [("torch", "torch"), ("onnx", "ort")])
def test_a_runtime_block_without_a_latency_budget_reports_both_latencies(
        vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], target: str, runtime: str) -> None:
    """`runtime { threads, batch }` beside a FLOPs budget: the compile times the original and the compressed
    model side by side where it emits to, at that batch and thread count, and reports them beside the params and
    FLOPs it reached; without a runtime block nothing is timed."""
    model, inputs, calib = vgg
    body = "  calibrate samples 128, batch 64\n  budget flops <= 70%\n  squeeze_fold\n}\n"
    res = ns.compile(model, "policy p {\n  runtime { threads = 1, batch = 4 }\n" + body, example_inputs=inputs,
                     calibration=calib, target=target, progress=False)
    lat = {x["model"]: x for x in res.report.latency}
    assert sorted(lat) == ["compressed", "original"]
    for x in lat.values():
        assert (x["runtime"], x["batch"], x["threads"], x["rounds"]) == (runtime, 4, 1, 15)
        assert 0 < x["median_ms"] <= x["p90_ms"]
    r = res.report
    was, now = lat["original"]["median_ms"], lat["compressed"]["median_ms"]
    assert r.notes[-1] == (f"measured on the runtime ({runtime}, batch 4, 1 thread(s)): {was:.3f} -> {now:.3f} ms, "
                           f"{was / now:.2f}x faster, beside {r.before.flops / r.after.flops:.2f}x fewer FLOPs and "
                           f"{r.before.params / r.after.params:.2f}x fewer params")
    assert r.after.flops <= 0.7 * r.before.flops
    assert f"latency (compressed, {runtime}, batch 4, 1 thread(s)): median {now:.3f} ms" in r.format()
    plain = ns.compile(model, "policy p {\n" + body, example_inputs=inputs, calibration=calib, target=target,
                       progress=False)
    assert plain.report.latency == [] and not any(n.startswith("measured on the runtime") for n in plain.report.notes)


def test_a_cost_model_without_a_latency_budget_is_an_error_at_it(
        vgg: tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]) -> None:
    """`cost_model` only says how a latency budget predicts latency: without one it would do nothing."""
    with pytest.raises(PolicyError) as e:
        _plan("policy p {\n  runtime { batch = 8, cost_model = line }\n  budget flops <= 50%\n  trim\n}\n", vgg)
    d = e.value.diagnostics[0]
    assert d.message == ("runtime setting 'cost_model' is how a latency budget predicts latency: this policy has no "
                         "'budget latency'")
    assert (d.span.line, d.span.col) == (2, 24)


def test_onnx_runtime_is_timed_with_sleeping_worker_threads() -> None:
    """Sessions timed in turns in one process slow each other with ONNX Runtime's default busy-waiting worker
    threads (`compiler.latency`'s docstring): every timing session lets them sleep."""
    from netsqueeze.compiler.latency import ort_session_options

    so = ort_session_options(2)
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ONNX Runtime's default
        ort_session_options(2, spinning=True).get_session_config_entry("session.intra_op.allow_spinning")
