"""The layer refit's targets recorded in squeeze_fold's statistics pass (`passes.refit.Recorder`): the refit's sweep
then runs the squeezed graph alone, one model pass fewer, to the same model as a sweep that runs the pass-start
graph beside it and draws the same rows."""

from __future__ import annotations

import re

import pytest
import torch

import netsqueeze as ns
from netsqueeze.passes import refit
from tests.zoo import ZOO

POLICY = "policy p {\n  calibrate samples 64, batch 16\n  squeeze_fold { ratio = 0.5 }\n}\n"


def _compile(name: str) -> ns.CompileResult:
    model, inputs = ZOO[name]()
    x = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    return ns.compile(model, POLICY, example_inputs=inputs, calibration=x, progress=False)


def _weights(res: ns.CompileResult) -> dict[str, torch.Tensor]:
    return {f"{n.id}.{k}": v for n in res.graph.nodes() for k, v in n.params.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize(("name", "recorded", "n_refit"), [("vgg", 6, 4), ("resnet", 13, 13)])
def test_recorded_targets_give_the_model_the_side_by_side_sweep_gives_in_one_pass_fewer(
        monkeypatch: pytest.MonkeyPatch, name: str, recorded: int, n_refit: int) -> None:
    # every group squeezed, so every recorded layer is refit and seeded by the same index either way; the
    # ResNet's residual branches' last convs and its downsampling convs fit the add's sum, with the skip operand
    # recorded too. Recording nothing (`limit_bytes` 0) makes the sweep run the pass-start graph beside the
    # squeezed one, as before the recorder: the same rows, the same targets, the same weights
    seen: list[refit.Recorder] = []
    real_init = refit.Recorder.__init__

    def spy(self: refit.Recorder, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_init(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(refit.Recorder, "__init__", spy)
    fast = _compile(name)
    [rec] = seen
    assert len(rec.layers) == recorded and rec.note is None
    # the second convs of the three blocks without a downsampling conv, and the two downsampling convs (they come
    # after their block's second conv in graph order: that conv's skip is not final when it is refit)
    assert sorted(n for n, r in rec.layers.items() if r.skip is not None) == ([] if name == "vgg" else [
        "layer1.0.conv2", "layer1.1.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer3.0.downsample.0"])
    monkeypatch.setattr(refit.Recorder, "limit_bytes", 0)
    slow = _compile(name)
    notes = [n for r in slow.report.passes for n in r.result.notes]
    assert any(re.fullmatch(r"layer refit: pass-start outputs not recorded ahead \(the rows would take \d+ MiB, over "
                            r"0 MiB\): the pass-start graph runs beside the refit", n) for n in notes)
    assert f"layer refit: {n_refit} of {recorded} layers refit whole by least squares to the pass-start outputs" in notes
    a, b = _weights(fast), _weights(slow)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert float((a[k] - b[k]).abs().max()) <= 1e-5 * max(1.0, float(b[k].abs().max())), k
    assert fast.report.fidelity["output_error"] == pytest.approx(slow.report.fidelity["output_error"], rel=1e-4)
    # one full pass of the pass-start graph fewer: it ran beside the squeezed one in the refit's sweep
    assert slow.report.calibration_passes - fast.report.calibration_passes == pytest.approx(1.0, abs=1e-6)
    assert fast.report.calibration_passes == pytest.approx(2.0, abs=1e-6)


def test_the_recorded_rows_are_the_ones_the_refit_draws() -> None:
    # `draw_rows` depends on the output's shape only: a conv draws a random order of its output positions, of which a
    # narrower refit (fewer positions) reads the front; a linear layer holds rows out at random
    from netsqueeze.ir.graph import Node

    conv = Node("c", "conv")
    y = torch.randn(3, 4, 5, 5)
    wide = refit.draw_rows(conv, y, torch.Generator().manual_seed(7), 20)
    narrow = refit.draw_rows(conv, y, torch.Generator().manual_seed(7), 9)
    assert wide.shape == (3, 20) and narrow.shape == (3, 9) and torch.equal(wide[:, :9], narrow)
    assert all(len(set(row.tolist())) == 20 for row in wide)
    rows = refit.rows_at(conv, y, narrow)
    assert rows.shape == (3, 9, 4)
    assert torch.equal(rows[1, 2], y[1, :, int(narrow[1, 2]) // 5, int(narrow[1, 2]) % 5])
    linear = Node("l", "linear")
    held = refit.draw_rows(linear, torch.randn(2, 6, 8), torch.Generator().manual_seed(7), 16)
    assert held.shape == (12,) and held.dtype == torch.bool
    assert torch.equal(held, torch.rand(12, generator=torch.Generator().manual_seed(7)) < refit.HELD_OUT)


def test_a_model_with_dynamic_sizes_records_its_refit_targets() -> None:
    # H and W declared dynamic (a dim is its example value with an expression, `ir.dims.Dim`): the rows are drawn
    # from each calibration batch's own output, the memory bound estimated at the example's sizes; the refit runs
    # the squeezed graph alone, and the model still runs at other sizes
    from torch.export import Dim

    from tests.frontends.test_fx_dims import Tokens

    seen: list[refit.Recorder] = []
    real_add = refit.Recorder.add

    def spy(self: refit.Recorder, acts) -> None:  # type: ignore[no-untyped-def]
        real_add(self, acts)
        seen.append(self)

    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(32, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    dyn = {"x": {0: Dim("batch"), 2: Dim("H", min=4), 3: Dim("W", min=4)}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refit.Recorder, "add", spy)
        res = ns.compile(model, "policy p {\n  calibrate samples 32, batch 16\n  squeeze_fold { ratio = 0.5 }\n}\n",
                         example_inputs=(x[:2],), calibration=x, dynamic_shapes=dyn, progress=False)
    rec = seen[-1]
    assert list(rec.layers) == ["fc"] and len(rec.layers["fc"].batches) == 2
    drawn, rows, skip = rec.layers["fc"].batches[0]
    # a linear layer reads every row: 16 samples x 48 tokens (8 x 6 after the stride-2 conv), 5 outputs each
    assert drawn.shape == (16 * 48,) and rows.shape == (16 * 48, 5) and skip is None
    assert res.report.calibration_passes == pytest.approx(2.0, abs=1e-6)
    assert res.graph.node("conv").params["weight"].shape[0] == 4
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 20, 8)).shape == (2, 5 * 10 * 4)
