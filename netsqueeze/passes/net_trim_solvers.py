"""The Net-Trim convex program of one chunk of output neurons, and its two solvers (ADMM and cvxpy).

Net-Trim (Aghasi, Abdi, Nguyen & Romberg, NeurIPS 2017, arXiv 1611.05162; journal version arXiv
1806.06457) retrains a layer y = relu(Wᵀx) so that its outputs on calibration samples stay close to the
original ones while W becomes as sparse as possible. The program separates per output neuron m
(a column u of W, N inputs, P samples x_p, original outputs y):

    min ‖u‖₁  s.t.  ‖(uᵀX − y)_Ω‖₂ ≤ ε_m   and   (uᵀX)_Ωᶜ ≤ v          (relu layer; Ω = {y > 1e-6})
    min ‖u‖₁  s.t.  ‖uᵀX − y‖₂ ≤ ε_m                                     (layer without relu)

A `Chunk` holds several neurons of one layer that share X (so one Cholesky factor serves them all);
`solve(chunk, settings)` is the picklable task an executor runs. Both solvers return the same `Solution`.
The bias is the last row of X (a row of ones) and is not penalised: it is one dense value per neuron, and
penalising it would only move the solution away from the layer's affine fit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

_BALANCE_EVERY = 20  # ADMM iterations between adjustments of ρ
# ρ stays within 1e±4 of where the solve started: unbounded balancing drove it to 1e55 and the iterates to 1e150
_RHO_SPAN = 1e4
ACTIVE = 1e-6  # Ω: the original output counts as active above this (the reference code's threshold)


@dataclass(frozen=True)
class Chunk:
    """Neurons `neurons` of layer `layer`: inputs `x` [N, P] (float64, samples as columns, bias row last
    when `bias`), original outputs `y` [M, P], the half-space bound `v` [M, P] on Ωᶜ (None: a layer without
    relu, least squares), radii `eps` [M], and optionally a warm start from an earlier solve."""

    layer: str
    neurons: tuple[int, int]  # [start, stop) in the layer's output channels
    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor | None
    eps: torch.Tensor
    bias: bool
    warm: tuple[torch.Tensor, ...] | None = None  # ADMM (W3, U1, U2, ρ) of an earlier solve


@dataclass(frozen=True)
class Settings:
    solver: str = "admm"
    rho: float = 100.0  # ADMM penalty, in the units the c0 scaling gives X
    max_iterations: int = 5000
    tolerance: float = 1e-4  # relative primal/dual residual at which ADMM stops
    feasibility: float = 0.01  # constraint slack accepted, as a fraction of ε


@dataclass(frozen=True)
class Solution:
    """Weights `w` [N, M] of the chunk's neurons (exact zeros where pruned), how the solve ended, and the
    constraint values reached: `ball` [M] = ‖(wᵀX − y)_Ω‖ and `excess` [M] = ‖max((wᵀX − v)_Ωᶜ, 0)‖."""

    layer: str
    neurons: tuple[int, int]
    w: torch.Tensor
    ball: torch.Tensor
    excess: torch.Tensor
    iterations: int
    primal: float
    dual: float
    converged: bool
    seconds: float
    warm: tuple[torch.Tensor, ...] | None = None
    message: str = ""


# ---- determinism: one BLAS thread per task, whatever process or thread runs it --------------------
_lock = threading.Lock()
_active = 0
_saved = 1


@contextmanager
def single_threaded() -> Iterator[None]:
    """Runs the body with one torch thread (restored when the last concurrent body ends), so a task's
    floating-point reductions, and hence its bits, do not depend on the executor that runs it."""
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                torch.set_num_threads(_saved)


def masks(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ω, Ωᶜ) as boolean [M, P]; every entry is in Ω for a layer without relu."""
    if chunk.v is None:
        on = torch.ones_like(chunk.y, dtype=torch.bool)
    else:
        on = chunk.y > ACTIVE
    return on, ~on


