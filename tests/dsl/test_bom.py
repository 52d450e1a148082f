"""A UTF-8 byte-order mark (as Windows editors write) is accepted at the start of a policy and of an import."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsqueeze.cli import main
from netsqueeze.compiler.plan import check_file
from netsqueeze.dsl import load_policy, parse_policy

BOM = "\ufeff"


def _write(path: Path, text: str) -> Path:
    path.write_bytes((BOM + text).encode("utf-8"))
    return path


def test_policy_with_bom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path / "p.sqz", "policy p {\n  budget params <= 50%\n  trim { ratio = 25% }\n}\n")
    assert load_policy(p).name == "p"
    assert check_file(p) == []
    assert main(["check", str(p)]) == 0
    assert capsys.readouterr().out.strip().endswith("p.sqz: ok")


def test_policy_text_with_bom() -> None:
    assert parse_policy(BOM + "policy p { fold_bn }").name == "p"


def test_import_with_bom(tmp_path: Path) -> None:
    _write(tmp_path / "lib.sqz", "let quarter = 25%\n")
    p = _write(tmp_path / "p.sqz", 'import "lib.sqz"\npolicy p {\n  trim { ratio = quarter }\n}\n')
    assert check_file(p) == []


def test_bom_keeps_columns(tmp_path: Path) -> None:
    """Spans count from the first character after the mark."""
    p = _write(tmp_path / "p.sqz", "policy p {\n  budget params <= 0%\n  fold_bn\n}\n")
    (d,) = check_file(p)
    assert (d.span is not None) and (d.span.line, d.span.col) == (2, 20)
    assert "must be more than 0 and at most 1" in d.message


def test_not_utf8_is_located(tmp_path: Path) -> None:
    (tmp_path / "lib.sqz").write_bytes(b"let x = \xe9\n")
    p = _write(tmp_path / "p.sqz", 'import "lib.sqz"\npolicy p { fold_bn }\n')
    (d,) = check_file(p)
    assert d.message == "cannot import 'lib.sqz': not UTF-8 text (byte 8)"
    assert d.span is not None and d.span.line == 1
