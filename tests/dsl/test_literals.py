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


def test_a_policy_path_or_text_holding_a_nul_byte_is_a_policy_error() -> None:
    import torch

    import netsqueeze as ns

    m, x = torch.nn.Linear(2, 2), torch.randn(1, 2)
    with pytest.raises(PolicyError) as e:  # no brace: read as a file name
        ns.compile(m, "policy p \x00 fold_bn", example_inputs=(x,), progress=False)
    assert e.value.message == "cannot read policy 'policy p \x00 fold_bn': a file name cannot hold a NUL byte"
    with pytest.raises(PolicyError) as e:
        ns.compile(m, "policy p { fold_bn \x00 }", example_inputs=(x,), progress=False)
    assert str(e.value).startswith("<policy>:1:20: error: unexpected character '\\x00'")


@pytest.mark.parametrize("kind", ["let", "param"])
def test_a_chain_of_thousands_of_definitions_is_a_policy_error_in_check_and_compile(kind: str, tmp_path: Path) -> None:
    """`netsqueeze check` and `compile` checked through paths without the recursion guard that `check_policy` has:
    1,500 chained lets or params ended in an InternalError (RecursionError)."""
    import torch

    import netsqueeze as ns
    from netsqueeze.compiler.plan import check_file
    from netsqueeze.errors import PolicyError

    lines = [f'{kind} v0 = 0.5'] + [f"{kind} v{i} = v{i - 1}" for i in range(1, 1500)]
    text = "\n".join(lines) + "\npolicy p {\n  squeeze_fold { ratio = v1499 }\n}\n"
    path = tmp_path / "chain.sqz"
    path.write_text(text)
    want = ("the policy nests too deeply to check (an expression, selector or let/param chain of thousands of terms); "
            "name parts of it with `let`")
    assert [d.message for d in check_file(path)] == [want]
    with pytest.raises(PolicyError) as e:
        ns.compile(torch.nn.Sequential(torch.nn.Linear(4, 4)), str(path), example_inputs=(torch.randn(2, 4),))
    assert e.value.diagnostics[0].message == want
