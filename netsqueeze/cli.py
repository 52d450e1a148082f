"""The `netsqueeze` command: compile, inspect, check, explain.

Exit codes: 0 success; 1 an error in the model, data, files, budget or guard; 2 a policy error (or a
usage error); 3 a model that cannot be loaded or captured; 4 an internal error (a bug: the message asks for a
report, `--verbose` shows the traceback); 130 interrupted (SIGINT); 143 terminated (SIGTERM). An interrupted compile leaves any
previous output file intact.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from netsqueeze.errors import (
    CaptureError,
    Diagnostic,
    FileError,
    InternalError,
    NetsqueezeError,
    PolicyError,
    UsageError,
)

EXIT_ERROR, EXIT_POLICY, EXIT_CAPTURE, EXIT_INTERNAL, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 3, 4, 130, 143
REPORT_HINT = "this is a bug in netsqueeze: please report it with the command that ran and its --verbose output"


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that pending writes clean up before the process exits."""


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise PolicyError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise UsageError(f"--input-shape expects name=1,3,224,224, got '{item}'") from None
        if not name or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape expects a name and positive dims (name=1,3,224,224), got '{item}'")
        out[name] = shape
    return out


def _input_shapes(items: Sequence[str], model: str | None) -> dict[str, tuple[int, ...]]:
    """`--input-shape` values checked against the model they size: an ONNX model's declared inputs (names, ranks,
    fixed dims); a usage error for any other model, whose sizes come from its example inputs."""
    from netsqueeze.compiler.files import is_onnx_file

    shapes = _parse_shapes(items)
    if not shapes:
        return shapes
    if model is None:
        raise UsageError("--input-shape sizes the inputs of a model: give the model with --model")
    if not is_onnx_file(model):
        raise UsageError(f"--input-shape sizes an ONNX model's inputs; '{model}' is a torch model, whose input sizes "
                         "come from its example inputs")
    from netsqueeze.frontends.onnx.load import declared_inputs, given_shape_problem

    declared = declared_inputs(model)
    if declared is None:  # a missing or unreadable model: loading it says why
        return shapes
    by_name = {vi.name: vi for vi in declared}
    for item in items:
        name = item.partition("=")[0]
        if name not in by_name:
            raise UsageError(f"--input-shape {item}: the model has no input '{name}' (its inputs: "
                             f"{', '.join(repr(n) for n in by_name) or 'none'})")
        problem = given_shape_problem(by_name[name], shapes[name])
        if problem:
            raise UsageError(f"--input-shape {item} {problem}")
    return shapes


def _graph(a: argparse.Namespace, model: str) -> Any:
    from netsqueeze.compiler.api import import_model

    shapes = _input_shapes(a.input_shape, model)
    return import_model(model, input_shapes=shapes or None, trust_pickle=a.trust_pickle)


def _check_options(a: argparse.Namespace, out: Path, fmt: str) -> None:
    """Usage errors for options that contradict the output (its suffix picks the format) or name nothing."""
    target = "onnx" if fmt == "onnx" else "torch"
    if a.target and a.target != target:
        raise UsageError(f"--target {a.target} does not match the output '{out}': its suffix '{out.suffix}' writes "
                         f"{'an ONNX' if target == 'onnx' else 'a torch'} model")
    if fmt == "nsq":  # the compressed model file holds the weights in its store format, whatever these say
        for flag, value in (("--precision", a.precision if a.precision != "fp32" else None), ("--sparse", a.sparse)):
            if value is not None:
                raise UsageError(f"{flag} {value} does not apply to the output '{out}': a compressed model file "
                                 "(.nsq) holds the weights in its store format (the policy's `store`, else sHAM); "
                                 f"{flag} applies to .onnx, .pt and .pt2 outputs")
    if fmt == "onnx" and a.sparse == "csr":
        raise UsageError(f"--sparse csr does not apply to the output '{out}': csr makes torch linear layers keep a "
                         "torch.sparse_csr weight (.pt, .pt2); an ONNX model keeps sparse weights as "
                         "sparse_initializer (the default) or dense (--sparse dense)")
    if a.executor is not None:
        from netsqueeze.passes.executor import make_executor

        try:
            make_executor(a.executor).close()  # nothing starts before its first task
        except NetsqueezeError as e:
            raise UsageError(f"--executor: {e.message}") from None


