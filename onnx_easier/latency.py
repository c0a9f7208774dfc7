"""Latency of several models on the same inputs, measured interleaved so that they share the machine's noise.

Each model gets one ONNX Runtime session as deployed: graph optimizations ON (``ORT_ENABLE_ALL``), ``threads``
intra-op threads (0 = ORT's default, all cores). After ``warmup`` untimed runs per model, the models take turns:
in each round every model runs one timed *block* of ``repeats`` back-to-back runs, and the round's figure for
that model is ``block time / repeats``. The order of the models rotates from round to round, so none always
runs first after the others. Reported: the median over rounds (and the 10th / 90th percentiles) in ms per run.

Interleaving matters on a shared machine: a burst of load from another process slows the rounds it overlaps,
and since every model has a block in every round, the burst lands on all of them rather than on one model's
whole measurement. The median then discards the disturbed rounds.

The measurement is time-budgeted, on the clock of its basis (below: thread CPU time, or wall time): with
``repeats=None`` each block is sized from the warm-up timings so that ``rounds`` rounds of all models take about
``budget_s`` seconds; with ``rounds=None`` rounds go on until the budget is spent (at least MIN_ROUNDS, at most
MAX_ROUNDS; with a ``reference``, from EARLY_LOOK of the budget and of the rounds on, as soon as every comparison
is resolved: see below). A model slower than the budget still gets MIN_ROUNDS blocks of one run. A thread CPU
budget keeps the rounds as many on a busy machine as on an idle one (the wall time grows with the load, as every
other step's does), up to MAX_WALL_FACTOR x ``budget_s`` of wall time.

``provider="cuda"`` uses CUDAExecutionProvider (CPU for the nodes it lacks) with IO binding: inputs are copied to
the GPU once and outputs stay there, so the time is the model's, not the PCIe copies' (which are the same for
every model and would only dilute a before/after ratio).

**Two clocks.** Every block is timed on the wall clock and on the calling thread's CPU clock
(``time.thread_time_ns``). With one intra-op thread (and one inter-op thread, sequential execution) ONNX Runtime
computes a CPU-provider run on the calling thread, so its thread CPU time is the work of the run alone: another
process on the same core preempts the thread, which lengthens the wall time of the block it lands in but not its
CPU time. Decisions use the *basis* ``"thread-cpu"`` for provider cpu with one thread and ``"wall"`` otherwise (a
GPU's work, or other intra-op threads' work, does not show in the calling thread's CPU time; on Windows the
thread CPU clock is too coarse: wall).

**Ratios and when to stop.** Models are compared by the paired per-round ratio (``a``'s figure over ``b``'s in the
same round, on the basis): its median, with a distribution-free interval for that median from the sign test
(order statistics of the rounds' ratios, CONFIDENCE 99%). Given a ``reference`` model and a ``margin``, the rounds
go on past ``budget_s`` until every comparison a choice within the margin depends on (each model against the
reference; each model not slower than the reference against the fastest of them, by ``fast_ties``) has its
interval entirely on one side of ``1 + margin``, or until MAX_BUDGET_FACTOR x ``budget_s`` or MAX_ROUNDS rounds;
then the median ratios decide. The first look is at EARLY_LOOK of the budget and of the rounds it was sized for
(8 of 20, the fewest rounds whose 99% sign-test interval exists: it is their range, so all 8 must lie on one
side): a merge that clearly gains or clearly loses stops there (ffn_digits' 0.66x: 0.6 s of thread CPU time
instead of 1.5).
"""
from __future__ import annotations

import gc
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnx_easier.errors import BadArgumentError, BadDataError
from onnx_easier.execution import Execution, resolve
from onnx_easier.graph_utils import contiguous

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 1.5
DEFAULT_ROUNDS = 20  # with repeats=None: rounds the blocks are sized for
MIN_ROUNDS, MAX_ROUNDS = 5, 200
MAX_BUDGET_FACTOR = 4  # with a reference: rounds go on until resolved, for at most this many times budget_s
MAX_WALL_FACTOR = 20  # and never past this many times budget_s of wall time (a thread CPU budget on a busy machine)
CONFIDENCE = 0.99  # of the sign-test interval of a median per-round ratio
EARLY_LOOK = 0.4  # with a reference: share of the budget (and of the rounds) after which resolved comparisons stop it
# Windows' thread CPU clock advances in scheduler ticks (about 15.6 ms), as coarse as a whole timed block
THREAD_CLOCK_FINE = sys.platform != "win32"


