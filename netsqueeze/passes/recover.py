"""`recover`: label-free recovery of a compressed graph by distillation from the original model on the
calibration data, every compression decision (structure, sparsity pattern, codebooks, quantization grids) fixed."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from netsqueeze.errors import Diagnostic, InputMismatchError, NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.weights import Affine, Centroids, Codebook, Sparse, Weight
from netsqueeze.passes.base import NoBar, PassContext, PassResult, Trainable, TransformPass
from netsqueeze.passes.registry import register_pass

Key = tuple[str, str]  # (node id, param name)


# ---- trainable forms: each keeps its weight's encoding fixed and trains only what the encoding lets move -----
class _Form(ABC):
    """A weight being trained: `leaves` take the gradients, `dense()` is the weight they give (differentiable),
    `encode()` the weight written back, in the form it came in."""

    leaves: list[torch.Tensor]

    @abstractmethod
    def dense(self) -> torch.Tensor:
        """The weight the leaves give, differentiable."""

    @abstractmethod
    def encode(self, memo: dict[int, Centroids]) -> Weight:
        """The weight to write back; `memo` holds the tables already written in this write (shared ones once)."""


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().to(torch.float32).requires_grad_(True)


class _Dense(_Form):
    """A dense weight. In a weight of rank ≥ 2 (a kernel or a matrix) an exact zero is taken as pruned and stays
    zero (Net-Trim and other passes prune in place); biases and norm params train freely."""

    def __init__(self, w: torch.Tensor) -> None:
        self.dtype = w.dtype
        self.leaves = [_leaf(w)]
        self.mask = (w != 0).to(torch.float32) if w.dim() >= 2 and bool((w == 0).any()) else None

    def dense(self) -> torch.Tensor:
        return self.leaves[0] if self.mask is None else self.leaves[0] * self.mask

    def encode(self, memo: dict[int, Centroids]) -> Weight:
        return self.dense().detach().to(self.dtype).clone()


class _Sparse(_Form):
    """A sparse weight: only its stored values train; the positions (the pruning pattern) stay as they are."""

    def __init__(self, w: Sparse) -> None:
        self.w = w
        self.leaves = [_leaf(w.values)]
        self.flat = torch.zeros(math.prod(w.shape))

    def dense(self) -> torch.Tensor:
        return self.flat.index_put((self.w.indices,), self.leaves[0]).reshape(self.w.shape)

    def encode(self, memo: dict[int, Centroids]) -> Weight:
        w = self.w
        return Sparse(self.leaves[0].detach().to(w.values.dtype).clone(), w.indices.clone(), w.shape, w.layout, w.n, w.m)


class _Table:
    """One centroid table, trained once however many weights share it. A centroid that is exactly zero holds
    pruned weights and stays zero."""

    def __init__(self, c: Centroids) -> None:
        self.c = c
        self.leaf = _leaf(c.values)
        self.keep = (c.values != 0).to(torch.float32)

    def values(self) -> torch.Tensor:
        return self.leaf * self.keep

    def encoded(self, memo: dict[int, Centroids]) -> Centroids:
        if id(self) not in memo:  # one new object for every weight that shared the old one
            memo[id(self)] = Centroids(self.values().detach().to(self.c.values.dtype).clone(), self.c.name)
        return memo[id(self)]


class _Codebook(_Form):
    """A shared-weight codebook: indices fixed (no cluster is split or merged), centroids train. A centroid's
    gradient is the sum of its members' gradients, as CWS retrains (Marinò et al., ICPR 2020)."""

    def __init__(self, w: Codebook, table: _Table) -> None:
        self.w, self.table = w, table
        self.idx = w.indices.to(torch.int64)
        self.leaves = [table.leaf]

    def dense(self) -> torch.Tensor:
        return self.table.values()[self.idx]

    def encode(self, memo: dict[int, Centroids]) -> Weight:
        return Codebook(self.w.indices.clone(), self.table.encoded(memo), self.w.huffman)


