"""Python entry points: ``analyze`` (EASIER entropies) and ``optimize`` (linearize + fuse + verify).

Pipelines, written out:
- analyze:  load -> name nodes -> find activations -> read data -> calibrate (ORT, streamed) -> entropies -> cost
- optimize: analyze (with affine moments when needed) -> choose the K lowest-entropy activations -> linearize
            (reference model) -> shape inference -> fusion passes -> checker -> verify against the reference
            on calibration samples (the fusions must be exact: relative error <= 1e-4) -> cost -> report
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_easier import __version__
from onnx_easier.activations import Activation, ensure_node_names, find_activations, infer_shapes
from onnx_easier.calibrate import ChannelStats, calibrate
from onnx_easier.cost import Cost, measure
from onnx_easier.data import CalibrationData, input_specs, load_data
from onnx_easier.errors import BadArgumentError, VerificationError
from onnx_easier.fusion import fuse
from onnx_easier.model_io import load_model, make_session, to_graph, to_model
from onnx_easier.passes.linearize import linearize

log = logging.getLogger(__name__)

LINEARIZE_MODES = ("identity", "affine")
EXACT_RTOL = 1e-4  # fusions are exact: max |a - b| / max(1, max |a|) over every output
VERIFY_SAMPLES = 64


@dataclass
class Analysis:
    """EASIER statistics of one model on one calibration set."""

    model: onnx.ModelProto  # validated, every node named
    source: str
    data: CalibrationData
    activations: list[Activation]
    stats: dict[str, ChannelStats]
    before: Cost
    seconds: float

    def entropy(self, act: Activation) -> float:
        """Layer entropy (mean binary entropy over channels) of ``act``."""
        return float(self.stats[act.name].entropy)

    def ranked(self) -> list[Activation]:
        """Activations by increasing entropy; ties keep graph order (sorted() is stable)."""
        return sorted(self.activations, key=self.entropy)

    def report(self, actions: dict[str, str] | None = None) -> dict:
        """The report's analysis part (schema of issue 2; ``actions`` maps activation name -> action)."""
        actions = actions or {}
        return {
            "tool": {"name": "onnx-easier", "version": __version__},
            "model": self.source,
            "data": {"source": self.data.source, "samples": self.data.samples, "synthetic": self.data.synthetic},
            "activations": [
                {
                    "node": a.name,
                    "op": a.op,
                    "spelling": a.spelling,
                    "tensor": a.input,
                    "channels": int(self.stats[a.name].count_on.shape[0]),
                    "entropy": self.entropy(a),
                    "action": actions.get(a.name, "kept"),
                }
                for a in self.activations
            ],
            "before": self.before.as_report(),
            "calibration_seconds": round(self.seconds, 3),
        }


@dataclass
class Result:
    """What ``optimize`` returns: the optimized model and its report (the JSON the CLI writes)."""

    model: onnx.ModelProto
    report: dict
    analysis: Analysis
    fused: dict = field(default_factory=dict)


def _sample_shapes(data: CalibrationData) -> dict[str, tuple[int, ...]]:
    return {name: tuple(arr.shape) for name, arr in data.arrays.items()}


