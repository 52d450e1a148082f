"""`trim { criterion = gdnt, gdnt_mode = groups }`'s connection order and least-squares refit.

GDNT as published (Ganesh, Corso & Yasaei Sekeh, ICPR 2020; reference code Sekeh-Lab/MINT) cuts (parent group,
child group) connections of each consumer and fine-tunes what remains. Two pieces of that mode live here:

- `ranked`: one total order of every connection of every observed consumer. The dependency scores are
  Friedman–Rafsky counts over n/3 samples (1 − R/(n/3)): at the default 384 samples they take at most 129 values,
  so hundreds of connections tie and a threshold among the distinct scores moves in steps of many connections
  (the budget search of the VGG-style benchmark jumped from under 3x to 4.06x fewer FLOPs in one such step). Ties
  are broken by the connection's weight magnitude (the mean |w| of its block over the consumer's mean block
  magnitude: the smaller goes first), then by position; the budget search then bisects over how many connections
  of this order are cut, one at a time.
- `refit`: the compiler's one-shot equivalent of the fine-tuning, as squeeze_fold's fold is of its
  reconstruction. After the cut, every observed consumer is refit in graph order: each output channel's remaining
  incoming weights (the kept input channels of the parent groups still connected to its child group, with every
  kernel tap) and its bias (the intercept) are re-solved by ridge least squares on the calibration data so that
  its pre-activation matches the original model's (the ridge chosen per child group among `RIDGES` by the error
  on a held-out share of the calibration rows): the inputs are the consumer's inputs as the graph cut and
  refit so far computes them (so each consumer also corrects the drift of those before it), the targets the
  original consumer's outputs, streamed side by side. Convolutions are unrolled (im2col) at `POSITIONS` output
  positions per sample drawn at random (seeded); linear layers use every row. Cut blocks and removed input
  channels stay exactly zero. At every output channel it is never worse on the calibration data than the
  mean-into-bias compensation (which is one candidate of the fit, up to the ridge) and exact when the cut inputs
  are affine combinations of the kept ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import attr
from netsqueeze.passes.allocation import METRICS, Budget, Reached
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import ChannelGroup, Member
from netsqueeze.passes.frontier import Frontier, SideBySide
from netsqueeze.passes.refit import HELD_OUT, as_solution, normal_equations, ridge_refit, select
from netsqueeze.passes.rewrite import ChannelSelection

LANDING = 0.05  # a budget cut landing further under the limit than this share of it is walked closer (`closer_cut`)

# (group, index of the observation in the group's, parent blocks, child blocks, [parent group, child group] scores)
Entry = tuple[ChannelGroup, int, list[np.ndarray], list[np.ndarray], torch.Tensor]


def _positions(consumer_index: Sequence[Sequence[int]], blk: np.ndarray) -> list[int]:
    return [q for c in blk for q in consumer_index[int(c)]]


def ranked(graph: Graph, table: list[Entry], consumers: list[Member]) -> list[Entry]:
    """`table` with every connection's score replaced by its rank (0 = cut first) in one order over all entries:
    score ascending, ties by the block's weight magnitude relative to its consumer's mean block (ascending), then
    by entry and position. `consumers[e]` is entry e's consumer (weight axis 1). Ranks preserve the order of
    unequal scores, so a cut under a score is a cut under a rank (`cut_count`)."""
    keys: list[tuple[float, float, int, int]] = []
    for e, ((_, _, pb, cb, sc), m) in enumerate(zip(table, consumers)):
        w = graph.node(m.node).params["weight"]
        mag = torch.zeros(sc.shape, dtype=torch.float64)
        if isinstance(w, torch.Tensor):
            wa = w.detach().double().abs().flatten(2) if w.dim() > 2 else w.detach().double().abs()[..., None]
            for a, blk in enumerate(pb):
                pos = torch.tensor(_positions(m.index, blk))
                for b, cbk in enumerate(cb):
                    mag[a, b] = wa[torch.from_numpy(cbk)][:, pos].mean()
            mag = mag / mag.mean().clamp_min(1e-30)
        flat, mflat = sc.flatten(), mag.flatten()
        keys.extend((float(flat[k]), float(mflat[k]), e, k) for k in range(flat.numel()))
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    rank = torch.empty(len(keys), dtype=torch.float64)
    rank[torch.tensor(order)] = torch.arange(len(keys), dtype=torch.float64)
    out, at = [], 0
    for g, i, pb, cb, sc in table:
        out.append((g, i, pb, cb, rank[at:at + sc.numel()].reshape(sc.shape)))
        at += sc.numel()
    return out


def cut_count(raw: torch.Tensor, quantile: float) -> int:
    """The number of connections a `ratio` cut takes: those scored under the `quantile` of all scores (ranked
    first by `ranked`)."""
    return int((raw < torch.quantile(raw, quantile)).sum())


def refit(graph: Graph, ref: Graph, ctx: PassContext, table: list[Entry], cuts: list[torch.Tensor],
          keep: dict[int, ChannelSelection], notes: list[str], consumers: list[Member]) -> int:
    """Refits every observed consumer of `table` (entry e's consumer `consumers[e]`, its cut mask `cuts[e]`)
    in graph order, by ridge least squares on the calibration data against `ref` (the graph before the cut,
    same node ids and shapes). `keep`: the channels each trimmed group keeps (the others' columns stay zero;
    they are removed afterwards). `graph` is full-shaped (cut blocks zeroed, nothing removed yet). Returns the
    consumers refit; notes why one was not."""
    by_node: dict[str, list[int]] = {}
    for e, m in enumerate(consumers):
        by_node.setdefault(m.node, []).append(e)
    topo = graph.topo_order()
    pos = {nid: i for i, nid in enumerate(topo)}
    # both graphs run side by side layer by layer, consumers in graph order (each refit changes only what
    # the later ones read): a few passes over the data whatever the number of consumers
    side = SideBySide(Frontier.open(graph, ref, ctx, topo), graph, ref, ctx, notes, "gdnt refit")
    done = 0
    ridges: list[str] = []
    kept = 0  # child groups whose refit did no better than the cut on held-out rows
    for step, node_id in enumerate(sorted(by_node, key=lambda n: pos[n])):
        node = graph.node(node_id)
        w = node.params["weight"]
        bias = node.params.get("bias")
        if node.kind not in ("conv", "linear") or not isinstance(w, torch.Tensor) or (
                bias is not None and not isinstance(bias, torch.Tensor)):
            notes.append(f"gdnt refit: '{node_id}' ({node.kind}, encoded or not conv/linear) keeps the cut with its "
                         "mean in the bias")
            continue
        if node.kind == "conv" and (attr(node, "groups") != 1 or w.dim() != 4):
            notes.append(f"gdnt refit: '{node_id}' (grouped or not 2-d conv) keeps the cut with its mean in the bias")
            continue
        cout, width = w.shape[0], w.shape[1]
        taps = int(np.prod(w.shape[2:])) if w.dim() > 2 else 1
        # per child block, the kept columns of the weight's input axis
        entries = by_node[node_id]
        cb = table[entries[0]][3]
        allowed = torch.ones(len(cb), width, dtype=torch.bool)
        for e in entries:
            g, _, pb, _, _ = table[e]
            idx = consumers[e].index
            gone = set(range(g.size)) - set(keep[g.id].keep) if g.id in keep else set()
            for c in gone:
                allowed[:, list(idx[c])] = False
            for a, blk in enumerate(pb):
                cols = _positions(idx, blk)
                for b in range(len(cb)):
                    if bool(cuts[e][a, b]):
                        allowed[b, cols] = False
        stats = normal_equations(graph, side, pos[node_id], node_id, ctx.seed + 7919 * step)
        if stats is None:
            notes.append(f"gdnt refit: '{node_id}': no calibration rows (or an input rank the refit does not "
                         "unroll); it keeps the cut with its mean in the bias")
            continue
        fit, held = stats
        f = width * taps
        wd = torch.zeros(cout, f, dtype=torch.float64)
        bd = torch.zeros(cout, dtype=torch.float64)
        chosen = []
        current = as_solution(w, bias)  # the layer as it is, every cut column read as zero below
        for b, rows in enumerate(cb):
            feats = allowed[b].repeat_interleave(taps).nonzero().flatten()
            sel = torch.cat([feats, torch.tensor([f])])
            r = torch.from_numpy(rows)
            sol, ridge = ridge_refit(select(fit, feats, r), select(held, feats, r), current[sel][:, r])
            if ridge is None:
                kept += 1
            else:
                chosen.append(ridge)
            wd[r[:, None], feats[None, :]] = sol[:-1].T
            bd[r] = sol[-1]
        if chosen:
            ridges.append(f"{node_id} {min(chosen):g}..{max(chosen):g}")
            done += 1
        node.params["weight"] = wd.reshape(w.shape).to(w.dtype)
        node.params["bias"] = bd.to(w.dtype if bias is None else bias.dtype)
    if ridges or kept:
        notes.append(f"gdnt refit: {done} consumers refit by ridge least squares (ridge chosen per child group on "
                     f"{HELD_OUT:.0%} held-out calibration rows: " + ", ".join(ridges) + ")"
                     + (f"; {kept} child groups kept the cut as it is: their refit was no better on the held-out rows"
                        if kept else ""))
    return done


def refits(refit_option: str, bias_compensation: bool, ctx: PassContext) -> bool:
    """Whether gdnt_mode = groups refits the consumers (`refit = least_squares`, or `auto` with calibration data
    and bias compensation on); else (`none`) each cut block's mean input goes into the bias."""
    return refit_option in ("least_squares", "layer") or (
        refit_option == "auto" and bias_compensation and ctx.stream_fn is not None)


Cut = float | list[torch.Tensor]  # a rank threshold (cut every connection ranked under it) or per-entry masks


def candidates(table: list[Entry], cut: Cut) -> list[torch.Tensor]:
    """Per entry, the connections `cut` offers to cut (before the per-layer cap and the strongest-kept rule)."""
    return [sc < cut for *_, sc in table] if isinstance(cut, float) else cut


def landing(budget: Budget) -> float:
    """How far under the budget a cut may land (5% of the tightest limit) before `closer_cut` looks for a closer
    one: every further connection it cuts costs accuracy and saves nothing until a parent group goes."""
    return LANDING * min(budget.limits.values())


def closer_cut(table: list[Entry], fail: float, reach: Callable[[list[torch.Tensor]], Reached], budget: Budget,
               within: float = 0.005) -> tuple[list[torch.Tensor], Reached] | None:
    """A cut landing closer under the budget than the smallest rank threshold that meets it. From the largest
    threshold `fail` that misses the budget, the remaining connections are walked in rank order (a child group's
    strongest incoming one never: it is never cut): one whose cut, added to those before it, still misses the
    budget is cut; one whose cut meets it is a candidate landing and is skipped (left uncut: one connection can
    remove a whole parent group, and with it, through the children it fed, the groups before) and the walk goes
    on. Returns the first candidate within `within` of the limit (the fewest connections cut: those cut on the
    way save nothing), else the one with the least slack (limit − reached, on the budget's tightest metric), or
    None when no connection is left to walk. `reach(masks)`: what cutting `masks` reaches."""
    masks = [sc < fail for *_, sc in table]
    order = sorted((float(sc[a, b]), e, a, b) for e, (*_, sc) in enumerate(table)
                   for b in range(sc.shape[1]) for a in range(sc.shape[0])
                   if not bool(masks[e][a, b]) and a != int(sc[:, b].argmax()))
    best: tuple[float, list[torch.Tensor], Reached] | None = None
    for _, e, a, b in order:
        masks[e][a, b] = True
        got = reach(masks)
        if not budget.meets(got):
            continue
        gap = slack(budget, got)
        if best is None or gap < best[0]:
            best = (gap, [m.clone() for m in masks], got)
        masks[e][a, b] = False
        if gap <= within:
            break
    return None if best is None else (best[1], best[2])


def slack(budget: Budget, reached: Reached) -> float:
    """How far under the budget `reached` lands: limit − reached on the budget's tightest metric."""
    return min(v - reached[METRICS.index(k)] for k, v in budget.limits.items())
