"""`recover`: compression decisions stay fixed (sparse patterns, codebook indices and shared tables, quantization
grids, shapes), fidelity and top-1 improve, same bytes twice, options from the DSL, labels, the guard, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import netsqueeze as ns
from netsqueeze.backends.torch import to_torch
from netsqueeze.backends.trainable import GraphFunction, trainable
from netsqueeze.compiler.plan import resolve
from netsqueeze.dsl import parse_policy
from netsqueeze.errors import InputMismatchError, NetsqueezeError, PassError, PolicyError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.weights import Affine, Centroids, Codebook, Sparse, dense
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.recover import Recover, _Codebook, _Table
from netsqueeze.passes.registry import all_passes
from tests.dsl.tiny import tiny_cnn
from tests.passes.graphs import input_batches, mlp, run, stream_ctx


def _error(student: Graph, teacher: Graph, batches: list[list[torch.Tensor]]) -> float:
    """Relative L2 output error of `student` against `teacher` on `batches` (reference interpreter)."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            y, s = run(teacher, b)[0], run(student, b)[0]
            num += float(((s - y) ** 2).sum())
            den += float((y**2).sum())
    return (num / den) ** 0.5


def _recover(student: Graph, teacher: Graph, batches: list[list[torch.Tensor]], **options: object) -> dict[str, float]:
    ctx = stream_ctx(batches, trainable_fn=trainable, original=teacher)
    res = Recover(progress=False, **options).run(student, ctx)  # type: ignore[arg-type]
    student.verify()
    return res.metrics


def _pruned(w: torch.Tensor, keep: float) -> torch.Tensor:
    """`w` with its smallest |w| zeroed, `keep` of the entries left."""
    k = int(w.numel() * (1 - keep))
    out = w.clone().reshape(-1)
    out[w.abs().reshape(-1).argsort()[:k]] = 0
    return out.reshape(w.shape)


# ---- every compression decision stays ---------------------------------------------------------------------
def test_sparse_pattern_and_dense_zeros_stay() -> None:
    teacher = mlp()
    student = teacher.copy()
    for nid in ("fc1", "fc2"):
        student.node(nid).params["weight"] = Sparse.from_dense(_pruned(teacher.node(nid).dense("weight"), 0.4), "csr")
    student.node("fc3").params["weight"] = _pruned(teacher.node("fc3").dense("weight"), 0.5)  # pruned in place
    before = {nid: student.node(nid).params["weight"] for nid in ("fc1", "fc2", "fc3")}
    w3_before = before["fc3"]
    assert isinstance(w3_before, torch.Tensor)
    batches = input_batches(teacher, n=6)
    err0 = _error(student, teacher, batches)
    _recover(student, teacher, batches, steps=60, lr=1e-2)
    for nid in ("fc1", "fc2"):
        old, new = before[nid], student.node(nid).params["weight"]
        assert isinstance(old, Sparse) and isinstance(new, Sparse) and new.layout == "csr"
        assert torch.equal(new.indices, old.indices)  # no pruned weight revived, none added
        assert not torch.equal(new.values, old.values)
    w3 = student.node("fc3").params["weight"]
    assert isinstance(w3, torch.Tensor) and torch.equal(w3 == 0, w3_before == 0)
    assert int((w3 == 0).sum()) == 18  # half of 3·12
    assert _error(student, teacher, batches) < 0.6 * err0


