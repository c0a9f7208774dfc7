"""Trade-off curves of the budgeted loop with and without the re-fit: activations linearized against test loss.

    python tools/bench_tradeoff.py                                    # the six example models, 4 tolerances
    python tools/bench_tradeoff.py --models resnet_digits --tolerances 0.005 0.01 0.02 --json tradeoff.json

Per model and tolerance, ``optimize(model, calib, tolerance=t)`` runs with the re-fit (the default) and with
``refit=False``; for each result: activations linearized, the tool's fidelity loss on its held-out calibration
samples, the TEST accuracy loss in points on ``models/digits<R>_test.npz`` (labels the tool never sees; ORT,
optimizations off) and how many test samples the result gets wrong that the original gets right (and the
reverse). No latency is measured here (tools/bench_easier.py does that at the default tolerance).

Then, per re-fit point, the iso-loss comparison: the most activations any ``refit=False`` run of the sweep
linearized at a test loss no larger than this point's. It compares the two methods along their curves instead
of at one tolerance, where the run that stops early also loses less. With 540 test samples one sample is
0.19 points: the curves are not monotone at that scale, and the text says so rather than smoothing them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_easier import accuracy, digits_case, model_parser, per_model

from onnx_easier.api import optimize

TOLERANCES = (0.005, 0.01, 0.02, 0.04)


def sweep(name: str, models_dir: Path, tolerances: Sequence[float]) -> dict:
    """Every (re-fit on/off, tolerance) run of one model: counts, fidelity loss, test loss, flipped samples."""
    case = digits_case(name, models_dir)
    acc_before, wrong_before = case.accuracy, case.wrong
    points = []
    for refit in (False, True):
        for tol in tolerances:
            t0 = time.perf_counter()
            result = optimize(case.path, case.calib, tolerance=tol, refit=refit)
            acc, wrong = accuracy(result.model, case.x_test, case.y_test)
            acts = result.report["activations"]
            points.append({
                "refit": refit, "tolerance": tol,
                "linearized": sum(a["action"] == "linearized" for a in acts), "activations": len(acts),
                "fidelity": result.report["fidelity"]["value"], "accuracy_loss": acc_before - acc,
                "newly_wrong": len(set(wrong) - set(wrong_before)), "newly_right": len(set(wrong_before) - set(wrong)),
                "wall_s": time.perf_counter() - t0,
            })
    return {"model": name, "test_accuracy": acc_before, "test_samples": len(case.y_test), "points": points}


def iso_loss(res: dict) -> list[dict]:
    """Per re-fit point: the largest ``refit=False`` count at a test loss <= its own, over the whole sweep and the
    original (0 linearized at loss 0); None when the point gained accuracy and no no-refit run gained as much."""
    base = [p for p in res["points"] if not p["refit"]]
    out = []
    for p in (p for p in res["points"] if p["refit"]):
        rivals = [b["linearized"] for b in base if b["accuracy_loss"] <= p["accuracy_loss"] + 1e-9]
        if p["accuracy_loss"] >= -1e-9:
            rivals.append(0)  # the original itself: nothing linearized, no loss
        best = max(rivals, default=None)
        out.append({"tolerance": p["tolerance"], "linearized": p["linearized"], "accuracy_loss": p["accuracy_loss"],
                    "no_refit_best": best})
    return out


def table(results: list[dict]) -> str:
    head = ["model", "tolerance", "run", "linearized", "fidelity loss", "test loss (pt)", "newly wrong / right",
            "optimize (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for p in sorted(res["points"], key=lambda p: (p["tolerance"], p["refit"])):
            lines.append(f"| {res['model']} | {p['tolerance']:g} | {'re-fit' if p['refit'] else 'no-refit'} | "
                         f"{p['linearized']}/{p['activations']} | {p['fidelity']:.4f} | {p['accuracy_loss']:+.2f} | "
                         f"{p['newly_wrong']}/{p['newly_right']} | {p['wall_s']:.1f} |")
    return "\n".join(lines)


def iso_table(results: list[dict]) -> str:
    head = "| model | re-fit point (tolerance: linearized, test loss) | most linearized by no-refit at no more test loss |"
    lines = [head, "|---|---|---|"]
    for res in results:
        for q in iso_loss(res):
            best = "none" if q["no_refit_best"] is None else str(q["no_refit_best"])
            lines.append(f"| {res['model']} | {q['tolerance']:g}: {q['linearized']}, {q['accuracy_loss']:+.2f} pt | "
                         f"{best} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--tolerances", nargs="+", type=float, default=list(TOLERANCES), metavar="T")
    args = parser.parse_args(argv)
    results = per_model(args.models, lambda name: sweep(name, args.models_dir, args.tolerances))
    print(table(results))
    print()
    print(iso_table(results))
    if args.json:
        args.json.write_text(json.dumps({"tolerances": args.tolerances, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
