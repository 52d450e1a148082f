"""How a diagnostic names its place."""

from __future__ import annotations

from netsqueeze.errors import Diagnostic, SourceSpan


def test_a_node_is_named_once() -> None:
    # the place first when the message does not name it
    assert Diagnostic("its weight is not finite", node="fc1").format() == "node 'fc1': error: its weight is not finite"
    # a message that starts with its node says so itself: not "node 'fc1': error: node 'fc1' ..."
    assert Diagnostic("node 'fc1' (Gemm) reads 'x', which is not defined", node="fc1").format() == (
        "error: node 'fc1' (Gemm) reads 'x', which is not defined")
    # another node first in the message is not this one
    assert Diagnostic("node 'fc10' is opaque", node="fc1").format() == "node 'fc1': error: node 'fc10' is opaque"
    # a source span stays first, the node after it
    span = SourceSpan("p.nsq", 3, 5)
    assert Diagnostic("node 'fc1' is opaque", node="fc1", span=span).format() == (
        "p.nsq:3:5: error: node 'fc1' is opaque (node 'fc1')")
