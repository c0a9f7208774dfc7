"""The report as one self-contained HTML page: no scripts, no external CSS, fonts or images; the entropy plot is
inline SVG written here by hand. Rendering only: the report dict is built by api.py (schema there).

Sections, in order: summary (model, data, tool), warnings, fidelity, latency, the entropy of every activation
in graph order (linearized ones highlighted; hovering a bar shows its node through the SVG ``<title>``), the
decisions table, the before / after table, the exactness check and the passes. Every block but the summary,
the plot and the decisions is optional and left out when its key is missing. Every string taken from the
report (node names come from the user's model) goes through ``html.escape``.
"""
from __future__ import annotations

import html
import logging
import math
import os

from onnx_easier.model_io import write_atomically

log = logging.getLogger(__name__)

COST_ROWS = ("nodes", "compute_nodes", "activations", "depth", "params", "macs")
ACTION_COLORS = {"linearized": "#e8590c", "kept": "#4c6ef5"}
OTHER_COLOR = "#868e96"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #212529; overflow-wrap: anywhere; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #dee2e6; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #dee2e6; padding: 0.25em 0.6em; overflow-wrap: normal; }
th { background: #f1f3f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.name { font-family: ui-monospace, monospace; }
tr.linearized td { background: #fff4e6; } tr.op td { color: #868e96; }
.ok { color: #2b8a3e; font-weight: 600; } .fail { color: #c92a2a; font-weight: 600; }
.warn { background: #fff9db; border-left: 4px solid #fab005; padding: 0.4em 0.8em; }
.plot, .scroll { overflow-x: auto; max-width: 100%; } .legend span { margin-right: 1.2em; }
td.name { overflow-wrap: break-word; max-width: 28em; } td.note { overflow-wrap: anywhere; max-width: 28em; }
abbr { text-decoration: none; cursor: help; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; margin-right: 0.3em; }
svg text { font: 11px system-ui, sans-serif; fill: #495057; }
"""


MIN_PLOT_WIDTH = 360
NAME_CHARS = 40  # longer node names are shortened in tables, the full name on hover


def _breakable(text: str) -> str:
    """Escaped text with line-break opportunities after the separators of ONNX node names (``/``, ``+``, ``(``,
    ``,``), so a name wraps between its parts ("/features/ features.2/Relu"), never inside one ("Re lu")."""
    return "".join(_e(c) + ("<wbr>" if c in "/+(," else "") for c in text)


def _name(value: object) -> str:
    """An escaped node name; a long one (fused layers name all their sources) shortened in the middle, in full in
    its hover title."""
    text = str(value)
    if len(text) <= NAME_CHARS:
        return _breakable(text)
    half = (NAME_CHARS - 1) // 2
    return f'<abbr title="{_e(text)}">{_breakable(text[:half])}&hellip;{_breakable(text[-half:])}</abbr>'


def _table(head: str, rows: list[str]) -> str:
    """A table in a box of its own that scrolls sideways when it is wider than the page (the page never does)."""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, fmt: str = ",") -> str:
    """Format a number; anything else (None, missing, non-finite) as '-' or its escaped text."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else _e(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return _e(value)
        return _e(format(value, fmt))
    return _e(value)


def _finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _kv(rows: list[tuple[str, str]]) -> str:
    """A definition list; values are already-escaped HTML."""
    return '<dl class="kv">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _summary(report: dict) -> str:
    data = report.get("data", {})
    tool = report.get("tool", {})
    src = _e(data.get("source", "-"))
    if data.get("synthetic"):
        src += " (random samples: entropies and fidelity say little about real inputs)"
    rows = [("model", _e(report.get("model", "-"))), ("data", src), ("samples", _num(data.get("samples")))]
    if "linearize" in report:
        rows.append(("linearize", _e(report["linearize"])))
    if "remove" in report:
        rows.append(("remove", _num(report["remove"])))
    if "calibration_seconds" in report:
        rows.append(("calibration", f"{_num(report['calibration_seconds'], '.2f')} s"))
    rows.append(("tool", _e(f"{tool.get('name', 'onnx-easier')} {tool.get('version', '')}".strip())))
    return _kv(rows)


def _warnings(report: dict) -> str:
    items = report.get("warnings") or []
    return "".join(f'<p class="warn">{_e(w)}</p>' for w in items)


def _fidelity(report: dict) -> str:
    fid = report.get("fidelity")
    if not fid:
        return ""
    value, tol = _finite(fid.get("value")), _finite(fid.get("tolerance"))
    ok = fid.get("ok", value is not None and tol is not None and value <= tol)
    verdict = '<span class="ok">within tolerance</span>' if ok else '<span class="fail">outside tolerance</span>'
    rows = [
        ("metric", _e(fid.get("metric", "-"))),
        ("loss", f"{_num(fid.get('value'), '.4g') if fid.get('value') is not None else 'not finite'} {verdict}"),
        ("tolerance", _num(fid.get("tolerance"), "g")),
        ("samples", _num(fid.get("samples"))),
    ]
    for key, val in (fid.get("components") or {}).items():
        if isinstance(val, (int, float, str)) and not isinstance(val, bool):
            rows.append((key.replace("_", " "), _num(val, ".4g") if isinstance(val, float) else _num(val)))
    return "<h2>Fidelity against the original</h2>" + _kv(rows)


def _ms(entry: object) -> tuple[float | None, str]:
    """(median ms, escaped text) from a latency entry: a number of ms or a dict with median/p10/p90."""
    if isinstance(entry, dict):
        med = _finite(entry.get("median_ms"))
        text = f"{_num(entry.get('median_ms'), '.4g')} ms"
        if _finite(entry.get("p10_ms")) is not None and _finite(entry.get("p90_ms")) is not None:
            text += f" (p10 {_num(entry['p10_ms'], '.4g')}, p90 {_num(entry['p90_ms'], '.4g')})"
        return med, text
    return _finite(entry), f"{_num(entry, '.4g')} ms"


def _latency(report: dict) -> str:
    lat = report.get("latency_ms")
    if not lat:
        return ""
    before, before_text = _ms(lat.get("before"))
    rows = [("before", before_text)]
    if lat.get("after") is not None:
        after, after_text = _ms(lat["after"])
        rows.append(("after", after_text))
        if before and after:
            rows.append(("after / before", f"{after / before:.3f} ({before / after:.2f}x as fast)"))
    rows += [("provider", _e(lat.get("provider", "-"))), ("batch", _num(lat.get("batch")))]
    return "<h2>Latency (ms per run)</h2>" + _kv(rows)


def _color(action: str) -> str:
    return ACTION_COLORS.get(action, OTHER_COLOR)


def entropy_svg(activations: list[dict]) -> str:
    """Bars of each activation's entropy in graph order; one ``<rect class="act ...">`` per activation, its
    ``<title>`` naming the node. Entropy is in bits (at most 1); the axis grows if a value exceeds 1."""
    n = len(activations)
    if n == 0:
        return "<p>No activations found.</p>"
    left, right, top, bottom, height = 44, 12, 10, 34, 200
    bar = max(3.0, min(28.0, 760.0 / n))
    width = max(left + right + bar * n, MIN_PLOT_WIDTH)  # room for the axis title however few the bars
    values = [_finite(a.get("entropy")) for a in activations]
    ymax = max([1.0] + [v for v in values if v is not None])
    y0 = top + height

    def y(v: float) -> float:
        return y0 - height * v / ymax

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{y0 + bottom}" '
             f'viewBox="0 0 {width:.0f} {y0 + bottom}" role="img" '
             'aria-label="entropy of each activation in graph order">')]
    for i in range(5):  # y grid and ticks
        v = ymax * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right:.1f}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#e9ecef"></line>')
        parts.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    step = max(1, math.ceil(n / 12))
    for i, (a, v) in enumerate(zip(activations, values)):
        x = left + i * bar
        action = str(a.get("action", "kept"))
        h = 0.0 if v is None else y0 - y(v)
        h = max(h, 2.0)  # entropy 0 (the prime candidates) stays visible and hoverable
        label = (f"#{i + 1} {a.get('node', '?')} ({a.get('op', '?')}): entropy "
                 f"{'not measured' if v is None else format(v, '.4f')} bits, {action}")
        klass = "act " + "".join(c if c.isalnum() else "-" for c in action)
        parts.append(f'<rect class="{_e(klass)}" x="{x + bar * 0.1:.1f}" y="{y0 - h:.1f}" width="{bar * 0.8:.1f}" '
                     f'height="{h:.1f}" fill="{_color(action)}"><title>{_e(label)}</title></rect>')
        if i % step == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{y0 + 14}" text-anchor="middle">{i + 1}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right:.1f}" y1="{y0}" y2="{y0}" stroke="#495057"></line>')
    parts.append(f'<text x="{left}" y="{y0 + 30}">activations in graph order (entropy in bits)</text>')
    parts.append("</svg>")
    actions = sorted({str(a.get("action", "kept")) for a in activations})
    legend = "".join(f'<span><span class="swatch" style="background:{_color(k)}"></span>{_e(k)}</span>'
                     for k in actions)
    return f'<div class="plot">{"".join(parts)}</div><p class="legend">{legend}</p>'


def _fidelity_cell(value: object) -> str:
    if isinstance(value, dict):
        value = value.get("value")
    if value is None:
        return ""
    return _num(value, ".4g") if isinstance(value, (int, float)) else _e(value)


def decisions_table(activations: list[dict], decided: bool = True) -> str:
    """One row per activation in graph order: node, op, channels, entropy, rank by entropy, action, fidelity.
    ``decided=False`` (analysis only, no OUT): nothing was decided, so no action and fidelity columns."""
    if not activations:
        return ""
    entropies = [_finite(a.get("entropy")) for a in activations]
    order = sorted(range(len(activations)), key=lambda i: math.inf if entropies[i] is None else entropies[i])
    rank = {i: r for r, i in enumerate(order, 1)}  # ties keep graph order, as the terminal table
    columns = ("#", "activation", "op", "channels", "entropy", "rank") + (
        ("action", "fidelity when tried") if decided else ())
    head = "".join(f"<th>{h}</th>" for h in columns)
    rows = []
    for i, a in enumerate(activations):
        op = str(a.get("op", "-"))
        if a.get("spelling", "op") != "op":
            op += f" ({a['spelling']})"
        action = str(a.get("action", "kept"))
        klass = ' class="linearized"' if decided and action == "linearized" else ""
        decision = f"<td>{_e(action)}</td><td class=\"num\">{_fidelity_cell(a.get('fidelity'))}</td>" if decided else ""
        rows.append(
            f"<tr{klass}><td class=\"num\">{i + 1}</td><td class=\"name\">{_name(a.get('node', '-'))}</td>"
            f"<td>{_e(op)}</td><td class=\"num\">{_num(a.get('channels'))}</td>"
            f"<td class=\"num\">{_num(a.get('entropy'), '.4f')}</td><td class=\"num\">{rank[i]}</td>{decision}</tr>"
        )
    return _table(head, rows)


def _decisions(acts: list[dict], decided: bool) -> str:
    if not acts:
        return ""
    if decided:
        return "<h2>Decisions</h2>" + decisions_table(acts)
    return ("<h2>Activations (analysis only)</h2><p>No output model was asked for, so nothing was linearized or "
            "fused: rank 1 is the activation the optimizer would try first.</p>" + decisions_table(acts, decided=False))


def trials_table(report: dict) -> str:
    """The search trials of each strategy, in the order tried: candidate, fidelity loss, kept or undone, the
    layers re-fitted (relative error before -> after; a head's KL fit in nats) and the trial's note."""
    search = report.get("search")
    if not isinstance(search, dict) or not search:
        return ""
    chosen = (report.get("strategy") or {}).get("chosen")
    head = "".join(f"<th>{h}</th>" for h in ("#", "activations", "fidelity loss", "decision", "re-fit", "note"))
    out = ["<h2>Search trials</h2>"]
    for strategy, s in search.items():
        trials = (s.get("trials") or []) if isinstance(s, dict) else []
        seconds = s.get("seconds") if isinstance(s, dict) else None
        mark = " (written)" if strategy == chosen else ""
        out.append(f"<h3>{_e(strategy)}{_e(mark)}: {len(trials)} trials, {_num(seconds, '.1f')} s</h3>")
        rows = []
        for i, t in enumerate(trials, 1):
            kept = bool(t.get("accepted"))
            refit = "<br>".join(
                f"{_name(r.get('node', '?'))}: {_num(r.get('error_before'), '.3g')} &rarr; "
                f"{_num(r.get('error_after'), '.3g')}{' (KL, nats)' if _is_kl(r) else ''}"
                f"{'' if r.get('accepted') else ' (not kept)'}"
                for r in t.get("refit") or [])
            acts = "<br>".join(_name(a) for a in t.get("activations") or [])
            klass = ' class="linearized"' if kept else ""
            num, name = '<td class="num">', '<td class="name">'
            rows.append(f"<tr{klass}>{num}{i}</td>{name}{acts}</td>{num}{_fidelity_cell(t.get('fidelity'))}</td>"
                        f"<td>{'kept' if kept else 'undone'}</td>{name}{refit}</td>"
                        f"<td class=\"note\">{_e(t.get('note', ''))}</td></tr>")
        out.append(_table(head, rows))
    return "".join(out)


def cost_table(report: dict) -> str:
    """Before (and after, with the ratio) for the six cost fields, then nodes per op type."""
    before, after = report.get("before"), report.get("after")
    if not before:
        return ""
    head = "<th></th><th>before</th>" + ("<th>after</th><th>after / before</th>" if after else "")
    if not after:  # analysis only: there is no "after", so no "before" either
        head = "<th></th><th>count</th>"
    rows = []
    for key in COST_ROWS:
        cells = f"<td>{_e(key.replace('_', ' '))}</td><td class=\"num\">{_num(before.get(key))}</td>"
        if after:
            b, a = _finite(before.get(key)), _finite(after.get(key))
            r = f"{a / b:.2f}" if a is not None and b else "-"
            cells += f"<td class=\"num\">{_num(after.get(key))}</td><td class=\"num\">{r}</td>"
        rows.append(f"<tr>{cells}</tr>")
    b_ops, a_ops = before.get("per_op") or {}, (after or {}).get("per_op") or {}
    for op in sorted(set(b_ops) | set(a_ops)):
        cells = f"<td>&nbsp;&nbsp;{_e(op)}</td><td class=\"num\">{_num(b_ops.get(op, 0))}</td>"
        if after:
            cells += f"<td class=\"num\">{_num(a_ops.get(op, 0))}</td><td></td>"
        rows.append(f'<tr class="op">{cells}</tr>')
    title = "Model before / after" if after else "Model"
    return f"<h2>{title}</h2>" + _table(head, rows)


def _exactness_and_passes(report: dict) -> str:
    out = []
    exact = report.get("exactness")
    if exact:
        out.append(f"<p>Fusions verified exact: max relative error {_num(exact.get('max_relative_error'), '.2e')} "
                   f"on {_num(exact.get('samples'))} samples (rtol {_num(exact.get('rtol'), 'g')}).</p>")
    passes = report.get("passes")
    if passes:
        runs: dict[str, list[dict]] = {}
        for p in passes:  # one line per pass, its runs over the rounds together
            runs.setdefault(str(p.get("name", "?")), []).append(p)
        items = "".join(
            f"<li><strong>{_e(name)}</strong>: "
            + (f"{sum(int(p.get('changed') or 0) for p in ps)} rewrites" if any(p.get("changed") for p in ps)
               else "no rewrite")
            + f" in {len(ps)} run{'s' if len(ps) > 1 else ''}"
            + "".join(f"; {_e(n)}" for p in ps for n in (p.get("notes") or [])) + "</li>"
            for name, ps in runs.items()
        )
        searched = report.get("mode") == "tolerance" and any(
            a.get("action") == "linearized" for a in report.get("activations") or [])
        scope = (" of the exact fusions (the fusions after each linearization are in the search trials)"
                 if searched else "")
        out.append(f"<h2>Passes{_e(scope)}</h2><ul>{items}</ul>")
    return "".join(out)


def render_html(report: dict) -> str:
    """The whole page as a string."""
    acts = report.get("activations") or []
    decided = "after" in report  # without OUT the model is only analysed: nothing is linearized or fused
    title = f"onnx-easier report: {report.get('model', '')}"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _summary(report),
        _warnings(report),
        _fidelity(report),
        _latency(report),
        f"<h2>EASIER entropy of each activation ({len(acts)})</h2>",
        entropy_svg(acts if decided else [{**a, "action": "not decided"} for a in acts]),
        _decisions(acts, decided),
        cost_table(report),
        trials_table(report),
        _exactness_and_passes(report),
        "</body></html>\n",
    ])


def write_html(report: dict, path: str | os.PathLike) -> None:
    """Write the page atomically (model_io.write_atomically)."""
    write_atomically(path, render_html(report).encode("utf-8"))
    log.info("wrote the HTML report to %s (%d activations)", path, len(report.get("activations") or []))


def _is_kl(record: dict) -> bool:
    """A head's KL re-fit (its errors are mean KL in nats, not relative errors)."""
    return str(record.get("note", "")).startswith("KL re-fit")
