"""`compile()`: import a model, resolve the policy, run the pipeline, check budgets and guards, emit, report."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from netsqueeze.compiler.boundary import as_number, call_user, check_dense, check_finite, user_traceback
from netsqueeze.compiler.calibration import (
    Batch,
    CalibrationSource,
    PassCount,
    activation_stream,
    calibration_source,
    check_batch,
    check_static_batch,
    segment_runner,
    split_labels,
)
from netsqueeze.compiler.cost_model import block_note, cpu_block
from netsqueeze.compiler.files import load_exported_program, load_pickled_module
from netsqueeze.compiler.latency_budget import (
    LatencyOutcome,
    latency_target,
    run_for_latency,
    runtime_latency,
)
from netsqueeze.compiler.pipeline import Step, run_pipeline
from netsqueeze.compiler.progress import Progress
from netsqueeze.compiler.progress import enabled as progress_enabled
from netsqueeze.compiler.report import CompileReport, SearchRecorder
from netsqueeze.dsl.checker import install_op_kinds
from netsqueeze.errors import (
    BudgetError,
    CaptureError,
    Diagnostic,
    InputMismatchError,
    InternalError,
    NetsqueezeError,
    NonFiniteError,
    PolicyError,
    SourceSpan,
    UserCodeError,
    percent,
)
from netsqueeze.ir.graph import OUTPUT_TREE, Graph, Value
from netsqueeze.ir.ops import OPS
from netsqueeze.ir.stats import example_batch, graph_stats
from netsqueeze.passes.allocation import DEFAULT_ALIGN
from netsqueeze.passes.base import ActivationStream, Feeds, Pass, PassContext, Trainable, class_scores
from netsqueeze.passes.executor import Executor, make_executor
from netsqueeze.passes.refit import SHORT_FITS
from netsqueeze.passes.registry import all_passes
from netsqueeze.passes.squeeze_math import FIT_ROWS

# `type(...)` selectors name the IR's op kinds: the policy checker (which may not import ir) checks them against
# this table, in every selector, one no statement uses too, with or without a model
install_op_kinds(OPS)

Target = Literal["torch", "onnx"]
PRECISIONS = ("fp32", "fp16")
REPORT_HINT = "this is a bug in netsqueeze: please report it with the command that ran and its --verbose output"


@dataclass
class CompileResult:
    model: Any  # torch.fx.GraphModule or onnx.ModelProto
    graph: Graph
    report: CompileReport
    stored: bytes | None = None  # the compressed model file, with compile(store=...)
    # the files the compile read, as (role, path): `save` refuses to overwrite them
    sources: tuple[tuple[str, str], ...] = ()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.model, self.graph, self.report))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the compressed model file of `compile(store=...)` atomically (`netsqueeze.load` reads it): a
        `.nsq` path that is none of the files the compile read."""
        from netsqueeze.compiler.files import write_bytes
        from netsqueeze.compiler.stored import check_save_path

        if self.stored is None:
            raise NetsqueezeError("nothing to save: compile with store='ham' | 'sham' | 'csr' | 'dense'")
        write_bytes(check_save_path(path, self.sources), self.stored)


# ---- model import ----------------------------------------------------------------------------------
def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        from netsqueeze.compiler.files import is_onnx_file

        return is_onnx_file(model)
    return type(model).__name__ == "ModelProto"


def _as_inputs(value: Any, what: str) -> tuple[torch.Tensor, ...]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise UserCodeError(f"{what} gave {type(t).__name__} as example input {i}; expected a torch.Tensor")
    return tuple(items)


def load_model_file(path: str | os.PathLike[str], *,
                    trust_pickle: bool = False) -> tuple[Any, tuple[torch.Tensor, ...] | None]:
    """Loads what `netsqueeze inspect/compile MODEL` accepts.

    - `model.onnx`: returned as the path (the ONNX frontend reads it).
    - `file.py` or `file.py:factory`: a Python file whose factory (default: `build`, `make_model` or
      `model`) returns an nn.Module or `(module, example_inputs)`; an `example_inputs()` function
      in the same file supplies inputs when the factory returns only the module.
    - `model.pt` / `.pth` (a pickled nn.Module) or `.pt2` (a saved ExportedProgram): both unpickle,
      which can run code from the file, so both need `trust_pickle=True` (`--trust-pickle`); without
      it `.pt` is read with `torch.load(weights_only=True)`, which refuses anything but tensors.

    Exceptions from the user's code (the import, the factory, `example_inputs()`) are `CaptureError` /
    `UserCodeError`s naming the file and function, with the user's traceback as a note.
    """
    if not isinstance(trust_pickle, bool):  # "no" is truthy: it would unpickle
        raise NetsqueezeError(f"trust_pickle must be True or False, got {trust_pickle!r}")
    text = str(path)
    factory_name: str | None = None
    if ".py:" in text:
        text, factory_name = text.rsplit(":", 1)
    p = Path(text)
    if not p.exists():
        raise CaptureError(f"model file '{p}' does not exist")
    if p.is_dir():
        raise CaptureError(f"model file '{p}' is a directory")
    suffix = p.suffix.lower()  # `-o OUT.ONNX` writes ONNX: the same file read back is ONNX too
    if suffix == ".onnx":
        return str(p), None
    if suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"_netsqueeze_model_{p.stem}", p)
        if spec is None or spec.loader is None:
            raise CaptureError(f"cannot import '{p}'")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        no_cache = sys.dont_write_bytecode
        sys.dont_write_bytecode = True  # no __pycache__ left next to the user's file
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            err = CaptureError(f"importing '{p}' failed: {type(e).__name__}" + (f": {detail}" if detail else ""))
            err.add_note(user_traceback(e))
            raise err from e
        finally:
            sys.dont_write_bytecode = no_cache
        names = [factory_name] if factory_name else ["build", "make_model", "model"]
        fn = next((getattr(mod, n) for n in names if callable(getattr(mod, n, None))), None)
        if fn is None:
            raise CaptureError(f"'{p}' defines no model factory (looked for {', '.join(names)})")
        what = f"model factory '{getattr(fn, '__name__', names[0])}' in '{p}'"
        out = call_user(what, fn)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
            return out[0], _as_inputs(out[1], what)
        if not isinstance(out, torch.nn.Module):
            raise CaptureError(f"factory '{getattr(fn, '__name__', names[0])}' in '{p}' returned "
                               f"{type(out).__name__}, expected an nn.Module")
        ex = getattr(mod, "example_inputs", None)
        if not callable(ex):
            return out, None
        what = f"example_inputs() in '{p}'"
        return out, _as_inputs(call_user(what, ex), what)
    if suffix == ".pt2":
        program = load_exported_program(p, trust_pickle)
        saved = getattr(program, "example_inputs", None)
        args = saved[0] if isinstance(saved, tuple) and saved and isinstance(saved[0], tuple) else None
        ok = args is not None and all(isinstance(t, torch.Tensor) for t in args)
        return program, tuple(args) if ok and args is not None else None
    if suffix in (".pt", ".pth"):
        obj = load_pickled_module(p, trust_pickle)
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
    return call_user(f"calibration() in '{text}'", fn) if callable(fn) else None


