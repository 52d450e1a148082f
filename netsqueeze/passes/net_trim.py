"""`net_trim`: layer-wise convex sparsification (Net-Trim), parallel or cascade, solved per neuron by ADMM or cvxpy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from netsqueeze.errors import BudgetError, Diagnostic, NetsqueezeError, SolverError, percent
from netsqueeze.ir import weights
from netsqueeze.ir.graph import Graph, Node, Value
from netsqueeze.ir.ops import attr
from netsqueeze.ir.stats import graph_stats
from netsqueeze.ir.weights import Sparse
from netsqueeze.passes.allocation import Budget, Reached, bisect
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.collectors import Reservoir, conv_patches
from netsqueeze.passes.dependency import ChannelGroup, DependencyAnalysis
from netsqueeze.passes.executor import Executor, Processes
from netsqueeze.passes.net_trim_solvers import Chunk, Settings, Solution, solve, within
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection

# ops that map a zero channel to a zero channel: a neuron whose weights and bias are all zero may be removed
# through them without changing any consumer's input
_ZERO_KEEPING = frozenset({"relu", "relu6", "leaky_relu", "max_pool", "flatten", "reshape", "identity", "dropout",
                           "transpose", "permute"})
_SEARCH_STEPS = 6
_SEARCH_MAX = 0.5  # the largest relative ε the budget/guard search tries


@dataclass
class _Layer:
    node: str
    relu: bool
    weight: torch.Tensor  # [N, M]: the weight as a matrix of inputs × neurons, bias row last
    bias: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    value: Value  # the layer's input


def _rows(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Samples of the layer's input as rows: features for linear, im2col patches for conv."""
    if node.kind == "linear":
        return x.reshape(-1, x.shape[-1]).double()
    return conv_patches(node.attrs, tuple(node.params["weight"].shape[2:]), x.double())


