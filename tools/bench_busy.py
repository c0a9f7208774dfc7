"""Latency decisions on an idle and on a busy machine: the noise of each clock, and what the default run keeps.

    python tools/bench_busy.py                        # 5 repeats of each, idle and busy
    python tools/bench_busy.py --repeats 3 --json busy.json

"Busy" is one spinning Python process per core (``tests/test_latency.busy_processes``) for the whole of each
measurement or run; "idle" is whatever else the machine runs (the load average is printed with each table).

1. **Noise**: ``measure_latency`` of a model against a copy of itself (``reference="original"``, the default run's
   settings: cpu provider, one thread, batch 1), on both clocks: the spread (10th-90th percentile) of the per-round
   ratios copy / original, the median ratio and its 99% sign-test interval, and the rounds the stopping rule took.
   Models: ``tests/test_latency.merge_model`` and ``models/mobilenetv2_digits.onnx`` (random input).
2. **Decision**: the default ``optimize`` on ``merge_model(wide=W)`` for each ``--wide`` W (64 random samples;
   relu1 linearized merges conv1 and conv2: 1/(W+2) fewer MACs, 10% at W=8, 5.6% at W=16): which model it wrote,
   its ratio in thread CPU time (the decision's basis) and in wall time, and whether the previous rule (medians of
   wall time, 3% margin, from the report's candidates) would have kept a linearized model from the same
   measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_latency import busy_processes, merge_model

from onnx_easier.api import NOISE_MARGIN, optimize
from onnx_easier.latency import measure_latency, paired_ratio, unresolved


@contextmanager
def load(busy: bool):
    """Spin one process per core while the block runs (``busy``), else nothing."""
    procs = busy_processes() if busy else []
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def noise(name: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray], busy: bool) -> dict:
    """One interleaved measurement of ``model`` against a copy of itself: per clock, the per-round ratio spread,
    the median ratio and its interval."""
    with load(busy):
        stats = measure_latency({"original": model, "copy": model.SerializeToString()}, feeds,
                                reference="original", margin=NOISE_MARGIN)
    out = {"model": name, "busy": busy, "rounds": stats["original"].rounds,
           "unresolved": unresolved(stats, "original", NOISE_MARGIN)}
    for basis in ("thread-cpu", "wall"):
        r = paired_ratio(stats["copy"], stats["original"], basis)
        per = np.asarray(stats["copy"].per_round(basis)) / np.asarray(stats["original"].per_round(basis))
        p10, p90 = np.percentile(per, [10, 90])
        out[basis] = {"ratio": r.value, "interval": [r.low, r.high], "p10": float(p10), "p90": float(p90),
                      "median_ms": stats["original"].figure_ms(basis)}
    return out


def wall_rule_keeps(candidates: dict[str, dict]) -> bool:
    """Whether the previous rule (wall medians: not over 1.03x the original, within 3% of the fastest) kept a
    search result."""
    base = candidates["original"]["median_ms"]
    fast = {k: v["median_ms"] for k, v in candidates.items()
            if k != "original" and v["median_ms"] <= base * (1 + NOISE_MARGIN)}
    if not fast:
        return False
    best = min(fast.values())
    return any(k.startswith("search:") and v <= best * (1 + NOISE_MARGIN) for k, v in fast.items())


def decision(busy: bool, wide: int) -> dict:
    """One default run on merge_model(wide=wide): what it wrote and the figures it decided on."""
    x = np.random.default_rng(1).uniform(0, 1, size=(64, 64, 8, 8)).astype(np.float32)
    with load(busy):
        t0 = time.perf_counter()
        r = optimize(merge_model(wide=wide), {"x": x})
        seconds = time.perf_counter() - t0
    lat = r.report["latency_ms"]
    return {"busy": busy, "wide": wide, "seconds": seconds, "chosen": r.report["strategy"]["chosen"],
            "linearized": sum(a["action"] == "linearized" for a in r.report["activations"]),
            "ratio_cpu": lat["ratio"], "interval_cpu": lat["interval"], "ratio_wall": lat["wall"]["ratio"],
            "rounds": lat["rounds"], "unresolved": lat["unresolved"],
            "wall_rule_keeps": wall_rule_keeps(lat["candidates"])}


def _load_average() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wide", default="8,16", help="merge_model widths for the decision runs (comma-separated)")
    ap.add_argument("--skip-noise", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    mnv2 = onnx.load(str(ROOT / "models" / "mobilenetv2_digits.onnx"))
    models = {"merge_model": (merge_model(), {"x": np.random.default_rng(0).uniform(0, 1, (1, 64, 8, 8))
                                                .astype(np.float32)}),
              "mobilenetv2_digits": (mnv2, {"x": np.random.default_rng(0).normal(size=(1, 1, 16, 16))
                                            .astype(np.float32)})}
    print(f"cores: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
          f"{_load_average()}")
    rows = []
    for name, (model, feeds) in models.items() if not args.skip_noise else ():
        for busy in (False, True):
            rows += [noise(name, model, feeds, busy) for _ in range(args.repeats)]
    print(f"\nnoise: copy / original, {args.repeats} measurements each ({_load_average()})\n")
    print("| model | machine | clock | per-round ratio p10-p90 | median ratio (range over measurements) "
          "| widest 99% interval | rounds |")
    print("|---|---|---|---|---|---|---|")
    for name in models if not args.skip_noise else ():
        for busy in (False, True):
            sel = [r for r in rows if r["model"] == name and r["busy"] == busy]
            for basis in ("thread-cpu", "wall"):
                b = [r[basis] for r in sel]
                print(f"| {name} | {'busy' if busy else 'idle'} | {basis} | "
                      f"{min(x['p10'] for x in b):.3f}-{max(x['p90'] for x in b):.3f} | "
                      f"{min(x['ratio'] for x in b):.3f}-{max(x['ratio'] for x in b):.3f} | "
                      f"{min(x['interval'][0] for x in b):.3f}-{max(x['interval'][1] for x in b):.3f} | "
                      f"{min(r['rounds'] for r in sel)}-{max(r['rounds'] for r in sel)} |")
    widths = [int(w) for w in args.wide.split(",")]
    runs = [decision(busy, w) for w in widths for busy in (False, True) for _ in range(args.repeats)]
    print(f"\ndecision: default run on merge_model, {args.repeats} runs each ({_load_average()})\n")
    print("| wide (MACs saved) | machine | merged model written | ratio, thread CPU | ratio, wall "
          "| wall-median rule would keep it | rounds | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for w, busy in ((w, busy) for w in widths for busy in (False, True)):
        sel = [r for r in runs if r["busy"] == busy and r["wide"] == w]
        kept = sum(r["linearized"] == 1 for r in sel)
        print(f"| {w} ({1 / (w + 2):.1%}) | {'busy' if busy else 'idle'} | {kept}/{len(sel)} | "
              f"{min(r['ratio_cpu'] for r in sel):.3f}-{max(r['ratio_cpu'] for r in sel):.3f} | "
              f"{min(r['ratio_wall'] for r in sel):.3f}-{max(r['ratio_wall'] for r in sel):.3f} | "
              f"{sum(r['wall_rule_keeps'] for r in sel)}/{len(sel)} | "
              f"{min(r['rounds'] for r in sel)}-{max(r['rounds'] for r in sel)} | "
              f"{min(r['seconds'] for r in sel):.1f}-{max(r['seconds'] for r in sel):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"noise": rows, "decision": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
