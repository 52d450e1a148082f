"""Policy literals and files that used to escape as bare exceptions (found by the policy fuzzer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsqueeze.dsl import load_policy, parse_policy
from netsqueeze.errors import PolicyError


def test_huge_integer_literal_is_out_of_range() -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy("policy p {\n  trim { ratio = " + "9" * 400 + " }\n}\n", "p.sqz")
    assert str(e.value).startswith("p.sqz:2:18: error: number '999")
    assert "is out of range" in e.value.message


def test_non_utf8_policy_is_located_at_the_byte(tmp_path: Path) -> None:
    p = tmp_path / "bad.sqz"
    p.write_bytes(b"policy p {\n  trim { ratio = 50\xff% }\n}\n")
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert str(e.value).startswith(f"{p}:2:20: error: cannot read policy '{p}': not UTF-8 text (byte 30)")


def test_a_chain_of_thousands_of_excepts_is_a_located_error() -> None:
    text = "policy p {\n  let a = type(conv)" + " except type(linear)" * 3000 + "\n  trim on a { ratio = 50% }\n}\n"
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.sqz")
    assert str(e.value).startswith("p.sqz:2:1: error: the policy nests too deeply to read (an expression or "
                                   "selector chain of thousands of terms); name parts of it with `let`")
