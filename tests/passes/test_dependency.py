"""Channel-group discovery on hand-built graphs: every coupling rule and every frozen reason."""

from __future__ import annotations

import torch

from netsqueeze.ir.graph import Graph, Origin, TensorMeta
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import ChannelGroups, DependencyAnalysis, find_groups, format_groups
from tests.passes.graphs import attention, cnn, conv, linear, mlp


def group_of(groups: ChannelGroups, node: str, target: str, axis: int | None = None):  # type: ignore[no-untyped-def]
    for g in groups:
        for m in g.members:
            if m.node == node and m.target == target and (axis is None or m.axis == axis):
                return g, m
    raise KeyError((node, target))


def test_mlp_groups_and_frozen_ends() -> None:
    gs = find_groups(mlp())
    assert [g.size for g in gs] == [10, 16, 12, 3]
    assert gs[0].frozen == "graph input 'x'" and gs[3].frozen == "reaches graph output 'out'"
    g1 = gs[1]
    assert g1.frozen is None and g1.producers == ("fc1",) and g1.consumers == ("fc2",)
    assert {(m.node, m.target, m.axis) for m in g1.members} == {
        ("fc1", "out0", 1), ("fc1", "bias", 0), ("fc1", "weight", 0), ("relu1", "out0", 1), ("fc2", "weight", 1)}


def test_residual_add_couples_both_branches_and_bn() -> None:
    gs = find_groups(cnn())
    g, _ = group_of(gs, "conv1", "weight", 0)
    g2, _ = group_of(gs, "conv2", "weight", 0)
    assert g is g2  # relu1 + relu2 share channels
    assert {"bn1", "bn2"} <= {m.node for m in g.members if m.param == "running_var"}


def test_concat_offsets_depthwise_and_flatten_blocks() -> None:
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (2, 3, 4, 4)})
    a = conv(g, "a", x, 3, 4)
    b = conv(g, "b", x, 3, 6)
    cat = g.add_node("cat", "concat", [a, b], attrs={"axis": 1})
    dw = conv(g, "dw", cat, 10, 10, groups=10)
    f = g.add_node("flat", "flatten", [dw], attrs={"start_dim": 1})
    g.add_node("out", "output", [linear(g, "fc", f, 160, 2)])
    g.infer_shapes()
    gs = find_groups(g)
    ga, fc_a = group_of(gs, "a", "weight", 0)
    gb, _ = group_of(gs, "b", "weight", 0)
    assert ga.size == 4 and gb.size == 6 and ga.frozen is None and gb.frozen is None
    cat_a = next(m for m in ga.members if m.node == "cat")
    cat_b = next(m for m in gb.members if m.node == "cat")
    assert cat_a.index == tuple((i,) for i in range(4)) and cat_b.index == tuple((4 + i,) for i in range(6))
    dw_b = next(m for m in gb.members if m.node == "dw" and m.param == "weight")
    assert dw_b.role == "producer" and dw_b.index[0] == (4,)
    fc_b = next(m for m in gb.members if m.node == "fc")
    assert fc_b.role == "consumer" and fc_b.index[1] == tuple(range(5 * 16, 6 * 16))
    del fc_a


def test_grouped_conv_keeps_group_structure() -> None:
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (1, 3, 4, 4)})
    a = conv(g, "a", x, 3, 8)
    gc = conv(g, "gc", a, 8, 6, k=1, groups=2)
    g.add_node("out", "output", [conv(g, "c", gc, 6, 2, k=1)])
    g.infer_shapes()
    gs = find_groups(g)
    ga, m = group_of(gs, "a", "weight", 0)
    assert ga.size == 4 and m.index == ((0, 4), (1, 5), (2, 6), (3, 7))  # same local slot in both groups
    gg, m = group_of(gs, "gc", "weight", 0)
    assert gg.size == 3 and m.index == ((0, 3), (1, 4), (2, 5)) and gg.frozen is None


def test_attention_heads_are_one_group() -> None:
    gs = find_groups(attention())
    g, m = group_of(gs, "attn", "in_proj_weight", 0)
    assert g.size == 2 and g.frozen is None
    assert m.index[1] == (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23)
    _, out = group_of(gs, "attn", "out_proj_weight", 1)
    assert out.index == ((0, 1, 2, 3), (4, 5, 6, 7)) and out.role == "consumer"
    ge, _ = group_of(gs, "attn", "out_proj_weight", 0)
    assert ge.frozen is not None and "attention 'attn'" in ge.frozen


