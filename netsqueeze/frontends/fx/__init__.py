"""Torch frontend: captures an nn.Module with torch.export (aten level) or torch.fx.symbolic_trace
(module level) and maps the captured graph onto the canonical ops of `netsqueeze.ir`.

By concern: `capture` (the capture paths and the driver), `ops` (the aten op tables and the module /
function tables of the symbolic_trace fallback), `collapse` (modules that become one IR node),
`opaque` (ops the IR does not know, kept as picklable torch calls), `checks` (example-input checks),
`state` (the per-capture state the others share).
"""

from netsqueeze.frontends.fx.capture import from_torch
from netsqueeze.frontends.fx.opaque import AtenCall, FnCall, MethodCall, ModuleCall

__all__ = ["AtenCall", "FnCall", "MethodCall", "ModuleCall", "from_torch"]
