"""Squeeze-and-fold linear algebra: exact-rank recovery, selection quality, intercept."""

import pytest
import torch

from netsqueeze.passes.squeeze_math import Selector, covariance, rank_for_energy, ranking, reconstruction


def select_channels(cov: torch.Tensor, k: int, method: Selector) -> list[int]:
    """The k channels `ranking` keeps first, sorted."""
    return sorted(ranking(cov, method)[0][:max(1, min(k, cov.shape[0]))])


def relative_error(moment: torch.Tensor, keep: list[int], t: torch.Tensor, t0: torch.Tensor) -> float:
    """E‖a − (a_S T + t₀)‖² / E‖a − μ‖², computed from the moment matrix alone."""
    m = moment.double()
    c = m.shape[0] - 1
    # reconstruction as a linear map on the augmented vector: r = B [a; 1], B = [[E_S T], [t0]]
    b = torch.zeros(c + 1, c, dtype=torch.float64)
    b[torch.tensor(keep)] = t
    b[-1] = t0
    d = -b
    d[:c] += torch.eye(c, dtype=torch.float64)  # (I − B) applied to [a; 1] gives the error
    err = float(torch.trace(d.T @ m @ d))
    var = float(torch.trace(covariance(m)))
    return err / var if var > 0 else 0.0


