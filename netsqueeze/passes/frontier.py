"""The calibration data run through a graph being rewritten and its pass-start copy side by side, layer by
layer: what the cascade refits of `squeeze_fold` and `trim` (`passes.refit`) read, at a cost of a few model
passes over the data whatever the number of channel groups they rewrite.

A cascade rewrites groups one at a time in topological order of the first node each touches. Per calibration
batch, `Frontier` keeps the live tensors of both graphs at a checkpoint position of that order; for the next
group it moves the checkpoint forwards to just before the group's first node (nothing before it has changed
or will) and runs both graphs from there to the values the group's refit reads. `SideBySide` adds the
fallbacks: both graphs streamed whole per group (`PassContext.stream`) when the compiler gives no
layer-by-layer runner (`PassContext.segment`), or from the group on whose checkpoint would hold more than
`Frontier.limit_bytes` of activations. The two routes give the same tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch

from netsqueeze.ir.graph import Graph, Value
from netsqueeze.passes.base import PassContext, Segment
from netsqueeze.passes.dependency import ChannelGroup

# per calibration batch, the tensors at the requested values in the graph being rewritten and in its copy
Pairs = Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]]


def first_positions(topo: list[str], groups: Iterable[ChannelGroup]) -> dict[int, int]:
    """Per group id, the position in `topo` of the first node the group touches: a rewrite of the group leaves
    everything before it as it was (the cascades' checkpoints, the prefixes candidates run from)."""
    pos = {nid: i for i, nid in enumerate(topo)}
    return {g.id: min(pos[m.node] for m in g.members) for g in groups}


class Liveness:
    """The values of `graph` live at each position of its topological order `topo`: produced before the
    position (graph inputs before every position) and read at or after it; `outputs`: graph outputs count
    as read at the end."""

    def __init__(self, graph: Graph, topo: list[str], outputs: bool) -> None:
        self.graph = graph
        self.pos = pos = {nid: i for i, nid in enumerate(topo)}
        self.last: dict[Value, int] = {}  # the last position reading each value
        for nid in topo:
            if graph.node(nid).kind == "output" and not outputs:
                continue
            for v in graph.operands(nid):
                self.last[v] = max(self.last.get(v, -1), pos[nid])

    def at(self, at: int) -> list[Value]:
        return [v for v, last in self.last.items() if last >= at and
                (self.graph.node(v[0]).kind == "input" or self.pos[v[0]] < at)]


class Prefixes:
    """A graph's live tensors at chosen positions of its topological order over the leading calibration
    batches, from one layer-by-layer run (`PassContext.segment`): a candidate that equals the graph before
    position p (one channel group rewritten from p on) is then measured from p (`PassContext.fidelity(...,
    feeds=)`) instead of from the inputs. Positions whose tensors would take the kept ones past `limit_bytes`
    are left out, as are those where only the inputs are live; `feeds` is None for them (measure whole)."""

    limit_bytes: ClassVar[int] = 1 << 30

    def __init__(self, graph: Graph, ctx: PassContext, positions: Iterable[int], batches: int | None) -> None:
        self.at: dict[int, list[Value]] = {}
        self.tensors: list[dict[Value, torch.Tensor]] = []
        self.inputs = inputs = [(nid, 0) for nid in graph.inputs]
        if ctx.segment_fn is None or ctx.batches_fn is None:
            return
        leading = list(itertools.islice(ctx.batches(), batches))
        self.at = self.kept(graph, positions, sum(int(b[0].shape[0]) for b in leading))
        if not self.at:
            return
        wanted = list(dict.fromkeys(v for vals in self.at.values() for v in vals if v not in inputs))
        run = ctx.segment(graph, inputs, wanted) if wanted else None
        with torch.no_grad():
            for batch in leading:
                got: dict[Value, torch.Tensor] = dict(zip(inputs, batch))
                if run is not None:
                    got.update(zip(wanted, run(list(batch))))
                self.tensors.append(got)

    @classmethod
    def kept(cls, graph: Graph, positions: Iterable[int], samples: int) -> dict[int, list[Value]]:
        """The positions (of `graph.topo_order()`) whose live values the prefixes keep over `samples` samples,
        with those values: in position order, each whose new values still fit `limit_bytes` with the earlier
        ones', where something besides the inputs is live."""
        inputs = [(nid, 0) for nid in graph.inputs]
        live = Liveness(graph, graph.topo_order(), outputs=True)
        out: dict[int, list[Value]] = {}
        wanted: set[Value] = set()
        size = 0
        for p in sorted(set(positions)):
            vals = live.at(p)
            if all(v in inputs for v in vals):
                continue
            new = [v for v in vals if v not in wanted and v not in inputs]
            more = sum(bytes_per_sample(graph, v) for v in new) * samples
            if size + more > cls.limit_bytes:
                continue
            out[p], size = vals, size + more
            wanted.update(new)
        return out

    def feeds(self, position: int) -> tuple[list[Value], list[list[torch.Tensor]]] | None:
        """(values, their tensors per leading batch) live at `position`, or None when not kept; the graph inputs
        not live there come last, as shape-only stand-ins (`shape_only`), for the dynamic dims read from them."""
        vals = self.at.get(position)
        if vals is None:
            return None
        sized = [v for v in self.inputs if v not in vals]
        return vals + sized, [[t[v] for v in vals] + [shape_only(t[v]) for v in sized] for t in self.tensors]


def shape_only(t: torch.Tensor) -> torch.Tensor:
    """A "meta" tensor of `t`'s shape and dtype (no data): what a segment feeds for a graph input it reads only
    the sizes of (a dynamic dim, as an ONNX model's sequence length, read from the input that declares it)."""
    return t if t.device.type == "meta" else torch.empty(t.shape, dtype=t.dtype, device="meta")


def bytes_per_sample(graph: Graph, v: Value) -> int:
    """Bytes one calibration sample of value `v` takes (its shape past the batch axis, its dtype)."""
    meta = graph.meta_of(v)
    if not meta.shape:
        return 0
    return (meta.numel() // max(1, int(meta.shape[0])) *
            torch.empty((), dtype=getattr(torch, meta.dtype, torch.float32)).element_size())


class Frontier:
    """The calibration data run through two graphs of one topology (the graph being rewritten and its
    pass-start copy) layer by layer: per batch, the live tensors of both at a checkpoint position of the
    topological order, advanced only forwards; `fetch` runs both from the checkpoint to other values,
    batch by batch, without storing them. Parts of the graphs run through `PassContext.segment`, so the
    compiler counts what each costs."""

    def __init__(self, graphs: tuple[Graph, Graph], ctx: PassContext, topo: list[str],
                 state: list[tuple[dict[Value, torch.Tensor], dict[Value, torch.Tensor]]],
                 ref_until: int | None = None) -> None:
        self.graphs, self.ctx, self.topo, self.state = graphs, ctx, topo, state
        # the last checkpoint position the pass-start copy runs to (None: every one); past it a fetch asks the
        # rewritten graph only
        self.ref_until = ref_until
        self.at = 0
        # the pass-start copy's tensors at a later checkpoint, computed by the last `fetch` (position, state)
        self._ref_next: tuple[int, list[dict[Value, torch.Tensor]]] | None = None
        self.live = Liveness(graphs[0], topo, outputs=False)  # nothing here needs the graph outputs

    @staticmethod
    def open(graph: Graph, ref: Graph, ctx: PassContext, topo: list[str], ref_until: int | None = None
             ) -> Frontier | None:
        """The frontier at the inputs, or None without a layer-by-layer runner. `ref_until`: the last checkpoint
        position anything reads the pass-start copy at (None: any); past it the copy is not run (what the rest
        reads of it comes from elsewhere: `refit.Recorder`), and only the rewritten graph's tensors are kept."""
        if ctx.segment_fn is None or ctx.batches_fn is None:
            return None
        inputs = [(nid, 0) for nid in graph.inputs]
        keep = ref_until is None or ref_until >= 0
        state = [(dict(zip(inputs, batch)), dict(zip(inputs, batch)) if keep else {}) for batch in ctx.batches()]
        return Frontier((graph, ref), ctx, topo, state, ref_until)

    def _ref_at(self, position: int) -> bool:
        """Whether the pass-start copy runs to checkpoint `position`."""
        return self.ref_until is None or position <= self.ref_until

    def _run(self, which: int, fetch: list[Value], feeds: list[Value] | None = None) -> Segment:
        """Graph `which` (0: the one being rewritten, 1: its pass-start copy) from `feeds` (the checkpoint's
        values when None) to `fetch`."""
        if feeds is None:
            feeds = list(self.state[0][0]) if self.state else []
        run = self.ctx.segment(self.graphs[which], feeds, fetch)
        assert run is not None  # open() checked the compiler provides segments
        return run

    # the most the checkpoint of both graphs may hold; a group whose checkpoint would hold more streams
    # both graphs whole instead (slower, same fold)
    limit_bytes: ClassVar[int] = 2 << 30

    def _fits(self, keep: list[Value], both: bool = True) -> bool:
        """Whether both graphs' tensors at `keep` (the rewritten graph's alone unless `both`), over every batch,
        fit `limit_bytes`."""
        samples = sum(int(cur[v].shape[0]) for cur, _ in self.state for v in list(cur)[:1])
        return (2 if both else 1) * sum(bytes_per_sample(self.graphs[0], v) for v in keep) * samples <= self.limit_bytes

    def advance(self, to: int) -> bool:
        """Moves the checkpoint forwards to position `to` (nothing happens for an earlier position); False
        when the tensors live there would not fit `limit_bytes` (the checkpoint then stays where it was).
        The pass-start copy's side is taken from the last `fetch` when it computed that position, and runs from
        there when it computed an earlier one (a checkpoint passed over: a planned step that read nothing)."""
        if to <= self.at or not self.state:
            return True
        keep = self.live.at(to)
        if not self._fits(keep, self._ref_at(to)):
            return False
        ready = self._ref_next
        if ready is not None and ready[0] <= to:  # used now, or for a checkpoint passed over
            self._ref_next = None
        feeds = list(self.state[0][0])
        refs = ready[1] if ready is not None and ready[0] == to else None
        # the pass-start copy runs from a passed-over checkpoint's tensors when the last fetch computed them (a
        # look-ahead is always past the checkpoint), else from the current ones (each batch's released as its new
        # ones replace them)
        passed = ready[1] if ready is not None and ready[0] < to else None
        ref_feeds = list(passed[0]) if passed else feeds
        run_now = self._run(0, keep)
        run_ref = self._run(1, keep, ref_feeds) if refs is None and self._ref_at(to) else None
        with torch.no_grad():
            for i, (cur, orig) in enumerate(self.state):
                now = self._sized(dict(zip(keep, run_now([cur[v] for v in feeds]))), cur)
                if run_ref is not None:
                    src = passed[i] if passed is not None else orig
                    self.state[i] = (now, self._sized(dict(zip(keep, run_ref([src[v] for v in ref_feeds]))), cur))
                else:
                    self.state[i] = (now, self._sized(refs[i], cur) if refs is not None else {})
        self.at = to
        return True

    def _sized(self, values: dict[Value, torch.Tensor], was: dict[Value, torch.Tensor]) -> dict[Value, torch.Tensor]:
        """`values` with every graph input they lack as a shape-only ("meta") stand-in of its tensor in `was`: a
        dynamic dim (an ONNX model's sequence length, H and W) is read from a graph input's size, and the
        segments that start past every use of that input still need the size (a mask's arithmetic, a reshape)."""
        for nid in self.graphs[0].inputs:
            v = (nid, 0)
            if v not in values and v in was:
                values[v] = shape_only(was[v])
        return values

    def fetch(self, values: list[Value], then: int | None = None, ref_values: list[Value] | None = None
              ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Per batch, the tensors at `values` in the graph being rewritten and at `ref_values` (`values` when
        None) in the pass-start copy, both run from the checkpoint: a side runs only what its values need
        (a layer refit reads the layer's input in one and its output in the other). `then`: the position
        the next `advance` will move to; the pass-start copy (which never changes) computes its tensors
        there in the same run, so that advance runs only the graph being rewritten."""
        ref_values = values if ref_values is None else ref_values
        assert self._ref_at(self.at) or not ref_values, "the pass-start copy does not run this far"
        if not (values or ref_values) or not self.state:
            return
        extra: list[Value] = []
        if then is not None and self._ref_at(then) and then > self.at and (self._ref_next is None or self._ref_next[0] != then):
            extra = self.live.at(then)  # unless an earlier fetch computed it already
        if extra and not self._fits(extra):
            extra = []
        feeds = list(self.state[0][0])
        wanted = list(dict.fromkeys([*ref_values, *extra]))
        run_now = self._run(0, values) if values else None
        run_ref = self._run(1, wanted) if wanted else None
        nxt: list[dict[Value, torch.Tensor]] = []
        for cur, orig in self.state:
            with torch.no_grad():
                now = run_now([cur[v] for v in feeds]) if run_now is not None else []
                got = run_ref([orig[v] for v in feeds]) if run_ref is not None else []
            was = dict(zip(wanted, got))
            if extra:
                nxt.append(self._sized({v: was[v] for v in extra}, cur))
            yield now, [was[v] for v in ref_values]
        if extra and then is not None:  # every batch ran: the next checkpoint's pass-start side is ready
            self._ref_next = (then, nxt)

    def outputs(self) -> list[list[torch.Tensor]] | None:
        """The graph being rewritten's outputs on every batch, run from the checkpoint (the pass-start copy is not
        run); None when an output was computed before the checkpoint and not kept there."""
        graph = self.graphs[0]
        outs = graph.output_values()
        pos = self.live.pos
        if not self.state or any(v not in self.state[0][0] and (v[0] not in pos or pos[v[0]] < self.at)
                                 for v in outs):
            return None
        # the graph inputs fed as well: a size the rest computes from them (an upsampling to the input's size)
        inputs = [(nid, 0) for nid in graph.inputs]
        feeds = list(dict.fromkeys([*self.state[0][0], *inputs]))
        todo = [v for v in outs if v not in feeds]
        run = self._run(0, todo, feeds) if todo else None
        got: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for (cur, _), batch in zip(self.state, self.ctx.batches()):
                have = {**cur, **dict(zip(inputs, batch))}
                if run is not None:
                    have.update(zip(todo, run([have[v] for v in feeds])))
                got.append([have[v] for v in outs])
        return got


class SideBySide:
    """A cascade's source of side-by-side activations: `pairs(at, values, step)` for each step (a group, or a
    layer) in checkpoint order (`at`: the topological position of the first node the step touches; `step`
    names it in the notes, e.g. "group 3"), from `frontier`
    (`Frontier.open`'s, None without a layer-by-layer runner) when it can, else streaming both graphs whole.
    `checkpoints`: every position the cascade will ask for, so that each fetch also computes the pass-start
    copy's tensors at the next one (`Frontier.fetch`). `notes` (the pass's report lines, prefixed `label`)
    say when the fallback was taken."""

    def __init__(self, frontier: Frontier | None, graph: Graph, ref: Graph, ctx: PassContext, notes: list[str],
                 label: str, checkpoints: Iterable[int] = ()) -> None:
        self.graph, self.ref, self.ctx, self.notes, self.label = graph, ref, ctx, notes, label
        self.checkpoints = sorted(set(checkpoints))
        self.frontier = frontier
        self.streamed = False
        if self.frontier is None:
            notes.append(f"{label}: each step streamed both graphs whole (no layer-by-layer runner)")

    def pairs(self, at: int, values: list[Value], step: str, ref_values: list[Value] | None = None) -> Pairs:
        """Per batch, (the tensors at `values` in the graph being rewritten, those at `ref_values` — `values`
        when None — in the pass-start copy)."""
        ref_values = values if ref_values is None else ref_values
        if self.frontier is not None and self.frontier.advance(at):
            return self.frontier.fetch(values, next((p for p in self.checkpoints if p > at), None), ref_values)
        if self.frontier is not None and not self.streamed:
            self.notes.append(f"{self.label}: from {step} on, steps whose checkpoint would hold more than "
                              f"{Frontier.limit_bytes >> 20} MiB of activations streamed both graphs whole")
        self.streamed = True
        if not (values or ref_values):
            return iter(())
        now = self.ctx.stream(self.graph, values) if values else itertools.repeat([])
        return zip(now, self.ctx.stream(self.ref, ref_values) if ref_values else itertools.repeat([]))
