"""`net_trim`: ADMM and cvxpy agree, Proposition 1, cascade feasibility, end-to-end bounds, executors give
identical bits, the pass from the DSL with checked options, located solver errors, channel removal."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.errors import NetsqueezeError, SolverError
from netsqueeze.ir import weights
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.ir.weights import Sparse
from netsqueeze.passes.base import PassResult
from netsqueeze.passes.executor import Dask, Executor, InProcess, Processes, make_executor
from netsqueeze.passes.net_trim import NetTrim
from netsqueeze.passes.net_trim_solvers import Chunk, Settings, constraints, l1, solve
from tests.passes.graphs import cnn, linear, mlp, run, stream_ctx


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _layer(n: int, p: int, m: int, seed: int, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated non-negative inputs x [n+1, p] (bias row of ones), weights w [n+1, m], outputs y."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, p, generator=g, dtype=torch.float64)
         + 0.3 * torch.randn(n, p, generator=g, dtype=torch.float64)).clamp_min(0.0)
    x = torch.cat([x, torch.ones(1, p, dtype=torch.float64)])
    w = torch.randn(n + 1, m, generator=g, dtype=torch.float64) / n**0.5
    pre = w.T @ x
    return x, w, pre.clamp_min(0.0) if relu else pre


def _agree(ch: Chunk) -> None:
    a = solve(ch, Settings("admm"))
    c = solve(ch, Settings("cvxpy"))
    assert a.converged and c.converged
    # the ADMM solution meets the constraints within 1% of ε, and its ‖W‖₁ is within 1% of cvxpy's
    assert bool((a.ball <= 1.01 * ch.eps).all()), (a.ball / ch.eps).max()
    assert bool((a.excess <= 0.01 * ch.eps).all())
    assert l1(ch, a.w) == pytest.approx(l1(ch, c.w), rel=0.01)
    assert bool((c.ball <= 1.0001 * ch.eps).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_admm_and_cvxpy_agree_on_random_relu_layers(seed: int) -> None:
    x, _, y = _layer(30, 150, 4, seed)
    eps = 0.05 * torch.linalg.vector_norm(y, dim=1)
    _agree(Chunk("fc", (0, 4), x, y, torch.zeros_like(y), eps, True))


def test_admm_and_cvxpy_agree_on_cascade_and_least_squares_layers() -> None:
    x, w, y = _layer(25, 120, 3, 5)
    xhat = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    xhat[-1] = 1.0
    v = w.T @ xhat
    err = torch.linalg.vector_norm(torch.where(y > 1e-6, v - y, 0.0), dim=1)
    _agree(Chunk("fc", (0, 3), xhat, y, v, 1.1 * err, True))
    x, _, y = _layer(25, 120, 3, 6, relu=False)
    _agree(Chunk("fc", (0, 3), x, y, None, 0.1 * torch.linalg.vector_norm(y, dim=1), True))


def test_proposition_1_any_feasible_solution_keeps_relu_outputs_within_eps() -> None:
    x, _, y = _layer(30, 200, 6, 3)
    eps = 0.08 * torch.linalg.vector_norm(y, dim=1)
    ch = Chunk("fc", (0, 6), x, y, torch.zeros_like(y), eps, True)
    for settings in (Settings("admm"), Settings("cvxpy")):
        w = solve(ch, settings).w
        assert int((w[:-1] == 0).sum()) > 0  # something was pruned
        err = torch.linalg.vector_norm((w.T @ x).clamp_min(0.0) - y, dim=1)
        assert bool((err <= 1.01 * eps).all()), (err / eps).max()


@functools.cache
def _trained_mlp() -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g)
    teacher = torch.randn(12, 3, generator=g)
    labels = (x @ teacher).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.enable_grad():
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
            opt.step()
    return model.eval(), x


def _graph(model: nn.Module, x: torch.Tensor) -> Graph:
    return ns.compile(model, [], example_inputs=(x[:4],), executor="local").graph


def _relative_l1(g: Graph, node: str) -> float:
    return float(weights.dense(g.node(node).params["weight"]).abs().sum())


@pytest.mark.parametrize("mode", ["parallel", pytest.param("cascade", marks=pytest.mark.slow)])
def test_admm_and_cvxpy_agree_on_a_trained_mlp(mode: str) -> None:
    model, x = _trained_mlp()
    g0 = _graph(model, x)
    batches = [[x[i:i + 40]] for i in range(0, 120, 40)]  # 120 samples: cvxpy takes a problem per neuron
    out = {}
    for solver in ("admm", "cvxpy"):
        g = g0.copy()
        NetTrim(epsilon=0.1, mode=mode, solver=solver, remove_channels=False).run(  # type: ignore[arg-type]
            g, stream_ctx(batches, executor=InProcess()))
        out[solver] = g
    layers = [n.id for n in g0.by_kind("linear")]
    assert len(layers) == 3
    for node in layers:
        assert _relative_l1(out["admm"], node) == pytest.approx(_relative_l1(out["cvxpy"], node), rel=0.01)
        assert isinstance(out["admm"].node(node).params["weight"], Sparse)


def _pre_post(g: Graph, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every linear layer of `g` on x, running g."""
    lin = [n.id for n in g.by_kind("linear")]
    vals = run(g, [x], [v for n in lin for v in (g.operands(n)[0], (n, 0))])
    outs = vals[len(vals) - 2 * len(lin):]
    return [(outs[2 * i], outs[2 * i + 1]) for i in range(len(lin))]


