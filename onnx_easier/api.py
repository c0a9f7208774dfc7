"""Python entry points: ``analyze`` (EASIER entropies) and ``optimize`` (linearize + fuse + verify).

Pipelines, written out:
- analyze:  load -> name nodes -> find activations -> read data -> calibrate (ORT, streamed) -> entropies -> cost
- optimize, budget mode (default): analyze -> exact fusions (checked exact) -> split data (fit / check / holdout)
            -> search per strategy (select.py: linearize, fuse, re-fit, fidelity on holdout, keep or undo)
            -> latency of original / exact / results, interleaved -> keep the fastest, never slower than the
            input -> checker + strict shape inference -> report; ``Result.write`` reloads and verifies on disk
- optimize, paper mode (``remove=K``): analyze -> the K lowest-entropy activations -> linearize (reference)
            -> fuse -> checker -> exact against the reference (relative error <= 1e-4) -> report
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_easier import __version__
from onnx_easier.activations import Activation, ensure_node_names, find_activations
from onnx_easier.calibrate import ChannelStats, calibrate
from onnx_easier.cost import Cost, measure
from onnx_easier.data import (
    CalibrationData,
    activation_bytes,
    batch_multiple,
    choose_batch_size,
    input_specs,
    load_data,
    load_feeds,
)
from onnx_easier.errors import BadArgumentError, OnnxEasierError, VerificationError
from onnx_easier.execution import CPU, Execution, resolve
from onnx_easier.fidelity import DEFAULT_TOLERANCE, METRICS, Fidelity, default_metric, holdout_needed
from onnx_easier.fusion import FusionResult
from onnx_easier.latency import LatencyStats, fast_ties, latency_report, measure_latency
from onnx_easier.memory import exempt_live_objects, release

if TYPE_CHECKING:  # distill imports torch: only when distillation runs
    from onnx_easier.distill import Recovery
from onnx_easier.model_io import (
    check_model,
    external_dir,
    load_model,
    read_model,
    save_model,
    to_graph,
    to_model,
)
from onnx_easier.passes.base import PassResult
from onnx_easier.safety import CheckData, base_rtol, exactness_bound
from onnx_easier.select import (
    STRATEGIES,
    Judge,
    Search,
    SearchResult,
    StepHook,
    fuse_model,
    kept_nodes,
    linearize_and_fuse,
    output_error,
    permuted_split,
    run_batch,
    same_graph,
)
from onnx_easier.shapes import infer_shapes

log = logging.getLogger(__name__)

DataSource = str | os.PathLike | Iterable[Mapping[str, np.ndarray]] | object | None  # object: a CalibrationDataReader

LINEARIZE_MODES = ("identity", "affine")
EXACT_RTOL = 1e-4  # fusions are exact: max |a - b| / max(1, max |a|) over every output
VERIFY_SAMPLES = 64
GUARD_SAMPLES = 8  # samples of the batch the fail-safe checks of every rewrite run on
BOUND_METHOD = ("one-sided upper bound at the stated confidence: agreement = max(Clopper-Pearson bound on the flip "
                "rate, 0.11 * sqrt(bootstrap bound on the mean KL)); rel-l2 and cosine: percentile bootstrap over "
                "the held-out samples; a candidate is accepted when it is within the effective tolerance")
BIG_NOTE = ("the model's weights are over 2 GB: only the exact fusions are made and latency is not measured (each "
            "search trial and each timed session would hold another copy of the weights)")
NOISE_MARGIN = 0.03  # a result measuring at most 3% slower than the input counts as not slower (timing noise)


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
    verifier: Callable[[onnx.ModelProto], dict] | None = None  # figures of a reloaded model; ok=False on failure

    def write(self, path: str | os.PathLike, *, keep_failed: bool = False) -> dict:
        """Save atomically, reload the file from disk, verify it against the original; publish it only if the
        verification passes (or ``keep_failed``). The figures go into ``report["verification"]``; a failure
        raises VerificationError (exit code 1). Its seconds go into ``report["phases"]`` (``verification``: reload
        and check; ``write``: the rest) and ``report["seconds"]``."""
        figures: dict = {}
        checking = 0.0

        def check(tmp: str) -> None:
            nonlocal checking
            t0 = time.perf_counter()
            try:
                figures.update(self.verifier(read_model(tmp)) if self.verifier else {"ok": True})
            finally:
                checking = time.perf_counter() - t0
            if not figures["ok"] and not keep_failed:
                raise VerificationError(_verification_message(figures) + "; nothing was written "
                                        "(--keep-failed writes it anyway)")

        t_write = time.perf_counter()
        try:
            save_model(self.model, path, check)
        finally:
            self._add_seconds(time.perf_counter() - t_write, checking)
        self.report["verification"] = figures
        if not figures.get("ok", True):
            raise VerificationError(_verification_message(figures) + f"; written anyway to {path} (--keep-failed)")
        return figures


    def _add_seconds(self, total: float, checking: float) -> None:
        """Account ``total`` seconds of writing, ``checking`` of them verifying, in the report's phases and seconds."""
        phases = self.report.setdefault("phases", {})
        phases["verification"] = round(phases.get("verification", 0.0) + checking, 3)
        phases["write"] = round(phases.get("write", 0.0) + total - checking, 3)
        if "seconds" in self.report:
            self.report["seconds"] = round(self.report["seconds"] + total, 3)