def check_input_shapes(input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Raises InputMismatchError for an `input_shapes` that is not a mapping of input names to sequences of
    positive ints."""
    if input_shapes is not None and not isinstance(input_shapes, Mapping):
        raise InputMismatchError(f"input_shapes is a {type(input_shapes).__name__}: give a dict of input names to "
                                 "their dims, e.g. {'x': [1, 3, 224, 224]}")
    for name, dims in (input_shapes or {}).items():
        ok = isinstance(dims, Sequence) and not isinstance(dims, str) and len(dims) > 0
        if ok and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            continue
        raise InputMismatchError(f"input shape for '{name}' is {list(dims) if ok else dims!r}: "
                                 "dims must be positive integers")


def import_model(model: Any, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
                 *, input_shapes: Mapping[str, Sequence[int]] | None = None, trust_pickle: bool = False,
                 dynamic_shapes: Any = None) -> Graph:
    """Lowers a torch model (Module, GraphModule, ExportedProgram), an ONNX model or a model file into the IR.
    `.pt`/`.pt2` files that need unpickling load only with `trust_pickle=True`."""
    check_input_shapes(input_shapes)
    return _import(model, _check_example_inputs(example_inputs), input_shapes=input_shapes,
                   trust_pickle=trust_pickle, dynamic_shapes=dynamic_shapes)


def _import(model: Any, example_inputs: tuple[torch.Tensor, ...] | None, *,
            input_shapes: Mapping[str, Sequence[int]] | None, trust_pickle: bool, dynamic_shapes: Any) -> Graph:
    """`import_model` on arguments already checked (`compile()` checks them before its work starts)."""
    if isinstance(model, (str, os.PathLike)) and not _is_onnx(model):
        model, file_inputs = load_model_file(model, trust_pickle=trust_pickle)
        example_inputs = example_inputs if example_inputs is not None else file_inputs
    if _is_onnx(model):
        from netsqueeze.frontends.onnx import from_onnx

        if dynamic_shapes is not None:
            raise InputMismatchError("dynamic_shapes declares a torch model's dynamic dims: an ONNX model's open dims "
                                     "stay dynamic by themselves (input_shapes gives their sizes for analysis)")

        shapes = {k: tuple(v) for k, v in input_shapes.items()} if input_shapes else None
        xs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        # the example's sizes fix the model's dynamic dims for analysis
        examples = [tuple(int(d) for d in x.shape) for x in xs] if xs is not None else None
        return from_onnx(model, input_shapes=shapes, example_shapes=examples)
    from netsqueeze.frontends.fx import from_torch

    if input_shapes:
        raise InputMismatchError("input_shapes sets an ONNX model's input sizes: a torch model's come from its example "
                                 "inputs (and its dynamic dims from dynamic_shapes)")
    if example_inputs is None and isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise InputMismatchError("a torch model needs example inputs: pass example_inputs=(tensor, ...) "
                                 "or declare `input` shapes in the policy")
    return from_torch(model, example_inputs or (), dynamic_shapes=dynamic_shapes)  # says what else it cannot capture


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
    budget_absolute: dict[str, float] = field(default_factory=dict)  # absolute budget items, base units
    runtime: dict[str, Any] = field(default_factory=dict)  # `runtime { threads, batch }`
    # the `calibrate data "FILE"` item, for the file's place (relative to its policy file) and located errors
    calibration_span: SourceSpan | None = None


def load_policy_file(path: str | os.PathLike[str], params: Mapping[str, Any] | None = None) -> Any:
    """Reads and parses a policy file (`dsl.load_policy`: UTF-8, a leading byte-order mark allowed); an unreadable
    file is a `PolicyError`, located at the first bad byte when it is not UTF-8."""
    from netsqueeze import dsl

    return dsl.load_policy(Path(path), params={k: str(v) for k, v in (params or {}).items()})


def _policy_path(policy: PolicyLike) -> str | None:
    """The file `policy` names, when it names one (a path, or a string that is no policy text)."""
    if isinstance(policy, os.PathLike) or (isinstance(policy, str) and "{" not in policy):
        return os.fspath(policy)
    return None


def _parse_policy(policy: PolicyLike, params: Mapping[str, Any] | None) -> Any:
    from netsqueeze import dsl
    from netsqueeze.dsl.ast import Policy

    if isinstance(policy, str) and not policy.strip():
        raise PolicyError("the policy is an empty string: give a policy file path, policy text or a list of passes")
    if _policy_path(policy) is not None:
        return load_policy_file(policy, params)
    if isinstance(policy, str):
        return dsl.parse_policy(policy.removeprefix("\ufeff"), "<policy>",
                                params={k: str(v) for k, v in (params or {}).items()})
    if not isinstance(policy, Policy):
        raise NetsqueezeError(f"policy is a {type(policy).__name__}: expected a policy file path, policy text, "
                              "a parsed Policy or a list of Pass instances")
    return policy


def policy_files(policy: Any) -> list[tuple[str, Path]]:
    """The files a parsed policy reads, as (role, path): the policy file, its `calibrate data` file and
    every import."""
    out: list[tuple[str, Path]] = []
    span = getattr(policy, "span", None)
    if span is not None and span.file and not span.file.startswith("<"):
        out.append(("policy file", Path(span.file)))
    from netsqueeze.dsl import ast
    from netsqueeze.dsl.checker import Env

    env = Env()
    for d in getattr(policy, "all_definitions", lambda: ())():
        env.defs.setdefault(d.name, d)  # a name defined twice is the checker's error; the first is its definition

    def resolved(v: Any) -> Any:
        """`v` with references to params and lets followed (`calibrate data d`); as written when they loop."""
        try:
            return env.value(v)
        except Exception:  # a cycle: the checker reports it
            return v

    for stmt in getattr(policy, "body", ()):
        if isinstance(stmt, ast.Calibrate):
            for o in stmt.settings:
                if o.key == "data" and isinstance(value := resolved(o.value), ast.Str):
                    data = Path(value.value)
                    if not data.is_absolute() and out and out[0][0] == "policy file":
                        data = out[0][1].parent / data
                    out.append(("calibration file", data))
    todo = list(getattr(policy, "modules", ()))
    while todo:
        m = todo.pop(0)
        if ("policy import", Path(m.path)) not in out:
            out.append(("policy import", Path(m.path)))
            todo += list(m.modules)
    return out


def _resolve(policy: PolicyLike, graph: Graph, params: Mapping[str, Any] | None) -> _Resolved:
    if isinstance(policy, Pass):
        policy = [policy]
    if isinstance(policy, (list, tuple)):
        bad = [p for p in policy if not isinstance(p, (Pass, Step))]
        if bad and isinstance(bad[0], type) and issubclass(bad[0], Pass):
            raise NetsqueezeError(f"policy list entry {bad[0].__name__} is a Pass class: "
                                  f"pass an instance, {bad[0].__name__}()")
        if bad:
            raise NetsqueezeError(f"policy list entry {bad[0]!r} is not a Pass instance")
        steps = [p if isinstance(p, Step) else Step(p) for p in policy]
        return _Resolved(steps, {}, {}, None, {}, None, None, [])
    from netsqueeze.compiler.plan import resolve

    parsed = _parse_policy(policy, params)
    plan = resolve(parsed, graph, all_passes())
    steps = [Step(s.instance, s.selected, f"{s.span.file}:{s.span.line}", s.span) for s in plan.steps]
    return _Resolved(steps, dict(plan.budget), dict(plan.bounds), plan.guard, dict(plan.calibration),
                     plan.policy_hash, plan.to_text(), list(plan.inputs), dict(plan.budget_spans),
                     dict(plan.budget_absolute), dict(plan.runtime), _calibration_data_span(parsed))


def _through(start: SourceSpan, end: SourceSpan) -> SourceSpan:
    """The span from `start` to the end of `end` on its line (`data "calib.npz"`), or `start` if `end` is elsewhere."""
    if end.file == start.file and end.line == start.line and end.end_col is not None:
        return SourceSpan(start.file, start.line, start.col, start.line, end.end_col, start.text)
    return start


def _calibration_data_span(policy: Any) -> SourceSpan | None:
    """The span of the policy's `calibrate data "FILE"` item (from `data` to the end of its value), or None."""
    from netsqueeze.dsl import ast

    for stmt in getattr(policy, "body", ()):
        if isinstance(stmt, ast.Calibrate):
            for o in stmt.settings:
                if o.key == "data":
                    return _through(o.span, o.value.span)
    return None


def _policy_data_path(data: Any, span: SourceSpan | None) -> Path:
    """The file a policy's `calibrate data` names: a relative path is read from the policy file's folder (from the
    working directory for policy text), as `netsqueeze check` and `policy_files` read it."""
    path = Path(str(data))
    if not path.is_absolute() and span is not None and not span.file.startswith("<"):
        path = Path(span.file).parent / path
    return path


@contextlib.contextmanager
def _located(span: SourceSpan | None) -> Iterator[None]:
    """Locates an error in the data without a place (the file missing or unreadable, its arrays misnamed, a batch
    that does not fit the model), raised inside, at `span`: the policy's `calibrate data` item that named the file.
    The same error type, its notes kept."""
    try:
        yield
    except (InputMismatchError, NonFiniteError) as e:
        if span is None or all(d.span is not None for d in e.diagnostics):
            raise
        located = type(e)(tuple(d if d.span is not None else dataclasses.replace(d, span=span)
                                for d in e.diagnostics))
        for note in getattr(e, "__notes__", ()):
            located.add_note(note)
        raise located from e


def compile_checks(policy: Any, graph: Graph | None = None, *, eval_fn: bool = False) -> list[Diagnostic]:
    """What `compile()` would refuse in a parsed `policy` (`load_policy_file`) that checks and resolves cleanly
    (`plan.check_file`), found without running a pass; for `netsqueeze check` and `explain`. With `graph`, the
    policy's `input` declarations are checked against the model's inputs (`check_declared_inputs`: errors, as
    compile raises them). Without `eval_fn` (`netsqueeze compile` has no way to give one), a `guard top1 drop` is a
    warning at the guard: compile fails on it."""
    out: list[Diagnostic] = []
    if graph is not None:
        try:
            check_declared_inputs(getattr(policy, "inputs", ()), graph)
        except PolicyError as e:
            out += e.diagnostics
    from netsqueeze.dsl import ast

    for stmt in getattr(policy, "body", ()):
        if isinstance(stmt, ast.Guard) and stmt.metric == "top1_drop" and not eval_fn:
            out.append(Diagnostic(
                "guard top1 drop is measured by the eval_fn given to compile() (Python): `netsqueeze compile` cannot "
                "give one and fails on this guard", severity="warning", span=_through(stmt.span, stmt.value.span),
                notes=("on the command line, use `guard output error <= ...`",)))
    return out


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


def check_declared_inputs(decls: Sequence[Any], graph: Graph) -> None:
    """The policy's `input` declarations agree with the model, in order (they stand in for example inputs, which
    are positional; a name need not be the forward argument's): as many as it takes, each with its dtype and sizes
    (a dynamic dim may differ). A declaration that contradicted the model was ignored without a word."""
    if decls and len(decls) != len(graph.inputs):
        raise PolicyError(Diagnostic(f"the policy declares {len(decls)} input(s) but the model takes "
                                     f"{len(graph.inputs)} ({', '.join(graph.inputs)})", span=decls[0].span))
    for i, (d, nid) in enumerate(zip(decls, graph.inputs)):
        node = graph.node(nid)
        meta, dims = node.meta[0], node.attrs.get("dims") or ()
        same_sizes = len(d.shape) == len(meta.shape) and all(
            int(a) == int(b) or (k < len(dims) and dims[k]) for k, (a, b) in enumerate(zip(d.shape, meta.shape)))
        if str(d.dtype) != meta.dtype or not same_sizes:
            raise PolicyError(Diagnostic(
                f"input '{d.name}' is declared {d.dtype}[{', '.join(map(str, d.shape))}] but the model's input {i} "
                f"('{nid}') is {meta.dtype}[{', '.join(str(int(x)) for x in meta.shape)}]", span=d.span))


# ---- fidelity ------------------------------------------------------------------------------------------
def _run_outputs(module: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*batch)
    return list(out) if isinstance(out, tuple) else [out]


def _runner(model: Graph | torch.nn.Module | Callable[[int, Batch], list[torch.Tensor]], count: PassCount | None
            ) -> Callable[[int, Batch], list[torch.Tensor]]:
    """Outputs for calibration batch i: a graph (emitted once) or module run on the batch, each run counted in
    `count`; a function is its own runner (it counts its own runs)."""
    from netsqueeze.backends.torch import to_torch

    if not isinstance(model, (Graph, torch.nn.Module)):
        return model
    module = to_torch(model) if isinstance(model, Graph) else model

    def run(i: int, batch: Batch) -> list[torch.Tensor]:
        if count is not None:
            count.add(1.0)
        return _run_outputs(module, batch)

    return run


def measure_output_error(original: Graph | torch.nn.Module | Callable[[int, Batch], list[torch.Tensor]],
                         compressed: Graph | Callable[[int, Batch], list[torch.Tensor]], batches: CalibrationSource,
                         *, label: str = "the compressed model", data: str = "calibration batch",
                         count: PassCount | None = None) -> dict[str, float]:
    """Relative L2 error ‖y' − y‖/‖y‖ and max abs error of the outputs over the given batches, and
    `top1_change`: the share of class predictions that differ from the original's (argmax over the last axis of
    every output `passes.base.class_scores` accepts: [batch, classes] scores, a language model's
    [batch, tokens, vocabulary] logits); left out when no output has that form. The compile report leaves it out
    (a rank-2 or rank-3 output need not be class scores); `reestimate_bn` measures it.
    `original` may be its emitted module already, or a function giving its outputs for batch i (a search
    measuring many candidates keeps them); `compressed` too may be such a function (a candidate run from
    tensors computed earlier; it counts its own runs). A NaN or Inf in a batch or in an output is a
    `NonFiniteError` naming it (`label` names `compressed`, `data` the batches), so the error is never NaN.
    `count` counts the candidate graph's runs (a function counts its own)."""
    reference, run_new = _runner(original, count), _runner(compressed, count)
    num = den = 0.0
    max_abs = 0.0
    changed = predicted = 0
    for i, batch in enumerate(batches()):
        for j, t in enumerate(batch):
            check_finite(t, f"{data} {i}: input {j}")
        outs = run_new(i, batch)
        for k, (a, b) in enumerate(zip(reference(i, batch), outs)):
            check_finite(a, f"the original model's output {k} on {data} {i}")
            check_finite(b, f"{label}'s output {k} on {data} {i}")
            a, b = a.double(), b.double()
            num += float(((a - b) ** 2).sum())
            den += float((a**2).sum())
            max_abs = max(max_abs, float((a - b).abs().max()))
            if class_scores(a.shape):
                changed += int((a.argmax(-1) != b.argmax(-1)).sum())
                predicted += a.numel() // a.shape[-1]
    error = math.sqrt(num / den) if den else 0.0
    if not (math.isfinite(error) and math.isfinite(max_abs)):
        raise NonFiniteError(f"the output error of {label} is not finite ({error}, max abs {max_abs}): "
                             "its outputs overflow")
    out = {"output_error": error, "max_abs_error": max_abs}
    if predicted:
        out["top1_change"] = changed / predicted
    return out


def _evaluate(eval_fn: Callable[[Any], Any], module: torch.nn.Module, which: str) -> float:
    """The user's `eval_fn(module)` as a finite float in [0, 1] (top-1 as a fraction: the guard's drop is one);
    anything else is a clear error naming `which` model."""
    what = f"eval_fn on the {which}"
    value = as_number(call_user(what, eval_fn, module), what)
    if not 0.0 <= value <= 1.0:
        raise UserCodeError(f"{what} returned {value:g}; expected top-1 as a fraction in [0, 1]"
                            + (f" ({value / 100:g} for {value:g}%)" if 1.0 < value <= 100.0 else ""))
    return value


class _Fidelity:
    """Fidelity of a candidate graph, for search passes (`PassContext.fidelity`): output error on the
    calibration batches (all, or the first `limit`), or the top-1 drop through the user's `eval_fn`.
    The original's outputs are computed once and kept while they hold at most `cache_limit` elements,
    so a candidate costs one pass of itself over the data (counted in `count`); the compile's own final
    measurement reads them too (`reference`). Never NaN: a non-finite measurement is a `NonFiniteError`,
    so a guard cannot pass on NaN."""

    def __init__(self, original: Graph, batches: CalibrationSource | None, eval_fn: Callable[[Any], float] | None,
                 data: str = "calibration batch", count: PassCount | None = None, cache_limit: int = 1 << 26) -> None:
        self.original, self.batches, self.eval_fn, self.data, self.count = original, batches, eval_fn, data, count
        self._ref: torch.nn.Module | None = None  # the original, emitted once
        self._base: float | None = None
        self._kept: list[list[torch.Tensor]] = []  # the original's outputs per batch, while they fit
        self._room = self.cache_limit = cache_limit

    def module(self) -> torch.nn.Module:
        from netsqueeze.backends.torch import to_torch

        if self._ref is None:
            self._ref = to_torch(self.original)
        return self._ref

    def keep(self, i: int, outs: list[torch.Tensor]) -> None:
        """The original's outputs on calibration batch i, computed elsewhere (a stream over the unchanged
        graph): kept when they extend the kept prefix and fit."""
        size = sum(t.numel() for t in outs)
        if i == len(self._kept) and size <= self._room:
            self._kept.append([t.detach() for t in outs])
            self._room -= size

    def reference(self, i: int, batch: Batch) -> list[torch.Tensor]:
        """The original's outputs on calibration batch i (kept from an earlier pass when they fit)."""
        if i < len(self._kept):
            return self._kept[i]
        out = _run_outputs(self.module(), batch)
        if self.count is not None:
            self.count.add(1.0)
        size = sum(t.numel() for t in out)
        if i == len(self._kept) and size <= self._room:
            self._kept.append(out)
            self._room -= size
        return out

    def __call__(self, graph: Graph, metric: str, limit: int | None = None, feeds: Feeds | None = None
                 ) -> float | None:
        """`PassContext.fidelity`: `limit` leading batches (None: all); `feeds` (the output error only): the
        candidate runs from those values' tensors, one list per measured batch, through a segment that the
        pass count charges its share of the model's FLOPs."""
        from netsqueeze.backends.torch import to_torch

        if metric not in ("top1_drop", "output_error", "max_abs_error", "top1_change"):
            return None
        if (metric == "top1_drop" and self.eval_fn is None) or (metric != "top1_drop" and self.batches is None):
            return None
        if metric == "top1_drop":
            assert self.eval_fn is not None
            if self._base is None:
                self._base = _evaluate(self.eval_fn, self.module(), "original model")
            return self._base - _evaluate(self.eval_fn, to_torch(graph), "candidate model")
        batches = self.batches
        assert batches is not None
        src = batches if limit is None else (lambda: itertools.islice(batches(), limit))
        candidate: Graph | Callable[[int, Batch], list[torch.Tensor]] = graph
        if feeds is not None:
            values, tensors = feeds
            run = segment_runner(self.count)(graph, values, graph.output_values())

            def from_feeds(i: int, batch: Batch) -> list[torch.Tensor]:
                if i >= len(tensors):
                    raise ValueError(f"feeds for {len(tensors)} calibration batches, the measurement runs more")
                with torch.no_grad():
                    return run(tensors[i])

            candidate = from_feeds
        return measure_output_error(self.reference, candidate, src, label="a candidate model", data=self.data,
                                    count=self.count).get(metric)


class _PassRun:
    """The last graph a pass ran to its outputs over every calibration batch (`PassContext.result_fn`, the layer
    refit's sweep), and those outputs: the compiled graph's output error reads them while the compiled graph is
    that graph, or that graph rewritten by exact passes only (rounding apart, as the original's outputs are read).
    Kept while they hold at most `limit` elements (a language model's logits may not)."""

    def __init__(self, count: PassCount, limit: int) -> None:
        self.count, self.limit = count, limit
        self.graph: Graph | None = None
        self.outs: list[list[torch.Tensor]] = []
        self._fresh = False  # kept by the pass now running

    def keep(self, graph: Graph, outs: list[list[torch.Tensor]]) -> None:
        fits = sum(t.numel() for o in outs for t in o) <= self.limit and len(outs) == self.count.batches
        self.graph = graph.copy() if fits else None
        self.outs = [[t.detach() for t in o] for o in outs] if fits else []
        self._fresh = True

    def after_pass(self, graph: Graph, p: Pass, changed: bool) -> None:
        """`run_pipeline`'s `on_pass`: `graph` after pass `p`, which may have rewritten it since it ran it, or
        rewrote it later (kept through an exact pass, dropped by any other)."""
        fresh, self._fresh = self._fresh, False
        if self.graph is None:
            return
        if fresh:
            keep = _same_graph(graph, self.graph)
        elif changed:
            keep = p.exact and _full_precision(graph)
            self.graph = graph.copy() if keep else None
        else:
            return
        if not keep:
            self.graph, self.outs = None, []

    def runner(self, graph: Graph) -> Callable[[int, Batch], list[torch.Tensor]] | None:
        """The kept outputs of calibration batch i, when `graph` is the graph they stand for; else None."""
        if self.graph is None or not _same_graph(graph, self.graph):
            return None
        outs = self.outs
        return lambda i, batch: outs[i]


def _same_graph(a: Graph, b: Graph) -> bool:
    """Whether `a` computes what `b` does, conservatively: the same nodes, kinds, attributes and operands, and
    every param the same object or an equal dense tensor."""
    if a is b:
        return True
    if len(a) != len(b) or list(a.inputs) != list(b.inputs) or a.output_values() != b.output_values():
        return False
    for n in a.nodes():
        if n.id not in b:
            return False
        m = b.node(n.id)
        if (n.kind != m.kind or n.attrs != m.attrs or a.operands(n.id) != b.operands(n.id)
                or n.params.keys() != m.params.keys()):
            return False
        for k, v in n.params.items():
            w = m.params[k]
            if v is w:
                continue
            if not (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.dtype == w.dtype
                    and v.shape == w.shape and torch.equal(v, w)):
                return False
    return True


def _keeping_reference(stream: ActivationStream, sink: Callable[[Graph], Callable[[int, list[torch.Tensor]], None]
                       | None]) -> ActivationStream:
    """`stream`, which also hands the graph's outputs to `sink(graph)` when there is one (the graph computes the
    original's function) — a first pass's statistics: the compile's output-error measurements then need not run
    the original again."""

    def run(graph: Graph, values: Sequence[Value]) -> Iterator[list[torch.Tensor]]:
        keep = sink(graph)
        if keep is None:
            yield from stream(graph, values)
            return
        outs = graph.output_values()
        for i, got in enumerate(stream(graph, [*values, *outs])):
            keep(i, got[len(values):])
            yield got[: len(values)]

    return run


def _full_precision(graph: Graph) -> bool:
    """Whether an exact pass's rounding in `graph` stays far below any output error worth reporting: every
    output float32 or float64 (an integer output can flip on a tie) and no float param narrower (after a bf16
    `fold_bn` and `equalize` a test model's reported error was 10% low against the true original)."""
    if any(graph.meta_of(v).dtype not in ("float32", "float64") for v in graph.output_values()):
        return False
    return not any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)
                   for n in graph.nodes() for t in n.params.values())


