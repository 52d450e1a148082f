"""A UTF-8 byte-order mark (as Windows editors write) is accepted at the start of a policy and of an import."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsqueeze.cli import main
from netsqueeze.compiler.plan import check_file
from netsqueeze.dsl import load_policy, parse_policy
from netsqueeze.errors import PolicyError

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


@pytest.mark.parametrize("end", ["\r", "\r\n"], ids=["cr", "crlf"])
def test_cr_line_ends_locate_errors_on_their_line(end: str, tmp_path: Path) -> None:
    """A file saved with CR (old Mac) line ends was one line to the parser: every error was on line 1."""
    text = end.join(["policy p {", "  budget flops <= 500%", "  fold_bn", "}", ""])
    p = tmp_path / "p.sqz"
    p.write_bytes(text.encode())
    (d,) = check_file(p)
    assert (d.span.line, d.span.col) == (2, 19)
    assert d.message == "budget metric 'flops' must be more than 0 and at most 1 (above 0%, up to 100%), got '500%'"
    with pytest.raises(PolicyError) as e:  # parse_policy on the text itself too
        parse_policy(text.replace("flops <= 500%", "flops <= 50%").replace("fold_bn", "fold_bn ]"), "<text>")
    assert (e.value.diagnostics[0].span.line, e.value.diagnostics[0].span.col) == (3, 11)


def test_compile_locates_a_byte_that_is_not_utf8_as_check_does(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "latin1.sqz"
    p.write_bytes("policy p {\n  # caf\xe9\n  fold_bn\n}\n".encode("latin-1"))
    model = Path(__file__).resolve().parents[2] / "examples" / "demo_model.py"
    assert main(["compile", str(model), "-p", str(p), "-o", str(tmp_path / "m.pt")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"{p}:2:8: error: cannot read policy '{p}': not UTF-8 text (byte 18)")