def _example_inputs(graph: Any, precision: str) -> tuple[Any, ...]:
    """Inputs to trace a compiled module for `.pt2`, of each graph input's shape and dtype."""
    import torch

    from netsqueeze.ir.dims import is_dynamic

    out = []
    for nid in graph.inputs:
        meta = graph.node(nid).meta[0]
        dtype = getattr(torch, meta.dtype, torch.float32)
        # a dynamic dim traces at 2 at least: torch.export specialises sizes 0 and 1
        shape = tuple(max(2, int(d)) if is_dynamic(d) else int(d) for d in meta.shape)
        if dtype.is_floating_point:
            out.append(torch.randn(shape).to(torch.float16 if precision == "fp16" else dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def cmd_compile(a: argparse.Namespace) -> int:
    from netsqueeze.compiler.api import (
        compile,
        file_calibration,
        load_model_file,
        load_policy_file,
        policy_files,
    )
    from netsqueeze.compiler.files import (
        check_output_path,
        is_onnx_file,
        model_files,
        output_format,
        pt2_dynamic_shapes,
        save_model,
    )

    # everything about the options and the output is checked before any work is done
    params = _parse_sets(a.set)
    shapes = _input_shapes(a.input_shape, a.model)
    if params and not a.policy:
        raise UsageError(f"--set {', '.join(params)}: there is no policy (-p) whose params it would set")
    policy: Any = load_policy_file(a.policy, params) if a.policy else []
    inputs: list[tuple[str, Any]] = model_files(a.model)
    if a.policy:
        inputs += policy_files(policy)
    if a.calib:
        inputs.append(("calibration file", Path(a.calib)))
    out = check_output_path(a.output, inputs)
    reports = [check_output_path(r, [*inputs, ("output model", out)], flag)
               for r, flag in ((a.report, "--report"), (a.report_json, "--report-json")) if r]
    if len(reports) == 2 and reports[0].resolve() == reports[1].resolve():
        raise FileError(f"--report and --report-json both name '{reports[0]}'")
    fmt = output_format(out)
    _check_options(a, out, fmt)
    target: Literal["torch", "onnx"] = "onnx" if fmt == "onnx" else "torch"

    model: Any = a.model
    example = None
    calib: Any = a.calib
    if not is_onnx_file(a.model):
        model, example = load_model_file(a.model, trust_pickle=a.trust_pickle)
        if calib is None:
            calib = file_calibration(a.model)
    res = compile(model, policy, example_inputs=example, calibration=calib, target=target, params=params,
                  precision=a.precision, input_shapes=shapes or None, trust_pickle=a.trust_pickle,
                  executor=a.executor, progress=False if a.quiet else None, sparse=a.sparse,
                  log=_stderr_log if a.verbose and not a.quiet else None)
    if not a.quiet:
        print(res.report)
    pt2_inputs = _example_inputs(res.graph, a.precision) if fmt == "pt2" else None
    if fmt == "nsq":  # the compressed model file: the policy's `store` format, else sHAM
        if res.stored is None:
            from netsqueeze.compiler.stored import attach_store

            attach_store(res, "sham")
        save_model(res.stored, out)
    else:
        save_model(res.model, out, example_inputs=pt2_inputs,
                   dynamic_shapes=pt2_dynamic_shapes(res.graph) if pt2_inputs is not None else None)
    written = [out]
    for path, text in ((a.report, res.report.to_html), (a.report_json, res.report.to_json)):
        if path:
            _write_text(Path(path), text())
            written.append(Path(path))
    if not a.quiet:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_text(path: Path, text: str) -> None:
    from netsqueeze.compiler.files import atomic_write

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def cmd_bench(a: argparse.Namespace) -> int:
    import json

    from netsqueeze.compiler.bench import bench, format_table, parse_batches

    batches = parse_batches(a.batch)
    if a.threads < 1 or a.rounds < 1:
        raise UsageError(f"--threads and --rounds must be at least 1 (got {a.threads}, {a.rounds})")
    if a.json:
        from netsqueeze.compiler.files import check_output_path, model_files

        check_output_path(a.json, [f for m in a.models for f in model_files(m, "model")]
                          + ([("data file", Path(a.data))] if a.data else []), "--json")
    rows = bench(a.models, data=a.data, runtime=a.runtime, batches=batches, threads=a.threads, rounds=a.rounds,
                 trust_pickle=a.trust_pickle)
    print(format_table(rows, a.runtime, a.threads))
    if a.json:
        _write_text(Path(a.json), json.dumps({"runtime": a.runtime, "threads": a.threads, "models": rows}, indent=1))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from netsqueeze.ir.stats import format_stats, graph_stats

    g = _graph(a, a.model)
    print(g)
    print()
    print(format_stats(graph_stats(g)))
    opaque = [n for n in g.nodes() if n.kind == "opaque"]
    if opaque:
        print(f"\n{len(opaque)} opaque op(s) (run verbatim, barriers for channel analysis):")
        for n in opaque:
            print(f"  {n.id}: {n.origin.op_type}")
    if a.groups:
        from netsqueeze.passes.base import PassContext
        from netsqueeze.passes.dependency import DependencyAnalysis, format_groups

        print()
        print(format_groups(PassContext().analysis(DependencyAnalysis, g)))
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from netsqueeze.compiler.plan import check_file

    if a.model is None:
        _input_shapes(a.input_shape, None)  # --input-shape without --model: a usage error
    graph = _graph(a, a.model) if a.model else None
    diags = check_file(a.policy, graph)
    if not any(d.severity == "error" for d in diags):
        from netsqueeze.compiler.api import compile_checks, load_policy_file

        diags += compile_checks(load_policy_file(a.policy), graph)  # what compile would refuse before any pass
    for d in diags:
        print(d.format(), file=sys.stderr)
    errors = sum(d.severity == "error" for d in diags)
    if errors:
        print(f"{errors} error(s)", file=sys.stderr)
        return 2
    print(f"{a.policy}: ok")
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from netsqueeze.compiler.api import compile_checks, load_policy_file
    from netsqueeze.compiler.plan import explain, resolve
    from netsqueeze.passes.registry import all_passes

    graph = _graph(a, a.model)
    policy = load_policy_file(a.policy, _parse_sets(a.set))
    plan = resolve(policy, graph, all_passes())
    problems = compile_checks(policy, graph)
    if any(d.severity == "error" for d in problems):
        raise PolicyError([d for d in problems if d.severity == "error"])
    for d in problems:
        print(d.format(), file=sys.stderr)
    print(explain(plan, graph))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsqueeze", description="Declarative model-compression compiler.",
                                epilog="exit codes: 0 ok, 1 error (budget or guard missed, data, files), 2 policy or "
                                       "usage error, 3 model capture error, 4 internal error (please report), "
                                       "130 interrupted, 143 terminated")
    from netsqueeze import __version__

    p.add_argument("--version", action="version", version=f"netsqueeze {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    shape_help = "input shape for ONNX models with dynamic dims, e.g. x=1,3,224,224"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="log each decision (search candidates, pass messages) to stderr and show the full "
                             "traceback of an internal error")
    common.add_argument("--trust-pickle", action="store_true",
                        help="allow loading .pt/.pt2 models that need a full unpickle (it can run code from the file)")

    c = sub.add_parser("compile", help="compress a model as a policy says", parents=[common],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  netsqueeze compile model.onnx -p vgg.sqz -o small.onnx --calib calib.npz\n"
                              "  netsqueeze compile net.py -p policy.sqz -o small.pt --report report.html "
                              "--report-json report.json\n"
                              "  netsqueeze compile net.py -p policy.sqz -o small.onnx --quiet --set ratio=0.5\n"
                              "progress bars go to stderr when it is a terminal; --quiet turns them and the "
                              "printed report off")
    c.add_argument("model", help="model.onnx, model.py[:factory], model.pt or model.pt2")
    c.add_argument("-p", "--policy", help="policy file (.sqz)")
    c.add_argument("-o", "--output", required=True, help="output path; its suffix picks the format (.onnx, .pt, .pt2, or .nsq: the compressed model "
                   "file netsqueeze.load reads, in the policy's `store` format or sHAM)")
    c.add_argument("--calib", help="calibration data (.npz, .npy or .pt)")
    c.add_argument("--target", choices=["torch", "onnx"])
    c.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: emit the .onnx, .pt or .pt2 model in half precision (a .nsq file keeps its store "
                        "format)")
    c.add_argument("--executor", default=None, metavar="SPEC",
                   help="where independent solves (net_trim) run: local, processes[:N] (default), "
                        "dask://HOST:PORT (an existing Dask scheduler) or dask://local[:N]")
    c.add_argument("--sparse", choices=("dense", "csr"), default=None,
                   help="sparse weights: dense (dense weights with zeros, torch and ONNX) or csr (torch linear "
                        "layers multiplying with a torch.sparse_csr weight: .pt and .pt2 only); default: ONNX "
                        "sparse_initializer, torch layers decoding to dense; not for .nsq (its store format decides)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a policy param")
    c.add_argument("--input-shape", action="append", default=[], help=shape_help)
    c.add_argument("--report", metavar="HTML", help="also write the report as one self-contained HTML page")
    c.add_argument("--report-json", metavar="JSON", help="also write the report as JSON (schema netsqueeze.report/1)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no printed report")
    c.set_defaults(fn=cmd_compile)

    b = sub.add_parser("bench", help="size, params, FLOPs, measured latency (and top-1) of models side by side",
                       parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  netsqueeze bench model.onnx small.onnx --batch 1,64\n"
                              "  netsqueeze bench model.onnx small.onnx --data test.npz --json bench.json\n"
                              "--data: an .npz with the model's input arrays and an array 'labels' "
                              "(top-1); without labels, agreement with the first model only")
    b.add_argument("models", nargs="+", metavar="MODEL", help="model.onnx, model.py[:factory], model.pt or model.pt2")
    b.add_argument("--data", help="held-out inputs (.npz, .npy or .pt; an .npz may hold 'labels')")
    b.add_argument("--runtime", choices=["ort", "torch"], default="ort", help="ONNX Runtime CPU or torch eager")
    b.add_argument("--batch", default="1", help="batch sizes, comma-separated (default: 1)")
    b.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    b.add_argument("--rounds", type=int, default=15, help="timed rounds per model (default: 15)")
    b.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="print a model's IR, its statistics and opaque ops", parents=[common])
    i.add_argument("model")
    i.add_argument("--groups", action="store_true", help="list channel groups from dependency analysis")
    i.add_argument("--input-shape", action="append", default=[], help=shape_help)
    i.set_defaults(fn=cmd_inspect)

    k = sub.add_parser("check", help="check a policy file (against a model if given)", parents=[common])
    k.add_argument("policy")
    k.add_argument("--model")
    k.add_argument("--input-shape", action="append", default=[], help=shape_help)
    k.set_defaults(fn=cmd_check)

    e = sub.add_parser("explain", help="per node, the passes a policy applies and the line that decided it",
                       parents=[common])
    e.add_argument("policy")
    e.add_argument("--model", required=True)
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--input-shape", action="append", default=[], help=shape_help)
    e.set_defaults(fn=cmd_explain)
    return p


def _print_error(e: NetsqueezeError, verbose: bool) -> None:
    print(str(e), file=sys.stderr)
    for note in getattr(e, "__notes__", ()):  # e.g. the user's own traceback
        print(note, file=sys.stderr)
    if verbose and isinstance(e, InternalError):
        print("".join(traceback.format_exception(e)).rstrip(), file=sys.stderr)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the command runs (main thread only), so writes clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    verbose = False
    try:
        with _sigterm_raises():
            args = build_parser().parse_args(argv)
            verbose = bool(getattr(args, "verbose", False))
            return int(args.fn(args))
    except NetsqueezeError as e:
        _print_error(e, verbose)
        if isinstance(e, InternalError):
            return EXIT_INTERNAL
        if isinstance(e, CaptureError):
            return EXIT_CAPTURE
        return EXIT_POLICY if isinstance(e, (PolicyError, UsageError)) else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_SIGTERM
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as e:
        text = str(e).strip()
        detail = f": {text.splitlines()[0]}" if text else ""
        err = InternalError(Diagnostic(f"internal error: {type(e).__name__}{detail}", notes=(REPORT_HINT,)))
        err.__cause__ = e
        _print_error(err, verbose)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