def test_codebook_indices_fixed_and_a_shared_table_moves_once() -> None:
    teacher = mlp()
    student = teacher.copy()
    # fc1 and fc2 share one table of 8 values (one of them 0.0: the pruned weights), fc3 has its own
    shared = Centroids(torch.tensor([-0.6, -0.3, -0.15, 0.0, 0.1, 0.2, 0.35, 0.6]), "linear")
    own = Centroids(torch.tensor([-0.4, -0.1, 0.1, 0.4]), "fc3")
    for nid, table in (("fc1", shared), ("fc2", shared), ("fc3", own)):
        w = teacher.node(nid).dense("weight")
        idx = (w.unsqueeze(-1) - table.values).abs().argmin(-1)
        student.node(nid).params["weight"] = Codebook(idx, table)
    idx_before = {nid: cb.indices.clone() for nid in ("fc1", "fc2", "fc3")
                  if isinstance(cb := student.node(nid).params["weight"], Codebook)}
    batches = input_batches(teacher, n=6)
    err0 = _error(student, teacher, batches)
    _recover(student, teacher, batches, steps=60, lr=1e-2)
    w1, w2, w3 = (student.node(n).params["weight"] for n in ("fc1", "fc2", "fc3"))
    assert isinstance(w1, Codebook) and isinstance(w2, Codebook) and isinstance(w3, Codebook)
    for nid, cw in (("fc1", w1), ("fc2", w2), ("fc3", w3)):
        assert torch.equal(cw.indices, idx_before[nid])  # no cluster split or merged
    assert w1.centroids is w2.centroids and w1.centroids is not w3.centroids  # still one shared table
    assert w1.centroids is not shared and w1.centroids.name == "linear"  # a new table: the input is untouched
    assert torch.equal(shared.values, torch.tensor([-0.6, -0.3, -0.15, 0.0, 0.1, 0.2, 0.35, 0.6]))
    assert float(w1.centroids.values[3]) == 0.0  # the zero centroid (pruned weights) stays zero
    assert int((w1.centroids.values != shared.values).sum()) == 7
    # the graph stores two tables: bytes count them once
    tables = {id(cb.centroids) for n in student.by_kind("linear") if isinstance(cb := n.params["weight"], Codebook)}
    assert len(tables) == 2
    assert _error(student, teacher, batches) < 0.8 * err0


def test_centroid_gradient_is_the_sum_over_its_cluster() -> None:
    table = _Table(Centroids(torch.tensor([-1.0, 0.0, 0.5, 2.0])))
    idx = torch.tensor([[0, 1, 2], [3, 2, 0], [2, 2, 1]])
    form = _Codebook(Codebook(idx, table.c), table)
    g = torch.arange(9.0).reshape(3, 3) - 4
    (form.dense() * g).sum().backward()
    assert table.leaf.grad is not None
    # g = [[-4, -3, -2], [-1, 0, 1], [2, 3, 4]]; cluster 0: g[0,0] + g[1,2]; 1: the zero centroid, held at zero;
    # 2: g[0,2] + g[1,1] + g[2,0] + g[2,1]; 3: g[1,0]
    assert table.leaf.grad.tolist() == [-4.0 + 1.0, 0.0, -2.0 + 0.0 + 2.0 + 3.0, -1.0]


@pytest.mark.parametrize(("bits", "axis", "symmetric"), [(8, 0, True), (4, None, True), (8, 1, False)])
def test_affine_values_stay_on_their_grid(bits: int, axis: int | None, symmetric: bool) -> None:
    teacher = mlp()
    student = teacher.copy()
    for nid in ("fc1", "fc2", "fc3"):
        w = teacher.node(nid).dense("weight")
        pruned = _pruned(w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)), 0.7)
        student.node(nid).params["weight"] = Affine.quantize(pruned, bits=bits, axis=axis, symmetric=symmetric)
    before = {nid: student.node(nid).params["weight"] for nid in ("fc1", "fc2", "fc3")}
    batches = input_batches(teacher, n=6)
    err0 = _error(student, teacher, batches)
    _recover(student, teacher, batches, steps=60, lr=1e-2)
    moved = 0
    for nid, old in before.items():
        new = student.node(nid).params["weight"]
        assert isinstance(old, Affine) and isinstance(new, Affine)
        assert torch.equal(new.scale, old.scale) and (new.bits, new.signed, new.axis) == (old.bits, old.signed, old.axis)
        assert (new.zero_point is None) == (old.zero_point is None)
        if old.zero_point is not None:
            assert new.zero_point is not None and torch.equal(new.zero_point, old.zero_point)
        assert new.q.dtype == old.q.dtype
        zp = 0 if old.zero_point is None else old.zero_point.reshape([-1 if axis == i else 1 for i in range(2)])
        was_zero = old.q == zp
        assert int(was_zero.sum()) >= int(0.3 * old.q.numel())
        assert bool((new.q == zp)[was_zero].all())  # pruned (zero) weights stay zero
        assert torch.equal(new.dense(), ((new.q.float() - (0 if old.zero_point is None else zp)) *
                                        (old.scale.reshape([-1 if axis == i else 1 for i in range(2)])
                                         if axis is not None else old.scale)))
        moved += int((new.q != old.q).sum())
    assert moved > 20
    assert _error(student, teacher, batches) < 0.9 * err0


