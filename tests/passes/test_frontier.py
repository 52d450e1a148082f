"""Frontier: the calibration data through two graphs side by side, checkpoint by checkpoint."""

from __future__ import annotations

import weakref

import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.compiler.calibration import segment_runner
from netsqueeze.ir.graph import Graph
from netsqueeze.passes.base import PassContext, Segment
from netsqueeze.passes.frontier import Frontier


def _open(watch: list[weakref.ref], runs: list[tuple[str, int]], built: list | None = None) -> Frontier:
    """Three linears over 4 batches; every segment run records which graph ran and how many `watch`ed tensors
    were alive then; `built` gets (graph, feeds) of every segment."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5)).eval()
    x = torch.randn(8, 5)
    data = [(x[k::4],) for k in range(4)]
    g = ns.import_model(m, (x[:2],))
    graph, ref = g.copy(), g.copy()
    seg = segment_runner()

    def segment(gr: Graph, feeds: list, fetch: list) -> Segment:
        run = seg(gr, feeds, fetch)
        if built is not None:
            built.append(("ref" if gr is ref else "now", [nid for nid, _ in feeds]))

        def counted(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            runs.append(("ref" if gr is ref else "now", sum(r() is not None for r in watch)))
            return run(ts)
        return counted

    ctx = PassContext(batches_fn=lambda: iter(data), segment_fn=segment)
    f = Frontier.open(graph, ref, ctx, g.topo_order())
    assert f is not None
    return f


def test_advance_releases_each_batchs_pass_start_tensors_as_it_replaces_them() -> None:
    watch: list[weakref.ref] = []
    runs: list[tuple[str, int]] = []
    f = _open(watch, runs)
    f.advance(2)
    # the data tensors (a graph input past its last use stays as a shape-only "meta" stand-in, no data)
    watch += [weakref.ref(t) for _, orig in f.state for t in orig.values() if t.device.type != "meta"]
    runs.clear()
    f.advance(4)
    # the old checkpoint's pass-start tensors (one per batch) still alive at each batch's run of the copy
    assert [n for who, n in runs if who == "ref"] == [4, 3, 2, 1]


def test_advance_past_a_look_ahead_runs_the_copy_from_it_with_the_same_tensors() -> None:
    f = _open([], [], built := [])
    f.advance(2)  # nodes: input, 0 (linear), 1 (relu), 2 (linear), 3 (relu), 4 (linear), output
    got = [now[0] for now, _ in f.fetch([("2", 0)], then=4)]  # the look-ahead computes the copy at position 4
    assert [tuple(t.shape) for t in got] == [(2, 5)] * 4
    f.advance(5)  # 4 passed over: the copy runs from there, with the same tensors as from the checkpoint
    fresh = _open([], [])
    fresh.advance(5)
    # the copy ran once from 2 (the fetch, to 4 as well) and once from 4, not again from 2; the graph input, past
    # its last use, rides along as a shape-only stand-in (its sizes for dynamic dims)
    assert built[2:] == [("now", ["0", "input"]), ("ref", ["0", "input"]), ("now", ["0", "input"]),
                         ("ref", ["2", "input"])]
    assert [list(o) for _, o in f.state] == [list(o) for _, o in fresh.state] == [[("3", 0), ("input", 0)]] * 4
    assert all(o[("input", 0)].device.type == "meta" for _, o in f.state)
    assert all(torch.equal(a[k], b[k]) for (_, a), (_, b) in zip(f.state, fresh.state) for k in a if k != ("input", 0))
    assert all(torch.equal(a[k], b[k]) for (a, _), (b, _) in zip(f.state, fresh.state) for k in a if k != ("input", 0))
