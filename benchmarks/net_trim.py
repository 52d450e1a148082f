"""`net_trim` on Fashion-MNIST, one-shot: Net-Trim parallel and cascade against magnitude pruning at the same
per-layer sparsity, ADMM against cvxpy, in-process against a Dask LocalCluster.

    .venv/bin/python -m benchmarks.net_trim [--quick] [--samples N] [--eps 0.05,0.1] [--models lenet5,lenet300]
        [--sections models,solvers]

Models (trained here once, cached in benchmarks/cache/): a LeNet-300-100 MLP and a LeNet-5-style CNN
(conv 6@5x5, pool, conv 16@5x5, pool, FC 400-120-84-10). Net-Trim prunes every FC layer of both (the
paper's LeNet experiment prunes the FC layers), calibration = `--samples` training images, one run per
(model, mode, ε), no fine-tuning. Baselines, per layer at exactly Net-Trim's non-zero count: magnitude
pruning (largest |w| kept), and magnitude pruning plus a least-squares refit of the kept weights and bias
of each neuron to the original pre-activations, on the refitted network's own inputs (layer by layer).
Solver speed: the ADMM and cvxpy (CLARABEL) on the same neurons of every MLP layer (cvxpy takes one
problem per neuron: `--cvxpy-neurons` of each layer), time and ‖W‖₁, and the ADMM's time per neuron on a
64-neuron chunk (its normal task); and the whole parallel solve of the LeNet-5 FC layers in-process against
a 2-worker Dask LocalCluster (worker processes), with a bit-for-bit comparison.
Prints the tables and writes benchmarks/results/net_trim.md (net_trim-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import RESULTS, accuracy, fashion_mnist, markdown_table, trained
from netsqueeze.compiler.calibration import activation_stream, calibration_source
from netsqueeze.ir import weights
from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.executor import Dask, InProcess
from netsqueeze.passes.net_trim import NetTrim
from netsqueeze.passes.net_trim_solvers import Settings, l1, solve


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


def lenet300() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


MODELS = {"lenet300": lenet300, "lenet5": LeNet5}


def model_of(name: str, data: dict[str, torch.Tensor], epochs: int = 3) -> nn.Module:
    return trained(name, data, epochs, models=MODELS, prefix="nt_")  # cached as nt_<name>_e<epochs>.pt


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def net_trim(model: nn.Module, calib: torch.Tensor, mode: str, eps: float, samples: int,
             executor: str = "local") -> tuple[ns.CompileResult, float]:
    policy = (f"policy p {{\n  net_trim on type(linear) {{ epsilon = {eps}, mode = {mode}, samples = {samples} }}\n}}")
    res = ns.compile(model, policy, example_inputs=(calib[:1],), calibration=calib, executor=executor)
    return res, res.report.times["passes"]


def layer_nnz(res: ns.CompileResult) -> list[int]:
    return [weights.nnz(n.params["weight"]) for n in res.graph.by_kind("linear")]


def magnitude(model: nn.Module, counts: list[int]) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for lin, k in zip(linears(out), counts):
            w = lin.weight
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[w.abs().flatten().argsort(descending=True, stable=True)[:k]] = True
            w.mul_(keep.reshape(w.shape))
    return out


def inputs_of(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    hooks = [lin.register_forward_hook(lambda m, i, o: got.append(i[0].detach())) for lin in linears(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def refit(model: nn.Module, pruned: nn.Module, calib: torch.Tensor) -> nn.Module:
    """Least-squares refit of each neuron's kept weights and bias to the original pre-activations, on the
    refitted network's own inputs, layer by layer."""
    out = copy.deepcopy(pruned)
    orig_in = inputs_of(model, calib)
    for i, (lin0, lin) in enumerate(zip(linears(model), linears(out))):
        x_hat = inputs_of(out, calib)[i].double()
        target = (orig_in[i].double() @ lin0.weight.double().T + lin0.bias.double()).detach()
        ones = torch.ones(x_hat.shape[0], 1, dtype=torch.float64)
        with torch.no_grad():
            for o in range(lin.weight.shape[0]):
                support = torch.nonzero(lin.weight[o]).flatten()
                a = torch.cat([x_hat[:, support], ones], 1)
                gram = a.T @ a
                # a tiny ridge: inputs that never fire on the calibration data keep a zero weight
                gram += 1e-8 * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
                sol = torch.linalg.solve(gram, a.T @ target[:, o:o + 1]).flatten()
                lin.weight[o, support] = sol[:-1].float()
                lin.bias[o] = float(sol[-1])
    return out


