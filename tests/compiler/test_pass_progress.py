"""Passes' progress bars come from the compiler (`PassContext.progress`): recover's and net_trim's bars show
with `compile(progress=True)` and stay silent with `progress=False` (`--quiet`), on stderr only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns

POLICY = ("policy p {\n  net_trim on type(linear) { epsilon = 10% }\n  recover { steps = 5 }\n}\n")


def _run(progress: bool) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    ns.compile(m, POLICY, example_inputs=(x[:4],), calibration=[x], executor="local", progress=progress)


@pytest.mark.parametrize("progress", [True, False])
def test_pass_bars_follow_the_compile_switch(progress: bool, capsys: pytest.CaptureFixture[str]) -> None:
    _run(progress)
    out, err = capsys.readouterr()
    assert out == ""
    for label in ("net_trim", "recover"):
        assert (label in err) == progress, (label, err[-300:])
