"""A saved ExportedProgram (.pt2) with integer inputs compiles from the CLI, and a copied program (whose
placeholders torch renames) is captured by its input specs, not by names."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.cli import main


def _program() -> tuple[torch.export.ExportedProgram, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    x = torch.randint(0, 10, (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(m, (x,)), x, m


def test_copied_program_is_captured_by_its_specs() -> None:
    ep, x, m = _program()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ns.compile(copy.deepcopy(ep), "policy p { fold_bn }", example_inputs=(x,))
    assert torch.equal(r.model(x), m(x))


def test_integer_input_pt2_compiles_from_the_cli(tmp_path: Path) -> None:
    ep, x, m = _program()
    torch.export.save(ep, tmp_path / "emb.pt2")
    (tmp_path / "p.sqz").write_text("policy p {\n  fold_bn\n}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["compile", str(tmp_path / "emb.pt2"), "--trust-pickle", "-p", str(tmp_path / "p.sqz"),
                     "-o", str(tmp_path / "out.pt")])
    assert code == 0
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(out(x), m(x))
