"""Static int8 quantization side by side: netsqueeze `quantize` (each observer; with and without
`equalize` and bias correction; after `squeeze_fold`) against ONNX Runtime's `quantize_static` (MinMax,
Percentile, Entropy) and NNCF post-training quantization, on the same calibration images, in one run.

Models: the Fashion-MNIST VGG-style and ResNet-style models of the other benchmarks (trained once and
cached under benchmarks/cache/), plus the byte-level transformer language model of
benchmarks/quantize_lm.py (weight-only int8/int4, RTN and GPTQ).
Figures: top-1 on the full 10,000-image test set (run in ONNX Runtime), model bytes (the serialized
ONNX file), ONNX Runtime CPU latency at batch 1 and 64 (2 threads; medians over rounds that time every model of a
table in turns, so that the ratios hold on a loaded machine).

    .venv/bin/pip install -e '.[dev,bench]'        # nncf (the peer), matplotlib
    .venv/bin/python benchmarks/quantize.py [--models vgg,resnet] [--no-lm]
                                                   → benchmarks/results/quantize.md
"""

from __future__ import annotations

import argparse
import statistics
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
from benchmarks.common import RESULTS, fashion_mnist, markdown_table, trained  # noqa: E402

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


ROUNDS = 15  # latency: medians over rounds that interleave every model of a table (b1: 5 runs a round, b64: 1)


def session(blob: bytes):  # type: ignore[no-untyped-def]
    """A 2-thread session whose worker threads sleep between runs, as netsqueeze times (compiler.latency): busy-
    waiting, the sessions timed in turns slow each other (benchmarks/ort_spinning.py)."""
    import onnxruntime as ort

    from netsqueeze.compiler.latency import ort_session_options

    return ort.InferenceSession(blob, ort_session_options(2), providers=["CPUExecutionProvider"])


def interleaved_latency(blobs: list[bytes], batches: tuple[int, ...] = (1, 64)) -> list[dict[int, float]]:
    """Median ms per model and batch, the models timed in turns round after round so that a change of load on
    the machine reaches all of them alike."""
    sessions = [session(b) for b in blobs]
    feeds = {b: np.random.default_rng(0).standard_normal((b, 1, 28, 28), dtype=np.float32) for b in batches}
    times: list[dict[int, list[float]]] = [{b: [] for b in batches} for _ in blobs]
    for s in sessions:  # warm-up
        for b in batches:
            s.run(None, {s.get_inputs()[0].name: feeds[b]})
    for _ in range(ROUNDS):
        for i, s in enumerate(sessions):
            name = s.get_inputs()[0].name
            for b in batches:
                runs = []
                for _ in range(5 if b == 1 else 1):
                    t0 = time.perf_counter()
                    s.run(None, {name: feeds[b]})
                    runs.append((time.perf_counter() - t0) * 1000)
                times[i][b].append(statistics.median(runs))
    return [{b: statistics.median(t[b]) for b in batches} for t in times]


def build(label: str, method: str, make: Callable[[], onnx.ModelProto], data: dict[str, torch.Tensor]
          ) -> dict[str, object] | None:
    t0 = time.perf_counter()
    try:
        model = make()
    except Exception as e:  # a peer that fails is a row, not a crash
        print(f"{label} {method}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    secs = time.perf_counter() - t0
    blob = model.SerializeToString()
    top1 = ort_top1(blob, data["test_x"], data["test_y"])
    print(f"{label} | {method} | {top1:.2%} | {len(blob):,} bytes | {secs:.1f} s", file=sys.stderr)
    return {"method": method, "blob": blob, "top1": top1, "secs": secs}


def table_rows(label: str, built: list[dict[str, object] | None], methods: list[str]) -> list[list[str]]:
    ok = [b for b in built if b is not None]
    lat = interleaved_latency([b["blob"] for b in ok])  # type: ignore[misc]
    for b, t in zip(ok, lat):
        b["lat"] = t
    ref = ok[0]
    rows = []
    for method, b in zip(methods, built):
        if b is None:
            rows.append([label, method, "failed"] + [""] * (len(HEADER) - 3))
            continue
        n, rn = len(b["blob"]), len(ref["blob"])  # type: ignore[arg-type]
        t, rt = b["lat"], ref["lat"]
        rows.append([label, method, f"{b['top1']:.2%}", f"{(ref['top1'] - b['top1']) * 100:+.2f}",  # type: ignore[operator]
                     f"{n:,}", f"{rn / n:.2f}x", f"{t[1]:.3f}", f"{t[64]:.2f}", f"{rt[1] / t[1]:.2f}x",  # type: ignore[index]
                     f"{rt[64] / t[64]:.2f}x", f"{b['secs']:.1f}"])  # type: ignore[index]
    return rows


def run_cnn(name: str, data: dict[str, torch.Tensor]) -> list[list[str]]:
    model = trained(name, data)
    gen = torch.Generator().manual_seed(0)
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=gen)[:CALIB]]
    fp32 = ns_onnx(model, "  fold_bn", calib)
    cases: list[tuple[str, Callable[[], onnx.ModelProto]]] = [("fp32", lambda: fp32)]
    cases += [(f"ORT quantize_static {m}", lambda m=m: ort_static(fp32, calib, m))  # type: ignore[misc]
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
    built = [build(name, method, make, data) for method, make in cases]
    return table_rows(name, built, [m for m, _ in cases])


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
            "images in ONNX Runtime; bytes = serialized ONNX model; ORT CPU latency, 2 threads (sleeping between runs: "
            "`session.intra_op.allow_spinning = 0`), medians over "
            f"{ROUNDS} rounds that time the models of a table in turns; ratios against fp32 of the same model in the same run. All int8 rows: per-channel int8 "
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