def _checked(source: CalibrationSource, graph: Graph) -> CalibrationSource:
    """`source`, each batch checked against `graph`'s inputs the first time it is read (`check_batch`: rank,
    shapes, dtype, finite values; a calibration source yields the same batches on every read), so a pass reading
    the batches (`PassContext.batches`) meets a bad one as a clear error naming it, as a stream's reader does."""
    checked = 0  # the leading batches checked so far

    def batches() -> Iterator[Batch]:
        nonlocal checked
        for i, batch in enumerate(source()):
            if i == checked:
                check_batch(graph, batch, f"calibration batch {i}")
                checked += 1
            yield batch

    return batches


def _trainable(graph: Graph) -> Trainable:
    """`PassContext.trainable`: the torch backend's differentiable run of `graph`."""
    from netsqueeze.backends.trainable import trainable

    return trainable(graph)


def _check_budget(budget: Mapping[str, float], before: Any, after: Any,
                  spans: Mapping[str, SourceSpan] | None = None, absolute: Mapping[str, float] | None = None,
                  batch: int = 1) -> None:
    """Raises BudgetError, located at each missed `budget` item, stating what the pipeline reached. An absolute
    FLOPs budget is per sample: the FLOPs of the example's `batch` samples over `batch`."""
    # latency is handed to the passes (ctx.budget) but compile() does not measure it
    attr = {"params": "params", "flops": "flops", "bytes": "param_bytes", "nonzeros": "nonzeros"}
    problems = []
    for key, limit in budget.items():
        if key not in attr:
            continue
        total, now = getattr(before, attr[key]), getattr(after, attr[key])
        reached = now / max(1, total)
        if key in (absolute or {}):  # `params <= 4.5M`: the limit as the policy wrote it
            per = " per sample" if key == "flops" and batch > 1 else ""
            if key == "flops":
                total, now = total // batch, now // batch
            if now > (absolute or {})[key] + 1e-9:
                problems.append(Diagnostic(
                    f"budget {key} <= {(absolute or {})[key]:,.0f} not met: the pipeline reached {now:,} {key}{per} "
                    f"({reached:.1%} of the original {total:,})", span=(spans or {}).get(key)))
            continue
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
    if not fidelity[metric] <= limit + 1e-12:  # fails closed: NaN is not <= anything
        raise BudgetError(Diagnostic(
            f"guard {metric.replace('_', ' ')} <= {percent(limit)} not met: reached {percent(fidelity[metric])}",
            span=span))


