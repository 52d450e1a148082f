"""The compile report as JSON (`--report-json`), a stable schema for CI: `to_dict` / `from_dict` round-trip.

Schema `netsqueeze.report/1`: every key below is always present (empty when nothing was measured); new keys
may be added, existing ones keep their meaning. Integers are exact (params, FLOPs, bytes); times in seconds.

    {"schema": "netsqueeze.report/1", "model": str, "frontend": str, "target": str,
     "policy_hash": str|null, "plan": str|null,
     "totals": {"before": TOTALS, "after": TOTALS},        # TOTALS: params, flops, bytes, nonzeros
     "before": STATS, "after": STATS,                       # STATS: {"shared_bytes": int, "nodes": [NODE...]}
     "passes": [{"name", "options", "where", "seconds", "changed", "touched", "removed", "notes",
                 "metrics", "before": STATS, "after": STATS}],
     "times": {stage: seconds}, "fidelity": {metric: value}, "notes": [str], "storage": {key: value},
     "budget": {metric: ratio}, "guard": {"metric", "limit"}|null,
     "search": [{"pass", "metric", "value", "params", "flops", "bytes"}],   # candidates the guard measured
     "latency": [{"model", "runtime", "batch", "threads", "median_ms", "p90_ms", "rounds"}],
     "calibration_passes": float}                           # full model passes over the calibration data
NODE: {"id", "kind", "shapes": [str], "params", "flops", "bytes", "activation_bytes", "nonzeros", "forms"}.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from netsqueeze.compiler.pipeline import PassRecord
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.stats import GraphStats, NodeStats
from netsqueeze.passes.base import PassResult

if TYPE_CHECKING:
    from netsqueeze.compiler.report import CompileReport

SCHEMA = "netsqueeze.report/1"


def _num(x: float) -> float | None:
    """JSON has no NaN/Inf: they are written as null."""
    return float(x) if math.isfinite(x) else None


def stats_to_dict(st: GraphStats) -> dict[str, Any]:
    return {"shared_bytes": st.shared_bytes, "nodes": [
        {"id": n.id, "kind": n.kind, "shapes": list(n.shapes), "params": n.params, "flops": n.flops,
         "bytes": n.param_bytes, "activation_bytes": n.activation_bytes, "nonzeros": n.nonzeros, "forms": n.forms}
        for n in st.nodes.values()]}


def stats_from_dict(d: dict[str, Any]) -> GraphStats:
    nodes = {n["id"]: NodeStats(n["id"], n["kind"], tuple(n["shapes"]), int(n["params"]), int(n["flops"]),
                                int(n["bytes"]), int(n["activation_bytes"]), int(n["nonzeros"]), n["forms"])
             for n in d["nodes"]}
    return GraphStats(nodes, int(d["shared_bytes"]))


def _totals(st: GraphStats) -> dict[str, int]:
    return {"params": st.params, "flops": st.flops, "bytes": st.param_bytes, "nonzeros": st.nonzeros}


def to_dict(r: CompileReport) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "model": r.model_name, "frontend": r.frontend, "target": r.target,
        "policy_hash": r.policy_hash, "plan": r.plan,
        "totals": {"before": _totals(r.before), "after": _totals(r.after)},
        "before": stats_to_dict(r.before), "after": stats_to_dict(r.after),
        "passes": [{
            "name": p.name, "options": p.options, "where": p.where, "seconds": p.seconds,
            "changed": p.result.changed, "touched": sorted(p.result.touched), "removed": sorted(p.result.removed),
            "notes": list(p.result.notes), "metrics": {k: _num(v) for k, v in p.result.metrics.items()},
            "before": stats_to_dict(p.before), "after": stats_to_dict(p.after),
        } for p in r.passes],
        "times": dict(r.times),
        "fidelity": {k: _num(v) for k, v in r.fidelity.items()},
        "notes": list(r.notes),
        "storage": {k: _num(v) for k, v in r.storage.items()},
        "budget": dict(r.budget),
        "guard": {"metric": r.guard[0], "limit": r.guard[1]} if r.guard is not None else None,
        "search": [dict(s) for s in r.search],
        "latency": [dict(x) for x in r.latency],
        "calibration_passes": r.calibration_passes,
    }


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def from_dict(d: dict[str, Any]) -> CompileReport:
    """The report a `to_dict` result describes; raises NetsqueezeError for another schema or a missing key."""
    from netsqueeze.compiler.report import CompileReport

    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        got = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise NetsqueezeError(f"not a netsqueeze report: schema is {got!r}, expected '{SCHEMA}'")
    try:
        passes = [PassRecord(
            p["name"], p["options"], p["where"], float(p["seconds"]),
            PassResult(bool(p["changed"]), set(p["touched"]), set(p["removed"]), list(p["notes"]),
                       {k: _nan(v) for k, v in p["metrics"].items()}),
            stats_from_dict(p["before"]), stats_from_dict(p["after"]),
        ) for p in d["passes"]]
        guard = d["guard"]
        return CompileReport(
            model_name=d["model"], frontend=d["frontend"], target=d["target"],
            before=stats_from_dict(d["before"]), after=stats_from_dict(d["after"]), passes=passes,
            times={k: float(v) for k, v in d["times"].items()}, policy_hash=d["policy_hash"], plan=d["plan"],
            fidelity={k: _nan(v) for k, v in d["fidelity"].items()}, notes=list(d["notes"]),
            storage={k: _nan(v) for k, v in d["storage"].items()},
            budget={k: float(v) for k, v in d["budget"].items()},
            guard=(str(guard["metric"]), float(guard["limit"])) if guard is not None else None,
            search=[dict(s) for s in d["search"]], latency=[dict(x) for x in d["latency"]],
            calibration_passes=float(d.get("calibration_passes", 0.0)),
        )
    except KeyError as e:
        raise NetsqueezeError(f"netsqueeze report is missing the key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a key holding the wrong kind of value
        raise NetsqueezeError(f"netsqueeze report is malformed: {type(e).__name__}: {e}") from None


def to_json(r: CompileReport, indent: int | None = 1) -> str:
    return json.dumps(to_dict(r), indent=indent, allow_nan=False)


def from_json(text: str) -> CompileReport:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NetsqueezeError(f"not a netsqueeze report: invalid JSON at line {e.lineno}, column {e.colno}") from None
    return from_dict(data)
