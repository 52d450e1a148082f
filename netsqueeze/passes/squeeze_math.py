"""The linear algebra of squeeze-and-fold (Ozen & Orailoglu, ECML PKDD 2020): spectrum rank, channel
selection, reconstruction.

All functions work on the augmented second-moment matrix of channel activations, streamed as
M = E[[a, 1][a, 1]ᵀ] (C+1 × C+1, last row/column = the mean), so no activation is kept.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Selector = Literal["greedy", "qr"]


GRAM_BLOCK = 256  # columns per block of `gram`'s block-triangular product


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx of rows `x` [N, d]. When x is wide (d over two blocks of `GRAM_BLOCK` columns) only the upper block
    triangle is multiplied, each block of columns against itself and the columns after it, and mirrored: about
    half the multiply-adds of `x.T @ x` (a BLAS product does not see the symmetry), the same values up to the
    order of the sums."""
    d = x.shape[1]
    if d <= 2 * GRAM_BLOCK:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype)
    for lo in range(0, d, GRAM_BLOCK):
        hi = min(d, lo + GRAM_BLOCK)
        row = x[:, lo:hi].T @ x[:, lo:]  # [hi - lo, d - lo]
        out[lo:hi, lo:] = row
        out[lo:, lo:hi] = row.T
    return out


def covariance(moment: torch.Tensor) -> torch.Tensor:
    """Σ = E[aaᵀ] − μμᵀ from the augmented second moment (float64)."""
    m = moment.double()
    mu = m[:-1, -1]
    return m[:-1, :-1] - torch.outer(mu, mu)


def shrink(cov: torch.Tensor, rows: int) -> tuple[torch.Tensor, float]:
    """(Σ̂, ρ): the sample covariance `cov` of `rows` rows shrunk toward its diagonal, Σ̂ = (1 − ρ)·Σ + ρ·diag Σ:
    each channel keeps its variance (a constant channel stays exactly removable), the correlations shrink by 1 − ρ.
    ρ is the oracle approximating shrinkage intensity (OAS; Chen, Wiesel, Eldar & Hero, IEEE Trans. Signal
    Process. 58(10), 2010, eq. 23) of the correlation matrix R toward I, over the p channels that vary:
    ρ = min(1, ((1 − 2/p)·tr R² + (tr R)²) / ((n + 1 − 2/p)·(tr R² − (tr R)²/p))) — shrinking R toward I is
    shrinking Σ toward its diagonal (Schäfer & Strimmer, Stat. Appl. Genet. Mol. Biol. 4(1), 2005, target D),
    which suits channels of very different scales.

    A sample covariance of fewer rows than channels has rank < p: the directions its rows did not reach read as
    carrying no variance, so a channel looks exactly reconstructed from the others when new inputs would not have
    it so. ρ grows as the rows get few against the effective rank (tr R)²/tr R² and vanishes as they grow (about
    (p_eff + 1)/n): on convolutions, whose rows are every spatial position, it is nil."""
    cov = cov.double()
    var = cov.diagonal()
    live = var > 1e-12 * float(var.max().clamp_min(1e-300))
    p = int(live.sum())
    if p < 2:
        return cov, 0.0
    sd = var[live].sqrt()
    r = cov[live][:, live] / torch.outer(sd, sd)
    tr2 = float((r * r).sum())
    den = (rows + 1 - 2 / p) * (tr2 - p)  # tr R = p
    if den <= 0:  # R = I already
        return cov, 0.0
    rho = min(1.0, ((1 - 2 / p) * tr2 + p * p) / den)
    return (1 - rho) * cov + rho * torch.diag(var), rho


