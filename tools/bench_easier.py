"""Benchmark of the budgeted loop: ``optimize(model, calib, tolerance=0.01)`` with and without the re-fit.

    python tools/bench_easier.py                       # the six example models
    python tools/bench_easier.py --models ffn_digits --json easier.json --trials

Per model, ``optimize`` runs twice on the calibration file (default strategy ``auto``): re-fit on (the default)
and ``refit=False`` (and a third time for T6, below). For each result:

- activations linearized / total, and the tool's fidelity loss on its own held-out calibration samples;
- TEST accuracy (%) of the original and of the result on ``models/digits<R>_test.npz``, computed here with ONNX
  Runtime (optimizations off) as argmax of the logits against the labels, which the tool never sees; the
  accuracy loss in points;
- compute nodes before -> after;
- latency ratio after / before at batch 1: the tool's own (``report["latency_ms"]["ratio"]``) and re-measured
  here with ``measure_latency`` (threads=1, interleaved: original, both results and a copy of the original in one
  measurement; the copy's ratio is the noise floor);
- wall time of the ``optimize`` call.

Then the targets of the issues, each PASS or FAIL as measured (speed-ups from the re-measured ratios):

- T1 tolerance 0.01 loses <= 1.5 accuracy points (every model, every run);
- T2 at least 1/4 of the activations linearized on each 16x16 digits model (vgg, resnet, mobilenetv2, ffn; re-fit);
- T3 no result slower than its original: re-measured ratio <= 1 + max(0.01, |1 - copy ratio|), the copy of the
  original measuring the timing noise (a result with the original's very structure can measure 1.003);
- T4 mobilenetv2_wide_digits >= 1.3x faster (issue 5) and >= 1.5x faster at <= 1 point lost (issue 6; re-fit);
- T5 ffn_wide_digits >= 1.15x faster at batch 1 (re-fit);
- T6 re-fit linearizes >= 2x as many activations as ``refit=False``, with no more accuracy loss (every model).
  When the default re-fit run linearizes more than twice the ``refit=False`` count N, a third run,
  ``refit-matched`` (re-fit, ``max_remove=2N``), shows the re-fit at exactly twice the count; T6 is then checked
  for both runs (one row each). The default run spends the whole fidelity budget, the ``refit=False`` run stops
  where its next candidate overshoots it: the matched run compares the two at the count the target names. With
  N = 0 the matched run is the exact model (its row says "0 vs 0": met without linearizing anything).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_easier.api import optimize
from onnx_easier.errors import OnnxEasierError
from onnx_easier.latency import measure_latency

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
DIGITS = ("vgg_digits", "resnet_digits", "mobilenetv2_digits", "ffn_digits")
MODELS = (*DIGITS, "mobilenetv2_wide_digits", "ffn_wide_digits")
TOLERANCE = 0.01
RUNS = {"refit": True, "no-refit": False}


def resolution(model: onnx.ModelProto) -> int:
    """Side R of the model's ``x [N, 1, R, R]`` input (selects the digits<R> data files)."""
    return int(model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value)


@dataclass
class DigitsCase:
    """One example model with its data files: the calibration file the tool reads, the test split it never sees,
    and the original's test accuracy (%) and wrong samples."""

    path: Path
    original: onnx.ModelProto
    calib: Path
    x_test: np.ndarray
    y_test: np.ndarray
    accuracy: float
    wrong: list[int]


