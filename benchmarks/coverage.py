"""Model coverage: HF `transformers` models built from tiny configs (random weights, no network) through
every route netsqueeze offers, with the reason for every failure. Writes docs/models.md.

    .venv/bin/python benchmarks/coverage.py [--models bert,vit,...]

Routes per model:
- torch identity: capture (torch.export) → IR → torch module, relative error against the model;
- torch → ONNX: the captured IR emitted as ONNX, run in ONNX Runtime;
- ONNX → netsqueeze: the model exported by torch's own ONNX exporter (dynamic batch), imported and emitted
  again as ONNX and as torch, each run at the export batch and at another batch size;
- trim 30% / squeeze_fold ratio 0.7: run on the captured IR, verified, output shape unchanged, and run in torch.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import netsqueeze as ns  # noqa: E402
from netsqueeze.backends.onnx import to_onnx  # noqa: E402
from netsqueeze.backends.torch import to_torch  # noqa: E402
from netsqueeze.frontends.onnx import from_onnx  # noqa: E402
from netsqueeze.ir import graph_stats  # noqa: E402
from netsqueeze.passes import PassContext  # noqa: E402
from netsqueeze.passes.squeeze_fold import SqueezeFold  # noqa: E402
from netsqueeze.passes.trim import Trim  # noqa: E402
from tests.frontends.onnx_models import run  # noqa: E402
from tests.models.test_hf_capture import CASES  # noqa: E402

OUT = ROOT / "docs" / "models.md"
TOL = 1e-4


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def _cell(fn: Callable[[], str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # the table records every failure's reason
        msg = getattr(e, "message", None) or str(e).splitlines()[0]
        out = f"fails: {type(e).__name__}: {msg[:160]}"
    return out, time.perf_counter() - t0


def _ok(err: float) -> str:
    return f"ok ({err:.1e})" if err <= TOL else f"wrong ({err:.1e})"


def _other_batch(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([x, x[:1]]) for x in xs)  # batch + 1, same content for the new row


def _torch_export_onnx(model: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(xs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, buf, input_names=names, output_names=["out"], dynamo=False, opset_version=17,
                          dynamic_axes={**{n: {0: "batch"} for n in names}, "out": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def cover(name: str) -> dict[str, str]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES[name].build()
    with torch.no_grad():
        ref = model(*xs).numpy()
    row: dict[str, str] = {"model": name}
    graph: dict[str, Any] = {}

    def capture() -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph["g"] = ns.import_model(model, xs)
        g = graph["g"]
        with torch.no_grad():
            err = _rel(to_torch(g)(*xs).numpy(), ref)
        opaque = sorted({n.origin.op_type for n in g.nodes() if n.kind == "opaque"})
        row["opaque ops"] = ", ".join(opaque) or "-"
        return _ok(err)

    row["torch identity"], t = _cell(capture)
    row["capture s"] = f"{t:.1f}"
    if "g" not in graph:
        row["opaque ops"] = "-"
        for k in ("torch → ONNX", "ONNX → netsqueeze", "dynamic batch (torch, batch+1)", "trim 30%",
                  "squeeze_fold 0.7"):
            row[k] = "not captured"
        return row
    g = graph["g"]

    def to_ort() -> str:
        (y,) = run(to_onnx(g), *[x.numpy() for x in xs])
        return _ok(_rel(y, ref))

    row["torch → ONNX"], _ = _cell(to_ort)

    def onnx_route() -> str:
        m = _torch_export_onnx(model, xs)
        model.eval()
        inputs = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
        back = from_onnx(m, input_shapes={n: tuple(x.shape) for n, x in zip(inputs, xs)})  # analysed at the example
        results = []
        for batch_xs in (xs, _other_batch(xs)):
            try:
                (want,) = run(m, *[x.numpy() for x in batch_xs])
            except Exception:  # the exporter itself fixed the batch: nothing to compare against
                results.append("the exported model itself fails at this batch")
                continue
            try:
                (y,) = run(to_onnx(back), *[x.numpy() for x in batch_xs])
                with torch.no_grad():
                    yt = to_torch(back)(*batch_xs).numpy()
                results.append(_ok(max(_rel(y, want), _rel(yt, want))))
            except Exception as e:  # recorded per batch size
                results.append(f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return f"{results[0]}; batch {xs[0].shape[0] + 1}: {results[1]}"

    row["ONNX → netsqueeze"], _ = _cell(onnx_route)

    def dynamic_batch() -> str:
        batch = torch.export.Dim("batch", min=1, max=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = ns.import_model(model, xs, dynamic_shapes={"xs": tuple({0: batch} for _ in xs)})
        bigger = _other_batch(xs)
        model.eval()  # torch.onnx.export above may leave it in training mode
        with torch.no_grad():
            want = model(*bigger).numpy()
            y = to_torch(h)(*bigger).numpy()
        try:
            (yo,) = run(to_onnx(h), *[x.numpy() for x in bigger])
            onnx_cell = _ok(_rel(yo, want))
        except Exception as e:  # the torch half still counts
            onnx_cell = f"fails: {type(e).__name__}: {(getattr(e, 'message', None) or str(e)).splitlines()[0][:120]}"
        return f"torch {_ok(_rel(y, want))}, ONNX {onnx_cell}"

    row["dynamic batch (torch, batch+1)"], _ = _cell(dynamic_batch)

    def structural(p: Any) -> Callable[[], str]:
        def go() -> str:
            h = g.copy()
            ctx = PassContext(stream_fn=_stream(h, xs))
            r = p.run(h, ctx)
            h.verify()
            with torch.no_grad():
                y = to_torch(h)(*xs)
            if tuple(y.shape) != ref.shape:
                return f"wrong output shape {list(y.shape)}"
            before, after = graph_stats(g).params, graph_stats(h).params
            return f"ok, params {before / max(1, after):.2f}x" if r.changed else "ok, nothing prunable"
        return go

    row["trim 30%"], _ = _cell(structural(Trim(criterion="l1", ratio=0.3)))
    row["squeeze_fold 0.7"], _ = _cell(structural(SqueezeFold(ratio=0.3)))
    return row


def _stream(graph: Any, xs: tuple[torch.Tensor, ...]) -> Any:
    """Calibration activations at the tapped values: the example batch, run through the emitted graph."""
    def stream(g: Any, values: Any) -> Any:
        module = to_torch(g, extra_outputs=list(values))
        with torch.no_grad():
            out = module(*xs)
        n = len(out) - len(values)
        yield [t for t in out[n:]]
    return stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CASES), help="comma-separated subset")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [cover(n) for n in args.models.split(",")]
    cols = ["model", "torch identity", "torch → ONNX", "ONNX → netsqueeze", "dynamic batch (torch, batch+1)",
            "trim 30%", "squeeze_fold 0.7", "capture s", "opaque ops"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "-").replace("|", "\\|") for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    text = (
        "# Model coverage\n\n"
        "HF `transformers` models built from tiny configs with random weights (no network), through every "
        "route; written by `.venv/bin/python benchmarks/coverage.py`. `ok (e)`: within 1e-4 relative of the "
        "reference (e = max error / max |reference|). ONNX → netsqueeze: the model exported by "
        "`torch.onnx.export` (TorchScript exporter, dynamic batch), imported, emitted as ONNX and as torch, run "
        "at the export batch and at batch + 1. dynamic batch: captured from torch with `dynamic_shapes` marking the "
        "batch of every input, emitted, and run at batch + 1. trim / squeeze_fold run on the captured IR with the example "
        "batch as calibration data (the ratio is of each channel group).\n\n" + table + "\n")
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