# ---- compile -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Turns an unexpected exception (not a NetsqueezeError) inside `what` into an `InternalError`."""
    try:
        yield
    except NetsqueezeError:
        raise
    except Exception as e:
        text = str(e).strip()
        detail = f": {text.splitlines()[0]}" if text else ""
        raise InternalError(Diagnostic(f"internal error while {what}: {type(e).__name__}{detail}",
                                       notes=(REPORT_HINT,))) from e


def _check_example_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...] | None:
    """Example inputs as a tuple of tensors, checked to be finite and cloned (a forward that writes into
    its inputs cannot change the caller's tensors)."""
    if example_inputs is None:
        return None
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)):
        raise InputMismatchError(f"example_inputs is a {type(example_inputs).__name__}; "
                                 "expected a tensor or a tuple of tensors")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise InputMismatchError(f"example input {i} is a {type(t).__name__}, not a torch.Tensor")
        check_dense(t, f"example input {i}")
        if t.dim() and t.shape[0] == 0:
            raise InputMismatchError(f"example input {i} has shape {list(t.shape)}: no samples (dim 0 is 0)")
        check_finite(t, f"example input {i}")
    return tuple(t.detach().clone() for t in items)


@contextlib.contextmanager
def _restored(model: torch.nn.Module) -> Iterator[None]:
    """Puts back the parameters, buffers and training flags of a model that cannot be deep-copied."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
             if isinstance(v, torch.Tensor)}
    flags = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in state.items():
                if k in live and isinstance(live[k], torch.Tensor) and live[k].shape == v.shape:
                    live[k].copy_(v)
        for m, f in flags.items():
            m.training = f


def _private_copy(model: Any) -> tuple[Any, contextlib.AbstractContextManager[None]]:
    """A deep copy of a torch model (parameters and buffers included) for the compile to run on, so the
    caller's model comes back unchanged; a model that cannot be copied is restored afterwards instead."""
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        return model, contextlib.nullcontext()
    try:
        return copy.deepcopy(model), contextlib.nullcontext()
    except Exception:
        if isinstance(model, torch.nn.Module):
            return model, _restored(model)
        return model, contextlib.nullcontext()


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
    trust_pickle: bool = False,
    dynamic_shapes: Any = None,
    executor: str | Executor | None = None,
    store: Literal["ham", "sham", "csr", "dense"] | None = None,
    progress: bool | None = None,
    sparse: Literal["dense", "csr"] | None = None,
    labelled: bool = False,
) -> CompileResult:
    """Compresses `model` as `policy` says and emits it for `target`.

    model: an nn.Module / GraphModule / ExportedProgram (with `example_inputs`), an ONNX path or
    ModelProto, or a model file (.py factory, .pt, .pt2; the pickled forms need `trust_pickle=True`).
    policy: a policy file path, policy text, or a list of Pass instances (the Python builder form).
    calibration: an iterable of input batches, a tensor of samples, or a .npz/.npy/.pt file.
    eval_fn(model) -> top-1 accuracy, used by `guard top1 drop`. dynamic_shapes: for a torch model, which
    input dims stay dynamic, in torch.export's own form ({'x': {0: Dim('batch'), 2: Dim('H')}}); the emitted
    models run at other sizes of them (ONNX inputs' open dims stay dynamic by themselves). None (the default) makes
    the batch dynamic: dim 0 of every input whose dim 0 is the first input's, when the example batch is 2 or more and
    torch.export accepts it (otherwise the batch is fixed and the report says why); `{}` captures every dim static.
    The input model object is never
    modified: the compile runs on a deep copy. NaN/Inf in inputs, calibration data, eval_fn results or
    measured fidelity is a `NonFiniteError`; exceptions from user code are `UserCodeError`s; an
    unexpected exception inside netsqueeze is an `InternalError`. executor: where independent solves
    (net_trim) run: 'local', 'processes[:N]' (the default), 'dask://HOST:PORT' (an existing Dask
    scheduler), 'dask://local[:N]', or an `Executor`; the result is the same whichever runs them.
    labelled: the calibration data is an iterable of `(inputs..., labels)` batches (e.g. a DataLoader of
        (x, y)); passes that use labels (`recover`'s task loss, `select_features`) read them, the model
        never sees them. A calibration `.npz` with a `labels` array is labelled without it.
    sparse: how sparse weights are emitted: None (default) keeps ONNX `sparse_initializer`s and torch
        layers that decode them to dense-with-zeros weights; "dense" writes dense weights in both; "csr"
        emits torch linear layers that keep a `torch.sparse_csr` weight and multiply with it.
    store: also encode the compressed model file in that weight format (HAM, sHAM, CSR or dense; see
    `netsqueeze.backends.storage`): `result.stored` holds its bytes, `result.save(path)` writes it,
    `result.report.storage` has ψ, and `netsqueeze.load(path)` reads it back.
    progress: tqdm bars on stderr over calibration streaming and search candidates (None: only when stderr
    is a terminal); `log(msg)` receives each measured search candidate as well as the passes' messages.
    """
    if target not in ("torch", "onnx"):
        raise NetsqueezeError(f"unknown target '{target}' (use 'torch' or 'onnx')")
    if sparse not in (None, "dense", "csr"):
        raise NetsqueezeError(f"unknown sparse {sparse!r} (use 'dense' or 'csr', or leave it unset)")
    if precision not in PRECISIONS:
        raise NetsqueezeError(f"unknown precision {precision!r} (use 'fp32' or 'fp16'; "
                              "int8 is a pass: put `quantize` or `quantize_weights` in the policy)")
    if eval_fn is not None and not callable(eval_fn):
        raise NetsqueezeError(f"eval_fn is a {type(eval_fn).__name__}, not a function of the model")
    _check_arguments(seed=seed, trust_pickle=trust_pickle, labelled=labelled, progress=progress, log=log,
                     params=params)
    if not isinstance(policy, (str, os.PathLike, list, tuple, Pass)):
        _parse_policy(policy, params)  # raises for anything but a parsed Policy
    check_input_shapes(input_shapes)
    if store is not None:
        from netsqueeze.compiler.stored import check_store

        check_store(store)
    example_inputs = _check_example_inputs(example_inputs)
    runner = make_executor(executor)
    model_arg = model
    model, guard_model = _private_copy(model)
    try:
        with guard_model:
            result = _compile(model, policy, example_inputs, calibration, target, params, eval_fn, precision,
                              input_shapes, seed, log, trust_pickle, dynamic_shapes, runner, progress, sparse,
                              labelled)
        store = store if store is not None else result.graph.meta.get("store")  # or the policy's `store`
        if store is not None:
            from netsqueeze.compiler.stored import attach_store

            with _stage("encoding the compressed model file"):
                attach_store(result, store)
        result.sources = _sources(model_arg, policy, calibration)
        return result
    finally:
        if not isinstance(executor, Executor):  # workers this compile started; a caller's executor stays open
            runner.close()


