"""Golden tests: every `cases/*.sqz` fails with exactly the diagnostics in its `.expected` file, and
every `explain/*.sqz` resolves on the tiny CNN to exactly its `.explain` text, against the real pass
registry (so an option regression in `trim` or `squeeze_fold` fails them).

Regenerate after a deliberate change with `NETSQUEEZE_BLESS=1 pytest tests/dsl/test_golden.py`,
then read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netsqueeze.compiler.plan import explain, resolve
from netsqueeze.dsl import load_policy
from netsqueeze.errors import PolicyError
from netsqueeze.passes.registry import all_passes
from tests.dsl.tiny import tiny_cnn

HERE = Path(__file__).parent
BLESS = os.environ.get("NETSQUEEZE_BLESS") == "1"
CASES = sorted((HERE / "cases").glob("*.sqz"))
EXPLAINS = sorted((HERE / "explain").glob("*.sqz"))


def _rel(path: Path) -> str:
    return os.path.relpath(path, HERE)


def _diagnostics_text(path: Path) -> str:
    cwd = os.getcwd()
    os.chdir(HERE)  # spans then show 'cases/NAME.sqz', the same on every machine
    try:
        resolve(load_policy(_rel(path)), tiny_cnn(), all_passes())
    except PolicyError as e:
        for d in e.diagnostics:
            assert d.span is not None, d.format()
        return "\n".join(d.format() for d in e.diagnostics) + "\n"
    finally:
        os.chdir(cwd)
    return "(no error)\n"


def _compare(actual: str, expected_path: Path) -> None:
    if BLESS:
        expected_path.write_text(actual)
    assert expected_path.exists(), f"missing golden file {expected_path.name}"
    assert actual == expected_path.read_text()


def test_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_error_case(path: Path) -> None:
    actual = _diagnostics_text(path)
    assert actual != "(no error)\n", f"{path.name} was expected to fail"
    _compare(actual, path.with_suffix(".expected"))


@pytest.mark.parametrize("path", EXPLAINS, ids=lambda p: p.stem)
def test_explain(path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        graph = tiny_cnn()
        plan = resolve(load_policy(_rel(path)), graph, all_passes())
        actual = explain(plan, graph) + "\n# plan\n" + plan.to_text()
    finally:
        os.chdir(cwd)
    _compare(actual, path.with_suffix(".explain"))
