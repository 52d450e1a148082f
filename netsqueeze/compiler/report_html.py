"""The compile report as one self-contained HTML page: inline SVG plots and tables, no scripts, nothing fetched.

Sections: totals; per-node bars of channels, params, FLOPs and weight bytes before/after; per-pass time and
metrics; the search trajectory (each candidate a search measured, against the guard and the budget); measured
latency; every node's shapes and numbers; the resolved policy plan.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from netsqueeze.compiler.report import node_cells

if TYPE_CHECKING:
    from netsqueeze.compiler.report import CompileReport

BEFORE, AFTER, OK, BAD = "#b8c2cc", "#2b6cb0", "#2f855a", "#c53030"
CHANNEL_KINDS = ("conv", "conv_transpose", "linear", "matmul", "embedding")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1040px;color:#1a202c}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:3px 8px;border-bottom:1px solid #edf2f7;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f7fafc;padding:10px;overflow-x:auto;font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:18px}.muted{color:#718096}.legend span{display:inline-block;width:12px;height:12px;
margin:0 4px 0 12px;vertical-align:-1px}svg text{font:11px system-ui,sans-serif;fill:#2d3748}
"""


def _fmt(x: float) -> str:
    ax = abs(x)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x)}"


def channels(shapes: Sequence[str]) -> int | None:
    """The channel count (dim 1) of a node's first output, from its printed shape `float32[1, 15, 8, 8]`."""
    if not shapes:
        return None
    m = re.search(r"\[([^\]]*)\]", shapes[0])
    dims = [d.strip() for d in m.group(1).split(",")] if m else []
    return int(dims[1]) if len(dims) >= 2 and dims[1].isdigit() else None


def _bars(title: str, rows: Sequence[tuple[str, float, float]], single: bool = False) -> str:
    """Horizontal bars, the original (grey) above the compressed (blue) for each row; `single`: one bar of
    the first value per row."""
    if not rows:
        return ""
    label_w, bar_w, row_h = 170, 600, 22
    top = max(max(b, a) for _, b, a in rows) or 1
    h = row_h * len(rows) + 8
    out = [f'<svg width="{label_w + bar_w + 90}" height="{h}" role="img" '
           f'aria-label="{escape(title)}">']
    for i, (label, b, a) in enumerate(rows):
        y = 4 + i * row_h
        short = label if len(label) <= 26 else "…" + label[-25:]
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{escape(short)}<title>{escape(label)}'
                   "</title></text>")
        wb, wa = bar_w * b / top, bar_w * a / top
        if single:
            out.append(f'<rect x="{label_w}" y="{y + 2}" width="{wb:.1f}" height="14" fill="{AFTER}"/>'
                       f'<text x="{label_w + wb + 6:.1f}" y="{y + 13}">{_fmt(b)}</text>')
            continue
        out.append(f'<rect x="{label_w}" y="{y}" width="{wb:.1f}" height="8" fill="{BEFORE}"/>')
        out.append(f'<rect x="{label_w}" y="{y + 9}" width="{wa:.1f}" height="8" fill="{AFTER}"/>')
        out.append(f'<text x="{label_w + max(wb, wa) + 6:.1f}" y="{y + 13}">{_fmt(b)} → {_fmt(a)}</text>')
    out.append("</svg>")
    return f"<h3>{escape(title)}</h3>" + "".join(out)


