"""`netsqueeze bench`: params/FLOPs exact, latency per batch size, top-1 and agreement from labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import netsqueeze as ns
from netsqueeze.cli import main
from netsqueeze.compiler.latency import measure
from netsqueeze.errors import NetsqueezeError
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, torch.nn.Module, ns.CompileResult]:
    d = tmp_path_factory.mktemp("bench")
    model, inputs = ZOO["mlp"]()
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    big = ns.compile(model, [], example_inputs=inputs, target="onnx", dynamic_shapes=dyn)
    calib = torch.randn(200, 20, generator=torch.Generator().manual_seed(0))
    small = ns.compile(model, "policy p { squeeze_fold on type(linear) { ratio = 50% } }", example_inputs=inputs,
                       calibration=calib, target="onnx", dynamic_shapes=dyn)
    onnx.save(big.model, d / "big.onnx")
    onnx.save(small.model, d / "small.onnx")
    x = torch.randn(50, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:5] = (labels[:5] + 1) % 5  # the original is right on 45 of 50
    np.savez(d / "test.npz", x=x.numpy(), labels=labels.numpy())
    return d / "big.onnx", d / "small.onnx", d / "test.npz", model, small


def test_bench_table_and_json(models: tuple[Path, Path, Path, torch.nn.Module, ns.CompileResult], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    big, small, data, model, res = models
    js = tmp_path / "b.json"
    assert main(["bench", str(big), str(small), "--batch", "1,8", "--data", str(data), "--rounds", "3",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("| model | size | params | FLOPs/sample | ort b1 median / p90 ms | ort b8 median / p90 ms "
                                   "| top1 | agreement |")
    rows = json.loads(js.read_text())["models"]
    assert [r["model"] for r in rows] == [str(big), str(small)]
    assert rows[0]["params"] == sum(p.numel() for p in model.parameters()) == 1285
    assert rows[1]["params"] == res.report.after.params and rows[1]["flops"] == res.report.after.flops // 4
    assert rows[0]["bytes"] == big.stat().st_size
    assert rows[0]["top1"] == pytest.approx(0.9) and rows[0]["agreement"] == 1.0
    import onnxruntime as ort

    xs = np.load(data)["x"]
    pred = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"]).run(None, {"x": xs})[0].argmax(1)
    with torch.no_grad():
        ref = model(torch.from_numpy(xs)).argmax(1).numpy()
    assert rows[1]["agreement"] == pytest.approx(float((pred == ref).mean()))
    assert rows[1]["top1"] == pytest.approx(float((pred == np.load(data)["labels"]).mean()))
    for r in rows:
        assert set(r["latency"]) == {"1", "8"}
        assert all(0 < v["median_ms"] <= v["p90_ms"] for v in r["latency"].values())


def test_bench_refuses_a_batch_a_fixed_model_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, inputs = ZOO["mlp"]()
    proto = ns.compile(model, [], example_inputs=inputs, target="onnx").model
    for v in [*proto.graph.input, *proto.graph.output]:  # a model exported with a fixed batch of 4
        v.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(proto, tmp_path / "m.onnx")
    assert main(["bench", str(tmp_path / "m.onnx"), "--batch", "1"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: '{tmp_path / 'm.onnx'}': input 'x' has a fixed batch size "
                                               "of 4; it cannot run at batch 1 (--batch)")
    assert main(["bench", str(tmp_path / "m.onnx"), "--batch", "1,x"]) == 2  # a usage error
    assert "--batch expects positive integers separated by commas (1,64), got '1,x'" in capsys.readouterr().err


def test_measure_times_models_side_by_side() -> None:
    wide = torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 256)).eval()
    narrow = torch.nn.Sequential(torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 256)).eval()
    lw, ln = measure([wide, narrow], (torch.randn(64, 256),), runtime="torch", rounds=5)
    assert (lw.batch, lw.threads, lw.rounds, lw.runtime) == (64, 1, 5, "torch")
    assert lw.median_ms > ln.median_ms > 0  # 256x the FLOPs
    with pytest.raises(NetsqueezeError, match=r"unknown runtime 'tvm' \(use ort or torch\)"):
        measure([wide], (torch.randn(1, 256),), runtime="tvm")  # type: ignore[arg-type]


def test_bench_says_what_is_wrong_with_the_users_files(models: tuple[Path, Path, Path, torch.nn.Module,
                                                                     ns.CompileResult],
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing model, data of the wrong shape, labels for a model that does not output class scores: errors
    naming the file (they were internal errors, exit 4, 'this is a bug in netsqueeze')."""
    big, _, _, _, _ = models
    assert main(["bench", str(tmp_path / "nosuch.onnx")]) == 3
    assert capsys.readouterr().err.strip() == f"error: cannot read ONNX model '{tmp_path / 'nosuch.onnx'}': no such file"
    np.savez(tmp_path / "wrong.npz", x=np.zeros((10, 7), np.float32))
    assert main(["bench", str(big), "--data", str(tmp_path / "wrong.npz"), "--rounds", "1"]) == 1
    assert capsys.readouterr().err.strip() == (f"node 'x': error: --data '{tmp_path / 'wrong.npz'}': input 'x' has "
                                               "shape [10, 7] but the model expects [N, 20]")
    flat = ns.compile(torch.nn.Sequential(torch.nn.Flatten(0)).eval(), [], example_inputs=(torch.randn(2, 20),),
                      target="onnx", dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    onnx.save(flat.model, tmp_path / "flat.onnx")
    np.savez(tmp_path / "labelled.npz", input=np.zeros((10, 20), np.float32), labels=np.zeros(10, np.int64))
    assert main(["bench", str(tmp_path / "flat.onnx"), "--data", str(tmp_path / "labelled.npz"), "--rounds", "1"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: --data: '{tmp_path / 'flat.onnx'}' outputs shape [200] for 10 "
                                               "samples, not class scores [N, classes]: top-1 and agreement need them")
