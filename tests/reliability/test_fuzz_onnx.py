"""Fuzzer: seeded, bounded mutations of small valid ONNX models (a CNN, a shape/data-movement model, a QDQ
model, a model with com.microsoft ops) through `from_onnx`, then `to_onnx` and `to_torch`, each batch in a
child process with a time and a memory cap. Only `NetsqueezeError`s may come out; a hang, a crash or a
memory blow-up fails the test too.

`make test` runs a few hundred cases; `make test-all` (the `slow` marker) a few thousand, and
NETSQUEEZE_FUZZ_CASES=N / NETSQUEEZE_FUZZ_SEED=S choose another size or seed. Replay one case with
`python -c "from tests.reliability.fuzzing import mutant, run_case; ..."` (`mutant(seed, i)` gives its bytes).
"""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort
import pytest

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from tests.reliability.fuzzing import SEED_MODELS, mutant, run_fuzz

SEED = int(os.environ.get("NETSQUEEZE_FUZZ_SEED", "12"))


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_seed_models_are_valid_and_import(name: str) -> None:
    """The seeds are models ONNX Runtime runs and netsqueeze imports: mutants start from something real."""
    m = SEED_MODELS[name]()
    onnx.checker.check_model(m, full_check=True)
    ort.InferenceSession(m.SerializeToString())
    g = from_onnx(m)
    to_onnx(g)
    if name != "custom":  # com.microsoft ops have no torch form
        to_torch(g)


def test_mutants_are_deterministic() -> None:
    assert mutant(SEED, 7) == mutant(SEED, 7)
    assert mutant(SEED, 7) != mutant(SEED, 8)


def _fuzz(total: int) -> None:
    res = run_fuzz("onnx", total, SEED, batch=max(25, total // 8), jobs=2)
    print(res.report())
    assert sum(res.outcomes.values()) == total
    assert not res.escapes, res.report()
    assert res.outcomes["ok"] > 0  # the mutations leave some models importable, so the backends are reached


def test_fuzz_onnx() -> None:
    _fuzz(int(os.environ.get("NETSQUEEZE_FUZZ_CASES", "300")))


@pytest.mark.slow
def test_fuzz_onnx_large() -> None:
    _fuzz(int(os.environ.get("NETSQUEEZE_FUZZ_CASES_LARGE", "3000")))