def digits_case(name: str, models_dir: Path) -> DigitsCase:
    """Load ``models_dir/<name>.onnx`` and its ``digits<R>_{calib,test}.npz`` (R: its input side)."""
    path = models_dir / f"{name}.onnx"
    original = onnx.load(str(path))
    r = resolution(original)
    with np.load(models_dir / f"digits{r}_test.npz") as test:
        x_test, y_test = test["x"], test["y"]
    acc, wrong = accuracy(original, x_test, y_test)
    return DigitsCase(path, original, models_dir / f"digits{r}_calib.npz", x_test, y_test, acc, wrong)


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> tuple[float, list[int]]:
    """Top-1 accuracy (%) of ``model``'s first output on ``x`` (ORT, optimizations off), and the indices of the
    samples it gets wrong."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
    right = logits.argmax(axis=1) == y
    return float(right.mean() * 100), np.flatnonzero(~right).tolist()


def search_summary(report: dict) -> list[dict]:
    """The search trials, flattened: strategy, candidate, loss, kept, worst re-fit error after/before."""
    rows = []
    for strategy, s in report.get("search", {}).items():
        for t in s["trials"]:
            refits = t.get("refit", [])
            rows.append({"strategy": strategy, "activations": t["activations"], "fidelity": t["fidelity"],
                         "accepted": t["accepted"], "compute_nodes": t["compute_nodes"], "macs": t["macs"],
                         "refit": [(r["node"], r["error_before"], r["error_after"], r["accepted"]) for r in refits],
                         "note": t.get("note", "")})
    return rows


def bench_model(name: str, models_dir: Path, budget: float) -> dict:
    case = digits_case(name, models_dir)
    path, original, calib, x_test, y_test, acc_before = (case.path, case.original, case.calib, case.x_test,
                                                         case.y_test, case.accuracy)

    runs: dict[str, dict] = {}
    models: dict[str, onnx.ModelProto] = {"original": original}
    plan: list[tuple[str, dict]] = [(label, {"refit": refit}) for label, refit in RUNS.items()]
    while plan:
        label, kwargs = plan.pop(0)
        t0 = time.perf_counter()
        try:
            result = optimize(path, calib, tolerance=TOLERANCE, **kwargs)
        except OnnxEasierError as exc:  # the tool refused or failed: a measured outcome, every target FAILs
            runs[label] = {"error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - t0}
            continue
        wall = time.perf_counter() - t0
        rep = result.report
        acts = rep["activations"]
        acc, wrong = accuracy(result.model, x_test, y_test)
        models[label] = result.model
        runs[label] = {
            "linearized": sum(a["action"] == "linearized" for a in acts),
            "activations": len(acts),
            "linearized_names": [a["node"] for a in acts if a["action"] == "linearized"],
            "strategy": rep["strategy"]["chosen"],
            "fidelity": rep["fidelity"]["value"],
            "fidelity_metric": rep["fidelity"]["metric"],
            "test_accuracy": acc,
            "accuracy_loss": acc_before - acc,
            "test_errors": wrong,
            "compute_nodes": [rep["before"]["compute_nodes"], rep["after"]["compute_nodes"]],
            "depth": [rep["before"]["depth"], rep["after"]["depth"]],
            "macs": [rep["before"]["macs"], rep["after"]["macs"]],
            "tool_latency_ratio": rep["latency_ms"]["ratio"],
            "tool_latency_ms": [rep["latency_ms"]["before"], rep["latency_ms"]["after"]],
            "tool_candidates_ms": {k: v["median_ms"] for k, v in rep["latency_ms"]["candidates"].items()},
            "warnings": rep.get("warnings", []),
            "wall_s": wall,
            "trials": search_summary(rep),
        }
        if label == "no-refit" and "error" not in runs.get("refit", {"error": 1}):
            matched = 2 * runs[label]["linearized"]
            if matched < runs["refit"]["linearized"]:
                plan.append(("refit-matched", {"refit": True, "max_remove": matched}))
    models["copy"] = original
    feeds = {original.graph.input[0].name: np.ascontiguousarray(x_test[:1])}
    stats = measure_latency(models, feeds, threads=1, budget_s=budget)
    base = stats["original"].median_ms
    for label, run in runs.items():
        if label in models:
            run["latency_ratio"] = stats[label].median_ms / base
    return {"model": name, "test_accuracy": acc_before, "latency_ms": base,
            "noise_ratio": stats["copy"].median_ms / base, "runs": runs}


@dataclass
class Check:
    target: str
    model: str
    run: str
    measured: str
    ok: bool


def checks(results: list[dict]) -> list[Check]:
    """The targets of the issues (module doc), as measured; nothing here is tuned to the results. A target that
    needs a run whose ``optimize`` raised fails."""
    out: list[Check] = []

    def check(target: str, name: str, runs: dict, labels: tuple[str, ...], measure) -> None:
        failed = [label for label in labels if "error" in runs[label]]
        if failed:
            out.append(Check(target, name, "+".join(labels), f"optimize raised ({'+'.join(failed)})", False))
            return
        measured, ok = measure(*(runs[label] for label in labels))
        out.append(Check(target, name, "+".join(labels), measured, ok))

    for res in results:
        name, runs, noise = res["model"], res["runs"], res["noise_ratio"]
        for label in runs:
            check("T1 loss <= 1.5 pt", name, runs, (label,),
                  lambda r: (f"{r['accuracy_loss']:+.2f} pt", r["accuracy_loss"] <= 1.5))
            check("T3 not slower", name, runs, (label,),
                  lambda r, noise=noise: (f"ratio {r['latency_ratio']:.3f} (copy {noise:.3f})",
                                          r["latency_ratio"] <= 1.0 + max(0.01, abs(1.0 - noise))))
        if name in DIGITS:
            check("T2 >= 1/4 linearized", name, runs, ("refit",),
                  lambda r: (f"{r['linearized']}/{r['activations']}", 4 * r["linearized"] >= r["activations"]))
        if name == "mobilenetv2_wide_digits":
            check("T4a >= 1.3x faster", name, runs, ("refit",),
                  lambda r: (f"{1 / r['latency_ratio']:.2f}x", 1 / r["latency_ratio"] >= 1.3))
            check("T4b >= 1.5x faster at <= 1 pt", name, runs, ("refit",),
                  lambda r: (f"{1 / r['latency_ratio']:.2f}x, {r['accuracy_loss']:+.2f} pt",
                             1 / r["latency_ratio"] >= 1.5 and r["accuracy_loss"] <= 1.0))
        if name == "ffn_wide_digits":
            check("T5 >= 1.15x faster (b1)", name, runs, ("refit",),
                  lambda r: (f"{1 / r['latency_ratio']:.2f}x", 1 / r["latency_ratio"] >= 1.15))
        check("T6 refit >= 2x linearized, no more loss", name, runs, ("refit", "no-refit"), _t6)
        if "refit-matched" in runs:
            check("T6 refit >= 2x linearized, no more loss", name, runs, ("refit-matched", "no-refit"), _t6)
    return out


def _t6(rf: dict, nr: dict) -> tuple[str, bool]:
    """Literal: at least twice the count and no more loss. The text adds the paired view of the same test samples:
    how many only the re-fit run gets wrong / only the no-refit run gets wrong, and McNemar's exact two-sided p
    (how likely a split at least this uneven is if both models were equally accurate)."""
    only_rf = len(set(rf["test_errors"]) - set(nr["test_errors"]))
    only_nr = len(set(nr["test_errors"]) - set(rf["test_errors"]))
    return (f"{rf['linearized']} vs {nr['linearized']}, {rf['accuracy_loss']:+.2f} vs {nr['accuracy_loss']:+.2f} pt"
            + (" (0 vs 0)" if rf["linearized"] == nr["linearized"] == 0 else "")
            + f"; wrong only with re-fit / only without: {only_rf}/{only_nr}, "
            f"McNemar p {mcnemar(only_rf, only_nr):.2f}",
            rf["linearized"] >= 2 * nr["linearized"] and rf["accuracy_loss"] <= nr["accuracy_loss"])


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of ``b`` vs ``c`` discordant pairs: 2 * P(Binomial(b + c, 1/2) <= min(b, c)),
    at most 1 (1 when there are none)."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _num(v: float | None, spec: str) -> str:
    return "inf" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    head = ["model", "run", "linearized", "fidelity loss", "test acc. before -> after (%)", "acc. loss (pt)",
            "compute nodes", "depth", "latency ratio b1 (tool)", "latency ratio b1 (re-measured)", "optimize (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for label, run in res["runs"].items():
            if "error" in run:
                lines.append(f"| {res['model']} | {label} | error: {run['error']} |" + " |" * (len(head) - 3))
                continue
            lines.append(
                f"| {res['model']} | {label} ({run['strategy']}) | {run['linearized']}/{run['activations']} | "
                f"{_num(run['fidelity'], '.4f')} | {res['test_accuracy']:.2f} -> {run['test_accuracy']:.2f} | "
                f"{run['accuracy_loss']:+.2f} | {run['compute_nodes'][0]} -> {run['compute_nodes'][1]} | "
                f"{run['depth'][0]} -> {run['depth'][1]} | {run['tool_latency_ratio']:.3f} | "
                f"{run['latency_ratio']:.3f} | {run['wall_s']:.1f} |"
            )
    return "\n".join(lines)


def check_table(found: list[Check]) -> str:
    lines = ["| target | model | run | measured | result |", "|---|---|---|---|---|"]
    lines += [f"| {c.target} | {c.model} | {c.run} | {c.measured} | {'PASS' if c.ok else 'FAIL'} |" for c in found]
    return "\n".join(lines)


def trials_text(results: list[dict]) -> str:
    lines = []
    for res in results:
        for label, run in res["runs"].items():
            if "error" in run:
                lines.append(f"\n{res['model']} [{label}] error: {run['error']}")
                continue
            lines.append(f"\n{res['model']} [{label}] chosen {run['strategy']}: linearized "
                         f"{run['linearized_names']}; tool candidates ms {run['tool_candidates_ms']}")
            for t in run["trials"]:
                refit = "; ".join(f"{n} {b:.4f}->{a:.4f}{'' if ok else ' (rejected)'}" for n, b, a, ok in t["refit"])
                lines.append(f"  {t['strategy']:7s} {'+'.join(t['activations'])}: loss {t['fidelity']:.4f} "
                             f"{'kept' if t['accepted'] else 'undone'} cn={t['compute_nodes']} macs={t['macs']}"
                             + (f" refit[{refit}]" if refit else "") + (f" note: {t['note']}" if t["note"] else ""))
    return "\n".join(lines)


def model_parser(description: str) -> argparse.ArgumentParser:
    """The options the digits benchmarks share: --models, --models-dir, --json; logging at errors only."""
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME", help="models in models/")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    return parser


def per_model(names: Sequence[str], run: Callable[[str], dict]) -> list[dict]:
    """``run(name)`` for each model in turn, its wall time printed on stderr."""
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(run(name))
        print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=4.0, metavar="S",
                        help="seconds of the interleaved re-measurement per model (default 4)")
    parser.add_argument("--trials", action="store_true", help="also print every search trial")
    args = parser.parse_args(argv)

    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 intra-op thread; re-measured latency = median "
          f"of interleaved rounds, {args.budget:g} s per model, batch 1", file=sys.stderr)
    results = per_model(args.models, lambda name: bench_model(name, args.models_dir, args.budget))
    found = checks(results)
    print(table(results))
    print()
    print(check_table(found))
    print(f"\n{sum(c.ok for c in found)}/{len(found)} targets met")
    if args.json:
        args.json.write_text(json.dumps({"tolerance": TOLERANCE, "threads": 1, "budget_s": args.budget,
                                         "onnxruntime": ort.__version__, "results": results,
                                         "checks": [c.__dict__ for c in found]}, indent=2, default=str))
    if args.trials:
        print(trials_text(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
