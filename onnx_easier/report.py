"""Human tables (rich) and the JSON report file. Rendering only: the report dict is built by api.py."""
from __future__ import annotations

import json
import os

from rich.console import Console
from rich.table import Table

from onnx_easier.model_io import write_atomically

_COST_ROWS = ("nodes", "compute_nodes", "activations", "depth", "params", "macs")


def entropy_table(report: dict) -> Table:
    """Activations sorted by entropy (ties in graph order): activation, op, channels, entropy, action. Without an
    "after" (analysis only) nothing was decided: no action column, and the title says so."""
    decided = "after" in report
    title = f"EASIER entropy ({report['data']['samples']} samples from {report['data']['source']})"
    t = Table(title=title if decided else f"{title}; analysis only, nothing linearized")
    columns = (("#", "right"), ("activation", "left"), ("op", "left"), ("channels", "right"), ("entropy", "right"))
    for col, justify in columns + ((("action", "left"),) if decided else ()):
        t.add_column(col, justify=justify)
    order = sorted(range(len(report["activations"])), key=lambda i: report["activations"][i]["entropy"])
    for rank, i in enumerate(order, 1):
        a = report["activations"][i]
        op = a["op"] if a.get("spelling", "op") == "op" else f"{a['op']} ({a['spelling']})"
        cells = [str(rank), a["node"], op, str(a["channels"]), f"{a['entropy']:.4f}"]
        t.add_row(*cells, *([a["action"]] if decided else []))
    return t


def cost_table(report: dict) -> Table:
    """Before/after: nodes, compute nodes, activations, depth, params, MACs, then nodes per op type."""
    before, after = report["before"], report.get("after")
    t = Table(title="Model before / after" if after is not None else "Model")
    t.add_column("")
    t.add_column("before" if after is not None else "count", justify="right")
    if after is not None:
        t.add_column("after", justify="right")
        t.add_column("ratio", justify="right")
    for key in _COST_ROWS:
        row = [key.replace("_", " "), f"{before[key]:,}"]
        if after is not None:
            ratio = f"{after[key] / before[key]:.2f}" if before[key] else "-"
            row += [f"{after[key]:,}", ratio]
        t.add_row(*row)
    ops = sorted(set(before.get("per_op", {})) | set((after or {}).get("per_op", {})))
    for op in ops:
        row = [f"  {op}", str(before.get("per_op", {}).get(op, 0))]
        if after is not None:
            row += [str(after.get("per_op", {}).get(op, 0)), ""]
        t.add_row(*row, style="dim")
    return t


def print_report(report: dict, console: Console) -> None:
    """The terminal summary the CLI prints."""
    console.print(entropy_table(report))
    console.print(cost_table(report))
    exact = report.get("exactness")
    if exact and exact.get("note"):
        console.print(f"exact fusions: {exact['note']}")
    elif exact:
        console.print(f"fusions exact against {exact['reference']}: max relative error "
                      f"{exact['max_relative_error']:.2e} on {exact['samples']} samples (rtol {exact['rtol']:g})")
    fid = report.get("fidelity")
    if fid and not fid.get("note"):
        console.print(f"fidelity ({fid['metric']}): loss {fid['value']:.4f} <= tolerance {fid['tolerance']:g} "
                      f"on {fid['samples']} held-out samples; {report.get('trials', 0)} trials, "
                      f"strategy {report['strategy']['chosen']}")
    lat = report.get("latency_ms")
    if lat and lat.get("before") is not None and lat.get("after") is not None:
        what = lat.get("label") or f"{lat['provider']} provider, batch {lat['batch']}"
        console.print(f"latency ({what}): {lat['before']:.3f} ms -> {lat['after']:.3f} ms ({lat['ratio']:.2f}x)")
    ver = report.get("verification")
    if ver:
        console.print(f"written model reloaded and verified: {ver.get('metric')} {ver.get('value', 0):.3g} "
                      f"({'ok' if ver.get('ok') else 'FAILED'})")
    for w in report.get("warnings", []):
        console.print(f"warning: {w}", style="yellow")


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report atomically (model_io.write_atomically)."""
    write_atomically(path, (json.dumps(report, indent=2) + "\n").encode())
