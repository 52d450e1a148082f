"""`compile()`: import a model, resolve the policy, run the pipeline, check budgets and guards, emit, report."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from netsqueeze.compiler.calibration import (
    Batch,
    CalibrationSource,
    activation_stream,
    calibration_source,
    check_batch,
)
from netsqueeze.compiler.pipeline import Step, run_pipeline
from netsqueeze.compiler.report import CompileReport
from netsqueeze.errors import (
    BudgetError,
    CaptureError,
    Diagnostic,
    InputMismatchError,
    NetsqueezeError,
    SourceSpan,
)
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.passes.base import Pass, PassContext
from netsqueeze.passes.registry import all_passes

Target = Literal["torch", "onnx"]


@dataclass
class CompileResult:
    model: Any  # torch.fx.GraphModule or onnx.ModelProto
    graph: Graph
    report: CompileReport

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.model, self.graph, self.report))


# ---- model import ----------------------------------------------------------------------------------
def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return str(model).endswith(".onnx")
    return type(model).__name__ == "ModelProto"


def load_model_file(path: str | os.PathLike[str]) -> tuple[Any, tuple[torch.Tensor, ...] | None]:
    """Loads what `netsqueeze inspect/compile MODEL` accepts.

    - `model.onnx`: returned as the path (the ONNX frontend reads it).
    - `file.py` or `file.py:factory`: a Python file whose factory (default: `build`, `make_model` or
      `model`) returns an nn.Module or `(module, example_inputs)`; an `example_inputs()` function
      in the same file supplies inputs when the factory returns only the module.
    - `model.pt` / `.pth` (a pickled nn.Module) or `.pt2` (a saved ExportedProgram).
    """
    text = str(path)
    factory_name: str | None = None
    if ".py:" in text:
        text, factory_name = text.rsplit(":", 1)
    p = Path(text)
    if not p.exists():
        raise CaptureError(f"model file '{p}' does not exist")
    if p.suffix == ".onnx":
        return str(p), None
    if p.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"_netsqueeze_model_{p.stem}", p)
        if spec is None or spec.loader is None:
            raise CaptureError(f"cannot import '{p}'")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            raise CaptureError(f"importing '{p}' failed: {type(e).__name__}: {e}") from e
        names = [factory_name] if factory_name else ["build", "make_model", "model"]
        fn = next((getattr(mod, n) for n in names if callable(getattr(mod, n, None))), None)
        if fn is None:
            raise CaptureError(f"'{p}' defines no model factory (looked for {', '.join(names)})")
        out = fn()
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
            return out[0], tuple(out[1]) if isinstance(out[1], (tuple, list)) else (out[1],)
        if not isinstance(out, torch.nn.Module):
            raise CaptureError(f"factory '{fn.__name__}' in '{p}' returned {type(out).__name__}, expected an nn.Module")
        ex = getattr(mod, "example_inputs", None)
        inputs = ex() if callable(ex) else None
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        return out, tuple(inputs) if inputs is not None else None
    if p.suffix == ".pt2":
        return torch.export.load(str(p)), None
    if p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CaptureError(f"cannot load '{p}': {type(e).__name__}: {e}") from e
        if not isinstance(obj, torch.nn.Module):
            raise CaptureError(f"'{p}' holds a {type(obj).__name__}, not an nn.Module (a state_dict needs its model class)")
        return obj, None
    raise CaptureError(f"unsupported model file '{p}' (use .onnx, .py, .pt, .pth or .pt2)")


def file_calibration(path: str | os.PathLike[str]) -> Any:
    """Calibration data a model's .py file provides through a `calibration()` function, or None."""
    text = str(path)
    if ".py:" in text:
        text = text.rsplit(":", 1)[0]
    if not text.endswith(".py"):
        return None
    mod = sys.modules.get(f"_netsqueeze_model_{Path(text).stem}")
    fn = getattr(mod, "calibration", None) if mod is not None else None
    return fn() if callable(fn) else None