@register_pass
@dataclass(frozen=True)
class NetTrim(TransformPass):
    """Makes the weights of linear and conv layers sparse while their outputs stay within ε of the original's.

    Net-Trim (Aghasi, Abdi, Nguyen & Romberg, NeurIPS 2017, arXiv 1611.05162; journal version arXiv
    1806.06457). For a layer y = relu(Wᵀx) (bias as a row of ones in x) and calibration samples X, it
    solves per output neuron: min ‖u‖₁ s.t. ‖(uᵀX − y)_Ω‖ ≤ ε_m on the samples where the original is
    active (Ω = {y > 1e-6}) and uᵀX ≤ v where it is not; a layer whose output does not go straight into a
    relu is sparse least squares, ‖uᵀX − y‖ ≤ ε_m. Any feasible u keeps ‖relu(uᵀX) − y‖ ≤ ε_m
    (Proposition 1 of the paper, for v = 0).

    - `mode = parallel`: every layer on the signals of the network as it was when the pass started, v = 0,
      ε_m = `epsilon`·‖y_m‖ (so the layer's error is at most `epsilon`·‖Y‖_F); the layers are independent
      tasks. End to end, ‖Ŷ_L − Y_L‖_F ≤ Σ_l ε_l ∏_{k>l} ‖Ŵ_k‖₂ on the calibration samples.
    - `mode = cascade`: layer by layer on the already-pruned network's input X̂, v = Wᵀ X̂, and
      ε_m = `gamma`·‖(w_mᵀX̂ − y_m)_Ω‖ (the original weights stay feasible); a layer whose input has not
      changed (the first) uses `epsilon`·‖y_m‖. `kappa` < 1 replaces `gamma` on the last layer (the
      paper's risk coefficient: a smaller final error, the original weights may be infeasible).
    - ε search: with `epsilon` unset and a flops/params/bytes budget or a guard in the policy, the relative
      ε is found by bisection (6 steps in (0, 0.5], each candidate measured after channel removal): the
      smallest that meets the budget, else the largest that meets the guard (with both, the budget's ε must
      also meet the guard: a larger ε only loses fidelity, a smaller one only loses size); every solve of
      the search starts from the previous one's ADMM state, and the candidate chosen is the one measured.
      Without either, `epsilon` is 5%.

    Convolutions (2-d, groups = 1) go through the same program on im2col patches: each patch is one
    sample of the neuron's input, which keeps one program, one solver and cvxpy as the reference for
    every layer kind (the reference code's operator form with a conjugate-gradient solve trades that for
    memory); `samples` rows are reservoir-sampled per layer (seeded by the compile seed), so memory is
    bounded and the constraints hold on the sampled patches.

    Solvers: `admm` (default; the reference code's three-split ADMM, one Cholesky factor per chunk of
    `chunk` neurons, residual-balanced ρ) or `cvxpy` (the exact program, CLARABEL; small layers). Chunks
    are the tasks of `ctx.executor` (in-process, local processes, Dask); every task runs on one thread, so
    the result is the same whatever runs it. ADMM can stall on a neuron active on a handful of samples: the
    neurons an ADMM solve leaves outside their constraints after `max_iterations` are solved again by cvxpy
    (a note says which). A solve that still ends outside ε by more than 1% is a `SolverError` naming the
    layer, ε and the residuals reached, and the graph is not changed.

    Emission: the weights become `Sparse` encoded weights in `layout` (coo or csr); the bias stays dense.
    With `remove_channels`, a channel that no longer matters is removed through `apply_selection`: one
    whose every consumer's weights on it are zero, or one whose producers' weights and bias are all zero
    and that reaches its consumers through zero-keeping ops only (relu, pooling by max, flatten, ...).
    Needs: calibration data (`ctx.stream`); BatchNorm folded first (`fold_bn`) for conv + BN + relu
    layers, which otherwise are solved as least squares up to the BN.
    """

    name: ClassVar[str] = "net_trim"
    epsilon: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    mode: Literal["parallel", "cascade"] = "parallel"
    gamma: float = field(default=1.1, metadata={"min": 1.0})
    kappa: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    solver: Literal["admm", "cvxpy"] = "admm"
    samples: int = field(default=4096, metadata={"min": 1, "unit": "count"})
    chunk: int = field(default=64, metadata={"min": 1, "unit": "count"})
    max_iterations: int = field(default=5000, metadata={"min": 1})
    tolerance: float = field(default=1e-4, metadata={"min": 0.0, "min_exclusive": True})
    layout: Literal["coo", "csr"] = "csr"
    remove_channels: bool = True

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        """`kappa` and `gamma` written with parallel mode (the default), for the policy checker: at the option."""
        if cls.with_defaults(given)["mode"] != "parallel":
            return []
        return [(k, f"option '{k}' applies to mode = cascade only (parallel mode solves every layer at epsilon)")
                for k in ("kappa", "gamma") if k in given]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "parallel" and (self.kappa is not None or self.gamma != 1.1):
            name = "kappa" if self.kappa is not None else "gamma"
            raise NetsqueezeError(Diagnostic(f"option '{name}' of pass 'net_trim' applies to mode = cascade only "
                                             "(parallel mode solves every layer at epsilon)"))

    # ---- entry ----
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers, notes = self._layers(graph, ctx)
        if not layers:
            return PassResult(changed=False, notes=notes or ["no linear or conv layer selected"])
        executor = ctx.executor if ctx.executor is not None else Processes()
        own = ctx.executor is None
        try:
            start = graph.copy()
            budget = Budget.of(ctx)
            if self.epsilon is None and (budget or "nonzeros" in ctx.budget or ctx.guard is not None):
                gain = self._search(start, graph, layers, ctx, executor, budget)
                notes.append(f"ε search: epsilon = {gain:.2%}")
            else:
                gain = 0.05 if self.epsilon is None else self.epsilon
                sols = self._trim(start, graph, layers, ctx, executor, gain, {})
                notes += [f"{s.layer} neurons {s.neurons[0]}..{s.neurons[1] - 1}: {s.message}" for s in sols
                          if s.message]
        finally:
            if own:
                executor.close()
        result = self._finish(graph, ctx, layers)
        result.notes[:0] = notes
        result.metrics["epsilon"] = gain
        return result

    def _layers(self, graph: Graph, ctx: PassContext) -> tuple[list[_Layer], list[str]]:
        layers, notes = [], []
        for node in graph.nodes():
            if node.kind not in ("linear", "conv") or not ctx.is_selected(node.id):
                continue
            if node.kind == "conv" and (node.params["weight"].dim() != 4 or attr(node, "groups") != 1):
                notes.append(f"{node.id}: skipped (net_trim handles 2-d convs with groups = 1)")
                continue
            w = node.dense("weight")
            b = node.dense("bias") if "bias" in node.params else None
            mat = w.detach().double().flatten(1).T
            if b is not None:
                mat = torch.cat([mat, b.detach().double()[None]])
            users = graph.value_users((node.id, 0))
            relu = len(users) == 1 and graph.node(users[0][0]).kind == "relu"
            layers.append(_Layer(node.id, relu, mat, b is not None, tuple(w.shape), w.dtype,
                                 graph.operands(node.id)[0]))
        return layers, notes

    # ---- one full trim at relative ε `gain` ----
    def _trim(self, start: Graph, graph: Graph, layers: list[_Layer], ctx: PassContext, executor: Executor,
              gain: float, warm: dict[tuple[str, int], tuple[torch.Tensor, ...]]) -> list[Solution]:
        """Solves every layer at relative ε `gain` and writes the weights into `graph` (signals of `start`,
        the graph before the pass); `warm` holds and receives the ADMM states per (layer, chunk)."""
        settings = Settings(self.solver, max_iterations=self.max_iterations, tolerance=self.tolerance)
        solutions: list[Solution] = []
        if self.mode == "parallel":
            xs = self._samples(start, None, layers, ctx)
            chunks = [c for i, lay in enumerate(layers)
                      for c in self._chunks(lay, xs[i][0], None, gain, False, warm)]
            sols = self._solve(chunks, settings, executor, ctx)
            solutions += sols
            for lay in layers:
                self._write(graph, lay, [s for s in sols if s.layer == lay.node])
        else:
            for i, lay in enumerate(layers):
                (x, xhat), = self._samples(start, graph, [lay], ctx)
                chunks = self._chunks(lay, x, xhat, gain, i == len(layers) - 1, warm)
                sols = self._solve(chunks, settings, executor, ctx)
                solutions += sols
                self._write(graph, lay, sols)
        for s in solutions:
            if s.warm is not None:
                warm[(s.layer, s.neurons[0])] = s.warm
        return solutions

    def _samples(self, start: Graph, pruned: Graph | None, layers: list[_Layer],
                 ctx: PassContext) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer, reservoir-sampled input rows [N, P] (bias row appended) of `start` and, with `pruned`,
        the same samples through the pruned graph (one pass over the calibration data, both graphs side
        by side; one reservoir over both, so the rows pair up)."""
        values = sorted({lay.value for lay in layers})
        slot = {v: i for i, v in enumerate(values)}
        res = [Reservoir(self.samples, ctx.seed + i) for i in range(len(layers))]
        streams = [ctx.stream(start, values)]
        if pruned is not None:
            streams.append(ctx.stream(pruned, values))
        for batches in zip(*streams):
            for lay, r in zip(layers, res):
                node = start.node(lay.node)
                r.update(torch.cat([_rows(node, b[slot[lay.value]]) for b in batches], 1))
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for lay, r in zip(layers, res):
            sample = r.sample()
            n = sample.shape[1] // len(streams)
            if sample.shape[0] < 2:  # one row: the free bias alone meets any ε and every weight goes to zero
                raise NetsqueezeError(Diagnostic(
                    f"net_trim: {sample.shape[0]} calibration row reached layer '{lay.node}' (one sample of a linear layer's "
                    "input); the ε constraint needs at least 2 rows to say anything about its weights: give more "
                    "calibration samples", node=lay.node))
            parts = [sample[:, k * n:(k + 1) * n].T for k in range(len(streams))]
            if lay.bias:
                parts = [torch.cat([p, torch.ones(1, p.shape[1], dtype=torch.float64)]) for p in parts]
            out.append((parts[0], parts[1] if pruned is not None else None))
        return out

    def _chunks(self, lay: _Layer, x: torch.Tensor, xhat: torch.Tensor | None, gain: float, last: bool,
                warm: dict[tuple[str, int], tuple[torch.Tensor, ...]]) -> list[Chunk]:
        pre = lay.weight.T @ x
        y = pre.clamp_min(0.0) if lay.relu else pre
        if xhat is None or torch.equal(xhat, x):  # parallel, or the cascade's first layer
            inp = x if xhat is None else xhat
            eps = gain * torch.linalg.vector_norm(y, dim=1)
            v = torch.zeros_like(y) if lay.relu else None
        else:
            inp = xhat
            pre_hat = lay.weight.T @ xhat
            on = y > 1e-6 if lay.relu else torch.ones_like(y, dtype=torch.bool)
            err = torch.linalg.vector_norm(torch.where(on, pre_hat - y, 0.0), dim=1)
            eps = (self.kappa if last and self.kappa is not None else self.gamma) * err
            v = pre_hat if lay.relu else None
        m = y.shape[0]
        out = []
        for a in range(0, m, self.chunk):
            b = min(m, a + self.chunk)
            out.append(Chunk(lay.node, (a, b), inp, y[a:b], None if v is None else v[a:b], eps[a:b], lay.bias,
                             warm.get((lay.node, a)) if self.solver == "admm" else None))
        return out

    def _solve(self, chunks: list[Chunk], settings: Settings, executor: Executor, ctx: PassContext) -> list[Solution]:
        bar = ctx.progress("net_trim", len(chunks), "task")
        try:
            sols = executor.map(_Task(settings), chunks, lambda done, total: bar.update(1))
        finally:
            bar.close()
        for c, s in zip(chunks, sols):
            self._check(c, s, settings)
            if s.message:
                ctx.log(f"net_trim: {c.layer} neurons {c.neurons[0]}..{c.neurons[1] - 1}: {s.message}")
        ctx.log(f"net_trim: {len(chunks)} tasks on {executor.name}")
        return sols

    @staticmethod
    def _check(c: Chunk, s: Solution, settings: Settings) -> None:
        if s.converged and within(c, s.ball, s.excess, settings):
            return
        scale = torch.linalg.vector_norm(c.y, dim=1)
        slack = settings.feasibility * c.eps + 10 * settings.tolerance * scale + 1e-12
        over = (s.ball - c.eps - slack).clamp_min(0.0) + (s.excess - slack).clamp_min(0.0)
        j = int(over.argmax()) if bool((over > 0).any()) else 0
        what = ("did not converge" + (f" ({s.message})" if s.message else "")) if not s.converged \
            else "ended outside its constraints"
        raise SolverError(Diagnostic(
            f"net_trim: the {settings.solver} solve of neurons {c.neurons[0]}..{c.neurons[1] - 1} {what} after "
            f"{s.iterations} iterations: neuron {c.neurons[0] + j} has ε = {float(c.eps[j]):.4g}, reached "
            f"‖(wᵀX − y)_Ω‖ = {float(s.ball[j]):.4g} and half-space excess {float(s.excess[j]):.4g}; residuals "
            f"primal {s.primal:.3g}, dual {s.dual:.3g} (raise max_iterations, or epsilon/kappa if infeasible)",
            node=c.layer))

    def _write(self, graph: Graph, lay: _Layer, sols: list[Solution]) -> None:
        w = torch.cat([s.w for s in sorted(sols, key=lambda s: s.neurons[0])], 1)  # [N, M]
        lay_w = w[:-1] if lay.bias else w
        node = graph.node(lay.node)
        dense = lay_w.T.reshape(lay.shape).to(lay.dtype)
        node.params["weight"] = Sparse.from_dense(dense, self.layout)
        if lay.bias:
            node.params["bias"] = w[-1].to(lay.dtype).clone()

    # ---- the ε search ----
    def _search(self, start: Graph, graph: Graph, layers: list[_Layer], ctx: PassContext, executor: Executor,
                budget: Budget) -> float:
        """The relative ε the policy's budget and guard ask for (see the class docstring); leaves the graph
        of that ε (before channel removal) in `graph`."""
        warm: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        base = graph_stats(ctx.original or start)
        nz_limit = ctx.budget.get("nonzeros")  # non-zero weights: a budget only sparsity passes meet
        nz_ratio: dict[float, float] = {}
        seen: dict[float, tuple[bool, bool, Reached, float | None]] = {}
        solved: dict[float, Graph] = {}

        def at(gain: float) -> tuple[bool, bool, Reached, float | None]:
            if gain not in seen:
                g = start.copy()
                self._trim(start, g, layers, ctx, executor, gain, warm)
                solved[gain] = g
                if self.remove_channels:
                    g = g.copy()
                    self._remove(g, ctx)
                st = graph_stats(g)
                reached = (st.flops / max(1, base.flops), st.params / max(1, base.params),
                           st.param_bytes / max(1, base.param_bytes))
                check = ctx.guard_check(g)
                nz_ratio[gain] = st.nonzeros / max(1, base.nonzeros)
                meets = budget.meets(reached) and (nz_limit is None or nz_ratio[gain] <= nz_limit + 1e-12)
                seen[gain] = (meets, check is None or check[0], reached, None if check is None else check[1])
            return seen[gain]

        gain = _SEARCH_MAX
        if budget or nz_limit is not None:
            if not at(_SEARCH_MAX)[0]:
                if budget and not budget.meets(at(_SEARCH_MAX)[2]):
                    raise budget.unreachable("net_trim", f"epsilon = {_SEARCH_MAX:.0%}", at(_SEARCH_MAX)[2],
                                             layers[0].node)
                raise BudgetError(Diagnostic(
                    f"net_trim cannot meet the budget nonzeros <= {nz_limit:.1%}: epsilon = {_SEARCH_MAX:.0%} "
                    f"keeps {nz_ratio[_SEARCH_MAX]:.1%} of the original non-zero weights", node=layers[0].node))
            gain = bisect(_SEARCH_MAX, 0.0, lambda t: at(t)[0], _SEARCH_STEPS)
        if ctx.guard is not None and not at(gain)[1]:
            metric, limit = ctx.guard
            if budget or nz_limit is not None:
                shown = ", ".join(x for x in (str(budget), "" if nz_limit is None else f"nonzeros <= {nz_limit:.1%}")
                                  if x)
                raise BudgetError(Diagnostic(
                    f"net_trim cannot meet guard {metric} <= {percent(limit)} within the budget {shown}: the smallest "
                    f"epsilon that meets the budget ({gain:.2%}) reaches {_fmt(at(gain)[3])}", node=layers[0].node))
            gain = bisect(0.0, gain, lambda t: at(t)[1], _SEARCH_STEPS)
            if not at(gain)[1]:
                raise BudgetError(Diagnostic(
                    f"net_trim cannot meet guard {metric} <= {percent(limit)}: epsilon = {gain:.2%} reaches "
                    f"{_fmt(at(gain)[3])}", node=layers[0].node))
        graph.assign(solved[gain])
        return gain

    # ---- emission ----
    def _finish(self, graph: Graph, ctx: PassContext, layers: list[_Layer]) -> PassResult:
        result = PassResult(changed=True, touched={lay.node for lay in layers})
        before = {lay.node: lay.weight.shape[1] * (lay.weight.shape[0] - int(lay.bias)) for lay in layers}
        removed = self._remove(graph, ctx) if self.remove_channels else 0
        for lay in layers:  # counted on what is emitted: after the all-zero channels are removed
            nz = weights.nnz(graph.node(lay.node).params["weight"]) if lay.node in graph else 0
            result.metrics[f"nonzeros:{lay.node}"] = float(nz)
            result.notes.append(f"{lay.node}: {nz:,}/{before[lay.node]:,} weights non-zero "
                                f"({nz / max(1, before[lay.node]):.1%})")
        if self.remove_channels:
            result.metrics["channels_removed"] = float(removed)
            if removed:
                result.notes.append(f"{removed} channels removed (all-zero weights)")
        total = sum(result.metrics[f"nonzeros:{lay.node}"] for lay in layers)
        result.metrics["nonzeros"] = total
        result.metrics["density"] = total / max(1, sum(before.values()))
        return result

    def _remove(self, graph: Graph, ctx: PassContext) -> int:
        """Removes channels no consumer reads (zero columns everywhere) or that carry only zeros."""
        groups = DependencyAnalysis().compute(graph, ctx).restrict(ctx.selected)
        sel: dict[int, ChannelSelection] = {}
        for g in groups.prunable():
            dead = [c for c in range(g.size) if _unread(graph, g, c) or _zero(graph, g, c)]
            if dead and len(dead) < g.size:
                sel[g.id] = ChannelSelection(keep=[c for c in range(g.size) if c not in set(dead)])
        if not sel:
            return 0
        apply_selection(graph, groups, sel)
        return sum(groups[gid].size - len(s.keep) for gid, s in sel.items())


def _slice(graph: Graph, node: str, param: str | None, axis: int, pos: tuple[int, ...]) -> torch.Tensor:
    return weights.dense(graph.node(node).params[param or ""]).movedim(axis, 0)[list(pos)]


def _unread(graph: Graph, g: ChannelGroup, c: int) -> bool:
    cons = g.members_of("consumer")
    return bool(cons) and all(bool((_slice(graph, m.node, m.param, m.axis, m.index[c]) == 0).all()) for m in cons)


def _zero(graph: Graph, g: ChannelGroup, c: int) -> bool:
    """Channel c is zero wherever it is read: its producers' weights and biases are zero, and it reaches
    the consumers only through ops that keep a zero channel zero."""
    for m in g.members:
        node = graph.node(m.node)
        if m.role == "producer":
            if not bool((_slice(graph, m.node, m.param, m.axis, m.index[c]) == 0).all()):
                return False
            if "bias" in node.params and bool((weights.dense(node.params["bias"])[list(m.index[c])] != 0).any()):
                return False
        elif m.role in ("value", "param") and node.kind not in _ZERO_KEEPING and m.node not in g.producers:
            return False
    return bool(g.members_of("producer"))


def _fmt(value: float | None) -> str:
    return "an unmeasured value" if value is None else percent(value)


@dataclass(frozen=True)
class _Task:
    """The picklable function an executor maps over chunks."""

    settings: Settings

    def __call__(self, chunk: Chunk) -> Solution:
        return solve(chunk, self.settings)