def _digits() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(m.parameters(), 2e-2)
    for _ in range(120):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[:1200]), y[:1200]).backward()
        opt.step()
    return m.eval(), x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _digits()


def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


TRIM = "trim { ratio = 0.8, criterion = l1 }"


def test_recover_after_trim_restores_top1_and_keeps_shapes(digits) -> None:  # type: ignore[no-untyped-def]
    m, xtr, _, xte, yte = digits
    bare = TRIM.replace("criterion = l1", "criterion = l1, refit = none")  # no least-squares refit: collapses
    one_shot = ns.compile(m, f"policy p {{ {bare} }}", example_inputs=(xtr[:4],), calibration=xtr[:512])
    rec = ns.compile(m, f"policy p {{ {bare} recover {{ steps = 100, lr = 1e-2, loss = kl }} }}",
                     example_inputs=(xtr[:4],), calibration=xtr[:512])
    refitted = ns.compile(m, f"policy p {{ {TRIM} }}", example_inputs=(xtr[:4],), calibration=xtr[:512])
    assert _top1(m, xte, yte) == pytest.approx(0.9698, abs=1e-3)
    assert _top1(one_shot.model, xte, yte) < 0.2
    assert _top1(refitted.model, xte, yte) > 0.93  # trim's default refit, one-shot: measured 0.951
    assert _top1(rec.model, xte, yte) > 0.88  # measured 0.925 (one-shot 0.104)
    shapes = {n.id: {k: tuple(w.shape) for k, w in n.params.items()} for n in one_shot.graph.nodes()}
    assert {n.id: {k: tuple(w.shape) for k, w in n.params.items()} for n in rec.graph.nodes()} == shapes
    (note,) = rec.report.passes[1].result.notes
    assert note.startswith("100 steps on 6 params of 3 nodes, loss ")
    assert rec.report.fidelity["output_error"] < one_shot.report.fidelity["output_error"]


def _bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_same_bytes_twice(digits) -> None:  # type: ignore[no-untyped-def]
    m, xtr, *_ = digits
    pol = f"policy p {{ {TRIM} recover {{ steps = 20, lr = 1e-2 }} }}"
    a = ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=xtr[:256])
    b = ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=xtr[:256])
    assert _bytes(a.model) == _bytes(b.model)
    c = ns.compile(m, f"policy p {{ {TRIM} recover {{ steps = 21, lr = 1e-2 }} }}", example_inputs=(xtr[:4],),
                   calibration=xtr[:256])
    assert _bytes(a.model) != _bytes(c.model)


# ---- labels ---------------------------------------------------------------------------------------------
def test_labelled_npz_adds_the_task_loss(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m, xtr, ytr, *_ = digits
    plain, labelled = tmp_path / "x.npz", tmp_path / "xy.npz"
    np.savez(plain, x=xtr[:256].numpy())
    np.savez(labelled, x=xtr[:256].numpy(), labels=ytr[:256].numpy())

    def out(path: Path, weight: float) -> bytes:
        pol = f"policy p {{ {TRIM} recover {{ steps = 20, lr = 1e-2, label_weight = {weight} }} }}"
        return _bytes(ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=path).model)

    assert out(labelled, 0.0) == out(plain, 1.0)  # the labels array is not read as an input, weight 0 ignores it
    assert out(labelled, 1.0) != out(plain, 1.0)


