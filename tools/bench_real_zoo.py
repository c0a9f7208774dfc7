"""The default mode on each architecture of tests/zoo_arch.py at the sizes tests/test_real_zoo.py uses: export
fresh, run ``onnx-easier IN OUT --data calib.npz --report R.json`` (the tool's defaults: tolerance 0.01, strategy
auto, affine, re-fit), one markdown row per model and exporter.

    python tools/bench_real_zoo.py [--exporters ts,dynamo] [--samples 32] [--time-limit 120] [--max-remove K]
                                   [--only resnet18,vit] [--json rows.json]

Columns: activations linearized / found (``time limit`` when the search was cut short), compute nodes and depth
before -> after, fidelity loss (metric), latency ratio after / before (the tool's own interleaved measurement, CPU,
batch 1), seconds of the run; ``exit N`` and the error's first line when the run fails.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import test_real_zoo as zoo
from bench_zoo import report_summary

from onnx_easier.cli import main as easier


def row(name: str, exporter: str, samples: int, extra: list[str], folder: Path) -> dict:
    src = folder / f"{name}_{exporter}.onnx"
    zoo.export(zoo.CASES[name], exporter, src)
    data = folder / f"{name}.npz"
    np.savez(data, **zoo.CASES[name].data(samples))
    out, rep = folder / f"{name}_{exporter}_easier.onnx", folder / f"{name}_{exporter}.json"
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = easier([str(src), str(out), "--data", str(data), "--report", str(rep), "-q", *extra])
    base = {"model": name, "exporter": exporter, "exit": code, "seconds": time.perf_counter() - t0}
    if code != 0:
        return {**base, "error": next((line for line in err.getvalue().splitlines() if line.strip()), "")[:200]}
    return {**base, **report_summary(json.loads(rep.read_text()))}


def table(rows: list[dict]) -> str:
    lines = ["| model | exporter | linearized | compute nodes | depth | fidelity loss | latency ratio | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit"] != 0:
            lines.append(f"| {r['model']} | {r['exporter']} | exit {r['exit']}: {r['error']} | | | | | "
                         f"{r['seconds']:.0f} |")
            continue
        cut = " (time limit)" if r["cut_short"] else ""
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['model']} | {r['exporter']} | {r['linearized']}/{r['activations']}{cut} | "
                     f"{r['compute'][0]} -> {r['compute'][1]} | {r['depth'][0]} -> {r['depth'][1]} | "
                     f"{r['fidelity'][1]:.4f} ({r['fidelity'][0]}) | {ratio} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default=",".join(zoo.EXPORTERS))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--time-limit", default="120", help="the tool's --time-limit (seconds; 0: none)")
    p.add_argument("--max-remove", help="the tool's --max-remove (default: none)")
    p.add_argument("--only", default="", help="comma-separated model names (default: all)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in zoo.CASES]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(zoo.CASES)}")
    extra = ["--time-limit", args.time_limit] + (["--max-remove", args.max_remove] if args.max_remove else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in only or list(zoo.CASES):
            for exporter in args.exporters.split(","):
                rows.append(row(name, exporter, args.samples, extra, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