class Laps:
    """Wall seconds per phase of one run: ``start(name)`` ends the running phase and starts ``name`` (a phase may
    run more than once: its seconds add up), and tells ``on_step`` (select.StepHook) that it started."""

    def __init__(self, on_step: StepHook | None = None) -> None:
        self.on_step = on_step
        self.created = time.perf_counter()  # the run's start
        self.seconds: dict[str, float] = {}
        self._running: str | None = None
        self._t0 = 0.0

    def start(self, name: str, message: str = "") -> None:
        self.stop()
        self._running, self._t0 = name, time.perf_counter()
        self.say(message)

    def say(self, message: str) -> None:
        """Tell ``on_step`` something about the running phase (nothing counted)."""
        if self.on_step and self._running is not None:
            self.on_step(self._running, 0, 0, message)

    def stop(self) -> None:
        if self._running is not None:
            self.seconds[self._running] = self.seconds.get(self._running, 0.0) + time.perf_counter() - self._t0
            self._running = None

    def report(self, total: float) -> dict[str, float]:
        """The report's ``phases``: seconds per phase, rounded, and ``other`` (what no phase covers) so that they
        add up to ``total``."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        return out


def _verification_message(figures: dict) -> str:
    return (f"verification failed: the written model is outside the tolerance ({figures.get('metric')} loss "
            f"{figures.get('value')} > {figures.get('tolerance')})")


def _sample_shapes(data: CalibrationData) -> dict[str, tuple[int, ...]]:
    return data.feed_shapes()  # whole feeds: their own shape, not the sample axis in front


def analyze(
    model: str | os.PathLike | onnx.ModelProto,
    data: DataSource = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    moments: bool = False,
    progress: bool = False,
    provider: str = "cpu",
) -> Analysis:
    """Calibrate ``model`` through ONNX Runtime on ``data`` and compute the EASIER entropy of every activation.

    ``data``: .npz keyed by input names, .npy (single input), a folder of those, None for random samples, or the
    feeds themselves: an iterable of ``{input name: array}`` dicts (one whole feed each, as ``session.run`` takes
    it), an ONNX Runtime ``CalibrationDataReader``, or a dict of arrays laid out like an .npz (data.load_feeds:
    read once and kept in memory).
    ``moments=True`` also streams the sums the affine linearization needs. ``provider``: ``cpu`` or ``cuda``, the
    ONNX Runtime execution provider of the calibration (execution.py; BadArgumentError when it cannot start).
    """
    return _analyze(model, data, samples=samples, seed=seed, input_shapes=input_shapes, moments=moments,
                    progress=progress, execution=resolve(provider))


def _analyze(model: str | os.PathLike | onnx.ModelProto, data: DataSource, *, samples: int | None, seed: int,
             input_shapes: dict[str, tuple[int, ...]] | None, moments: bool, progress: bool,
             execution: Execution) -> Analysis:
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    proto = load_model(model)
    graph = to_graph(proto)
    ensure_node_names(graph)
    named = to_model(graph, proto)
    acts = find_activations(to_graph(infer_shapes(named)))
    del proto, graph
    release()  # gs graphs are reference cycles holding model copies: freed before calibration, not after
    if not acts:
        execution.session(named)  # calibration would not run ORT: check here that ORT can run the model at all
    if data is None or isinstance(data, (str, os.PathLike)):
        calib = load_data(None if data is None else str(data), input_specs(named), samples=samples, seed=seed,
                          input_shapes=input_shapes)
    else:
        calib = load_feeds(data, input_specs(named), samples=samples)
    t0 = time.perf_counter()
    stats = calibrate(named, acts, calib, moments=moments, progress=progress, execution=execution)
    seconds = time.perf_counter() - t0
    before = measure(named, len(acts), _sample_shapes(calib))
    log.info("calibrated %d activations on %d samples in %.2fs", len(acts), calib.samples, seconds)
    return Analysis(named, source, calib, acts, stats, before, seconds)


def _output_shapes(model: onnx.ModelProto) -> list[list[int | str | None]]:
    """The graph outputs' shapes as declared (ints, symbolic names, None where unknown): default_metric's input
    before anything has run."""
    return [[d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in o.type.tensor_type.shape.dim]
            for o in model.graph.output]


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    data: DataSource = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    metric: str | None = None,
    strategy: str = "auto",
    max_remove: int | None = None,
    remove: int | None = None,
    linearize_mode: str = "affine",
    refit: bool = True,
    provider: str = "cpu",
    samples: int | None = None,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: bool = False,
    on_step: StepHook | None = None,
    time_limit: float | None = None,
    distill: bool = False,
    distill_scope: str = "merged",
    distill_loss: str = "kl",
    distill_steps: int | None = None,
    distill_seconds: float | None = None,
    distill_features: float = 0.0,
    try_all: bool = False,
) -> Result:
    """Make ``model`` shallower.

    Default (budget mode): linearize activations in the order of ``strategy`` while the fidelity loss against the
    original on held-out samples stays <= ``tolerance`` (select.py), re-fitting merged layers by least squares
    unless ``refit=False``; then keep the fastest of the results on ``provider``, never one slower than the input.
    ``tolerance=0``: the exact fusions only. Calibration, search trials, exactness checks and latency all run on
    ``provider`` (``cpu`` or ``cuda``: execution.py, checked before any work).

    ``remove=K`` (the paper's mode): linearize exactly the K lowest-entropy activations, fuse, no re-fit, no
    fidelity budget. Either way the fused model is checked against its unfused reference (fusions are exact).
    ``progress`` shows calibration progress bars; ``on_step(phase, done, planned, message)`` (select.StepHook) is
    called when a phase starts (``calibration``, ``exact_fusion``, ``search``, ``latency``, ``verification``; done =
    planned = 0) and after each search trial (phase ``search <strategy>``, trials done and planned). The report's
    ``phases`` gives the seconds of each phase (``Result.write`` adds the written file's verification).
    ``time_limit`` (seconds from the call): no search trial starts after it; the best model verified so far (the
    candidates accepted until then) goes on to the latency step and is written, and the report says the search was
    cut short (``report["time_limit"]``). None: no limit.
    ``distill`` (budget mode, needs torch): a candidate that fails the budget by at most 2.5x is distilled to the
    original and judged again (distill.Recovery), and the chosen model is distilled with the time left, kept only if
    its fidelity on the held-out samples improves (``report["distill"]``); ``distill_scope``: the merged layers
    (default) or ``all``; ``distill_loss``: ``kl`` (classifier outputs compared as class distributions) or
    ``logits`` (as scores: logit regression; distill.py); ``distill_steps``: the schedule's length per
    distillation (None: distill.DEFAULT_STEPS); ``distill_seconds``: the time for all of it (None: 0.6 of the run's
    own time so far, distill.BUDGET_SHARE); ``distill_features``: the weight of the feature-matching term (the
    trained layers' outputs that the original computes under the same name; 0: none).
    ``try_all``: also try the candidates predicted to gain nothing (gain.py: no compute node, depth, MAC or
    elementwise node saved); by default they are skipped, and listed in ``report["search"][strategy]["skipped"]``.
    """
    if linearize_mode not in LINEARIZE_MODES:
        raise BadArgumentError(f"--linearize must be one of {', '.join(LINEARIZE_MODES)}, not {linearize_mode!r}")
    if strategy not in STRATEGIES:
        raise BadArgumentError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if metric is not None and metric not in METRICS:
        raise BadArgumentError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if remove is not None and remove < 0:
        raise BadArgumentError(f"--remove must be >= 0, not {remove}")
    if max_remove is not None and max_remove < 0:
        raise BadArgumentError(f"--max-remove must be >= 0, not {max_remove}")
    if not tolerance >= 0:
        raise BadArgumentError(f"--tolerance must be >= 0, not {tolerance}")
    if time_limit is not None and not time_limit > 0:
        raise BadArgumentError(f"--time-limit must be > 0 seconds, not {time_limit}")
    distilling = DistillOptions(distill_scope, distill_loss, distill_steps, distill_seconds,
                                distill_features) if distill else None
    if distilling is not None:
        distilling.check()
    t_start = time.perf_counter()
    laps = Laps(on_step)
    laps.start("calibration")
    paper = remove is not None
    execution = resolve(provider)
    analysis = _analyze(model, data, samples=samples, seed=seed, input_shapes=input_shapes,
                        moments=paper and linearize_mode == "affine" and remove > 0, progress=progress,
                        execution=execution)
    shapes = _sample_shapes(analysis.data)
    laps.start("exact_fusion")
    if paper:
        out, report, verifier = _paper_mode(analysis, remove, linearize_mode, shapes, execution)
    else:
        out, report, verifier = _budget_mode(analysis, tolerance=tolerance, metric=metric, strategy=strategy,
                                   max_remove=max_remove, mode=linearize_mode, refit=refit, provider=provider,
                                   shapes=shapes, seed=seed, laps=laps,
                                   deadline=None if time_limit is None else t_start + time_limit, execution=execution,
                                   distill=distilling, try_all=try_all)
    laps.stop()
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    report["phases"] = laps.report(report["seconds"])
    return Result(out, report, analysis, verifier)


def _finish(analysis: Analysis, model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict checks every written model passes: full checker and strict, typed shape inference (the latter only
    when the input passes it too: e.g. bf16 Conv has no ONNX type inference to satisfy)."""
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        try:
            onnx.shape_inference.infer_shapes(analysis.model, check_type=True, strict_mode=True)
        except onnx.shape_inference.InferenceError:
            inferred = model  # the input fails strict inference already: nothing to hold the output to
        else:
            raise OnnxEasierError(f"internal error: the optimized model fails strict shape inference ({exc}); "
                                  "nothing was written. Please report this model.") from exc
    check_model(inferred, full_check=True)
    return model


def _exact_or_input(analysis: Analysis, fused: onnx.ModelProto, judge: Judge,
                    rtol: float) -> tuple[onnx.ModelProto, float, str | None]:
    """The exact-fusion model when it passes the final checks (full checker, strict shape inference, outputs
    within ``rtol`` of the original on the held-out samples), else the input's graph unchanged, with a note: on a
    valid model that ORT runs, the exact mode never fails."""
    try:
        model = _finish(analysis, fused)
        err = judge.max_relative_error(model)
        if err <= rtol:
            return model, err, None
        reason = f"relative error {err:.2e} > {rtol:.2e} on the held-out samples"
    except (OnnxEasierError, onnx.checker.ValidationError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    note = f"the exact fusions were rolled back, the input's graph is kept: {reason}"
    log.warning("%s", note)
    original = onnx.ModelProto()
    original.CopyFrom(analysis.model)
    return original, 0.0, note


def _checked_fusion(analysis: Analysis, checks: CheckData,
                    pre: tuple[onnx.ModelProto, FusionResult] | None) -> tuple[onnx.ModelProto, FusionResult]:
    """The exact fusions, fail-safe (select.fuse_model): ``pre``, the same fusion made unchecked, when it passes the
    check fuse_model would make first (no second fusion); else fuse_model with ``checks``."""
    if pre is not None and checks.guard(analysis.model, analysis.model).failure(pre[0]) is None:
        return pre
    return fuse_model(analysis.model, analysis.model, kept_nodes(analysis.activations), checks)


def _unchanged(analysis: Analysis, pre: tuple[onnx.ModelProto, FusionResult], *, tolerance: float,
               metric: str | None, strategy: str, max_remove: int | None, mode: str, refit: bool, provider: str,
               deadline: float | None, execution: Execution,
               warning: str | None = None) -> tuple[onnx.ModelProto, dict, Callable] | None:
    """An exact-only run (no search follows) on a model that no fusion pass changes: the input is written as it
    is, after the cheap checks every written model passes (full checker, strict shape inference). Nothing else is
    measured: the same graph computes the same outputs (fidelity 0, no run) as fast (latency not measured), and the
    written file is verified by comparing it with the input. None when a pass changes the graph (or the input fails
    the checks): the full path runs. ``warning``: one for the report (and the log)."""
    fused, fusion = pre
    if not same_graph(fused, analysis.model):
        return None
    try:
        out = _finish(analysis, fused)
    except (OnnxEasierError, onnx.checker.ValidationError):
        return None  # the full path keeps the input's graph too, with its note
    note = "not measured: no change (no pass changed the graph; the input is written as it is)"
    log.info("no pass changed the graph: the input is written as it is, nothing measured")
    rtol = exact_rtol(analysis.model)
    shapes = _output_shapes(out)
    report = analysis.report()
    report["mode"] = "tolerance"
    report["linearize"] = mode
    report["strategy"] = {"requested": strategy, "chosen": "exact", "refit": refit, "max_remove": max_remove}
    report["after"] = analysis.before.as_report()
    report["fidelity"] = {"metric": metric or default_metric(shapes), "value": 0.0, "tolerance": tolerance,
                          "samples": 0, "ok": True, "components": {}, "note": note}
    report["warnings"] = [warning] if warning else []
    if warning:
        log.warning("%s", warning)
    batch = run_batch(analysis.model, analysis.data, 1)
    report["latency_ms"] = {**latency_report({}, "exact", "original", provider, batch, NOISE_MARGIN), "note": note}
    report["search"] = {}
    report["trials"] = 0
    if deadline is not None:
        report["time_limit"] = {"cut_short": False, "untried": {}, "skipped": []}
    report["passes"] = _passes(fusion.results)
    report["exactness"] = {"reference": "original (exact fusions only)", "max_relative_error": 0.0, "rtol": rtol,
                           "samples": 0, "note": note}

    def verifier(written: onnx.ModelProto) -> dict:
        if same_graph(written, out) or _same_content(written, out):
            return {"ok": True, "metric": "identical", "value": 0.0, "tolerance": tolerance, "max_relative_error": 0.0,
                    "samples": 0, "reference": "original model",
                    "note": "the file read back holds the input's graph and weights: nothing to run"}
        e = max_relative_error(analysis.model, written, analysis.data, execution)  # e.g. weights moved to OUT.data
        return {"ok": e <= rtol, "metric": "max-relative-error", "value": e, "tolerance": rtol,
                "max_relative_error": e, "samples": min(VERIFY_SAMPLES, analysis.data.samples),
                "reference": "original model"}

    return out, report, verifier


def _same_content(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """select.same_graph for models whose weights stay on disk (over 2 GB: OUT.data read back against the input's
    data): the same nodes, interface, opsets and functions, and initializers of equal name, type, shape and bytes
    wherever each is stored (compared 64 MiB at a time)."""
    ga, gb = a.graph, b.graph
    if not (list(ga.node) == list(gb.node) and list(ga.input) == list(gb.input) and list(ga.output) == list(gb.output)
            and list(a.opset_import) == list(b.opset_import) and list(a.functions) == list(b.functions)
            and len(ga.initializer) == len(gb.initializer) and not ga.sparse_initializer and not gb.sparse_initializer):
        return False
    for x, y in zip(ga.initializer, gb.initializer):
        if (x.name, list(x.dims), x.data_type) != (y.name, list(y.dims), y.data_type):
            return False
        external = onnx.TensorProto.EXTERNAL
        if x.data_location != external and y.data_location != external:
            if x != y:
                return False
        else:
            u, v = _tensor_bytes(x, a), _tensor_bytes(y, b)
            step = 1 << 26  # a copy of one chunk at a time: the mapped pages are not all kept resident
            if len(u) != len(v) or any(bytes(u[i:i + step]) != bytes(v[i:i + step]) for i in range(0, len(u), step)):
                return False
    return True


def _tensor_bytes(t: onnx.TensorProto, model: onnx.ModelProto) -> memoryview | np.memmap:
    """The bytes of ``t``: in the proto, or mapped from its external data file (read-only, nothing loaded)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return memoryview(t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes())
    info = {e.key: e.value for e in t.external_data}
    path = os.path.join(external_dir(model) or ".", info["location"])
    length = int(info["length"]) if "length" in info else None
    return np.memmap(path, np.uint8, "r", int(info.get("offset", 0)), (length,) if length is not None else None)


def _first_equal(models: dict[str, onnx.ModelProto]) -> dict[str, str]:
    """Each model's key -> the key of the first model (in order) with the same graph (select.same_graph), itself if
    none: the exact fusions of a model they do not change, two strategies that linearized the same activations."""
    first: dict[str, str] = {}
    for k, m in models.items():
        first[k] = next((j for j in first if first[j] == j and same_graph(models[j], m)), k)
    return first


def _passes(results: list) -> list[dict]:
    """The report's "passes": one entry per PassResult, in order."""
    return [{"name": r.name, "changed": r.changed, "notes": r.notes} for r in results]


def exact_rtol(model: onnx.ModelProto) -> float:
    """Base relative error allowed for "exact" rewrites (safety.base_rtol): 1e-4 in float32/64, the rounding of
    the lowest-precision float type otherwise. ``check_data`` widens it for models that amplify rounding."""
    return base_rtol(model)


def check_data(model: onnx.ModelProto, data: CalibrationData) -> CheckData:
    """The batch (at most GUARD_SAMPLES samples) every fail-safe check of this run uses, and the exactness bound
    measured on it (safety.exactness_bound)."""
    sub = data.subset(0, min(GUARD_SAMPLES, data.samples))
    feeds = list(sub.batches(run_batch(model, sub, GUARD_SAMPLES), drop_last=bool(batch_multiple(input_specs(model), data))))
    feeds = feeds[:1] or list(data.batches(run_batch(model, data, GUARD_SAMPLES)))[:1]
    rtol, sensitivity = exactness_bound(model, feeds)
    log.info("exactness bound %.2e (output change under a 2^-20 input perturbation: %.2e)", rtol, sensitivity)
    return CheckData(feeds, rtol)


def _paper_mode(analysis: Analysis, remove: int, mode: str, shapes: dict,
                execution: Execution = CPU) -> tuple[onnx.ModelProto, dict, Callable]:
    chosen = analysis.ranked()[:remove]
    if remove > len(analysis.activations):
        log.warning("--remove %d: the model has only %d activations; linearizing all", remove, len(chosen))
    fits = {a.name: analysis.stats[a.name].affine_fit() for a in chosen} if mode == "affine" else None
    checks = check_data(analysis.model, analysis.data)
    built = linearize_and_fuse(analysis.model, chosen, mode, fits, kept_nodes(analysis.activations, chosen), checks)
    out = _finish(analysis, built.model)
    rtol = checks.rtol
    err = max_relative_error(built.reference, out, analysis.data, execution)
    if err > rtol:
        raise VerificationError(
            f"internal error: the fused model differs from the linearized reference (relative error {err:.2e}); "
            "nothing was written. Please report this model."
        )
    report = analysis.report({a.name: "linearized" for a in chosen})
    report["mode"] = "remove"
    report["linearize"] = mode
    report["remove"] = remove
    report["after"] = measure(out, len(analysis.activations) - len(chosen), shapes).as_report()
    report["passes"] = _passes(built.fusion.results)
    report["fused_layers"] = {k: v._asdict() for k, v in built.fusion.mapping.items()}
    report["exactness"] = {"reference": "original with the chosen activations linearized, nothing fused",
                           "max_relative_error": err, "rtol": rtol,
                           "samples": min(VERIFY_SAMPLES, analysis.data.samples)}

    def verifier(written: onnx.ModelProto) -> dict:
        e = max_relative_error(built.reference, written, analysis.data, execution)
        return {"ok": e <= rtol, "metric": "max-relative-error", "value": e, "tolerance": rtol,
                "reference": "original with the chosen activations linearized"}

    return out, report, verifier


def _choose(models: dict[str, onnx.ModelProto], lat: dict[str, LatencyStats], linearized: dict[str, int],
            macs: Callable[[str], int], loss: dict[str, float] | None = None) -> str:
    """The model to write: among those not slower than the original (median paired latency ratio to it at most
    1 + NOISE_MARGIN, on thread CPU time for provider cpu: ``latency.fast_ties``), the shallowest of those as fast
    as the fastest (ratio to it within the same margin: timing noise cannot order them), i.e. the most activations
    linearized, then the fewest MACs, then the lowest fidelity ``loss`` (0 where not given: the exact model), then
    the lowest latency. "original" if none."""
    ties = fast_ties({k: lat[k] for k in models}, "original", NOISE_MARGIN)
    if not ties:
        return "original"
    loss = loss or {}
    return min(ties, key=lambda k: (-linearized.get(k, 0), macs(k), loss.get(k, 0.0), lat[k].figure_ms()))


def _budget_mode(analysis: Analysis, *, tolerance: float, metric: str | None, strategy: str,
                 max_remove: int | None, mode: str, refit: bool, provider: str, shapes: dict, seed: int,
                 laps: Laps,
                 deadline: float | None = None, execution: Execution = CPU, distill: DistillOptions | None = None,
                 try_all: bool = False) -> tuple[onnx.ModelProto, dict, Callable]:
    big = external_dir(analysis.model) is not None
    pre = None  # exact-only runs: the fusion, unchecked, to see whether it changes anything at all
    if not (tolerance > 0 and analysis.activations and max_remove != 0 and not big):
        try:
            pre = fuse_model(analysis.model, analysis.model, kept_nodes(analysis.activations))
        except Exception:  # noqa: BLE001 - a pass that crashes: the checked fusion below finds it and rolls it back
            pre = None
        unchanged = pre and _unchanged(analysis, pre, tolerance=tolerance, metric=metric, strategy=strategy,
                                       max_remove=max_remove, mode=mode, refit=refit, provider=provider,
                                       deadline=deadline, execution=execution, warning=BIG_NOTE if big else None)
        if unchanged:
            return unchanged
    # the parts are views of one reordered copy, which replaces the data as loaded: held once, not twice
    planned = metric or default_metric(_output_shapes(analysis.model))  # the Judge's, before anything has run
    analysis.data, (fit, check, holdout) = permuted_split(
        analysis.data, batch_multiple(input_specs(analysis.model), analysis.data) or 1, seed,
        holdout_needed(planned, tolerance))
    batch = run_batch(analysis.model, holdout, choose_batch_size(  # the fidelity runs' and the re-fits' batch
        input_specs(analysis.model), holdout, max_batch=32, sample_bytes=activation_bytes(analysis.model, shapes)))
    judge = Judge(analysis.model, holdout, metric, tolerance, batch, execution)
    checks = check_data(analysis.model, holdout)
    rtol = checks.rtol
    exact_model, exact_fusion = _checked_fusion(analysis, checks, pre)
    exact_model, err, fallback = _exact_or_input(analysis, exact_model, judge, rtol)
    release()  # the fusion's gs graphs (reference cycles) hold model copies
    if fallback:
        exact_fusion.results.append(PassResult("fusion", 0, [fallback]))
    entropy = {a.name: analysis.entropy(a) for a in analysis.activations}
    recovery = None if distill is None else _recovery(analysis.model, exact_model, fit, check, judge, distill, seed,
                                                      provider, laps.created)
    search = Search(analysis.model, exact_model, analysis.activations, entropy, fit, check, judge, mode, refit,
                    max_remove, shapes, None, checks, deadline, on_step=laps.on_step, try_all=try_all,
                    recover=recovery)
    results: list[SearchResult] = []
    skipped: list[str] = []  # strategies the time limit left unrun
    not_run: dict[str, str] = {}  # strategies auto did not run, and why
    big_note = None
    if big:
        big_note = BIG_NOTE
        log.warning("%s", big_note)
    if tolerance > 0 and analysis.activations and max_remove != 0 and not big:
        laps.start("search")
        for s in (("merge", "entropy") if strategy == "auto" else (strategy,)):
            if deadline is not None and time.perf_counter() >= deadline:
                skipped.append(s)
                continue
            if strategy == "auto" and s == "entropy" and results and not search.has_groups():
                not_run["entropy"] = ("no group of several activations merges layers: the merge search tried the "
                                      "same candidates, in another order")
                continue
            if strategy == "auto" and s == "entropy" and results and any(
                    len(t.acts) > 1 and t.accepted for t in results[0].trials):
                not_run["entropy"] = ("the merge search kept a group of several activations: an activation-by-"
                                      "activation search would only reach those merges part by part")
                continue
            results.append(search.run(s))

    # latency: original, exact, every search result, interleaved; keep the fastest, never slower than the input
    laps.start("latency")
    lat_batch = run_batch(analysis.model, analysis.data, 1)  # batch 1 unless the model fixes its batch
    feeds = next(analysis.data.batches(lat_batch, drop_last=True))
    models = {"original": analysis.model, "exact": exact_model}
    for r in results:
        if r.linearized:
            try:
                models[f"search:{r.strategy}"] = _finish(analysis, r.model)
            except (OnnxEasierError, onnx.checker.ValidationError) as exc:  # never pay for a broken rewrite
                log.warning("the %s search's model is dropped: %s", r.strategy, exc)
    if big:
        lat, chosen = {}, "exact"  # the exact fusions never add MACs (cost-aware)
    else:
        same = _first_equal(models)  # a model with the graph of an earlier one is timed once, as that one
        timed = [k for k in models if same[k] == k]
        laps.say(f"measuring latency of {len(timed)} models on {provider} (interleaved, "
                 f"{'thread CPU' if provider == 'cpu' else 'wall'} time)")
        lat = measure_latency({k: models[k] for k in timed}, feeds, provider=provider, reference="original",
                              margin=NOISE_MARGIN)
        lat = {k: lat[same[k]] for k in models}
        chosen = _choose(models, lat, {f"search:{r.strategy}": len(r.linearized) for r in results},
                         lambda k: measure(models[k], 0, shapes).macs,
                         {f"search:{r.strategy}": r.fidelity.value for r in results if r.fidelity is not None})
    note = None
    if chosen in ("exact", "original") and any(r.linearized for r in results):
        note = "no linearization made the model faster: only the exact fusions were kept"
        log.warning("%s", note)
    result = next((r for r in results if f"search:{r.strategy}" == chosen), None)
    out = models[chosen]
    linearized = set(result.linearized) if result else set()
    laps.start("verification", "fidelity of the model chosen on the held-out samples")
    fidelity = judge(out)
    distilled = None
    if distill is not None and result is None:
        distilled = {"kept": False, "scope": distill.scope, "note": "no search model was chosen: nothing to distil"}
    elif distill is not None:
        laps.start("distillation", f"distilling the merged layers to the original ({distill.scope})")
        out, fidelity, distilled = _distill(analysis, out, fidelity, judge, recovery)

    tried: dict[str, float] = {}  # the fidelity each activation had when first tried by the strategy kept
    for r in [result] if result else results:
        for t in r.trials:
            for n in t.acts:
                tried.setdefault(n, t.fidelity)
    report = analysis.report({n: "linearized" for n in linearized})
    for a in report["activations"]:
        if a["node"] in tried:
            a["fidelity"] = tried[a["node"]]
    report["mode"] = "tolerance"
    report["linearize"] = mode
    report["strategy"] = {"requested": strategy, "chosen": result.strategy if result else chosen,
                          "refit": refit, "max_remove": max_remove, **({"not_run": not_run} if not_run else {})}
    n_after = len(analysis.activations) - len(linearized)
    report["after"] = measure(out, n_after, shapes).as_report()
    report["fidelity"] = {**fidelity.as_report(), "tolerance": tolerance,
                          "samples": holdout.samples, "fit_samples": fit.samples, "check_samples": check.samples}
    if distilled is not None:
        report["distill"] = distilled
        if recovery is not None:
            report["distill"]["search"] = {
                "distilled": len(recovery.records), "seconds": round(recovery.used, 3),
                "accepted": sum(bool(t.distill and t.distill["accepted"]) for r in results for t in r.trials)}
    warning = fidelity.training_data_warning()
    report["fidelity"]["bound_method"] = BOUND_METHOD
    resolution_note = judge.warning if any(r.trials for r in results) else None
    report["warnings"] = [w for w in (warning, resolution_note, note, fallback, big_note) if w]
    report["latency_ms"] = latency_report(lat, chosen, "original", provider,
                                          int(next(iter(feeds.values())).shape[0]), NOISE_MARGIN)
    report["search"] = {r.strategy: {"linearized": r.linearized, "seconds": round(r.seconds, 3),
                                     "trials": [t.as_report() for t in r.trials],
                                     "skipped": [{"activations": a, "reason": why} for a, why in r.skipped]}
                          for r in results}
    report["trials"] = sum(len(r.trials) for r in results)
    if deadline is not None:
        untried = {r.strategy: r.untried for r in results if r.untried}
        report["time_limit"] = {"cut_short": bool(untried or skipped), "untried": untried, "skipped": skipped}
        if untried or skipped:
            report["warnings"].append(
                f"the time limit cut the search short ({sum(untried.values())} candidates untried"
                + (f", strategy {', '.join(skipped)} not run" if skipped else "")
                + "): the model written is the best one verified until then")
    report["passes"] = _passes(exact_fusion.results)
    report["exactness"] = {"reference": "original (exact fusions only)", "max_relative_error": err,
                           "rtol": rtol, "samples": holdout.samples}

    out_error = judge.max_relative_error(out)  # the Judge keeps the figures of the model it measured last: no run

    def verifier(written: onnx.ModelProto) -> dict:
        same = same_graph(written, out)  # the file read back holds the model measured above: its figures stand
        f = fidelity if same else judge(written)
        e = out_error if same else judge.max_relative_error(written)
        return {"ok": bool(f.ok or e <= rtol), "metric": f.metric, "value": float(f.value),
                "tolerance": tolerance, "max_relative_error": e, "samples": holdout.samples,
                "reference": "original model",
                **({"note": "the file read back holds the graph and weights measured on the held-out samples"}
                   if same else {})}

    return out, report, verifier


def max_relative_error(a: onnx.ModelProto, b: onnx.ModelProto, data: CalibrationData,
                       execution: Execution = CPU) -> float:
    """``select.output_error`` of ``b`` against ``a`` on the first VERIFY_SAMPLES samples of ``data``, both run on
    ``execution``. One session at a time (two would map the weights of a model over 2 GB twice): ``a``'s outputs
    are kept, then ``b`` runs."""
    sub = data.subset(0, min(VERIFY_SAMPLES, data.samples))
    feeds = list(sub.batches(run_batch(a, sub, 16), drop_last=bool(batch_multiple(input_specs(a), data))))
    session = execution.session(a)
    names = [o.name for o in session.get_outputs()]
    expected = [session.run(names, feed) for feed in feeds]
    del session  # freed before the next one maps its weights
    session = execution.session(b)
    return max((output_error(ref, session.run(names, feed)) for ref, feed in zip(expected, feeds)), default=0.0)


DISTILL_INSTALL = 'pip install "onnx-easier[distill]"'


@dataclass(frozen=True)
class DistillOptions:
    """``--distill``'s settings: the layers trained (``scope``), the classifier loss (``loss``), each
    distillation's schedule (``steps``; None: distill.DEFAULT_STEPS), the time for all of it (``seconds``;
    None: distill.BUDGET_SHARE of the run's own time) and the weight of the feature-matching term (``features``)."""

    scope: str = "merged"
    loss: str = "kl"
    steps: int | None = None
    seconds: float | None = None
    features: float = 0.0

    def check(self) -> None:
        """The arguments, and torch (an optional dependency: the ``distill`` extra)."""
        if self.scope not in ("merged", "all"):
            raise BadArgumentError(f"--distill-scope must be merged or all, not {self.scope!r}")
        if self.loss not in ("kl", "logits"):
            raise BadArgumentError(f"--distill-loss must be kl or logits, not {self.loss!r}")
        if self.steps is not None and not self.steps >= 1:
            raise BadArgumentError(f"--distill-steps must be >= 1, not {self.steps}")
        if self.seconds is not None and not self.seconds > 0:
            raise BadArgumentError(f"--distill-seconds must be > 0, not {self.seconds}")
        if not (self.features >= 0 and math.isfinite(self.features)):
            raise BadArgumentError(f"--distill-features must be a finite weight >= 0, not {self.features}")
        if importlib.util.find_spec("torch") is None:
            raise BadArgumentError(f"--distill needs torch: {DISTILL_INSTALL}")


def _recovery(original: onnx.ModelProto, baseline: onnx.ModelProto, fit: CalibrationData, check: CalibrationData,
              judge: Judge, options: DistillOptions, seed: int, provider: str, started: float) -> Recovery:
    """distill.Recovery for the search: candidates that fail the budget get a distillation before rejection, and
    the chosen model what time is left. torch's import (a second or more) is charged to the distillation's time;
    its objects are then left out of the garbage collections of the run (memory.exempt_live_objects: otherwise
    every release() between steps scans them)."""
    t0 = time.perf_counter()
    from onnx_easier.distill import Recovery, torch_device

    exempt_live_objects()
    return Recovery(original, baseline, fit, check, tolerance=judge.tolerance, metric=judge.metric,
                    seconds=options.seconds, scope=options.scope, seed=seed, device=torch_device(provider),
                    spent=time.perf_counter() - t0, started=started, loss=options.loss, steps=options.steps,
                    features=options.features)


def _distill(analysis: Analysis, model: onnx.ModelProto, fidelity: Fidelity, judge: Judge,
             recovery: Recovery) -> tuple[onnx.ModelProto, Fidelity, dict]:
    """``model`` distilled with the time ``recovery`` has left (distill.Recovery.final: the layers changed from the
    exact fusions, with scope ``merged``), with its fidelity on the held-out samples, if that improved; else
    ``model`` and ``fidelity`` unchanged. The report's ``distill``: fidelity before / after, kept, and the
    training's figures (a ``note`` instead when no time was left, or when the loss is rounding: distill.NOTHING_TO_RECOVER)."""
    from onnx_easier.distill import NOTHING_TO_RECOVER

    exact = not fidelity.value > NOTHING_TO_RECOVER
    r = None if exact else recovery.final(model)
    if r is None:
        note = (f"nothing to recover: the chosen model's fidelity loss {fidelity.value:.2g} is rounding" if exact else
                f"no time left for the chosen model: {recovery.used:.1f} s of the {recovery.budget():.1f} s "
                f"budget used")
        log.info("no distillation: %s", note)
        return model, fidelity, {"before": float(fidelity.value), "after": float(fidelity.value), "kept": False,
                                 "scope": recovery.scope, "loss": recovery.loss, "note": note}
    after = judge(r.model) if r.model is not model else fidelity
    kept = bool(after.value < fidelity.value and (after.accepted or not fidelity.accepted))
    rep = {"before": float(fidelity.value), "after": float(after.value), "kept": kept, **r.as_report()}
    if not kept:
        return model, fidelity, rep
    log.info("distillation kept: fidelity loss %.5f -> %.5f", fidelity.value, after.value)
    return _finish(analysis, r.model), after, rep
