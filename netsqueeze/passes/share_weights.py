"""`share_weights`: replaces each selected weight by k shared values (CWS, PWS, UQ, ECSQ), one codebook per
layer or one per layer type; zeros of pruned weights stay zero. Also the 1-D quantizers themselves."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph, Node
from netsqueeze.ir.weights import Centroids, Codebook
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.prune import weighted_nodes
from netsqueeze.passes.registry import register_pass

Method = Literal["cws", "pws", "uq", "ecsq"]
MAX_ITER = 300  # Lloyd / ECSQ iterations at most (1-D runs converge in far fewer)
SEED_SKETCH = 1 << 14  # points k-means++ seeds from


# ---- 1-D quantizers (float64 in, sorted levels and an assignment out) -----------------------------------
# Every quantizer here assigns each x to the level minimising (x − c_l)² + bias_l, so each level owns an
# interval of x: iterations run on the sorted values with prefix sums (O(k log n) per iteration), and
# the final assignment is one binary search per weight.
def _hull(c: list[float], bias: list[float]) -> tuple[list[int], list[float]]:
    """The levels on the lower envelope of (x − c_l)² + bias_l (sorted distinct c) and the breakpoints
    between consecutive ones: the convex hull trick on the lines −2c_l·x + c_l² + bias_l."""
    a = [-2.0 * v for v in c]
    b = [v * v + w for v, w in zip(c, bias)]

    def cross(i: int, j: int) -> float:
        return (b[j] - b[i]) / (a[i] - a[j])

    hull: list[int] = []
    for j in range(len(c)):
        while len(hull) >= 2 and cross(hull[-2], j) <= cross(hull[-2], hull[-1]):
            hull.pop()
        hull.append(j)
    return hull, [cross(i, j) for i, j in itertools.pairwise(hull)]


def envelope_assign(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_l (x − c_l)² + bias_l for every x (sorted distinct levels `c`), in O(n log k); a point on a
    breakpoint goes to the upper level."""
    hull, brk = _hull(c.tolist(), [0.0] * c.numel() if bias is None else bias.tolist())
    idx = torch.tensor(hull, dtype=torch.int64)
    return idx[torch.searchsorted(torch.tensor(brk, dtype=torch.float64), x, right=True)]