@dataclass
class LatencyStats:
    """Milliseconds per run of one model over ``rounds`` timed blocks of ``block`` runs each: ``median_ms``,
    ``p10_ms``, ``p90_ms`` on the wall clock, ``cpu_*`` in the calling thread's CPU time (None where that is not
    the run's work: provider cuda, or more than one thread). ``basis`` is the one decisions use; ``wall_rounds`` /
    ``cpu_rounds`` are the per-round figures, in round order (paired across the models of one measurement)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    rounds: int
    block: int
    provider: str
    threads: int
    cpu_median_ms: float | None = None
    cpu_p10_ms: float | None = None
    cpu_p90_ms: float | None = None
    wall_rounds: tuple[float, ...] = field(default=(), repr=False)
    cpu_rounds: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_rounds(cls, wall: list[float], cpu: list[float] | None, block: int, provider: str,
                    threads: int) -> LatencyStats:
        """The statistics of per-round figures (ms per run, in round order); ``cpu`` None: no thread CPU time."""
        p10, median, p90 = (float(v) for v in np.percentile(wall, [10, 50, 90]))
        cp10 = cmedian = cp90 = None
        if cpu is not None:
            cp10, cmedian, cp90 = (float(v) for v in np.percentile(cpu, [10, 50, 90]))
        return cls(median, p10, p90, len(wall), block, provider, threads, cmedian, cp10, cp90, tuple(wall),
                   tuple(cpu or ()))

    @property
    def basis(self) -> str:
        """"thread-cpu" when the thread CPU figures exist, else "wall"."""
        return "thread-cpu" if self.cpu_median_ms is not None else "wall"

    @property
    def runs(self) -> int:
        """Timed runs in all."""
        return self.rounds * self.block

    def figure_ms(self, basis: str | None = None) -> float:
        """The median on ``basis`` (default: this model's own basis)."""
        if (basis or self.basis) == "thread-cpu" and self.cpu_median_ms is not None:
            return self.cpu_median_ms
        return self.median_ms

    def per_round(self, basis: str | None = None) -> tuple[float, ...]:
        """The per-round figures on ``basis`` (default: this model's own basis)."""
        return self.cpu_rounds if (basis or self.basis) == "thread-cpu" else self.wall_rounds

    def as_report(self) -> dict:
        """JSON-ready form (the report's ``latency_ms.candidates``): ``*_ms`` wall time, ``cpu_*_ms`` thread CPU
        time (None where not measured), ``basis`` the figure decisions use."""
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "cpu_median_ms": self.cpu_median_ms, "cpu_p10_ms": self.cpu_p10_ms, "cpu_p90_ms": self.cpu_p90_ms,
                "basis": self.basis, "rounds": self.rounds, "block": self.block, "provider": self.provider,
                "threads": self.threads}


@dataclass(frozen=True)
class Ratio:
    """``a / b`` on ``basis``: ``value`` the median of the per-round ratios, ``[low, high]`` its sign-test
    interval at CONFIDENCE over ``rounds`` rounds (rounds 0: no per-round figures, the ratio of the medians and an
    interval of zero width; too few rounds for CONFIDENCE: the interval is (0, inf))."""

    value: float
    low: float
    high: float
    rounds: int
    basis: str

    def decided(self, bound: float) -> bool:
        """Whether the interval lies on one side of ``bound``: the answer to ``value <= bound`` is resolved."""
        return self.high <= bound or self.low > bound


def ratio(after: LatencyStats, before: LatencyStats) -> float:
    """``after / before`` of the medians on their shared basis (thread CPU time when both have it, else wall):
    below 1 means ``after`` is faster."""
    basis = after.basis if after.basis == before.basis else "wall"
    if before.figure_ms(basis) <= 0:
        raise ValueError("the 'before' latency is not positive: no ratio")
    return after.figure_ms(basis) / before.figure_ms(basis)


def sign_rank(n: int, confidence: float = CONFIDENCE) -> int:
    """The largest k with ``2 P(Binom(n, 1/2) < k) <= 1 - confidence``: the order statistics ``[x_(k),
    x_(n+1-k)]`` of n samples cover their median with probability at least ``confidence``. 0: n is too small."""
    alpha, k, tail = 1.0 - confidence, 0, 0.0
    while k < (n + 1) // 2:
        tail += math.comb(n, k) / (1 << n)  # P(B <= k)
        if 2 * tail > alpha:
            break
        k += 1
    return k