def constraints(chunk: Chunk, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ball [M], excess [M]) of weights `w` [N, M] on the chunk: the ε-ball distance on Ω and the norm of
    the violations of the half-space bound on Ωᶜ (both in the units of ε)."""
    on, off = masks(chunk)
    z = w.T @ chunk.x
    ball = torch.linalg.vector_norm(torch.where(on, z - chunk.y, 0.0), dim=1)
    if chunk.v is None:
        return ball, torch.zeros_like(ball)
    excess = torch.linalg.vector_norm(torch.where(off, (z - chunk.v).clamp_min(0.0), 0.0), dim=1)
    return ball, excess


def outside(chunk: Chunk, ball: torch.Tensor, excess: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[M] whether each neuron misses its constraints by more than `settings.feasibility` of ε (and a floor of
    10·tolerance·‖y_m‖ for ε = 0)."""
    slack = settings.feasibility * chunk.eps + 10 * settings.tolerance * torch.linalg.vector_norm(chunk.y, dim=1)
    return (ball > chunk.eps + slack + 1e-12) | (excess > slack + 1e-12)


def within(chunk: Chunk, ball: torch.Tensor, excess: torch.Tensor, settings: Settings) -> bool:
    """Whether every neuron meets its constraints (`outside`)."""
    return not bool(outside(chunk, ball, excess, settings).any())


def penalised(chunk: Chunk) -> torch.Tensor:
    """[N, 1] weight of each input row in ‖u‖₁: 1, and 0 for the bias row."""
    t = torch.ones(chunk.x.shape[0], 1, dtype=torch.float64)
    if chunk.bias:
        t[-1] = 0.0
    return t


def solve(chunk: Chunk, settings: Settings) -> Solution:
    """The task an executor runs: solves the chunk with `settings.solver` on one thread.

    A relu neuron that is never active on the samples (Ω empty) with an unpenalised bias has a closed-form
    optimum: zero weights and the bias at min(v), feasible at ‖u‖₁ = 0. Solving it iteratively would chase
    a bias that may go to −∞ at no cost (the optimal set is unbounded), so those neurons are set directly."""
    with single_threaded():
        v = chunk.v
        dead = ~(chunk.y > ACTIVE).any(1)
        if v is None or not chunk.bias or not bool(dead.any()):
            return _solve(chunk, settings)
        live = torch.nonzero(~dead).flatten()
        w = torch.zeros(chunk.x.shape[0], chunk.y.shape[0], dtype=torch.float64)
        w[-1, dead] = v[dead].amin(1)
        sol = None
        if live.numel():
            sub = replace(chunk, y=chunk.y[live], v=v[live], eps=chunk.eps[live])
            sol = _solve(sub, settings)
            w[:, live] = sol.w
        ball, excess = constraints(chunk, w)
        if sol is None:
            return Solution(chunk.layer, chunk.neurons, w, ball, excess, 0, 0.0, 0.0, True, 0.0)
        return replace(sol, neurons=chunk.neurons, w=w, ball=ball, excess=excess)


def _solve(chunk: Chunk, settings: Settings) -> Solution:
    if settings.solver == "cvxpy":
        return solve_cvxpy(chunk, settings)
    sol = solve_admm(chunk, settings)
    if sol.converged and within(chunk, sol.ball, sol.excess, settings):
        return sol
    # ADMM can stall on a neuron active on a handful of samples, whatever ρ: the neurons it leaves outside
    # their constraints (all of them when none is) are solved exactly, one program each
    out = torch.nonzero(outside(chunk, sol.ball, sol.excess, settings)).flatten()
    redo = out if out.numel() else torch.arange(chunk.y.shape[0])
    exact = solve_cvxpy(replace(chunk, y=chunk.y[redo], v=None if chunk.v is None else chunk.v[redo],
                                eps=chunk.eps[redo], warm=None), settings)
    w = sol.w.clone()
    w[:, redo] = exact.w
    ball, excess = constraints(chunk, w)
    return replace(sol, w=w, ball=ball, excess=excess,
                   converged=exact.converged and within(chunk, ball, excess, settings),
                   message=f"{redo.numel()} neuron(s) ADMM left unsolved re-solved by cvxpy"
                           + (f": {exact.message}" if exact.message else ""))


