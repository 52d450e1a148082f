"""Example-input checks: a mismatch is reported against the input and the layer that rejected it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netsqueeze.errors import Diagnostic, InputMismatchError
from netsqueeze.frontends.fx.state import _dtype, _meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _expected(mod: nn.Module) -> str | None:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        sp = {1: "L", 2: "H, W", 3: "D, H, W"}[len(mod.kernel_size)]
        return f"[N, {mod.in_channels}, {sp}]"
    if isinstance(mod, nn.Linear):
        return f"[..., {mod.in_features}]"
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return f"[N, {mod.num_features}, ...]"
    if isinstance(mod, nn.LayerNorm):
        return "[..., " + ", ".join(str(d) for d in mod.normalized_shape) + "]"
    if isinstance(mod, nn.Embedding):
        return "integer indices"
    return None


def _check_inputs(model: nn.Module, names: list[str], example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Runs the model once; a failure is reported against the input and the layer that rejected it."""
    entered: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
    finished: list[str] = []  # the leaf layers whose forward returned, in order
    handles_ = []
    for path, m in model.named_modules():
        if path and not list(m.children()):
            handles_.append(m.register_forward_pre_hook(
                lambda mod, args, p=path: entered.append((p, mod, args))))  # type: ignore[misc]
            handles_.append(m.register_forward_hook(
                lambda mod, args, out, p=path: finished.append(p)))  # type: ignore[misc]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as e:
        given = ", ".join(f"'{n}' = {_meta(t)}" for n, t in zip(names, example_inputs))
        if entered and len(finished) == len(entered):
            # every layer entered returned: the failure is in the forward's own code between layers (an add of
            # mismatched shapes, a reshape), not in a layer the inputs reached
            raise InputMismatchError(Diagnostic(
                f"example inputs ({given}) do not fit the model: its forward failed after layer "
                f"'{entered[-1][0]}' ({type(entered[-1][1]).__name__}) returned, outside any layer",
                notes=(f"reason: {_first_line(e)}",))) from None
        culprit = None
        if entered:
            path, mod, args = entered[-1]
            idx = next((i for i, t in enumerate(example_inputs) if args and args[0] is t), None)
            culprit = (path, mod, idx)
        which = names[culprit[2]] if culprit and culprit[2] is not None else (names[0] if len(names) == 1 else None)
        head = f"example input '{which}'" if which else "example inputs"
        t = example_inputs[names.index(which)] if which else None
        msg = f"{head} ({_meta(t) if t is not None else given}) do not fit the model"
        if which:
            msg = f"{head} (given {_meta(t)}) does not fit the model"
        if culprit:
            path, mod, _ = culprit
            exp = _expected(mod)
            params = list(mod.parameters())
            dt = _dtype(params[0].dtype) if params else None
            if exp is not None and t is not None:
                if dt and t.dtype != params[0].dtype and not isinstance(mod, nn.Embedding):
                    exp = f"{dt}{exp}"
                msg += f": layer '{path}' ({type(mod).__name__}) expects {exp}"
            else:
                msg += f" at layer '{path}' ({type(mod).__name__})"
        raise InputMismatchError(Diagnostic(msg, node=culprit[0] if culprit else None,
                                            notes=(f"reason: {_first_line(e)}",))) from None
    finally:
        for h in handles_:
            h.remove()


def _check_count(model: nn.Module, n: int) -> None:
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in pos if p.default is p.empty]
    if not len(required) <= n <= len(pos):
        want = f"{len(required)}" if len(required) == len(pos) else f"{len(required)} to {len(pos)}"
        raise InputMismatchError(Diagnostic(
            f"{type(model).__name__}.forward takes {want} inputs ({', '.join(p.name for p in pos)}) "
            f"but {n} example inputs were given"))


def _forward_names(model: nn.Module, n: int) -> list[str]:
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [f"input_{i}" for i in range(len(names), n)])[:n]
