"""Per-kind dispatch tables (frontend handlers, backend emitters) and their registering decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


def registrar(table: dict[str, F]) -> Callable[..., Callable[[F], F]]:
    """`@deco("a", "b")` puts the decorated function in `table` under each name; other modules extend it too."""

    def deco(*names: str) -> Callable[[F], F]:
        def register(fn: F) -> F:
            for n in names:
                table[n] = fn
            return fn

        return register

    return deco