def output_paths(tree: str) -> list[str]:
    """Each output's place in the nesting a captured model returned (graph meta `OUTPUT_TREE`), in output order:
    "['logits']", "['aux'][0]", ..."""
    from torch.utils import _pytree as pytree

    spec = pytree.treespec_loads(tree)
    nested = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    return [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(nested)[0]]


def _sources(model: Any, policy: Any, calibration: Any) -> tuple[tuple[str, str], ...]:
    """The files a compile read, as (role, path) pairs: what `CompileResult.save` refuses to overwrite."""
    from netsqueeze.compiler.files import model_files

    out = []
    if isinstance(model, (str, os.PathLike)):  # an ONNX model's external data files too
        out += [(role, str(path)) for role, path in model_files(model)]
    if (policy_file := _policy_path(policy)) is not None:
        out.append(("policy file", policy_file))
    if isinstance(calibration, (str, os.PathLike)):
        out.append(("calibration file", os.fspath(calibration)))
    return tuple(out)


def _check_arguments(*, seed: Any, trust_pickle: Any, labelled: Any, progress: Any, log: Any, params: Any) -> None:
    """`compile()`'s plain arguments have the types they say: a `trust_pickle = "no"` was truthy, and unpickled."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 62:
        raise NetsqueezeError(f"seed must be an integer from 0 to 2**62 - 1, got {seed!r}")
    for name, value in (("trust_pickle", trust_pickle), ("labelled", labelled)):
        if not isinstance(value, bool):
            raise NetsqueezeError(f"{name} must be True or False, got {value!r}")
    if progress is not None and not isinstance(progress, bool):
        raise NetsqueezeError(f"progress must be True, False or None (bars on a terminal only), got {progress!r}")
    if log is not None and not callable(log):
        raise NetsqueezeError(f"log is a {type(log).__name__}, not a function of a message")
    if params is not None and not isinstance(params, Mapping):
        raise NetsqueezeError(f"params is a {type(params).__name__}: give a dict of policy parameter names to "
                              "values, e.g. {'ratio': '30%'}")


def _check_finite_params(graph: Graph) -> None:
    """A NaN or Inf in a layer's weight or bias (or a BatchNorm's statistics) is a `NonFiniteError` naming the
    node and the param: passes that solve on the weights (Net-Trim, GPTQ) would otherwise fail with misleading
    linear-algebra errors. Other constants (an attention mask of -inf) may hold them."""
    for node in graph.nodes():
        for key, w in node.params.items():
            if key not in ("weight", "bias", "running_mean", "running_var") or node.kind == "constant":
                continue
            if isinstance(w, torch.Tensor) and w.is_floating_point() and not bool(torch.isfinite(w).all()):
                bad = int((~torch.isfinite(w)).sum())
                raise NonFiniteError(Diagnostic(
                    f"param '{key}' of node '{node.id}' holds {bad} NaN or Inf value(s) of {w.numel()}: the model's "
                    "weights must be finite", node=node.id))


def _compile(model: Any, policy: PolicyLike, example_inputs: tuple[torch.Tensor, ...] | None, calibration: Any,
             target: Target, params: Mapping[str, Any] | None, eval_fn: Callable[[Any], float] | None,
             precision: Literal["fp32", "fp16"], input_shapes: Mapping[str, Sequence[int]] | None, seed: int,
             log: Callable[[str], None] | None, trust_pickle: bool, dynamic_shapes: Any = None,
             executor: Executor | None = None, progress: bool | None = None,
             sparse: Literal["dense", "csr"] | None = None, labelled: bool = False) -> CompileResult:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if example_inputs is None and not _is_onnx(model) and not isinstance(model, (str, os.PathLike)):
        example_inputs = _declared_inputs(policy, params)
    # modules that compute otherwise in training mode, left in it: the compile runs them as in eval mode
    training = isinstance(model, torch.nn.Module) and any(
        m.training for m in model.modules()
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)))
    with _stage("importing the model"):
        graph = _import(model, example_inputs, input_shapes=input_shapes, trust_pickle=trust_pickle,
                        dynamic_shapes=dynamic_shapes)
        if training:
            graph.meta.setdefault("notes", []).append(
                "the model was in training mode: it is compiled as in eval mode (BatchNorm's running statistics, "
                "no dropout), as the compressed model runs; the model you passed keeps its mode")
        _check_finite_params(graph)
        original = graph.copy()
        before = graph_stats(graph)
    times["import"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    with _stage("resolving the policy"):
        resolved = _resolve(policy, graph, params)
        check_declared_inputs(resolved.inputs, graph)
    if resolved.guard is not None and str(resolved.guard.metric) == "top1_drop" and eval_fn is None:
        _check_guard(resolved.guard, {})  # it cannot be measured: said before any pass runs
    times["resolve"] = time.perf_counter() - t1

    cal = resolved.calibration
    source: CalibrationSource | None = None
    data_span: SourceSpan | None = None  # where the policy names the data, when the compile reads that file
    if calibration is None and cal.get("data"):
        # `calibrate data "file"` in the policy: relative to the policy file
        calibration = _policy_data_path(cal["data"], resolved.calibration_span)
        data_span = resolved.calibration_span
    labels_fn: Callable[[], Iterator[torch.Tensor]] | None = None
    with _stage("reading the calibration data"), _located(data_span):
        if calibration is not None:
            calibration, labels = split_labels(calibration, len(graph.inputs), labelled, graph.inputs)
            if labelled and labels is None:
                raise InputMismatchError(f"labelled=True but the calibration file '{calibration}' holds no "
                                         "'labels' array beside the model's inputs")
            source = calibration_source(calibration, batch_size=int(cal.get("batch", 64)),
                                        samples=cal.get("samples"), names=graph.inputs)
            if labels is not None:
                label_batches = calibration_source(labels, batch_size=int(cal.get("batch", 64)),
                                                   samples=cal.get("samples"))
                labels_fn = lambda: (b[0] for b in label_batches())  # noqa: E731
            first = next(iter(source()), None)
            if first is None:
                raise InputMismatchError("calibration data is empty")
            check_batch(graph, first, "calibration batch 0")
            check_static_batch(graph, first, "calibration batch 0")
    eval_batches: CalibrationSource | None = source
    data_label = "calibration batch"
    if eval_batches is None and example_inputs is not None:
        ex = example_inputs
        eval_batches = lambda: iter([ex])  # noqa: E731
        data_label = "example batch"
    guard = resolved.guard
    search = SearchRecorder()  # the candidates searches measure, for the report's trajectory
    bars = Progress(progress_enabled(progress), log)
    n_batches = sum(1 for _ in source()) if source is not None and bars.on else None
    count = PassCount(source)
    measured_fidelity = _Fidelity(original, eval_batches, eval_fn, data_label, count if eval_batches is source else None)
    stream = activation_stream(source, count) if source is not None else None
    references = [original]  # and the graph after exact passes (`run_pipeline`'s on_exact): the same function

    def keep_exact(g: Graph) -> None:
        # the latest such graph only (the earlier ones run no more), and only at full precision
        references[1:] = [g.copy()] if _full_precision(g) else []

    def sink(g: Graph) -> Callable[[int, list[torch.Tensor]], None] | None:
        """Where the outputs of `g` go as the original's: the measurements read the calibration data too, and
        `g` is the original or a graph only exact passes rewrote from it (rounding apart)."""
        return measured_fidelity.keep if eval_batches is source and any(_same_graph(g, r) for r in references) \
            else None

    if stream is not None:
        stream = _keeping_reference(stream, sink)
    refit_run = _PassRun(count, measured_fidelity.cache_limit)
    ctx = PassContext(
        progress_fn=bars.bar,
        stream_fn=bars.stream(stream, n_batches) if stream is not None else None,
        batches_fn=_checked(source, original) if source is not None else None,
        segment_fn=segment_runner(count) if source is not None else None,
        sink_fn=sink if source is not None else None,
        result_fn=refit_run.keep if source is not None and eval_batches is source else None,
        budget=resolved.budget,
        bounds=resolved.bounds,
        seed=int(cal.get("seed", seed)),
        log=log or (lambda msg: None),
        original=original,
        guard=(str(guard.metric), float(guard.limit)) if guard is not None else None,
        fidelity_fn=search.wrap(bars.fidelity(measured_fidelity)),
        trainable_fn=_trainable,
        labels_fn=labels_fn,
        executor=executor,
    )
    t2 = time.perf_counter()
    lat_target = latency_target(resolved, target)
    lat_outcome: LatencyOutcome | None = None
    try:
        if lat_target is None:
            run = run_pipeline(graph, resolved.steps, ctx, on_exact=keep_exact,
                               on_pass=lambda p, changed: refit_run.after_pass(graph, p, changed))
        else:  # the pipeline reruns from the original until the measured latency meets the budget
            graph, run, lat_outcome = run_for_latency(original, resolved.steps, ctx, lat_target, ctx.log)
    finally:
        bars.close()
    times["passes"] = time.perf_counter() - t2
    with _stage("checking the budget"):
        after = graph_stats(graph)
    _check_budget(resolved.budget, before, after, resolved.budget_spans, resolved.budget_absolute,
                  example_batch(original))

    fidelity: dict[str, float] = {}
    notes: list[str] = list(graph.meta.get("notes", []))  # what the frontend had to say about the model
    align = int(ctx.bounds.get("align", DEFAULT_ALIGN))  # the convolutions' channel groups have it by default
    if (line := block_note(original, graph, *cpu_block(), align=align)) is not None:
        notes.append(line)
    if eval_batches is not None and any(n.kind != "input" for n in graph.nodes()):
        with _stage("measuring the output error"):
            try:
                measured = measure_output_error(measured_fidelity.reference, refit_run.runner(graph) or graph,
                                                eval_batches, data=data_label,
                                                count=count if eval_batches is source else None)
                fidelity.update({k: v for k, v in measured.items() if k != "top1_change"})
            except (NonFiniteError, UserCodeError, InputMismatchError):
                raise
            except NetsqueezeError as e:  # e.g. an opaque ONNX op the torch backend cannot run
                notes.append(f"output error not measured: {e.message}")
    if (short := int(sum(r.result.metrics.get(SHORT_FITS, 0.0) for r in run.records))) and fidelity:
        notes.append(f"the output error is measured on the calibration data, which {short} fold(s) were fit on with "
                     f"fewer than {FIT_ROWS} rows per coefficient (the passes' notes name them): it understates the "
                     "error on new inputs" + (", and so does the guard" if guard is not None
                                              and str(guard.metric) == "output_error" else "")
                     + "; calibrate on more samples")

    with _stage("timing the models on the policy's runtime"):
        runtime_lat = runtime_latency(resolved, target, original, graph, ctx.seed)

    t3 = time.perf_counter()
    out_model: Any
    with _stage(f"emitting the {target} model"):
        if target == "torch":
            from netsqueeze.backends.torch import to_torch

            out_model = to_torch(graph, sparse="csr" if sparse == "csr" else "decode", nested=True)
            if precision == "fp16":
                out_model = out_model.half()
        else:
            from netsqueeze.backends.onnx import to_onnx

            meta = {"netsqueeze.policy_hash": resolved.policy_hash or "", "netsqueeze.plan": resolved.plan_text or ""}
            out_model = to_onnx(graph, precision=precision, metadata={k: v for k, v in meta.items() if v},
                                sparse="dense" if sparse == "dense" else "initializer")
            if (tree := graph.meta.get(OUTPUT_TREE)) is not None:
                notes.append("the model nests its outputs; ONNX's are flat, in this order: "
                             + ", ".join(f"{o.name} = out{path}" for o, path in zip(out_model.graph.output,
                                                                                  output_paths(tree))))
    times["emit"] = time.perf_counter() - t3
    if eval_fn is not None:
        from netsqueeze.backends.torch import to_torch

        with _stage("emitting the models for eval_fn"):
            ref_module, new_module = to_torch(original), to_torch(graph)
        base = _evaluate(eval_fn, ref_module, "original model")
        new = _evaluate(eval_fn, new_module, "compressed model")
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
        budget=dict(resolved.budget),
        guard=(str(guard.metric), float(guard.limit)) if guard is not None else None,
        search=search.entries(run.records, t2),
        calibration_passes=count.passes,
    )
    if runtime_lat is not None:
        was, now = runtime_lat
        report.latency = [{"model": "original", **was.to_dict()}, {"model": "compressed", **now.to_dict()}]
        report.notes.append(
            f"measured on the runtime ({was.runtime}, batch {was.batch}, {was.threads} thread(s)): "
            f"{was.median_ms:.3f} -> {now.median_ms:.3f} ms, {was.median_ms / now.median_ms:.2f}x faster, beside "
            f"{before.flops / max(1, after.flops):.2f}x fewer FLOPs and {before.params / max(1, after.params):.2f}x "
            "fewer params")
    if lat_outcome is not None:
        report.latency = [{"model": "original", **lat_outcome.original.to_dict()},
                          {"model": "compressed", **lat_outcome.compressed.to_dict()}]
        report.notes.append(f"latency budget met: measured {lat_outcome.compressed.median_ms:.3f} ms against "
                            f"{lat_outcome.original.median_ms:.3f} ms for the original ({lat_outcome.ratio:.1%}), "
                            f"{len(lat_outcome.attempts)} pipeline run(s)")
        report.notes.append("latency budget runs (FLOPs -> measured latency, of the original): " + ", ".join(
            f"{x['flops']:.1%} -> {x['ratio']:.1%}" for x in lat_outcome.attempts))
    return CompileResult(out_model, graph, report)
