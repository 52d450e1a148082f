"""The pass registry: built-ins by name, third-party passes by decorator or entry point.

Third-party packages register passes through the entry-point group `netsqueeze.passes`,
each entry point naming a Pass subclass. A duplicate name is an error.
"""

from __future__ import annotations

from importlib import metadata
from typing import TypeVar

from netsqueeze.errors import Diagnostic, NetsqueezeError, did_you_mean
from netsqueeze.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False
P = TypeVar("P", bound=type[Pass])

ENTRY_POINT_GROUP = "netsqueeze.passes"


def register_pass(cls: P) -> P:
    """Class decorator: registers a Pass subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise NetsqueezeError(f"register_pass expects a Pass subclass, got {cls!r}")
    # checked on the class itself: a subclass without @dataclass inherits the base's dataclass params
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise NetsqueezeError(f"pass {cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
    name = cls.name
    if not name or not name.isidentifier():
        raise NetsqueezeError(f"pass {cls.__name__} needs a `name` that is an identifier, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        other = _REGISTRY[name]
        raise NetsqueezeError(
            f"duplicate pass name '{name}': {cls.__module__}.{cls.__qualname__} and "
            f"{other.__module__}.{other.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:
            raise NetsqueezeError(f"cannot load pass entry point '{ep.name}' ({ep.value}): {e}") from e
        if getattr(cls, "name", None) != ep.name:
            raise NetsqueezeError(f"entry point '{ep.name}' names a pass whose name is {getattr(cls, 'name', None)!r}")
        register_pass(cls)


def all_passes() -> dict[str, type[Pass]]:
    import netsqueeze.passes.builtin  # noqa: F401  (registers the built-in passes)

    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    if not isinstance(name, str):
        raise NetsqueezeError(Diagnostic(f"a pass name is a string, got {type(name).__name__}"))
    passes = all_passes()
    if name not in passes:
        raise NetsqueezeError(Diagnostic(f"unknown pass '{name}'{did_you_mean(name, passes)}"))
    return passes[name]
