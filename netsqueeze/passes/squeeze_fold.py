"""`squeeze_fold`: one-shot removal of correlated channels with a linear reconstruction folded into
the consumers (Ozen & Orailoglu, "Squeezing Correlated Neurons", ECML PKDD 2020; METHODS.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from netsqueeze.errors import BudgetError, Diagnostic
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.dependency import ChannelGroup, DependencyAnalysis, Member
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection
from netsqueeze.passes.squeeze_math import (
    covariance,
    kept_for_error,
    rank_for_energy,
    ranking,
    reconstruction,
)

# consumer (kind, weight param) whose output is linear in that input axis, so a reconstruction folds exactly
_FOLDABLE = {("conv", "weight"), ("linear", "weight")}


@dataclass
class _Probe:
    """Streamed statistics of one consumer's input, in group-channel space."""

    member: Member
    value: Value
    moment: torch.Tensor  # (C+1)x(C+1) augmented second moment, summed
    pos_sum: torch.Tensor  # [C, block] per-position sums (for per-position intercepts)
    count: int = 0  # samples (rows) in `moment`
    rows: int = 0  # rows per position in `pos_sum`


@register_pass
@dataclass(frozen=True)
class SqueezeFold(TransformPass):
    """Removes the channels of each group that the others reconstruct linearly, folding the
    reconstruction into every consumer, without fine-tuning.

    Per prunable channel group (dependency analysis; the policy's `on` selects producers):
    1. At every consumer's input, the augmented Gram matrix E[[a,1][a,1]ᵀ] of the group's channels is
       streamed over the calibration data (conv: every spatial position is a sample; flatten→linear:
       every position of a channel's H·W block is a sample).
    2. The kept count: the smallest r whose eigenvalues hold `energy` of the (trace-normalised, summed
       over consumers) covariance spectrum, or `ratio` of channels removed, or — when the policy sets a
       `budget` and neither is given — the largest energy whose result meets the budget (bisection).
    3. The kept set: `greedy` backward elimination (default: it measured lower reconstruction error
       than `qr` on every benchmark model) or column-pivoted `qr`.
    4. Per consumer, least squares with intercept a ≈ a_S·T + t₀ (`ridge` for ill-conditioned Grams),
       folded: W'[o,s] = Σ_c W[o,c]·T[s,c] per kernel tap / block position; bias += W·t₀ (t₀ per
       position for flatten blocks).
    5. The rest is deleted through the shared `apply_selection` routine.
    Exact when activations have exact rank r and consumers are linear in their input channels. It
    approximates at zero-padded conv borders (t₀ enters the bias at every output position). A group
    with a consumer that is not linear in its input channels (grouped conv, conv_transpose, attention's
    out_proj) gets a note in the report and is left alone; with `nonlinear = "remove"` such consumers
    are only sliced (their removed inputs are lost, not reconstructed) while the group's linear
    consumers still get the fold. Groups frozen by the dependency analysis (graph outputs, opaque
    ops, LayerNorm over the channel axis) are never touched.
    Needs calibration data. Guarantees: the graph verifies; params/FLOPs never grow.
    """

    name: ClassVar[str] = "squeeze_fold"
    energy: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    ratio: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "unit": "ratio"})
    energy_of: Literal["reconstruction", "spectrum"] = "reconstruction"
    weighting: Literal["consumer", "none"] = "consumer"
    method: Literal["greedy", "qr"] = "greedy"
    ridge: float = field(default=1e-6, metadata={"min": 0.0})
    min_channels: int = field(default=1, metadata={"min": 1})
    round_to: int = field(default=1, metadata={"min": 1})
    nonlinear: Literal["skip", "remove"] = "skip"
    max_samples: int = field(default=200_000, metadata={"min": 1})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = ctx.analysis(DependencyAnalysis, graph).restrict(ctx.selected)
        result = PassResult()
        plans: dict[int, list[_Probe]] = {}
        for g in groups.prunable():
            cons = g.members_of("consumer")
            bad = [m for m in cons if not self._foldable(graph, m)]
            if not cons:
                continue
            if bad and self.nonlinear == "skip":
                result.notes.append(f"group {g.id} ({g.producers[0] if g.producers else '?'}): consumer "
                                    f"'{bad[0].node}' is not linear in its input channels; left alone")
                continue
            probes = [self._probe(graph, m) for m in cons if self._foldable(graph, m)]
            if not probes:
                result.notes.append(f"group {g.id}: no consumer is linear in its channels, nothing to measure; left alone")
                continue
            plans[g.id] = probes
        if not plans:
            return result
        self._collect(graph, ctx, [p for ps in plans.values() for p in ps])
        ranks = {gid: self._rank(graph, probes) for gid, probes in plans.items()}
        energy = self.energy
        if energy is None and self.ratio is None:
            energy = self._search_energy(graph, groups, ranks, ctx)
        selection = {}
        for gid, probes in plans.items():
            g = groups[gid]
            k = self._kept(g, ranks[gid], energy, ctx)
            if k >= g.size:
                continue
            selection[gid] = self._selection(graph, ranks[gid][0][:k], probes)
        if not selection:
            return result
        out = apply_selection(graph, groups, selection)
        out.notes = [*result.notes, f"squeezed {len(selection)} groups" + (f" at energy {energy:.4f}" if energy else "")]
        return out

    # ---- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _foldable(graph: Graph, m: Member) -> bool:
        node = graph.node(m.node)
        if (node.kind, m.param) not in _FOLDABLE or m.axis != 1:
            return False
        if node.kind == "conv" and node.attrs.get("groups", 1) != 1:
            return False
        return len({len(p) for p in m.index}) == 1

    @staticmethod
    def _probe(graph: Graph, m: Member) -> _Probe:
        c, block = len(m.index), len(m.index[0])
        z = torch.zeros(c + 1, c + 1, dtype=torch.float64)
        return _Probe(m, graph.operands(m.node)[0], z, torch.zeros(c, block, dtype=torch.float64))

    def _collect(self, graph: Graph, ctx: PassContext, probes: list[_Probe]) -> None:
        values = list(dict.fromkeys(p.value for p in probes))
        for batch in ctx.stream(graph, values):
            acts = dict(zip(values, batch))
            for p in probes:
                if p.count >= self.max_samples:
                    continue
                x = acts[p.value].detach().double()
                kind = graph.node(p.member.node).kind
                # move the consumer's input axis last: conv reads axis 1, linear the last axis
                xm = x.movedim(1, -1) if kind == "conv" else x
                idx = torch.tensor([list(q) for q in p.member.index])  # [C, block]
                a = xm[..., idx]  # [..., C, block]
                rows = a.movedim(-2, -1).reshape(-1, idx.shape[0])  # samples x C
                aug = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
                p.moment += aug.T @ aug
                p.count += rows.shape[0]
                p.pos_sum += a.reshape(-1, *idx.shape).sum(0)
                p.rows += a.reshape(-1, *idx.shape).shape[0]

    def _rank(self, graph: Graph, probes: list[_Probe]) -> tuple[list[int], list[float], torch.Tensor]:
        """(channel order, prefix errors, pooled covariance) for one group.

        Consumers are pooled with equal weight: covariances normalised by their trace, metrics by the
        consumer-output variance they imply; exact for the common single-consumer group.
        """
        cov_sum: torch.Tensor | None = None
        met_sum: torch.Tensor | None = None
        for p in probes:
            cov = covariance(p.moment / max(1, p.count))
            cov = cov / cov.trace().clamp_min(1e-30)
            met = self._metric(graph, p.member) if self.weighting == "consumer" else torch.eye(cov.shape[0],
                                                                                            dtype=cov.dtype)
            met = met / torch.trace(met @ cov).clamp_min(1e-30)
            cov_sum = cov if cov_sum is None else cov_sum + cov
            met_sum = met if met_sum is None else met_sum + met
        assert cov_sum is not None and met_sum is not None
        order, err = ranking(cov_sum, self.method, met_sum, max(self.ridge, 1e-9))
        return order, err, cov_sum

    @staticmethod
    def _metric(graph: Graph, m: Member) -> torch.Tensor:
        """Σ_o WᵀW of a consumer in group-channel space, summed over kernel taps / block positions."""
        w = graph.node(m.node).params[m.param or "weight"].double().movedim(m.axis, -1)
        idx = torch.tensor([list(q) for q in m.index])  # [C, block]
        wc = w[..., idx].reshape(-1, *idx.shape)  # [rows, C, block]
        return torch.einsum("rcb,rdb->cd", wc, wc)

    def _kept(self, g: ChannelGroup, rank: tuple[list[int], list[float], torch.Tensor], energy: float | None,
              ctx: PassContext) -> int:
        if self.ratio is not None:
            k = g.size - round(self.ratio * g.size)
        elif energy is not None:
            k = kept_for_error(rank[1], 1.0 - energy) if self.energy_of == "reconstruction" else \
                rank_for_energy(rank[2], energy)
        else:
            k = g.size
        b = ctx.bounds_for(g.producers)
        round_to = int(b.get("round_to", self.round_to))
        floor = max(int(b.get("min_channels", self.min_channels)), 1)
        if "max_ratio" in b:  # at most this share of a group's channels may go
            floor = max(floor, g.size - math.floor(float(b["max_ratio"]) * g.size))
        k = max(k, floor)
        if round_to > 1:
            k = min(g.size, int(math.ceil(k / round_to) * round_to))
        return min(k, g.size)

    def _selection(self, graph: Graph, keep: list[int], probes: list[_Probe]) -> ChannelSelection:
        keep = sorted(keep)
        folds: dict[str, torch.Tensor] = {}
        shifts: dict[str, torch.Tensor] = {}
        for p in probes:
            moment = p.moment / max(1, p.count)
            t, t0 = reconstruction(moment, keep, self.ridge)
            folds[p.member.node] = t
            # per-position intercept: mean at each block position minus the kept channels' mapped mean
            mean_pos = p.pos_sum / max(1, p.rows)  # [C, block]
            t0_pos = mean_pos - torch.einsum("sj,sc->cj", mean_pos[keep], t)
            if t0_pos.shape[1] == 1:
                t0_pos = t0.unsqueeze(1)
            n_axis = graph.node(p.member.node).params[p.member.param or "weight"].shape[p.member.axis]
            full = torch.zeros(n_axis, dtype=torch.float64)
            idx = torch.tensor([list(q) for q in p.member.index])
            full[idx.flatten()] = t0_pos.flatten()
            full[idx[keep].flatten()] = 0.0
            shifts[p.member.node] = full
        return ChannelSelection(keep=keep, fold=folds, bias_shift=shifts)

    def _search_energy(self, graph: Graph, groups: object,
                       ranks: dict[int, tuple[list[int], list[float], torch.Tensor]], ctx: PassContext) -> float:
        """Largest energy whose squeezed graph meets the policy budget (bisection on a copy)."""
        if not ctx.budget:
            raise BudgetError(Diagnostic("squeeze_fold needs `energy`, `ratio`, or a policy `budget`"))
        base = graph_stats(ctx.original or graph)

        def meets(e: float) -> bool:
            g2 = graph.copy()
            sel = {}
            for gid, rank in ranks.items():
                grp = groups[gid]  # type: ignore[index]
                k = self._kept(grp, rank, e, ctx)
                if k < grp.size:
                    sel[gid] = ChannelSelection(keep=list(range(k)))
            apply_selection(g2, groups, sel)  # type: ignore[arg-type]
            s = graph_stats(g2)
            ok = True
            if "flops" in ctx.budget:
                ok &= s.flops <= ctx.budget["flops"] * base.flops
            if "params" in ctx.budget:
                ok &= s.params <= ctx.budget["params"] * base.params
            return ok

        lo, hi = 0.0, 1.0
        if not meets(lo):
            raise BudgetError(Diagnostic(
                f"squeeze_fold cannot meet the budget {ctx.budget}: even one channel per group is not enough"))
        for _ in range(14):
            mid = (lo + hi) / 2
            if meets(mid):
                lo = mid
            else:
                hi = mid
        return lo
