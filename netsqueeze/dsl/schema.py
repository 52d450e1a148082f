"""Option schemas from dataclass fields (a pass's options), and the check of Python option values.

The policy checker validates a policy's arguments against these schemas; `check_options` validates an
instance built from Python (`SqueezeFold(method="nope")`) with the same routine (`checker.option_problem`)
and the same wording. dsl never imports passes: any frozen dataclass with a `name` works.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

from netsqueeze.dsl.checker import ConflictCheck, OptionSchema, PassSchema, TypeDesc, option_problem
from netsqueeze.errors import Diagnostic, NetsqueezeError


def type_desc(annotation: Any) -> TypeDesc:
    """A `TypeDesc` for a field annotation; anything unrecognised becomes 'any' (accepted as written)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in (int, float, bool, str):
        return TypeDesc(annotation.__name__)
    if origin is Literal:
        return TypeDesc("literal", choices=tuple(args))
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return TypeDesc("optional", args=(type_desc(rest[0]),))
        if set(rest) == {int, float}:
            return TypeDesc("float")
        return TypeDesc("any")
    if origin in (list, Sequence, typing.Sequence) or (origin is not None and origin.__name__ in ("Sequence",)):
        return TypeDesc("list", args=(type_desc(args[0]),) if args else ())
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return TypeDesc("tuple", args=(type_desc(args[0]),))
        return TypeDesc("tuple", args=tuple(type_desc(a) for a in args), variadic=not args)
    return TypeDesc("any")


_SCHEMAS: weakref.WeakKeyDictionary[type, PassSchema] = weakref.WeakKeyDictionary()


def schema_from_dataclass(cls: type) -> PassSchema:
    """The checker's view of a pass class: its init fields with types, defaults, docs, ranges and units.

    Ranges and units come from field metadata: `field(default=0.5, metadata={"min": 0, "max": 1,
    "unit": "ratio", "doc": "..."})` (and `"min_exclusive": True` when `min` itself is out of range).
    """
    cached = _SCHEMAS.get(cls)
    if cached is None:
        cached = _SCHEMAS[cls] = _schema(cls)
    return cached


def _schema(cls: type) -> PassSchema:
    try:
        hints = get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to 'any'
        hints = {}
    opts = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        md: Mapping[str, Any] = f.metadata or {}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        opts.append(OptionSchema(
            f.name, type_desc(hints.get(f.name, Any)), default, required, str(md.get("doc", "")),
            md.get("min"), md.get("max"), md.get("unit"), bool(md.get("min_exclusive", False)),
        ))
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass puts in place of a missing docstring
        doc = ""
    return PassSchema(str(getattr(cls, "name", "") or cls.__name__), tuple(opts), doc, _conflict_check(cls))


def _conflict_check(cls: type) -> ConflictCheck | None:
    """The class's `option_conflicts(given)` classmethod (`passes.base.Pass.option_conflicts`), for the checker to
    call on the options a policy sets; None when the class has none. Holds the class weakly, as `_SCHEMAS` does."""
    if not callable(getattr(cls, "option_conflicts", None)):
        return None
    ref = weakref.ref(cls)

    def check(given: Mapping[str, Any]) -> list[tuple[str, str]]:
        c = ref()
        return [] if c is None else [(str(k), str(m)) for k, m in c.option_conflicts(given)]  # type: ignore[attr-defined]

    return check


def check_options(instance: Any) -> None:
    """Raises `NetsqueezeError` for the first option of pass `instance` (a dataclass built from Python)
    that the policy checker would reject, with the checker's message: "option 'method' of pass
    'squeeze_fold' must be one of 'svd', ..., got 'nope'"."""
    schema = schema_from_dataclass(type(instance))
    for opt in schema.options:
        problem = option_problem(getattr(instance, opt.name), opt, f"option '{opt.name}' of pass '{schema.name}'")
        if problem is not None:
            raise NetsqueezeError(Diagnostic(problem))
