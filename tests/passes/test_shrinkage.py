"""squeeze_fold on no more calibration rows than channels: a sample covariance of n rows has rank at most n − 1, so
the search would read every group as redundant down to n − 1 channels. The pass then ranks every group on its
covariance shrunk toward its diagonal (oracle approximating shrinkage of the correlations, Chen et al. 2010)."""

from __future__ import annotations

import functools

import pytest
import torch
from sklearn.covariance import oas
from sklearn.datasets import load_digits
from torch import nn

import netsqueeze as ns
from netsqueeze.passes.squeeze_fold import ablation
from netsqueeze.passes.squeeze_math import shrink

NOTE = ("3 consumer(s) read with no more calibration rows than channels (the most shrunk '2': 64 rows for 256 "
        "channels, ρ = {rho}): the 3 read on fewer than 4 rows per channel were ranked on their channel covariances "
        "shrunk toward their diagonals (each channel's variance kept, the correlations shrunk by the oracle "
        "approximating shrinkage intensity, Chen et al. 2010). Unshrunk, such a covariance reads the channels as "
        "redundant down to the rows' rank; calibrate on more samples for a sharper ranking")


def _sample(n: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n rows drawn from N(0, Σ), Σ) with Σ_ij = s_i s_j 0.6^|i−j|: correlated channels of unequal scales."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(p, dtype=torch.float64)
    scale = torch.linspace(0.2, 3.0, p, dtype=torch.float64)
    sigma = 0.6 ** (i[:, None] - i[None, :]).abs() * torch.outer(scale, scale)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    return x, sigma


def _cov(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0)
    return xc.T @ xc / x.shape[0]


def test_shrinkage_brings_a_covariance_of_few_rows_closer_to_the_truth_and_keeps_each_variance() -> None:
    for seed in range(5):
        x, sigma = _sample(32, 64, seed)
        s = _cov(x)
        est, rho = shrink(s, 32)
        assert 0.05 < rho < 1
        assert float((est - sigma).norm()) < 0.8 * float((s - sigma).norm())
        assert torch.allclose(est.diagonal(), s.diagonal())
        assert torch.linalg.matrix_rank(s) == 31 and torch.linalg.matrix_rank(est) == 64


def test_the_intensity_is_oas_on_the_correlations_and_vanishes_with_many_rows() -> None:
    x, _ = _sample(48, 64, 0)
    s = _cov(x)
    rho = shrink(s, 48)[1]
    # scikit-learn's OAS of the standardised rows: the same intensity without eq. 23's 2/p terms
    assert rho == pytest.approx(oas((x / x.std(0, unbiased=False)).numpy(), assume_centered=False)[1], rel=0.04)
    x, _ = _sample(64 * 100, 64, 0)
    assert shrink(_cov(x), 64 * 100)[1] < 0.01


def test_a_constant_channel_stays_exactly_removable() -> None:
    x, _ = _sample(32, 16, 1)
    x[:, 3] = 0.7
    s = _cov(x)
    est, rho = shrink(s, 32)
    assert rho > 0
    # no variance, no covariance: what the sample covariance holds there (rounding, ~1e-32) shrinks, nothing is added
    assert float(est[3].abs().max()) <= float(s[3].abs().max()) < 1e-30