class _Affine(_Form):
    """An affine-quantized weight: a float shadow trains through a straight-through estimator and is read
    back on the weight's own grid (same scale, zero point, bits); the integers change, the grid does not.
    In a weight of rank ≥ 2 an integer at the zero point (a zero) stays there, as a pruned weight must."""

    def __init__(self, w: Affine) -> None:
        self.w = w
        # the scale and zero point at every position, laid out by the form's own decoder: (1 - 0)·s and (0 - z)·1
        ones, zeros = torch.ones(w.shape, dtype=w.q.dtype), torch.zeros(w.shape, dtype=w.q.dtype)
        self.scale = Affine(ones, w.scale, None, w.axis, w.block_size, w.bits, w.signed).dense()
        self.zp = torch.zeros(()) if w.zero_point is None else -Affine(
            zeros, torch.ones_like(w.scale), w.zero_point, w.axis, w.block_size, w.bits, w.signed).dense()
        half: int = 2 ** (w.bits - 1)
        self.lo, self.hi = (-half, half - 1) if w.signed else (0, 2 * half - 1)  # the integer type's range
        q = w.q.to(torch.float32)
        self.mask = (q != self.zp).to(torch.float32) if len(w.shape) >= 2 and bool((q == self.zp).any()) else None
        self.leaves = [_leaf(w.dense())]

    def _q(self) -> torch.Tensor:
        q = torch.clamp(torch.round(self.leaves[0].detach() / self.scale) + self.zp, self.lo, self.hi)
        return q if self.mask is None else torch.where(self.mask > 0, q, self.zp.expand_as(q))

    def dense(self) -> torch.Tensor:
        shadow = self.leaves[0]
        on_grid = (self._q() - self.zp) * self.scale
        return shadow + (on_grid - shadow).detach()  # the grid value forward, the identity backward

    def encode(self, memo: dict[int, Centroids]) -> Weight:
        w = self.w
        return Affine(self._q().to(w.q.dtype), w.scale.clone(), None if w.zero_point is None else w.zero_point.clone(),
                      w.axis, w.block_size, w.bits, w.signed, w.dtype)


def _forms(graph: Graph, keys: list[Key]) -> dict[Key, _Form]:
    tables: dict[int, _Table] = {}
    out: dict[Key, _Form] = {}
    for nid, name in keys:
        w = graph.node(nid).params[name]
        if isinstance(w, torch.Tensor):
            out[(nid, name)] = _Dense(w)
        elif isinstance(w, Sparse):
            out[(nid, name)] = _Sparse(w)
        elif isinstance(w, Codebook):
            table = tables.setdefault(id(w.centroids), _Table(w.centroids))
            out[(nid, name)] = _Codebook(w, table)
        elif isinstance(w, Affine):
            out[(nid, name)] = _Affine(w)
        else:
            raise NetsqueezeError(Diagnostic(f"param '{name}' of node '{nid}' is stored as {w.describe()}, "
                                             "a form recover cannot train", node=nid))
    return out


