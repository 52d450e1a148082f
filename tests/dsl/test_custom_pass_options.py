"""Option checking of a custom pass (fields the built-in passes do not have: a required option, a list
option), with exact located diagnostics; the golden cases cover the built-in passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from netsqueeze.compiler.plan import resolve
from netsqueeze.dsl import parse_policy
from netsqueeze.errors import PolicyError
from netsqueeze.passes.base import TransformPass
from netsqueeze.passes.registry import all_passes
from tests.dsl.tiny import tiny_cnn


@dataclass(frozen=True)
class Sparsify(TransformPass):
    """A custom pass with a required option and a list option."""

    name: ClassVar[str] = "sparsify"
    epsilon: float = field(metadata={"min": 0, "max": 1, "unit": "ratio"})
    mode: Literal["parallel", "cascade"] = "parallel"
    bits: list[int] = field(default_factory=lambda: [8])


def _errors(body: str) -> str:
    with pytest.raises(PolicyError) as e:
        resolve(parse_policy(f"policy p {{\n  {body}\n}}\n", "p.sqz"), tiny_cnn(), {**all_passes(), "sparsify": Sparsify})
    return "\n".join(d.format() for d in e.value.diagnostics)


def test_list_items_are_checked() -> None:
    assert _errors('sparsify on fc2 { epsilon = 5%, bits = [8, "four"] }') == (
        "p.sqz:2:46: error: option 'bits' of pass 'sparsify' expects an integer, got the string \"four\"\n"
        "    sparsify on fc2 { epsilon = 5%, bits = [8, \"four\"] }\n"
        "                                               ^~~~~~")


def test_required_option_is_checked() -> None:
    assert _errors("sparsify on last(type(linear)) { mode = cascade }") == (
        "p.sqz:2:3: error: pass 'sparsify' needs option 'epsilon' (a number)\n"
        "    sparsify on last(type(linear)) { mode = cascade }\n"
        "    ^~~~~~~~")


def test_valid_custom_options_resolve() -> None:
    plan = resolve(parse_policy("policy p { sparsify on fc2 { epsilon = 5%, bits = [4, 8] } }"), tiny_cnn(),
                   {**all_passes(), "sparsify": Sparsify})
    assert plan.steps[0].instance == Sparsify(epsilon=0.05, bits=[4, 8])