def rank_for_energy(cov: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading eigenvalues of Σ hold `energy` of its trace (at least 1)."""
    ev = torch.linalg.eigvalsh(cov.double()).flip(0).clamp_min(0)
    total = float(ev.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(ev, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def _ridge(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    scale = float(cov.diagonal().mean().clamp_min(1e-30))
    return cov + ridge * scale * torch.eye(cov.shape[0], dtype=cov.dtype)


def _metric(m: torch.Tensor | None, c: int) -> torch.Tensor:
    return torch.eye(c, dtype=torch.float64) if m is None else m.double()


RANK_CUT_EVERY = 64  # greedy ranking: dropped channels cut out of its matrices every this many drops


def ranking(cov: torch.Tensor, method: Selector, metric: torch.Tensor | None = None,
            ridge: float = 1e-6, block: int = 1) -> tuple[list[int], list[float]]:
    """Channels in the order they are worth keeping, and the reconstruction error of every prefix.

    Returns (order, err) where keeping `order[:k]` and reconstructing the rest by least squares
    leaves the relative error err[k] = tr(M·Σ_res)/tr(M·Σ) (err[0] = 1, err[C] = 0). M is the
    consumers' input metric Σ_o WᵀW (per kernel tap / block position, summed), so the error is the
    one the consumers' outputs see; M = I measures the channels themselves.

    `block` > 1: `cov` and `metric` are over features, channel c owning features c·block ..
    c·block+block−1 (the H·W positions of a channel feeding a linear layer after flatten); a channel
    is kept or removed with all its features and every removed feature is reconstructed from every
    kept one.

    - `greedy`: backward elimination. With P = Σ_SS⁻¹, dropping channel J from S adds
      tr(P_JJ⁻¹ · (Σ_{:,S}P_{:,J})ᵀ M (Σ_{:,S}P_{:,J})) to the error (the part of every feature along
      J's component orthogonal to S∖J); the cheapest channel goes first and P is downdated by the
      Schur complement.
    - `qr`: column-pivoted QR on the centred activations, done as pivoted Cholesky of Σ: each step
      keeps the channel with the largest residual variance.
    """
    n_feat = cov.shape[0]
    c = n_feat // block
    m = _metric(metric, n_feat)
    cov = cov.double()

    def feats(chans: list[int]) -> list[int]:
        return [ch * block + i for ch in chans for i in range(block)]

    if method == "qr":
        res = cov.clone()
        order: list[int] = []
        tiny = 1e-13 * float(cov.diagonal().abs().max().clamp_min(1e-300))
        for _ in range(c):
            d = res.diagonal().reshape(c, block).sum(1)
            d[order] = -float("inf")
            j = int(torch.argmax(d))
            order.append(j)
            for f in feats([j]):
                if res[f, f] > tiny:
                    col = res[:, f] / res[f, f].sqrt()
                    res = res - torch.outer(col, col)
    else:
        reg = _ridge(cov, ridge)
        keep = list(range(c))
        p = torch.linalg.inv(reg)  # over the kept channels' features, in `keep` order
        # Σ_{:,S}·P (the regression of every feature on S) and M·Σ_{:,S}·P, downdated with P: dropping J
        # from S maps B to B_rest − B_J·P_JJ⁻¹·P_J,rest, so a step costs O(F²·block), not O(F³)
        proj = reg @ p
        mproj = m @ proj
        removed: list[int] = []
        dead = torch.zeros(c, dtype=torch.bool)  # per column of the matrices: dropped, not yet cut out
        for _ in range(c - 1):
            nk = len(keep)
            if block == 1:
                score = torch.where(dead, torch.inf, (proj * mproj).sum(0) / p.diagonal())
            else:
                pr, mp = proj.reshape(n_feat, nk, block), mproj.reshape(n_feat, nk, block)
                inner = torch.einsum("fni,fnj->nij", pr, mp)
                ar = torch.arange(nk)
                pjj = p.reshape(nk, block, nk, block)[ar, :, ar, :]  # nk × block × block
                score = torch.linalg.solve(pjj, inner).diagonal(dim1=1, dim2=2).sum(1)
            j = int(torch.argmin(score))
            lo, hi = j * block, (j + 1) * block
            # P_JJ⁻¹·P_J,: over every kept feature; the update zeroes J's own rows and columns (up to rounding),
            # which no later update of a kept entry reads: they are cut out every `RANK_CUT_EVERY` drops, each
            # cut one copy per matrix (with blocks, at every drop: the block solve above needs them gone)
            down = torch.linalg.solve(p[lo:hi, lo:hi], p[lo:hi])
            p.addmm_(p[:, lo:hi].clone(), down, alpha=-1)
            proj.addmm_(proj[:, lo:hi].clone(), down, alpha=-1)
            mproj.addmm_(mproj[:, lo:hi].clone(), down, alpha=-1)
            removed.append(keep[j])
            dead[j] = True
            if block > 1 or int(dead.sum()) >= RANK_CUT_EVERY:
                live = (~dead).nonzero().flatten()
                cols = (live[:, None] * block + torch.arange(block)).flatten()
                p = p.index_select(0, cols).index_select(1, cols)
                proj, mproj = proj.index_select(1, cols), mproj.index_select(1, cols)
                keep = [keep[i] for i in live.tolist()]
                dead = torch.zeros(len(keep), dtype=torch.bool)
        order = [k for k, gone in zip(keep, dead.tolist()) if not gone] + removed[::-1]
    err = prefix_errors(cov, m, feats(order))
    return order, err[::block]


def prefix_errors(cov: torch.Tensor, metric: torch.Tensor, order: list[int]) -> list[float]:
    """err[k] = tr(M·Σ_res)/tr(M·Σ) after projecting out `order[:k]` (Gram–Schmidt in that order).

    Each Gram–Schmidt step removes one column l_j of the Cholesky factor of Σ in that order, so
    tr(M·Σ_res(k)) = tr(M·Σ) − Σ_{j<k} l_jᵀ·M·l_j: one factorisation and one product. A Σ that is singular
    along the order (a feature the earlier ones determine) takes the step-by-step projection instead."""
    m = metric.double()
    cov = cov.double()
    total = float((m * cov).sum())
    if total <= 0:
        return [1.0] + [0.0] * len(order)
    if len(order) == cov.shape[0]:
        idx = torch.tensor(order)
        chol, info = torch.linalg.cholesky_ex(cov[idx][:, idx])
        d = chol.diagonal()
        if int(info) == 0 and float(d.min()) > 1e-6 * float(d.max()):
            quad = (chol * (m[idx][:, idx] @ chol)).sum(0)
            left = (total - torch.cumsum(quad, 0)) / total
            return [1.0] + [min(1.0, max(0.0, float(e))) for e in left[:-1]] + [0.0]
    res = cov.clone()
    tiny = 1e-13 * float(res.diagonal().abs().max())
    err = [1.0]
    for j in order:
        if res[j, j] > tiny:
            col = res[:, j] / res[j, j].sqrt()
            res = res - torch.outer(col, col)
        err.append(min(1.0, max(0.0, float((m * res).sum()) / total)))
    err[-1] = 0.0
    return err


def kept_for_error(err: list[float], limit: float) -> int:
    """Smallest k (≥ 1) whose prefix error is within `limit`."""
    return next((k for k in range(1, len(err)) if err[k] <= limit + 1e-12), len(err) - 1)


def min_norm_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution of a·x = b (SVD, LAPACK gelsd), the same on every call.

    Never `torch.linalg.lstsq`'s default driver (gelsy): PyTorch hands LAPACK's gelsy an uninitialised
    pivot array (JPVT, pytorch/pytorch#187411), so its column pivoting, and the solution's last bits
    (here up to 4e-9 in a flatten→linear fold), change from call to call and from run to run.
    """
    return torch.linalg.lstsq(a.double(), b.double(), driver="gelsd").solution


def cholesky_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """x with a·x = b by Cholesky for a symmetric `a` that is comfortably positive definite; None when it
    is not (singular, or too ill-conditioned for the factor to be trusted)."""
    a, b = a.double(), b.double()
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        d = chol.diagonal()
        lo, hi = float(d.min()), float(d.max())
        # (max/min of L's diagonal)² bounds cond(a) from below; gelsy truncates at cond ≈ 1/(eps·n)
        if lo > 0 and (hi / lo) ** 2 < 1e-3 / (torch.finfo(torch.float64).eps * max(1, a.shape[0])):
            return torch.cholesky_solve(b, chol)
    return None


def solve_normal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with a·x = b for a symmetric positive semi-definite `a` (normal equations [X 1]ᵀ[X 1] + ridge),
    deterministic: Cholesky when `a` is comfortably non-singular, else `min_norm_solve` (the
    minimum-norm solution gelsy would give a rank-deficient system)."""
    x = cholesky_solve(a, b)
    return min_norm_solve(a, b) if x is None else x


def ridged_normal(xtx: torch.Tensor, ridge: float) -> torch.Tensor:
    """The normal matrix [X 1]ᵀ[X 1] with `ridge` (relative to the mean diagonal) on X's block, not the intercept."""
    out = xtx.double().clone()  # the ridge added to the diagonal in place: no identity matrix built
    out.diagonal()[:-1] += ridge * float(out.diagonal()[:-1].mean().clamp_min(1e-30))
    return out


FIT_ROWS = 4  # calibration rows per fitted coefficient under which a fold's error on them understates new data's
GCV_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # tried by `gcv_ridge`, relative to the mean diagonal


def short_fit(rows: int, inputs: int) -> bool:
    """Whether a least-squares fit of `inputs` coefficients and an intercept on `rows` rows is short of `FIT_ROWS`
    rows per coefficient: its ridge is then `gcv_ridge`'s, and the pass says so (`refit.short_fits`)."""
    return rows < FIT_ROWS * (inputs + 1)


def gcv_ridge(a: torch.Tensor, b: torch.Tensor, yy: float, rows: int, ridge: float) -> float:
    """The ridge (relative to the mean diagonal, `ridged_normal`) of least squares Y ≈ [X 1]·W, chosen by
    generalised cross-validation (Golub, Heath & Wahba 1979) over `ridge` and `GCV_RIDGES`: the least
    RSS(α) / (1 − df(α)/n)², n = `rows`, df(α) = tr((A + αI)⁻¹A) (the intercept included). It needs only the
    normal equations: `a` = [X 1]ᵀ[X 1], `b` = [X 1]ᵀY and `yy` = tr(YᵀY), all summed over the n rows (or all
    averaged). Where the rows are few for the coefficients the smallest ridge's near-exact fit leaves no degrees
    of freedom, and GCV takes a larger one: what error on new inputs prefers."""
    a, b = a.double(), b.double()
    best, best_score = ridge, math.inf
    for rel in dict.fromkeys((ridge, *GCV_RIDGES)):
        wa = solve_normal(ridged_normal(a, rel), torch.cat([b, a], 1))  # one factorisation: W and (A + αI)⁻¹A
        w = wa[:, :b.shape[1]]
        df = float(torch.trace(wa[:, b.shape[1]:]))
        if df >= rows:
            continue
        rss = yy - 2.0 * float((w * b).sum()) + float((w * (a @ w)).sum())
        score = max(rss, 0.0) / (1.0 - df / rows) ** 2
        if score < best_score:
            best, best_score = rel, score
    return best


def reconstruction(moment: torch.Tensor, keep: list[int], ridge: float = 0.0,
                   rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with intercept: a ≈ a_S·T + t₀ over the calibration distribution.

    Returns T (|S| × C) and t₀ (C). Kept channels reconstruct themselves exactly (T[s, keep[s]] = 1).
    `ridge` (relative to the mean variance) regularises ill-conditioned Σ_SS. Given the calibration `rows` the
    moment averages, with fewer than `FIT_ROWS` of them per coefficient, the ridge is `gcv_ridge`'s instead.
    """
    m = moment.double()
    c = m.shape[0] - 1
    if rows is not None and short_fit(rows, len(keep)):  # the ridge by GCV, solved in its own terms
        aug = [*keep, c]
        a, b = m[aug][:, aug], m[aug][:, :c]
        w = solve_normal(ridged_normal(a, gcv_ridge(a, b, float(m[:c, :c].trace()), rows, ridge)), b)
        t, t0 = w[:-1].clone(), w[-1].clone()
    else:
        cov = covariance(m)
        mu = m[:-1, -1]
        css = cov[keep][:, keep]
        if ridge > 0:
            css = _ridge(css, ridge)
        rhs = cov[keep]  # |S| × C
        try:
            t = torch.linalg.solve(css, rhs)
        except RuntimeError:
            t = min_norm_solve(css, rhs)
        t0 = mu - mu[keep] @ t
    # kept channels copy themselves exactly (removes solver round-off on the identity block)
    t[:, keep] = torch.eye(len(keep), dtype=t.dtype)
    t0[keep] = 0.0
    assert t.shape == (len(keep), c)
    return t, t0