def analyze(
    model: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    moments: bool = False,
    progress: bool = False,
) -> Analysis:
    """Calibrate ``model`` through ONNX Runtime on ``data`` and compute the EASIER entropy of every activation.

    ``data``: .npz keyed by input names, .npy (single input), a folder of those, or None for random samples.
    ``moments=True`` also streams the sums the affine linearization needs.
    """
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    proto = load_model(model)
    graph = to_graph(proto)
    ensure_node_names(graph)
    named = to_model(graph, proto)
    acts = find_activations(to_graph(infer_shapes(named)))
    calib = load_data(None if data is None else str(data), input_specs(named), samples=samples, seed=seed,
                      input_shapes=input_shapes)
    t0 = time.perf_counter()
    stats = calibrate(named, acts, calib, moments=moments, progress=progress)
    seconds = time.perf_counter() - t0
    before = measure(named, len(acts), _sample_shapes(calib))
    log.info("calibrated %d activations on %d samples in %.2fs", len(acts), calib.samples, seconds)
    return Analysis(named, source, calib, acts, stats, before, seconds)


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | None = None,
    *,
    remove: int = 0,
    linearize_mode: str = "affine",
    samples: int | None = None,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: bool = False,
) -> Result:
    """Linearize the ``remove`` lowest-entropy activations (EASIER order), then fuse what became linear.

    ``remove=0`` runs the exact fusions only. The fused model is verified against the reference (the original
    with the chosen activations linearized, nothing fused) on calibration samples; a mismatch raises
    VerificationError (it would be a bug in a pass: fusions are exact or not done).
    """
    if linearize_mode not in LINEARIZE_MODES:
        raise BadArgumentError(f"--linearize must be one of {', '.join(LINEARIZE_MODES)}, not {linearize_mode!r}")
    if remove < 0:
        raise BadArgumentError(f"--remove must be >= 0, not {remove}")
    analysis = analyze(model, data, samples=samples, seed=seed, input_shapes=input_shapes,
                       moments=linearize_mode == "affine" and remove > 0, progress=progress)
    chosen = analysis.ranked()[:remove]
    if remove > len(analysis.activations):
        log.warning("--remove %d: the model has only %d activations; linearizing all", remove, len(chosen))

    graph = to_graph(analysis.model)
    fits = {a.name: analysis.stats[a.name].affine_fit() for a in chosen} if linearize_mode == "affine" else None
    lin = linearize(graph, chosen, linearize_mode, fits)
    reference = to_model(graph, analysis.model)

    inferred = onnx.shape_inference.infer_shapes(reference)
    fgraph = to_graph(inferred)
    fusion = fuse(fgraph)
    out = to_model(fgraph, analysis.model)
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    del out.graph.value_info[:]
    onnx.checker.check_model(out, full_check=True)

    err = max_relative_error(reference, out, analysis.data)
    if err > EXACT_RTOL:
        raise VerificationError(
            f"internal error: the fused model differs from the linearized reference (relative error {err:.2e}); "
            "nothing was written. Please report this model."
        )
    after = measure(out, len(analysis.activations) - len(chosen), _sample_shapes(analysis.data))
    actions = {a.name: "linearized" for a in chosen}
    report = analysis.report(actions)
    report["linearize"] = linearize_mode
    report["remove"] = remove
    report["after"] = after.as_report()
    report["passes"] = [{"name": r.name, "changed": r.changed, "notes": r.notes} for r in [lin, *fusion.results]]
    report["fused_layers"] = fusion.mapping
    report["exactness"] = {"reference": "original with the chosen activations linearized, nothing fused",
                           "max_relative_error": err, "rtol": EXACT_RTOL,
                           "samples": min(VERIFY_SAMPLES, analysis.data.samples)}
    return Result(out, report, analysis, fusion.mapping)


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in ORT (optimizations off)."""
    return make_session(model).run(None, feeds)


def max_relative_error(a: onnx.ModelProto, b: onnx.ModelProto, data: CalibrationData) -> float:
    """max over outputs of max|ya - yb| / max(1, max|ya|) on the first VERIFY_SAMPLES samples of ``data``."""
    sa, sb = make_session(a), make_session(b)
    names = [o.name for o in sa.get_outputs()]
    worst = 0.0
    sub = data.subset(0, min(VERIFY_SAMPLES, data.samples))
    for feed in sub.batches(_verify_batch(sa, sub)):
        ya = sa.run(names, feed)
        yb = sb.run(names, feed)
        for u, v in zip(ya, yb):
            u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
            scale = max(1.0, float(np.abs(u64).max(initial=0.0)))
            worst = max(worst, float(np.abs(u64 - v64).max(initial=0.0)) / scale)
    return worst


def _verify_batch(session, data: CalibrationData) -> int:
    first = session.get_inputs()[0].shape
    return first[0] if first and isinstance(first[0], int) else max(1, min(16, data.samples))