def solve_admm(chunk: Chunk, settings: Settings) -> Solution:
    """ADMM in the reference code's constrained form (DNNToolBox/Net-Trim, NetTrimSolver_np.py).

    Splits z₁ = WᵀX (W1), z₂ = W (W2) and the least-squares variable W3, in scaled form with duals U1, U2:
    W1 projects WᵀX − U1 onto the ε-ball around y on Ω (one ball per neuron) and onto the half-space
    {z ≤ v} on Ωᶜ; W2 soft-thresholds W3 − U2 at 1/ρ (not the bias row); W3 solves
    (XXᵀ + I) W3 = X(W1 + U1)ᵀ + W2 + U2 with one Cholesky factor for the whole chunk. X, y, v and ε are
    first divided by c0 = 0.3·sqrt(max XXᵀ) as in the reference, which makes the factor well conditioned.
    Stops when the primal residual ‖(W1 − W3ᵀX, W2 − W3)‖ and the dual residual ‖X ΔW1ᵀ + ΔW2‖ both fall
    under `tolerance` relative to the iterates' norms (Boyd et al., Found. Trends ML 2011, §3.3.1); the
    returned weights are W2, whose pruned entries are exact zeros.
    """
    t0 = time.perf_counter()
    x, y, eps = chunk.x, chunk.y, chunk.eps
    n, p = x.shape
    m = y.shape[0]
    gram = x @ x.T
    c0 = 0.3 * math.sqrt(max(float(gram.max()), 1e-300))
    xs, ys, es = x / c0, y / c0, eps / c0
    vs = None if chunk.v is None else chunk.v / c0
    factor = torch.linalg.cholesky(gram / c0**2 + torch.eye(n, dtype=torch.float64))
    on, _ = masks(chunk)
    pen = penalised(chunk)
    rho = settings.rho
    if chunk.warm is not None:
        w3, u1, u2, r0 = (t.clone() for t in chunk.warm)
        rho = float(r0)
    else:
        w3 = torch.zeros(n, m, dtype=torch.float64)
        u1 = torch.zeros(m, p, dtype=torch.float64)
        u2 = torch.zeros(n, m, dtype=torch.float64)
    gs = gram / c0**2
    ax = w3.T @ xs
    w1, w2 = ax.clone(), w3.clone()
    xw1, xu1 = xs @ w1.T, xs @ u1.T  # X·W1ᵀ and X·U1ᵀ, kept up to date: two products with X per iteration
    tol = settings.tolerance
    # the data's scale bounds the residual floor from below: iterates that are all zero (the zero weights meet
    # ε = 100% exactly) would otherwise leave a floor of 1e-300 no float residual reaches
    y_scale = float(torch.linalg.vector_norm(ys, dim=1).max()) if ys.numel() else 0.0
    primal = dual = math.inf
    it = 0
    converged = False
    rho_start = rho
    next_check = 0
    for it in range(1, settings.max_iterations + 1):
        z = ax - u1
        d = torch.where(on, z - ys, 0.0)
        norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        gain = es[:, None] / torch.maximum(norm, es[:, None]).clamp_min(1e-300)
        w1_new = torch.where(on, ys + gain * d, z if vs is None else torch.minimum(z, vs))
        a = w3 - u2
        w2_new = torch.sign(a) * (a.abs() - pen / rho).clamp_min(0.0)
        xw1_new = xs @ w1_new.T
        w3 = torch.cholesky_solve(xw1_new + xu1 + w2_new + u2, factor)
        ax = w3.T @ xs
        r1, r2 = w1_new - ax, w2_new - w3
        u1 = u1 + r1
        u2 = u2 + r2
        xu1 = xu1 + xw1_new - gs @ w3
        # per neuron (column): residuals against that neuron's own scale, so a small neuron of the chunk is
        # solved as accurately as a large one
        p_col = ((r1 * r1).sum(1) + (r2 * r2).sum(0)).sqrt()
        d_col = torch.linalg.vector_norm(xw1_new - xw1 + (w2_new - w2), dim=0)
        w1, w2, xw1 = w1_new, w2_new, xw1_new
        sp_col = torch.maximum(((ax * ax).sum(1) + (w3 * w3).sum(0)).sqrt(), ((w1 * w1).sum(1) + (w2 * w2).sum(0)).sqrt())
        # the W3 step has no objective term, so Aᵀu → 0 at the optimum: the dual residual is measured
        # against ‖Aᵀz‖ (the iterates' scale) instead of Boyd's ‖Aᵀu‖
        sd_col = torch.linalg.vector_norm(xw1 + w2, dim=0)
        floor = 1e-6 * max(float(torch.maximum(sp_col.max(), sd_col.max())), y_scale) + 1e-300
        primal, dual = float(p_col.max()), float(d_col.max())
        small = bool((p_col <= tol * sp_col.clamp_min(floor)).all() & (d_col <= tol * sd_col.clamp_min(floor)).all())
        if small and it >= next_check:
            # stop only on weights that meet the constraints (W2 lags W3 by one step); else look again later
            ball, excess = constraints(chunk, w2)
            if within(chunk, ball, excess, settings):
                converged = True
                break
            next_check = it + 10
        if it % _BALANCE_EVERY == 0:
            # residual balancing (Boyd et al. §3.4.1): ρ only sets the threshold 1/ρ here (the factor does
            # not depend on it), so it adapts for free; the scaled duals follow, u' = u·ρ/ρ'
            rel_p = float(p_col.norm() / sp_col.norm().clamp_min(1e-300))
            rel_d = float(d_col.norm() / sd_col.norm().clamp_min(1e-300))
            if rel_p > 10 * rel_d and rho * 2 <= rho_start * _RHO_SPAN:
                rho, u1, u2, xu1 = rho * 2, u1 / 2, u2 / 2, xu1 / 2
            elif rel_d > 10 * rel_p and rho / 2 >= rho_start / _RHO_SPAN:
                rho, u1, u2, xu1 = rho / 2, u1 * 2, u2 * 2, xu1 * 2
    w = w2 * 1.0  # a copy: W2 holds the exact zeros of the soft threshold
    ball, excess = constraints(chunk, w)
    return Solution(chunk.layer, chunk.neurons, w, ball, excess, it, primal * c0, dual * c0, converged,
                    time.perf_counter() - t0, (w3, u1, u2, torch.tensor(rho, dtype=torch.float64)))


