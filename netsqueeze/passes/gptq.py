"""Weight-only quantization arithmetic: min/max grids per scale group, round-to-nearest, and the GPTQ solver.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023) quantizes a weight's columns one at a time and moves each column's
rounding error onto the columns not yet quantized, weighted by the inverse of the layer's input Gram
H = 2·X·Xᵀ, so that the layer output error ‖W·X − Ŵ·X‖ stays small. Everything here works on a weight
seen as a matrix [out, columns]; the pass maps linear, matmul and conv weights to and from that view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# columns updated together before the error is pushed onto the rest (the paper's "lazy batch" of 128)
LAZY_BLOCK = 128


@dataclass(frozen=True)
class Grid:
    """An integer grid: `bits` wide, signed and symmetric (scale only; ±max|w| maps to ±hi = ±(2^(b-1) − 1),
    as `Affine.quantize` does; lo = −2^(b-1) is reachable only by weights GPTQ's updates pushed past the
    range), or unsigned with a zero point (q in [0, 2^b − 1], [min(w, 0), max(w, 0)] onto the full range)."""

    bits: int
    symmetric: bool = True

    @property
    def lo(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def hi(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per row of `w` [rows, k] (float64). The scale is rounded to float32 (what
        is stored), so rounding against it here is rounding against the stored grid."""
        mn = w.amin(1).clamp(max=0)
        mx = w.amax(1).clamp(min=0)
        if self.symmetric:
            s = torch.maximum(mx, -mn) / self.hi
        else:
            s = (mx - mn) / (self.hi - self.lo)
        s = torch.where(s > 0, s, torch.ones_like(s)).float().double()
        zp = torch.zeros_like(s) if self.symmetric else torch.round(self.lo - mn / s).clamp(self.lo, self.hi)
        return s, zp

    def quantize(self, w: torch.Tensor, s: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """The integers nearest to w / s + zp (ties to even), clamped to the grid; float64 holding integers."""
        return (torch.round(w / s) + zp).clamp(self.lo, self.hi)


@dataclass
class Quantized:
    """A weight matrix on its grid: `q` [out, columns] integers, `scale` / `zero_point` [out, groups]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def dequantized(self, groups: torch.Tensor) -> torch.Tensor:
        return (self.q - self.zero_point[:, groups]) * self.scale[:, groups]


def _check_groups(w: torch.Tensor, groups: torch.Tensor) -> int:
    if groups.dim() != 1 or groups.numel() != w.shape[1]:
        raise ValueError(f"one group id per column expected ({w.shape[1]}), got shape {list(groups.shape)}")
    n = int(groups.max()) + 1 if groups.numel() else 0
    if groups.numel() and (int(groups.min()) < 0 or torch.bincount(groups, minlength=n).eq(0).any()):
        raise ValueError("group ids must be 0..G-1, each used")
    return n


def rtn(w: torch.Tensor, groups: torch.Tensor, grid: Grid) -> Quantized:
    """Round-to-nearest: each group of columns (`groups[c]` is column c's group) gets a min/max scale per row
    and every weight is rounded to its nearest grid point."""
    w = w.double()
    n = _check_groups(w, groups)
    scale = torch.ones(w.shape[0], n, dtype=torch.float64)
    zp = torch.zeros(w.shape[0], n, dtype=torch.float64)
    for g in range(n):
        scale[:, g], zp[:, g] = grid.params(w[:, groups == g])
    q = grid.quantize(w, scale[:, groups], zp[:, groups])
    return Quantized(q, scale, zp)


def gptq(w: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor, grid: Grid, *, damp: float = 0.01,
         act_order: bool = False) -> Quantized:
    """GPTQ of `w` [out, columns] against the input Gram `gram` [columns, columns] (H = 2·X·Xᵀ up to a
    positive factor, which does not change the result).

    As the paper: H gets `damp` × mean(diag H) added to its diagonal; the upper Cholesky factor U of H⁻¹
    drives the updates; columns are processed in lazy blocks of 128 (the error of a block reaches the
    later columns in one matrix product). `act_order` processes columns by decreasing H_ii (the
    reference implementation's option). A group's scale and zero point are fixed from the current
    (already updated) weights when its first column is reached, as the reference does; with `act_order`
    a group's columns are spread, so its grid is fixed from all of its columns at that moment (every
    ONNX block keeps one scale, unlike the reference's per-column group index).

    Dead inputs (H_ii = 0: the column never sees a non-zero input on the calibration data) get H_ii = 1,
    which decouples them: they are rounded to nearest and receive no updates. (The reference sets such
    weights to zero; calibration data that misses an input is no evidence the input is always zero.)
    """
    w = w.double().clone()
    h = gram.double().clone()
    cols = w.shape[1]
    n = _check_groups(w, groups)
    if h.shape != (cols, cols):
        raise ValueError(f"Gram of shape {list(h.shape)} does not fit {cols} columns")
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    order = torch.argsort(-h.diagonal(), stable=True) if act_order else torch.arange(cols)
    w, h, gp = w[:, order], h[order][:, order], groups[order]
    live = ~dead[order]
    mean_diag = float(h.diagonal()[live].mean()) if bool(live.any()) else 1.0
    h += damp * mean_diag * torch.eye(cols, dtype=torch.float64)
    try:
        chol = torch.linalg.cholesky(h)
        u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError
        raise ValueError(f"the dampened Gram is not positive definite ({e}); raise damp") from None
    q = torch.zeros_like(w)
    scale = torch.ones(w.shape[0], n, dtype=torch.float64)
    zp = torch.zeros(w.shape[0], n, dtype=torch.float64)
    fixed = torch.zeros(n, dtype=torch.bool)
    for i1 in range(0, cols, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, cols)
        w1 = w[:, i1:i2]  # a view: updates inside the block land in w
        u1 = u[i1:i2, i1:i2]
        err = torch.zeros(w.shape[0], i2 - i1, dtype=torch.float64)
        for i in range(i2 - i1):
            g = int(gp[i1 + i])
            if not fixed[g]:
                scale[:, g], zp[:, g] = grid.params(w[:, gp == g])
                fixed[g] = True
            col = w1[:, i]
            qc = grid.quantize(col, scale[:, g], zp[:, g])
            q[:, i1 + i] = qc
            step = (col - (qc - zp[:, g]) * scale[:, g]) / u1[i, i]
            w1[:, i:] -= step.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = step
        w[:, i2:] -= err @ u[i1:i2, i2:]
    inverse = torch.argsort(order)
    return Quantized(q[:, inverse], scale, zp)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)·X‖² / ‖W·X‖² from the Gram alone (tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)); 0 for a zero output."""
    d = (w.double() - w_hat.double())
    num = float(torch.einsum("oi,ij,oj->", d, gram.double(), d))
    den = float(torch.einsum("oi,ij,oj->", w.double(), gram.double(), w.double()))
    return num / den if den > 0 else 0.0
