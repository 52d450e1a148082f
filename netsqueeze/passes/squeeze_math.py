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


def _metric(m: torch.Tensor | None, c: int) -> torch.Tensor:
    return torch.eye(c, dtype=torch.float64) if m is None else m.double()


def ranking(cov: torch.Tensor, method: Selector, metric: torch.Tensor | None = None,
            ridge: float = 1e-6) -> tuple[list[int], list[float]]:
    """Channels in the order they are worth keeping, and the reconstruction error of every prefix.

    Returns (order, err) where keeping `order[:k]` and reconstructing the rest by least squares
    leaves the relative error err[k] = tr(M·Σ_res)/tr(M·Σ) (err[0] = 1, err[C] = 0). M is the
    consumers' input metric Σ_o WᵀW (per kernel tap / block position, summed), so the error is the
    one the consumers' outputs see; M = I measures the channels themselves.

    - `greedy`: backward elimination. With P = Σ_SS⁻¹, dropping j from S adds
      (Σ_{:,S}P e_j)ᵀ M (Σ_{:,S}P e_j) / P_jj to the error (the part of every channel along x_j's
      component orthogonal to S∖{j}); the cheapest channel goes first, P is downdated in O(|S|²).
    - `qr`: column-pivoted QR on the centred activations, done as pivoted Cholesky of Σ: each step
      keeps the channel with the largest residual variance.
    """
    c = cov.shape[0]
    m = _metric(metric, c)
    cov = cov.double()
    if method == "qr":
        res = cov.clone()
        order: list[int] = []
        for _ in range(c):
            d = res.diagonal().clone()
            d[order] = -float("inf")
            j = int(torch.argmax(d))
            order.append(j)
            if res[j, j] > 0:
                col = res[:, j] / res[j, j].sqrt()
                res = res - torch.outer(col, col)
    else:
        reg = _ridge(cov, ridge)
        keep = list(range(c))
        p = torch.linalg.inv(reg)
        removed: list[int] = []
        while len(keep) > 1:
            proj = reg[:, keep] @ p  # C × |S|
            score = (proj * (m @ proj)).sum(0) / p.diagonal()
            j = int(torch.argmin(score))
            pj = p[:, j]
            p = p - torch.outer(pj, pj) / pj[j]
            mask = torch.ones(len(keep), dtype=torch.bool)
            mask[j] = False
            p = p[mask][:, mask]
            removed.append(keep.pop(j))
        order = keep + removed[::-1]
    return order, prefix_errors(cov, m, order)


def prefix_errors(cov: torch.Tensor, metric: torch.Tensor, order: list[int]) -> list[float]:
    """err[k] = tr(M·Σ_res)/tr(M·Σ) after projecting out `order[:k]` (Gram–Schmidt in that order)."""
    res = cov.double().clone()
    m = metric.double()
    total = float((m * res).sum())
    if total <= 0:
        return [1.0] + [0.0] * len(order)
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


def select_channels(cov: torch.Tensor, k: int, method: Selector, ridge: float = 1e-6,
                    metric: torch.Tensor | None = None) -> list[int]:
    k = max(1, min(k, cov.shape[0]))
    return sorted(ranking(cov, method, metric, ridge)[0][:k])


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
