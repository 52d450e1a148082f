"""HF models captured from torch emit to ONNX: the aten calls torch.export leaves in them (mask casts and
`where`s, RMSNorm's rsqrt, position-id cumsums, ...) are written as ONNX ops, and ONNX Runtime's output
matches the model's within 1e-4 relative."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import netsqueeze
from netsqueeze.backends.onnx import to_onnx
from tests.frontends.onnx_models import run
from tests.models.test_hf_capture import CASES

XFAIL: dict[str, str] = {}  # model → the exact reason it cannot be emitted (none at present)


def _params() -> list[object]:
    out: list[object] = []
    for name, case in CASES.items():
        marks: list[pytest.MarkDecorator] = [pytest.mark.slow] if case.slow else []
        if name in XFAIL:
            marks.append(pytest.mark.xfail(reason=XFAIL[name], strict=True, raises=netsqueeze.NetsqueezeError))
        out.append(pytest.param(name, marks=marks))
    return out


@pytest.mark.parametrize("name", _params())
def test_hf_model_emits_onnx_matching_the_model(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES[name].build()
        graph = netsqueeze.import_model(model, xs)
    try:
        m = to_onnx(graph)
    except netsqueeze.NetsqueezeError as e:
        assert e.message == XFAIL.get(name)
        raise
    with torch.no_grad():
        ref = model(*xs).numpy()
    (y,) = run(m, *[x.numpy() for x in xs])
    assert y.shape == ref.shape
    assert float(np.abs(y - ref).max()) <= 1e-4 * float(np.abs(ref).max())
