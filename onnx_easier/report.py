"""Human tables (rich) and the JSON report file. Rendering only: the report dict is built by api.py."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

_COST_ROWS = ("nodes", "compute_nodes", "activations", "depth", "params", "macs")


def entropy_table(report: dict) -> Table:
    """Activations sorted by entropy (ties in graph order): activation, op, channels, entropy, action."""
    t = Table(title=f"EASIER entropy ({report['data']['samples']} samples from {report['data']['source']})")
    for col, justify in (("#", "right"), ("activation", "left"), ("op", "left"), ("channels", "right"),
                         ("entropy", "right"), ("action", "left")):
        t.add_column(col, justify=justify)
    order = sorted(range(len(report["activations"])), key=lambda i: report["activations"][i]["entropy"])
    for rank, i in enumerate(order, 1):
        a = report["activations"][i]
        op = a["op"] if a.get("spelling", "op") == "op" else f"{a['op']} ({a['spelling']})"
        t.add_row(str(rank), a["node"], op, str(a["channels"]), f"{a['entropy']:.4f}", a["action"])
    return t


def cost_table(report: dict) -> Table:
    """Before/after: nodes, compute nodes, activations, depth, params, MACs, then nodes per op type."""
    before, after = report["before"], report.get("after")
    t = Table(title="Model before / after")
    t.add_column("")
    t.add_column("before", justify="right")
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
    if exact:
        console.print(f"fusions verified exact: max relative error {exact['max_relative_error']:.2e} "
                      f"on {exact['samples']} samples (rtol {exact['rtol']:g})")


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