def paired_ratio(a: LatencyStats, b: LatencyStats, basis: str | None = None,
                 confidence: float = CONFIDENCE) -> Ratio:
    """``a / b`` round by round (both from one measurement) on ``basis`` (default: their shared basis; wall
    when they differ): the median ratio and its sign-test interval (Ratio)."""
    basis = basis or (a.basis if a.basis == b.basis else "wall")
    ra, rb = np.asarray(a.per_round(basis)), np.asarray(b.per_round(basis))
    if ra.size == 0 or ra.size != rb.size or not (rb > 0).all():
        value = a.figure_ms(basis) / b.figure_ms(basis)
        return Ratio(value, value, value, 0, basis)
    r = np.sort(ra / rb)
    k = sign_rank(r.size, confidence)
    low, high = (float(r[k - 1]), float(r[r.size - k])) if k else (0.0, math.inf)
    return Ratio(float(np.median(r)), low, high, int(r.size), basis)


def _compare(stats: dict[str, LatencyStats], reference: str, margin: float) -> tuple[list[str], list[Ratio]]:
    """(fast_ties, the ratios that decided it)."""
    bound = 1.0 + margin
    base = {k: paired_ratio(s, stats[reference]) for k, s in stats.items() if k != reference}
    used = list(base.values())
    fast = [k for k, r in base.items() if r.value <= bound]
    if not fast:
        return [], used
    best = min(fast, key=lambda k: base[k].value)
    ties = []
    for k in fast:
        if k != best:
            used.append(paired_ratio(stats[k], stats[best]))
        if k == best or used[-1].value <= bound:
            ties.append(k)
    return ties, used


def fast_ties(stats: dict[str, LatencyStats], reference: str, margin: float) -> list[str]:
    """The models other than ``reference`` that are not slower than it (median paired ratio to it at most
    ``1 + margin``) and as fast as the fastest of those (ratio to it at most ``1 + margin``: timing cannot order
    them), in the order of ``stats``. Empty if none is as fast as the reference."""
    return _compare(stats, reference, margin)[0]


def unresolved(stats: dict[str, LatencyStats], reference: str, margin: float) -> int:
    """How many of the ratios ``fast_ties`` depends on have an interval that contains ``1 + margin``."""
    return sum(not r.decided(1.0 + margin) for r in _compare(stats, reference, margin)[1])


