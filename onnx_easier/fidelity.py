"""Fidelity of a candidate model against the original: how far its outputs moved, as one loss (0 = unchanged).

Every metric compares the reference outputs ``R`` (the original model) with the candidate outputs ``C`` on the
same samples, output by output (first axis = samples); with several outputs the **worst** loss counts. The
selection loop keeps a change only while ``loss <= tolerance`` (default 0.01).

``agreement`` (the default when every output is a classifier output ``[N, K]`` with ``K > 1``)::

    flip = 1 - (1/N) * #{n : argmax_k R[n] == argmax_k C[n]}               (share of top-1 classes that changed)
    KL   = (1/N) * sum_n sum_k p[n,k] (log p[n,k] - log q[n,k]),  p = softmax(R[n]), q = softmax(C[n])   (nats)
    loss = max(flip, KL_COEF * sqrt(KL)),  KL_COEF = 0.11 per sqrt(nat)

Why KL: calibration data is often training data, on which the original is ~100% confident, so top-1 agreement
barely moves until the damage is large. KL(original || candidate) measures how much of the original's
confidence (its margin) the candidate lost, and registers damage before any class flips.

Why sqrt(KL), and KL_COEF (loss 0.01 should mean about one point of accuracy lost on unseen inputs): the loss
is meant to read as accuracy points / 100 on held-out data while KL is measured on training data. Pinsker's
inequality gives the shape: the mean total-variation distance between the two output distributions, which
bounds the change in expected accuracy, is at most ``sqrt(KL / 2)``. Measured, 32 (KL on training data, test
accuracy drop) pairs from two digits classifiers (a MobileNetV2-style CNN: KL 0.0065 -> 0.9 points, 0.026 ->
2.4 points; a 3-hidden-layer MLP with ReLUs partly replaced by identity, KL 0.003 to 0.38 -> 0.4 to 9.3
points) fit ``points = 13.4 * KL^0.52``; least squares with the exponent fixed at 1/2 gives
``points = 14.4 * sqrt(KL)`` (rms error 0.6 points), against ``points = 31 * KL`` (rms 1.1 points, 30 points
predicted where 8 were lost) for a linear scale: KL_COEF = 0.144. A wider study on the six example models
(tools/calibrate_metric.py, results in tools/calibrate_metric.md: 223 variants of VGG, ResNet, MobileNetV2 at two
widths and two GELU token models, random subsets of activations linearized with and without the tool's re-fit,
KL on the held-out calibration samples exactly as the tool measures it, accuracy on the test split) fits
``points = c * sqrt(KL)`` with c from 3.8 to 10.7 per model (pooled 7.7): the token models are the strictest.
KL_COEF = 0.11 is the 80th percentile of the per-model fits rounded up to two decimals (10.18 -> 0.11; never below
the percentile, as a larger coefficient accepts less KL): at tolerance 0.01 (mean KL up to 0.0083) the largest test
loss of any accepted variant of any model was 0.93 points, where 0.10 would reach 1.48. The percentile moves with
the re-fit and the split (earlier runs: 10.88, 12.66, 9.94, 10.77); the worst case at 0.01 stayed within 0.74-1.48
points for every coefficient from 0.10 to 0.14. An estimate from small models on one data set, not a law; ``flip``
keeps the loss honest once classes do flip. The raw numbers (``top1_agreement``, ``mean_kl``, ``flip_loss``,
``kl_loss``) are kept in ``Fidelity.components``.

Logits or probabilities: an output whose reference rows are all non-negative and sum to 1 (within 1e-3) is
taken as probabilities and used as is (log of the renormalised, clipped values); anything else is taken as
logits and softmaxed. Log-probabilities (LogSoftmax outputs) need no special case: softmax(log p) = p.

``cosine``: ``loss = 1 - (1/N) sum_n cos(R[n], C[n])`` on each sample's flattened output (two zero vectors have
cosine 1, one zero vector 0). Scale-blind: for embeddings.

``rel-l2``: ``loss = ||R - C||_2 / ||R||_2`` over all samples and elements of an output (0.01 = 1 % relative
error). The default for outputs that are not ``[N, K > 1]`` (regression, detection heads, feature maps).

A candidate output holding NaN or infinity has loss ``inf``. Every metric streams: ``FidelityAccumulator``
keeps sums and counts, and a few numbers per sample (flip, KL, squared error and norm, cosine) for the bounds below,
so the caller never holds all outputs; ``measure_fidelity`` is its one-shot form.

**Confidence bounds** (``FidelityAccumulator.bounds``, bounds.py): the loss on ``n`` held-out samples estimates the
loss on unseen inputs. One-sided bounds at confidence ``c``: for ``agreement``, ``max`` of the Clopper-Pearson bound
on the flip rate and ``KL_COEF * sqrt`` of the bootstrap bound on the mean KL; for ``rel-l2`` and ``cosine``, the
bootstrap bound of the loss itself (resampling samples); with several outputs the worst output's. The search
accepts a candidate on the upper bound (``Fidelity.accepted``), and ``resolution`` says how small a loss the
held-out samples can vouch for at all (agreement: the upper bound with no flip).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from onnx_easier.bounds import binomial_lower, binomial_upper, bootstrap_bounds, samples_for
from onnx_easier.errors import BadArgumentError, BadDataError, VerificationError

log = logging.getLogger(__name__)

METRICS = ("agreement", "cosine", "rel-l2")
DEFAULT_TOLERANCE = 0.01
KL_COEF = 0.11  # loss per sqrt(nat) of mean KL(original || candidate): 0.01 loss ~ one point (module doc)
PROB_ATOL = 1e-3  # rows within this of summing to 1 (and non-negative) are probabilities
TRAINING_CONFIDENCE = 0.99  # mean top-1 confidence at or above which the data look like training data
_LOG_FLOOR = 1e-30  # probabilities are clipped here before the log: bounds KL when a candidate says 0
CONFIDENCE = 0.9  # one-sided confidence of the upper bound a candidate is accepted on


def is_classifier_shape(shape: Sequence[int | str | None]) -> bool:
    """True for ``[N, K]`` with a known ``K > 1`` (N may be symbolic)."""
    return len(shape) == 2 and isinstance(shape[1], (int, np.integer)) and int(shape[1]) > 1


def default_metric(output_shapes: Sequence[Sequence[int | str | None]]) -> str:
    """``agreement`` when every output is ``[N, K > 1]``, else ``rel-l2``."""
    if output_shapes and all(is_classifier_shape(s) for s in output_shapes):
        return "agreement"
    return "rel-l2"


def looks_like_probabilities(x: np.ndarray) -> bool:
    """True when every row of ``x [N, K]`` is non-negative and sums to 1 within PROB_ATOL."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.size == 0 or not np.all(np.isfinite(x)) or np.any(x < 0):
        return False
    return bool(np.all(np.abs(x.sum(axis=1) - 1.0) <= PROB_ATOL))


