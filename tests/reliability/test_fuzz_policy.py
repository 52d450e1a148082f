"""Fuzzer: seeded mutations of the example policies (examples/*.sqz: characters inserted, deleted and swapped,
tokens duplicated, numbers out of range, lines repeated or dropped, unicode, a few non-UTF-8 bytes) through
`load_policy` + `check_policy`, in child processes with a time and a memory cap. Only `NetsqueezeError`s may
come out, and every diagnostic is located: its message starts with `file:line:col`.

`make test` runs a few hundred cases; `make test-all` (the `slow` marker) a few thousand;
NETSQUEEZE_FUZZ_SEED=S picks another seed. Replay one case with `tests.reliability.fuzzing.policy_mutant(seed, i)`.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.fuzzing import FuzzResult, policy_mutant, run_fuzz

SEED = int(os.environ.get("NETSQUEEZE_FUZZ_SEED", "3"))

def _fuzz(total: int) -> FuzzResult:
    res = run_fuzz("policy", total, SEED, batch=max(50, total // 4), jobs=2)
    print(res.report())
    assert sum(res.outcomes.values()) == total
    assert not res.escapes, res.report()
    assert res.outcomes["ok"] > 0 and res.outcomes["PolicyError"] > 0
    return res


def test_policy_mutants_are_deterministic() -> None:
    assert policy_mutant(SEED, 5) == policy_mutant(SEED, 5)


def test_fuzz_policies() -> None:
    _fuzz(int(os.environ.get("NETSQUEEZE_FUZZ_CASES", "400")))


@pytest.mark.slow
def test_fuzz_policies_large() -> None:
    _fuzz(int(os.environ.get("NETSQUEEZE_FUZZ_CASES_LARGE", "4000")))