def _chain(mid: list[tuple[str, dict]]) -> Graph:  # type: ignore[type-arg]
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (2, 4, 3, 3)})
    h = conv(g, "c1", x, 4, 6)
    for i, (kind, attrs) in enumerate(mid):
        h = g.add_node(f"m{i}", kind, [h], attrs=attrs)
    g.add_node("out", "output", [h])
    g.infer_shapes()
    return g


def test_opaque_and_unknown_ops_stop_propagation() -> None:
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (2, 4, 3, 3)})
    a = conv(g, "c1", x, 4, 6)
    o = g.add_node("weird", "opaque", [a], origin=Origin("fx", "weird", "my_op"))
    g.node(o).meta = [TensorMeta((2, 6, 3, 3))]  # opaque ops keep the shapes the frontend observed
    c2 = conv(g, "c2", o, 6, 5)
    g.add_node("out", "output", [c2])
    g.infer_shapes()
    gs = find_groups(g)
    ga, _ = group_of(gs, "c1", "weight", 0)
    assert ga.frozen == "passes opaque op 'weird' (my_op)"
    gc, _ = group_of(gs, "c2", "weight", 1)
    assert gc.frozen == "passes opaque op 'weird' (my_op)" and gc is not ga


def test_reshape_that_splits_channels_makes_blocks_and_transpose_follows() -> None:
    # 6 channels split into (2, 3), as attention splits its width into heads: the outer axis is the group,
    # each of its positions a block of 3 channels (here frozen only because it reaches the graph output)
    gs = find_groups(_chain([("reshape", {"shape": (2, 2, 3, 3, 3)}), ("relu", {})]))
    g, _ = group_of(gs, "c1", "weight", 0)
    assert g.size == 2 and g.frozen == "reaches graph output 'out'"
    assert next(m for m in g.members if m.node == "c1" and m.param == "weight").index == ((0, 1, 2), (3, 4, 5))
    gs = find_groups(_chain([("transpose", {"perm": (0, 2, 3, 1)}), ("relu", {})]))
    g, _ = group_of(gs, "m1", "out0")
    assert g is group_of(gs, "c1", "weight", 0)[0] and next(m for m in g.members if m.node == "m1").axis == 3


def test_split_and_slice_make_separate_groups() -> None:
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (2, 4, 3, 3)})
    a = conv(g, "c1", x, 4, 10)
    s = g.add_node("split", "split", [a], attrs={"axis": 1, "sizes": (4, 6)})
    sl = g.add_node("sl", "slice", [(s, 1)], attrs={"axis": 1, "start": 1, "end": 5})
    g.add_node("out", "output", [g.add_node("add", "add", [conv(g, "c2", (s, 0), 4, 4), sl])])
    g.infer_shapes()
    gs = find_groups(g)
    sizes = sorted(grp.size for grp in gs if "c1" in grp.producers)
    assert sizes == [2, 4, 4]  # piece 0; channels 4 and 9 (split but not sliced); channels 5..8 (sliced)
    # channels 5..8 of c1 go to the output through the slice and the add
    g58, _ = group_of(gs, "sl", "out0")
    assert g58.frozen == "reaches graph output 'out'" and "c2" in g58.producers


def test_restrict_freezes_unselected_and_format_is_deterministic() -> None:
    gs = find_groups(mlp())
    r = gs.restrict(frozenset({"fc1"}))
    assert r[1].frozen is None and r[2].frozen == "excluded by the policy selection ('fc2' not selected)"
    assert format_groups(find_groups(cnn())) == format_groups(find_groups(cnn()))
    text = format_groups(gs)
    assert text.splitlines()[0] == "4 channel groups, 2 prunable, 2 frozen"
    assert "  producer fc1.weight axis 0 [0:16]" in text


def test_analysis_pass_is_cached() -> None:
    ctx = PassContext()
    g = mlp()
    assert ctx.analysis(DependencyAnalysis, g) is ctx.analysis(DependencyAnalysis, g)


def test_layer_norm_freezes_its_axis_and_bn_passes_spatial() -> None:
    g = Graph("t")
    x = g.add_node("x", "input", attrs={"shape": (2, 5, 8)})
    h = linear(g, "fc1", x, 8, 6)
    h = g.add_node("ln", "layer_norm", [h], attrs={"normalized_shape": (6,), "eps": 1e-5},
                   params={"weight": torch.ones(6), "bias": torch.zeros(6)})
    g.add_node("out", "output", [linear(g, "fc2", h, 6, 3)])
    g.infer_shapes()
    grp, _ = group_of(find_groups(g), "fc1", "weight", 0)
    assert grp.frozen is not None and grp.frozen.startswith("layer_norm 'ln'")
    assert {m.node for m in grp.members} >= {"ln", "fc2"}
