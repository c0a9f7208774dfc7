"""With and without ``--distill``: what distillation to the original wins back, along the tolerance.

    python tools/bench_distill.py                                      # the six example models, 3 tolerances
    python tools/bench_distill.py --models ffn_digits mobilenetv2_digits --tolerances 0.01 --json distill.json

Per model and tolerance, ``onnx-easier model out --data calib --tolerance t`` runs without and with ``--distill``
(scope ``--scope``, loss ``--loss``, schedule ``--steps``, feature term ``--features``, the default time budget unless
``--seconds``), each in its own process; for each result:
activations linearized, compute nodes, the tool's fidelity loss on its held-out calibration samples, the TEST
accuracy loss in points on ``models/digits<R>_test.npz`` (labels the tool never sees), the latency ratio the tool
measured, the optimize seconds (wall, and the process's CPU time: all its threads, which another process on the
machine does not inflate), and for the distilled runs the fidelity before / after distillation and whether it was kept.

Then the iso-loss comparison of tools/bench_tradeoff.py: per distilled point, the most activations any run without
distillation linearized at a test loss no larger than this point's (the original counts: 0 at loss 0).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx
from bench_easier import accuracy, digits_case, model_parser, per_model

TOLERANCES = (0.005, 0.01, 0.02)


def run_cli(path: Path, calib: Path, tol: float, distill: bool, scope: str, seconds: float | None,
            workdir: Path, loss: str = "kl", steps: int | None = None,
            features: float = 0.0) -> tuple[onnx.ModelProto, dict, float, float]:
    """One ``onnx-easier`` run in its own process (imports, torch's included, count as the user would pay them): the
    written model, the report, the wall seconds and the child's CPU seconds (all its threads)."""
    out, rep = workdir / "out.onnx", workdir / "report.json"
    cmd = [sys.executable, "-m", "onnx_easier.cli", str(path), str(out), "--data", str(calib), "--tolerance",
           str(tol), "--report", str(rep), "-q", "--overwrite"]
    if distill:
        cmd += ["--distill", "--distill-scope", scope, "--distill-loss", loss]
        cmd += [] if seconds is None else ["--distill-seconds", str(seconds)]
        cmd += [] if steps is None else ["--distill-steps", str(steps)]
        cmd += ["--distill-features", str(features)] if features else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return onnx.load(str(out)), json.loads(rep.read_text()), wall, cpu


def sweep(name: str, models_dir: Path, tolerances: Sequence[float], scope: str, seconds: float | None,
          loss: str = "kl", steps: int | None = None, features: float = 0.0) -> dict:
    """Per tolerance, the plain run then the distilled one (interleaved, so that a change in the machine's load
    touches both)."""
    case = digits_case(name, models_dir)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for tol in tolerances:
            for distill in (False, True):
                model, rep, wall, cpu = run_cli(case.path, case.calib, tol, distill, scope, seconds, Path(tmp), loss,
                                                steps, features)
                acc, _ = accuracy(model, case.x_test, case.y_test)
                acts = rep["activations"]
                points.append({
                    "distill": distill, "tolerance": tol,
                    "linearized": sum(a["action"] == "linearized" for a in acts), "activations": len(acts),
                    "compute_nodes": rep["after"]["compute_nodes"], "fidelity": rep["fidelity"]["value"],
                    "accuracy_loss": case.accuracy - acc, "latency_ratio": rep["latency_ms"]["ratio"],
                    "wall_s": wall, "cpu_s": cpu, "phases": rep.get("phases"), "report": rep.get("distill"),
                })
    return {"model": name, "test_accuracy": case.accuracy, "test_samples": len(case.y_test), "points": points}


def iso_loss(res: dict) -> list[tuple[dict, int | None]]:
    """Per distilled point: the largest count without distillation at a test loss <= its own (None: none)."""
    plain = [(p["accuracy_loss"], p["linearized"]) for p in res["points"] if not p["distill"]] + [(0.0, 0)]
    return [(p, max((n for loss, n in plain if loss <= p["accuracy_loss"] + 1e-9), default=None))
            for p in res["points"] if p["distill"]]


def cost_table(results: list[dict]) -> str:
    """Per model and tolerance: the distilled run's optimize time over the plain run's, wall and CPU."""
    lines = ["| model | tolerance | wall plain / distill (s) | ratio | CPU plain / distill (s) | ratio |",
             "|---|---|---|---|---|---|"]
    for res in results:
        runs = {(p["tolerance"], p["distill"]): p for p in res["points"]}
        for tol in sorted({t for t, _ in runs}):
            a, b = runs.get((tol, False)), runs.get((tol, True))
            if a and b:
                lines.append(f"| {res['model']} | {tol:g} | {a['wall_s']:.1f} / {b['wall_s']:.1f} | "
                             f"{b['wall_s'] / a['wall_s']:.2f} | {a['cpu_s']:.1f} / {b['cpu_s']:.1f} | "
                             f"{b['cpu_s'] / a['cpu_s']:.2f} |")
    return "\n".join(lines)


def _distilled(d: dict | None) -> str:
    if not d:
        return ""
    if "before" not in d:
        return d.get("note", "")
    return f"{d['before']:.4f} -> {d['after']:.4f} {'kept' if d['kept'] else 'not kept'}, {d.get('steps', 0)} steps"


def table(results: list[dict]) -> str:
    head = ["model", "tolerance", "run", "linearized", "compute nodes", "fidelity loss", "test loss (pt)",
            "latency ratio", "optimize (s)", "distillation (fidelity)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for p in sorted(res["points"], key=lambda p: (p["tolerance"], p["distill"])):
            ratio = "" if p["latency_ratio"] is None else f"{p['latency_ratio']:.2f}"
            lines.append(f"| {res['model']} | {p['tolerance']:g} | {'distill' if p['distill'] else 'plain'} | "
                         f"{p['linearized']}/{p['activations']} | {p['compute_nodes']} | {p['fidelity']:.4f} | "
                         f"{p['accuracy_loss']:+.2f} | {ratio} | {p['wall_s']:.1f} | {_distilled(p['report'])} |")
    return "\n".join(lines)


def iso_table(results: list[dict]) -> str:
    rows = [f"| {res['model']} | {p['tolerance']:g}: {p['linearized']}, {p['accuracy_loss']:+.2f} pt | "
            f"{'none' if best is None else best} |" for res in results for p, best in iso_loss(res)]
    head = "| model | distilled point (tolerance: linearized, test loss) | most linearized without, at no more test loss |"
    return "\n".join([head, "|---|---|---|", *rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--tolerances", nargs="+", type=float, default=list(TOLERANCES), metavar="T")
    parser.add_argument("--scope", choices=("merged", "all"), default="merged")
    parser.add_argument("--loss", choices=("kl", "logits"), default="kl", help="--distill-loss")
    parser.add_argument("--steps", type=int, metavar="N", help="--distill-steps (default: the tool's)")
    parser.add_argument("--seconds", type=float, metavar="S", help="--distill-seconds (default: the tool's)")
    parser.add_argument("--features", type=float, default=0.0, metavar="W", help="--distill-features (default 0)")
    args = parser.parse_args(argv)
    results = per_model(args.models, lambda n: sweep(n, args.models_dir, args.tolerances, args.scope, args.seconds,
                                                                  args.loss, args.steps, args.features))
    print(table(results))
    print()
    print(iso_table(results))
    print()
    print(cost_table(results))
    if args.json:
        args.json.write_text(json.dumps({"tolerances": args.tolerances, "scope": args.scope, "loss": args.loss,
                                                   "seconds": args.seconds, "steps": args.steps,
                                                   "features": args.features, "results": results},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
