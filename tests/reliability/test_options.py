"""Pass options built from Python are checked as the policy checker checks them: one routine
(`dsl.checker.option_problem`), the same wording, a `NetsqueezeError` naming the pass and the option."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from netsqueeze.compiler.plan import resolve
from netsqueeze.dsl import parse_policy
from netsqueeze.errors import NetsqueezeError, PolicyError
from netsqueeze.passes.base import Pass, TransformPass
from netsqueeze.passes.registry import all_passes
from netsqueeze.passes.squeeze_fold import SqueezeFold
from netsqueeze.passes.trim import Trim
from tests.dsl.tiny import tiny_cnn


@dataclass(frozen=True)
class Sparsify(TransformPass):
    """A custom pass: a required ratio, a list option, a fixed tuple."""

    name: ClassVar[str] = "sparsify"
    epsilon: float = field(metadata={"min": 0, "max": 1, "unit": "ratio"})
    mode: Literal["parallel", "cascade"] = "parallel"
    bits: list[int] = field(default_factory=lambda: [8])
    window: tuple[int, int] = (1, 1)
    strict: bool = False


BAD: list[tuple[Callable[[], Pass], str]] = [
    (lambda: SqueezeFold(method="nope"),  # type: ignore[arg-type]
     "option 'method' of pass 'squeeze_fold' must be one of 'greedy', 'qr', got 'nope'"),
    (lambda: SqueezeFold(method="gredy"),  # type: ignore[arg-type]
     "option 'method' of pass 'squeeze_fold' must be one of 'greedy', 'qr', got 'gredy' (did you mean 'greedy'?)"),
    (lambda: SqueezeFold(energy=-0.1),
     "option 'energy' of pass 'squeeze_fold' must be between 0 and 1 (0% to 100%), got '-0.1'"),
    (lambda: SqueezeFold(max_samples=0),
     "option 'max_samples' of pass 'squeeze_fold' must be >= 1, got '0'"),
    (lambda: Trim(ratio=2.0),
     "option 'ratio' of pass 'trim' must be between 0 and 0.999 (0% to 99.9%), got '2.0'"),
    (lambda: Trim(ratio="half"),  # type: ignore[arg-type]
     "option 'ratio' of pass 'trim' expects a number, got 'half'"),
    (lambda: Trim(ratio=True),
     "option 'ratio' of pass 'trim' expects a number, got 'True'"),
    (lambda: Trim(round_to=2.5),  # type: ignore[arg-type]
     "option 'round_to' of pass 'trim' expects an integer, got '2.5'"),
    (lambda: Trim(bias_compensation=1),  # type: ignore[arg-type]
     "option 'bias_compensation' of pass 'trim' expects true or false, got '1'"),
    (lambda: Trim(criterion="l3"),  # type: ignore[arg-type]
     "option 'criterion' of pass 'trim' must be one of 'gdnt', 'l1', 'l2', 'bn_scale', 'activation', 'random', "
     "got 'l3'"),
    (lambda: Sparsify(epsilon=1.5),
     "option 'epsilon' of pass 'sparsify' must be between 0 and 1 (0% to 100%), got '1.5'"),
    (lambda: Sparsify(epsilon=0.5, bits=[8, "four"]),  # type: ignore[list-item]
     "option 'bits' of pass 'sparsify' expects an integer, got 'four'"),
    (lambda: Sparsify(epsilon=0.5, bits=8),  # type: ignore[arg-type]
     "option 'bits' of pass 'sparsify' expects a list of integers, got '8'"),
    (lambda: Sparsify(epsilon=0.5, window=(1, 2, 3)),  # type: ignore[arg-type]
     "option 'window' of pass 'sparsify' expects 2 items (an integer, an integer), got 3"),
    (lambda: Sparsify(epsilon=0.5, strict="yes"),  # type: ignore[arg-type]
     "option 'strict' of pass 'sparsify' expects true or false, got 'yes'"),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_python_options(make: Callable[[], Pass], message: str) -> None:
    with pytest.raises(NetsqueezeError) as e:
        make()
    assert type(e.value) is NetsqueezeError
    assert e.value.message == message
    assert e.value.diagnostics[0].span is None  # no file:line:col from Python
    assert str(e.value) == f"error: {message}"


def test_good_python_options() -> None:
    assert SqueezeFold(energy=1, method="qr").energy == 1  # an int where a number is expected
    assert Trim(ratio=None).ratio is None  # optional
    assert Trim(ratio=0.5, round_to=8, criterion="l2", bias_compensation=False).round_to == 8
    assert Sparsify(epsilon=0.0, bits=(4, 8), window=(2, 2)).bits == (4, 8)  # type: ignore[arg-type]  # a tuple for a list
    for cls in all_passes().values():  # every registered pass's defaults are valid
        if all(f.default is not f.default_factory for f in cls.options()):
            cls()


# the same option values through a policy and from Python: the same text up to how the value is shown
SAME: list[tuple[str, Callable[[], Pass], str]] = [
    ("trim { ratio = 200% }", lambda: Trim(ratio=2.0),
     "option 'ratio' of pass 'trim' must be between 0 and 0.999 (0% to 99.9%), got "),
    ("squeeze_fold { method = nope }", lambda: SqueezeFold(method="nope"),  # type: ignore[arg-type]
     "option 'method' of pass 'squeeze_fold' must be one of 'greedy', 'qr', got "),
    ("trim { round_to = 2.5 }", lambda: Trim(round_to=2.5),  # type: ignore[arg-type]
     "option 'round_to' of pass 'trim' expects an integer, got "),
    ("trim { bias_compensation = 1 }", lambda: Trim(bias_compensation=1),  # type: ignore[arg-type]
     "option 'bias_compensation' of pass 'trim' expects true or false, got "),
    ("squeeze_fold { max_samples = 0 }", lambda: SqueezeFold(max_samples=0),
     "option 'max_samples' of pass 'squeeze_fold' must be >= 1, got "),
]


@pytest.mark.parametrize(("body", "make", "prefix"), SAME, ids=[b for b, _, _ in SAME])
def test_policy_and_python_agree(body: str, make: Callable[[], Pass], prefix: str) -> None:
    with pytest.raises(PolicyError) as from_policy:
        resolve(parse_policy(f"policy p {{\n  {body}\n}}\n", "p.sqz"), tiny_cnn(), all_passes())
    with pytest.raises(NetsqueezeError) as from_python:
        make()
    (d,) = from_policy.value.diagnostics
    assert d.span is not None and (d.span.file, d.span.line) == ("p.sqz", 2)
    assert d.message.startswith(prefix), d.message
    assert from_python.value.message.startswith(prefix), from_python.value.message


def test_checked_right_after_import() -> None:
    """The check is on in a fresh interpreter that imports only the pass module."""
    code = ("from netsqueeze.passes.squeeze_fold import SqueezeFold\n"
            "try:\n    SqueezeFold(method='nope')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == (
        "NetsqueezeError error: option 'method' of pass 'squeeze_fold' must be one of 'greedy', 'qr', got 'nope'")
