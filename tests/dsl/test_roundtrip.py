"""Round-trip: parse(to_text(p)) == p, and the hash is stable, for the examples and tricky snippets."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsqueeze.dsl import parse_policy

ROOT = Path(__file__).resolve().parents[2]

SNIPPETS = [
    "policy p { fold_bn }",
    'policy p { trim on "0" | re"layer\\d+\\.conv\\"x" { ratio = 25% } expect 1..4 }',
    "policy p { t on (a | b) & c except d where x == 1 and (y < 2 or not z != [1, 2]) }",
    "policy p { t on a except (b except c) }",
    "policy p { t on a | (b | c) }",
    "policy p { t on (a where x == 1) where y == 2 }",
    "policy p { t on type(conv, linear) where not (a == 1 and b == 2) expect 3 }",
    "policy p { t on between(first(type(conv)), last(all)) expect 0.. }",
    "policy p { quantize on all { weights = int8 per_channel, x = -1.5e-3, y = 4.5M, z = 12ms, w = [] } }",
    'param r = 25%\nlet convs = layer*.conv?\npolicy p { input x: float32[1, 3, 32, 32] calibrate samples 2K, seed 0 '
    "budget params <= 25%, flops <= 0.5 bounds on convs { min_channels = 8 } guard output error <= 2% }",
    'policy p { guard top1 drop <= 1% let s = "a\\n\\u00e9" let n = 3 let l = [1, "x"] }',
]


@pytest.mark.parametrize("text", SNIPPETS)
def test_roundtrip_snippets(text: str) -> None:
    p = parse_policy(text)
    again = parse_policy(p.to_text())
    assert again == p
    assert again.to_text() == p.to_text()
    assert again.hash() == p.hash()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.sqz")), ids=lambda p: p.name)
def test_roundtrip_examples(path: Path) -> None:
    p = parse_policy(path.read_text(), str(path))
    assert parse_policy(p.to_text(), str(path)) == p


def test_spans_do_not_count() -> None:
    assert parse_policy("policy p { fold_bn }") == parse_policy("\n\npolicy   p {\n  fold_bn\n}\n")
    assert parse_policy("policy p { fold_bn }").hash() != parse_policy("policy q { fold_bn }").hash()
