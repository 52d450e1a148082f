"""`make demo`: compresses a trained CNN on scikit-learn's handwritten digits and shows what changed.

Prints held-out top-1 before/after, params/FLOPs/weight bytes, latency measured side by side (torch eager and
ONNX Runtime, batch 1 and 64), compile time, and writes the model and its reports (HTML and JSON).

    .venv/bin/python examples/demo.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "digits"))
from model import build, calibration, test_split  # noqa: E402

import netsqueeze as ns  # noqa: E402
from netsqueeze.backends.onnx import to_onnx  # noqa: E402
from netsqueeze.compiler.files import save_model  # noqa: E402
from netsqueeze.compiler.latency import measure  # noqa: E402

BATCHES = (1, 64)


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 128]).argmax(1) for i in range(0, len(x), 128)])
    return float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "netsqueeze-demo"),
                    help="where the model and reports go (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="threads for the latency measurement")
    a = ap.parse_args(argv)
    a.threads = max(1, a.threads)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    model, example = build()
    xt, yt = test_split()
    calib = out / "calibration.npz"
    np.savez(calib, **calibration())  # labelled: `recover` adds cross-entropy on the labels

    t = time.perf_counter()
    policy = Path(os.path.relpath(HERE / "demo.sqz"))  # the report names policy lines as the user sees them
    res = ns.compile(model, policy, example_inputs=example, calibration=calib,
                     eval_fn=lambda m: top1(m, xt, yt),
                     dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    seconds = time.perf_counter() - t
    rep = res.report
    original = ns.import_model(model, example, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})

    model_path, html, js = out / "digits_small.onnx", out / "report.html", out / "report.json"
    onnx_model = to_onnx(res.graph)
    save_model(onnx_model, model_path)
    rows = []
    for runtime in ("torch", "ort"):
        models = [model, res.model] if runtime == "torch" else [to_onnx(original), onnx_model]
        for batch in BATCHES:
            lo, lc = measure(models, (xt[:batch],), runtime=runtime, threads=a.threads)
            rep.latency += [{"model": "original", **lo.to_dict()}, {"model": "compressed", **lc.to_dict()}]
            rows.append((runtime, batch, lo, lc))
    html.write_text(rep.to_html(), encoding="utf-8")
    js.write_text(rep.to_json(), encoding="utf-8")

    b, f = rep.before, rep.after
    print(f"netsqueeze demo: {rep.model_name}, trained on scikit-learn digits, {len(yt)} held-out images")
    print(f"  top-1 (held out)   {rep.fidelity['top1_original']:.2%} -> {rep.fidelity['top1']:.2%}"
          f"   (guard: drop <= 1%, reached {rep.fidelity['top1_drop']:+.2%})")
    print(f"  params             {b.params:,} -> {f.params:,}   ({b.params / f.params:.2f}x smaller)")
    print(f"  FLOPs / image      {b.flops:,} -> {f.flops:,}   ({b.flops / f.flops:.2f}x fewer)")
    print(f"  weight bytes       {b.param_bytes:,} -> {f.param_bytes:,}")
    print(f"  compile time       {seconds:.1f} s  (passes: {', '.join(r.name for r in rep.passes)})")
    print(f"  latency, median ms per call ({a.threads} thread(s); original and compressed timed side by side):")
    for runtime, batch, lo, lc in rows:
        name = "ONNX Runtime" if runtime == "ort" else "torch eager"
        print(f"    {name:<13} batch {batch:<3} {lo.median_ms:8.3f} -> {lc.median_ms:8.3f}"
              f"   ({lo.median_ms / lc.median_ms:.2f}x faster)")
    print(f"wrote {model_path}")
    print(f"wrote {html} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
