"""Latency of several models on the same inputs, measured interleaved so that they share the machine's noise.

Each model gets one ONNX Runtime session as deployed: graph optimizations ON (``ORT_ENABLE_ALL``), ``threads``
intra-op threads (0 = ORT's default, all cores). After ``warmup`` untimed runs per model, the models take turns:
in each round every model runs one timed *block* of ``repeats`` back-to-back runs, and the round's figure for
that model is ``block time / repeats``. The order of the models rotates from round to round, so none always
runs first after the others. Reported: the median over rounds (and the 10th / 90th percentiles) in ms per run.

Interleaving matters on a shared machine: a burst of load from another process slows the rounds it overlaps,
and since every model has a block in every round, the burst lands on all of them rather than on one model's
whole measurement. The median then discards the disturbed rounds.

The measurement is time-budgeted: with ``repeats=None`` each block is sized from the warm-up timings so that
``rounds`` rounds of all models take about ``budget_s`` seconds; with ``rounds=None`` rounds go on until the
budget is spent (at least MIN_ROUNDS, at most MAX_ROUNDS). A model slower than the budget still gets MIN_ROUNDS
blocks of one run.

``provider="cuda"`` uses CUDAExecutionProvider (CPU for the nodes it lacks) with IO binding: inputs are copied to
the GPU once and outputs stay there, so the time is the model's, not the PCIe copies' (which are the same for
every model and would only dilute a before/after ratio).
"""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnx_easier.errors import BadArgumentError, BadDataError
from onnx_easier.graph_utils import contiguous
from onnx_easier.model_io import make_session

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEFAULT_BUDGET_S = 1.5
DEFAULT_ROUNDS = 20  # with repeats=None: rounds the blocks are sized for
MIN_ROUNDS, MAX_ROUNDS = 5, 200


@dataclass
class LatencyStats:
    """Milliseconds per run of one model: median and 10th / 90th percentiles over ``rounds`` timed blocks of
    ``block`` runs each."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    rounds: int
    block: int
    provider: str
    threads: int

    @property
    def runs(self) -> int:
        """Timed runs in all."""
        return self.rounds * self.block

    def as_report(self) -> dict:
        """JSON-ready form (the report's ``latency_ms.before`` / ``after``)."""
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "rounds": self.rounds,
                "block": self.block, "provider": self.provider, "threads": self.threads}


def ratio(after: LatencyStats, before: LatencyStats) -> float:
    """``after.median_ms / before.median_ms``: below 1 means ``after`` is faster."""
    if before.median_ms <= 0:
        raise ValueError("the 'before' latency is not positive: no ratio")
    return after.median_ms / before.median_ms


def _session(model: onnx.ModelProto | bytes, provider: str, threads: int) -> ort.InferenceSession:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    wanted = PROVIDERS[provider]
    providers = [wanted] if provider == "cpu" else [wanted, "CPUExecutionProvider"]
    sess = make_session(proto, optimize=True, providers=providers, threads=threads)
    if sess.get_providers()[0] != wanted:  # ORT falls back to CPU with a warning when CUDA fails to load
        raise BadArgumentError(
            f"--provider {provider}: ONNX Runtime could not start {wanted} (CUDA or cuDNN libraries missing?)"
        )
    return sess


def _runner(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], label: str, provider: str) -> Callable[[], None]:
    """A no-argument function doing one inference of ``sess`` on ``feeds``."""
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BadDataError(f"{label}: no input given for {', '.join(repr(n) for n in missing)}")
    feed = {n: np.asarray(feeds[n]) for n in names}
    outputs = [o.name for o in sess.get_outputs()]
    if provider == "cpu":

        def run_cpu() -> None:
            sess.run(outputs, feed)

        return run_cpu
    binding = sess.io_binding()
    for n, arr in feed.items():
        binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(contiguous(arr), "cuda", 0))
    for n in outputs:
        binding.bind_output(n, "cuda")

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def _check_args(provider: str, threads: int, warmup: int, repeats: int | None, rounds: int | None,
                budget_s: float) -> None:
    if provider not in PROVIDERS:
        raise BadArgumentError(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if provider == "cuda" and PROVIDERS["cuda"] not in ort.get_available_providers():
        raise BadArgumentError(
            "--provider cuda: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu or use cpu"
        )
    if threads < 0:
        raise BadArgumentError(f"--threads must be >= 0 (0 = all cores), not {threads}")
    if warmup < 0:
        raise BadArgumentError(f"warmup must be >= 0, not {warmup}")
    if repeats is not None and repeats < 1:
        raise BadArgumentError(f"repeats must be >= 1, not {repeats}")
    if rounds is not None and rounds < 1:
        raise BadArgumentError(f"rounds must be >= 1, not {rounds}")
    if not budget_s > 0:
        raise BadArgumentError(f"the time budget must be > 0 s, not {budget_s}")


def measure_latency(
    models: dict[str, onnx.ModelProto | bytes],
    feeds: dict[str, np.ndarray],
    *,
    provider: str = "cpu",
    threads: int = 1,
    warmup: int = 5,
    repeats: int | None = None,
    rounds: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
) -> dict[str, LatencyStats]:
    """Milliseconds per run of each model on ``feeds``, measured interleaved (module doc); same keys as ``models``.

    ``feeds`` maps input names to arrays and must cover every model's inputs (extra names are ignored per model).
    ``repeats`` (runs per timed block) and ``rounds`` default to what fits ``budget_s`` seconds of timing.
    Raises BadArgumentError for an unknown or unavailable provider, BadDataError for a missing input.
    """
    _check_args(provider, threads, warmup, repeats, rounds, budget_s)
    if not models:
        return {}
    labels = list(models)
    runners = {k: _runner(_session(models[k], provider, threads), feeds, k, provider) for k in labels}

    per_run: dict[str, float] = {}
    for k in labels:  # warm-up, and a first estimate of one run's time
        times = []
        for _ in range(max(warmup, 0 if repeats else 2)):
            t0 = time.perf_counter()
            runners[k]()
            times.append(time.perf_counter() - t0)
        per_run[k] = float(np.median(times[1:] if len(times) > 1 else times)) if times else 0.0

    target_rounds = rounds or DEFAULT_ROUNDS
    share = budget_s / (target_rounds * len(labels))  # seconds per block
    blocks = {k: repeats or max(1, int(share / max(per_run[k], 1e-7))) for k in labels}

    samples: dict[str, list[float]] = {k: [] for k in labels}
    start = time.perf_counter()
    done = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            if rounds is not None:
                if done >= rounds:
                    break
            elif done >= MAX_ROUNDS or (done >= MIN_ROUNDS and time.perf_counter() - start >= budget_s):
                break
            shift = done % len(labels)
            for k in labels[shift:] + labels[:shift]:
                run, n = runners[k], blocks[k]
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    run()
                samples[k].append((time.perf_counter_ns() - t0) / n / 1e6)
            done += 1
    finally:
        if gc_was_enabled:
            gc.enable()

    result = {}
    for k in labels:
        ms = np.asarray(samples[k])
        p10, median, p90 = (float(v) for v in np.percentile(ms, [10, 50, 90]))
        result[k] = LatencyStats(median, p10, p90, done, blocks[k], provider, threads)
        log.info("latency %s: %.3f ms per run (p10 %.3f, p90 %.3f) over %d rounds of %d runs on %s",
                 k, median, p10, p90, done, blocks[k], provider)
    return result