@functools.cache
def _digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP 64-256-256-128-10 trained on 1,200 of scikit-learn's digits; (model, those rows, the other 597)."""
    xs, ys = load_digits(return_X_y=True)
    x, y = torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128),
                          nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(60):
        for i in range(0, 1200, 64):
            idx = tr[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[tr], x[te]


def _squeeze(samples: int, shrinkage: bool) -> tuple[ns.CompileResult, float]:
    """squeeze_fold under `params <= 30%` on the first `samples` training rows; (result, relative output error on
    the 597 held-out digits)."""
    model, train, test = _digits_mlp()
    calib = train[:samples]
    with ablation(shrinkage=shrinkage):
        res = ns.compile(model, f"policy p {{ calibrate samples {samples}, batch 32\n budget params <= 30%\n "
                         "squeeze_fold }", example_inputs=(calib[:2],), calibration=calib, progress=False)
    with torch.no_grad():
        a, b = model(test), res.model(test)
    return res, float((a - b).norm() / a.norm())


def _kept(res: ns.CompileResult) -> list[int]:
    return [int(res.graph.node(n).params["weight"].shape[0]) for n in ("0", "2", "4")]


def test_on_64_rows_the_search_no_longer_cuts_every_group_to_the_rows_rank() -> None:
    raw, raw_err = _squeeze(64, shrinkage=False)
    assert _kept(raw) == [63, 63, 63]  # every group at the rank of 64 centred rows, far under the budget
    res, err = _squeeze(64, shrinkage=True)
    kept = _kept(res)
    assert kept[0] > 100 and kept[1] > 80 and kept[2] > 80  # near what 1,024 rows choose: 159 / 95 / 89
    assert err < 0.6 * raw_err  # 0.029 against 0.064
    notes = [n for p in res.report.passes for n in p.result.notes]
    rho = res.report.passes[0].result.metrics["shrinkage"]
    assert NOTE.format(rho=f"{rho:.2f}") in notes
    assert 0.05 < rho < 1


def test_with_more_rows_than_channels_everywhere_nothing_is_shrunk() -> None:
    res, err = _squeeze(1024, shrinkage=True)
    raw, raw_err = _squeeze(1024, shrinkage=False)
    assert _kept(res) == _kept(raw)
    assert err == raw_err
    assert "shrinkage" not in res.report.passes[0].result.metrics
    assert not any("calibration rows than channels" in n for p in res.report.passes for n in p.result.notes)


class _Fork(nn.Module):
    """conv1's 32 channels are read by conv2 (a row per image and position) and, pooled, by fc (a row per image)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 3, padding=1)
        self.fc = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        return self.conv2(h).mean((2, 3)) + self.fc(h.mean((2, 3)))


def test_a_group_with_one_well_sampled_consumer_shrinks_nothing() -> None:
    """16 images: fc reads conv1's 32 channels on 16 rows, conv2 on 16 x 64. The group's covariance from conv2 has
    full rank, so nothing is shrunk (shrinking fc's probe alone cost the benchmark ResNet points at 32 images)."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for shrinkage in (True, False):
        with ablation(shrinkage=shrinkage):
            res = ns.compile(_Fork().eval(), "policy p { calibrate samples 16, batch 16\n budget flops <= 50%\n "
                             "squeeze_fold }", example_inputs=(x[:2],), calibration=x, progress=False)
        outs.append(res)
    assert "shrinkage" not in outs[0].report.passes[0].result.metrics
    assert outs[0].graph.node("conv1").params["weight"].shape == outs[1].graph.node("conv1").params["weight"].shape
    assert torch.equal(outs[0].graph.node("conv1").params["weight"], outs[1].graph.node("conv1").params["weight"])


class _Head(nn.Module):
    """conv1 (32 channels, read by conv2 at 64 positions per image) -> conv2 (8, read pooled by fc1: a row per image)
    -> fc1 (64, read by fc2: a row per image) -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def test_the_deficient_group_switches_it_on_and_only_the_few_rows_per_channel_are_shrunk() -> None:
    """16 images: fc1's 64 channels on 16 rows (deficient) switch it on; conv2's 8 channels on 16 rows (full rank, but
    under 4 rows per channel) are shrunk too; conv1's 32 channels on 16 x 64 rows are read as sampled."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = ns.compile(_Head().eval(), "policy p { calibrate samples 16, batch 16\n budget flops <= 60%\n squeeze_fold }",
                     example_inputs=(x[:2],), calibration=x, progress=False)
    notes = [n for p in res.report.passes for n in p.result.notes]
    rho = res.report.passes[0].result.metrics["shrinkage"]
    assert ("1 consumer(s) read with no more calibration rows than channels (the most shrunk 'fc2': 16 rows for 64 "
            f"channels, ρ = {rho:.2f}): the 2 read on fewer than 4 rows per channel were ranked on their channel "
            "covariances shrunk toward their diagonals") in " ".join(notes)
