"""Benchmark of the paper's mode: linearize the K lowest-entropy activations by identity, fuse, and measure.

    python tools/bench_fusion.py                                  # the six example models, batches 1 and 32
    python tools/bench_fusion.py --models vgg_digits --batches 1 --budget 3 --json fusion.json

Per model, for ``--remove K`` with K = 0 (exact fusions only), 25 %, 50 % and 100 % of its activations
(``optimize(remove=K, linearize_mode="identity")``, rounded down), and side by side for ``onnxsim`` and
``onnxslim`` run on the original model (each printed as n/a when not installed):

- compute nodes (Conv/ConvTranspose/Gemm/MatMul) and depth before -> after, MACs after / before
  (``onnx_easier.cost.measure``, per sample);
- ONNX Runtime CPU latency after / before at each batch size: one interleaved ``measure_latency`` per model and
  batch covering the original and every variant (threads=1, graph optimizations on, median over rounds), so all
  variants share the machine's noise. ``copy`` is the original measured a second time: its ratio (ideally 1.00)
  shows the noise floor of the other ratios;
- test accuracy (%) on ``models/digits<R>_test.npz`` (identity linearization changes the function: K > 0 is
  the paper's mode without fine-tuning, so accuracy drops);
- max relative error of onnxsim / onnxslim against the original (both should be exact).

Latency on a shared machine is noisy: keep ``--budget`` (seconds per interleaved measurement) at a few seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_easier.api import optimize
from onnx_easier.cost import measure
from onnx_easier.latency import measure_latency

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
MODELS = (
    "vgg_digits",
    "resnet_digits",
    "mobilenetv2_digits",
    "ffn_digits",
    "mobilenetv2_wide_digits",
    "ffn_wide_digits",
)
FRACTIONS = (0.0, 0.25, 0.5, 1.0)
CALIB_SAMPLES = 256


def resolution(model: onnx.ModelProto) -> int:
    """Side R of the model's ``x [N, 1, R, R]`` input (selects the digits<R> data files)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def reference_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of ``model``'s first output on ``x``."""
    session = reference_session(model)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
    return float((logits.argmax(axis=1) == y).mean() * 100)


def max_relative_error(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    """max over outputs of max|ya - yb| / max(1, max|ya|)."""
    sa, sb = reference_session(a), reference_session(b)
    feed_a, feed_b = {sa.get_inputs()[0].name: x}, {sb.get_inputs()[0].name: x}
    worst = 0.0
    for u, v in zip(sa.run(None, feed_a), sb.run(None, feed_b)):
        u64, v64 = u.astype(np.float64), v.astype(np.float64)
        worst = max(worst, float(np.abs(u64 - v64).max()) / max(1.0, float(np.abs(u64).max())))
    return worst


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxsim's simplified model, or None when onnxsim is not installed (or says its check failed)."""
    if importlib.util.find_spec("onnxsim") is None:
        return None
    from onnxsim import simplify

    options = {"certify": False} if "certify" in inspect.signature(simplify).parameters else {}
    simplified, ok = simplify(model, **options)
    return simplified if ok else None


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxslim's slimmed model, or None when onnxslim is not installed."""
    if importlib.util.find_spec("onnxslim") is None:
        return None
    import onnxslim

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return onnxslim.slim(copy)


