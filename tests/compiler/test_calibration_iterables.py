"""Calibration data given as an iterable: the compile reads it several times, so a one-shot iterator (a
generator) is read once and kept, and an iterable whose later passes see fewer batches is an error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import netsqueeze as ns
from netsqueeze.errors import NetsqueezeError

POLICY = "policy p {\n  squeeze_fold { ratio = 50% }\n}"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 36, 4)).eval()


def _batches() -> list[torch.Tensor]:
    cal = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    return [cal[i:i + 16] for i in range(0, 64, 16)]


def test_a_generator_gives_the_model_a_list_gives() -> None:
    m, bs = _model(), _batches()
    a = ns.compile(m, POLICY, example_inputs=(bs[0][:2],), calibration=bs, progress=False)
    b = ns.compile(m, POLICY, example_inputs=(bs[0][:2],), calibration=(t for t in bs), progress=False)
    assert a.report.calibration_passes == b.report.calibration_passes
    with torch.no_grad():
        assert torch.equal(a.model(bs[0]), b.model(bs[0]))


class _Once:
    """Yields its batches on the first iter() only."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.calls = batches, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.calls += 1
        return iter(self.batches if self.calls == 1 else [])


def test_an_iterable_that_runs_dry_on_a_later_pass_is_an_error() -> None:
    bs = _batches()
    with pytest.raises(NetsqueezeError) as e:
        ns.compile(_model(), POLICY, example_inputs=(bs[0][:2],), calibration=_Once(bs), progress=False)
    assert e.value.diagnostics[0].message.endswith(
        "the calibration iterable gave 1 batch on one pass and 0 on a later one: the compile reads the data several "
        "times; give a list, a tensor or a file")
