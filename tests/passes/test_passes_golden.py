"""Pass tests as IR-in / IR-out golden files (`golden/*.in.ir`, read with `parse_graph`): each case runs a
real pass on the input graph and compares what comes out with the expected file next to it — the exact
form (`print_graph(values=True)`) where the pass only selects values, the shape-level form where it
computes new ones (then checked numerically against the input graph on the reference interpreter), or
the pass's own text (the dependency analysis' group listing).

Regenerate after a deliberate change with `NETSQUEEZE_BLESS=1 pytest tests/passes/test_passes_golden.py`,
then read the diff.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from netsqueeze.ir import Graph, print_graph
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import find_groups, format_groups
from netsqueeze.passes.fold_bn import FoldBN
from netsqueeze.passes.trim import Trim
from tests.passes.graphs import GOLDEN, input_batches, load_ir, run

HERE = GOLDEN
BLESS = os.environ.get("NETSQUEEZE_BLESS") == "1"


def _compare(actual: str, name: str) -> None:
    path = HERE / name
    if BLESS:
        path.write_text(actual)
    assert path.exists(), f"missing golden file {name}"
    assert actual == path.read_text()


def _same_function(before: Graph, after: Graph, tol: float) -> None:
    with torch.no_grad():
        for batch in input_batches(before, n=2):
            for a, b in zip(run(before, batch), run(after, batch)):
                assert a.shape == b.shape and (a - b).abs().max() <= tol


def _trim_l1(g: Graph) -> None:
    Trim(criterion="l1", ratio=0.5, bias_compensation=False).run(g, PassContext())


def test_fold_bn() -> None:
    g = load_ir("fold_bn.in.ir")
    before = g.copy()
    res = FoldBN().run(g, PassContext())
    assert res.removed == {"bn1"}
    _compare(str(g) + "\n", "fold_bn.out")
    _same_function(before, g, 1e-5)


@pytest.mark.parametrize(("case", "transform"), [("trim_l1", _trim_l1), ("trim_int8", _trim_l1)])
def test_exact_output(case: str, transform: Callable[[Graph], None]) -> None:
    """Passes that only drop channels: the output is compared value for value, and is itself parseable."""
    g = load_ir(f"{case}.in.ir")
    transform(g)
    g.verify()
    text = print_graph(g, values=True)
    _compare(text, f"{case}.out.ir")
    assert print_graph(load_ir(f"{case}.out.ir"), values=True) == text


def test_dependency_groups() -> None:
    _compare(format_groups(find_groups(load_ir("dependency.in.ir"))) + "\n", "dependency.groups")


def test_every_input_has_its_expected_file() -> None:
    ins = sorted(p.name.removesuffix(".in.ir") for p in HERE.glob("*.in.ir"))
    outs = sorted({p.name.split(".")[0] for p in HERE.iterdir() if ".in." not in p.name})
    assert ins == outs and len(ins) >= 3