def test_labels_are_checked(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m, xtr, ytr, *_ = digits
    pol = f"policy p {{ {TRIM} recover {{ steps = 2 }} }}"
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=xtr[:64].numpy(), labels=ytr[:64].numpy() + 5)
    with pytest.raises(PassError) as e:
        ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=bad)
    assert e.value.message == "pass 'recover' (<policy>:1) failed: calibration label 14 is out of range for 10 classes"
    np.savez(bad, x=xtr[:64].numpy(), labels=ytr[:64].numpy().astype(np.float32))
    with pytest.raises(PassError) as e:
        ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=bad)
    assert e.value.message == ("pass 'recover' (<policy>:1) failed: calibration labels must be one class index per "
                               "sample (integers of shape [N]); got float32 of shape [64]")
    np.savez(bad, x=xtr[:64].numpy(), labels=ytr[:60].numpy())
    with pytest.raises(InputMismatchError) as e2:
        ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=bad)
    assert e2.value.message == f"calibration file '{bad}': array 'labels' has 60 rows but the inputs have 64 samples"


# ---- the guard, the progress bar, options, errors ------------------------------------------------------------
def test_guard_stops_early_and_keeps_the_best(digits) -> None:  # type: ignore[no-untyped-def]
    m, xtr, *_ = digits
    pol = (f"policy p {{ guard output error <= 60% \n {TRIM} recover {{ steps = 200, lr = 1e-2, check_every = 10 }} }}")
    r = ns.compile(m, pol, example_inputs=(xtr[:4],), calibration=xtr[:256])
    res = r.report.passes[1].result
    assert 0 < res.metrics["steps"] < 200 and res.metrics["steps"] % 10 == 0
    assert res.metrics["guard"] <= 0.6
    assert f"guard met after {int(res.metrics['steps'])} steps" in res.notes[0]
    assert r.report.fidelity["output_error"] == pytest.approx(res.metrics["guard"], rel=1e-6)


def test_no_progress_bar_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    teacher = mlp()
    student = teacher.copy()
    student.node("fc1").params["weight"] = Sparse.from_dense(_pruned(teacher.node("fc1").dense("weight"), 0.5))
    ctx = stream_ctx(input_batches(teacher, n=2), trainable_fn=trainable, original=teacher)
    Recover(steps=3).run(student, ctx)
    assert capsys.readouterr().err == ""


def test_options_from_the_dsl() -> None:
    plan = resolve(parse_policy("policy p {\n  recover { steps = 200, lr = 1e-3 }\n}\n", "p.sqz"), tiny_cnn(),
                   all_passes())
    (step,) = plan.steps
    assert step.instance == Recover(steps=200, lr=1e-3)
    assert (step.instance.loss, step.instance.label_weight, step.instance.check_every) == ("mse", 1.0, 0)

    def error(body: str) -> str:
        with pytest.raises(PolicyError) as e:
            resolve(parse_policy(f"policy p {{\n  recover {{ {body} }}\n}}\n", "p.sqz"), tiny_cnn(), all_passes())
        (d,) = e.value.diagnostics
        return d.message

    assert error("steps = 0") == "option 'steps' of pass 'recover' must be >= 1, got '0'"
    assert error("steps = 2.5") == "option 'steps' of pass 'recover' expects an integer, got '2.5'"
    assert error("lr = 0") == "option 'lr' of pass 'recover' must be > 0, got '0'"
    assert error("check_every = -1") == "option 'check_every' of pass 'recover' must be >= 0, got '-1'"
    assert error("loss = l1") == "option 'loss' of pass 'recover' must be one of 'mse', 'kl', got the name 'l1'"
    assert error("setps = 3") == "unknown option 'setps' for pass 'recover' (did you mean 'steps'?)"
    with pytest.raises(NetsqueezeError) as e:
        Recover(label_weight=-1.0)
    assert e.value.message == "option 'label_weight' of pass 'recover' must be >= 0, got '-1.0'"


def test_needs_the_compiler() -> None:
    g = mlp()
    with pytest.raises(NetsqueezeError) as e:
        Recover().run(g, PassContext())
    assert e.value.message == "recover distils from the original model: run it through compile()"
    with pytest.raises(NetsqueezeError) as e:
        Recover().run(g, PassContext(original=g.copy()))
    assert e.value.message == "this pass trains weights and needs the torch backend: run it through compile()"