def _opnorm(g: Graph, node: str) -> float:
    return float(torch.linalg.matrix_norm(weights.dense(g.node(node).params["weight"]).double(), ord=2))


def test_parallel_and_cascade_reach_their_end_to_end_bounds() -> None:
    model, x = _trained_mlp()
    g0 = _graph(model, x)
    batches = [[x[i:i + 50]] for i in range(0, 200, 50)]
    lin = [n.id for n in g0.by_kind("linear")]
    y_orig = [o.double() for _, o in _pre_post(g0, x)]
    relu_out = [y.clamp_min(0.0) for y in y_orig[:-1]] + [y_orig[-1]]
    gain, gamma = 0.05, 1.2

    # parallel: ‖Ŷ_L − Y_L‖ ≤ Σ_l ε_l ∏_{k>l} ‖Ŵ_k‖₂, with ε_l = gain·‖Y_l‖_F
    g = g0.copy()
    NetTrim(epsilon=gain, remove_channels=False).run(g, stream_ctx(batches, executor=InProcess()))
    final = _pre_post(g, x)[-1][1].double()
    bound = 0.0
    for i in range(len(lin)):
        prod = 1.0
        for k in range(i + 1, len(lin)):
            prod *= _opnorm(g, lin[k])
        bound += 1.01 * gain * float(torch.linalg.vector_norm(relu_out[i])) * prod
    err = float(torch.linalg.vector_norm(final - y_orig[-1]))
    assert 0 < err <= bound

    # cascade: the last (least-squares) layer holds ‖Ŷ_L − Y_L‖ ≤ ε_L = γ·‖W_Lᵀ X̂_L − Y_L‖ ≤ γ ‖W_L‖₂ ‖X̂_L − X_L‖
    g = g0.copy()
    NetTrim(epsilon=gain, mode="cascade", gamma=gamma, remove_channels=False).run(
        g, stream_ctx(batches, executor=InProcess()))
    xs = _pre_post(g, x)
    xhat_l, final = xs[-1][0].double(), xs[-1][1].double()
    w_l = g0.node(lin[-1]).params["weight"].double()
    b_l = g0.node(lin[-1]).params["bias"].double()
    eps_l = gamma * float(torch.linalg.vector_norm(xhat_l @ w_l.T + b_l - y_orig[-1]))
    err = float(torch.linalg.vector_norm(final - y_orig[-1]))
    x_l = _pre_post(g0, x)[-1][0].double()
    assert 0 < err <= 1.01 * eps_l <= 1.01 * gamma * _opnorm(g0, lin[-1]) * float(torch.linalg.vector_norm(xhat_l - x_l))


