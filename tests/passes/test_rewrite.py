"""`apply_selection`: slicing every member, attr updates, the fold path (linear, conv, flatten→linear), bias shift."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.dependency import ChannelGroups, find_groups
from netsqueeze.passes.rewrite import ChannelSelection, GroupFold, apply_selection
from tests.passes.graphs import attention, cnn, conv, linear, mlp, run, zero_channels


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    """Gradients off inside these tests only (a module-level switch would leak into other test files)."""
    with torch.no_grad():
        yield


def half_selection(groups: ChannelGroups) -> dict[int, ChannelSelection]:
    """Drops every other channel (the odd ones) of every prunable group."""
    return {g.id: ChannelSelection(keep=list(range(0, g.size, 2))) for g in groups.prunable() if g.size > 1}


@pytest.mark.parametrize("make", [mlp, cnn, attention])
def test_zeroed_channels_trim_exactly(make) -> None:  # type: ignore[no-untyped-def]
    g = make()
    groups = find_groups(g)
    sel = half_selection(groups)
    assert sel
    for gid, s in sel.items():
        zero_channels(g, groups[gid], [c for c in range(groups[gid].size) if c not in s.keep])
    x = [torch.randn(*g.node(i).attrs["shape"]) for i in g.inputs]
    before = run(g, x)[0]
    params0 = graph_stats(g).params
    res = apply_selection(g, groups, sel)
    assert res.changed
    after = run(g, x)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert graph_stats(g).params < params0


def test_cnn_attrs_and_shapes() -> None:
    g = cnn()
    groups = find_groups(g)
    apply_selection(g, groups, half_selection(groups))
    assert g.node("dw").attrs["groups"] == g.node("dw").params["weight"].shape[0]
    assert g.node("gconv").attrs["groups"] == 2
    assert g.node("fc").params["weight"].shape[1] == g.node("flat").meta[0].shape[1]


def test_attention_head_count_updated() -> None:
    g = attention()
    groups = find_groups(g)
    heads = next(gr for gr in groups if "attn" in gr.producers and gr.frozen is None)
    apply_selection(g, groups, {heads.id: ChannelSelection(keep=[1])})
    assert g.node("attn").attrs["num_heads"] == 1
    assert tuple(g.node("attn").params["in_proj_weight"].shape) == (12, 8)
    assert tuple(g.node("attn").params["out_proj_weight"].shape) == (8, 4)


def test_split_and_slice_attrs() -> None:
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (2, 4, 3, 3)})
    a = conv(g, "c1", x, 4, 10)
    s = g.add_node("split", "split", [a], attrs={"axis": 1, "sizes": (4, 6)})
    sl = g.add_node("sl", "slice", [(s, 1)], attrs={"axis": 1, "start": 2, "end": 6})
    h = g.add_node("add", "add", [conv(g, "c2", (s, 0), 4, 4), sl])
    g.add_node("out", "output", [conv(g, "c3", h, 4, 2)])
    g.infer_shapes()
    groups = find_groups(g)
    sel = half_selection(groups)
    x0 = [torch.randn(2, 4, 3, 3)]
    for gid, sl_ in sel.items():
        zero_channels(g, groups[gid], [c for c in range(groups[gid].size) if c not in sl_.keep])
    before = run(g, x0)[0]
    apply_selection(g, groups, sel)
    # c1's 10 channels: [0:4] → 2, [4,5,...] unsliced {4,5} → 1, sliced {6..9} → 2
    assert g.node("split").attrs["sizes"] == (2, 3)
    assert (g.node("sl").attrs["start"], g.node("sl").attrs["end"]) == (1, 3)
    torch.testing.assert_close(run(g, x0)[0], before, atol=1e-5, rtol=0)


def _rank_deficient_producer(g: Graph, x: str, cin: int, kernel: int) -> str:
    """A conv/linear producer whose channels 3..5 are exact linear combinations of channels 0..2."""
    if kernel:
        p = conv(g, "p", x, cin, 6, k=kernel, bias=False)
    else:
        p = g.add_node("p", "linear", [x], params={"weight": torch.randn(6, cin), "bias": torch.randn(6)})
    n = g.node(p)
    w = n.params["weight"]
    m = torch.randn(3, 3)
    w[3:] = torch.einsum("js,s...->j...", m, w[:3])
    if "bias" in n.params:
        n.params["bias"][3:] = m @ n.params["bias"][:3] + torch.tensor([0.5, -1.0, 2.0])
    n.attrs["_m"] = m  # read back by the test
    return p


def _fold_for(m: torch.Tensor, offset: torch.Tensor | None) -> ChannelSelection:
    t = torch.zeros(3, 6)
    t[:, :3] = torch.eye(3)
    t[:, 3:] = m.T
    shift = None
    if offset is not None:
        shift = torch.zeros(6)
        shift[3:] = offset
    return ChannelSelection(keep=[0, 1, 2], fold=t, bias_shift=shift)


@pytest.mark.parametrize("consumer", ["linear", "conv", "flatten_linear"])
def test_fold_reconstructs_rank_deficient_layer(consumer: str) -> None:
    torch.manual_seed(0)
    g = Graph("t")
    if consumer == "linear":
        x = g.add_node("x", "input", attrs={"shape": (5, 7)})
        p = _rank_deficient_producer(g, x, 7, 0)
        y = linear(g, "c", p, 6, 4)
    else:
        x = g.add_node("x", "input", attrs={"shape": (2, 3, 6, 6)})
        p = _rank_deficient_producer(g, x, 3, 3)
        if consumer == "conv":
            y = conv(g, "c", p, 6, 4)
        else:
            f = g.add_node("flat", "flatten", [p], attrs={"start_dim": 1})
            y = linear(g, "c", f, 6 * 36, 4)
    g.add_node("out", "output", [y])
    g.infer_shapes()
    groups = find_groups(g)
    grp = next(gr for gr in groups if gr.producers == ("p",))
    inp = [torch.randn(*g.node("x").attrs["shape"])]
    before = run(g, inp)[0]
    m = g.node("p").attrs.pop("_m")
    offset = torch.tensor([0.5, -1.0, 2.0]) if consumer == "linear" else None
    apply_selection(g, groups, {grp.id: _fold_for(m, offset)})
    assert g.node("p").params["weight"].shape[0] == 3
    torch.testing.assert_close(run(g, inp)[0], before, atol=1e-4, rtol=1e-4)


def test_bias_shift_per_consumer_restores_constant_channel() -> None:
    g = mlp()
    groups = find_groups(g)
    grp = groups[1]  # fc1 → relu1 → fc2, 16 channels
    fc1 = g.node("fc1").params
    fc1["weight"][5] = 0.0
    fc1["bias"][5] = 1.5  # channel 5 is the constant relu(1.5) = 1.5 at fc2's input
    x = [torch.randn(4, 10)]
    before = run(g, x)[0]
    shift = torch.zeros(16)
    shift[5] = 1.5
    keep = [c for c in range(16) if c != 5]
    apply_selection(g, groups, {grp.id: ChannelSelection(keep=keep, bias_shift={"fc2": shift})})
    torch.testing.assert_close(run(g, x)[0], before, atol=1e-5, rtol=0)


def test_errors_name_the_node() -> None:
    g = mlp()
    groups = find_groups(g)
    with pytest.raises(NetsqueezeError, match="frozen") as e:
        apply_selection(g, groups, {3: ChannelSelection(keep=[0])})
    assert e.value.diagnostics[0].node == "fc3"
    with pytest.raises(NetsqueezeError, match="at least one channel"):
        apply_selection(g, groups, {1: ChannelSelection(keep=[])})
    with pytest.raises(NetsqueezeError, match="fold has shape"):
        apply_selection(g, groups, {1: ChannelSelection(keep=[0, 1], fold=torch.zeros(3, 16))})
    with pytest.raises(NetsqueezeError, match="distinct channel indices"):
        apply_selection(g, groups, {1: ChannelSelection(keep=[0, 99])})


def test_grouped_conv_fold_must_be_per_conv_group() -> None:
    from torch import nn

    import netsqueeze as ns
    from netsqueeze.passes.dependency import find_groups

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)).eval()
    g = ns.import_model(model, (torch.randn(2, 3, 6, 6),))
    groups = find_groups(g)
    gid = next(x.id for x in groups if x.producers == ("0",))
    with pytest.raises(NetsqueezeError) as e:
        apply_selection(g, groups, {gid: ChannelSelection(keep=[0, 1], fold={"2": torch.zeros(2, 4)})})
    assert str(e.value) == ("node '0': error: channel group 1: fold for grouped conv '2' has shape [2, 4], "
                            "expected [2, 2, 4] (one reconstruction per conv group)")
    with pytest.raises(NetsqueezeError, match="grouped conv '2' reads this group: give the fold per consumer"):
        apply_selection(g, groups, {gid: ChannelSelection(keep=[0, 1], fold=torch.zeros(2, 4))})
    # one T per conv group: identity reconstructions leave the kept slots' weights as they were
    w = g.node("2").params["weight"].clone()
    t = torch.zeros(2, 2, 4, dtype=torch.float64)
    t[:, 0, 0] = t[:, 1, 1] = 1.0
    with pytest.raises(NetsqueezeError) as e:  # a fold's kind is its type, not its rank
        apply_selection(g, groups, {gid: ChannelSelection(keep=[0, 1], fold={"2": t})})
    assert e.value.message == ("a fold given as a plain tensor must be T [kept, size] (got [2, 2, 4]); wrap it as "
                               "BlockFold [kept, block, size, block] or GroupFold [groups, kept, size]")
    apply_selection(g, groups, {gid: ChannelSelection(keep=[0, 1], fold={"2": GroupFold(t)})})
    assert g.node("2").params["weight"].shape == (8, 2, 3, 3)
    assert torch.equal(g.node("2").params["weight"], w[:, :2])
    assert g.node("0").params["weight"].shape == (4, 3, 3, 3)
