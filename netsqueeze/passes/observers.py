"""Streamed activation-range observers for static quantization, and the affine parameters of a range.

An observer sees one batch at a time (`update`), never the whole data set. `minmax` needs one pass over
the calibration data; `percentile`, `entropy` and `mse` need a second one over a histogram whose range
the first pass fixed (`needs_histogram`, then `update_histogram`). Every method returns a range
[lo, hi] with lo <= 0 <= hi, so that zero is exactly representable (zero padding, ReLU outputs).

- `minmax`: the observed extremes.
- `percentile`: the `percentile`-th percentile of |x| (symmetric) or the two tails of x (asymmetric).
- `entropy`: the clipping threshold T on |x| that minimises the Kullback-Leibler divergence between the
  clipped histogram and its quantized version (TensorRT's entropy calibrator; Migacz, "8-bit inference
  with TensorRT", GTC 2017), over `bins` histogram bins; exact zeros are left out of the histogram
  (every grid holds zero exactly, and the ReLU zeros' spike would drive the search to the narrowest
  threshold).
- `mse`: the clipping range that minimises the expected squared quantization error over the histogram.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

Method = Literal["minmax", "percentile", "entropy", "mse"]
QType = Literal["int8", "uint8"]

QRANGE: dict[str, tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255)}


class RangeObserver:
    """The range of one tensor over the calibration stream."""

    def __init__(self, method: Method = "minmax", *, symmetric: bool = False, percentile: float = 99.99,
                 bins: int = 2048, qtype: QType = "int8") -> None:
        self.method, self.symmetric, self.percentile, self.bins, self.qtype = method, symmetric, percentile, bins, qtype
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0
        self.hist: np.ndarray | None = None

    @property
    def needs_histogram(self) -> bool:
        return self.method != "minmax"

    def update(self, x: torch.Tensor) -> None:
        """First pass: running extremes."""
        if x.numel() == 0:
            return
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += x.numel()

    def _hist_range(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.symmetric or self.method == "entropy":
            return 0.0, max(-lo, hi)
        return lo, hi

    def update_histogram(self, x: torch.Tensor) -> None:
        """Second pass: the histogram over the range the first pass found (|x| for symmetric ranges and
        for `entropy`)."""
        if self.count == 0:
            raise ValueError("update_histogram before any update")
        a, b = self._hist_range()
        if b <= a:
            return
        x = x.detach().to(torch.float64).flatten()
        if self.symmetric or self.method == "entropy":
            x = x.abs()
        if self.method == "entropy":  # exact zeros (ReLU outputs) sit on every grid; as a spike in the
            x = x[x != 0]  # first bin they would push the KL search to the narrowest threshold
        h = torch.histc(x, bins=self.bins, min=a, max=b).numpy()
        self.hist = h if self.hist is None else self.hist + h

    def range(self) -> tuple[float, float]:
        """[lo, hi] with lo <= 0 <= hi."""
        if self.count == 0:
            raise ValueError("no calibration values were observed")
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.method == "minmax" or self.hist is None or hi <= lo:
            return self._sym(lo, hi)
        a, b = self._hist_range()
        edges = np.linspace(a, b, self.bins + 1)
        if self.method == "percentile":
            return self._sym(*self._percentile(lo, hi, edges))
        if self.method == "entropy":
            t = kl_threshold(self.hist, edges, levels=self._levels(lo))
            return self._sym(max(lo, -t), min(hi, t))
        return self._sym(*self._mse(lo, hi, edges))

    def _sym(self, lo: float, hi: float) -> tuple[float, float]:
        if self.symmetric:
            m = max(-lo, hi)
            return -m, m
        return lo, hi

    def _levels(self, lo: float) -> int:
        """Quantization levels the |x| histogram is mapped onto: half the grid when x has both signs."""
        qmin, qmax = QRANGE[self.qtype]
        n = qmax - qmin + 1
        return n // 2 if (self.symmetric or lo < 0) else n

    def _percentile(self, lo: float, hi: float, edges: np.ndarray) -> tuple[float, float]:
        assert self.hist is not None
        cdf = np.cumsum(self.hist) / max(1.0, float(self.hist.sum()))
        p = self.percentile / 100.0
        if self.symmetric:
            t = float(edges[1 + min(len(cdf) - 1, int(np.searchsorted(cdf, p)))])
            return -t, t
        up = float(edges[1 + min(len(cdf) - 1, int(np.searchsorted(cdf, p)))])
        down = float(edges[int(np.searchsorted(cdf, 1.0 - p))])
        return min(down, 0.0), max(up, 0.0)

    def _mse(self, lo: float, hi: float, edges: np.ndarray) -> tuple[float, float]:
        """Scales the range by α ∈ {1/100 … 1} and keeps the α of least expected squared error, the
        histogram's bin centres standing for their values."""
        assert self.hist is not None
        centres = (edges[:-1] + edges[1:]) / 2
        w = self.hist
        qmin, qmax = QRANGE[self.qtype]
        alphas = np.arange(1, 101) / 100.0
        best, best_err = (lo, hi), math.inf
        for a in alphas:
            if self.symmetric:
                m = a * max(-lo, hi)
                cand = (-m, m)
            else:
                cand = (a * lo, a * hi)
            scale, zp = qparams(*cand, self.qtype, symmetric=self.symmetric)
            q = np.clip(np.round(centres / scale) + zp, qmin, qmax)
            err = float(np.sum(w * ((q - zp) * scale - centres) ** 2))
            if best_err == math.inf or err < best_err * (1 - 1e-12):  # ties keep the narrower range
                best, best_err = cand, err
        return best


def kl_threshold(hist: np.ndarray, edges: np.ndarray, levels: int = 128) -> float:
    """The threshold T (an edge of `hist`, a histogram of |x| from 0) minimising KL(P‖Q): P is the
    histogram clipped at T (the outliers added to its last bin), Q is P merged into `levels` equal
    chunks and spread back uniformly over each chunk's non-empty bins."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels:
        return float(edges[-1])
    total_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    best_i, best_kl = n, math.inf
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += total_tail[i]
        if p.sum() <= 0:
            continue
        cand = hist[:i]
        idx = (np.arange(i) * levels) // i
        nz = cand > 0
        chunk_sum = np.bincount(idx, weights=cand, minlength=levels)
        chunk_nz = np.bincount(idx, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, chunk_sum[idx] / np.maximum(chunk_nz[idx], 1.0), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        m = ps > 0
        kl = float(np.sum(ps[m] * np.log(ps[m] / np.maximum(qs[m], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(edges[best_i])


def qparams(lo: float, hi: float, qtype: QType, *, symmetric: bool) -> tuple[float, int]:
    """(scale, zero point) of the affine grid that covers [lo, hi] (lo <= 0 <= hi).

    Symmetric grids map ±max|x| to ±127 (int8, zero point 0) or to 1 … 255 around 128 (uint8), as
    TensorRT's explicit quantization expects; asymmetric grids map lo to the lowest code and hi to the
    highest, the zero point rounded so that 0 is exact."""
    qmin, qmax = QRANGE[qtype]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        m = max(-lo, hi)
        scale = m / 127.0
        zp = 0 if qtype == "int8" else 128
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = 0
    scale = float(np.float32(scale))
    if not scale > 0 or not math.isfinite(scale):
        scale = 1.0
    if not symmetric:
        zp = int(min(qmax, max(qmin, round(qmin - lo / scale))))
    return scale, zp
