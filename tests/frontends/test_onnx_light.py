"""The onnx package's light models: import, verify, round-trip onnx→IR→onnx, fp16, checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.frontends.onnx import from_onnx
from tests.frontends.onnx_models import (
    LIGHT_MODELS,
    LIGHT_PARAMS,
    light_path,
    randomized,
    randomized_reference,
    run,
    session,
    sha256,
)

assert len(LIGHT_MODELS) == 9, LIGHT_MODELS


# 240-550 MB of weights each: their shipped file is imported by the onnx→torch route test, and their
# fp16 export is checked for size and validity but not run (every other model runs it), to keep this fast.
BIG = {"bvlc_alexnet", "vgg19", "zfnet512"}


@pytest.mark.parametrize("name", LIGHT_PARAMS)
def test_light_model(name: str) -> None:
    path = light_path(name)
    if name not in BIG:
        before = sha256(path)
        g = from_onnx(path)
        assert sha256(path) == before  # the input file is never modified
        g.verify()

    # The shipped weights are constants (the stored output is input-independent); that output is
    # checked on the onnx→torch route (tests/test_onnx_routes.py), which is cheaper than a second ORT run.
    # Random weights: the round trip must reproduce the original graph's ORT output.
    model = randomized(path)
    g = from_onnx(model)
    g.verify()
    assert g.meta["frontend"] == "onnx" and g.meta["opset"] == 9
    assert g.by_kind("opaque") == []
    assert g.by_kind("constant") == []  # weights are params; Caffe2's BN→Mul→Add is one batch_norm
    x, orig = randomized_reference(name, model)
    exported = to_onnx(g)
    onnx.checker.check_model(exported, full_check=True)
    sess = session(exported)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    # The batch dim is symbolic: two copies of the input give two copies of the output.
    twice = sess.run(None, {sess.get_inputs()[0].name: np.concatenate([x, x])})[0]
    assert twice.shape[0] == 2 and np.abs(twice - np.concatenate([got, got])).max() < 1e-5
    del sess
    err = float(np.abs(got - orig).max())
    assert err < 1e-4, f"{name}: max abs error {err}"

    half = to_onnx(g, precision="fp16")
    onnx.checker.check_model(half)
    ratio = half.ByteSize() / exported.ByteSize()
    assert ratio < 0.6, f"{name}: fp16 size ratio {ratio}"
    rel = float("nan")
    if name not in BIG:
        got16 = run(half, x)[0]
        assert got16.dtype == np.float32
        rel = float(np.abs(got16 - orig).max() / np.abs(orig).max())
        assert rel < 1e-2, f"{name}: fp16 relative error {rel}"
    print(f"{name}: fp32 max abs err {err:.2e}, fp16 rel err {rel:.2e}, fp16 size ratio {ratio:.3f}")