def _trajectory(r: CompileReport) -> str:
    """Each candidate a search measured: its guard metric (limit dashed) and its FLOPs ratio (budget dashed)."""
    # the guard's metric when a search measured it (others, e.g. sensitivity probes, are left out)
    metric = r.guard[0] if r.guard is not None and any(p["metric"] == r.guard[0] for p in r.search) else (
        str(r.search[0]["metric"]) if r.search else "")
    pts = [p for p in r.search if p["metric"] == metric]
    if not pts:
        return '<p class="muted">No search measured candidates (no guard, or no pass searched).</p>'
    w, h, pad = 760, 220, 48
    limit = r.guard[1] if r.guard is not None and r.guard[0] == metric else None
    vals = [float(p["value"]) for p in pts]
    ratio = [float(p["flops"]) / max(1, r.before.flops) for p in pts]
    lo = min(0.0, *vals)
    hi = max([*vals, limit or 0.0]) * 1.1 or 1.0
    n = len(pts)

    def sx(i: int) -> float:
        return pad + (w - 2 * pad) * (i / max(1, n - 1))

    def sy(v: float, a: float, b: float) -> float:
        return h - pad + (v - a) / (b - a or 1) * (2 * pad - h)

    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="search">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#a0aec0"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#a0aec0"/>',
           f'<text x="{pad - 4}" y="{pad}" text-anchor="end">{_fmt(hi)}</text>',
           f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">{_fmt(lo)}</text>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">candidate (in the order tried)</text>',
           f'<text x="{pad}" y="{pad - 10}">{escape(metric.replace("_", " "))} (dots) · FLOPs ratio (squares, '
           "right axis 0–100%)</text>"]
    if limit is not None:
        y = sy(limit, lo, hi)
        out.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{w - pad}" y2="{y:.1f}" stroke="{BAD}" stroke-dasharray="5 4"/>'
                   f'<text x="{w - pad + 4}" y="{y + 4:.1f}">guard {limit:.3g}</text>')
    fb = r.budget.get("flops")
    if fb is not None:
        y = sy(fb, 0.0, 1.0)
        out.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{w - pad}" y2="{y:.1f}" stroke="{AFTER}" '
                   f'stroke-dasharray="2 3"/><text x="{w - pad + 4}" y="{y + 4:.1f}">budget {fb:.0%}</text>')
    for i, (v, fr) in enumerate(zip(vals, ratio)):
        ok = limit is None or v <= limit
        out.append(f'<circle cx="{sx(i):.1f}" cy="{sy(v, lo, hi):.1f}" r="4" fill="{OK if ok else BAD}">'
                   f"<title>candidate {i + 1} ({escape(str(pts[i]['pass']))}): {v:.4g}, FLOPs {fr:.1%}</title></circle>")
        out.append(f'<rect x="{sx(i) - 3:.1f}" y="{sy(fr, 0.0, 1.0) - 3:.1f}" width="6" height="6" fill="none" '
                   f'stroke="{AFTER}"/>')
    out.append("</svg>")
    return "".join(out)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    th = "".join(f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
                 for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="n">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(r: CompileReport) -> str:
    b, a = r.before, r.after
    cards = [("params", b.params, a.params), ("FLOPs", b.flops, a.flops), ("weight bytes", b.param_bytes, a.param_bytes)]
    card_html = "".join(f'<div class="card"><span class="muted">{n}</span><b>{_fmt(x)} → {_fmt(y)}</b>'
                        f'<span class="muted">{x / max(1, y):.2f}× smaller</span></div>' for n, x, y in cards)
    card_html += "".join(f'<div class="card"><span class="muted">{escape(k.replace("_", " "))}</span>'
                         f"<b>{v:.4g}</b></div>" for k, v in r.fidelity.items())
    if "total" in r.times:
        card_html += f'<div class="card"><span class="muted">compile time</span><b>{r.times["total"]:.1f} s</b></div>'

    ids = [*b.nodes, *[n for n in a.nodes if n not in b.nodes]]
    ops = [n for n in ids if (b.nodes.get(n) or a.nodes[n]).kind not in ("input", "output", "constant")]
    weighted = [n for n in ops if (b.nodes[n].params if n in b.nodes else 0) or (a.nodes[n].params if n in a.nodes else 0)]

    def val(st: dict, n: str, attr: str) -> float:  # type: ignore[type-arg]
        return float(getattr(st[n], attr)) if n in st else 0.0

    chans = []
    for n in weighted:  # layers that produce channels; a removed norm's "channels" would only repeat its producer's
        if (b.nodes.get(n) or a.nodes[n]).kind not in CHANNEL_KINDS:
            continue
        cb = channels(b.nodes[n].shapes) if n in b.nodes else 0
        ca = channels(a.nodes[n].shapes) if n in a.nodes else 0
        if cb is not None and ca is not None:
            chans.append((n, float(cb), float(ca)))
    plots = (_bars("output channels", chans)
             + _bars("params", [(n, val(b.nodes, n, "params"), val(a.nodes, n, "params")) for n in weighted])
             + _bars("FLOPs", [(n, val(b.nodes, n, "flops"), val(a.nodes, n, "flops")) for n in ops
                               if val(b.nodes, n, "flops") or val(a.nodes, n, "flops")])
             + _bars("weight bytes", [(n, val(b.nodes, n, "param_bytes"), val(a.nodes, n, "param_bytes"))
                                      for n in weighted]))

    pass_rows = [(p.name, p.where or "-", f"{p.seconds * 1000:.1f}", f"{p.before.params:,} → {p.after.params:,}",
                  f"{p.before.flops:,} → {p.after.flops:,}",
                  ", ".join(f"{k} {v:.4g}" for k, v in p.result.metrics.items()), "; ".join(p.result.notes))
                 for p in r.passes]
    total_s = sum(p.seconds for p in r.passes) or 1.0
    pass_bars = _bars("time per pass (ms)", [(p.name + (f" ({Path(p.where).name})" if p.where else ""), p.seconds * 1000,
                                              0.0) for p in r.passes], single=True) if r.passes else ""
    lat_rows = [(str(x["model"]), str(x["runtime"]), str(x["batch"]), str(x["threads"]), f"{x['median_ms']:.3f}",
                 f"{x['p90_ms']:.3f}") for x in r.latency]
    node_rows = []
    for n in ids:
        nb, na = b.nodes.get(n), a.nodes.get(n)
        kind = (nb or na).kind  # type: ignore[union-attr]
        node_rows.append((n, kind, ", ".join(nb.shapes) if nb else "(new)", ", ".join(na.shapes) if na else "(removed)",
                          *node_cells(nb, na)))
    budget = ", ".join(f"{k} ≤ {v:.0%}" for k, v in r.budget.items()) or "none"
    guard = f"{r.guard[0].replace('_', ' ')} ≤ {r.guard[1]:.3g}" if r.guard else "none"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>netsqueeze report: {escape(r.model_name)}</title><style>{CSS}</style></head><body>",
        f"<h1>netsqueeze report: {escape(r.model_name)}</h1>",
        f'<p class="muted">{escape(r.frontend)} → {escape(r.target)} · budget: {escape(budget)} · guard: '
        f"{escape(guard)}" + (f" · policy sha256 {escape(r.policy_hash[:16])}…" if r.policy_hash else "") + "</p>",
        f'<div class="cards">{card_html}</div>',
        '<h2 id="nodes-plots">Per node, before and after</h2><p class="legend"><span style="background:'
        f'{BEFORE}"></span>original<span style="background:{AFTER}"></span>compressed</p>', plots,
        '<h2 id="passes">Passes</h2>',
        _table(["pass", "where", "ms", "params", "FLOPs", "metrics", "notes"], pass_rows, {2}) if pass_rows
        else '<p class="muted">No passes ran.</p>',
        pass_bars.replace("<h3>", f'<h3 title="{total_s:.2f} s in all">', 1),
        '<h2 id="search">Search trajectory</h2>', _trajectory(r),
    ]
    if lat_rows:
        parts += ['<h2 id="latency">Measured latency</h2>',
                  _table(["model", "runtime", "batch", "threads", "median ms", "p90 ms"], lat_rows, {2, 3, 4, 5})]
    parts += ['<h2 id="node-table">Every node</h2>',
              _table(["node", "kind", "shape before", "shape after", "params", "params'", "FLOPs", "FLOPs'",
                      "bytes", "bytes'", "weights'"], node_rows, {4, 5, 6, 7, 8, 9})]
    if r.notes:
        parts += ["<h2>Notes</h2><ul>" + "".join(f"<li>{escape(x)}</li>" for x in r.notes) + "</ul>"]
    if r.plan:
        parts += ['<h2 id="plan">Resolved policy plan</h2>', f"<pre>{escape(r.plan)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)
