"""The per-model table of tests/models: each test records a row through the `model_table` fixture, and the
table is printed at the end of the run (terminal summary)."""

from __future__ import annotations

import pytest

_TABLE = pytest.StashKey[dict[str, tuple[str, str, str]]]()


@pytest.fixture
def model_table(request: pytest.FixtureRequest) -> dict[str, tuple[str, str, str]]:
    """model name → (imports, identity relative error, opaque ops)."""
    return request.config.stash.setdefault(_TABLE, {})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    rows = config.stash.get(_TABLE, {})
    if not rows:
        return
    terminalreporter.section("HF models: torch.export capture and torch identity")
    terminalreporter.write_line(f"{'model':<14} {'imports':<8} {'identity rel err':<17} opaque ops")
    for name, (imports, err, opaque) in rows.items():
        terminalreporter.write_line(f"{name:<14} {imports:<8} {err:<17} {opaque}")
