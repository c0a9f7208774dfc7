"""The zoo's default-mode figures for the README: each architecture of tests/zoo_nets.py (the sizes
tests/test_zoo.py uses), exported fresh, run through ``onnx-easier IN OUT --data calib.npz`` (random calibration
data, the default tolerance and time limit unless given), one row per model and exporter.

    python tools/bench_zoo.py [--exporters ts,dynamo] [--samples 48] [--time-limit 600] [--only resnet18,vit]

Columns: activations linearized / found, compute nodes before -> after, depth before -> after, fidelity loss
(metric), latency ratio after / before (the tool's own interleaved measurement, CPU, batch 1), seconds of the run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_zoo

from onnx_easier.cli import main as easier


def row(name: str, exporter: str, samples: int, time_limit: str, folder: Path) -> dict:
    case = test_zoo.CASES[name]
    src = folder / f"{name}_{exporter}.onnx"
    test_zoo._export(case, exporter, src)
    data = folder / f"{name}.npz"
    np.savez(data, **case.data(samples))
    out, rep = folder / f"{name}_{exporter}_easier.onnx", folder / f"{name}_{exporter}.json"
    t0 = time.perf_counter()
    code = easier([str(src), str(out), "--data", str(data), "--report", str(rep), "--time-limit", time_limit, "-q"])
    seconds = time.perf_counter() - t0
    if code != 0:
        return {"model": name, "exporter": exporter, "exit": code, "seconds": seconds}
    r = json.loads(rep.read_text())
    acts = r["activations"]
    return {"model": name, "exporter": exporter, "exit": code, "seconds": seconds,
            "linearized": sum(a["action"] == "linearized" for a in acts), "activations": len(acts),
            "compute": (r["before"]["compute_nodes"], r["after"]["compute_nodes"]),
            "depth": (r["before"]["depth"], r["after"]["depth"]),
            "fidelity": (r["fidelity"]["metric"], r["fidelity"]["value"]), "ratio": r["latency_ms"]["ratio"],
            "cut_short": r.get("time_limit", {}).get("cut_short", False)}


def table(rows: list[dict]) -> str:
    lines = ["| model | exporter | linearized | compute nodes | depth | fidelity loss | latency ratio | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit"] != 0:
            lines.append(f"| {r['model']} | {r['exporter']} | exit {r['exit']} | | | | | {r['seconds']:.0f} |")
            continue
        cut = " (time limit)" if r["cut_short"] else ""
        lines.append(f"| {r['model']} | {r['exporter']} | {r['linearized']}/{r['activations']}{cut} | "
                     f"{r['compute'][0]} -> {r['compute'][1]} | {r['depth'][0]} -> {r['depth'][1]} | "
                     f"{r['fidelity'][1]:.4f} ({r['fidelity'][0]}) | {r['ratio']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="ts,dynamo")
    p.add_argument("--samples", type=int, default=test_zoo.SAMPLES)
    p.add_argument("--time-limit", default="600")
    p.add_argument("--only", default="", help="comma-separated model names (default: all)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    names = [n for n in test_zoo.CASES if not args.only or n in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for exporter in args.exporters.split(","):
                if exporter not in test_zoo.CASES[name].exporters:
                    continue
                rows.append(row(name, exporter, args.samples, args.time_limit, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