def log_probabilities(x: np.ndarray, probabilities: bool) -> np.ndarray:
    """Row-wise log-probabilities of ``x [N, K]`` in float64.

    ``probabilities=True``: ``log(p / sum p)`` with ``p`` clipped at 1e-30; else ``log softmax(x)`` computed as
    ``x - max - log sum exp(x - max)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if probabilities:
        p = np.maximum(x, 0.0)
        p = p / np.maximum(p.sum(axis=1, keepdims=True), _LOG_FLOOR)
        return np.log(np.maximum(p, _LOG_FLOOR))
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_per_sample(ref_logp: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    """``KL(p || q)[n] = sum_k p[n,k] (log p[n,k] - log q[n,k])`` in nats from log-probabilities, ``p = exp(ref)``.

    Terms with ``p = 0`` count 0; tiny negative values from rounding are clipped to 0.
    """
    p = np.exp(ref_logp)
    terms = np.where(p > 0, p * (ref_logp - cand_logp), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


@dataclass
class Fidelity:
    """One measurement: ``value`` is the loss (worst output), ``components`` the raw numbers behind it."""

    metric: str
    value: float
    tolerance: float
    samples: int
    components: dict = field(default_factory=dict)
    upper: float | None = None  # upper confidence bound of the loss (None: not computed)
    confidence: float | None = None
    effective_tolerance: float | None = None  # what ``upper`` is held to: max(tolerance, resolution)
    early: bool = False  # rejected on part of the samples (its lower bound was already above the tolerance)

    @property
    def ok(self) -> bool:
        """Within tolerance (a NaN or infinite loss never is)."""
        return math.isfinite(self.value) and self.value <= self.tolerance

    @property
    def accepted(self) -> bool:
        """What the search keeps: the loss within the tolerance (``ok``) and its upper bound within the effective
        tolerance (what the samples can vouch for: never below the tolerance itself)."""
        if self.early or not self.ok:
            return False
        if self.upper is None:
            return True
        limit = self.tolerance if self.effective_tolerance is None else self.effective_tolerance
        return math.isfinite(self.upper) and self.upper <= limit

    def training_data_warning(self) -> str | None:
        """The training-data warning for the reference confidence seen while measuring (None when none)."""
        conf = self.components.get("reference_confidence")
        return None if conf is None else confidence_warning(conf)

    def as_report(self) -> dict:
        """The report's ``fidelity`` block (JSON-ready; an infinite loss is written as None)."""
        return {
            "metric": self.metric,
            "value": self.value if math.isfinite(self.value) else None,
            "tolerance": self.tolerance,
            "samples": self.samples,
            "ok": self.ok,
            "components": self.components,
            **({"upper_bound": self.upper if math.isfinite(self.upper) else None, "confidence": self.confidence,
                "effective_tolerance": self.effective_tolerance, "accepted": self.accepted}
               if self.upper is not None else {}),
            **({"early_rejection": True} if self.early else {}),
        }