def pct(a: float) -> str:
    return f"{a:.2%}"


def solver_speed(model: nn.Module, calib: torch.Tensor, eps: float, samples: int, neurons: int,
                 chunk: int = 64) -> list[list[str]]:
    """ADMM and cvxpy on the first `neurons` neurons of every layer of `model` (parallel problems, ε = eps)."""
    g: Graph = ns.compile(model, [], example_inputs=(calib[:1],), executor="local").graph
    ctx = PassContext(stream_fn=activation_stream(calibration_source(calib)))
    nt = NetTrim(epsilon=eps, samples=samples, chunk=neurons)
    layers, _ = nt._layers(g, ctx)
    xs = nt._samples(g, None, layers, ctx)
    rows = []
    for lay, (x, _) in zip(layers, xs):
        first = nt._chunks(lay, x, None, eps, False, {})[0]
        t0 = time.perf_counter()
        a = solve(first, Settings("admm"))
        ta = time.perf_counter() - t0
        t0 = time.perf_counter()
        c = solve(first, Settings("cvxpy"))
        tc = time.perf_counter() - t0
        # the ADMM's real use: one chunk of `chunk` neurons sharing the Cholesky factor and every product with X
        batch = NetTrim(epsilon=eps, samples=samples, chunk=chunk)._chunks(lay, x, None, eps, False, {})[0]
        t0 = time.perf_counter()
        solve(batch, Settings("admm"))
        tw = time.perf_counter() - t0
        m = batch.y.shape[0]
        rows.append([lay.node, f"{lay.weight.shape[0]}x{m}", str(x.shape[1]), str(first.y.shape[0]),
                     f"{tc:.2f}", f"{ta:.3f}", f"{tc / ta:.1f}x", f"{l1(first, a.w):.4g}", f"{l1(first, c.w):.4g}",
                     f"{(l1(first, a.w) / l1(first, c.w) - 1):+.2%}", f"{float((a.ball / first.eps).max()):.4f}",
                     f"{tw / m:.4f}", f"{tc / first.y.shape[0] / (tw / m):.0f}x", str(a.iterations)])
        print("  speed", rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="models,solvers", help="what to run: models, solvers or both")
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--eps", default="0.05,0.1,0.2")
    ap.add_argument("--cvxpy-neurons", type=int, default=4)
    ap.add_argument("--models", default="lenet5,lenet300",
                    help="the first runs before the solver comparisons, the others after")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = fashion_mnist()
    gen = torch.Generator().manual_seed(0)
    calib = data["train_x"][torch.randperm(len(data["train_x"]), generator=gen)[:a.samples]]
    n_test = 1000 if a.quick else len(data["test_x"])
    test = (data["test_x"][:n_test], data["test_y"][:n_test])
    eps_list = [float(e) for e in a.eps.split(",")]
    out = RESULTS / ("net_trim-quick.md" if a.quick else "net_trim.md")
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible (shared), torch "
           f"{torch.__version__}, 1 torch thread; calibration {a.samples} training images; test {n_test} images")
    run_line = f"`python -m benchmarks.net_trim {' '.join(sys.argv[1:])}` — {env}."
    # sections of an earlier run that this one does not redo are kept (`--sections` reruns a part)
    sections: dict[str, str] = {}
    if out.exists():
        for part in out.read_text().split("\n## ")[1:]:
            title, _, body = part.partition("\n\n")
            sections[title] = body.strip()

    def write(title: str, body: str) -> None:
        """Sets one section and writes the results file (atomically), after every section and table row."""
        sections[title] = f"{run_line}\n\n{body}"
        RESULTS.mkdir(parents=True, exist_ok=True)
        text = ("# net_trim on Fashion-MNIST (one-shot)\n\n"
                + "\n\n".join(f"## {k}\n\n{v}" for k, v in sections.items()) + "\n")
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"## {title}\n\n{body}\n", flush=True)

    header = ["model", "method", "ε", "non-zeros per FC layer", "FC non-zeros", "top-1", "drop", "solve s"]
    names = a.models.split(",")
    todo = set(a.sections.split(","))

    def rows_of(title: str) -> Callable[[list[list[str]]], None]:
        return lambda rows: write(title, markdown_table(header, rows))

    for name in names[:1] if "models" in todo else []:
        title = f"{name}: Net-Trim against magnitude pruning"
        table(name, data, calib, test, eps_list, a.samples, rows_of(title))

    if "solvers" in todo:
        solvers(data, calib, a.samples, a.cvxpy_neurons, write)
    for name in names[1:] if "models" in todo else []:
        title = f"{name}: Net-Trim against magnitude pruning"
        table(name, data, calib, test, eps_list, a.samples, rows_of(title))
    print(f"wrote {out}", file=sys.stderr)


