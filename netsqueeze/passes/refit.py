"""Least-squares refit of the consumers of removed channels: the reconstruction step of squeeze-and-fold
(Ozen & Orailoglu, ECML PKDD 2020) for channels some other rule chose to remove (`trim`'s scores), and the
consumer statistics `squeeze_fold` and `trim` share (`gather`, `add`, `parallel_fit`, `Cross`).

At every consumer that is linear in its input channels, the augmented second moment E[[a, 1][a, 1]ᵀ] of
the group's channels is streamed over the calibration data; for a chosen kept set S the removed channels
are rebuilt as a ≈ a_S·T + t₀ (`squeeze_math.reconstruction`, least squares with intercept) and T folded
into the consumer, t₀ into its bias (`rewrite.SharedFold` and `ChannelSelection.bias_shift`). The fit is
measured on the graph the statistics were streamed from (a parallel fold, one calibration pass for every
group), or group by group in graph order on the graph as trimmed so far (`cascade`: the kept channels as the
trimmed graph computes them, regressed onto the original channels, so each fold also corrects the drift of the
groups trimmed before it). The cascade runs the data through the trimmed graph and its pass-start copy side by
side, layer by layer (`passes.frontier`): a few model passes over the data whatever the number of groups. The
layer refit (`refit_layers`) reads the same sweep, or, with the targets recorded ahead in a pass that ran the
pass-start graph anyway (`Recorder`), runs the rewritten graph alone.
Because T, t₀ minimise each channel's squared error, the residual covariance is the least any
affine rebuild from S reaches, so every consumer's output error E‖W(a − â)‖² is at most the one of keeping
only the removed channels' means (bias compensation, T = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch

from netsqueeze.ir.graph import Graph, Node, Value
from netsqueeze.ir.ops import attr, spec
from netsqueeze.passes.base import PassContext, PassResult, check_squarable
from netsqueeze.passes.collectors import conv_patches_at
from netsqueeze.passes.dependency import ChannelGroup, ChannelGroups, Member, find_groups
from netsqueeze.passes.frontier import Frontier, SideBySide, first_positions
from netsqueeze.passes.rewrite import (
    ChannelSelection,
    SharedFold,
    apply_selection,
    axis_vector,
    batch_norm_scale,
    branch_removal,
)
from netsqueeze.passes.squeeze_math import (
    FIT_ROWS,
    cholesky_solve,
    gcv_ridge,
    gram,
    reconstruction,
    ridged_normal,
    short_fit,
    solve_normal,
)


@dataclass
class ConsumerStats:
    """Streamed statistics of one consumer's input in group-channel space: the augmented second moment
    over rows (conv: every spatial position is a row), and per-position sums for blocks (flatten→linear)."""

    member: Member  # the consumer's weight input axis
    value: Value  # the value it reads
    moment: torch.Tensor  # (C+1)×(C+1), summed
    pos_sum: torch.Tensor  # [C, block], summed
    count: int = 0  # rows in `moment`
    rows: int = 0  # rows per position in `pos_sum`


@dataclass
class Cross:
    """Streamed cross statistics between the kept channels as the rewritten graph computes them, a'_S, and
    the original channels a (a cascade refit's least squares a ≈ a'_S·T + t₀)."""

    xtx: torch.Tensor  # (k+1)x(k+1): [a'_S, 1]ᵀ[a'_S, 1]
    xty: torch.Tensor  # (k+1)xC:     [a'_S, 1]ᵀ a
    sum_now: torch.Tensor  # [k, block] per-position sums of a'_S
    sum_ref: torch.Tensor  # [C, block] per-position sums of a
    count: int = 0  # rows in `xtx`
    rows: int = 0  # rows per position in the sums
    yy: float = 0.0  # tr(aᵀa) over the rows: what `gcv_ridge` needs besides the normal equations

    @staticmethod
    def empty(k: int, c: int, block: int) -> Cross:
        z = torch.zeros
        return Cross(z(k + 1, k + 1, dtype=torch.float64), z(k + 1, c, dtype=torch.float64),
                     z(k, block, dtype=torch.float64), z(c, block, dtype=torch.float64))

    def add(self, a_s: torch.Tensor, a: torch.Tensor) -> None:
        """Adds one batch: `a_s` [n, k, block] the kept channels now, `a` [n, C, block] the original ones
        (every block position is a row of the fit)."""
        x, y = rows_of(a_s), rows_of(a)
        add_gram(self.xtx, x)
        k = x.shape[1]
        self.xty[:k] += x.T @ y
        self.xty[k] += y.sum(0)
        self.sum_now += a_s.sum(0)
        self.sum_ref += a.sum(0)
        self.count += x.shape[0]
        self.rows += a.shape[0]
        self.yy += float((y.double() ** 2).sum())

    def fit(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(T [k, C], t₀ [C, block]): least squares with a per-position intercept; the kept channels are
        refit too, which corrects their drift. On fewer than `FIT_ROWS` rows per coefficient the ridge is
        `gcv_ridge`'s."""
        if short_fit(self.count, self.xtx.shape[0] - 1):
            ridge = gcv_ridge(self.xtx, self.xty, self.yy, self.count, ridge)
        t = solve_normal(ridged_normal(self.xtx, ridge), self.xty)[:-1]  # the last row (intercept): per position
        n = max(1, self.rows)
        return t, self.sum_ref / n - torch.einsum("sj,sc->cj", self.sum_now / n, t)


def refittable(graph: Graph, m: Member) -> bool:
    """Whether a reconstruction of consumer member `m`'s input channels folds exactly into its weight: the
    op is linear in that axis (its op definition says so; grouped convs are not) and every channel
    occupies the same number of positions."""
    node = graph.node(m.node)
    foldable = spec(node.kind).foldable
    if foldable is None or m.param is None or not foldable(node, m.param, m.axis):
        return False
    if node.kind == "conv" and attr(node, "groups") != 1:
        return False
    return len({len(p) for p in m.index}) == 1


