"""Geometric Online Adaptation (GOA): online streaming feature selection by a class-conditional geometric
dependency, with samples and features both streamed (Yasaei Sekeh, Ganesh, Banerjee, Corso, Hero,
"A Geometric Approach to Online Streaming Feature Selection", arXiv 1910.01182).

Samples arrive in batches and go to a class-stratified reservoir (bounded memory, independent of the number
of samples); features then stream one at a time through GOA's admit / discard rule over that reservoir.
Used by the `select_features` pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from netsqueeze.passes.collectors import Reservoir
from netsqueeze.passes.friedman_rafsky import cross_edges

# a candidate whose residual, after least squares on the kept features (with intercept), keeps less than this
# fraction of its variance is a linear function of them: it adds no geometry the kept set lacks
LINEAR_TOL = 1e-6


@dataclass
class GoaResult:
    """The kept features (ascending), the dependency each candidate added when it arrived (NaN where the
    linear-redundancy test rejected it before any estimate), and the online history."""

    kept: list[int]
    gains: list[float]
    admitted: int = 0
    discarded_online: int = 0  # kept features later made redundant by a newcomer (or pushed out by the cap)
    evaluations: int = 0  # class-conditional dependency estimates (MSTs per class pair) computed
    dependency: float = 0.0  # CGD of the kept set
    history: list[tuple[int, str]] = field(default_factory=list)  # (feature, "admit" | "reject" | "discard")
    # the rejected features in the order to add them back when more must be kept (bounds, guard; `select_features`
    # replaces it by its classifier's reconstruction order where it can): largest gain
    # first, each skipped while it is a linear function of the kept and earlier added ones
    fill: list[int] = field(default_factory=list)


class ClassReservoirs:
    """Per class, a uniform sample of at most `per_class` rows (algorithm R, seeded) and the class's count.

    Memory is `classes × per_class × features` numbers whatever the number of samples streamed."""

    def __init__(self, per_class: int, seed: int) -> None:
        self.per_class = per_class
        self.seed = seed
        self.res: dict[int, Reservoir] = {}
        self.counts: dict[int, int] = {}

    def update(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.reshape(-1).to(torch.int64)
        for c in torch.unique(labels).tolist():
            sel = rows[labels == c]
            r = self.res.setdefault(int(c), Reservoir(self.per_class, self.seed * 1_000_003 + int(c)))
            r.update(sel)
            self.counts[int(c)] = self.counts.get(int(c), 0) + sel.shape[0]

    @property
    def rows_held(self) -> int:
        return sum(0 if r.rows is None else r.rows.shape[0] for r in self.res.values())

    @property
    def seen(self) -> int:
        return sum(self.counts.values())

    def classes(self) -> list[tuple[int, np.ndarray, float]]:
        """(class, its reservoir rows, its prior) for every class with at least 2 rows held, ascending class."""
        total = max(1, self.seen)
        out = []
        for c in sorted(self.res):
            r = self.res[c]
            if r.rows is not None and r.rows.shape[0] >= 2:
                out.append((c, r.rows.numpy(), self.counts[c] / total))
        return out


class CGD:
    """Class-conditional geometric dependency of a feature subset S with the label: the prior-weighted mean,
    over class pairs (i, j), of the Henze–Penrose divergence between the class-conditional distributions of
    X_S, estimated by the Friedman–Rafsky statistic: D_ij = 1 − R_ij (m_i + m_j) / (2 m_i m_j), R_ij the MST
    edges joining the two classes' samples (Berisha & Hero, IEEE TSP 2015). Near 0 when X_S does not tell the
    classes apart, 1 when it separates them. Columns are standardised over the whole reservoir."""

    def __init__(self, reservoirs: ClassReservoirs) -> None:
        cls = reservoirs.classes()
        if len(cls) < 2:
            raise ValueError("needs labelled samples of at least two classes")
        allrows = np.vstack([r for _, r, _ in cls])
        mu, sd = allrows.mean(0), allrows.std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        self.x = [(r - mu) / sd for _, r, _ in cls]
        self.pairs = [(i, j, cls[i][2] * cls[j][2]) for i in range(len(cls)) for j in range(i + 1, len(cls))]
        self.wsum = sum(w for _, _, w in self.pairs) or 1.0
        self.all = np.vstack(self.x)
        self.evaluations = 0

    def __call__(self, s: list[int]) -> float:
        if not s:
            return 0.0
        self.evaluations += 1
        total = 0.0
        for i, j, w in self.pairs:
            a, b = self.x[i][:, s], self.x[j][:, s]
            mi, mj = a.shape[0], b.shape[0]
            r = cross_edges(a, b)
            total += w * (1.0 - r * (mi + mj) / (2.0 * mi * mj))
        return total / self.wsum

    def residual_fraction(self, f: int, s: list[int]) -> float:
        """Fraction of feature f's variance left after least squares on the features s (with intercept)."""
        y = self.all[:, f]
        var = float(np.var(y))
        if var <= 1e-24:
            return 0.0  # constant: an intercept explains it
        if not s:
            return 1.0
        a = np.hstack([self.all[:, s], np.ones((self.all.shape[0], 1))])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        return float(np.var(y - a @ coef)) / var


def goa_select(reservoirs: ClassReservoirs, n_features: int, threshold: float, max_features: int,
               order: list[int] | None = None) -> GoaResult:
    """Streams the features (channel order unless `order`) through GOA's rule over the reservoir.

    A newcomer f is admitted when it is not a linear function of the kept set S and raises the dependency:
    CGD(S ∪ {f}) − CGD(S) > `threshold`. After an admission, kept features made redundant are discarded:
    the one whose removal costs least goes while removing it does not lower the dependency, or while more
    than `max_features` are kept (the cap then drops the least useful, possibly f itself).
    """
    est = CGD(reservoirs)
    res = GoaResult(kept=[], gains=[float("nan")] * n_features)
    s: list[int] = []
    dep = 0.0
    for f in (order if order is not None else range(n_features)):
        if est.residual_fraction(f, s) < LINEAR_TOL:
            res.history.append((f, "reject"))
            continue
        new = est([*s, f])
        res.gains[f] = new - dep
        if new - dep <= threshold:
            res.history.append((f, "reject"))
            continue
        s.append(f)
        dep = new
        res.admitted += 1
        res.history.append((f, "admit"))
        while len(s) > 1:
            without = [est([k for k in s if k != j]) for j in s]
            best = int(np.argmax(without))  # the removal that costs least; ties: the earliest kept
            if without[best] >= dep or len(s) > max_features:
                res.history.append((s[best], "discard"))
                res.discarded_online += 1
                dep = without[best]
                del s[best]
            else:
                break
    res.kept = sorted(s)
    res.fill = _fill_order(est, res.kept, res.gains)
    res.dependency = dep
    res.evaluations = est.evaluations
    return res


def _fill_order(est: CGD, kept: list[int], gains: list[float]) -> list[int]:
    rest = [c for c in range(len(gains)) if c not in set(kept)]
    rest.sort(key=lambda c: (np.isnan(gains[c]), 0.0 if np.isnan(gains[c]) else -gains[c], c))
    order: list[int] = []
    basis = list(kept)
    later: list[int] = []
    for c in rest:
        if len(basis) < est.all.shape[0] - 1 and est.residual_fraction(c, basis) >= LINEAR_TOL:
            order.append(c)
            basis.append(c)
        else:
            later.append(c)
    return order + later