def solvers(data: dict[str, torch.Tensor], calib: torch.Tensor, samples: int, neurons: int,
            write: Callable[[str, str], None]) -> None:
    """ADMM against cvxpy on the LeNet-300-100 layers; in-process against a Dask LocalCluster on LeNet-5."""
    mlp = model_of("lenet300", data)
    speed_header = ["layer", "N x M", "samples P", "neurons", "cvxpy s", "ADMM s", "speed-up", "ADMM ‖W‖₁",
                    "cvxpy ‖W‖₁", "ADMM vs cvxpy", "ADMM ball/ε max", "ADMM s/neuron (64-neuron chunk)",
                    "speed-up per neuron (64-neuron chunk)", "ADMM iterations"]
    speed = solver_speed(mlp, calib, 0.05, samples, neurons)
    write("ADMM vs cvxpy (LeNet-300-100, ε = 5%, parallel problems)", markdown_table(speed_header, speed))

    exec_rows = []
    graphs = []
    cnn = model_of("lenet5", data)
    for label, ex in (("in-process (1 thread)", InProcess()), ("Dask LocalCluster, 2 worker processes", Dask(None, 2))):
        with ex:
            t0 = time.perf_counter()
            res = ns.compile(cnn, "policy p {\n  net_trim on type(linear) { epsilon = 5%, chunk = 30 }\n}",
                             example_inputs=(calib[:1],), calibration=calib, executor=ex)
            wall = time.perf_counter() - t0
        graphs.append(res.graph)
        exec_rows.append([label, f"{wall:.1f}", f"{res.report.times['passes']:.1f}"])
        print(exec_rows[-1], file=sys.stderr, flush=True)
    same = all(torch.equal(weights.dense(n.params[k]), weights.dense(graphs[1].node(n.id).params[k]))
               for n in graphs[0].nodes() for k in n.params)
    write("In-process vs Dask LocalCluster (LeNet-5 FC layers, parallel, ε = 5%, 30 neurons per task)",
          markdown_table(["executor", "compile wall s", "net_trim s"], exec_rows)
          + f"\n\nIdentical weights from both executors: {same}.")


def table(name: str, data: dict[str, torch.Tensor], calib: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
          eps_list: list[float], samples: int, done: Callable[[list[list[str]]], None]) -> list[list[str]]:
    """Net-Trim parallel and cascade at every ε, and magnitude pruning (with and without refit) at the same
    per-layer non-zero counts."""
    rows: list[list[str]] = []
    model = model_of(name, data)
    base = accuracy(model, *test)
    total = sum(lin.weight.numel() for lin in linears(model))
    sizes = [lin.weight.numel() for lin in linears(model)]
    rows.append([name, "original", "-", " / ".join(f"{s:,}" for s in sizes), f"{total:,} (100%)", pct(base), "-", "-"])
    for mode in ("parallel", "cascade"):
        for eps in eps_list:
            res, secs = net_trim(model, calib, mode, eps, samples)
            counts = layer_nnz(res)
            nz = sum(counts)
            top = accuracy(res.model, *test)
            per = " / ".join(f"{c:,} ({c / s:.1%})" for c, s in zip(counts, sizes))
            share = f"{nz:,} ({nz / total:.2%})"
            rows.append([name, f"Net-Trim {mode}", f"{eps:.0%}", per, share, pct(top), f"{(base - top) * 100:+.2f}",
                         f"{secs:.0f}"])
            mag = magnitude(model, counts)
            t_mag = accuracy(mag, *test)
            rows.append([name, "magnitude (same per-layer nnz)", f"{eps:.0%} ({mode})", per, share, pct(t_mag),
                         f"{(base - t_mag) * 100:+.2f}", "-"])
            t0 = time.perf_counter()
            t_ref = accuracy(refit(model, mag, calib), *test)
            rows.append([name, "magnitude + LS refit", f"{eps:.0%} ({mode})", per, share, pct(t_ref),
                         f"{(base - t_ref) * 100:+.2f}", f"{time.perf_counter() - t0:.0f}"])
            for r in rows[-3:]:
                print(r, file=sys.stderr, flush=True)
            done(rows)
    return rows


if __name__ == "__main__":
    main()