class _OutputSums:
    """Running sums for one output."""

    def __init__(self) -> None:
        self.samples = 0
        self.nonfinite = 0  # candidate samples holding NaN/inf
        self.same_top1 = 0
        self.kl_sum = 0.0
        self.conf_sum = 0.0
        self.cos_sum = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.kinds: set[str] = set()
        self.columns: dict[str, list[np.ndarray]] = {}  # per-sample values (finite samples) for the bounds

    def keep(self, name: str, values: np.ndarray) -> None:
        self.columns.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    def column(self, name: str) -> np.ndarray:
        parts = self.columns.get(name)
        return np.concatenate(parts) if parts else np.zeros(0)


class FidelityAccumulator:
    """Streams (reference, candidate) batches and finalises one ``Fidelity``.

    ``metric=None`` picks ``default_metric`` from the first batch's shapes. Each batch is a sequence of arrays,
    one per model output, first axis = samples; reference and candidate must match in count and shape. The
    reference's mean top-1 confidence is tracked for classifier outputs (any metric), for the training-data
    warning.
    """

    def __init__(self, metric: str | None = None, tolerance: float = DEFAULT_TOLERANCE) -> None:
        if metric is not None and metric not in METRICS:
            raise BadArgumentError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
        if not tolerance >= 0:
            raise BadArgumentError(f"--tolerance must be >= 0, not {tolerance}")
        self.metric = metric
        self.tolerance = float(tolerance)
        self._sums: list[_OutputSums] | None = None
        self._shapes: list[tuple[int, ...]] = []

    def update(self, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> None:
        """Add one batch of outputs."""
        if len(ref) != len(cand):
            raise VerificationError(f"the candidate has {len(cand)} outputs, the original {len(ref)}")
        ref = [np.asarray(r) for r in ref]
        cand = [np.asarray(c) for c in cand]
        for i, (r, c) in enumerate(zip(ref, cand)):
            if r.shape != c.shape:
                raise VerificationError(f"output {i}: the candidate gives shape {c.shape}, the original {r.shape}")
            if r.ndim == 0:
                raise BadDataError(f"output {i} is a scalar: fidelity needs a first (sample) axis")
        shapes = [r.shape[1:] for r in ref]
        if self._sums is None:
            if self.metric is None:
                self.metric = default_metric([r.shape for r in ref])
            if self.metric == "agreement":
                for i, r in enumerate(ref):
                    if not is_classifier_shape(r.shape):
                        raise BadArgumentError(
                            f"--metric agreement needs classifier outputs [N, K>1]; output {i} has shape "
                            f"{list(r.shape)}: use --metric cosine or rel-l2"
                        )
            self._sums = [_OutputSums() for _ in ref]
            self._shapes = shapes
        elif shapes != self._shapes:
            raise BadDataError(f"batch output shapes {shapes} differ from the first batch's {self._shapes}")
        for s, r, c in zip(self._sums, ref, cand):
            self._add(s, r, c)

    def _add(self, s: _OutputSums, r: np.ndarray, c: np.ndarray) -> None:
        n = r.shape[0]
        if n == 0:
            return
        r64 = r.reshape(n, -1).astype(np.float64)
        c64 = c.reshape(n, -1).astype(np.float64)
        if not np.all(np.isfinite(r64)):
            raise BadDataError("the original model gives NaN or infinity on the calibration data")
        finite = np.all(np.isfinite(c64), axis=1)
        s.samples += n
        s.nonfinite += int(n - finite.sum())
        r64, c64 = r64[finite], c64[finite]
        if is_classifier_shape(r.shape):
            probs = looks_like_probabilities(r64)
            s.kinds.add("probabilities" if probs else "logits")
            ref_logp = log_probabilities(r64, probs)
            s.conf_sum += float(np.exp(ref_logp.max(axis=1)).sum())
            if self.metric == "agreement":
                s.same_top1 += int((r64.argmax(axis=1) == c64.argmax(axis=1)).sum())
                kl = kl_per_sample(ref_logp, log_probabilities(c64, probs))
                s.kl_sum += float(kl.sum())
                s.keep("kl", kl)
        if self.metric == "cosine":
            nr, nc = np.linalg.norm(r64, axis=1), np.linalg.norm(c64, axis=1)
            dot = (r64 * c64).sum(axis=1)
            both_zero = (nr == 0) & (nc == 0)
            cos = np.clip(np.where(both_zero, 1.0, dot / np.maximum(nr * nc, np.finfo(np.float64).tiny)), -1.0, 1.0)
            s.cos_sum += float(cos.sum())
            s.keep("cos", cos)
        elif self.metric == "rel-l2":
            diff, ref = np.square(r64 - c64).sum(axis=1), np.square(r64).sum(axis=1)
            s.diff_sq += float(diff.sum())
            s.ref_sq += float(ref.sum())
            s.keep("diff", diff)
            s.keep("ref", ref)

    def _output_loss(self, s: _OutputSums) -> dict:
        if s.nonfinite:
            return {"loss": math.inf, "nonfinite_samples": s.nonfinite}
        if s.samples == 0:
            return {"loss": 0.0}
        if self.metric == "agreement":
            agree = s.same_top1 / s.samples
            kl = s.kl_sum / s.samples
            flip, kl_loss = 1.0 - agree, KL_COEF * math.sqrt(kl)
            return {"loss": max(flip, kl_loss), "top1_agreement": agree, "flip_loss": flip, "mean_kl": kl,
                    "kl_loss": kl_loss, "outputs_are": "/".join(sorted(s.kinds))}
        if self.metric == "cosine":
            mean_cos = s.cos_sum / s.samples
            return {"loss": 1.0 - mean_cos, "mean_cosine": mean_cos}
        if s.ref_sq == 0:
            rel = 0.0 if s.diff_sq == 0 else math.inf
        else:
            rel = math.sqrt(s.diff_sq) / math.sqrt(s.ref_sq)
        return {"loss": rel, "rel_l2": rel}

    def bounds(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """(lower, upper) one-sided bounds at ``confidence`` on the loss (module doc): the worst output's. No batch:
        (0, 0); a non-finite candidate: (inf, inf)."""
        if self._sums is None:
            return 0.0, 0.0
        per = [self._output_bounds(s, confidence) for s in self._sums]
        return max(p[0] for p in per), max(p[1] for p in per)

    def _output_bounds(self, s: _OutputSums, c: float) -> tuple[float, float]:
        if s.nonfinite:
            return math.inf, math.inf
        if s.samples == 0:
            return 0.0, 0.0
        if self.metric == "agreement":
            n, flips = s.samples, s.samples - s.same_top1
            kl_lo, kl_up = bootstrap_bounds([s.column("kl")], lambda t: t / n, c)
            return (max(binomial_lower(flips, n, c), KL_COEF * math.sqrt(max(kl_lo, 0.0))),
                    max(binomial_upper(flips, n, c), KL_COEF * math.sqrt(max(kl_up, 0.0))))
        if self.metric == "cosine":
            n = s.samples
            return bootstrap_bounds([s.column("cos")], lambda t: 1.0 - t / n, c)
        with np.errstate(divide="ignore", invalid="ignore"):
            return bootstrap_bounds([s.column("diff"), s.column("ref")],
                                    lambda d, r: np.where(r > 0, np.sqrt(d / np.where(r > 0, r, 1.0)),
                                                          np.where(d > 0, np.inf, 0.0)), c)

    def result(self) -> Fidelity:
        """The worst output's loss; ``components`` holds its raw numbers, ``worst_output`` its index and, with
        several outputs, ``per_output`` every output's. No batch seen: loss 0 on 0 samples."""
        if self._sums is None:
            return Fidelity(self.metric or "agreement", 0.0, self.tolerance, 0, {})
        per = [self._output_loss(s) for s in self._sums]
        worst = max(range(len(per)), key=lambda i: per[i]["loss"])
        components = {k: v for k, v in per[worst].items() if k != "loss"}
        components["worst_output"] = worst
        if len(per) > 1:
            components["per_output"] = per
        confs = [s.conf_sum / (s.samples - s.nonfinite) for s in self._sums if s.kinds and s.samples > s.nonfinite]
        if confs:  # the lowest over classifier outputs, as mean_confidence
            components["reference_confidence"] = min(confs)
        value = float(per[worst]["loss"])
        return Fidelity(str(self.metric), value, self.tolerance, self._sums[0].samples, components)


def measure_fidelity(
    ref_outputs: Sequence[np.ndarray],
    cand_outputs: Sequence[np.ndarray],
    metric: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Fidelity:
    """One-shot fidelity of ``cand_outputs`` against ``ref_outputs`` (``metric=None``: ``default_metric``)."""
    acc = FidelityAccumulator(metric, tolerance)
    acc.update(ref_outputs, cand_outputs)
    return acc.result()


def mean_confidence(ref_outputs: Sequence[np.ndarray]) -> float | None:
    """Mean top-1 softmax probability of the reference, the lowest over classifier outputs; None when no output
    is ``[N, K > 1]``."""
    confs = []
    for r in ref_outputs:
        r = np.asarray(r)
        if is_classifier_shape(r.shape) and r.shape[0] > 0:
            logp = log_probabilities(r, looks_like_probabilities(r))
            confs.append(float(np.exp(logp.max(axis=1)).mean()))
    return min(confs) if confs else None


def confidence_warning(confidence: float, threshold: float = TRAINING_CONFIDENCE) -> str | None:
    """One line when the original's mean top-1 confidence ``confidence`` is at least ``threshold``, else None."""
    if confidence < threshold:
        return None
    return (
        f"the original model's mean top-1 confidence on the samples that measured fidelity is {confidence:.1%}: on "
        "inputs it is this sure of, few predictions can flip, so the fidelity loss may understate the loss on harder "
        "inputs; if these samples are training data, pass samples the model was not trained on with --data"
    )


def training_data_warning(ref_outputs: Sequence[np.ndarray], threshold: float = TRAINING_CONFIDENCE) -> str | None:
    """Warn when the original's mean top-1 softmax confidence on the data is ``>= threshold`` (default 0.99).

    On training data a classifier is near-certain, so agreement and KL measured there understate the damage on
    unseen inputs. 0.99 rather than 0.98: the digits MLP of the module doc is 99.8 % confident on its training
    split but already 98.2-98.5 % on its held-out split (an easy task), which must not warn. None for
    non-classifier outputs or lower confidence.
    """
    conf = mean_confidence(ref_outputs)
    return None if conf is None else confidence_warning(conf, threshold)


def resolution(metric: str, samples: int, confidence: float = CONFIDENCE) -> float:
    """The smallest loss ``samples`` held-out samples can vouch for at ``confidence``: for ``agreement`` the upper
    bound on the flip rate with no flip seen (bounds.binomial_upper(0, n)); 0 for the continuous metrics."""
    return binomial_upper(0, samples, confidence) if metric == "agreement" else 0.0


def holdout_needed(metric: str, tolerance: float, confidence: float = CONFIDENCE) -> int:
    """Held-out samples that resolve ``tolerance``: for ``agreement``, the fewest whose upper bound with one flip
    seen is within it (bounds.samples_for(tolerance, events=1): 388 at 0.01, 90%); 0 for the other metrics (a
    bootstrap bound has no floor of that kind) and for tolerance 0."""
    return samples_for(tolerance, confidence, events=1) if metric == "agreement" and tolerance > 0 else 0


def resolution_warning(metric: str, samples: int, tolerance: float, holdout_fraction: float,
                       confidence: float = CONFIDENCE) -> str | None:
    """One line when the held-out samples cannot resolve ``tolerance`` with the agreement metric: a single flipped
    prediction already puts the upper bound above it (then every candidate that flips one is rejected), or even
    none does (then the effective tolerance is the resolution). None otherwise."""
    if metric != "agreement" or tolerance <= 0 or binomial_upper(1, samples, confidence) <= tolerance:
        return None
    need = holdout_needed(metric, tolerance, confidence)
    total = math.ceil(need / holdout_fraction)
    floor = resolution(metric, samples, confidence)
    head = (f"{samples} held-out samples cannot resolve the tolerance {tolerance:g}: "
            f"with no flipped prediction the {confidence:.0%} upper bound on the flip rate is {floor:.4f}")
    if floor > tolerance:
        head += f", so candidates are held to an effective tolerance of {floor:.4f}"
    else:
        head += f", with one it is {binomial_upper(1, samples, confidence):.4f}, so any candidate that flips a " \
                "single held-out prediction is rejected"
    return head + f"; pass at least {total} samples ({need} held out) to resolve it"
