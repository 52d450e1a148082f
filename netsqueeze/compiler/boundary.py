"""The boundary between netsqueeze and the user's code and numbers.

Every call into user code (a model factory, `example_inputs()`, `calibration()`, a calibration
iterator, `eval_fn`) goes through `call_user`: an exception becomes a `UserCodeError` naming what
failed, with the user's own traceback attached as a note. Numbers that come from outside (input
data, `eval_fn` results, measured fidelity) are checked to be finite here.
"""

from __future__ import annotations

import math
import numbers
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from netsqueeze.errors import InputMismatchError, NetsqueezeError, NonFiniteError, UserCodeError

T = TypeVar("T")


def user_traceback(e: BaseException) -> str:
    """The traceback of `e` from the user's frames on (the frame that made the call is dropped)."""
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(e), e, tb)).rstrip()


def user_error(what: str, e: BaseException) -> UserCodeError:
    """A `UserCodeError` for user code `what` that raised `e`, the user's traceback attached as a note."""
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    err = UserCodeError(f"{what} raised {type(e).__name__}" + (f": {detail}" if detail else ""))
    err.add_note(user_traceback(e))
    return err


def call_user(what: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, with any exception but a `NetsqueezeError` turned into a `UserCodeError` naming `what`."""
    try:
        return fn(*args)
    except NetsqueezeError:
        raise
    except Exception as e:
        raise user_error(what, e) from e


def iterate_user(what: str, it: Iterator[T]) -> Iterator[T]:
    """Items of a user iterator; an exception while producing one is a `UserCodeError` naming `what`."""
    i = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except NetsqueezeError:
            raise
        except Exception as e:
            raise user_error(f"{what} (producing item {i})", e) from e
        yield item
        i += 1


def check_dense(t: torch.Tensor, where: str) -> None:
    """Raises `InputMismatchError` naming `where` when `t` holds no data netsqueeze can run on: a meta tensor
    (shapes only) or a sparse / non-strided one."""
    if t.device.type == "meta":
        raise InputMismatchError(f"{where} is a meta tensor (a shape without data): give it real data")
    if t.layout != torch.strided:
        raise InputMismatchError(f"{where} is a {str(t.layout).removeprefix('torch.')} tensor: give it dense "
                                 "(tensor.to_dense())")


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raises `NonFiniteError` naming `where` when floating tensor `t` holds a NaN or an Inf."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(t).sum())
    n_bad = int((~finite).sum())
    kinds = " and ".join(k for k, n in (("NaN", n_nan), ("Inf", n_bad - n_nan)) if n)
    raise NonFiniteError(f"{where} contains {kinds} ({n_bad} of {t.numel()} values)")


def as_number(value: Any, what: str) -> float:
    """`value` as a finite float: a Python/NumPy number or a one-element tensor; else a clear error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        number = float(value.item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserCodeError(f"{what} returned {shown} ({type(value).__name__}); expected a number")
    if not math.isfinite(number):
        raise NonFiniteError(f"{what} returned {number}; expected a finite number")
    return number