def import_model(model: Any, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
                 *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    """Lowers a torch model (Module, GraphModule, ExportedProgram), an ONNX model or a model file into the IR."""
    if isinstance(model, (str, os.PathLike)) and not _is_onnx(model):
        model, file_inputs = load_model_file(model)
        example_inputs = example_inputs if example_inputs is not None else file_inputs
    if _is_onnx(model):
        from netsqueeze.frontends.onnx import from_onnx

        shapes = {k: tuple(v) for k, v in input_shapes.items()} if input_shapes else None
        return from_onnx(model, input_shapes=shapes)
    from netsqueeze.frontends.fx import from_torch

    if example_inputs is None:
        raise InputMismatchError("a torch model needs example inputs: pass example_inputs=(tensor, ...) "
                                 "or declare `input` shapes in the policy")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return from_torch(model, tuple(example_inputs))


# ---- policy ------------------------------------------------------------------------------------------
PolicyLike = Any  # str (path or text), os.PathLike, a dsl Policy, or a sequence of Pass instances


@dataclass
class _Resolved:
    steps: list[Step]
    budget: dict[str, float]
    bounds: dict[str, Any]
    guard: Any
    calibration: dict[str, Any]
    policy_hash: str | None
    plan_text: str | None
    inputs: list[Any]
    budget_spans: dict[str, SourceSpan] = field(default_factory=dict)


def _parse_policy(policy: PolicyLike, params: Mapping[str, Any] | None) -> Any:
    from netsqueeze import dsl

    str_params = {k: str(v) for k, v in (params or {}).items()}
    if isinstance(policy, os.PathLike) or (isinstance(policy, str) and "{" not in policy):
        return dsl.load_policy(Path(policy), params=str_params)
    if isinstance(policy, str):
        return dsl.parse_policy(policy, "<policy>", params=str_params)
    return policy


def _resolve(policy: PolicyLike, graph: Graph, params: Mapping[str, Any] | None) -> _Resolved:
    if isinstance(policy, Pass):
        policy = [policy]
    if isinstance(policy, (list, tuple)):
        bad = [p for p in policy if not isinstance(p, (Pass, Step))]
        if bad:
            raise NetsqueezeError(f"policy list entry {bad[0]!r} is not a Pass instance")
        steps = [p if isinstance(p, Step) else Step(p) for p in policy]
        return _Resolved(steps, {}, {}, None, {}, None, None, [])
    from netsqueeze.compiler.plan import resolve

    plan = resolve(_parse_policy(policy, params), graph, all_passes())
    steps = [Step(s.instance, s.selected, f"{s.span.file}:{s.span.line}", s.span) for s in plan.steps]
    return _Resolved(steps, dict(plan.budget), dict(plan.bounds), plan.guard, dict(plan.calibration),
                     plan.policy_hash, plan.to_text(), list(plan.inputs), dict(plan.budget_spans))


def _declared_inputs(policy: PolicyLike, params: Mapping[str, Any] | None) -> tuple[torch.Tensor, ...] | None:
    """Random example inputs from the policy's `input` declarations, for models given without inputs."""
    if isinstance(policy, (list, tuple, Pass)):
        return None
    pol = _parse_policy(policy, params)
    decls = getattr(pol, "inputs", None) or []
    if not decls:
        return None
    gen = torch.Generator().manual_seed(0)
    out = []
    for d in decls:
        dtype = getattr(torch, str(d.dtype))
        if dtype.is_floating_point:
            out.append(torch.randn(tuple(d.shape), generator=gen).to(dtype))
        else:
            out.append(torch.zeros(tuple(d.shape), dtype=dtype))
    return tuple(out)


# ---- fidelity ------------------------------------------------------------------------------------------
def _run_outputs(module: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*batch)
    return list(out) if isinstance(out, tuple) else [out]


def measure_output_error(original: Graph | torch.nn.Module, compressed: Graph,
                         batches: CalibrationSource) -> dict[str, float]:
    """Relative L2 error ‖y' − y‖/‖y‖ and max abs error of the outputs over the given batches.
    `original` may be its emitted module already (a search measuring many candidates builds it once)."""
    from netsqueeze.backends.torch import to_torch

    ref = to_torch(original) if isinstance(original, Graph) else original
    new = to_torch(compressed)
    num = den = 0.0
    max_abs = 0.0
    for batch in batches():
        for a, b in zip(_run_outputs(ref, batch), _run_outputs(new, batch)):
            a, b = a.double(), b.double()
            num += float(((a - b) ** 2).sum())
            den += float((a**2).sum())
            max_abs = max(max_abs, float((a - b).abs().max()))
    return {"output_error": math.sqrt(num / den) if den else 0.0, "max_abs_error": max_abs}


def _fidelity_fn(original: Graph, batches: CalibrationSource | None,
                 eval_fn: Callable[[Any], float] | None) -> Callable[[Graph, str], float | None]:
    """Fidelity of a candidate graph, for search passes (`PassContext.fidelity`): output error on the
    calibration batches, or the top-1 drop through the user's `eval_fn`."""
    ref: list[torch.nn.Module] = []  # the original, emitted once
    base: list[float] = []

    def measure(graph: Graph, metric: str) -> float | None:
        from netsqueeze.backends.torch import to_torch

        if metric not in ("top1_drop", "output_error", "max_abs_error"):
            return None
        if (metric == "top1_drop" and eval_fn is None) or (metric != "top1_drop" and batches is None):
            return None
        if not ref:
            ref.append(to_torch(original))
        if metric == "top1_drop":
            assert eval_fn is not None
            if not base:
                base.append(float(eval_fn(ref[0])))
            return base[0] - float(eval_fn(to_torch(graph)))
        assert batches is not None
        return measure_output_error(ref[0], graph, batches)[metric]

    return measure


def _check_budget(budget: Mapping[str, float], before: Any, after: Any,
                  spans: Mapping[str, SourceSpan] | None = None) -> None:
    """Raises BudgetError, located at each missed `budget` item, stating what the pipeline reached."""
    # latency is handed to the passes (ctx.budget) but compile() does not measure it
    attr = {"params": "params", "flops": "flops", "bytes": "param_bytes"}
    problems = []
    for key, limit in budget.items():
        if key not in attr:
            continue
        total, now = getattr(before, attr[key]), getattr(after, attr[key])
        reached = now / max(1, total)
        if reached > limit + 1e-9:
            problems.append(Diagnostic(
                f"budget {key} <= {limit:.1%} not met: the pipeline reached {reached:.1%} "
                f"({now:,} of {total:,} {key})", span=(spans or {}).get(key)))
    if problems:
        raise BudgetError(problems)


def _check_guard(guard: Any, fidelity: Mapping[str, float]) -> None:
    """Raises BudgetError, located at the `guard` statement, when the guard cannot be measured or is missed."""
    if guard is None:
        return
    metric, limit = str(guard.metric), float(guard.limit)
    span = getattr(guard, "span", None)
    if metric not in fidelity:
        raise BudgetError(Diagnostic(
            f"guard {metric.replace('_', ' ')} cannot be measured: "
            + ("pass eval_fn=... to compile()" if metric == "top1_drop" else "no data to run"), span=span))
    if fidelity[metric] > limit + 1e-12:
        raise BudgetError(Diagnostic(
            f"guard {metric.replace('_', ' ')} <= {limit:.2%} not met: reached {fidelity[metric]:.2%}", span=span))


# ---- compile -------------------------------------------------------------------------------------------
def compile(
    model: Any,
    policy: PolicyLike = (),
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    calibration: Any = None,
    target: Target = "torch",
    params: Mapping[str, Any] | None = None,
    eval_fn: Callable[[Any], float] | None = None,
    precision: Literal["fp32", "fp16"] = "fp32",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compresses `model` as `policy` says and emits it for `target`.

    model: an nn.Module / GraphModule / ExportedProgram (with `example_inputs`), an ONNX path or
    ModelProto, or a model file (.py factory, .pt, .pt2). policy: a policy file path, policy text,
    or a list of Pass instances (the Python builder form). calibration: an iterable of input
    batches, a tensor of samples, or a .npz/.npy/.pt file. eval_fn(model) -> top-1 accuracy, used by
    `guard top1 drop`. The input model object is never modified.
    """
    if target not in ("torch", "onnx"):
        raise NetsqueezeError(f"unknown target '{target}' (use 'torch' or 'onnx')")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if example_inputs is None and not _is_onnx(model) and not isinstance(model, (str, os.PathLike)):
        example_inputs = _declared_inputs(policy, params)
    graph = import_model(model, example_inputs, input_shapes=input_shapes)
    times["import"] = time.perf_counter() - t0
    original = graph.copy()
    before = graph_stats(graph)

    t1 = time.perf_counter()
    resolved = _resolve(policy, graph, params)
    times["resolve"] = time.perf_counter() - t1

    cal = resolved.calibration
    source: CalibrationSource | None = None
    if calibration is None and cal.get("data"):
        # `calibrate data "file"` in the policy: relative to the policy file
        data = Path(str(cal["data"]))
        policy_file = resolved.steps[0].span.file if resolved.steps and resolved.steps[0].span else None
        if not data.is_absolute() and policy_file and Path(policy_file).exists():
            data = Path(policy_file).parent / data
        calibration = data
    if calibration is not None:
        source = calibration_source(calibration, batch_size=int(cal.get("batch", 64)), samples=cal.get("samples"))
        first = next(iter(source()), None)
        if first is None:
            raise InputMismatchError("calibration data is empty")
        check_batch(graph, first, "calibration batch 0")
    eval_batches: CalibrationSource | None = source
    if eval_batches is None and example_inputs is not None:
        ex = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        eval_batches = lambda: iter([ex])  # noqa: E731
    guard = resolved.guard
    ctx = PassContext(
        stream_fn=activation_stream(source) if source is not None else None,
        budget=resolved.budget,
        bounds=resolved.bounds,
        seed=int(cal.get("seed", seed)),
        log=log or (lambda msg: None),
        original=original,
        guard=(str(guard.metric), float(guard.limit)) if guard is not None else None,
        fidelity_fn=_fidelity_fn(original, eval_batches, eval_fn),
    )
    t2 = time.perf_counter()
    run = run_pipeline(graph, resolved.steps, ctx)
    times["passes"] = time.perf_counter() - t2
    after = graph_stats(graph)
    _check_budget(resolved.budget, before, after, resolved.budget_spans)

    fidelity: dict[str, float] = {}
    notes: list[str] = []
    if eval_batches is not None and any(n.kind != "input" for n in graph.nodes()):
        try:
            fidelity.update(measure_output_error(original, graph, eval_batches))
        except NetsqueezeError as e:
            notes.append(f"output error not measured: {e.message}")

    t3 = time.perf_counter()
    out_model: Any
    if target == "torch":
        from netsqueeze.backends.torch import to_torch

        out_model = to_torch(graph)
        if precision == "fp16":
            out_model = out_model.half()
    else:
        from netsqueeze.backends.onnx import to_onnx

        meta = {"netsqueeze.policy_hash": resolved.policy_hash or "", "netsqueeze.plan": resolved.plan_text or ""}
        out_model = to_onnx(graph, precision=precision, metadata={k: v for k, v in meta.items() if v})
    times["emit"] = time.perf_counter() - t3
    if eval_fn is not None:
        from netsqueeze.backends.torch import to_torch

        base = float(eval_fn(to_torch(original)))
        new = float(eval_fn(to_torch(graph)))
        fidelity.update({"top1_original": base, "top1": new, "top1_drop": base - new})
    _check_guard(resolved.guard, fidelity)
    times["total"] = time.perf_counter() - t0

    report = CompileReport(
        model_name=graph.name,
        frontend=str(graph.meta.get("frontend", "fx")),
        target=target,
        before=before,
        after=after,
        passes=run.records,
        times=times,
        policy_hash=resolved.policy_hash,
        plan=resolved.plan_text,
        fidelity=fidelity,
        notes=notes,
    )
    return CompileResult(out_model, graph, report)
