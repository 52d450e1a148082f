"""Model coverage: HF `transformers` models built from tiny configs (random weights, no network) through
every route netsqueeze offers, with the reason for every failure. Writes docs/models.md.

    .venv/bin/python benchmarks/coverage.py [--models bert,vit,...]

Routes per model:
- torch identity: capture (torch.export, the batch dynamic by default) → IR → torch module, relative error
  against the model;
- torch → ONNX: the captured IR emitted as ONNX, run in ONNX Runtime;
- ONNX → netsqueeze: the model exported by torch's TorchScript ONNX exporter (dynamic batch, and sequence for
  text and audio), imported and emitted again as ONNX and as torch, each run at the export's sizes, at batch + 1
  and (text, audio) at a 1.5x longer sequence;
- default capture at batch + 1: the graph captured without `dynamic_shapes` run at another batch in torch and ORT;
- groups: prunable / frozen channel groups of the captured IR (the first frozen reason that is not the residual
  stream's);
- trim 30% / squeeze_fold ratio 0.7: run on the captured IR, verified, output shape unchanged, and run in torch.

A second table covers ONNX models exported by other frameworks (tests/data/foreign/README.md).
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
from netsqueeze.passes.dependency import find_groups  # noqa: E402
from netsqueeze.passes.squeeze_fold import SqueezeFold  # noqa: E402
from netsqueeze.passes.trim import Trim  # noqa: E402
from tests.frontends.onnx_models import run  # noqa: E402
from tests.models.test_foreign_onnx import CASES as FOREIGN  # noqa: E402
from tests.models.test_foreign_onnx import _relaxed  # noqa: E402
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


def _axes(xs: tuple[torch.Tensor, ...]) -> dict[int, str]:
    """The dynamic axes of the export: batch, and the sequence of 2-D (token or waveform) inputs."""
    return {0: "batch", 1: "seq"} if xs[0].dim() == 2 else {0: "batch"}


def _torch_export_onnx(model: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(xs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, buf, input_names=names, output_names=["out"], dynamo=False, opset_version=17,
                          dynamic_axes={**{n: _axes(xs) for n in names}, "out": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _longer(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([x, x[:, :x.shape[1] // 2]], 1) for x in xs)  # the sequence 1.5x, its first half again


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
        for k in ("torch → ONNX", "ONNX → netsqueeze", "default capture at batch+1", "groups prunable / frozen",
                  "trim 30%", "squeeze_fold 0.7"):
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
        sizes = [xs, _other_batch(xs)] + ([_longer(_other_batch(xs))] if 1 in _axes(xs) else [])
        for batch_xs in sizes:
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
        out = f"{results[0]}; batch {xs[0].shape[0] + 1}: {results[1]}"
        return out + (f"; seq {sizes[2][0].shape[1]}: {results[2]}" if len(results) > 2 else "")

    row["ONNX → netsqueeze"], _ = _cell(onnx_route)

    def dynamic_batch() -> str:
        h = g  # captured without dynamic_shapes: the batch is dynamic by default
        if g.meta.get("notes"):
            return "batch fixed: " + "; ".join(g.meta["notes"])[:160]
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

    row["default capture at batch+1"], _ = _cell(dynamic_batch)

    def groups() -> str:
        found = find_groups(g)
        prunable = found.prunable()
        frozen = [gr for gr in found.groups if gr not in prunable]
        reasons = [str(gr.frozen) for gr in frozen if gr.frozen and "reduces this axis" not in str(gr.frozen)]
        out = f"{len(prunable)} / {len(frozen)}"
        return out + (f" ({reasons[0][:100]})" if reasons else "")

    row["groups prunable / frozen"], _ = _cell(groups)

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


def foreign(name: str) -> dict[str, str]:
    """An ONNX model of another framework: import, ONNX and torch round trip at two sizes, trim 30%."""
    load, _, names, sizes, _ = FOREIGN[name]
    m = _relaxed(load(), names)
    row = {"model": name, "exporter": f"{m.producer_name} (opset {m.opset_import[0].version})",
           "dynamic dims": ", ".join(n for n in names if n)}
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    graph: dict[str, Any] = {}

    def round_trip() -> str:
        graph["g"] = g = from_onnx(m, example_shapes=[sizes[0]])
        cells = []
        for x in xs:
            (want,) = run(m, x)
            (y,) = run(to_onnx(g), x)
            with torch.no_grad():
                yt = to_torch(g)(torch.from_numpy(x)).numpy()
            cells.append(f"{list(x.shape)}: ONNX {_ok(_rel(y, want))}, torch {_ok(_rel(yt, want))}")
        return "; ".join(cells)

    row["import, round trip"], t = _cell(round_trip)
    row["import + round trip s"] = f"{t:.1f}"
    if "g" not in graph:
        row["trim 30%"] = "not imported"
        return row

    def trim() -> str:
        g = graph["g"]
        h = g.copy()
        Trim(criterion="l1", ratio=0.3).run(h, PassContext())
        h.verify()
        for x in xs:
            (want,) = run(m, x)
            (y,) = run(to_onnx(h), x)
            if y.shape != want.shape:
                return f"wrong output shape {list(y.shape)} at {list(x.shape)}"
        return f"ok at both sizes, params {graph_stats(g).params / max(1, graph_stats(h).params):.2f}x"

    row["trim 30%"], _ = _cell(trim)
    return row


def _markdown(rows: list[dict[str, str]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "-").replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CASES), help="comma-separated subset")
    ap.add_argument("--foreign", default=",".join(FOREIGN), help="comma-separated subset of the foreign ONNX models")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [cover(n) for n in args.models.split(",") if n]
    cols = ["model", "torch identity", "torch → ONNX", "ONNX → netsqueeze", "default capture at batch+1",
            "groups prunable / frozen", "trim 30%", "squeeze_fold 0.7", "capture s", "opaque ops"]
    table = _markdown(rows, cols)
    print(table)
    frows = [foreign(n) for n in args.foreign.split(",") if n]
    ftable = _markdown(frows, ["model", "exporter", "dynamic dims", "import, round trip", "trim 30%",
                               "import + round trip s"])
    print(ftable)
    text = (
        "# Model coverage\n\n"
        "HF `transformers` models built from tiny configs with random weights (no network), through every "
        "route; written by `.venv/bin/python benchmarks/coverage.py`. `ok (e)`: within 1e-4 relative of the "
        "reference (e = max error / max |reference|). torch identity: captured with torch.export, the batch dynamic "
        "by default (no `dynamic_shapes`), emitted as torch. ONNX → netsqueeze: the model exported by "
        "`torch.onnx.export` (TorchScript exporter, `dynamo=False`; dynamic batch, and sequence for the text and audio "
        "models), imported, emitted as ONNX and as torch, run at the export's sizes, at batch + 1 and at a 1.5x longer "
        "sequence. default capture at batch+1: the default capture emitted and run at batch + 1 in torch and "
        "ONNX Runtime. groups: prunable / frozen channel groups (a transformer's heads are one group per layer; the "
        "residual stream is frozen by its LayerNorms, the image models' input channels by the graph input; the "
        "reason shown is the first frozen group's, RMSNorm reductions left out). "
        "trim / squeeze_fold run on the captured IR with the example batch as calibration data (the ratio is of "
        "each channel group).\n\n" + table + "\n\n"
        "## ONNX models exported by other frameworks\n\n"
        "Where each file comes from: `tests/data/foreign/README.md`. The files fix their input shapes although "
        "their graphs run at any batch and image size: the dims listed are declared dynamic in a copy, which ONNX "
        "Runtime runs as the reference. Weights of the onnx-caffe2 models are randomised (the wheel ships them "
        "constant).\n\n" + ftable + "\n")
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
