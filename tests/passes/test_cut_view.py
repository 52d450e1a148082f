"""`rewrite.cut_view`: a cut in one linear consumer's view only — exact outputs, checks before any change, and
what the torch backend makes of the gathers it inserts (output order, module paths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir import Graph, print_graph
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.rewrite import ChannelSelection, SharedFold, cut_view
from tests.passes.graphs import run


def _residual(t: int | None = None) -> Graph:
    """x → fc1 (8) = h; s = h + relu(fc2(h)); out = fc3(s): h's channels are read by fc2 and, through the add,
    by fc3. `t`: a 3-D input [N, t, 4], so the channels sit on axis 2."""
    gen = torch.Generator().manual_seed(1)
    g = Graph("res")
    x = g.add_node("x", "input", attrs={"shape": (4, 4) if t is None else (4, t, 4)})
    h = g.add_node("fc1", "linear", [x], params={"weight": torch.randn(8, 4, generator=gen),
                                                 "bias": torch.randn(8, generator=gen)})
    a = g.add_node("relu", "relu", [g.add_node("fc2", "linear", [h], params={
        "weight": 0.5 * torch.randn(8, 8, generator=gen), "bias": torch.randn(8, generator=gen)})])
    s = g.add_node("add", "add", [h, a])
    g.add_node("out", "output", [g.add_node("fc3", "linear", [s], params={
        "weight": torch.randn(3, 8, generator=gen), "bias": torch.randn(3, generator=gen)})])
    g.infer_shapes()
    return g


def _group(g: Graph, consumer: str):  # type: ignore[no-untyped-def]
    return next(gr for gr in find_groups(g) if consumer in gr.consumers)


def test_cut_view_computes_the_consumer_on_the_kept_channels_only() -> None:
    g = _residual()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    ref = g.copy()
    w = ref.node("fc3").params["weight"].clone()
    w[:, [1, 3, 4, 6, 7]] = 0  # the dropped channels' columns
    ref.node("fc3").params["weight"] = w
    cut_view(g, _group(g, "fc3"), "fc3", ChannelSelection(keep=[0, 2, 5]))
    # one gather on the shortcut; the branch's channels fed only fc3's view, so fc2 computes the kept three
    assert [(n.id, n.attrs["axis"], tuple(n.attrs["indices"])) for n in g.nodes() if n.kind == "gather"] == [
        ("add.select", 1, (0, 2, 5))]
    assert tuple(g.node("fc3").params["weight"].shape) == (3, 3)
    assert tuple(g.node("fc2").params["weight"].shape) == (3, 8)  # and still reads every channel of h
    assert torch.allclose(run(g, [x])[0], run(ref, [x])[0], atol=1e-6)


@pytest.mark.parametrize(("sel", "message"), [
    (ChannelSelection(keep=[0, 9]), "channel group 1: keep must be distinct channel indices in 0..7"),
    (ChannelSelection(keep=[-1, 2]), "channel group 1: keep must be distinct channel indices in 0..7"),
    (ChannelSelection(keep=[2, 2]), "channel group 1: keep must be distinct channel indices in 0..7"),
    (ChannelSelection(keep=[]), "channel group 1: a selection must keep at least one channel"),
    (ChannelSelection(keep=[0, 2], fold=SharedFold(torch.zeros(3, 8))),
     "channel group 1: fold has shape [3, 8], expected [2, 8] (SharedFold)"),
    (ChannelSelection(keep=[0, 2], bias_shift=torch.zeros(5)),
     "channel group 1: bias_shift for 'fc3' has shape [5], expected [8]"),
])
def test_a_bad_selection_is_an_error_naming_the_group_and_leaves_the_graph_as_it_was(
        sel: ChannelSelection, message: str) -> None:
    g = _residual()
    before = print_graph(g)
    with pytest.raises(NetsqueezeError) as e:
        cut_view(g, _group(g, "fc3"), "fc3", sel)
    assert e.value.diagnostics[0].message == message
    assert e.value.diagnostics[0].node == "fc1"
    assert print_graph(g) == before


def test_channels_off_axis_1_are_an_error_before_any_change() -> None:
    g = _residual(t=8)  # [4, 8, 8]: the channels on axis 2, axis 1 of the same length
    before = print_graph(g)
    with pytest.raises(NetsqueezeError) as e:
        cut_view(g, _group(g, "fc3"), "fc3", ChannelSelection(keep=[0, 2, 5]))
    assert e.value.diagnostics[0].message == ("channel group 1: cannot remove channels from 'fc3''s view only: the "
                                              "group's channels are not on axis 1 of the values on the way to it")
    assert print_graph(g) == before


class _TwoHeads(nn.Module):
    """(fc(pooled residual stream), aux(mean of the branch)): a cut in fc's view puts its gather late in the
    topological order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.aux = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.relu(self.stem(x))
        u = torch.relu(self.c1(s))
        t = torch.relu(self.c2(u) + s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)), self.aux(u.mean((2, 3)))


def test_the_torch_model_returns_its_outputs_in_graph_order_after_a_cut() -> None:
    m = _TwoHeads().eval()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    g = ns.import_model(m, (x,))
    cut_view(g, _group(g, "fc"), "fc", ChannelSelection(keep=[1, 2, 6]))
    got = to_torch(g)(x)
    assert [tuple(o.shape) for o in got] == [(4, 4), (4, 2)]
    with torch.no_grad():
        assert torch.allclose(got[1], m(x)[1], atol=1e-6)  # aux reads the branch, which the cut left whole


class _PooledHeads(nn.Module):
    """fc(p) + 0.1·aux(p): aux is the pooled stream's last linear reader, so its view's gather is 'aux.select'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Linear(8, 4)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        p = torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.c2(s) + s), 1), 1)
        return self.fc(p) + 0.1 * self.aux(p)


def test_a_layer_keeps_its_module_path_when_its_gather_is_named_inside_it() -> None:
    m = _PooledHeads().eval()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    g = ns.import_model(m, (x,))
    cut_view(g, _group(g, "aux"), "aux", ChannelSelection(keep=[0, 3, 5]))
    assert [n.id for n in g.nodes() if n.kind == "gather"] == ["aux.select"]
    tm = to_torch(g)
    assert isinstance(tm.aux, nn.Linear) and tuple(tm.aux.weight.shape) == (4, 3)
    assert isinstance(tm.fc, nn.Linear) and tuple(tm.fc.weight.shape) == (4, 8)
    assert sorted(k for k in tm.state_dict() if k.startswith("aux")) == ["aux.bias", "aux.weight",
                                                                          "aux_select.indices"]
