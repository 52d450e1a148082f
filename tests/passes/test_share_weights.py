"""`share_weights`: each quantizer against its definition, codebooks per layer and per type, pruned zeros
kept, determinism, the policy route and its option checks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch

import netsqueeze as ns
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.stats import graph_stats
from netsqueeze.ir.weights import Codebook
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.prune import Prune
from netsqueeze.passes.share_weights import (
    ShareWeights,
    _Sorted,
    cws,
    ecsq,
    ecsq_iterate,
    envelope_assign,
    kmeanspp,
    pws,
    uq,
)
from tests.passes.graphs import cnn, mlp
from tests.zoo import MLP


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread avoids thread wake-up costs that dominate on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(n: int = 5000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, generator=g, dtype=torch.float64) * 0.05,
                      torch.randn(n // 10, generator=g, dtype=torch.float64) * 0.3])


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_envelope_assignment_is_the_argmin() -> None:
    g = _gen(3)
    c = torch.sort(torch.randn(12, generator=g, dtype=torch.float64)).values
    bias = torch.rand(12, generator=g, dtype=torch.float64) * 0.5
    x = torch.randn(2000, generator=g, dtype=torch.float64) * 2
    brute = ((x[:, None] - c[None]) ** 2 + bias[None]).argmin(1)
    assert torch.equal(envelope_assign(x, c, bias), brute)
    assert torch.equal(envelope_assign(x, c), ((x[:, None] - c[None]) ** 2).argmin(1))


def test_cws_is_a_kmeans_fixed_point() -> None:
    x = _x()
    c, a = cws(x, 16, _gen())
    assert c.numel() == 16 and bool((c[1:] > c[:-1]).all())
    for j in range(16):  # every level is its cluster's mean ...
        assert float(c[j]) == pytest.approx(float(x[a == j].mean()), abs=1e-12)
    # ... and every point sits at its nearest level
    assert torch.equal(a, ((x[:, None] - c[None]) ** 2).argmin(1))
    again = cws(x, 16, _gen())
    assert torch.equal(again[0], c) and torch.equal(again[1], a)


def test_kmeanspp_draws_from_the_generator() -> None:
    x = _x()
    assert torch.equal(kmeanspp(x, 8, _gen(5)), kmeanspp(x, 8, _gen(5)))
    assert not torch.equal(kmeanspp(x, 8, _gen(5)), kmeanspp(x, 8, _gen(6)))


def test_pws_levels_are_quantiles_and_rounding_is_unbiased() -> None:
    x = _x(200)
    k = 8
    c, _ = pws(x, k, _gen())
    xs = torch.sort(x).values
    assert float(c[0]) == float(xs[0]) and float(c[-1]) == float(xs[-1])
    q3 = (k - 1) * 3 / (k - 1) / (k - 1)  # the 3/(k-1) quantile
    pos = q3 * (xs.numel() - 1)
    want = float(xs[math.floor(pos)] + (xs[math.ceil(pos)] - xs[math.floor(pos)]) * (pos - math.floor(pos)))
    assert float(c[3]) == pytest.approx(want, abs=1e-15)
    reps = 200
    mean = torch.zeros_like(x)
    for s in range(reps):
        cs, a = pws(x, k, _gen(100 + s))
        q = cs[a]
        mean += q / reps
        lo = torch.searchsorted(c, x, right=True).clamp(1, c.numel() - 1) - 1
        assert bool(((q == c[lo]) | (q == c[lo + 1])).all())  # rounds to a neighbouring level only
    j = (torch.searchsorted(c, x, right=True) - 1).clamp(0, k - 2)
    var = (c[j + 1] - x) * (x - c[j])  # Bernoulli variance of the stochastic rounding
    sd = (var / reps).sqrt()
    assert bool(((mean - x).abs() <= 5 * sd + 1e-12).all())
    # the whole layer's sum is kept within sampling error
    assert abs(float(mean.sum() - x.sum())) <= 5 * float((var.sum() / reps).sqrt())


def test_uq_is_the_uniform_grid() -> None:
    x = _x()
    c, a = uq(x, 9)
    grid = torch.linspace(float(x.min()), float(x.max()), 9, dtype=torch.float64)
    assert all(bool((grid == v).any()) for v in c)
    step = float(grid[1] - grid[0])
    assert float((c[a] - x).abs().max()) <= step / 2 + 1e-15


@pytest.mark.parametrize("n", [120, 150, 200, 201])
def test_ecsq_keeps_at_most_k_levels_when_a_weight_has_at_most_2k_entries(n: int) -> None:
    # 2k initial levels of one entry each are equally likely: no λ merged them (120 levels for k = 100)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    levels, assign, _ = ecsq(x, 100, _gen())
    assert 90 <= levels.numel() <= 100 and int(assign.max()) < levels.numel()


def test_ecsq_cost_decreases_and_lambda_reaches_k() -> None:
    x = _x()
    pts = _Sorted(x)
    init = kmeanspp(x, 24, _gen())
    _c, p, history = ecsq_iterate(pts, init, 0.05 * float(x.var()))
    assert len(history) > 2
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(history))
    assert float(p.sum()) == pytest.approx(1.0)
    levels, assign, lam = ecsq(x, 6, _gen())
    assert levels.numel() <= 6 and lam > 0
    # with λ = 0 ECSQ is k-means: the result is a k-means fixed point
    c0, _, _ = ecsq_iterate(pts, init, 0.0)
    a0 = envelope_assign(x, c0)
    for j in range(c0.numel()):
        assert float(c0[j]) == pytest.approx(float(x[a0 == j].mean()), abs=1e-12)
    # more λ, fewer bits: the entropy of the k=6 assignment is below that of k-means with 6 levels
    def entropy(a: torch.Tensor) -> float:
        p = torch.bincount(a).double() / a.numel()
        p = p[p > 0]
        return float(-(p * p.log2()).sum())
    assert entropy(assign) < entropy(cws(x, 6, _gen())[1])


@pytest.mark.parametrize("method", ["cws", "pws", "uq", "ecsq"])
def test_every_method_shares_at_most_k_values_per_layer(method: str) -> None:
    g = mlp()
    before = {n.id: n.dense("weight").clone() for n in g.nodes() if n.kind == "linear"}
    ShareWeights(method=method, k=4).run(g, PassContext())  # type: ignore[arg-type]
    g.verify()
    for nid, w in before.items():
        cb = g.node(nid).params["weight"]
        assert isinstance(cb, Codebook) and cb.k <= 4 and cb.centroids.name == nid
        d = cb.dense()
        assert d.shape == w.shape
        rel = float((d - w).norm() / w.norm())
        # measured on these layers at k = 4: cws 0.34-0.40, ecsq 0.36-0.52, uq 0.37-0.63, pws 0.50-0.82
        # (stochastic rounding trades error for unbiasedness)
        assert rel < {"cws": 0.45, "ecsq": 0.6, "uq": 0.7, "pws": 0.9}[method], (method, rel)


def test_pruned_zeros_stay_zero_and_are_not_clustered() -> None:
    g = mlp()
    Prune(sparsity=0.7).run(g, PassContext())
    masks = {n.id: n.params["weight"].dense() == 0 for n in g.nodes() if n.kind == "linear"}
    ShareWeights(method="cws", k=3).run(g, PassContext())
    for nid, zero in masks.items():
        cb = g.node(nid).params["weight"]
        assert isinstance(cb, Codebook)
        assert cb.k == 4 and float(cb.centroids.values[0]) == 0.0  # zero + 3 shared non-zeros
        assert torch.equal(cb.indices == 0, zero)
        assert bool((cb.centroids.values[1:] != 0).all())


def test_scope_type_shares_one_table_per_layer_type() -> None:
    g = cnn()
    before = graph_stats(g).param_bytes
    ShareWeights(method="uq", k=16, scope="type").run(g, PassContext())
    convs = [n.params["weight"] for n in g.nodes() if n.kind == "conv"]
    lins = [n.params["weight"] for n in g.nodes() if n.kind == "linear"]
    assert all(isinstance(w, Codebook) for w in convs + lins)
    assert len({id(w.centroids) for w in convs}) == 1 and convs[0].centroids.name == "conv"
    assert lins[0].centroids.name == "linear" and lins[0].centroids is not convs[0].centroids
    stats = graph_stats(g)
    assert stats.shared_bytes == 16 * 4 * (len(convs) - 1)  # the conv table counted once
    assert stats.param_bytes < before


def test_same_seed_same_bytes_other_seed_other_rounding() -> None:
    def shared(seed: int) -> list[torch.Tensor]:
        g = mlp()
        ShareWeights(method="pws", k=8).run(g, PassContext(seed=seed))
        return [n.params["weight"].indices for n in g.nodes() if n.kind == "linear"]

    a, b, c = shared(0), shared(0), shared(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_policy_route_and_option_checks() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 20)
    res = ns.compile(model, "policy p { prune on type(linear) { sparsity = 60% }\n"
                            "share_weights on type(linear) { method = cws, k = 64 } }", example_inputs=(x,))
    shared = {n.id: n.params["weight"] for n in res.graph.nodes() if n.kind == "linear"}
    assert all(isinstance(w, Codebook) and w.k <= 65 for w in shared.values())
    ref = MLP().eval()  # the original with its weights replaced by the decoded codebooks
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for nid, w in shared.items():
            ref.get_submodule(nid).weight.copy_(w.dense())
        assert torch.allclose(res.model(x), ref(x), atol=1e-6)
    with pytest.raises(NetsqueezeError, match="option 'method' of pass 'share_weights' must be one of 'cws', "
                                               "'pws', 'uq', 'ecsq', got the name 'kmeans'"):
        ns.compile(model, "policy p { share_weights { method = kmeans } }", example_inputs=(x,))
    with pytest.raises(NetsqueezeError, match="option 'k' of pass 'share_weights' must be between 1 and 65536, got '0'"):
        ShareWeights(k=0)
