"""Removing a residual branch whole: `rewrite.branch_removable`, `apply_selection` with nothing kept, and
squeeze_fold's `branches = remove`, which lets its search trade whole blocks against channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.allocation import GroupBounds, Meter
from netsqueeze.passes.dependency import ChannelGroup, find_groups
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection, branch_removable, branch_removal


class TwoBlocks(nn.Module):
    """A stem and two residual blocks (3x3 conv, BN, relu, 1x1 conv, BN, added to the block's input), then
    global pooling and a linear head. With `dead`, block 2's first conv has zero weights: its branch adds the
    same value at every position of every image (a 1x1 second conv has no zero-padded border)."""

    def __init__(self, dead: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.an1, self.a2, self.an2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.b1, self.bn1, self.b2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            for bn in (self.an1, self.an2, self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            if dead:
                self.b1.weight.zero_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.an2(self.a2(torch.relu(self.an1(self.a1(h))))))
        h = torch.relu(h + self.bn2(self.b2(torch.relu(self.bn1(self.b1(h))))))
        return self.head(h.mean(dim=(2, 3)))


def group_of(groups: list[ChannelGroup], producer: str) -> ChannelGroup:
    return next(g for g in groups if producer in g.producers)


def test_bounds_that_allow_removal_add_zero() -> None:
    b = GroupBounds(8, 1, 4, empty=True)
    assert b.allowed() == [0, 4, 8]
    assert (b.clamp(0), b.clamp(1), b.smallest, b.above(0), b.below(4)) == (0, 4, 0, 4, 0)
    kept = GroupBounds(8, 1, 4)
    assert (kept.allowed(), kept.clamp(0), kept.smallest) == ([4, 8], 4, 4)


def test_a_removed_branch_becomes_its_constant_and_the_model_is_unchanged() -> None:
    model = TwoBlocks(dead=True)
    x = torch.randn(16, 3, 8, 8)
    graph = ns.import_model(model, (x[:2],))
    groups = find_groups(graph)
    inner = group_of(groups, "b1")
    assert branch_removable(graph, inner) is None
    before = graph_stats(graph)
    meter = Meter(graph, groups, before, shifted=True)
    predicted = meter({inner.id: 0})
    # the channels b2 reads are relu(bn1(b1's bias)) everywhere: their mean is the exact intercept
    with torch.no_grad():
        mean = torch.relu(model.bn1(model.b1.bias.view(1, 8, 1, 1))).flatten().double()
    apply_selection(graph, groups, {inner.id: ChannelSelection(keep=[], bias_shift={"b2": mean})})
    kinds = {n.id: n.kind for n in graph.nodes()}
    assert not {"b1", "bn1", "b2"} & kinds.keys()  # the branch's layers are gone ...
    assert kinds["bn2"] == "constant"  # ... and the last op before the add holds what it added
    assert tuple(graph.node("bn2").params["value"].shape) == (1, 8, 1, 1)
    after = graph_stats(graph)
    conv3, conv1, bn = 8 * 8 * 9 * 64 * 2 + 8 * 64, 8 * 8 * 64 * 2 + 8 * 64, 2 * 8 * 64
    # the example batch of 2 images: two convs with their biases, two BNs and the relu, at 64 positions each
    assert before.flops - after.flops == 2 * (conv3 + conv1 + 2 * bn + 8 * 64)
    # both convs, both BNs (weight and bias; running statistics are not params), less the constant's 8 values
    assert before.params - after.params == (8 * 8 * 9 + 8) + (8 * 8 + 8) + 2 * 16 - 8
    assert predicted[:2] == (after.flops / before.flops, after.params / before.params)
    with torch.no_grad():
        want = model(x)
    got = to_torch(graph)(x)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_only_a_branch_into_an_add_may_lose_every_channel() -> None:
    model = TwoBlocks(dead=False)
    graph = ns.import_model(model, (torch.randn(2, 3, 8, 8),))
    groups = find_groups(graph)
    stream = group_of(groups, "stem")
    # the residual stream: its consumers' outputs feed further convs, not adds
    assert branch_removable(graph, stream) == "the output of 'a1' reaches conv 'a2', not an add"
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 2)).eval()
    g2 = ns.import_model(plain, (torch.randn(2, 3, 6, 6),))
    first = group_of(find_groups(g2), "0")
    assert branch_removable(g2, first) == "the output of '2' reaches flatten '4', not an add"
    with pytest.raises(NetsqueezeError, match="a selection must keep at least one channel"):
        apply_selection(g2, find_groups(g2), {first.id: ChannelSelection(keep=[])})


class ConvIntoReshape(nn.Module):
    """A conv branch whose output is reshaped ([N, 4, 3, 3] to [N, 4, 9]) before its add: its [1, 4, 1, 1]
    constant would not broadcast as the branch's output does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.c(x).reshape(n, 4, 9) + self.b(torch.relu(self.a(x))).reshape(n, 4, 9)


def test_a_reshape_after_a_conv_keeps_the_branch() -> None:
    """Only a linear layer's output may pass a reshape on the way to its add (GPT-2's Conv1D)."""
    graph = ns.import_model(ConvIntoReshape().eval(), (torch.randn(2, 3, 3, 3),))
    assert branch_removable(graph, group_of(find_groups(graph), "a")) == \
        "the output of 'b' reaches reshape 'reshape_1', not an add"


def squeeze(model: nn.Module, branches: str, flops: float, x: torch.Tensor, target: str = "torch") -> ns.CompileResult:
    return ns.compile(model, f"""
policy p {{
  budget flops <= {flops:.4%}
  squeeze_fold {{ branches = {branches} }}
  fold_bn
}}
""", example_inputs=(x[:2],), calibration=x, target=target)


def test_the_search_removes_the_branch_that_adds_a_constant() -> None:
    model = TwoBlocks(dead=True)
    torch.manual_seed(1)
    x = torch.randn(256, 3, 8, 8)
    total = graph_stats(ns.import_model(model, (x[:2],))).flops
    branch = 2 * ((8 * 8 * 9 * 64 * 2 + 8 * 64) + (8 * 8 * 64 * 2 + 8 * 64) + 2 * 2 * 8 * 64 + 8 * 64)  # batch of 2
    budget = (total - branch + 1) / total  # the branch's FLOPs, less than keeping one of its channels
    removed = squeeze(model, "remove", budget, x)
    notes = [n for p in removed.report.passes for n in p.result.notes]
    assert "removed 1 residual branch(es) whole, each now the constant mean it adds: b1 -> b2" in notes
    assert removed.report.after.flops <= budget * total
    kept = squeeze(model, "keep", budget, x)
    xt = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        want = model(xt)
        err = {k: float((r.model(xt) - want).norm() / want.norm()) for k, r in (("remove", removed), ("keep", kept))}
    assert err["remove"] < 1e-5 and err["keep"] > 100 * err["remove"], err


def test_a_model_without_a_branch_emits_to_onnx_and_runs() -> None:
    import numpy as np
    import onnxruntime as ort

    model = TwoBlocks(dead=True)
    torch.manual_seed(1)
    x = torch.randn(256, 3, 8, 8)
    res = squeeze(model, "remove", 0.6, x, target="onnx")
    assert any(n.startswith("removed 1 residual branch") for p in res.report.passes for n in p.result.notes)
    # the stem and block 1's two convs; block 2's add takes the constant
    assert [n.op_type for n in res.model.graph.node].count("Conv") == 3
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    xt = torch.randn(8, 3, 8, 8)
    back = squeeze(model, "remove", 0.6, x)
    got = sess.run(None, {sess.get_inputs()[0].name: xt.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - back.model(xt).numpy()).max() < 1e-4


def test_the_search_keeps_a_branch_whose_removal_measures_worse() -> None:
    model = TwoBlocks(dead=False)
    torch.manual_seed(1)
    x = torch.randn(256, 3, 8, 8)
    removed, kept = squeeze(model, "remove", 0.9, x), squeeze(model, "keep", 0.9, x)
    line = next(n for p in removed.report.passes for n in p.result.notes if n.startswith("search"))
    # the measured errors, one per try: no branch out, then each removable branch out alone
    tries = line.split("branch removal measured (squared relative output error of the model as written, on the "
                       "sensitivity batches): ")[1].split(", ")
    assert [t.split(":")[0] for t in tries] == ["none out", "a1 out", "b1 out"]
    base = float(tries[0].split(": ")[1])
    assert all(float(t.split(": ")[1]) > base for t in tries[1:])
    assert not any(n.startswith("removed") for p in removed.report.passes for n in p.result.notes)
    xt = torch.randn(16, 3, 8, 8)
    with torch.no_grad():  # nothing removed: the same allocation and model as with branches = keep
        assert torch.allclose(removed.model(xt), kept.model(xt), atol=1e-6)


def test_ratio_100_removes_the_selected_branches() -> None:
    model = TwoBlocks(dead=False)
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    res = ns.compile(model, """
policy p {
  squeeze_fold on a1 | b1 { ratio = 100%, branches = remove }
}
""", example_inputs=(x[:2],), calibration=x)
    kinds = {n.id: n.kind for n in res.graph.nodes()}
    assert not {"a1", "an1", "a2", "b1", "bn1", "b2"} & kinds.keys()
    assert (kinds["an2"], kinds["bn2"]) == ("constant", "constant")
    assert [n.id for n in res.graph.nodes() if n.kind in ("conv", "linear")] == ["stem", "head"]


def test_gpt2_mlp_blocks_leave_whole_as_their_mean_output() -> None:
    # GPT-2's MLP (Conv1D: view(-1, C) @ W, then a view back) is a branch into the residual add: removed, its
    # output becomes the mean it had on the calibration tokens (exact for a linear last layer)
    import warnings

    import numpy as np

    from netsqueeze.backends.onnx import to_onnx
    from tests.frontends.onnx_models import run
    from tests.models.test_hf_capture import CASES

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, xs = CASES["gpt2"].build()
        calib = [tuple(torch.cat([x, x.flip(0)]) for x in xs)]
        g0 = ns.import_model(model, xs)
        res = ns.compile(model, "policy p { squeeze_fold on *mlp.c_fc* { ratio = 100%, branches = remove } }",
                         example_inputs=xs, calibration=calib, progress=False)
    notes = [n for p in res.report.passes for n in p.result.notes if n.startswith("removed")]
    assert notes == ["removed 2 residual branch(es) whole, each now the constant mean it adds: "
                     "model.h.0.mlp.c_fc.linear -> model.h.0.mlp.c_proj.linear, "
                     "model.h.1.mlp.c_fc.linear -> model.h.1.mlp.c_proj.linear"]
    for block in ("0", "1"):
        tail = f"model.h.{block}.mlp.dropout"  # the last op before the add (an identity in eval mode)
        assert res.graph.node(tail).kind == "constant"
        with torch.no_grad():
            mlp_out = to_torch(g0, extra_outputs=[(tail, 0)])(*calib[0])[1]
        want = mlp_out.reshape(-1, mlp_out.shape[-1]).mean(0)
        assert torch.allclose(res.graph.node(tail).params["value"], want, atol=1e-5)
    (y,) = run(to_onnx(res.graph), *[x.numpy() for x in xs])
    with torch.no_grad():
        got = res.model(*xs)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert float(np.abs(y - got.numpy()).max()) <= 1e-5 * max(1.0, float(np.abs(y).max()))


class ReducedBlock(nn.Module):
    """A residual block whose branch starts with a layer of its own group before the removable one (an attention
    block's sequence reduction before its projections): removing the branch deletes `r` too. Then a plain block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)
        self.r, self.b, self.c = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.c(torch.relu(self.b(torch.relu(self.r(h)))))
        h = h + self.a2(torch.relu(self.a1(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_removing_a_branch_deletes_what_only_fed_it_and_refits_the_rest() -> None:
    """`r` reads the residual stream, so it was among the layers re-solved after the removal, though the removal
    deletes it: the refit asked for a node the graph no longer had (a KeyError, seen on HF's SegFormer)."""
    model = ReducedBlock()
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    graph = ns.import_model(model, (x[:2],))
    chains, dead = branch_removal(graph, ["c"])
    assert (chains, dead) == ({"c": []}, {"r", "relu_1", "b", "relu_2"})
    res = ns.compile(model, """
policy p {
  squeeze_fold on b { ratio = 100%, branches = remove }
}
""", example_inputs=(x[:2],), calibration=x)
    kinds = {n.id: n.kind for n in res.graph.nodes()}
    assert kinds["c"] == "constant" and not {"r", "relu_1", "b", "relu_2"} & kinds.keys()
    with torch.no_grad():
        want = model(x)
        h = torch.relu(model.stem(x))
        branch = model.c(torch.relu(model.b(torch.relu(model.r(h)))))
        h = h + branch.mean(dim=(0, 2, 3), keepdim=True)  # the branch's mean
        mean = model.head((h + model.a2(torch.relu(model.a1(h)))).mean(dim=(2, 3)))
        err, err_mean = (float((y - want).norm() / want.norm()) for y in (res.model(x), mean))
    # the layers reading the sum the branch fed are re-solved: 0.0060 against 0.0104 with the mean alone
    assert err < 0.75 * err_mean, (err, err_mean)


def test_the_meter_keys_what_a_removal_deletes_by_the_removed_group() -> None:
    """The meter sums per-node costs seen before; `r` (deleted with the branch, though in other groups) must not
    keep the zero cost it had with the branch removed when the branch stays."""
    graph = ns.import_model(ReducedBlock(), (torch.randn(2, 3, 8, 8),))
    groups = find_groups(graph)
    gb, ga = group_of(list(groups), "b").id, group_of(list(groups), "a1").id
    base = graph_stats(graph)
    meter = Meter(graph, groups, base, removable={gb})
    for counts in ({ga: 4}, {gb: 4}, {gb: 0}):  # every node seen at the counts of {ga: 4, gb: 4}, r last at 0
        assert meter(counts) == Meter(graph, groups, base, removable={gb})(counts)
    dry_runs = meter.dry_runs
    both = meter({ga: 4, gb: 4})
    assert meter.dry_runs == dry_runs  # summed from the costs seen
    assert both == Meter(graph, groups, base, removable={gb})({ga: 4, gb: 4})


class CheapAndCostlyBlocks(TwoBlocks):
    """TwoBlocks' graph on 8 channels with other layers: block `a` of two 1x1 convs whose output is scaled down
    (little error to remove, few FLOPs), block `b` of two 3x3 convs (most of the model's FLOPs)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.an1, self.a2, self.an2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.b1, self.bn1, self.b2, self.bn2 = (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.an2.weight.mul_(0.2)
            self.an2.bias.mul_(0.2)
        self.eval()


def test_a_branch_taken_out_while_the_budget_was_missed_goes_back_when_a_later_one_meets_it() -> None:
    """With `round_to = 8` a block keeps all 8 channels or none, so the budget below is met by taking out `b`
    alone. The search takes `a` out first (the least estimated error per FLOP), still over the budget, then `b`;
    `a` then goes back in, and the model keeps its output."""
    from netsqueeze.ir.ops import node_flops

    model = CheapAndCostlyBlocks()
    torch.manual_seed(1)
    x = torch.randn(256, 3, 8, 8)
    graph = ns.import_model(model, (x[:2],))
    total = graph_stats(graph).flops
    in_b = sum(node_flops(graph, graph.node(n)) for n in ("b1", "bn1", "relu_1", "b2", "bn2"))
    budget = (total - 0.8 * in_b) / total
    res = ns.compile(model, f"""
policy p {{
  budget flops <= {budget:.4%}
  bounds {{ round_to = 8 }}
  squeeze_fold {{ branches = remove }}
}}
""", example_inputs=(x[:2],), calibration=x)
    notes = [n for p in res.report.passes for n in p.result.notes]
    line = next(n for n in notes if n.startswith("search"))
    tries = dict(t.split(": ") for t in line.split("sensitivity batches): ")[1].split(", "))
    assert list(tries) == ["none out", "a1 out", "b1 out", "a1 back"]
    assert (tries["none out"], tries["a1 out"]) == ("over the budget", "over the budget")
    assert float(tries["a1 back"]) < float(tries["b1 out"])
    assert "removed 1 residual branch(es) whole, each now the constant mean it adds: b1 -> b2" in notes
    assert res.report.after.flops <= budget * total
    xt = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        want = model(xt)
        assert float((res.model(xt) - want).norm() / want.norm()) < 0.02


class ScaledBlocks(TwoBlocks):
    """TwoBlocks with each branch scaled channels-last before the add (ConvNeXt's layer scale): no branch
    reaches an add through the ops removal goes through."""

    def __init__(self) -> None:
        super().__init__(dead=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def _scaled(self, b: torch.Tensor) -> torch.Tensor:
        return (b.permute(0, 2, 3, 1) * self.scale).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self._scaled(self.an2(self.a2(torch.relu(self.an1(self.a1(h)))))))
        h = torch.relu(h + self._scaled(self.bn2(self.b2(torch.relu(self.bn1(self.b1(h)))))))
        return self.head(h.mean(dim=(2, 3)))


def test_branches_remove_with_no_removable_branch_says_why_instead_of_running_as_keep_silently() -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    res = {b: ns.compile(ScaledBlocks(), "policy p { calibrate samples 64, batch 32\n budget flops <= 60%\n "
                         f"squeeze_fold {{ branches = {b} }} }}", example_inputs=(x[:2],), calibration=x,
                         progress=False) for b in ("keep", "remove")}
    notes = {b: [n for rec in r.report.passes for n in rec.result.notes] for b, r in res.items()}
    assert notes["remove"][0] == (
        "branches = remove: no channel group is a residual branch that can be removed whole (stem, a2, b2: the output "
        "of 'a1' reaches conv 'a2', not an add; a1: the output of 'a2' reaches transpose 'transpose', not an add; b1: "
        "the output of 'b2' reaches transpose 'transpose_2', not an add)")
    assert notes["remove"][1:] == notes["keep"]  # the same compile otherwise


def test_squeeze_fold_says_when_the_policy_bounds_hold_it_over_the_budget() -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(NetsqueezeError) as e:  # every group has 8 channels: round_to = 8 keeps them all
        ns.compile(TwoBlocks(dead=False), "policy p {\n  calibrate samples 64, batch 32\n  budget flops <= 50%\n"
                   "  bounds { round_to = 8 }\n  squeeze_fold\n}", example_inputs=(x[:2],), calibration=x,
                   progress=False)
    d = e.value.diagnostics[0]
    assert (d.message, d.node) == (
        "pass 'squeeze_fold' (<policy>:5) failed: squeeze_fold cannot meet the budget flops <= 50.0%: squeezing every "
        "group to its minimum reaches flops 100.0%, params 100.0% of the original; its bounds (min_channels, "
        "round_to, align) hold it there: one channel per group would reach flops 3.6%, params 4.3%; the most of its "
        "flops is at 'a1' (36.7% of the original flops, its channels all kept), 'b1' (36.7%, its channels all kept), "
        "'stem' (13.9%, its channels all kept)", "a1")
