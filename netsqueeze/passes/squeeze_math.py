"""The linear algebra of squeeze-and-fold (METHODS.md §2): spectrum rank, channel selection, reconstruction.

All functions work on the augmented second-moment matrix of channel activations, streamed as
M = E[[a, 1][a, 1]ᵀ] (C+1 × C+1, last row/column = the mean), so no activation is kept.
"""

from __future__ import annotations

from typing import Literal

import torch

Selector = Literal["greedy", "qr"]


def covariance(moment: torch.Tensor) -> torch.Tensor:
    """Σ = E[aaᵀ] − μμᵀ from the augmented second moment (float64)."""
    m = moment.double()
    mu = m[:-1, -1]
    return m[:-1, :-1] - torch.outer(mu, mu)


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


def select_qr(cov: torch.Tensor, k: int, ridge: float = 1e-6) -> list[int]:
    """Column-pivoted QR on the centred activations, done as pivoted Cholesky of Σ.

    Picks, at each step, the channel with the largest residual variance after projecting out
    the channels already chosen — exactly the pivot order of QR with column pivoting on A.
    """
    res = _ridge(cov.double(), ridge).clone()
    chosen: list[int] = []
    for _ in range(k):
        d = res.diagonal().clone()
        if chosen:
            d[chosen] = -1.0
        j = int(torch.argmax(d))
        chosen.append(j)
        col = res[:, j] / res[j, j].sqrt()
        res -= torch.outer(col, col)
    return sorted(chosen)


def select_greedy(cov: torch.Tensor, k: int, ridge: float = 1e-6) -> list[int]:
    """Greedy backward elimination: repeatedly drop the channel whose removal adds the least
    reconstruction error of *all* channels, until k remain.

    With P = Σ_SS⁻¹, dropping j from S adds ‖Σ_{:,S} P e_j‖² / P_jj to the least-squares error
    (the variance of all channels along x_j's part orthogonal to S∖{j}); P is downdated in O(|S|²).
    """
    cov = _ridge(cov.double(), ridge)
    keep = list(range(cov.shape[0]))
    p = torch.linalg.inv(cov)
    while len(keep) > k:
        proj = cov[:, keep] @ p  # C × |S|
        score = (proj**2).sum(0) / p.diagonal()
        j = int(torch.argmin(score))
        pj = p[:, j]
        p = p - torch.outer(pj, pj) / pj[j]
        mask = torch.ones(len(keep), dtype=torch.bool)
        mask[j] = False
        p = p[mask][:, mask]
        del keep[j]
    return keep


def select_channels(cov: torch.Tensor, k: int, method: Selector, ridge: float = 1e-6) -> list[int]:
    k = max(1, min(k, cov.shape[0]))
    return select_greedy(cov, k, ridge) if method == "greedy" else select_qr(cov, k, ridge)


def reconstruction(moment: torch.Tensor, keep: list[int], ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with intercept: a ≈ a_S·T + t₀ over the calibration distribution.

    Returns T (|S| × C) and t₀ (C). Kept channels reconstruct themselves exactly (T[s, keep[s]] = 1).
    `ridge` (relative to the mean variance) regularises ill-conditioned Σ_SS.
    """
    m = moment.double()
    c = m.shape[0] - 1
    cov = covariance(m)
    mu = m[:-1, -1]
    css = cov[keep][:, keep]
    if ridge > 0:
        css = _ridge(css, ridge)
    rhs = cov[keep]  # |S| × C
    try:
        t = torch.linalg.solve(css, rhs)
    except RuntimeError:
        t = torch.linalg.lstsq(css, rhs).solution
    t0 = mu - mu[keep] @ t
    # kept channels copy themselves exactly (removes solver round-off on the identity block)
    t[:, keep] = torch.eye(len(keep), dtype=t.dtype)
    t0[keep] = 0.0
    assert t.shape == (len(keep), c)
    return t, t0


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