def test_cascade_keeps_the_original_weights_feasible() -> None:
    model, x = _trained_mlp()
    g0 = _graph(model, x)
    lin = [n.id for n in g0.by_kind("linear")]
    nt = NetTrim(mode="cascade", gamma=1.1)
    layers, _ = nt._layers(g0, stream_ctx([]))
    pairs = _pre_post(g0, x)
    xin = torch.cat([pairs[1][0].double().T, torch.ones(1, 200, dtype=torch.float64)])
    xhat = (xin + 0.05 * torch.randn(xin.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    xhat[-1] = 1.0
    chunks = nt._chunks(layers[1], xin, xhat.clamp_min(0.0), 0.05, False, {})
    assert layers[1].node == lin[1]
    for c in chunks:
        ball, excess = constraints(c, layers[1].weight[:, c.neurons[0]:c.neurons[1]])
        assert bool((ball <= c.eps / 1.1 + 1e-12).all()) and float(excess.max()) == 0.0
        assert bool((c.eps > 0)[(c.y > 1e-6).any(1)].all())


def _executor_run(ex: Executor) -> Graph:
    model, x = _trained_mlp()
    g = _graph(model, x)
    with ex:
        NetTrim(epsilon=0.1, chunk=8).run(g, stream_ctx([[x[i:i + 50]] for i in range(0, 200, 50)], executor=ex))
    return g


def _same_bits(a: Graph, b: Graph) -> None:
    for n in a.nodes():
        for k, w in n.params.items():
            other = b.node(n.id).params[k]
            assert type(w) is type(other)
            assert torch.equal(weights.dense(w), weights.dense(other))


def test_dask_local_cluster_equals_in_process() -> None:
    # a 2-worker LocalCluster whose workers are threads of this process (processes=False: a process cluster
    # takes seconds to start; `Processes` below covers separate worker processes)
    _same_bits(_executor_run(InProcess()), _executor_run(Dask(None, 2, processes=False)))


@pytest.mark.slow
def test_local_processes_equal_in_process() -> None:
    _same_bits(_executor_run(InProcess()), _executor_run(Processes(2)))


POLICY = """\
policy sparse_mlp {
  input x: float32[4, 12]
  net_trim on type(linear) { epsilon = 5%, mode = cascade }
}
"""


def test_policy_compiles_from_the_dsl() -> None:
    model, x = _trained_mlp()
    res = ns.compile(model, POLICY, calibration=x, executor="local")
    assert res.report.after.nonzeros < res.report.before.nonzeros
    assert res.report.after.params <= res.report.before.params
    rec = next(r for r in res.report.passes if r.name == "net_trim")
    assert rec.result.metrics["epsilon"] == 0.05
    assert 0 < rec.result.metrics["density"] < 1
    for n in res.graph.by_kind("linear"):
        assert isinstance(n.params["weight"], Sparse) and n.params["weight"].layout == "csr"
    with torch.no_grad():
        y0, y1 = model(x), res.model(x)
    assert float((y1 - y0).norm() / y0.norm()) < 0.1


@pytest.mark.parametrize("option, message", [
    ("mode = sideways", "option 'mode' of pass 'net_trim' must be one of 'parallel', 'cascade', got the name 'sideways'"),
    ("gamma = 0.5", "gamma"),
    ("kappa = 0", "kappa"),
    ("epsilon = 150%", "epsilon"),
    ("solver = scs", "option 'solver' of pass 'net_trim' must be one of 'admm', 'cvxpy', got the name 'scs'"),
])
def test_options_are_checked(option: str, message: str) -> None:
    model, x = _trained_mlp()
    with pytest.raises(NetsqueezeError) as e:
        ns.compile(model, POLICY.replace("mode = cascade", option), calibration=x, executor="local")
    assert message in str(e.value)


@pytest.mark.parametrize("options, name", [({"kappa": 0.5}, "kappa"), ({"gamma": 1.5}, "gamma")])
def test_cascade_options_are_refused_in_parallel_mode(options: dict[str, float], name: str) -> None:
    with pytest.raises(NetsqueezeError) as e:
        NetTrim(mode="parallel", **options)  # type: ignore[arg-type]
    assert f"option '{name}' of pass 'net_trim' applies to mode = cascade only" in str(e.value)
    NetTrim(mode="cascade", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("options, where, name", [("epsilon = 5%, kappa = 50%", 28, "kappa"),
                                                  ("epsilon = 5%, gamma = 1.1", 28, "gamma")])
def test_cascade_options_in_a_parallel_policy_are_located_at_the_option(options: str, where: int, name: str,
                                                                          tmp_path: Path) -> None:
    """Checked at check time, at the option the policy wrote (a `gamma` equal to its default included), not
    when the pass is built (at the pass name, and only for a gamma other than the default)."""
    from netsqueeze.compiler.plan import check_file

    path = tmp_path / "p.sqz"
    path.write_text(f"policy p {{\n  net_trim {{ {options} }}\n}}\n")
    assert [d.format().splitlines()[0] for d in check_file(path)] == [
        f"{path}:2:{where}: error: pass 'net_trim': option '{name}' applies to mode = cascade only (parallel mode "
        "solves every layer at epsilon)"]
    path.write_text(f"policy p {{\n  net_trim {{ {options}, mode = cascade }}\n}}\n")
    assert check_file(path) == []


def test_an_unconverged_solve_is_a_located_solver_error_and_nothing_is_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import netsqueeze.passes.net_trim_solvers as solvers

    model, x = _trained_mlp()
    g = _graph(model, x)
    # 3 ADMM iterations: every neuron is left to the exact solve, which meets ε
    res = NetTrim(epsilon=0.05, max_iterations=3).run(g.copy(), stream_ctx([[x]], executor=InProcess()))
    assert any(n.endswith("neuron(s) ADMM left unsolved re-solved by cvxpy") for n in res.notes)
    # when the exact solve fails too, nothing is written
    exact = solvers.solve_cvxpy
    monkeypatch.setattr(solvers, "solve_cvxpy",
                        lambda chunk, settings: solvers.replace(exact(chunk, settings), converged=False,
                                                                message="CLARABEL stopped"))
    before = {n.id: {k: v.clone() for k, v in n.params.items()} for n in g.nodes()}
    with pytest.raises(SolverError) as e:
        NetTrim(epsilon=0.05, max_iterations=3).run(g, stream_ctx([[x]], executor=InProcess()))
    msg = str(e.value)
    assert "did not converge (" in msg and "re-solved by cvxpy: CLARABEL stopped) after 3 iterations" in msg
    assert "ε = " in msg and "residuals primal" in msg
    assert e.value.diagnostics[0].node in [n.id for n in g.by_kind("linear")]
    for n in g.nodes():
        for k, v in n.params.items():
            assert torch.equal(v, before[n.id][k])


def test_an_infeasible_kappa_is_a_solver_error() -> None:
    model, x = _trained_mlp()
    g = _graph(model, x)
    with pytest.raises(SolverError) as e:
        NetTrim(epsilon=0.1, mode="cascade", kappa=1e-6, max_iterations=3000).run(
            g, stream_ctx([[x]], executor=InProcess()))
    assert e.value.diagnostics[0].node == g.by_kind("linear")[-1].id


@pytest.mark.parametrize("spec, message", [
    ("dask://", "a Dask scheduler is dask://HOST:PORT"),
    ("processes:0", "the worker count must be a positive integer, got '0'"),
    ("threads", "unknown executor 'threads'"),
])
def test_bad_executor_specs(spec: str, message: str) -> None:
    with pytest.raises(NetsqueezeError) as e:
        make_executor(spec)
    assert message in str(e.value)
    model, x = _trained_mlp()
    with pytest.raises(NetsqueezeError):
        ns.compile(model, POLICY, calibration=x, executor=spec)


def test_executor_specs() -> None:
    assert isinstance(make_executor("local"), InProcess)
    p = make_executor("processes:3")
    assert isinstance(p, Processes) and p.workers == 3
    d = make_executor("dask://10.0.0.5:8786")
    assert isinstance(d, Dask) and d.address == "tcp://10.0.0.5:8786"
    d = make_executor("dask://local:2")
    assert isinstance(d, Dask) and d.address is None and d.workers == 2


@pytest.mark.parametrize("mode", ["parallel", "cascade"])
def test_all_zero_channels_are_removed_and_outputs_kept(mode: str) -> None:
    torch.manual_seed(0)
    g = Graph("dead")
    x = g.add_node("x", "input", attrs={"shape": (4, 10)})
    h = g.add_node("relu1", "relu", [linear(g, "fc1", x, 10, 8)])
    g.add_node("out", "output", [linear(g, "fc2", h, 8, 3)])
    g.infer_shapes()
    # neurons 2 and 5 of fc1 never fire on the data; fc2 never reads input 7
    g.node("fc1").params["bias"][[2, 5]] = -100.0
    g.node("fc2").params["weight"][:, 7] = 0.0
    g0 = g.copy()
    xs = torch.randn(300, 10, generator=torch.Generator().manual_seed(0))
    res = NetTrim(epsilon=0.02, mode=mode).run(g, stream_ctx([[xs]], executor=InProcess()))  # type: ignore[arg-type]
    g.verify()
    assert res.metrics["channels_removed"] == 3
    assert tuple(g.node("fc1").params["weight"].shape) == (5, 10)
    assert tuple(g.node("fc2").params["weight"].shape) == (3, 5)
    y0, y1 = run(g0, [xs])[0], run(g, [xs])[0]
    # the final layer is least squares at ε = 2% of ‖Y‖ on top of fc1's 2%·‖relu1‖ (propagated through fc2)
    assert float((y1 - y0).norm() / y0.norm()) < 0.1


def test_conv_layers_keep_each_output_within_eps() -> None:
    g = cnn()
    from netsqueeze.passes.fold_bn import FoldBN

    xs = [[torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i))] for i in range(2)]
    FoldBN().run(g, stream_ctx(xs))
    g0 = g.copy()
    res = NetTrim(epsilon=0.05).run(g, stream_ctx(xs, executor=InProcess()))
    assert any("dw: skipped" in n for n in res.notes)
    assert res.metrics["nonzeros:conv2"] < 576
    # conv2 on the original network's input (all 512 patches are samples): relu output within 5%·‖Y‖
    x = torch.cat([b[0] for b in xs])
    relu2 = next(u for u, _ in g0.value_users(("conv2", 0)))
    inp, out = run(g0, [x], [g0.operands("conv2")[0], (relu2, 0)])[-2:]
    w = g.node("conv2").params["weight"].dense()
    b = g.node("conv2").params["bias"]
    pads = tuple(g.node("conv2").attrs["padding"])
    new = torch.nn.functional.conv2d(inp, w, b, padding=pads[:2]).clamp_min(0.0)
    assert float((new - out).norm()) <= 1.01 * 0.05 * float(out.norm())


def test_same_seed_same_bytes() -> None:
    model, x = _trained_mlp()
    a = ns.compile(model, POLICY, calibration=x, executor="local").graph
    b = ns.compile(model, POLICY, calibration=x, executor="local").graph
    for n in a.nodes():
        for k, w in n.params.items():
            assert torch.equal(w.dense() if isinstance(w, Sparse) else w,
                               b.node(n.id).params[k].dense() if isinstance(w, Sparse) else b.node(n.id).params[k])


def _budget_run(limit: float, epsilon: float | None = None) -> tuple[PassResult, float]:
    g = mlp()
    xs = [[torch.randn(100, 10, generator=torch.Generator().manual_seed(i))] for i in range(2)]
    ctx = stream_ctx(xs, executor=InProcess(), budget={"bytes": limit}, original=g.copy())
    res = NetTrim(epsilon=epsilon).run(g, ctx)
    return res, graph_stats(g).param_bytes / graph_stats(mlp()).param_bytes


@pytest.mark.slow
def test_a_bytes_budget_drives_the_epsilon_search() -> None:
    res, size = _budget_run(0.8)
    eps = res.metrics["epsilon"]
    assert 0 < eps < 0.5 and any("ε search: epsilon = " in n for n in res.notes)
    assert size <= 0.8
    # the bisection's answer is the smallest ε it tried that meets the budget: 1/64 of (0, 0.5] less misses it
    assert _budget_run(0.8, eps - 0.5 / 64)[1] > 0.8


def test_an_unreachable_bytes_budget_is_a_budget_error() -> None:
    with pytest.raises(ns.BudgetError) as e:
        _budget_run(0.01)
    assert "net_trim cannot meet the budget bytes <= 1.0%: epsilon = 50% reaches flops " in str(e.value)


@pytest.mark.slow
def test_an_output_error_guard_drives_the_epsilon_search() -> None:
    g0 = mlp()
    xs = [[torch.randn(100, 10, generator=torch.Generator().manual_seed(i))] for i in range(2)]
    x = torch.cat([b[0] for b in xs])
    y0 = run(g0, [x])[0]

    def fidelity(graph: Graph, metric: str) -> float:
        return float((run(graph, [x])[0] - y0).norm() / y0.norm())

    def trim(epsilon: float | None) -> tuple[PassResult, float]:
        g = g0.copy()
        ctx = stream_ctx(xs, executor=InProcess(), guard=("output_error", 0.05), fidelity_fn=fidelity, original=g0)
        res = NetTrim(epsilon=epsilon).run(g, ctx)
        return res, fidelity(g, "output_error")

    res, err = trim(None)
    eps = res.metrics["epsilon"]
    assert 0 < eps < 0.5 and err <= 0.05
    # the largest ε the bisection tried that holds the guard: 1/64 of (0, 0.5] more breaks it
    assert trim(eps + 0.5 / 64)[1] > 0.05


CLI_POLICY = """\
policy mlp_sparse {
  input x: float32[4, 20]
  net_trim on type(linear) { epsilon = 5% }
}
"""


def test_cli_executor_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from netsqueeze.cli import main

    monkeypatch.chdir(tmp_path)
    Path("p.sqz").write_text(CLI_POLICY)
    torch.save(torch.randn(300, 20, generator=torch.Generator().manual_seed(0)), "calib.pt")
    model = f"{Path(__file__).resolve().parents[1] / 'compiler' / 'zoo_models.py'}:mlp"
    assert main(["compile", model, "-p", "p.sqz", "--calib", "calib.pt", "-o", "bad.pt", "--executor", "dask:/x"]) == 2
    assert "unknown executor 'dask:/x'" in capsys.readouterr().err
    assert not Path("bad.pt").exists()
    assert main(["compile", model, "-p", "p.sqz", "--calib", "calib.pt", "-o", "m.pt", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "net_trim" in out and "non-zeros" in out and Path("m.pt").exists()


def test_onnx_emits_sparse_initializers_or_dense_weights() -> None:
    import numpy as np
    import onnxruntime as ort

    from netsqueeze.backends.onnx import to_onnx

    model, x = _trained_mlp()
    res = ns.compile(model, POLICY, calibration=x, executor="local")
    nnz = sum(weights.nnz(n.params["weight"]) for n in res.graph.by_kind("linear"))
    with torch.no_grad():
        ref = res.model(x).numpy()
    for mode, sparse_count in (("initializer", 3), ("dense", 0)):
        proto = to_onnx(res.graph, sparse=mode)  # type: ignore[arg-type]
        assert len(proto.graph.sparse_initializer) == sparse_count
        if sparse_count:
            assert sum(int(np.prod(s.values.dims)) for s in proto.graph.sparse_initializer) == nnz
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_epsilon_100_percent_converges_to_zero_weights_with_both_solvers() -> None:
    """ε_m = ‖y_m‖: the zero weights meet every constraint exactly. The ADMM's residual floor followed its
    iterates, all zero here, so it never stopped; cvxpy's interior point left every entry a tiny non-zero."""
    x, _, y = _layer(30, 150, 4, 0, relu=False)
    ch = Chunk("fc", (0, 4), x, y, None, torch.linalg.vector_norm(y, dim=1), True)
    for solver in ("admm", "cvxpy"):
        s = solve(ch, Settings(solver))
        assert s.converged, solver
        assert int((s.w[:-1] != 0).sum()) == 0, solver  # every penalised (non-bias) entry an exact zero


def test_cvxpy_counts_the_nonzeros_the_admm_counts() -> None:
    """Entries whose contribution to the output is under 1e-6 of the target are solver leftovers, not weights."""
    x, _, y = _layer(30, 150, 4, 1)
    ch = Chunk("fc", (0, 4), x, y, torch.zeros_like(y), 0.3 * torch.linalg.vector_norm(y, dim=1), True)
    a, c = solve(ch, Settings("admm")), solve(ch, Settings("cvxpy"))
    assert int((c.w != 0).sum()) == int((a.w != 0).sum())
    assert bool((c.ball <= 1.0001 * ch.eps).all())


def test_one_calibration_row_is_refused_and_nonzeros_count_the_emitted_weights() -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(1, 16)
    # one sample: the free bias alone met ε and every weight went to zero (a constant model, no error)
    with pytest.raises(NetsqueezeError) as err:
        ns.compile(m, "policy p { net_trim { epsilon = 5% } }", example_inputs=(x,), calibration=x)
    assert str(err.value).splitlines()[0].endswith(
        "net_trim: 1 calibration row reached layer '0' (one sample of a linear layer's input); the ε constraint "
        "needs at least 2 rows to say anything about its weights: give more calibration samples (node '0')")
    x = torch.randn(256, 16)
    res = ns.compile(m, "policy p { net_trim { epsilon = 30% } }", example_inputs=(x[:2],), calibration=x)
    result = res.report.passes[0].result
    emitted = sum(weights.nnz(n.params["weight"]) for n in res.graph.nodes() if n.kind == "linear")
    assert result.metrics["channels_removed"] > 0  # so the count after the removal differs from the one before
    assert result.metrics["nonzeros"] == emitted


def test_admm_keeps_rho_bounded_and_hands_a_stalled_neuron_to_cvxpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 1x1 conv neuron active on 4 of 4096 patches: residual balancing doubled ρ without end (the iterates
    # reached 1e150); bounded, ADMM still stalls on it, and the neurons it leaves outside ε are solved by cvxpy
    import netsqueeze.passes.net_trim as nt_module
    from netsqueeze.passes.net_trim_solvers import replace, solve_admm

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
                      nn.Conv2d(32, 16, 3, groups=4), nn.Flatten(), nn.Linear(16 * 6 * 6, 5)).eval()
    x = torch.randn(64, 3, 8, 8)
    chunks: list[Chunk] = []
    call = nt_module._Task.__call__

    def grab(self: object, chunk: Chunk) -> object:
        chunks.append(chunk)
        return call(self, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(nt_module._Task, "__call__", grab)
    res = ns.compile(m, "policy p { net_trim on \"0\" { epsilon = 5% } }", example_inputs=(x[:4],), calibration=x)
    notes = res.report.passes[0].result.notes
    assert "0 neurons 0..31: 1 neuron(s) ADMM left unsolved re-solved by cvxpy" in notes
    c = chunks[0]
    j = 28
    one = replace(c, y=c.y[j:j + 1], v=c.v[j:j + 1], eps=c.eps[j:j + 1], neurons=(j, j + 1))
    assert int((one.y > 1e-6).sum()) == 4
    sol = solve_admm(one, Settings(max_iterations=20000))
    assert not sol.converged and float(sol.warm[3]) <= Settings().rho * 1e4  # type: ignore[index]
    assert float(sol.ball[0]) < 1.0  # bounded: no blow-up
    assert res.report.fidelity["output_error"] < 0.1
