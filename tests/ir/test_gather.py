"""The `gather` op (x.index_select(axis, indices)): shape rule and errors, capture from torch and ONNX, both
backends, the text form, channel coupling, and removal of channels only a gather dropped."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import NetsqueezeError, VerifyError
from netsqueeze.ir import Graph, parse_graph, print_graph
from netsqueeze.passes.dependency import find_groups
from netsqueeze.passes.rewrite import ChannelSelection, apply_selection


class _TwoGathers(nn.Module):
    """Two convs of 8 channels, channels 5, 1, 3 of each gathered and added, then averaged into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.d = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(3, 5)
        self.register_buffer("idx", torch.tensor([5, 1, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.c(x)).index_select(1, self.idx) + self.d(x).index_select(1, self.idx)
        return self.fc(s.mean((2, 3)))


def _out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = m(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@torch.no_grad()
def test_torch_capture_couples_gathered_channels_and_frees_the_rest() -> None:
    m = _TwoGathers().eval()
    x = torch.randn(2, 3, 6, 6)
    g = ns.import_model(m, (x,))
    gathers = [(n.id, n.attrs) for n in g.nodes() if n.kind == "gather"]
    assert [a for _, a in gathers] == [{"axis": 1, "indices": (5, 1, 3)}] * 2
    groups = find_groups(g)
    by_size = sorted((grp.size, grp.producers, grp.consumers, grp.frozen) for grp in groups if grp.frozen is None)
    # the gathered channels of both convs and what reads them; the 5 others of each conv, read by nothing
    assert by_size == [(3, ("c", "d"), ("fc",), None), (5, ("c",), (), None), (5, ("d",), (), None)]
    gathered = next(grp for grp in groups if grp.size == 3 and grp.frozen is None)
    index = {(m_.node, m_.target): m_.index for m_ in gathered.members}
    assert index[("c", "weight")] == ((1,), (3,), (5,)) and index[(gathers[0][0], "out0")] == ((1,), (2,), (0,))


@torch.no_grad()
def test_channels_only_a_gather_dropped_are_removed_and_its_indices_renumbered() -> None:
    m = _TwoGathers().eval()
    x = torch.randn(2, 3, 6, 6)
    g = ns.import_model(m, (x,))
    groups = find_groups(g)
    dead = {grp.id: ChannelSelection(keep=[]) for grp in groups if grp.frozen is None and not grp.consumers}
    assert len(dead) == 2
    apply_selection(g, groups, dead)
    assert g.node("c").params["weight"].shape == (3, 3, 3, 3) and g.node("d").params["weight"].shape == (3, 3, 1, 1)
    assert [n.attrs["indices"] for n in g.nodes() if n.kind == "gather"] == [(2, 0, 1), (2, 0, 1)]
    want = m(x)
    assert torch.equal(_out(to_torch(g), x), want)
    assert np.abs(_ort(to_onnx(g), x.numpy()) - want.numpy()).max() < 1e-5
    # a group whose channels fill their axes cannot be emptied
    groups = find_groups(g)
    whole = next(grp for grp in groups if grp.producers == ("c", "d"))
    with pytest.raises(NetsqueezeError) as e:
        apply_selection(g, groups, {whole.id: ChannelSelection(keep=[])})
    assert e.value.message == (f"channel group {whole.id}: a selection must keep at least one channel (its axes "
                               "hold no other channels)")


@torch.no_grad()
def test_onnx_gather_of_constant_positions_imports_as_gather_and_round_trips() -> None:
    x = np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32)
    node = helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
                              [numpy_helper.from_array(np.array([4, -6, 2], dtype=np.int64), "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = ns.import_model(model, (torch.from_numpy(x),))
    assert [(n.kind, n.attrs) for n in g.nodes() if n.kind not in ("input", "output")] == [
        ("gather", {"axis": 1, "indices": (4, 0, 2)})]
    assert np.array_equal(_ort(to_onnx(g), x), x[:, [4, 0, 2]])
    assert torch.equal(_out(to_torch(g), torch.from_numpy(x)), torch.from_numpy(x)[:, [4, 0, 2]])
    text = print_graph(g, values=True)
    assert "= gather(%x) {axis=1, indices=(4, 0, 2)}" in text
    back = parse_graph(text)
    assert back.node(next(n.id for n in g.nodes() if n.kind == "gather")).attrs["indices"] == (4, 0, 2)
    assert torch.equal(_out(to_torch(back), torch.from_numpy(x)), torch.from_numpy(x)[:, [4, 0, 2]])


def test_bad_indices_are_verify_errors_naming_the_node() -> None:
    for idx, why in (((1, 1), "indices must be distinct integers in [0, 4), got [1, 1]"),
                     ((0, 4), "indices must be distinct integers in [0, 4), got [0, 4]"),
                     ((), "indices must be distinct integers in [0, 4), got []")):
        g = Graph("bad")
        x = g.add_node("x", "input", attrs={"shape": (2, 4)})
        g.add_node("out", "output", [g.add_node("pick", "gather", [x], attrs={"axis": 1, "indices": idx})])
        with pytest.raises(VerifyError) as e:
            g.infer_shapes()
        assert e.value.message == f"gather 'pick': {why}"