class _Sorted:
    """Sorted points with prefix sums: cluster counts, sums and squared errors of interval clusters."""

    def __init__(self, x: torch.Tensor) -> None:
        self.xs = torch.sort(x).values
        zero = torch.zeros(1, dtype=torch.float64)
        self.s1 = torch.cat([zero, torch.cumsum(self.xs, 0)])
        self.s2 = torch.cat([zero, torch.cumsum(self.xs * self.xs, 0)])
        self.n = self.xs.numel()

    def bounds(self, c: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Start of each level's interval in `xs` (k + 1 entries, empty intervals allowed)."""
        hull, brk = _hull(c.tolist(), [0.0] * c.numel() if bias is None else bias.tolist())
        starts = torch.searchsorted(self.xs, torch.tensor(brk, dtype=torch.float64), right=False)
        first = torch.full((c.numel() + 1,), self.n, dtype=torch.int64)
        owner = torch.tensor(hull, dtype=torch.int64)
        first[owner] = torch.cat([torch.zeros(1, dtype=torch.int64), starts])
        # a level off the hull owns nothing: its interval starts where the next one does
        return torch.flip(torch.cummin(torch.flip(first, (0,)), 0).values, (0,))

    def stats(self, first: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per level: count and mean of its interval (the old level where empty), and Σ (x − c)²."""
        cnt = (first[1:] - first[:-1]).to(torch.float64)
        s1 = self.s1[first[1:]] - self.s1[first[:-1]]
        s2 = self.s2[first[1:]] - self.s2[first[:-1]]
        sse = float((s2 - 2 * c * s1 + cnt * c * c).sum())
        return cnt, torch.where(cnt > 0, s1 / cnt.clamp_min(1), c), max(sse, 0.0)


def kmeanspp_rows(v: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """k-means++ seeding (Arthur & Vassilvitskii, SODA 2007) of the rows of `v` [n, d] (float64): the
    indices of at most k seed rows, drawn from `gen` (fewer when the rows run out of distinct points)."""
    n = v.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = ((v - v[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            break
        u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
        j = int(torch.searchsorted(torch.cumsum(d2, 0), torch.tensor([u], dtype=torch.float64)).clamp(max=n - 1))
        chosen.append(j)
        d2 = torch.minimum(d2, ((v - v[j]) ** 2).sum(1))
    return chosen


def kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeds of 1-D points, sorted; draws from `gen`. More than `SEED_SKETCH` points are seeded
    from that many of their quantiles (same distribution, bounded cost)."""
    if x.numel() > SEED_SKETCH:
        x = sorted_quantiles(torch.sort(x).values, torch.linspace(0, 1, SEED_SKETCH, dtype=torch.float64))
    return torch.tensor(sorted({float(x[j]) for j in kmeanspp_rows(x[:, None], k, gen)}), dtype=torch.float64)


def _few_values(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """When x holds at most k distinct values, they are the exact levels."""
    u = torch.unique(x)
    if u.numel() > k:
        return None
    return u, torch.searchsorted(u, x)


def cws(x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered weight sharing: 1-D k-means (Lloyd) from a k-means++ seeding, run to a fixed point
    (no interval changes) or `MAX_ITER` iterations; empty clusters are dropped. Returns sorted levels and
    the assignment."""
    few = _few_values(x, k)
    if few is not None:
        return few
    pts = _Sorted(x)
    c = kmeanspp(x, k, gen)
    first = pts.bounds(c)
    for _ in range(MAX_ITER):
        cnt, c, _ = pts.stats(first, c)
        c = c[cnt > 0]
        new = pts.bounds(c)
        if new.numel() == first.numel() and bool((new == first).all()):
            break
        first = new
    return c, envelope_assign(x, c)


def sorted_quantiles(xs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles (linear interpolation, as numpy's default) of sorted `xs`, any size."""
    pos = q * (xs.numel() - 1)
    lo = pos.floor().to(torch.int64)
    hi = pos.ceil().to(torch.int64)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pws(x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilistic weight sharing (probabilistic quantization): levels at the j/(k−1) quantiles of x
    (the extremes included, so every x lies in a level interval), and stochastic rounding: x in
    [c_j, c_{j+1}] becomes c_{j+1} with probability (x − c_j)/(c_{j+1} − c_j), else c_j, so E[q(x)] = x.
    Draws from `gen`."""
    few = _few_values(x, k)
    if few is not None:
        return few
    xs = torch.sort(x).values
    c = torch.unique(sorted_quantiles(xs, torch.linspace(0, 1, k, dtype=torch.float64)))
    if c.numel() == 1:
        return c, torch.zeros(x.numel(), dtype=torch.int64)
    j = (torch.searchsorted(c, x, right=True) - 1).clamp(0, c.numel() - 2)
    lo, hi = c[j], c[j + 1]
    p = ((x - lo) / (hi - lo)).clamp(0, 1)
    up = torch.rand(x.numel(), generator=gen, dtype=torch.float64) < p
    a = j + up.to(torch.int64)
    used = torch.unique(a)  # a level no weight rounded to is not stored
    return c[used], torch.searchsorted(used, a)


def uq(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform quantization: k evenly spaced levels from min to max, each x to the nearest; levels no
    weight uses are dropped."""
    few = _few_values(x, k)
    if few is not None:
        return few
    c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    a = envelope_assign(x, c)
    used = torch.unique(a)
    return c[used], torch.searchsorted(used, a)


def ecsq_iterate(pts: _Sorted, c: torch.Tensor, lam: float, max_iter: int = MAX_ITER,
                 tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Entropy-constrained scalar quantization at a fixed λ (Chou, Lookabaugh & Gray, IEEE Trans. ASSP
    1989): assign x to argmin_l (x − c_l)² − λ·log2 p_l, set c_l to its cluster's mean and p_l to its
    share, drop empty clusters; repeat until the intervals are stable (or J gains less than `tol`,
    relative, in an iteration). Returns sorted levels, their
    probabilities, and the cost J = mean (x − c)² + λ·H after every iteration (non-increasing: each step
    minimises J over one of assignment, levels, probabilities)."""
    p = torch.full_like(c, 1.0 / c.numel())
    first = pts.bounds(c, -lam * torch.log2(p))
    history: list[float] = []
    for _ in range(max_iter):
        cnt, c, _ = pts.stats(first, c)
        live = cnt > 0
        c, p = c[live], cnt[live] / pts.n
        first = torch.cat([first[:-1][live], first[-1:]])
        _, _, sse = pts.stats(first, c)
        history.append(sse / pts.n + lam * float(-(p * torch.log2(p)).sum()))
        new = pts.bounds(c, -lam * torch.log2(p))
        if bool((new == first).all()) or (len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]):
            break
        first = new
    return c, p, history


def ecsq(x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ECSQ with λ tuned to reach k levels: from 2k k-means++ levels, the smallest λ (bisection, 24
    steps, each run to a relative gain below 1e-6 or 80 iterations) that leaves at most k live levels,
    then run to a fixed point at that λ. Returns levels, the assignment (the ECSQ rule with the
    final probabilities) and λ in units of x's variance."""
    few = _few_values(x, k)
    if few is not None:
        return few[0], few[1], 0.0
    pts = _Sorted(x)
    var = float(x.var()) or 1.0
    # with at most 2k entries, 2k levels hold one entry each and no λ merges them: start from k levels
    init = kmeanspp(x, 2 * k if x.numel() > 2 * k else k, gen)

    def levels(lam: float) -> int:
        return ecsq_iterate(pts, init, lam * var, 80, 1e-6)[0].numel()

    lo, hi = 0.0, 1.0
    while levels(hi) > k and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(24):
        mid = (lo + hi) / 2
        if levels(mid) > k:
            lo = mid
        else:
            hi = mid
    c, p, _ = ecsq_iterate(pts, init, hi * var)
    return c, envelope_assign(x, c, -hi * var * torch.log2(p)), hi


def quantize(x: torch.Tensor, k: int, method: Method, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted levels (at most k) and the level index of every entry of 1-D float64 `x`."""
    if method == "cws":
        return cws(x, k, gen)
    if method == "pws":
        return pws(x, k, gen)
    if method == "uq":
        return uq(x, k)
    c, a, _ = ecsq(x, k, gen)
    return c, a


# ---- the pass ------------------------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class ShareWeights(TransformPass):
    """Weight sharing: every selected conv/linear `weight` becomes a `Codebook` of at most `k` shared
    non-zero values (Marinò et al., "Compression strategies and space-conscious representations for deep
    neural networks", ICPR 2020, and its Neurocomputing 2023 follow-up).

    Methods: `cws` — 1-D k-means, k-means++ seeding from the seed, Lloyd to a fixed point (Han et al.'s
    clustered weight sharing); `pws` — probabilistic quantization: levels at quantiles, stochastic
    rounding that keeps E[w]; `uq` — k evenly spaced levels on [min, max], nearest; `ecsq` —
    entropy-constrained scalar quantization (squared error + λ·code length, Chou, Lookabaugh & Gray
    1989), λ tuned by bisection to the smallest value leaving at most k levels.

    `scope = layer`: one codebook per weight; `scope = type`: one codebook shared by every selected
    linear weight and one by every selected conv weight (the paper's two variants), counted once.

    Needs: weights dense or sparse (pruned); a quantized or already shared weight is a located
    `WeightFormError`. Entries that are exactly zero (pruned) stay zero and are not clustered: the table
    then holds 0 at index 0 besides the k levels. Random draws (k-means++, PWS rounding) come from a
    generator seeded by the compile seed and the table's position.
    """

    name: ClassVar[str] = "share_weights"
    method: Method = "cws"
    k: int = field(default=32, metadata={"min": 1, "max": 65536, "doc": "shared non-zero values per codebook"})
    scope: Literal["layer", "type"] = "layer"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = weighted_nodes(graph, ctx, self.name)
        if not nodes:
            return PassResult(changed=False, notes=["no conv or linear weight to share"])
        tables: dict[str, list[Node]] = {}
        for n in nodes:
            key = n.id if self.scope == "layer" else ("linear" if n.kind == "linear" else "conv")
            tables.setdefault(key, []).append(n)
        result = PassResult(changed=True)
        sq_err = sq_ref = 0.0
        for i, (key, members) in enumerate(tables.items()):
            ws = [n.dense("weight", accept=frozenset({"sparse"})) for n in members]
            flat = [w.detach().reshape(-1).to(torch.float64) for w in ws]
            nz = [f != 0 for f in flat]
            values = torch.cat([f[m] for f, m in zip(flat, nz)])
            if values.numel() == 0:
                raise NetsqueezeError(Diagnostic(f"share_weights: weight of '{members[0].id}' is all zeros",
                                                 node=members[0].id))
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)
            levels, assign = quantize(values, self.k, self.method, gen)
            has_zero = any(bool((~m).any()) for m in nz)
            table = torch.cat([torch.zeros(1, dtype=torch.float64), levels]) if has_zero else levels
            cents = Centroids(table.to(ws[0].dtype), key)
            offset = 0
            for n, w, f, m in zip(members, ws, flat, nz):
                idx = torch.zeros(f.numel(), dtype=torch.int64)
                cnt = int(m.sum())
                idx[m] = assign[offset:offset + cnt] + (1 if has_zero else 0)
                offset += cnt
                n.params["weight"] = Codebook(idx.reshape(w.shape), cents)
                q = cents.values.to(torch.float64)[idx]
                sq_err += float(((q - f) ** 2).sum())
                sq_ref += float((f**2).sum())
                result.touched.add(n.id)
            result.notes.append(f"{key}: {levels.numel()} shared values" + (" + zero" if has_zero else "")
                                + f" over {len(members)} weight(s)")
        result.metrics.update({"codebooks": float(len(tables)),
                               "weight_rel_error": math.sqrt(sq_err / sq_ref) if sq_ref else 0.0})
        return result
