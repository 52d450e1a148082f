"""Property: on random and mutated policy text, the only exception parse+check(+resolve) lets out is a
located `PolicyError`."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsqueeze.compiler.plan import resolve, schemas_of
from netsqueeze.dsl import check_policy, parse_policy
from netsqueeze.errors import PolicyError
from netsqueeze.passes.registry import all_passes
from tests.dsl.tiny import tiny_cnn

HERE = Path(__file__).parent
SEEDS = [p.read_text() for p in sorted((HERE / "explain").glob("*.sqz"))] + [
    p.read_text() for p in sorted((HERE / "cases").glob("*.sqz"))[:20]
]
TOKENS = ["policy", "p", "{", "}", "(", ")", "[", "]", ",", "=", "==", "<=", "on", "expect", "0..", "1..2",
          "where", "except", "|", "&", "type(conv)", "all", "first(", "between(", 're"x\\d"', '"s"', "25%",
          "4.5M", "12ms", "-1", "1e400", "trim", "fold_bn", "let", "param", "import", "budget", "guard",
          "bounds", "calibrate", "input", "x:", "float32[1,3]", "\n", "#", "layer*.conv?", "\\", "\x00", "é"]
PASSES = all_passes()
SCHEMAS = schemas_of(PASSES)
GRAPH = tiny_cnn()


def _run(text: str) -> None:
    try:
        policy = parse_policy(text, "fuzz.sqz")
        check_policy(policy, SCHEMAS)
        resolve(policy, GRAPH, PASSES)
        assert parse_policy(policy.to_text(), "fuzz.sqz") == policy
    except PolicyError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.span is not None and d.span.line >= 1 and d.span.col >= 1, d
            d.format()


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        tok = draw(st.sampled_from(TOKENS) | st.text(max_size=3))
        if op == "insert":
            text = text[:i] + tok + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        else:
            text = text[:i] + tok + text[i + len(tok):]
    return text


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(mutated())
def test_mutated_policies(text: str) -> None:
    _run(text)


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_token_soup(text: str) -> None:
    _run(text)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=60))
def test_random_text(text: str) -> None:
    _run(text)