def plan(graph: Graph, group: ChannelGroup) -> list[ConsumerStats]:
    """Empty statistics for every refittable consumer of `group` (the others are only sliced)."""
    out = []
    for m in group.members_of("consumer"):
        if not refittable(graph, m):
            continue
        c, block = len(m.index), len(m.index[0])
        out.append(ConsumerStats(m, graph.operands(m.node)[0], torch.zeros(c + 1, c + 1, dtype=torch.float64),
                                 torch.zeros(c, block, dtype=torch.float64)))
    return out


def _channel_axis(graph: Graph, m: Member) -> int:
    """The axis of consumer `m`'s input its channels are on: `linear` reads the last axis, conv and
    conv_transpose (channels-first) axis 1."""
    return -1 if graph.node(m.node).kind == "linear" else 1


def channels_last(graph: Graph, m: Member, x: torch.Tensor) -> torch.Tensor:
    """Consumer `m`'s input `x` in float64 with its input-channel axis last."""
    return x.detach().double().movedim(_channel_axis(graph, m), -1)


def gather(graph: Graph, m: Member, x: torch.Tensor, at: list[list[int]] | None = None,
           keep: list[int] | None = None) -> torch.Tensor:
    """Consumer `m`'s input `x` in group-channel space, [rows, C, block] in float64 (rows: every position but
    the channel axis, as `channels_last` orders them); `at` overrides where the channels sit on that axis (a
    grouped conv's weight slots: block = conv groups); `keep`: only those group channels, [rows, k, block].
    The channels are picked in the input's own dtype and layout, then converted in one copy."""
    idx = torch.tensor(at if at is not None else [list(q) for q in m.index])  # [C, block]
    if keep is not None:
        idx = idx[keep]
    axis = _channel_axis(graph, m)
    xm, flat = x.detach(), idx.reshape(-1)
    if not (len(flat) == xm.shape[axis] and bool((flat == torch.arange(len(flat))).all())):
        xm = xm.index_select(axis, flat)
    xm = xm.movedim(axis, -1).to(torch.float64, memory_format=torch.contiguous_format)
    return xm.reshape(-1, *idx.shape)


def rows_of(a: torch.Tensor) -> torch.Tensor:
    """`a` [n, C, block] (`gather`) as fit rows [n·block, C], ordered (sample, block position)."""
    return a.reshape(a.shape[0], a.shape[1]) if a.shape[2] == 1 else a.movedim(-1, 1).reshape(-1, a.shape[1])


def add_gram(moment: torch.Tensor, x: torch.Tensor) -> None:
    """Adds [x, 1]ᵀ[x, 1] of rows `x` [N, C] to the (C+1)×(C+1) `moment` (without building [x, 1])."""
    c = x.shape[1]
    moment[:c, :c] += gram(x)
    s = x.sum(0)
    moment[:c, c] += s
    moment[c, :c] += s
    moment[c, c] += x.shape[0]


def add(stats: ConsumerStats, a: torch.Tensor) -> torch.Tensor:
    """Adds one batch of a consumer's input in group-channel space, `a` [n, C, block] (`gather`), to
    `stats`; returns its rows [n·block, C] (`rows_of`)."""
    rows = rows_of(a)
    add_gram(stats.moment, rows)
    stats.count += rows.shape[0]
    stats.pos_sum += a.sum(0)
    stats.rows += a.shape[0]
    return rows


def update(graph: Graph, stats: ConsumerStats, x: torch.Tensor) -> None:
    """Adds one calibration batch of the consumer's input `x` to `stats`."""
    add(stats, gather(graph, stats.member, x))


SHORT_FITS = "short_fits"  # PassResult.metrics key: how many folds `short_fits` named (the compile reports it)


def short_fits(fits: Iterable[tuple[str, int, int]], result: PassResult) -> None:
    """Notes the folds fit on fewer than `FIT_ROWS` calibration rows per coefficient, each (consumer, rows, kept
    inputs; an intercept too), and counts them in `result.metrics[SHORT_FITS]`. Least squares with p coefficients
    on n rows leaves about (1 − p/n) of the noise on those rows and adds about (1 + p/n) on new ones: a fold that
    close to its rows follows the calibration data (with n ≤ p it matches it exactly), so the output error
    measured on that data, and an `output error` guard, understate the error on new inputs."""
    short = sorted({f for f in fits if short_fit(f[1], f[2])}, key=lambda f: (f[1] / (f[2] + 1), f[0]))
    if not short:
        return
    node, rows, k = short[0]
    result.metrics[SHORT_FITS] = float(len(short))
    result.notes.append(f"{len(short)} fold(s) fit on fewer than {FIT_ROWS} calibration rows per coefficient (the "
                        f"fewest: '{node}', {k + 1} coefficients on {rows} rows): they take their ridge by "
                        "generalised cross-validation and still fit the calibration data better than new inputs, so "
                        "the output error measured on that data understates the error on new inputs; calibrate on "
                        "more samples")