# ---- the trainable view ---------------------------------------------------------------------------------
def test_trainable_view_runs_the_graph_and_takes_gradients_only_where_given() -> None:
    g = mlp()
    g.node("fc2").params["weight"] = Sparse.from_dense(_pruned(g.node("fc2").dense("weight"), 0.5))
    fn = GraphFunction(g)
    x = input_batches(g, n=1)[0]
    with torch.no_grad():
        ref = to_torch(g)(*x)
    assert torch.equal(fn({}, x)[0], ref)
    assert fn.addressable() == {(n, k) for n in ("fc1", "fc2", "fc3") for k in ("weight", "bias")}
    w = g.node("fc1").dense("weight").clone().requires_grad_(True)
    fn({("fc1", "weight"): w}, x)[0].sum().backward()
    assert w.grad is not None and w.grad.shape == (16, 10)
    assert all(p.grad is None for p in fn.module.parameters())
    with pytest.raises(NetsqueezeError) as e:
        fn({("fc1", "nope"): w}, x)
    assert e.value.message == ("param 'nope' of node 'fc1' cannot be trained: the emitted torch model holds it as a "
                               "buffer or not at all")


def test_only_the_selected_nodes_train() -> None:
    teacher = mlp()
    student = teacher.copy()
    for nid in ("fc1", "fc3"):
        student.node(nid).params["weight"] = Sparse.from_dense(_pruned(teacher.node(nid).dense("weight"), 0.5))
    before = student.copy()
    ctx = stream_ctx(input_batches(teacher, n=2), trainable_fn=trainable, original=teacher,
                     selected=frozenset({"fc3"}))
    res = Recover(steps=5, lr=1e-2, progress=False).run(student, ctx)
    assert res.touched == {"fc3"}
    for nid in ("fc1", "fc2"):
        for k, w in student.node(nid).params.items():
            assert torch.equal(dense(w), dense(before.node(nid).params[k]))
    assert not torch.equal(student.node("fc3").dense("bias"), before.node("fc3").dense("bias"))


def test_after_prune_and_shared_codebooks_from_the_passes(digits) -> None:  # type: ignore[no-untyped-def]
    """The real `prune` + `share_weights` (one table for every linear): recover keeps the table shared, its
    zero (the pruned weights) at zero, every index, and lowers the output error."""
    m, xtr, *_ = digits
    steps = "prune { sparsity = 0.9 }\n  share_weights { k = 4, scope = type }"
    base = ns.compile(m, f"policy p {{ {steps} }}", example_inputs=(xtr[:4],), calibration=xtr[:256])
    rec = ns.compile(m, f"policy p {{ {steps}\n  recover {{ steps = 40, lr = 1e-2 }} }}", example_inputs=(xtr[:4],),
                     calibration=xtr[:256])
    tables = set()
    for n in rec.graph.by_kind("linear"):
        old, new = base.graph.node(n.id).params["weight"], n.params["weight"]
        assert isinstance(old, Codebook) and isinstance(new, Codebook)
        assert torch.equal(new.indices, old.indices)
        assert torch.equal(new.dense() == 0, old.dense() == 0)
        tables.add(id(new.centroids))
        assert int((new.centroids.values == 0).sum()) == int((old.centroids.values == 0).sum()) == 1
    assert len(tables) == 1
    # measured 0.857 against 0.963: 4 shared values and the biases are all that may move
    assert rec.report.fidelity["output_error"] < 0.9 * base.report.fidelity["output_error"]


