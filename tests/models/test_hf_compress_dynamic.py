"""HF models compressed with a dynamic batch: `trim`, `squeeze_fold` and `quantize` run on the graph captured
with a symbolic batch, and the compressed model runs at another batch size in torch and in ONNX Runtime
with the same outputs (trim and squeeze_fold: 1e-4 relative; quantize: a few output grid steps)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import netsqueeze
from netsqueeze.backends.onnx import to_onnx
from tests.frontends.onnx_models import run
from tests.models.test_hf_capture import CASES

POLICIES = {
    "trim": "trim { criterion = l1, ratio = 25% }",
    "squeeze_fold": "squeeze_fold { ratio = 25% }",
    "quantize": "quantize",
}
MODELS = ["bert", "gpt2", "vit", "resnet", "convnext", "regnet", "efficientnet"]


# trim on every model in `make test`; the slower squeeze_fold and quantize cases on two of them (the rest slow)
CASES_RUN = [pytest.param(n, p, marks=[] if (p == "trim" and n != "efficientnet") or n in ("bert", "vit")
                          else [pytest.mark.slow])
             for n in MODELS for p in sorted(POLICIES)]


@pytest.mark.parametrize(("name", "policy"), CASES_RUN)
def test_compressed_hf_model_runs_at_another_batch(name: str, policy: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES[name].build()
        batch = torch.export.Dim("batch", min=1, max=64)
        calib = [tuple(torch.cat([x, x.flip(0)]) for x in xs)]
        res = netsqueeze.compile(model, f"policy p {{ {POLICIES[policy]} }}", example_inputs=xs,
                                 calibration=calib, dynamic_shapes={"xs": tuple({0: batch} for _ in xs)})
    g = res.graph
    g.verify()
    if policy != "quantize":
        assert res.report.after.params < res.report.before.params, (name, policy)
    bigger = tuple(torch.cat([x, x[:1]]) for x in xs)
    with torch.no_grad():
        got = res.model(*bigger)
        want = model(*bigger)
    got = (got[0] if isinstance(got, (tuple, list)) else got).numpy()
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    assert got.shape == want.shape
    (y,) = run(to_onnx(g), *[x.numpy() for x in bigger])
    scale = max(1.0, float(np.abs(y).max()))
    out = g.node(g.operands(g.outputs[0])[0][0])
    tol = 1e-4 * scale
    if policy == "quantize":
        assert g.by_kind("quantize")
        step = out.params["scale"].item() if out.kind == "dequantize" else 0.0
        tol = 2 * step + 1e-3 * scale
    assert float(np.abs(y - got).max()) <= tol, (name, policy, float(np.abs(y - got).max()), tol)


def test_squeeze_fold_meets_a_flops_budget_on_regnet_whose_grouped_convs_get_intercepts() -> None:
    # squeeze_fold folds a per-conv-group intercept into each grouped conv reading a squeezed group, which adds
    # a bias where it had none; the budget meter counts it (it did not: 80.1% reached under `flops <= 80%`)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES["regnet"].build()
        calib = torch.randn(8 * xs[0].shape[0], *xs[0].shape[1:])
        res = netsqueeze.compile(model, f"policy p {{\n  calibrate samples {len(calib)}, batch {len(xs[0])}\n"
                                        "  budget flops <= 80%\n  squeeze_fold\n}\n",
                                 example_inputs=xs, calibration=calib, progress=False)
    notes = next(r for r in res.report.passes if r.name == "squeeze_fold").result.notes
    assert res.report.after.flops <= 0.8 * res.report.before.flops
    assert res.report.after.flops == 1_267_544
    assert notes[-1] == "squeezed 5 groups (4 in parallel, 1 in cascade): 16->14, 8->6, 8->5, 4->2, 4->3"
