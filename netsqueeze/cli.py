"""The `netsqueeze` command: compile, inspect, check, explain."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from netsqueeze.errors import NetsqueezeError, PolicyError


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
            out[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise NetsqueezeError(f"--input-shape expects name=1,3,224,224, got '{item}'") from None
    return out


def _graph(model: str, shapes: dict[str, tuple[int, ...]]) -> Any:
    from netsqueeze.compiler.api import import_model

    return import_model(model, input_shapes=shapes or None)


def cmd_compile(a: argparse.Namespace) -> int:
    import torch

    from netsqueeze.compiler.api import compile, file_calibration, load_model_file

    out = Path(a.output)
    src = Path(a.model.split(".py:")[0])
    if out.resolve() == src.resolve():
        raise NetsqueezeError(f"refusing to overwrite the input model '{src}': choose another -o path")
    target: Literal["torch", "onnx"] = a.target or ("onnx" if out.suffix == ".onnx" else "torch")
    model: Any = a.model
    inputs = None
    calib: Any = a.calib
    if not a.model.endswith(".onnx"):
        model, inputs = load_model_file(a.model)
        if calib is None:
            calib = file_calibration(a.model)
    res = compile(model, a.policy or [], example_inputs=inputs, calibration=calib, target=target,
                  params=_parse_sets(a.set), precision=a.precision, input_shapes=_parse_shapes(a.input_shape) or None)
    print(res.report)
    if target == "onnx":
        from netsqueeze.backends.onnx import save_onnx

        save_onnx(res.model, str(out))
    elif out.suffix == ".pt2":
        ex = tuple(torch.randn(tuple(res.graph.node(i).meta[0].shape)) for i in res.graph.inputs)
        torch.export.save(torch.export.export(res.model, ex), str(out))
    else:
        torch.save(res.model, str(out))
    print(f"wrote {out}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from netsqueeze.ir.stats import format_stats, graph_stats

    g = _graph(a.model, _parse_shapes(a.input_shape))
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

    graph = _graph(a.model, _parse_shapes(a.input_shape)) if a.model else None
    diags = check_file(a.policy, graph)
    for d in diags:
        print(d.format(), file=sys.stderr)
    errors = sum(d.severity == "error" for d in diags)
    if errors:
        print(f"{errors} error(s)", file=sys.stderr)
        return 2
    print(f"{a.policy}: ok")
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from netsqueeze import dsl
    from netsqueeze.compiler.plan import explain, resolve
    from netsqueeze.passes.registry import all_passes

    graph = _graph(a.model, _parse_shapes(a.input_shape))
    plan = resolve(dsl.load_policy(a.policy, params=_parse_sets(a.set)), graph, all_passes())
    print(explain(plan, graph))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsqueeze", description="Declarative model-compression compiler.")
    sub = p.add_subparsers(dest="command", required=True)
    shape_help = "input shape for ONNX models with dynamic dims, e.g. x=1,3,224,224"

    c = sub.add_parser("compile", help="compress a model as a policy says")
    c.add_argument("model", help="model.onnx, model.py[:factory], model.pt or model.pt2")
    c.add_argument("-p", "--policy", help="policy file (.sqz)")
    c.add_argument("-o", "--output", required=True, help="output path (.onnx, .pt or .pt2)")
    c.add_argument("--calib", help="calibration data (.npz, .npy or .pt)")
    c.add_argument("--target", choices=["torch", "onnx"])
    c.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a policy param")
    c.add_argument("--input-shape", action="append", default=[], help=shape_help)
    c.set_defaults(fn=cmd_compile)

    i = sub.add_parser("inspect", help="print a model's IR, its statistics and opaque ops")
    i.add_argument("model")
    i.add_argument("--groups", action="store_true", help="list channel groups from dependency analysis")
    i.add_argument("--input-shape", action="append", default=[], help=shape_help)
    i.set_defaults(fn=cmd_inspect)

    k = sub.add_parser("check", help="check a policy file (against a model if given)")
    k.add_argument("policy")
    k.add_argument("--model")
    k.add_argument("--input-shape", action="append", default=[], help=shape_help)
    k.set_defaults(fn=cmd_check)

    e = sub.add_parser("explain", help="per node, the passes a policy applies and the line that decided it")
    e.add_argument("policy")
    e.add_argument("--model", required=True)
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--input-shape", action="append", default=[], help=shape_help)
    e.set_defaults(fn=cmd_explain)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except NetsqueezeError as e:
        print(str(e), file=sys.stderr)
        return 2 if isinstance(e, PolicyError) else 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