def test_staged_pruning_with_recover_beats_one_shot_at_the_same_steps(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The paper's pipeline as one policy (benchmarks/share.py --targets): prune, recover with labels, prune
    further, recover, share, recover. Earlier zeros stay zero, the counts are exact, and with the same 150
    recover steps it ends well ahead of pruning to 90% and sharing at once."""
    m, xtr, ytr, xte, yte = digits
    data = tmp_path / "xy.npz"
    np.savez(data, x=xtr.numpy(), labels=ytr.numpy())
    rec = "recover {{ steps = {}, lr = 1e-2, loss = kl }}"
    staged = (f"prune {{ sparsity = 0.6 }} {rec.format(60)} prune {{ sparsity = 0.9 }} {rec.format(60)} "
              f"share_weights {{ k = 16 }} {rec.format(30)}")
    at_once = f"prune {{ sparsity = 0.9 }} share_weights {{ k = 16 }} {rec.format(150)}"
    got = {}
    for name, body in (("staged", staged), ("at_once", at_once)):
        r = ns.compile(m, f"policy p {{ store {{ format = sham }} {body} }}", example_inputs=(xtr[:4],),
                       calibration=data)
        ws = {n.id: n.params["weight"] for n in r.graph.nodes() if n.kind == "linear"}
        assert all(isinstance(w, Codebook) for w in ws.values())
        assert {k: int((dense(w) == 0).sum()) for k, w in ws.items()} == {"0": 3686, "2": 3686, "4": 576}
        assert r.report.storage["psi"] == pytest.approx(0.0714, abs=3e-4)  # sHAM file bytes / fp32 bytes
        got[name] = _top1(r.model, xte, yte)
    assert got["staged"] > 0.80  # measured 0.829
    assert got["staged"] > got["at_once"] + 0.05  # measured 0.740


def test_without_a_guard_training_that_raises_the_loss_is_not_kept(digits) -> None:  # type: ignore[no-untyped-def]
    """No guard: the loss over the calibration data is measured before and after; a learning rate that
    wrecks the refit model leaves the graph exactly as trim left it, and the note says why."""
    m, xtr, _, xte, yte = digits
    base = ns.compile(m, f"policy p {{ {TRIM} }}", example_inputs=(xtr[:4],), calibration=xtr[:512])
    wild = ns.compile(m, f"policy p {{ {TRIM} recover {{ steps = 8, lr = 1.0, loss = kl }} }}",
                      example_inputs=(xtr[:4],), calibration=xtr[:512])
    rec = wild.report.passes[1].result
    assert not rec.changed and rec.touched == set()
    assert rec.notes[0].startswith("8 steps on 6 params of 3 nodes, loss ")
    assert rec.metrics["data_loss_after"] > rec.metrics["data_loss_before"]
    assert rec.notes[0].endswith(
        f"; training did not lower the loss over the calibration data ({rec.metrics['data_loss_before']:.4g} → "
        f"{rec.metrics['data_loss_after']:.4g}): the weights before it are kept (try a lower `lr`)")
    for a, b in zip(base.model.state_dict().values(), wild.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _top1(wild.model, xte, yte) == _top1(base.model, xte, yte)
    # a learning rate that helps is kept, and its note gives both losses
    good = ns.compile(m, f"policy p {{ {TRIM} recover {{ steps = 40, lr = 1e-3, loss = kl }} }}",
                      example_inputs=(xtr[:4],), calibration=xtr[:512])
    r = good.report.passes[1].result
    assert r.changed and r.metrics["data_loss_after"] < r.metrics["data_loss_before"]
    assert r.notes[0].endswith(f"; loss over the calibration data {r.metrics['data_loss_before']:.4g} → "
                               f"{r.metrics['data_loss_after']:.4g}")


def test_recover_after_quantized_activations_says_to_run_it_first() -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(64, 6)
    with pytest.raises(PassError) as e:
        ns.compile(m, "policy p { quantize\n recover { steps = 2 } }", example_inputs=(x[:4],), calibration=[x],
                   progress=False)
    d = e.value.diagnostics[0]
    assert d.message.startswith("pass 'recover' (<policy>:2) failed: recover: the outputs do not depend "
                                "differentiably on any trainable param of the selected nodes; quantized activations "
                                "(from '")
    assert d.message.endswith("' on) stop the gradient: run recover before quantize")


def test_nothing_to_recover_says_so() -> None:
    # a model that matches its original: the loss is 0 before and after, which read "training raised the loss"
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8)
    res = ns.compile(m, "policy p { recover { steps = 5 } }", example_inputs=(x[:2],), calibration=x)
    note = res.report.passes[0].result.notes[0]
    assert note.endswith("; training did not lower the loss over the calibration data (0 → 0): the weights before "
                         "it are kept (nothing to recover: the model matches the original)")