def parallel_fit(stats: ConsumerStats, keep: list[int], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T [k, C], t₀ [C, block]) rebuilding the consumer's channels from the kept ones on the graph the
    statistics were streamed from; per-position intercept: each position's mean minus the kept channels'
    mapped mean there."""
    t, t0 = reconstruction(stats.moment / max(1, stats.count), keep, ridge, stats.count)
    mean_pos = stats.pos_sum / max(1, stats.rows)  # [C, block]
    if mean_pos.shape[1] == 1:
        return t, t0[:, None]
    return t, mean_pos - torch.einsum("sj,sc->cj", mean_pos[keep], t)


def selection(graph: Graph, keep: list[int], stats: list[ConsumerStats],
              shifts: dict[str, torch.Tensor] | None = None, ridge: float = 1e-6) -> ChannelSelection:
    """The selection keeping `keep` (ascending) with every consumer in `stats` refit: fold T and intercept
    t₀ per consumer (per block position for flatten→linear), measured at its own input. `shifts` are
    bias shifts {consumer: tensor over its input axis} for consumers not refit (removed channels' means)."""
    folds: dict[str, SharedFold] = {}
    out_shifts: dict[str, torch.Tensor] = dict(shifts or {})
    for st in stats:
        t, t0_pos = parallel_fit(st, keep, ridge)
        folds[st.member.node] = SharedFold(t)
        out_shifts[st.member.node] = axis_vector(graph, st.member, t0_pos)
    return ChannelSelection(keep=keep, fold=folds or None, bias_shift=out_shifts or None)


def cascade(graph: Graph, ctx: PassContext, groups: ChannelGroups, keeps: dict[int, list[int]],
            ridge: float = 1e-6) -> PassResult:
    """Trims every group in `keeps` (group id → kept channels) one group at a time in graph order (of the
    first node each touches). Each group's refittable consumers get the least-squares fold from its kept
    channels *as the graph trimmed so far computes them* to the original channels (the two graphs run side
    by side from a copy of `graph` made here, layer by layer where the compiler gives `ctx.segment`, else
    streamed whole per group); its other consumers (conv_transpose, unequal-block linear ones) get the
    removed channels' original means in their bias; grouped convs are sliced. Groups are found again after
    every rewrite, as shared axes (concat) shift."""
    out = PassResult(changed=bool(keeps))
    if not keeps:
        return out
    ref = graph.copy()
    topo = graph.topo_order()
    start = first_positions(topo, (groups[gid] for gid in keeps))
    order = sorted(keeps, key=lambda gid: (start[gid], gid))
    side = SideBySide(Frontier.open(graph, ref, ctx, topo), graph, ref, ctx, out.notes, "refit", start.values())
    for gid in order:
        ident = groups[gid].producers, groups[gid].consumers
        now = find_groups(graph)
        fresh = next(g for g in now if (g.producers, g.consumers) == ident)
        sel = _cascade_selection(graph, ref, fresh, groups[gid], sorted(keeps[gid]), ridge, side, start[gid], gid)
        r = apply_selection(graph, now, {fresh.id: sel})
        out.touched |= r.touched
    return out


def _cascade_selection(graph: Graph, ref: Graph, g: ChannelGroup, g_ref: ChannelGroup, keep: list[int],
                       ridge: float, side: SideBySide, at: int, gid: int) -> ChannelSelection:
    """Group `g`'s selection keeping `keep`, its consumers refit on the tensors `side` gives at checkpoint
    position `at` (per batch: their inputs in `graph` as trimmed so far and in the pass-start `ref`)."""
    ref_of = {m.node: m for m in g_ref.members_of("consumer")}
    cons = [m for m in g.members_of("consumer") if m.node in ref_of
            and (refittable(graph, m) or graph.node(m.node).kind in ("linear", "conv_transpose"))]
    values = list(dict.fromkeys(graph.operands(m.node)[0] for m in cons))
    fits = {m.node: Cross.empty(len(keep), len(m.index), len(m.index[0])) for m in cons if refittable(graph, m)}
    # the others: sums over their input axis in the pass-start graph (whole axis: blocks may be unequal)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for now_b, ref_b in side.pairs(at, values, f"group {gid}") if cons else ():
        acts_now, acts_ref = dict(zip(values, now_b)), dict(zip(values, ref_b))
        for m in cons:
            v = graph.operands(m.node)[0]
            if m.node in fits:
                fits[m.node].add(gather(graph, m, acts_now[v], keep=keep), gather(ref, ref_of[m.node], acts_ref[v]))
                continue
            x = channels_last(ref, ref_of[m.node], acts_ref[v])
            x = x.reshape(-1, x.shape[-1])
            sums[m.node] = sums[m.node] + x.sum(0) if m.node in sums else x.sum(0)
            rows[m.node] = rows.get(m.node, 0) + x.shape[0]
    folds: dict[str, SharedFold] = {}
    shifts: dict[str, torch.Tensor] = {}
    drop = [c for c in range(g.size) if c not in set(keep)]
    for m in cons:
        if m.node in fits:
            if fits[m.node].rows:
                t, t0 = fits[m.node].fit(ridge)
                folds[m.node] = SharedFold(t)
                shifts[m.node] = axis_vector(graph, m, t0)
            continue
        if m.node not in sums:
            continue
        mean = sums[m.node] / rows[m.node]  # over the pass-start input axis
        full = torch.zeros(graph.node(m.node).params[m.param or "weight"].shape[m.axis], dtype=torch.float64)
        for c in drop:  # not refittable: the removed channels' means only
            full[list(m.index[c])] = mean[list(ref_of[m.node].index[c])]
        shifts[m.node] = full
    return ChannelSelection(keep=keep, fold=folds or None, bias_shift=shifts or None)


# ---- layer-wise refit: a consumer's whole weight re-solved against the original layer's outputs -------------
POSITIONS = 16  # conv output positions sampled per calibration sample (at random, seeded) for the normal equations
# ridges tried per fit (relative to the mean diagonal, `squeeze_math.ridged_normal`): the one with the least error
# on the held-out share of the calibration rows is used for the final fit on all rows
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
RIDGE_START = 1e-3  # where `best_ridge` starts: the ridge most layers of the benchmark models chose
HELD_OUT = 0.2  # the share of calibration rows (drawn at random, seeded) that choose the ridge
LAYER_ROWS = 32768  # conv rows `refit_layers` aims for: more positions per sample than `POSITIONS` on small data
# ... but no more than this many rows per input of the layer (C·taps): a ridge fit of F inputs is limited by the
# layer, not the sample, well before 32·F rows, and a small layer's im2col rows were most of a compile's refit cost
ROWS_PER_INPUT = 32
MAX_LAYER_FEATURES = 4096  # a layer with more inputs (C·taps, or linear in-features) is not refit whole

Normal = tuple[torch.Tensor, torch.Tensor]  # ([X 1]ᵀ[X 1], [X 1]ᵀY)


@dataclass(frozen=True)
class Sample:
    """Calibration rows kept as they are, where they are fewer than the layer's inputs: inputs X [rows, features]
    and targets Y [rows, outputs]. Their least squares is solved in row space (`ridge_solve`: an n×n system for
    n rows, where the normal equations are F×F for F inputs), the same solution."""

    x: torch.Tensor
    y: torch.Tensor

    @cached_property
    def x64(self) -> torch.Tensor:
        """X in float64 (a held-out share's errors read it once per ridge)."""
        return self.x.double()

    @cached_property
    def y64(self) -> torch.Tensor:
        """Y in float64 (read once per ridge, like `x64`)."""
        return self.y.double()

    @cached_property
    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """What every ridge's solve shares, in float64: (X's column means, Y's, X_c, Y_c, X_cX_cᵀ, the mean
        diagonal of XᵀX that a ridge is relative to)."""
        xm, ym = self.x64.mean(0), self.y64.mean(0)
        xc = self.x64 - xm
        scale = max(float((self.x64 * self.x64).sum()) / max(1, self.x.shape[1]), 1e-30)
        return xm, ym, xc, self.y64 - ym, xc @ xc.T, scale

Part = Normal | Sample  # one share (fitting or held-out) of a layer's calibration rows, in the smaller form


Rows = tuple[torch.Tensor, torch.Tensor]  # (inputs [rows, features], targets [rows, outputs])


def every_row(node: Node, y: torch.Tensor) -> bool:
    """Whether a refit of `node` reads every row of its output `y` (a linear layer; a conv with one output
    position), where a conv's reads drawn output positions."""
    return node.kind == "linear" or (y.dim() in (3, 4) and y[0, 0].numel() == 1)


def draw_rows(node: Node, y: torch.Tensor, gen: torch.Generator, positions: int) -> torch.Tensor:
    """Which rows of one batch of `node`'s output `y` a layer refit reads, drawn from `gen`: for `every_row`
    nodes a mask of the rows held out (each with probability `HELD_OUT`), else per sample its output positions
    in a random order, the first min(`positions`, positions there are) of it [n, take] (`layer_rows` holds out
    a `HELD_OUT` share from the front). The draw depends on `y`'s shape only, so a pass that records the
    targets ahead (`Recorder`) and the refit that reads them draw alike."""
    if every_row(node, y):
        return torch.rand(y.numel() // y.shape[-1 if node.kind == "linear" else 1], generator=gen) < HELD_OUT
    length = y[0, 0].numel()
    return torch.rand(y.shape[0], length, generator=gen).argsort(1)[:, :min(positions, length)]


def rows_at(node: Node, y: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """`node`'s output `y` at the rows `drawn` (`draw_rows`), channels last: [rows, C] for `every_row` nodes (every
    row), else [n, take, C]."""
    if every_row(node, y):
        return y.reshape(drawn.shape[0], -1)
    yy = y.reshape(y.shape[0], y.shape[1], -1)
    return yy.movedim(1, 2)[torch.arange(y.shape[0])[:, None], drawn]


def layer_rows(node: Node, x: torch.Tensor, y: torch.Tensor, drawn: torch.Tensor, out: list[int] | None = None,
               positions: int = POSITIONS, tap_major: bool = False) -> tuple[Rows, Rows] | None:
    """The fitting rows and the `HELD_OUT` share held out, each (inputs [rows, features], targets [rows,
    outputs]), of one batch of a conv or linear node at the rows `drawn` (`draw_rows`): its input `x` and the
    outputs it should reproduce there, `y` (`rows_at`; only the output channels `out`, when given). Conv rows
    are the first `positions` of each sample's drawn output positions (im2col, `collectors.conv_patches_at`;
    features in (tap, channel) order with `tap_major`), the held-out ones a `HELD_OUT` share from the front;
    linear rows (and a conv's when it has one output position) are every row, held out where `drawn` says.
    None for a conv input that is not 1-d or 2-d. Each part is gathered once, never copied again by a mask."""
    if drawn.dim() == 2 and x.dim() not in (3, 4):
        return None
    yy = y if out is None else y[..., out]
    if drawn.dim() == 1:  # every row (`draw_rows`: a linear layer, a conv with one output position)
        xx = x.reshape(-1, x.shape[-1]) if node.kind == "linear" else conv_patches_at(
            node.attrs, tuple(node.params["weight"].shape[2:]), x, torch.zeros(x.shape[0], 1, dtype=torch.long),
            tap_major)
        return (xx[~drawn], yy[~drawn]), (xx[drawn], yy[drawn])
    take = min(positions, drawn.shape[1])
    n_held = max(1, round(take * HELD_OUT))

    def rows(lo: int, hi: int) -> Rows:
        cols = conv_patches_at(node.attrs, tuple(node.params["weight"].shape[2:]), x, drawn[:, lo:hi], tap_major)
        return cols, yy[:, lo:hi].reshape(-1, yy.shape[2])

    return rows(n_held, take), rows(0, n_held)


def _products(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """[[X 1]ᵀ[X 1], [X 1]ᵀY] in float64 from float32 products of the rows (a few thousand: the cost of the
    refit), the column of ones never materialised."""
    s = x.sum(0).double()  # (a float64 accumulation is several times slower)
    a = torch.empty(x.shape[1] + 1, x.shape[1] + 1, dtype=torch.float64)
    a[:-1, :-1] = gram(x)
    a[:-1, -1] = a[-1, :-1] = s
    a[-1, -1] = x.shape[0]
    return [a, torch.cat([(x.T @ y).double(), y.sum(0).double()[None]])]


# whether `refit_layers` fits a layer that feeds a residual add to the sum (`residual_skip`): not a policy option,
# the benchmarks' ablation sets it with `residual_targets(...)`
_RESIDUAL: ContextVar[bool] = ContextVar("refit_residual_targets", default=True)


@contextmanager
def residual_targets(on: bool) -> Iterator[None]:
    """Runs the enclosed layer refits with (the default) or without the residual target of `residual_skip`
    (benchmark and test use: the ablation of that choice)."""
    token = _RESIDUAL.set(on)
    try:
        yield
    finally:
        _RESIDUAL.reset(token)


Skip = tuple[Value, torch.Tensor | None]  # a residual add's other operand, and the scale of a batch norm before it


def residual_skip(graph: Graph, node_id: str, pos: Mapping[str, int]) -> Skip | None:
    """The other operand of the residual add that layer `node_id`'s output alone feeds, directly or through one
    batch norm of its own (then also that norm's per-channel scale, weight / √(running_var + eps)) and identities
    (a transformer's dropout before its residual add), when that
    operand is final by the time the sweep of `refit_layers` reaches the layer (it comes before the layer in the
    topological order `pos`, so no later refit or step changes it) and has the output's shape; else None.

    Refitting the layer to its own pass-start output leaves the add with the skip path's error (the drift of the
    layers before it, or of a downsampling branch refit before it). Fitting it to its pass-start output plus
    that error (divided by the norm's scale) reproduces the sum instead: He, Zhang & Sun's reconstruction of
    multi-branch blocks ("Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, §3.3). In a
    block whose downsampling conv comes after the residual branch's last conv, the downsampling conv is the one
    fitted to the sum."""
    v: Value = (node_id, 0)
    norm: Node | None = None
    users = graph.value_users(v)
    # through identities (a dropout in eval mode) and at most one batch norm, each the value's only reader
    while len(users) == 1 and (kind := graph.node(users[0][0]).kind) in ("identity", "batch_norm"):
        if kind == "batch_norm":
            if norm is not None:
                return None
            norm = graph.node(users[0][0])
        v = (users[0][0], 0)
        users = graph.value_users(v)
    if len(users) != 1:
        return None
    add, port = users[0]
    operands = graph.operands(add)
    if graph.node(add).kind != "add" or len(operands) != 2:
        return None
    other = operands[1 - port]
    if other == v or other[0] not in pos or pos[other[0]] >= pos[node_id]:
        return None
    if graph.meta_of(other).shape != graph.meta_of(v).shape:
        return None  # a broadcast operand (a bias-like constant) is not a skip path
    return other, None if norm is None else batch_norm_scale(norm).float()


def _sum_target(own: torch.Tensor, skip_was: torch.Tensor, skip_now: torch.Tensor, scale: torch.Tensor | None,
                out: list[int] | None, axis: int) -> torch.Tensor:
    """A layer's pass-start output `own` (every channel on `axis`) plus the skip path's drift at the channels `out`
    it still computes (all when None): the skip's pass-start value less its value now, divided by the layer's norm
    `scale` when one sits before the add (channels it zeroes left alone)."""
    index = torch.tensor(out) if out is not None else torch.arange(own.shape[axis])
    drift = skip_was.index_select(axis, index) - skip_now
    if scale is not None:
        shape = [1] * drift.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
        live = scale.abs() > 1e-6 * float(scale.abs().max())
        drift = torch.where(live, drift / scale, torch.zeros_like(drift))
    return own.index_add(axis, index, drift)


@dataclass
class Recorded:
    """One layer's pass-start rows, recorded by `Recorder`: the generator seed its rows were drawn with, the
    residual add's other operand it was recorded with (`residual_skip` on the pass-start graph; None without
    one), and per calibration batch (drawn rows `draw_rows`, the layer's output there `rows_at`, that operand's
    there or None)."""

    seed: int
    skip: Value | None
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


class Recorder:
    """What `refit_layers` fits the layers `nodes` to (their pass-start outputs, and the operand a residual add
    sums them with) at the rows it will read, recorded during a pass that runs the pass-start graph over the
    calibration data anyway (`squeeze_fold`'s and `trim`'s statistics passes: tap `values()`, hand every batch
    to `add`). The refit's sweep then runs only the graph being rewritten, one model pass over the data fewer
    (the pass-start graph still runs up to a cascade step or a layer not recorded); the rows are
    drawn as the refit would draw them (`draw_rows`, seeded per layer: `ctx.seed` + 7919 × the layer's index
    in `nodes`, the index the refit seeds it by when it refits all of them), for a conv as many output
    positions as the layer at its pass-start width would read, of which a narrower refit reads the first.
    Records nothing (`note` says why) when the rows would take more than `limit_bytes`."""

    limit_bytes: ClassVar[int] = 1 << 30

    def __init__(self, graph: Graph, nodes: Iterable[str], ctx: PassContext, rows: int = LAYER_ROWS) -> None:
        topo = graph.topo_order()
        pos = {nid: i for i, nid in enumerate(topo)}
        order = sorted(set(nodes), key=lambda n: pos[n])
        samples = sum(ctx.batch_sizes()) if ctx.batches_fn is not None else 0
        self.layers: dict[str, Recorded] = {}
        self.positions: dict[str, int] = {}
        self.note: str | None = None
        size = 0  # bytes per calibration sample, at the example's sizes (a dynamic dim at its example value)
        for i, nid in enumerate(order):
            if layer_refittable(graph, nid, limit=False) is not None:  # a layer over the limit may fit it when cut
                continue
            node, w = graph.node(nid), graph.node(nid).params["weight"]
            skip = residual_skip(graph, nid, pos) if _RESIDUAL.get() else None
            self.positions[nid] = layer_positions(math.prod(w.shape[1:]), samples, rows)
            self.layers[nid] = Recorded(ctx.seed + 7919 * i, None if skip is None else skip[0])
            dims = [int(d) for d in graph.meta_of((nid, 0)).shape[1:]]
            width = dims[-1] if node.kind == "linear" else dims[0]
            per_sample = math.prod(dims[:-1]) if node.kind == "linear" else min(self.positions[nid], math.prod(dims[1:]))
            size += per_sample * (8 + 4 * width * (1 if skip is None else 2))  # the drawn index, the rows
        if not samples or size * samples > self.limit_bytes:
            self.note = ("no calibration data" if not samples else
                         f"the rows would take {size * samples >> 20} MiB, over {self.limit_bytes >> 20} MiB")
            self.layers = {}
        self._gens = {nid: torch.Generator().manual_seed(r.seed) for nid, r in self.layers.items()}
        self._nodes = {nid: graph.node(nid) for nid in self.layers}

    def values(self) -> list[Value]:
        """The values to tap: each recorded layer's output, and the residual operands."""
        return list(dict.fromkeys([v for nid, r in self.layers.items() for v in ((nid, 0), r.skip) if v is not None]))

    def add(self, acts: Mapping[Value, torch.Tensor]) -> None:
        """One calibration batch (in the order `ctx.batches()` gives them) of the tapped values."""
        for nid, r in self.layers.items():
            node, y = self._nodes[nid], acts[(nid, 0)].detach().float()
            drawn = draw_rows(node, y, self._gens[nid], self.positions[nid])
            skip = None if r.skip is None else rows_at(node, acts[r.skip].detach().float(), drawn)
            r.batches.append((drawn, rows_at(node, y, drawn), skip))


def normal_equations(graph: Graph, side: SideBySide, at: int, node_id: str, seed: int,
                     out: list[int] | None = None, positions: int = POSITIONS,
                     skip: Skip | None = None, recorded: Recorded | None = None) -> tuple[Part, Part] | None:
    """([X 1]ᵀ[X 1], [X 1]ᵀY) over the calibration rows, for the fitting rows and for the `HELD_OUT` share held
    out (drawn at random, seeded: `layer_rows`): X the node's (unrolled) inputs in `graph`, Y the original node's
    outputs (`side`'s pass-start copy; its output channels `out` when given), both read at the node's
    topological position `at`. `skip` (`residual_skip`): the other operand of the add the node's output feeds
    (and the scale of a batch norm between them); Y then also carries what that operand lost, its pass-start
    value less its value in `graph` (divided by the scale), so that the sum is what the fit reproduces. When the
    fitting rows are fewer than X's columns (a linear layer with many inputs on a small calibration set) the rows
    themselves (`Sample`, X's columns in the same order), which solve in less time and memory than the F×F normal
    equations. `recorded`: the pass-start side recorded ahead (`Recorder`, with the same `skip` operand), read
    instead of `side`'s pass-start copy, its rows drawn with its own seed instead of `seed`."""
    node = graph.node(node_id)
    src: Value = graph.operands(node_id)[0]
    dst: Value = (node_id, 0)
    gen = torch.Generator().manual_seed(seed)
    sums: list[torch.Tensor] | None = None
    kept: list[tuple[Rows, Rows]] = []  # batches not yet in `sums`: every batch while the fitting rows are few
    n_fit = 0
    extra = [] if skip is None else [skip[0]]
    pairs = side.pairs(at, [src, *extra], f"'{node_id}'", [] if recorded is not None else [dst, *extra])
    for i, (now, was) in enumerate(pairs):
        check_squarable(now[0], node_id, "inputs")
        if recorded is not None:  # the pass-start outputs at rows drawn ahead: gather the current side there
            drawn, target, skip_was = recorded.batches[i]
            if skip is not None:
                assert skip_was is not None  # `refit_layers` reads a recording only with its own skip operand
                target = _sum_target(target, skip_was, rows_at(node, now[1].detach().float(), drawn), skip[1], out,
                                     target.dim() - 1)
            got = layer_rows(node, now[0].detach().float(), target, drawn, out, positions, True)
        else:
            target = was[0].detach().float()
            if skip is not None:
                target = _sum_target(target, was[1].detach().float(), now[1].detach().float(), skip[1], out,
                                     target.dim() - 1 if node.kind == "linear" else 1)
            drawn = draw_rows(node, target, gen, positions)
            got = layer_rows(node, now[0].detach().float(), rows_at(node, target, drawn), drawn, out, positions, True)
        if got is None:
            return None
        kept.append(got)
        n_fit += got[0][0].shape[0]
        if n_fit < got[0][0].shape[1]:
            continue
        for batch in kept:  # as many fitting rows as inputs: the normal equations are the smaller form
            parts = [m for xr, yr in batch for m in _products(xr, yr)]
            sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
        kept = []
    if sums is None and not kept:
        return None
    w = node.params["weight"]
    assert isinstance(w, torch.Tensor)  # the refit's layers have dense weights (`layer_refittable`)
    perm: torch.Tensor | None = None
    if node.kind == "conv":  # features gathered (tap, channel): to the weight's (channel, tap) order
        c, taps = w.shape[1], w[0, 0].numel()
        perm = torch.arange(c * taps).reshape(taps, c).T.reshape(-1)  # (channel, tap) j -> its (tap, channel) index
    if sums is None:
        shares = [Sample(torch.cat([b[i][0] for b in kept]), torch.cat([b[i][1] for b in kept])) for i in (0, 1)]
        if perm is not None:
            shares = [Sample(sh.x[:, perm], sh.y) for sh in shares]
        return shares[0], shares[1]
    if perm is not None:
        perm = torch.cat([perm, torch.tensor([c * taps])])
        sums = [m[perm][:, perm] if i % 2 == 0 else m[perm] for i, m in enumerate(sums)]
    return (sums[0], sums[1]), (sums[2], sums[3])


def held_error(held: Part, w: torch.Tensor) -> float:
    """Σ‖[X 1]w − y‖² over the held-out rows, less the constant Σ‖y‖², of the solution `w` [features+1, outputs]."""
    if isinstance(held, Sample):
        pred = held.x64 @ w[:-1] + w[-1]
        return float((pred * pred).sum() - 2 * (pred * held.y64).sum())
    return float((w * (held[0] @ w)).sum() - 2 * (w * held[1]).sum())


def ridge_solve(part: Part, ridge: float, fallback: bool = False) -> torch.Tensor | None:
    """The least-squares solution [features+1, outputs] (weights, then the intercept) over the rows of `part` with
    `ridge` (relative to the mean diagonal of XᵀX, `squeeze_math.ridged_normal`) on the weights, not the
    intercept. By Cholesky: None when the system is too ill-conditioned for it (`cholesky_solve`), unless
    `fallback` (then the minimum-norm solution, `solve_normal`). A `Sample` is solved in row space: with the
    intercept eliminated by centring (X_c, Y_c the rows less their means), w = X_cᵀ(X_cX_cᵀ + λI)⁻¹Y_c, the same
    w as (X_cᵀX_c + λI)⁻¹X_cᵀY_c, which the normal equations solve."""
    solve = solve_normal if fallback else cholesky_solve
    if not isinstance(part, Sample):
        return solve(ridged_normal(part[0], ridge), part[1])
    if part.x.shape[0] == 0:
        return None
    xm, ym, xc, yc, gram_rows, scale = part.centred
    k = gram_rows.clone()
    k.diagonal().add_(ridge * scale)
    alpha = solve(k, yc)
    if alpha is None:
        return None
    w = xc.T @ alpha
    return torch.cat([w, (ym - xm @ w)[None]])


def best_ridge(fit: Part, held: Part) -> tuple[float, float]:
    """(ridge, its held-out error `held_error`): the ridge among `RIDGES` whose fit on the fitting rows has the
    least error on the held-out rows, found downhill: from `RIDGE_START`, to whichever neighbour errs less, while
    one does. The held-out error falls and then rises along `RIDGES` (on every layer of the benchmark models), so
    this is the least of them from about half the solves (a solve is a Cholesky factorisation of the normal
    matrix: the refit's cost on wide layers).

    A ridge that leaves the normal matrix too ill-conditioned for Cholesky is not a candidate (the SVD
    solve it would need took 10 s per candidate at about a thousand inputs, and a larger ridge serves): the
    search starts at the smallest ridge from `RIDGE_START` up that is one; the largest ridge, with an infinite
    error, when none is."""
    errors: dict[int, float] = {}

    def error(i: int) -> float:
        if i not in errors:
            sol = ridge_solve(fit, RIDGES[i])
            errors[i] = math.inf if sol is None else held_error(held, sol)
        return errors[i]

    i = RIDGES.index(RIDGE_START)
    while math.isinf(error(i)) and i + 1 < len(RIDGES):  # a larger ridge conditions the matrix better
        i += 1
    while True:
        j = min((k for k in (i - 1, i + 1) if 0 <= k < len(RIDGES)), key=error)
        if not error(j) < error(i):
            return RIDGES[i], error(i)
        i = j


def ridge_refit(fit: Part, held: Part, current: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """(solution [features+1, outputs], ridge): the ridge least-squares fit on all rows at the ridge `best_ridge`
    chooses, or `current` (the layer as it is, `as_solution`) with ridge None when the fit on the fitting rows does
    no better than it on the held-out rows: with few samples for many inputs it would fit the calibration data,
    not the layer."""
    ridge, err = best_ridge(fit, held)
    if err >= held_error(held, current):
        return current, None
    if isinstance(fit, Sample) and isinstance(held, Sample):
        both: Part = Sample(torch.cat([fit.x, held.x]), torch.cat([fit.y, held.y]))
    else:
        assert not isinstance(fit, Sample) and not isinstance(held, Sample)  # `normal_equations` forms both alike
        both = (fit[0] + held[0], fit[1] + held[1])
    sol = ridge_solve(both, ridge, fallback=True)
    assert sol is not None  # `fallback`: a solution always
    return sol, ridge


def select(part: Part, feats: torch.Tensor, outs: torch.Tensor) -> Part:
    """`part` restricted to the input columns `feats` (the intercept kept) and the output columns `outs`."""
    if isinstance(part, Sample):
        return Sample(part.x[:, feats], part.y[:, outs])
    sel = torch.cat([feats, torch.tensor([part[0].shape[0] - 1])])
    return part[0][sel][:, sel], part[1][sel][:, outs]


def as_solution(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A conv/linear layer's weight [out, ...] and bias [out] as a least-squares solution [features+1, out] (the
    layout `normal_equations` and `held_error` use), to weigh the layer as it is against a refit."""
    w = weight.detach().double().reshape(weight.shape[0], -1).T
    b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    return torch.cat([w, b[None]])


def layer_refittable(graph: Graph, node_id: str, limit: bool = True) -> str | None:
    """Why node `node_id`'s whole weight cannot be re-solved by least squares (None: it can): a linear layer
    or a 1-d/2-d conv with one group, dense weights, at most `MAX_LAYER_FEATURES` inputs (unless not `limit`:
    whether it can once its inputs are cut)."""
    node = graph.node(node_id)
    w, b = node.params.get("weight"), node.params.get("bias")
    if node.kind not in ("conv", "linear") or not isinstance(w, torch.Tensor) or (
            b is not None and not isinstance(b, torch.Tensor)):
        return "not a conv or linear layer with dense weights"
    if node.kind == "conv" and (attr(node, "groups") != 1 or w.dim() not in (3, 4)):
        return "a grouped or 3-d conv"
    if limit and w[0].numel() > MAX_LAYER_FEATURES:
        return f"{w[0].numel()} inputs, over {MAX_LAYER_FEATURES}"
    return None


def layer_plan(graph: Graph, groups: ChannelGroups, keeps: Mapping[int, list[int]]
               ) -> tuple[list[str], dict[str, list[int]]]:
    """What `refit_layers` re-solves after the groups in `keeps` (group id → kept channels, ascending) are cut
    from `graph` (the pass-start graph `groups` were found on): their conv/linear consumers, and each cut
    producer's kept output positions (pass-start indices, ascending: the order the rewrite leaves its rows in, also
    when a group channel spans several positions, a gated split's halves or a grouped consumer's slots; and with
    what other groups of the same producer drop removed as well). A group that keeps nothing is a residual branch
    removed whole (`rewrite.branch_removable`): its consumers are gone, and the layers that read the sum it fed
    (the consumers of the groups its adds belong to) are re-solved instead, the skip path now carrying alone
    what the block computed; the layers the removal deletes (`rewrite.branch_removal`: the branch's own, and in an
    attention block its projections and sequence reduction) are left out."""
    nodes = [n for gid, keep in keeps.items() for n in groups[gid].consumers if keep]
    removed = [gid for gid, keep in keeps.items() if not keep]
    chains, gone = branch_removal(graph, [n for gid in removed for n in groups[gid].consumers])
    gone |= chains.keys()  # each consumer is deleted or becomes its branch's constant
    # the add each removed branch fed: the one user of its chain's end
    adds = {graph.value_users((chain[-1] if chain else nid, 0))[0][0] for nid, chain in chains.items()}
    nodes += [n for g in groups if any(m.node in adds for m in g.members) for n in g.consumers]
    nodes = [n for n in dict.fromkeys(nodes) if n not in gone and graph.node(n).kind in ("conv", "linear")]
    dropped: dict[str, set[int]] = {}
    size: dict[str, int] = {}
    for gid, keep in keeps.items():
        kept = set(keep)
        for m in groups[gid].members_of("producer"):
            if m.param is not None and (m.param, m.axis) in spec(graph.node(m.node).kind).produced:
                size[m.node] = graph.node(m.node).params[m.param].shape[m.axis]
                dropped.setdefault(m.node, set()).update(
                    q for c, qs in enumerate(m.index) if c not in kept for q in qs)
    out = {nid: [q for q in range(size[nid]) if q not in gone] for nid, gone in dropped.items()}
    return list(dict.fromkeys(nodes)), out


def layer_positions(features: int, samples: int, rows: int = LAYER_ROWS) -> int:
    """The conv output positions per calibration sample a layer refit of `features` inputs draws from `samples`
    samples: enough for `rows` rows in all, at most `ROWS_PER_INPUT` rows per input, never fewer than
    `POSITIONS` (`POSITIONS` when the sample count is unknown)."""
    if not samples:
        return POSITIONS
    return max(POSITIONS, min(-(-rows // samples), -(-ROWS_PER_INPUT * features // samples)))


# another rewrite run in `refit_layers`' sweep: (the topological position of the first node it changes, the rewrite,
# given the sweep's side-by-side source to read the calibration data from at that position)
SweepStep = tuple[int, Callable[[SideBySide], None]]


def refit_layers(graph: Graph, ref: Graph, ctx: PassContext, nodes: Iterable[str], out: Mapping[str, list[int]],
                 notes: list[str], label: str, steps: Sequence[SweepStep] = (), rows: int = LAYER_ROWS,
                 recorder: Recorder | None = None) -> int:
    """Re-solves the whole weight and bias of each of `nodes` (conv or linear) in graph order by least squares
    on the calibration data so that its output matches the same node's in `ref` (the pass-start graph: same
    node ids; `out[node]`: the ref output channels the node still computes, all when absent). Every kernel
    tap of every kept input channel is a free column, where a fold only remaps channels per tap: the
    reconstruction step of channel pruning (He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep
    Neural Networks", ICCV 2017; ThiNet, Luo et al. 2017). Inputs are the node's inputs as `graph` (rewritten
    and refit so far) computes them, so each fit also corrects the drift of the layers before it; the ridge
    is chosen per node on held-out rows, and a node whose fit on the other rows does no better on the held-out
    rows than its weights as they are keeps them (a small calibration set would be fitted, not the layer).
    Returns how many nodes were refit; `notes` (prefixed `label`) say which were not and why.

    `steps`: other rewrites that read the calibration data side by side (`SweepStep`, positions in
    `graph.topo_order()`), run in the same sweep in position order, each before the layers from its position on
    (so a layer is refit on inputs they changed, and with the output channels they cut) and after the layers
    before it (a step reads their refit outputs; run as a sweep of their own, before every layer, it read their
    outputs before the refit): one sweep over the data for both, where two sweeps would run both graphs twice.
    `rows`: the conv rows each layer aims for (`LAYER_ROWS`; fewer make a cheaper, rougher refit), at most
    `ROWS_PER_INPUT` per input of the layer (`layer_positions`). `recorder`: the pass-start rows recorded ahead
    (`Recorder`, same `rows`), read for every layer it recorded with the residual operand the layer has now;
    when that is every layer and there are no `steps`, the pass-start copy `ref` does not run at all."""
    topo = graph.topo_order()
    pos = {nid: i for i, nid in enumerate(topo)}
    todo = sorted(set(nodes), key=lambda n: pos[n])
    samples = sum(ctx.batch_sizes()) if ctx.batches_fn is not None else 0
    events = sorted([(at, 0, i) for i, (at, _) in enumerate(steps)] + [(pos[n], 1, i) for i, n in enumerate(todo)])
    # the graph's structure stays through the sweep (steps cut channels only): the residual operands now
    recorded: dict[str, Recorded] = {}
    for n in todo:
        skip = residual_skip(graph, n, pos) if _RESIDUAL.get() else None
        if recorder is not None and (r := recorder.layers.get(n)) is not None and r.skip == (skip and skip[0]):
            recorded[n] = r
    if recorder is not None and recorder.note is not None:
        notes.append(f"{label}: pass-start outputs not recorded ahead ({recorder.note}): the pass-start graph "
                     "runs beside the refit")
    # the pass-start copy runs to the last step or the last layer whose targets were not recorded
    ref_until = max([at for at, _ in steps] + [pos[n] for n in todo if n not in recorded and
                                               layer_refittable(graph, n, limit=False) is None], default=-1)
    side = SideBySide(Frontier.open(graph, ref, ctx, topo, ref_until if recorder is not None else None), graph, ref,
                      ctx, notes, label, [e[0] for e in events])
    done = 0
    for _, kind, step in events:
        if kind == 0:
            steps[step][1](side)
            continue
        nid = todo[step]
        why = layer_refittable(graph, nid)
        node = graph.node(nid)
        w = node.params["weight"]
        if why is None and len(out.get(nid, range(ref.node(nid).params["weight"].shape[0]))) != w.shape[0]:
            why = "its output channels do not match the pass-start graph's"
        positions = layer_positions(math.prod(w.shape[1:]), samples, rows)
        skip = residual_skip(graph, nid, pos) if _RESIDUAL.get() else None  # after the steps before it
        rec = recorded.get(nid)
        if rec is not None and rec.skip != (skip and skip[0]):
            rec = None  # a step changed it (steps run only where the pass-start copy runs: `ref_until`)
        stats = None if why is not None else normal_equations(
            graph, side, pos[nid], nid, ctx.seed + 7919 * step if rec is None else rec.seed, out.get(nid),
            positions, skip, rec)
        if stats is None:
            notes.append(f"{label}: '{nid}' not refit whole ({why or 'no calibration rows, or an unrolled input rank'})")
            continue
        bias = node.params.get(spec(node.kind).bias["weight"][0])
        assert isinstance(w, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))  # layer_refittable
        sol, ridge = ridge_refit(*stats, as_solution(w, bias))  # [features+1, outputs]
        if ridge is None:
            notes.append(f"{label}: '{nid}' kept as it is: its refit was no better on held-out calibration rows")
            continue
        node.params["weight"] = sol[:-1].T.reshape(w.shape).to(w.dtype)
        node.params[spec(node.kind).bias["weight"][0]] = sol[-1].to(w.dtype)
        done += 1
    notes.append(f"{label}: {done} of {len(todo)} layers refit whole by least squares to the pass-start outputs")
    if ctx.result_fn is not None and side.frontier is not None and not side.streamed and side.frontier.at > 0:
        # the graph as refit, run on from the last checkpoint to its outputs: the compile need not run it again
        outs = side.frontier.outputs()
        if outs is not None:
            ctx.result_fn(graph, outs)
    return done