def moment_of(a: torch.Tensor) -> torch.Tensor:
    aug = torch.cat([a.double(), torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
    return aug.T @ aug / a.shape[0]


def low_rank(n: int, c: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, c, generator=g,
                                                                          dtype=torch.float64) + 3.0


def test_rank_for_energy_finds_exact_rank() -> None:
    m = moment_of(low_rank(500, 16, 5))
    assert rank_for_energy(covariance(m), 0.999999) == 5
    assert rank_for_energy(covariance(m), 0.5) <= 3


def test_exact_rank_is_reconstructed_by_both_selectors() -> None:
    a = low_rank(400, 12, 4, seed=1)
    m = moment_of(a)
    for method in ("greedy", "qr"):
        keep = select_channels(covariance(m), 4, method)  # type: ignore[arg-type]
        t, t0 = reconstruction(m, keep)
        rec = a[:, keep] @ t + t0
        assert float((rec - a).abs().max()) < 1e-8, method
        assert relative_error(m, keep, t, t0) < 1e-12


def test_greedy_is_no_worse_than_qr_on_noisy_data() -> None:
    g = torch.Generator().manual_seed(3)
    a = low_rank(2000, 32, 8, seed=3) + 0.3 * torch.randn(2000, 32, generator=g, dtype=torch.float64)
    m = moment_of(a)
    errs = {}
    for method in ("greedy", "qr"):
        keep = select_channels(covariance(m), 10, method)  # type: ignore[arg-type]
        errs[method] = relative_error(m, keep, *reconstruction(m, keep))
    assert errs["greedy"] <= errs["qr"] + 1e-9
    # relative_error agrees with the empirical error
    keep = select_channels(covariance(m), 10, "greedy")
    t, t0 = reconstruction(m, keep)
    emp = float(((a[:, keep] @ t + t0 - a) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())
    assert abs(emp - errs["greedy"]) < 1e-9


def test_intercept_only_when_nothing_kept_matches_mean() -> None:
    a = low_rank(300, 6, 2, seed=4)
    m = moment_of(a)
    keep = [0]
    t, t0 = reconstruction(m, keep)
    assert t.shape == (1, 6) and t0.shape == (6,)
    assert float(t[0, 0]) == 1.0 and float(t0[0]) == 0.0
    # the mean is preserved by the affine reconstruction
    assert torch.allclose((a[:, keep] @ t + t0).mean(0), a.mean(0), atol=1e-9)


def test_ranking_prefix_errors_match_least_squares() -> None:
    from netsqueeze.passes.squeeze_math import ranking

    g = torch.Generator().manual_seed(9)
    a = low_rank(1500, 12, 4, seed=9) + 0.2 * torch.randn(1500, 12, generator=g, dtype=torch.float64)
    m = moment_of(a)
    for method in ("greedy", "qr"):
        order, err = ranking(covariance(m), method)  # type: ignore[arg-type]
        assert sorted(order) == list(range(12)) and err[0] == 1.0 and err[-1] == 0.0
        for k in (2, 5, 9):
            keep = sorted(order[:k])
            assert abs(err[k] - relative_error(m, keep, *reconstruction(m, keep))) < 1e-9
    # a consumer metric that ignores channel 0 makes it the cheapest to drop
    w = torch.eye(12, dtype=torch.float64)
    w[0, 0] = 0.0
    order, _ = ranking(covariance(m), "greedy", w.T @ w)
    assert order[-1] == 0


def test_block_ranking_keeps_whole_channels_and_its_prefix_errors_are_least_squares() -> None:
    """block = 3: channel c owns features 3c..3c+2; removing a channel removes its block, and err[k] is
    the least-squares error of reconstructing every feature from the kept channels' features."""
    from netsqueeze.passes.squeeze_math import ranking

    g = torch.Generator().manual_seed(11)
    a = low_rank(2000, 18, 7, seed=11) + 0.1 * torch.randn(2000, 18, generator=g, dtype=torch.float64)
    m = moment_of(a)
    met = torch.randn(5, 18, generator=g, dtype=torch.float64)
    met = met.T @ met
    for method in ("greedy", "qr"):
        order, err = ranking(covariance(m), method, met, block=3)  # type: ignore[arg-type]
        assert sorted(order) == list(range(6)) and len(err) == 7 and err[0] == 1.0 and err[-1] == 0.0
        for k in (1, 3, 5):
            feats = [c * 3 + i for c in sorted(order[:k]) for i in range(3)]
            t, t0 = reconstruction(m, feats)
            res = a - (a[:, feats] @ t + t0)
            cen = a - a.mean(0)
            want = float(torch.trace(met @ res.T @ res) / torch.trace(met @ cen.T @ cen))
            assert abs(err[k] - want) < 1e-9
    # block = 1 is the plain ranking
    assert ranking(covariance(m), "greedy", met, block=1) == ranking(covariance(m), "greedy", met)


@pytest.mark.parametrize("d", [1, 512, 513, 700, 1029])
def test_gram_is_xtx_from_half_the_products(d: int) -> None:
    """`gram` multiplies only the upper block triangle of wide inputs (over two blocks of `GRAM_BLOCK`
    columns) and mirrors it: the same matrix as x.T @ x, exactly symmetric off the diagonal blocks."""
    from netsqueeze.passes.squeeze_math import GRAM_BLOCK, gram

    x = torch.randn(300, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    g = gram(x)
    assert g.shape == (d, d)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-10)
    if d > 2 * GRAM_BLOCK:  # each off-diagonal block is the transpose of the one product that made it
        assert torch.equal(g[:GRAM_BLOCK, GRAM_BLOCK:], g[GRAM_BLOCK:, :GRAM_BLOCK].T)


@pytest.mark.parametrize("block", [1, 3])
def test_greedy_order_does_not_depend_on_when_dropped_channels_are_cut_out(block: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The greedy elimination cuts dropped channels out of its matrices every `RANK_CUT_EVERY` drops (blocks: every
    drop); cut at every drop, every 7, or only at the end, the order and the prefix errors are the same."""
    from netsqueeze.passes import squeeze_math

    g = torch.Generator().manual_seed(4)
    c = 90 // block
    x = torch.randn(3000, 40, generator=g, dtype=torch.float64) @ torch.randn(40, c * block, generator=g,
                                                                              dtype=torch.float64)
    cov = torch.cov(x.T) + 1e-3 * torch.eye(c * block, dtype=torch.float64)
    w = torch.randn(9, c * block, generator=g, dtype=torch.float64)
    got = []
    for every in (1, 7, 10**9):
        monkeypatch.setattr(squeeze_math, "RANK_CUT_EVERY", every)
        got.append(ranking(cov, "greedy", w.T @ w, block=block))
    assert sorted(got[0][0]) == list(range(c))
    assert got[1][0] == got[0][0] and got[2][0] == got[0][0]
    assert max(abs(a - b) for run in got[1:] for a, b in zip(run[1], got[0][1])) < 1e-12