def bench_model(name: str, models_dir: Path, batches: Sequence[int], budget: float, samples: int) -> dict:
    """Every variant of one model: static cost, accuracy, interleaved latency ratios per batch."""
    path = models_dir / f"{name}.onnx"
    original = onnx.load(str(path))
    r = resolution(original)
    calib = models_dir / f"digits{r}_calib.npz"
    with np.load(models_dir / f"digits{r}_test.npz") as test:
        x_test, y_test = test["x"], test["y"]
    with np.load(calib) as data:
        x_calib = data["x"]

    base = measure(original, 0)
    variants: dict[str, dict] = {}
    models: dict[str, onnx.ModelProto] = {"original": original}
    n_acts = None
    for fraction in FRACTIONS:
        t0 = time.perf_counter()
        k = 0 if n_acts is None else int(n_acts * fraction)  # the first call (K = 0) counts the activations
        result = optimize(path, calib, remove=k, linearize_mode="identity", samples=samples)
        n_acts = len(result.report["activations"])
        label = f"remove {k}/{n_acts}"
        models[label] = result.model
        after = result.report["after"]
        variants[label] = {"kind": "onnx-easier", "remove": k, "fraction": fraction,
                           "compute_nodes": after["compute_nodes"], "depth": after["depth"],
                           "macs": after["macs"], "exact_error": result.report["exactness"]["max_relative_error"],
                           "seconds": round(time.perf_counter() - t0, 2)}
    for tool, run in (("onnxsim", run_onnxsim), ("onnxslim", run_onnxslim)):
        t0 = time.perf_counter()
        out = run(original)
        if out is None:
            variants[tool] = {"kind": tool, "available": False}
            continue
        cost = measure(out, 0)
        models[tool] = out
        variants[tool] = {"kind": tool, "available": True, "compute_nodes": cost.compute_nodes, "depth": cost.depth,
                          "macs": cost.macs, "exact_error": max_relative_error(original, out, x_test[:64]),
                          "seconds": round(time.perf_counter() - t0, 2)}
    models["copy"] = original  # the original again: the noise floor of the ratios
    variants["copy"] = {"kind": "noise", "compute_nodes": base.compute_nodes, "depth": base.depth, "macs": base.macs}

    acc = {label: accuracy(m, x_test, y_test) for label, m in models.items() if label != "copy"}
    for label, v in variants.items():
        if label in acc:
            v["test_accuracy"] = acc[label]
        if "macs" in v:
            v["macs_ratio"] = v["macs"] / base.macs
        v["latency_ratio"] = {}

    latency: dict[str, dict] = {}
    for batch in batches:
        feeds = {original.graph.input[0].name: np.ascontiguousarray(x_calib[:batch])}
        stats = measure_latency(models, feeds, threads=1, budget_s=budget)
        ms = stats["original"].median_ms
        latency[str(batch)] = {label: s.as_report() for label, s in stats.items()}
        for label, s in stats.items():
            if label != "original":
                variants[label]["latency_ratio"][str(batch)] = s.median_ms / ms
    return {"model": name, "resolution": r, "activations": n_acts, "test_accuracy": acc["original"],
            "before": {"compute_nodes": base.compute_nodes, "depth": base.depth, "macs": base.macs},
            "variants": variants, "latency_ms": latency}


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: list[dict], batches: Sequence[int]) -> str:
    """One markdown table, a row per model and variant."""
    head = ["model", "variant", "compute nodes", "depth", "MACs ratio",
            *[f"latency ratio b{b}" for b in batches], "test acc. (%)", "max rel. err."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        before = res["before"]
        base_ms = " / ".join(f"b{b} {res['latency_ms'][str(b)]['original']['median_ms']:.3f} ms" for b in batches)
        lines.append(f"| {res['model']} | original ({base_ms}) | {before['compute_nodes']} | {before['depth']} | 1.00 | "
                     + " | ".join("1.00" for _ in batches) + f" | {res['test_accuracy']:.2f} | |")
        for label, v in res["variants"].items():
            if not v.get("available", True):
                lines.append(f"| {res['model']} | {label} | n/a | n/a | n/a | "
                             + " | ".join("n/a" for _ in batches) + " | n/a | n/a |")
                continue
            ratios = [_fmt(v["latency_ratio"].get(str(b)), ".2f") for b in batches]
            err = v.get("exact_error")
            lines.append(
                f"| {res['model']} | {label} | {before['compute_nodes']} -> {v['compute_nodes']} | "
                f"{before['depth']} -> {v['depth']} | {v['macs_ratio']:.2f} | " + " | ".join(ratios)
                + f" | {_fmt(v.get('test_accuracy'), '.2f')} | {_fmt(err, '.1e')} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME", help="models in models/")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32], metavar="B")
    parser.add_argument("--budget", type=float, default=4.0, metavar="S",
                        help="seconds per interleaved latency measurement (one model, one batch, all variants)")
    parser.add_argument("--samples", type=int, default=CALIB_SAMPLES, help="calibration samples (default 256)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, 1 intra-op thread, graph optimizations on; "
          f"latency = median of interleaved rounds, {args.budget:g} s per model and batch", file=sys.stderr)
    results = []
    for name in args.models:
        t0 = time.perf_counter()
        results.append(bench_model(name, args.models_dir, args.batches, args.budget, args.samples))
        print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(table(results, args.batches))
    print("\nlatency ratio = median ms after / median ms of the original, interleaved in one measurement; "
          "'copy' is the original measured again (noise floor). MACs per sample. Accuracy on the held-out test "
          "split. K = 0 runs only the exact fusions; K > 0 linearizes the K lowest-entropy activations by identity.")
    if args.json:
        args.json.write_text(json.dumps({"threads": 1, "provider": "cpu", "budget_s": args.budget,
                                         "onnxruntime": ort.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
