"""The compile report as one self-contained HTML page: matplotlib plots as inline SVG, tables, no scripts,
nothing fetched.

Sections: totals; per-node bars of channels, params, FLOPs and weight bytes before/after; per-pass time and
metrics; the search trajectory (each candidate a search measured, against the guard and the budget); measured
latency; every node's shapes and numbers; the resolved policy plan.

Plots are drawn by matplotlib's object API (a `Figure`, no pyplot: the caller's backend is never touched) and
saved as SVG with text kept as text, a fixed hash salt and no date, so the same report renders to the same
bytes; each SVG's ids are prefixed with its plot's name, so several plots share one page.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
margin:0 4px 0 12px;vertical-align:-1px}svg{max-width:100%;height:auto}
"""
# matplotlib settings for every plot: SVG text as <text> (no glyph tables), ids from a fixed salt (the same
# report gives the same bytes), the page's sans-serif font
RC: dict[str, Any] = {"svg.fonttype": "none", "font.family": "sans-serif", "font.size": 8.5,
                      "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#a0aec0"}
WIDTH_IN = 10.4  # plot width in inches (the page is 1040 px wide at 100 px per inch)


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


def _rc(salt: str = "") -> Any:
    """matplotlib's settings for the report's plots (`RC`, and the SVG hash salt), as a context."""
    import matplotlib

    rc: Any = {**RC, "svg.hashsalt": f"netsqueeze-{salt}"} if salt else dict(RC)
    return matplotlib.rc_context(rc)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "plot"


def svg(fig: Any, name: str, label: str) -> str:
    """`fig` (a matplotlib Figure) as an SVG element to inline in HTML: no XML prolog, DOCTYPE, namespaces or
    metadata, `href` for `xlink:href`, every id prefixed with `name`, `role="img"` and `label` for readers."""
    buf = io.StringIO()
    with _rc(name):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = text.replace("xlink:href=", "href=")
    text = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{name}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{name}-\1)", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{escape(label)}" ', 1).strip()


def _figure(height_in: float) -> Any:
    from matplotlib.figure import Figure

    with _rc():
        return Figure(figsize=(WIDTH_IN, height_in), layout="constrained")


def _bars(title: str, rows: Sequence[tuple[str, float, float]], single: bool = False) -> str:
    """Horizontal bars, the original (grey) above the compressed (blue) for each row, labelled
    "before → after"; `single`: one bar of the first value per row."""
    if not rows:
        return ""
    from matplotlib.ticker import FuncFormatter

    with _rc():
        fig = _figure(0.5 + 0.24 * len(rows))
        ax = fig.add_subplot()
        ys = list(range(len(rows)))
        top = max(max(b, a) for _, b, a in rows) or 1.0
        if single:
            ax.barh(ys, [b for _, b, _ in rows], height=0.6, color=AFTER)
        else:
            ax.barh([y - 0.2 for y in ys], [b for _, b, _ in rows], height=0.38, color=BEFORE, label="original")
            ax.barh([y + 0.2 for y in ys], [a for _, _, a in rows], height=0.38, color=AFTER, label="compressed")
        for y, (_, b, a) in zip(ys, rows):
            ax.text(max(b, a) + top * 0.01, y, _fmt(b) if single else f"{_fmt(b)} → {_fmt(a)}", va="center",
                    fontsize=7.5)
        ax.set_yticks(ys, [lbl if len(lbl) <= 32 else "…" + lbl[-31:] for lbl, _, _ in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top
        ax.set_xlim(0, top * 1.22)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="x", color="#edf2f7")
        ax.set_axisbelow(True)
    return f"<h3>{escape(title)}</h3>" + svg(fig, _slug(title), title)


def _trajectory(r: CompileReport) -> str:
    """Each candidate a search measured, in the order tried: its guard metric (dots, green within the guard,
    red over it; the limit dashed) and its FLOPs ratio (squares, right axis; the budget dotted)."""
    # the guard's metric when a search measured it (others, e.g. sensitivity probes, are left out)
    metric = r.guard[0] if r.guard is not None and any(p["metric"] == r.guard[0] for p in r.search) else (
        str(r.search[0]["metric"]) if r.search else "")
    pts = [p for p in r.search if p["metric"] == metric]
    if not pts:
        return '<p class="muted">No search measured candidates (no guard, or no pass searched).</p>'
    from matplotlib.ticker import PercentFormatter

    limit = r.guard[1] if r.guard is not None and r.guard[0] == metric else None
    vals = [float(p["value"]) for p in pts]
    ratio = [float(p["flops"]) / max(1, r.before.flops) for p in pts]
    xs = list(range(1, len(pts) + 1))
    with _rc():
        fig = _figure(2.6)
        ax = fig.add_subplot()
        ok = [limit is None or v <= limit for v in vals]
        ax.plot(xs, vals, color="#cbd5e0", linewidth=0.8, zorder=1)
        ax.scatter(xs, vals, s=22, c=[OK if o else BAD for o in ok], zorder=2, gid="candidates")
        if limit is not None:
            ax.axhline(limit, color=BAD, linestyle=(0, (5, 4)), linewidth=1)
            ax.annotate(f"guard {limit:.3g}", (0.0, limit), xycoords=("axes fraction", "data"), xytext=(4, -10),
                        textcoords="offset points", color=BAD, fontsize=7.5)
        ax.set_ylim(min(0.0, *vals), max([*vals, limit or 0.0]) * 1.1 or 1.0)
        ax.set_xlabel("candidate (in the order tried)")
        ax.set_ylabel(metric.replace("_", " ") + " (dots)")
        rx = ax.twinx()
        rx.spines["right"].set_visible(True)
        rx.scatter(xs, ratio, s=18, marker="s", facecolors="none", edgecolors=AFTER, zorder=2, gid="flops")
        fb = r.budget.get("flops")
        if fb is not None:
            rx.axhline(fb, color=AFTER, linestyle=(0, (2, 3)), linewidth=1)
            rx.annotate(f"budget {fb:.0%}", (0.0, fb), xycoords=("axes fraction", "data"), xytext=(4, 3),
                        textcoords="offset points", color=AFTER, fontsize=7.5)
        rx.set_ylim(0.0, 1.05)
        rx.yaxis.set_major_formatter(PercentFormatter(1.0))
        rx.set_ylabel("FLOPs of the original (squares)")
        ax.set_xticks(xs if len(xs) <= 30 else xs[:: max(1, len(xs) // 15)])
    return svg(fig, "search", "search trajectory")


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
