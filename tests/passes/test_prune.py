"""`prune`: per-layer and global magnitude pruning, sparsity and bytes-budget targets, forms and errors."""

from __future__ import annotations

import pytest
import torch

import netsqueeze as ns
from netsqueeze.errors import BudgetError, NetsqueezeError
from netsqueeze.ir.stats import graph_stats
from netsqueeze.ir.weights import Affine, Sparse, WeightFormError
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.prune import Prune
from tests.passes.graphs import cnn, mlp
from tests.zoo import MLP


def _weights(g: ns.Graph) -> dict[str, torch.Tensor]:
    return {n.id: n.dense("weight", accept=frozenset({"sparse"})).clone() for n in g.nodes()
            if n.kind in ("conv", "linear")}


def test_per_layer_prunes_the_smallest_magnitudes_to_the_exact_count() -> None:
    g = cnn()
    before = _weights(g)
    res = Prune(sparsity=0.75).run(g, PassContext())
    g.verify()
    for nid, w in before.items():
        sp = g.node(nid).params["weight"]
        assert isinstance(sp, Sparse) and sp.layout == "csr"
        d = sp.dense()
        kept = d != 0
        assert int((~kept).sum()) == round(0.75 * w.numel())
        assert torch.equal(d[kept], w[kept])  # kept weights unchanged
        assert float(w[kept].abs().min()) >= float(w[~kept].abs().max())
    assert res.metrics["sparsity"] == pytest.approx(sum(round(0.75 * w.numel()) for w in before.values())
                                                    / sum(w.numel() for w in before.values()))


def test_global_uses_one_threshold_across_layers() -> None:
    g = mlp()
    before = _weights(g)
    Prune(sparsity=0.6, scope="global").run(g, PassContext())
    kept_min, cut_max, zeros = float("inf"), 0.0, 0
    for nid, w in before.items():
        d = g.node(nid).params["weight"].dense()
        kept = d != 0
        zeros += int((~kept).sum())
        kept_min = min(kept_min, float(w[kept].abs().min()))
        cut_max = max(cut_max, float(w[~kept].abs().max()))
    total = sum(w.numel() for w in before.values())
    assert zeros == round(0.6 * total)
    assert cut_max <= kept_min
    # layers differ: one threshold does not give every layer the same sparsity
    per = [1 - g.node(nid).params["weight"].nnz() / w.numel() for nid, w in before.items()]
    assert max(per) - min(per) > 0.01


def test_selection_limits_the_pass() -> None:
    g = mlp()
    Prune(sparsity=0.5).run(g, PassContext(selected=frozenset({"fc2"})))
    assert isinstance(g.node("fc2").params["weight"], Sparse)
    assert isinstance(g.node("fc1").params["weight"], torch.Tensor)


def test_bytes_budget_is_met_by_the_least_pruning() -> None:
    g = mlp()
    base = graph_stats(g).param_bytes
    ctx = PassContext(budget={"bytes": 0.5}, original=g.copy())
    Prune().run(g, ctx)
    reached = graph_stats(g).param_bytes / base
    assert reached <= 0.5
    assert reached > 0.5 - 0.01  # within one bisection step of the limit, not far below it


def test_pruning_a_sparse_weight_again_keeps_its_zeros() -> None:
    g = mlp()
    Prune(sparsity=0.5).run(g, PassContext())
    first = g.node("fc1").params["weight"].dense()
    Prune(sparsity=0.8).run(g, PassContext())
    second = g.node("fc1").params["weight"].dense()
    assert bool(((first == 0) <= (second == 0)).all())
    assert int((second == 0).sum()) == round(0.8 * second.numel())


def test_errors_name_the_option_or_the_node() -> None:
    g = mlp()
    with pytest.raises(NetsqueezeError, match=r"prune: needs a `sparsity` or a `budget bytes` in the policy$"):
        Prune().run(g, PassContext())
    with pytest.raises(BudgetError, match="unstructured pruning changes neither FLOPs nor the parameter count"):
        Prune().run(g, PassContext(budget={"flops": 0.5}))
    with pytest.raises(NetsqueezeError, match="the selected nodes have no conv or linear weight"):
        Prune(sparsity=0.5).run(g, PassContext(selected=frozenset({"relu1"})))
    with pytest.raises(NetsqueezeError, match=r"option 'sparsity' of pass 'prune' must be between 0 and 1 \(0% to 100%\), got '1.5'"):
        Prune(sparsity=1.5)
    g.node("fc2").params["weight"] = Affine.quantize(g.node("fc2").dense("weight"))
    with pytest.raises(WeightFormError, match="param 'weight' of node 'fc2' is stored as int8 per-tensor"):
        Prune(sparsity=0.5).run(g, PassContext())


def test_policy_compiles_and_the_model_computes_with_the_pruned_weights() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 20)
    res = ns.compile(model, "policy p { prune on type(linear) { sparsity = 50%, scope = global } }",
                     example_inputs=(x,))
    w = {n.id: n.params["weight"] for n in res.graph.nodes() if n.kind == "linear"}
    assert all(isinstance(v, Sparse) for v in w.values())
    ref = model(x)
    # the emitted model equals the original with the pruned entries zeroed
    masked = MLP().eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for nid, v in w.items():
            masked.get_submodule(nid).weight.copy_(v.dense())
        assert torch.allclose(res.model(x), masked(x), atol=1e-6)
        assert not torch.allclose(res.model(x), ref, atol=1e-3)
