"""`reestimate_bn`: BatchNorm running statistics re-estimated on the calibration data after a structural pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError
from netsqueeze.ir.graph import Graph, Node, Value
from netsqueeze.passes.base import GIVE_CALIBRATION, PassContext, PassResult, TransformPass, class_scores
from netsqueeze.passes.collectors import Moments, channel_rows
from netsqueeze.passes.frontier import Liveness, bytes_per_sample
from netsqueeze.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class ReestimateBN(TransformPass):
    """Sets every selected BatchNorm's running mean and variance to the statistics of its input over the
    calibration data, as the graph now computes it (adaptive BatchNorm: Li et al., "EagleEye", ECCV 2020).

    After `trim` or `squeeze_fold` with the BatchNorms in place (before `fold_bn`), a BatchNorm still holds the
    original model's statistics while its input has changed: a fold's least-squares reconstruction has less
    variance than what it rebuilds, a trimmed or refit channel a shifted mean. The BatchNorms are re-estimated
    one after another in graph order, each on the graph with the earlier ones already re-estimated (the
    statistics it will see at inference), in one layer-by-layer pass over the calibration data: per channel,
    the mean and the population variance over the batch and every other axis, in float64.

    Re-estimation does not always help. On the benchmark ResNet-style model (Fashion-MNIST, `round_to = 8`,
    one-shot; `benchmarks/results/squeeze.md`) it raised top-1 after `squeeze_fold` from 86.55% to 87.70% at 2x
    fewer FLOPs and from 70.77% to 79.90% at 3x; at 5x it would have raised the share of calibration images whose
    predicted class differs from the original model's from 66.7% to 73.6%, and on the VGG-style model it raised
    that share in five of six rows (3.71% → 4.49% at 5x fewer FLOPs). In a scratch run that kept every
    re-estimation (`keep = always`) top-1 moved with that share each time (ResNet 5x 34.13% → 27.58%, VGG 5x
    90.99% → 90.68%), while the relative L2 error of the logits rose at ResNet 2x, where top-1 improved.
    So `keep = better` (default) measures `metric` against the original before and after and keeps the new
    statistics only when it fell (a tie keeps the old ones) and a guard that held still holds; `always` keeps
    them unmeasured. `metric = top1_change` (default): that share, for models whose outputs are class scores
    (argmax over the last axis of [batch, classes] or [batch, tokens, vocabulary] outputs: use `output_error`
    for a rank-2 or rank-3 output that is not class scores); a model without such an output is judged by
    `output_error` (the relative L2 error of the outputs). The two measurements run over the leading
    calibration batches that keep them within one model pass together (all of them, two passes, with a single
    batch). Needs calibration data. Guarantees: shapes, params and FLOPs do not change; with
    `keep = better` the measured metric never rises.
    """

    name: ClassVar[str] = "reestimate_bn"
    preserves: ClassVar[frozenset[str] | None] = frozenset({"shape_inference", "dependency"})
    keep: Literal["better", "always"] = "better"
    metric: Literal["top1_change", "output_error"] = "top1_change"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bns = [n for n in graph.by_kind("batch_norm") if ctx.is_selected(n.id)]
        if not bns:
            return PassResult(notes=["no BatchNorm selected: nothing to re-estimate"])
        if ctx.batches_fn is None:
            raise NetsqueezeError(Diagnostic(f"reestimate_bn needs calibration data: {GIVE_CALIBRATION}"))
        saved = {n.id: (n.params["running_mean"], n.params["running_var"]) for n in bns}
        metric = self.metric
        if metric == "top1_change" and not any(class_scores(graph.meta_of(v).shape) for v in graph.output_values()):
            metric = "output_error"
        batches, _ = ctx.measure_batches(2, 1.0)
        before = ctx.fidelity(graph, metric, batches) if self.keep == "better" else None
        guard = ctx.guard_check(graph) if before is not None else None
        walked = self._statistics(graph, ctx, bns)
        result = PassResult(changed=True, touched={n.id for n in bns})
        result.metrics["batch_norms"] = float(len(bns))
        line = (f"re-estimated {len(bns)} BatchNorm{'s' if len(bns) > 1 else ''} on the calibration data"
                + ("" if walked == len(bns) else f" ({len(bns) - walked} streamed from the inputs)"))
        after = ctx.fidelity(graph, metric, batches) if before is not None else None
        if before is None or after is None:
            if self.keep == "better":
                line += f" (kept unmeasured: the compiler cannot measure {metric} here)"
            result.notes.append(line)
            return result
        result.metrics.update({f"{metric}_before": before, f"{metric}_after": after})
        line += f": {metric} {before:.4g} → {after:.4g}"
        why = "not lower" if not after < before else ""
        if not why and guard is not None and guard[0] and (check := ctx.guard_check(graph)) is not None and not check[0]:
            why = f"the guard no longer holds ({check[1]:.4g})"
        if not why:
            result.notes.append(f"{line}, kept")
            return result
        for n in bns:
            n.params["running_mean"], n.params["running_var"] = saved[n.id]
        result.notes.append(f"{line}, {why}: the statistics before it are kept")
        result.changed, result.touched = False, set()
        return result

    @staticmethod
    def _set(bn: Node, mean: torch.Tensor, var: torch.Tensor) -> None:
        dt = bn.dense("running_mean").dtype
        bn.params["running_mean"] = mean.to(dt)
        bn.params["running_var"] = var.to(dt)

    def _statistics(self, graph: Graph, ctx: PassContext, bns: list[Node]) -> int:
        """Re-estimates `bns` in topological order, in place; returns how many went layer by layer.

        Layer by layer (`PassContext.segment`): per calibration batch the live tensors at a checkpoint, moved
        forwards to each BatchNorm in turn, so every node runs once per batch. Without a layer-by-layer runner,
        or where the checkpoint would hold more than `LIMIT_BYTES`, the BatchNorm's input is streamed from the
        inputs instead (one partial pass each)."""
        topo = graph.topo_order()
        pos = {nid: i for i, nid in enumerate(topo)}
        live = Liveness(graph, topo, outputs=False)
        inputs: list[Value] = [(nid, 0) for nid in graph.inputs]
        state: list[dict[Value, torch.Tensor]] | None = None
        if ctx.segment_fn is not None:
            state = [dict(zip(inputs, batch)) for batch in ctx.batches()]
        samples = sum(ctx.batch_sizes())
        walked = 0
        for bn in sorted(bns, key=lambda n: pos[n.id]):
            src = graph.operands(bn.id)[0]
            live_now = live.at(pos[bn.id])
            acc = Moments()
            if state and sum(bytes_per_sample(graph, v) for v in live_now) * samples <= LIMIT_BYTES:
                run = ctx.segment(graph, list(state[0]), live_now)
                assert run is not None
                feeds = list(state[0])
                with torch.no_grad():
                    for i, cur in enumerate(state):
                        state[i] = dict(zip(live_now, run([cur[v] for v in feeds])))
                        _add(acc, state[i][src], i, bn.id)
                walked += 1
            else:
                for i, (t,) in enumerate(ctx.stream(graph, [src])):
                    _add(acc, t, i, bn.id)
            if acc.n == 0:
                raise NetsqueezeError(Diagnostic("reestimate_bn: no calibration sample reached this BatchNorm",
                                                 node=bn.id))
            if acc.n < 2:  # one value per channel: a variance of 0, and the BatchNorm would divide by √eps
                raise NetsqueezeError(Diagnostic(
                    f"reestimate_bn: {acc.n} value per channel reached this BatchNorm (one calibration sample of a "
                    "per-sample feature); its variance needs at least 2: give more calibration samples", node=bn.id))
            self._set(bn, acc.mean, acc.var)
        return walked


LIMIT_BYTES = 2 << 30  # the most the layer-by-layer checkpoint may hold, over every calibration batch


def _add(acc: Moments, t: torch.Tensor, batch: int, where: str) -> None:
    """Adds one batch of a BatchNorm's input (channels on axis 1) to `acc`; a NaN or Inf is an error naming
    the batch and the node."""
    if not torch.isfinite(t).all():
        raise NetsqueezeError(Diagnostic(f"reestimate_bn: calibration batch {batch} gives non-finite values at "
                                         "this BatchNorm's input", node=where))
    acc.update(channel_rows(t.detach(), 1))
