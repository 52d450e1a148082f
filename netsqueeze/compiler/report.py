"""The compile report: per pass and per node, shapes, params and FLOPs before/after, times, fidelity."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netsqueeze.compiler.pipeline import PassRecord
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import GraphStats, NodeStats, graph_stats


def _table(rows: list[tuple[str, ...]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def node_cells(nb: NodeStats | None, na: NodeStats | None) -> tuple[str, ...]:
    """A node's params, FLOPs and weight bytes before and after, and its weight forms after (a node that is
    new or removed counts 0 on the side where it is absent)."""
    return (f"{nb.params if nb else 0:,}", f"{na.params if na else 0:,}", f"{nb.flops if nb else 0:,}",
            f"{na.flops if na else 0:,}", f"{nb.param_bytes if nb else 0:,}", f"{na.param_bytes if na else 0:,}",
            (na.forms if na else "") or "dense")


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


@dataclass
class CompileReport:
    """Everything `compile()` measured. `str(report)` prints it as tables."""

    model_name: str
    frontend: str
    target: str
    before: GraphStats
    after: GraphStats
    passes: list[PassRecord] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    policy_hash: str | None = None
    plan: str | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # with compile(store=...): the compressed file's weight bytes, their fp32 bytes and ψ (their ratio)
    storage: dict[str, float] = field(default_factory=dict)
    # the policy's budget (ratios of the original) and guard (metric, limit), for the plots
    budget: dict[str, float] = field(default_factory=dict)
    guard: tuple[str, float] | None = None
    # every candidate whose guard metric a search measured, in order: pass, metric, value, params, flops, bytes
    search: list[dict[str, Any]] = field(default_factory=list)
    # measured latencies (`compiler.latency`): model ("original" | "compressed"), runtime, batch, threads, ms
    latency: list[dict[str, Any]] = field(default_factory=list)
    # full passes of the model over the calibration data the compile made (`calibration.PassCount`)
    calibration_passes: float = 0.0

    @property
    def params_ratio(self) -> float:
        """Original params / compressed params (2.0 = half the params)."""
        return self.before.params / max(1, self.after.params)

    @property
    def flops_ratio(self) -> float:
        return self.before.flops / max(1, self.after.flops)

    def node_rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = []
        b, a = self.before.nodes, self.after.nodes
        for nid in [*b, *[n for n in a if n not in b]]:
            nb, na = b.get(nid), a.get(nid)
            kind = (nb or na).kind  # type: ignore[union-attr]
            if kind in ("input", "output", "constant"):
                continue
            shape_b = ", ".join(nb.shapes) if nb else "(new)"
            shape_a = ", ".join(na.shapes) if na else "(removed)"
            cells = node_cells(nb, na)
            row: tuple[str, ...] = (nid, kind, shape_b, shape_a if shape_a != shape_b else "=", *cells[:4])
            if self.has_encoded():
                row += cells[4:]
            if self.has_sparse():
                row += (f"{na.nonzeros if na else 0:,}",)
            rows.append(row)
        return rows

    def has_sparse(self) -> bool:
        """Whether any node keeps fewer non-zero weights than params after the passes (pruned, Net-Trim)."""
        return any(n.nonzeros != n.params for n in self.after.nodes.values())

    def has_encoded(self) -> bool:
        """Whether any node stores an encoded (quantized, sparse, codebook) weight before or after."""
        return any(n.forms for st in (self.before, self.after) for n in st.nodes.values())

    def format(self) -> str:
        out = [f"netsqueeze report: {self.model_name} ({self.frontend} -> {self.target})"]
        if self.policy_hash:
            out.append(f"policy sha256: {self.policy_hash}")
        out.append("")
        prow: list[tuple[str, ...]] = [("pass", "where", "time", "changed", "params", "FLOPs", "notes")]
        for r in self.passes:
            changed = len(r.changed_nodes())
            prow.append((
                r.name, r.where or "-", f"{r.seconds * 1000:.1f} ms", f"{changed} nodes",
                f"{r.before.params:,} -> {r.after.params:,}", f"{r.before.flops:,} -> {r.after.flops:,}",
                "; ".join(r.result.notes)[:80],
            ))
        if len(prow) > 1:
            out += ["passes:", _table(prow, {2}), ""]
        rows: list[tuple[str, ...]] = [("node", "kind", "shape before", "shape after", "params", "params'",
                                        "FLOPs", "FLOPs'")]
        if self.has_encoded():
            rows[0] += ("bytes", "bytes'", "weights'")
        if self.has_sparse():
            rows[0] += ("non-zeros'",)
        rows += self.node_rows()
        out += ["nodes:", _table(rows, {4, 5, 6, 7, 8, 9, len(rows[0]) - 1} if self.has_sparse() else
                                 {4, 5, 6, 7, 8, 9}), ""]
        out.append(
            f"total: params {self.before.params:,} -> {self.after.params:,} ({_ratio(self.before.params, self.after.params)}"
            f" smaller), FLOPs {self.before.flops:,} -> {self.after.flops:,} "
            f"({_ratio(self.before.flops, self.after.flops)} fewer), weight bytes {self.before.param_bytes:,} -> "
            f"{self.after.param_bytes:,}"
            + (f", non-zeros {self.before.nonzeros:,} -> {self.after.nonzeros:,}"
               if (self.before.nonzeros, self.after.nonzeros) != (self.before.params, self.after.params) else "")
        )
        if self.fidelity:
            out.append("fidelity: " + ", ".join(f"{k} {v:.3g}" for k, v in self.fidelity.items()))
        if self.times:
            out.append("time: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.times.items()))
        if self.calibration_passes:
            out.append(f"calibration: {self.calibration_passes:.1f} full passes of the model over the data")
        out.extend(f"note: {n}" for n in self.notes)
        for lat in self.latency:
            out.append(f"latency ({lat['model']}, {lat['runtime']}, batch {lat['batch']}, {lat['threads']} thread(s)): "
                       f"median {lat['median_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms")
        if self.plan:
            out += ["", "resolved plan:", self.plan]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()

    # ---- other renderings
    def to_dict(self) -> dict[str, Any]:
        """The report in the stable JSON schema of `compiler.report_json`."""
        from netsqueeze.compiler.report_json import to_dict

        return to_dict(self)

    def to_json(self, indent: int | None = 1) -> str:
        from netsqueeze.compiler.report_json import to_json

        return to_json(self, indent)

    @classmethod
    def from_json(cls, text: str) -> CompileReport:
        from netsqueeze.compiler.report_json import from_json

        return from_json(text)

    def to_html(self) -> str:
        """One self-contained HTML page (inline SVG plots, no scripts, no external references)."""
        from netsqueeze.compiler.report_html import render

        return render(self)

    def _repr_html_(self) -> str:  # Jupyter displays the report as its HTML page
        return self.to_html()


class SearchRecorder:
    """Records every candidate a search pass measures through `PassContext.fidelity`: the guard metric's
    value and the candidate's params/FLOPs/bytes, for the report's search trajectory."""

    def __init__(self) -> None:
        self.points: list[tuple[float, dict[str, Any]]] = []

    def wrap(self, fn: Callable[..., float | None]) -> Callable[..., float | None]:
        def measured(graph: Graph, metric: str, *rest: Any) -> float | None:
            value = fn(graph, metric, *rest)
            if value is not None and math.isfinite(value):
                st = graph_stats(graph)
                self.points.append((time.perf_counter(), {"pass": "", "metric": metric, "value": float(value),
                                                          "params": st.params, "flops": st.flops,
                                                          "bytes": st.param_bytes}))
            return value

        return measured

    def entries(self, records: list[PassRecord], start: float) -> list[dict[str, Any]]:
        """The points, each named after the pass that ran when it was measured (passes ran back to back
        from `start`, in `records` order)."""
        ends, t = [], start
        for r in records:
            t += r.seconds
            ends.append((t, r.name))
        out = []
        for when, point in self.points:
            name = next((n for end, n in ends if when <= end), ends[-1][1] if ends else "")
            out.append({**point, "pass": name})
        return out
