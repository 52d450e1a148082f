"""The payloads of opaque nodes captured from torch: picklable calls of an aten overload, a torch function,
a tensor method or a submodule, with `Slot`s where the node's operands go. The torch backend runs them; the
ONNX backend translates the aten calls it knows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Slot:
    """Placeholder for the i-th operand tensor inside an opaque call's argument template."""

    index: int


def fill(template: Any, xs: Sequence[torch.Tensor]) -> Any:
    if isinstance(template, Slot):
        return xs[template.index]
    if isinstance(template, (list, tuple)):
        return type(template)(fill(t, xs) for t in template)
    if isinstance(template, dict):
        return {k: fill(v, xs) for k, v in template.items()}
    return template


@dataclass
class AtenCall:
    """Calls an aten overload by name (OpOverload objects do not pickle) with operands filled in."""

    namespace: str
    packet: str
    overload: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> Any:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.packet), self.overload)

    def __call__(self, *xs: torch.Tensor) -> Any:
        return self.target(*fill(self.args, xs), **fill(self.kwargs, xs))


@dataclass
class FnCall:
    """Calls a plain torch function (module-level graphs) with operands filled in."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *xs: torch.Tensor) -> Any:
        return self.fn(*fill(self.args, xs), **fill(self.kwargs, xs))


@dataclass
class MethodCall:
    """Calls a tensor method by name; args[0] is the receiver."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *xs: torch.Tensor) -> Any:
        a = fill(self.args, xs)
        return getattr(a[0], self.name)(*a[1:], **fill(self.kwargs, xs))


@dataclass
class ModuleCall:
    """Calls a private copy of a submodule the IR does not know."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *xs: torch.Tensor) -> Any:
        return self.module(*fill(self.args, xs), **fill(self.kwargs, xs))