def _leaves(forms: dict[Key, _Form]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for f in forms.values():
        for t in f.leaves:
            seen.setdefault(id(t), t)
    return list(seen.values())


def _write(graph: Graph, forms: dict[Key, _Form]) -> None:
    memo: dict[int, Centroids] = {}
    for (nid, name), f in forms.items():
        graph.node(nid).params[name] = f.encode(memo)


def _no_gradient(graph: Graph) -> NetsqueezeError:
    """The error for a graph whose outputs no selected trainable parameter reaches with a gradient."""
    quant = next((n.id for n in graph.nodes() if n.kind in ("quantize", "dequantize")), None)
    why = (f"quantized activations (from '{quant}' on) stop the gradient: run recover before quantize" if quant
           else "the ops between them and the outputs have no gradient")
    return NetsqueezeError(Diagnostic(f"recover: the outputs do not depend differentiably on any trainable param "
                                      f"of the selected nodes; {why}", node=quant))


@register_pass
@dataclass(frozen=True)
class Recover(TransformPass):
    """Recovers what compression lost by distillation from the original model (`ctx.original`) on the
    calibration inputs, with every compression decision kept (knowledge distillation: Hinton, Vinyals & Dean,
    2015; retraining shared weights: Han, Mao & Dally, ICLR 2016, and CWS in Marinò et al., ICPR 2020).

    Needs: calibration data (`ctx.stream`) and the torch backend's differentiable run (`ctx.trainable`), both
    installed by `compile()`; the graph must have the original's inputs and outputs. Trains the params of the
    selected nodes (every node without `on`) for `steps` Adam steps of one calibration batch each, the learning
    rate decaying from `lr` to 0 on a cosine; batches come in calibration order, cycling through the data
    (`steps` × batch size / samples = epochs of calibration data). No random choice is made: the same inputs
    give the same bytes.

    Loss: the distance from the original's outputs on the same batch — `mse`: Σ over outputs of
    ‖y' − y‖² / ‖y‖² (relative, so outputs of any scale weigh alike); `kl`: KL(softmax(y) ‖ softmax(y')) over
    the last axis (logits). With a labelled calibration file (an .npz with an array named `labels`, one class
    index per sample) `label_weight` × cross-entropy of the first output (logits [N, classes]) is added.

    What stays fixed, by form: removed channels (shapes never change); `Sparse` weights keep their positions,
    only the stored values train; `Codebook` weights keep their indices and train the centroids, a centroid's
    gradient being the sum over its cluster, and a `Centroids` table shared by several weights is one tensor
    that moves once; `Affine` weights train a float shadow through a straight-through estimator and are
    written back as integers on their own grid (scale, zero point and bits unchanged). Zeros stay zero: an
    exact zero in a dense weight of rank ≥ 2, an integer at the zero point in a quantized one, and a zero
    centroid all mean "pruned". Biases, norm params and running statistics: biases and norm weights train,
    batch norms keep their running statistics (the graph runs in inference mode).

    Guard: when the policy has a `guard` the compiler can measure, it is measured before training and every
    `check_every` steps (0: after every pass over the calibration data); recovery stops as soon as the guard
    is met, and the weights written back are those of the best measurement (never worse than before).
    Without one, the pass's own loss over one pass of the calibration data is measured before and after
    training (two inference passes of both models); when training did not lower it — a learning rate too
    high for a model a refit already brought close to the original — the graph is left as it was and the
    note says so. (On the benchmark ResNet with a quarter of its penultimate features kept by
    `select_features`, 20 steps at lr 1e-3 raised the KL divergence from 0.051 to 0.69 and lowered top-1
    from 88.79% to 71.94%.)
    `progress` shows the compile's progress bar (`compile(progress=)`: by default on a terminal only;
    `--quiet` turns it off).
    """

    name: ClassVar[str] = "recover"
    preserves: ClassVar[frozenset[str] | None] = frozenset({"shape_inference", "dependency"})
    steps: int = field(default=100, metadata={"min": 1, "unit": "count",
                                              "doc": "optimizer steps, one calibration batch each"})
    lr: float = field(default=1e-3, metadata={"min": 0.0, "min_exclusive": True, "doc": "Adam learning rate"})
    loss: Literal["mse", "kl"] = "mse"
    label_weight: float = field(default=1.0, metadata={"min": 0.0,
                                                       "doc": "weight of the task loss with labelled data"})
    check_every: int = field(default=0, metadata={"min": 0, "unit": "count",
                                                  "doc": "steps between guard checks (0: once per data pass)"})
    progress: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        teacher = ctx.original
        if teacher is None:
            raise NetsqueezeError(Diagnostic("recover distils from the original model: run it through compile()"))
        if list(graph.inputs) != list(teacher.inputs) or len(graph.outputs) != len(teacher.outputs):
            raise NetsqueezeError(Diagnostic(
                "the graph's inputs/outputs differ from the original's "
                f"({', '.join(graph.inputs)} → {len(graph.outputs)} outputs vs {', '.join(teacher.inputs)} → "
                f"{len(teacher.outputs)})"))
        fn = ctx.trainable(graph)
        keys = [(n.id, k) for n in graph.nodes() if ctx.is_selected(n.id) for k in n.params
                if (n.id, k) in fn.addressable()]
        if not keys:
            return PassResult(changed=False, notes=["no trainable param in the selected nodes"])
        forms = _forms(graph, keys)
        leaves = _leaves(forms)
        opt = torch.optim.Adam(leaves, lr=self.lr)

        guard = ctx.guard is not None
        best: tuple[float, list[torch.Tensor]] | None = None
        start = ctx.guard_check(graph) if guard else None
        if start is not None:
            best = (start[1], [t.detach().clone() for t in leaves])
        # without a guard to measure, the pass's own loss over the calibration data decides (`_data_loss`)
        before = self._data_loss(fn, forms, ctx, teacher) if start is None else None
        result = PassResult(changed=True, touched={nid for nid, _ in keys})
        losses: list[float] = []
        per_pass = 0
        stopped = ""
        bar = ctx.progress("recover", self.steps, "step") if self.progress else NoBar()
        try:
            with torch.enable_grad():
                for step, (xs, ys, labels, last_of_pass) in enumerate(self._batches(ctx, teacher), 1):
                    for g in opt.param_groups:
                        g["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / self.steps))
                    outs = fn({k: f.dense() for k, f in forms.items()}, xs)
                    loss = self._loss(outs, ys, labels)
                    if not loss.requires_grad:
                        raise _no_gradient(graph)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                    per_pass = per_pass or (step if last_of_pass else 0)
                    due = (step % self.check_every == 0) if self.check_every else last_of_pass
                    if best is not None and (due or step == self.steps):
                        cand = graph.copy()
                        _write(cand, forms)
                        check = ctx.guard_check(cand)
                        if check is not None and check[1] < best[0]:
                            best = (check[1], [t.detach().clone() for t in leaves])
                        if check is not None and check[0]:
                            stopped = f"guard met after {step} steps ({check[1]:.4g})"
                            break
                    if step == self.steps:
                        break
        finally:
            bar.close()
        if best is not None:
            with torch.no_grad():
                for t, v in zip(leaves, best[1]):
                    t.copy_(v)
            result.metrics["guard"] = best[0]
        kept, n_nodes = "", len(result.touched)
        if before is not None:
            after = self._data_loss(fn, forms, ctx, teacher)
            result.metrics.update({"data_loss_before": before, "data_loss_after": after})
            if not after < before:  # the graph is left as it was (the forms train copies)
                kept = (f"; training did not lower the loss over the calibration data ({before:.4g} → {after:.4g}): "
                        "the weights before it are kept" + (" (try a lower `lr`)" if after > before else
                                                            " (nothing to recover: the model matches the original)"
                                                            if before == 0 else ""))
                result.changed, result.touched = False, set()
            else:
                kept = f"; loss over the calibration data {before:.4g} → {after:.4g}"
        if result.changed:
            _write(graph, forms)
        result.metrics.update({"steps": float(len(losses)), "loss_first": losses[0], "loss_last": losses[-1]})
        result.notes.append(
            f"{len(losses)} steps on {len(forms)} params of {n_nodes} nodes, loss "
            f"{losses[0]:.4g} → {losses[-1]:.4g}" + (f" (mean of the last pass over the data: "
                                                      f"{sum(losses[-per_pass:]) / per_pass:.4g})" if per_pass else "")
            + (f"; {stopped}" if stopped else "") + kept
            + (f"; guard {start[1]:.4g} → {best[0]:.4g}" if start is not None and best is not None else ""))
        return result

    def _data_loss(self, fn: Trainable, forms: dict[Key, _Form], ctx: PassContext, teacher: Graph) -> float:
        """The loss (`_loss`) over one pass of the calibration data, sample-weighted, without gradients."""
        total, count = 0.0, 0
        with torch.no_grad():
            for xs, ys, labels, last in self._batches(ctx, teacher):
                n = int(xs[0].shape[0]) if xs and xs[0].dim() else 1
                total += float(self._loss(fn({k: f.dense() for k, f in forms.items()}, xs), ys, labels)) * n
                count += n
                if last:
                    break
        return total / max(count, 1)

    def _batches(self, ctx: PassContext, teacher: Graph) -> Iterator[
            tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, bool]]:
        """(inputs, the original's outputs, labels or None, last batch of a pass) per calibration batch,
        cycling through the data for as long as the caller takes them."""
        values = [(nid, 0) for nid in teacher.inputs] + teacher.output_values()
        n_in = len(teacher.inputs)
        while True:
            labels = ctx.labels()
            stream = ctx.stream(teacher, values)
            item = next(stream, None)
            if item is None:
                raise InputMismatchError("the calibration data is empty")
            while item is not None:
                nxt = next(stream, None)
                y = None if labels is None else next(labels, None)
                if labels is not None and y is None:
                    raise InputMismatchError("the calibration labels end before the inputs")
                yield item[:n_in], item[n_in:], y, nxt is None
                item = nxt

    def _loss(self, outs: list[torch.Tensor], ys: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        total = outs[0].new_zeros(())
        for s, t in zip(outs, ys):
            if not (s.is_floating_point() and t.is_floating_point()):
                continue
            if self.loss == "kl" and s.dim() >= 2:
                total = total + F.kl_div(F.log_softmax(s.float(), -1).reshape(-1, s.shape[-1]),
                                         F.log_softmax(t.float(), -1).reshape(-1, t.shape[-1]),
                                         reduction="batchmean", log_target=True)
            else:
                total = total + ((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
        if labels is not None and self.label_weight > 0:
            total = total + self.label_weight * self._task(outs[0], labels)
        return total

    @staticmethod
    def _task(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise InputMismatchError(f"calibration labels need the first output to be logits [N, classes]; "
                                     f"it has shape {list(logits.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
            raise InputMismatchError(f"calibration labels must be one class index per sample (integers of "
                                     f"shape [N]); got {str(labels.dtype).removeprefix('torch.')} "
                                     f"of shape {list(labels.shape)}")
        if labels.shape[0] != logits.shape[0]:
            raise InputMismatchError(f"a calibration batch has {logits.shape[0]} samples but "
                                     f"{labels.shape[0]} labels")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= logits.shape[1]:
            raise InputMismatchError(f"calibration label {lo if lo < 0 else hi} is out of range for "
                                     f"{logits.shape[1]} classes")
        return F.cross_entropy(logits.float(), labels.to(torch.int64))