def _session(model: onnx.ModelProto | bytes, provider: str, threads: int) -> ort.InferenceSession:
    """A timed session on ``provider`` (execution.py: ORT's defaults, as deployed; checked that it started)."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    return Execution(provider).session(proto, optimize=True, threads=threads, timed=True)


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
    resolve(provider)  # unknown, missing or failing to start: BadArgumentError
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
    reference: str | None = None,
    margin: float = 0.03,
) -> dict[str, LatencyStats]:
    """Milliseconds per run of each model on ``feeds``, measured interleaved (module doc); same keys as ``models``.

    ``feeds`` maps input names to arrays and must cover every model's inputs (extra names are ignored per model).
    ``repeats`` (runs per timed block) and ``rounds`` default to what fits ``budget_s`` seconds of timing; with
    ``reference`` (a key of ``models``) and ``rounds=None``, rounds go on until the comparisons within ``margin``
    of it are resolved (module doc). Thread CPU time is measured for provider cpu with ``threads=1``.
    Raises BadArgumentError for an unknown or unavailable provider, BadDataError for a missing input.
    """
    _check_args(provider, threads, warmup, repeats, rounds, budget_s)
    if not models:
        return {}
    if reference is not None and reference not in models:
        raise BadArgumentError(f"the latency reference {reference!r} is not one of the models measured")
    labels = list(models)
    runners = {k: _runner(_session(models[k], provider, threads), feeds, k, provider) for k in labels}
    cpu_basis = provider == "cpu" and threads == 1 and THREAD_CLOCK_FINE

    clock = time.thread_time if cpu_basis else time.perf_counter  # of the budget: the basis's clock
    per_run: dict[str, float] = {}
    for k in labels:  # warm-up, and a first estimate of one run's time
        times = []
        for _ in range(max(warmup, 0 if repeats else 2)):
            t0 = clock()
            runners[k]()
            times.append(clock() - t0)
        per_run[k] = float(np.median(times[1:] if len(times) > 1 else times)) if times else 0.0

    target_rounds = rounds or DEFAULT_ROUNDS
    share = budget_s / (target_rounds * len(labels))  # seconds per block
    blocks = {k: repeats or max(1, int(share / max(per_run[k], 1e-7))) for k in labels}

    wall: dict[str, list[float]] = {k: [] for k in labels}
    cpu: dict[str, list[float]] = {k: [] for k in labels}

    def stats() -> dict[str, LatencyStats]:
        return {k: LatencyStats.from_rounds(wall[k], cpu[k] if cpu_basis else None, blocks[k], provider, threads)
                for k in labels}

    def enough(done: int) -> bool:
        if rounds is not None:
            return done >= rounds
        if done >= MAX_ROUNDS:
            return True
        elapsed = clock() - start
        capped = elapsed >= MAX_BUDGET_FACTOR * budget_s or time.perf_counter() - wall_start >= MAX_WALL_FACTOR * budget_s
        if done >= MIN_ROUNDS and capped:
            return True
        if done < MIN_ROUNDS or elapsed < EARLY_LOOK * budget_s or reference is None or len(labels) < 2:
            return done >= MIN_ROUNDS and elapsed >= budget_s
        if elapsed < budget_s and done < EARLY_LOOK * target_rounds:
            return False
        return unresolved(stats(), reference, margin) == 0

    start, wall_start = clock(), time.perf_counter()
    done = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while not enough(done):
            shift = done % len(labels)
            for k in labels[shift:] + labels[:shift]:
                run, n = runners[k], blocks[k]
                t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                for _ in range(n):
                    run()
                c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
                wall[k].append((t1 - t0) / n / 1e6)
                cpu[k].append((c1 - c0) / n / 1e6)
            done += 1
    finally:
        if gc_was_enabled:
            gc.enable()

    result = stats()
    for k, s in result.items():
        cpu_text = "" if s.cpu_median_ms is None else (
            f", thread CPU {s.cpu_median_ms:.3f} ms (p10 {s.cpu_p10_ms:.3f}, p90 {s.cpu_p90_ms:.3f})")
        log.info("latency %s: wall %.3f ms per run (p10 %.3f, p90 %.3f)%s over %d rounds of %d runs on %s",
                 k, s.median_ms, s.p10_ms, s.p90_ms, cpu_text, done, blocks[k], provider)
    if reference is not None and len(labels) > 1:
        log.info("latency: %d rounds in %.1f s (%.1f s on the %s clock), %d comparison(s) within %.0f%% of %s "
                 "unresolved", done, time.perf_counter() - wall_start, clock() - start,
                 "thread CPU" if cpu_basis else "wall", unresolved(result, reference, margin), 100 * margin, reference)
    return result


def describe(provider: str, basis: str | None, threads: int | None, batch: int | None) -> str:
    """What a latency figure is, in words: "cpu provider, thread CPU time, 1 thread, batch 1"."""
    clock = {"thread-cpu": "thread CPU time", "wall": "wall time"}.get(basis or "", "not measured")
    parts = [f"{provider} provider", clock]
    if threads is not None:
        parts.append("all threads" if threads == 0 else f"{threads} thread{'s' if threads > 1 else ''}")
    if batch is not None:
        parts.append(f"batch {batch}")
    return ", ".join(parts)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def latency_report(lat: dict[str, LatencyStats], chosen: str, reference: str, provider: str, batch: int,
                   margin: float) -> dict:
    """The report's ``latency_ms``: ``before`` / ``after`` the medians of ``reference`` and ``chosen`` on the
    decision ``basis``, ``ratio`` the median paired ratio (what the choice used) with its sign-test ``interval``
    (None: too few rounds), the same on the wall clock under ``wall``, a ``label`` saying what the figures are,
    ``unresolved`` the comparisons whose interval still held ``1 + margin``, and every model's stats."""
    if not lat:
        return {"before": None, "after": None, "provider": provider, "batch": batch, "ratio": None,
                "basis": None, "label": describe(provider, None, None, batch), "candidates": {}}
    a, b = lat[chosen], lat[reference]
    r, w = paired_ratio(a, b), paired_ratio(a, b, "wall")
    return {"before": b.figure_ms(r.basis), "after": a.figure_ms(r.basis), "provider": provider, "batch": batch,
            "ratio": r.value, "basis": r.basis, "threads": b.threads,
            "label": describe(provider, r.basis, b.threads, batch),
            "interval": [_finite_or_none(r.low), _finite_or_none(r.high)], "confidence": CONFIDENCE,
            "rounds": b.rounds, "margin": margin, "unresolved": unresolved(lat, reference, margin),
            "wall": {"before": b.median_ms, "after": a.median_ms, "ratio": w.value,
                     "interval": [_finite_or_none(w.low), _finite_or_none(w.high)]},
            "candidates": {k: v.as_report() for k, v in lat.items()}}
