"""Confidence bounds on a fidelity loss measured on a finite set of held-out samples (pure numpy, no ONNX).

A loss measured on ``n`` held-out samples estimates the loss on inputs the tool never saw. Two bounds, one-sided at
confidence ``c``:

**Flips (a binomial count).** ``k`` of ``n`` top-1 predictions changed. Clopper-Pearson (exact) bounds on the flip
rate ``p``:

    upper: the p with P(Bin(n, p) <= k) = 1 - c      (k = n: 1)
    lower: the p with P(Bin(n, p) >= k) = 1 - c      (k = 0: 0)

found by bisection on the binomial CDF (summed in log space with ``math.lgamma``). With no flip at all the upper
bound is ``1 - (1 - c)^(1/n)``, about ``-ln(1 - c) / n``: the smallest flip rate ``n`` samples can vouch for (at
c = 0.9: 2.3 / n, so 0.01 needs n >= 230; one flip then needs n >= 389).

**Means and ratios of per-sample sums (bootstrap).** KL, squared errors and cosines are sums over samples; their
bounds come from ``BOOTSTRAP`` resamples of the samples (multinomial weights, a fixed seed: the same inputs give
the same bounds), the statistic recomputed on each, and the ``c`` (upper) or ``1 - c`` (lower) quantile taken (the
percentile bootstrap). It cannot see what no sample showed (a bootstrap of zero flips is zero), hence the exact
binomial bound for flips.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

BOOTSTRAP = 400
SEED = 20240429


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _bisect(f: Callable[[float], float], target: float, decreasing: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        above = f(mid) > target
        if above == decreasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def binomial_upper(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson upper bound on the rate behind ``k`` events in ``n`` trials (module doc). n = 0: 1."""
    if n <= 0 or k >= n:
        return 1.0
    return _bisect(lambda p: _binom_cdf(k, n, p), 1.0 - confidence, decreasing=True)


def binomial_lower(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson lower bound on the rate behind ``k`` events in ``n`` trials (module doc). k = 0: 0."""
    if n <= 0 or k <= 0:
        return 0.0
    return _bisect(lambda p: 1.0 - _binom_cdf(k - 1, n, p), 1.0 - confidence, decreasing=False)


def samples_for(rate: float, confidence: float, events: int = 0) -> int:
    """The fewest samples whose ``binomial_upper(events, n)`` is at most ``rate`` (the samples needed to vouch for
    ``rate`` with ``events`` events seen)."""
    if not 0.0 < rate < 1.0:
        return 1 if rate >= 1.0 else 1 << 62
    n = max(events + 1, int(-math.log(1.0 - confidence) / rate))
    while binomial_upper(events, n, confidence) > rate:
        n = int(n * 1.05) + 1
    lo, hi = max(events + 1, n // 2), n
    while lo < hi:  # smallest n in [lo, hi] meeting the bound (monotone in n)
        mid = (lo + hi) // 2
        if binomial_upper(events, mid, confidence) <= rate:
            hi = mid
        else:
            lo = mid + 1
    return lo


def bootstrap_bounds(columns: list[np.ndarray], statistic: Callable[..., np.ndarray], confidence: float,
                     resamples: int = BOOTSTRAP, seed: int = SEED) -> tuple[float, float]:
    """(lower, upper) percentile-bootstrap bounds of ``statistic(*sums)``, where ``sums[i]`` are the weighted sums
    of ``columns[i]`` (per-sample values, all of length n) under ``resamples`` multinomial resamplings of the n
    samples; ``statistic`` maps arrays of ``resamples`` sums to as many values. No sample: (0, 0)."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # [B, n]
    sums = [weights @ np.asarray(c, dtype=np.float64) for c in columns]
    values = np.asarray(statistic(*sums), dtype=np.float64)
    values = values[np.isfinite(values)] if np.any(np.isfinite(values)) else np.array([math.inf])
    return float(np.quantile(values, 1.0 - confidence)), float(np.quantile(values, confidence))
