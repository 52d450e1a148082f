"""One definition per op: every op kind has both emitters, an attribute schema that `verify` enforces, and
the channel semantics the dependency analysis, the rewriting routine and the selectors read."""

from __future__ import annotations

import pytest
import torch

from netsqueeze.backends.onnx import EMITTERS as ONNX_EMITTERS
from netsqueeze.backends.torch import EMITTERS as TORCH_EMITTERS
from netsqueeze.compiler.selectors import node_attributes
from netsqueeze.errors import VerifyError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.ops import OPS, REQUIRED, attr
from netsqueeze.passes.dependency import CONSUMER_AXES, PRODUCER_AXES

# graph boundaries are handled by the backends' walks, not by emitters
_BOUNDARY = {"input", "output"}


@pytest.mark.parametrize("kind", sorted(set(OPS) - _BOUNDARY))
def test_every_op_has_both_emitters(kind: str) -> None:
    assert kind in TORCH_EMITTERS, f"op '{kind}' has no torch emitter"
    assert kind in ONNX_EMITTERS, f"op '{kind}' has no ONNX emitter"


def _conv_graph(**extra: object) -> Graph:
    g = Graph("g")
    g.add_node("x", "input", attrs={"shape": (1, 3, 8, 8)})
    g.add_node("c", "conv", ["x"], attrs={"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], **extra},
               params={"weight": torch.zeros(4, 3, 3, 3)})
    g.add_node("out", "output", ["c"])
    g.infer_shapes()
    return g


def test_verify_rejects_unknown_and_missing_attributes() -> None:
    _conv_graph().verify()
    with pytest.raises(VerifyError) as e:
        _conv_graph(group=2).verify()
    assert e.value.message == "conv 'c' has unknown attribute 'group' (did you mean 'groups'?)"
    g = _conv_graph()
    del g.node("c").attrs["dilation"]
    with pytest.raises(VerifyError) as e:
        g.verify()
    assert e.value.message == "conv 'c' is missing attribute 'dilation'"
    _conv_graph(_private=1).verify()  # attrs starting with '_' are the frontends' own notes


def test_schema_defaults() -> None:
    g = _conv_graph()
    assert attr(g.node("c"), "groups") == 1
    assert OPS["conv"].attrs is not None and OPS["conv"].attrs["stride"] is REQUIRED
    assert OPS["opaque"].attrs is None  # opaque ops keep whatever the source had


def test_channel_axes_come_from_the_op_definitions() -> None:
    assert ("conv", "weight", 0) in PRODUCER_AXES and ("conv_transpose", "weight", 1) in PRODUCER_AXES
    assert ("linear", "weight", 1) in CONSUMER_AXES and ("attention", "out_proj_weight", 1) in CONSUMER_AXES
    assert OPS["conv"].bias == {"weight": ("bias", 0)} and OPS["conv_transpose"].bias == {"weight": ("bias", 1)}
    conv = _conv_graph().node("c")
    assert OPS["conv"].foldable is not None and OPS["conv"].foldable(conv, "weight", 1)
    grouped = _conv_graph(groups=1).node("c")
    grouped.attrs["groups"] = 3
    assert not OPS["conv"].foldable(grouped, "weight", 1)
    assert OPS["matmul"].foldable is None


def test_selector_attributes_come_from_the_op_definition() -> None:
    a = node_attributes(_conv_graph().node("c"))
    assert (a["out_channels"], a["in_channels"], a["kernel"], a["groups"]) == (4, 3, (3, 3), 1)
    assert a["weight_form"] == "dense" and a["params"] == 4 * 3 * 9
