"""The re-fit against ``--no-refit`` over several random splits of the calibration data (``optimize(seed=...)``).

    python tools/bench_seeds.py                                     # the six example models, seeds 0-4
    python tools/bench_seeds.py --models resnet_digits --seeds 0 1 2 --json seeds.json

The fit / check / held-out parts of ``--data`` are drawn at random (seeded), so one run of tools/bench_easier.py
is one draw. Per model and seed, at ``--tolerance 0.01``: the ``refit=False`` run (N activations linearized), the
default re-fit run, and the re-fit capped at twice the count (``max_remove=2N``, "matched"; the default run itself
when it linearized no more). Each re-fit run is
compared with the no-refit run of the same seed as tools/bench_easier.py's T6 does (``_t6``): at least twice the
count and no more TEST accuracy loss, literally, plus the paired split of the test samples and McNemar's exact p.
The last table counts, per model, the seeds where the literal comparison holds. No latency is measured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_easier import TOLERANCE, DigitsCase, _t6, accuracy, digits_case, model_parser, per_model

from onnx_easier.api import optimize

SEEDS = (0, 1, 2, 3, 4)


def _run(case: DigitsCase, **kwargs) -> dict:
    result = optimize(case.path, case.calib, tolerance=TOLERANCE, **kwargs)
    acc, wrong = accuracy(result.model, case.x_test, case.y_test)
    return {"linearized": sum(a["action"] == "linearized" for a in result.report["activations"]),
            "fidelity": result.report["fidelity"]["value"], "accuracy_loss": case.accuracy - acc,
            "test_errors": wrong}


def bench_model(name: str, models_dir: Path, seeds: Sequence[int]) -> dict:
    case = digits_case(name, models_dir)
    rows = []
    for seed in seeds:
        runs = {"no-refit": _run(case, refit=False, seed=seed), "refit": _run(case, seed=seed)}
        cap = 2 * runs["no-refit"]["linearized"]
        runs["matched"] = (runs["refit"] if runs["refit"]["linearized"] <= cap else
                           _run(case, seed=seed, max_remove=cap))
        checks = {label: _t6(runs[label], runs["no-refit"]) for label in ("refit", "matched")}
        rows.append({"seed": seed, "runs": runs, "t6": {k: {"text": t, "ok": ok} for k, (t, ok) in checks.items()}})
    return {"model": name, "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| model | seed | no-refit | re-fit | T6 re-fit | matched | T6 matched |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for row in res["rows"]:
            cells = {k: f"{v['linearized']}, {v['accuracy_loss']:+.2f} pt" for k, v in row["runs"].items()}
            lines.append(f"| {res['model']} | {row['seed']} | {cells['no-refit']} | {cells['refit']} | "
                         f"{_verdict(row['t6']['refit'])} | {cells['matched']} | {_verdict(row['t6']['matched'])} |")
    return "\n".join(lines)


def _verdict(check: dict) -> str:
    paired = check["text"].split("; ", 1)[1]
    return f"{'PASS' if check['ok'] else 'FAIL'} ({paired})"


def summary(results: list[dict]) -> str:
    lines = ["| model | seeds | literal T6 holds: re-fit | literal T6 holds: matched |", "|---|---|---|---|"]
    for res in results:
        n = len(res["rows"])
        ok = {k: sum(row["t6"][k]["ok"] for row in res["rows"]) for k in ("refit", "matched")}
        lines.append(f"| {res['model']} | {n} | {ok['refit']}/{n} | {ok['matched']}/{n} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), metavar="S")
    args = parser.parse_args(argv)
    results = per_model(args.models, lambda name: bench_model(name, args.models_dir, args.seeds))
    print(table(results))
    print()
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps({"tolerance": TOLERANCE, "seeds": args.seeds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