def solve_cvxpy(chunk: Chunk, settings: Settings) -> Solution:
    """The exact program in cvxpy, one problem per neuron, solved by CLARABEL: the reference solver."""
    import cvxpy as cp
    import numpy as np

    t0 = time.perf_counter()
    x = chunk.x.numpy()
    n = x.shape[0]
    on, off = (t.numpy() for t in masks(chunk))
    weight = penalised(chunk).numpy()[:, 0]
    cols = []
    message = ""
    ok = True
    for j in range(chunk.y.shape[0]):
        u = cp.Variable(n)
        y = chunk.y[j].numpy()
        cons = [cp.norm(x[:, on[j]].T @ u - y[on[j]], 2) <= float(chunk.eps[j])]
        if chunk.v is not None and off[j].any():
            cons.append(x[:, off[j]].T @ u <= chunk.v[j].numpy()[off[j]])
        prob = cp.Problem(cp.Minimize(cp.norm(cp.multiply(weight, u), 1)), cons)
        try:
            prob.solve(solver=cp.CLARABEL)
        except cp.error.SolverError as e:
            ok, message = False, f"neuron {chunk.neurons[0] + j}: {e}"
            cols.append(np.zeros(n))
            continue
        if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or u.value is None:
            ok, message = False, f"neuron {chunk.neurons[0] + j}: cvxpy status {prob.status}"
            cols.append(np.zeros(n))
            continue
        cols.append(np.asarray(u.value, dtype=np.float64))
    w = torch.from_numpy(np.stack(cols, 1))
    # interior-point solutions are never exactly sparse (CLARABEL stops at ~1e-8 relative gaps): an entry whose
    # contribution to its neuron's output, |u_i|·‖x_i‖, is under 1e-6 of the target ‖y_m‖ is a zero, as long as the
    # constraints still hold within the settings' feasibility; else only entries under 1e-9 of the largest
    reach = w.abs() * torch.linalg.vector_norm(chunk.x, dim=1)[:, None]
    ynorm = torch.linalg.vector_norm(chunk.y, dim=1)[None, :]
    cut = torch.where((reach <= 1e-6 * ynorm) & (penalised(chunk) > 0), 0.0, w)
    if within(chunk, *constraints(chunk, cut), settings):
        w = cut
    else:
        w = torch.where(w.abs() <= 1e-9 * max(float(w.abs().max()), 1e-300), 0.0, w)
    ball, excess = constraints(chunk, w)
    return Solution(chunk.layer, chunk.neurons, w, ball, excess, 1, 0.0, 0.0, ok, time.perf_counter() - t0,
                    None, message)


def l1(chunk: Chunk, w: torch.Tensor) -> float:
    """The objective ‖W‖₁ over the penalised rows."""
    return float((w.abs() * penalised(chunk)).sum())
