"""Static int8 quantization side by side: netsqueeze `quantize` (each observer; with and without
`equalize` and bias correction; after `squeeze_fold`) against ONNX Runtime's `quantize_static` (MinMax,
Percentile, Entropy) and NNCF post-training quantization, on the same calibration images, in one run.

Models: the Fashion-MNIST VGG-style and ResNet-style models of the other benchmarks (trained once and
cached under benchmarks/cache/), plus the byte-level transformer language model of
benchmarks/quantize_lm.py (weight-only int8/int4, RTN and GPTQ).
Figures: top-1 on the full 10,000-image test set (run in ONNX Runtime), model bytes (the serialized
ONNX file), ONNX Runtime CPU latency at batch 1 and 64 (2 threads, medians of 50 runs).

    .venv/bin/pip install -e '.[dev,bench]'        # nncf (the peer), matplotlib
    .venv/bin/python benchmarks/quantize.py [--models vgg,resnet] [--no-lm]
                                                   → benchmarks/results/quantize.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import netsqueeze as ns  # noqa: E402
from benchmarks.common import RESULTS, fashion_mnist, markdown_table, ort_latency, trained  # noqa: E402

CALIB = 512
HEADER = ["model", "method", "top-1", "drop (pt)", "bytes", "smaller", "ORT b1 ms", "ORT b64 ms", "faster b1",
          "faster b64", "compile s"]


def ort_top1(blob: bytes, x: torch.Tensor, y: torch.Tensor) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), 1000):
        out = sess.run(None, {name: x[i:i + 1000].numpy()})[0]
        correct += int((out.argmax(1) == y[i:i + 1000].numpy()).sum())
    return correct / len(x)


def ns_onnx(model: torch.nn.Module, body: str, calib: torch.Tensor, budget: str = "") -> onnx.ModelProto:
    text = (f"policy bench {{\n  calibrate samples {len(calib)}, batch 128\n"
            f"{budget}{body}\n}}\n")
    res = ns.compile(model, text, example_inputs=(calib[:2],), calibration=calib, target="onnx")
    return res.model  # type: ignore[no-any-return]


class _Reader:
    def __init__(self, calib: torch.Tensor, name: str) -> None:
        self.batches = iter([{name: calib[i:i + 128].numpy()} for i in range(0, len(calib), 128)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ort_static(fp32: onnx.ModelProto, calib: torch.Tensor, method: str) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        onnx.save(fp32, src)
        reader = _Reader(calib, fp32.graph.input[0].name)
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
        return onnx.load(str(dst))


def nncf_ptq(fp32: onnx.ModelProto, calib: torch.Tensor) -> onnx.ModelProto:
    import nncf

    name = fp32.graph.input[0].name
    data = nncf.Dataset([calib[i:i + 128].numpy() for i in range(0, len(calib), 128)], lambda b: {name: b})
    return nncf.quantize(fp32, data, subset_size=len(calib))  # type: ignore[no-any-return]


def measure(label: str, method: str, build: Callable[[], onnx.ModelProto], data: dict[str, torch.Tensor],
            base: dict[str, float] | None) -> tuple[list[str], dict[str, float]]:
    t0 = time.perf_counter()
    try:
        model = build()
    except Exception as e:  # a peer that fails is a row, not a crash
        print(f"{label} {method}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return [label, method, "failed", "", "", "", "", "", "", "", ""], {}
    secs = time.perf_counter() - t0
    blob = model.SerializeToString()
    top1 = ort_top1(blob, data["test_x"], data["test_y"])
    b1, b64 = ort_latency(blob, 1), ort_latency(blob, 64)
    m = {"top1": top1, "bytes": float(len(blob)), "b1": b1, "b64": b64}
    ref = base or m
    row = [label, method, f"{top1:.2%}", f"{(ref['top1'] - top1) * 100:+.2f}", f"{len(blob):,}",
           f"{ref['bytes'] / len(blob):.2f}x", f"{b1:.3f}", f"{b64:.2f}", f"{ref['b1'] / b1:.2f}x",
           f"{ref['b64'] / b64:.2f}x", f"{secs:.1f}"]
    print(" | ".join(row), file=sys.stderr)
    return row, m


def run_cnn(name: str, data: dict[str, torch.Tensor]) -> list[list[str]]:
    model = trained(name, data)
    gen = torch.Generator().manual_seed(0)
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=gen)[:CALIB]]
    fp32 = ns_onnx(model, "  fold_bn", calib)
    rows = []
    row, base = measure(name, "fp32", lambda: fp32, data, None)
    rows.append(row)
    cases: list[tuple[str, Callable[[], onnx.ModelProto]]] = [
        (f"ORT quantize_static {m}", lambda m=m: ort_static(fp32, calib, m))  # type: ignore[misc]
        for m in ("MinMax", "Percentile", "Entropy")]
    cases.append(("NNCF PTQ (default preset)", lambda: nncf_ptq(fp32, calib)))
    for obs in ("minmax", "percentile", "entropy", "mse"):
        cases.append((f"netsqueeze quantize {obs}", lambda obs=obs: ns_onnx(  # type: ignore[misc]
            model, f"  fold_bn\n  quantize {{ calibrate = {obs} }}", calib)))
    cases.append(("netsqueeze quantize minmax, no bias correction", lambda: ns_onnx(
        model, "  fold_bn\n  quantize { bias_correction = false }", calib)))
    cases.append(("netsqueeze equalize + quantize minmax", lambda: ns_onnx(
        model, "  fold_bn\n  equalize\n  quantize", calib)))
    cases.append(("netsqueeze equalize + quantize mse", lambda: ns_onnx(
        model, "  fold_bn\n  equalize\n  quantize { calibrate = mse }", calib)))
    if name == "vgg":
        for share in (20, 25):
            budget = f"  budget params <= {share}%\n  bounds {{ round_to = 8 }}\n"
            cases.append((f"netsqueeze squeeze_fold (params <= {share}%)", lambda b=budget: ns_onnx(  # type: ignore[misc]
                model, "  fold_bn\n  squeeze_fold", calib, b)))
            cases.append((f"netsqueeze squeeze_fold (params <= {share}%) + quantize mse", lambda b=budget: ns_onnx(  # type: ignore[misc]
                model, "  fold_bn\n  squeeze_fold\n  quantize { calibrate = mse }", calib, b)))
    for method, build in cases:
        rows.append(measure(name, method, build, data, base)[0])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--no-lm", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data = fashion_mnist()
    rows: list[list[str]] = []
    for name in args.models.split(","):
        rows += run_cnn(name, data)
    text = ["# Static int8 quantization (benchmarks/quantize.py)", "",
            f"Fashion-MNIST, {CALIB} calibration images (the same for every method), top-1 on the 10,000 test "
            "images in ONNX Runtime; bytes = serialized ONNX model; ORT CPU latency, 2 threads, medians of 50 "
            "runs; ratios against fp32 of the same model in the same run. All int8 rows: per-channel int8 "
            "weights, uint8 activations, QDQ format.", "", markdown_table(HEADER, rows)]
    if not args.no_lm:
        from benchmarks.quantize_lm import LM_HEADER, run_lm

        text += ["", "## Weight-only quantization of a byte-level transformer LM (benchmarks/quantize_lm.py)", "",
                 markdown_table(LM_HEADER, run_lm())]
    out = RESULTS / "quantize.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(text) + "\n")
    tmp.replace(out)
    print("\n".join(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
