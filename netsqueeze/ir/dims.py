"""Symbolic dimension sizes: `Dim`, an int that remembers how it depends on the model's dynamic dims.

A dim that is dynamic in the source (batch, sequence, H, W) is a `Dim`: it *is* its example size (an
`int` subclass, so shape inference, FLOPs and every analysis run on the concrete example) and it
carries `expr`, a sympy expression over the named dynamic dims, through arithmetic (`+ - * // %`).
Backends read `expr` to keep such dims dynamic: ONNX `dim_param`s and shape computations, torch code
that reads `x.shape`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sympy


class Dim(int):
    """A dimension size equal to its example value, with `expr` saying how it follows the dynamic dims."""

    expr: sympy.Expr

    def __new__(cls, value: int, expr: Any = None) -> Dim:
        obj = super().__new__(cls, int(value))
        obj.expr = sympy.Integer(int(value)) if expr is None else sympy.sympify(expr)
        return obj

    @staticmethod
    def named(name: str, value: int) -> Dim:
        """The dynamic dim `name` (a graph input's axis) at example size `value`."""
        return Dim(value, sympy.Symbol(name, integer=True, positive=True))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Dim, (int(self), self.expr))

    def __deepcopy__(self, memo: dict[int, Any]) -> Dim:
        return self

    def __copy__(self) -> Dim:
        return self

    def __repr__(self) -> str:
        return f"Dim({int(self)}, {self.expr})"

    def __str__(self) -> str:
        return str(int(self))

    # arithmetic keeps the expression; comparisons, hashing and indexing use the example value (int's)
    def _op(self, other: Any, fn: Callable[[Any, Any], Any], reverse: bool = False) -> Any:
        if not isinstance(other, int) or isinstance(other, bool):
            return NotImplemented
        a, b = (other, self) if reverse else (self, other)
        value = fn(int(a), int(b))
        expr = fn(expr_of(a), expr_of(b))
        return make(value, expr)

    def __add__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a + b)

    def __radd__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a + b, True)

    def __sub__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a - b)

    def __rsub__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a - b, True)

    def __mul__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a * b)

    def __rmul__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a * b, True)

    def __floordiv__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a // b)

    def __rfloordiv__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a // b, True)

    def __mod__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a % b)

    def __rmod__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a % b, True)

    def __neg__(self) -> Any:
        return make(-int(self), -self.expr)

    def __pos__(self) -> Dim:
        return self

    def __abs__(self) -> Any:
        return self if int(self) >= 0 else -self


def expr_of(d: int) -> sympy.Expr:
    """The expression of a size: a `Dim`'s own, a plain int's constant."""
    return d.expr if isinstance(d, Dim) else sympy.Integer(int(d))


def make(value: int, expr: Any) -> int:
    """A `Dim`, or a plain int when the expression is a constant (the dim no longer depends on anything)."""
    e = sympy.sympify(expr)
    return int(value) if e.is_Integer else Dim(value, e)


def is_dynamic(d: object) -> bool:
    return isinstance(d, Dim) and not d.expr.is_Integer


def fmt(shape: tuple[int, ...]) -> str:
    """'batch, 3, H, W' (dynamic dims by their expression), for reports and errors."""
    return ", ".join(str(expr_of(d)) if is_dynamic(d) else str(int(d)) for d in shape)


def evaluate(d: int, sizes: Mapping[str, int]) -> int:
    """The size of `d` when the dynamic dims take `sizes`."""
    if not is_dynamic(d):
        return int(d)
    assert isinstance(d, Dim)
    return int(d.expr.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}))


def lower(expr: sympy.Expr, *, symbol: Callable[[str], Any], const: Callable[[int], Any],
          add: Callable[[Any, Any], Any], mul: Callable[[Any, Any], Any],
          floordiv: Callable[[Any, Any], Any], mod: Callable[[Any, Any], Any]) -> Any:
    """Builds a size expression out of a backend's operations: `symbol(name)` reads a dynamic dim at
    run time, the rest combine values. Sizes are positive, so floor division of a non-negative
    numerator is the runtimes' integer division."""

    def go(e: sympy.Expr) -> Any:
        if e.is_Integer:
            return const(int(e))
        if e.is_Symbol:
            return symbol(str(e))
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if not den.is_Integer:
                raise ValueError(f"cannot lower size expression {e}")
            return floordiv(go(sympy.expand(num)), const(int(den)))
        if isinstance(e, sympy.Mod):
            return mod(go(e.args[0]), go(e.args[1]))
        if e.is_Add or e.is_Mul:
            combine = add if e.is_Add else mul
            out = go(e.args[0])
            for t in e.args[1:]:
                out = combine(out, go(t))
            return out
        if e.is_Pow and e.args[1].is_Integer and int(e.args[1]) > 0:
            base = go(e.args[0])
            out = base
            for _ in range(int(e.args[1]) - 1):
                out = mul(out, base)
            return out
        raise ValueError(f"cannot lower size expression {e}")

    return go(sympy.sympify(expr))


def symbol_sources(inputs: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, int]]:
    """Where each dynamic dim can be read at run time: name → (graph input id, axis), first occurrence."""
    out: dict[str, tuple[str, int]] = {}
    for nid, shape in inputs:
        for axis, d in enumerate(shape):
            if isinstance(d, Dim) and d.expr.is_Symbol:
                out.setdefault(str(d.expr), (nid, axis))
    return out


def reshape_plan(out: tuple[int, ...], src: tuple[int, ...]) -> list[int | None]:
    """How a backend writes the target of a reshape from `src` to `out` when dims are dynamic: per output
    dim a fixed size, 0 (copy the input's dim at that position: the same dynamic dim), -1 (the one dim left
    to infer), or None (a size to compute at run time)."""
    plan: list[int | None] = []
    for i, d in enumerate(out):
        if not is_dynamic(d):
            plan.append(int(d))
        elif i < len(src) and is_dynamic(src[i]) and expr_of(src[i]) == expr_of(d):
            plan.append(0)
        else:
            plan.append(None)
    unknown = [i for i, t in enumerate(plan) if t is None]
    if len(unknown) == 1:
        plan[unknown[0]] = -1
    elif unknown:  # the one left to infer: a size no backend can compute (floor(3·H / floor(H / 2))), if any
        hard = [i for i in unknown if not lowerable(expr_of(out[i]))]
        if hard:
            plan[hard[0]] = -1
    return plan


def lowerable(expr: sympy.Expr) -> bool:
    """Whether `lower` can build `expr` (a floor over a symbolic denominator it cannot)."""
    try:
        lower(expr, symbol=lambda n: 0, const=int, add=lambda a, b: 0, mul=lambda a, b: 0,
              floordiv=lambda a, b: 0, mod=lambda a, b: 0)
    except ValueError:
        return False
    return True
