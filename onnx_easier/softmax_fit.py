"""KL re-fit of a classifier head: the linear layer whose output is the model's logits, fitted to the original's
class probabilities instead of its logits (pure numpy, no ONNX).

The least-squares re-fit (refit.py) matches the original logits ``Z`` in L2, every class alike. The agreement
metric, though, measures ``KL(softmax(Z) || softmax(logits))``, where the logits of unlikely classes hardly
matter and the margin of the likely one does. For a head ``logits = X W^T + b`` (``X [N, f]`` the features the
current model feeds it) that objective is convex in ``V = [W^T ; b]`` (``[f + 1, K]``): with ``A = [X, 1]``,
``P = softmax(Z)`` and ``Q = softmax(A V)``,

    J(V)  = (1/N) sum_n KL(P_n || Q_n)  +  (lambda * s / 2) ||D (V - V0)||^2
    dJ/dV = A^T (Q - P) / N  +  lambda * s * D (V - V0),    D = diag(1, .., 1, 0),   s = trace(A^T A / N)[:-1] / f

(softmax cross-entropy against soft targets). The ridge pulls toward the starting point ``V0`` (the least-squares
fit), not toward 0: a confident head has large weights, and shrinking them costs more than the KL gains; ``s``
makes ``lambda`` independent of the feature scale, as in refit.py. Minimised from the least-squares solution by preconditioned gradient descent: the step is
``M^-1 dJ/dV`` with ``M = A^T A / N + lambda * s * D`` (the Hessian of J is at most that, up to the softmax
curvature factor <= 1/2, so a first trial step of 2 is Newton-like), with Armijo backtracking.

Early stopping: every ``CHECK_EVERY`` iterations the mean KL on held-out rows (``check``) is measured; the best
``V`` on them is returned, and the loop stops after ``PATIENCE`` checks without improvement. The caller keeps the
result only if that held-out KL is below the starting point's.

Edge cases: rows are used as given (the caller bounds their number); a starting point already exact (KL 0) is
returned as is (KL <= EXACT_KL); non-finite values raise ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_easier.fidelity import kl_per_sample, log_probabilities

MAX_ITER = 300
CHECK_EVERY = 5
PATIENCE = 4
ARMIJO = 1e-4
EXACT_KL = 1e-12  # a held-out KL at or below this is exact (float noise)


@dataclass
class SoftmaxFit:
    """``weight [K, f]``, ``bias [K]``; mean KL (nats) on the held-out rows before (the starting point) and after;
    iterations run."""

    weight: np.ndarray
    bias: np.ndarray
    kl_before: float
    kl_after: float
    iterations: int

    @property
    def improved(self) -> bool:
        """Lower held-out KL, by more than float noise."""
        return self.kl_after < self.kl_before - EXACT_KL


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise ``log softmax`` of logits ``z [N, K]`` (fidelity.log_probabilities, the metric's own)."""
    return log_probabilities(z, probabilities=False)


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """``(1/N) sum_n KL(softmax(ref_n) || softmax(logits_n))`` in nats, as the agreement metric computes it."""
    if not len(ref_logits):
        return 0.0
    return float(kl_per_sample(log_softmax(ref_logits), log_softmax(logits)).mean())


def _design(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


def fit_softmax(
    x: np.ndarray,
    ref_logits: np.ndarray,
    check_x: np.ndarray,
    check_logits: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    ridge: float = 1e-4,
    max_iter: int = MAX_ITER,
) -> SoftmaxFit:
    """Fit ``logits = x @ W.T + b`` to the class probabilities ``softmax(ref_logits)`` (module docstring), starting
    from ``weight [K, f]``, ``bias [K]``; ``check_x``/``check_logits`` are the held-out rows for early stopping."""
    arrays = (x, ref_logits, check_x, check_logits, weight, bias)
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise ValueError("fit_softmax: non-finite values")
    a = _design(np.asarray(x, np.float64))
    ac = _design(np.asarray(check_x, np.float64))
    zc = np.asarray(check_logits, np.float64)
    lp = log_softmax(np.asarray(ref_logits, np.float64))
    p = np.exp(lp)
    n, f1 = a.shape
    v = np.vstack([np.asarray(weight, np.float64).T, np.asarray(bias, np.float64)[None, :]])
    gram = a.T @ a / n
    s = float(np.trace(gram[:-1, :-1])) / max(f1 - 1, 1)
    d = np.ones(f1)
    d[-1] = 0.0
    reg = ridge * s * d
    precond = np.linalg.inv(gram + np.diag(reg) + 1e-12 * max(s, 1.0) * np.eye(f1))

    v0 = v.copy()

    def objective(v: np.ndarray) -> float:
        lq = log_softmax(a @ v)
        return float((p * (lp - lq)).sum(axis=1).mean() + 0.5 * (reg[:, None] * (v - v0) ** 2).sum())

    start = mean_kl(zc, ac @ v)
    best_v, best = v.copy(), start
    if start <= EXACT_KL:
        return SoftmaxFit(np.asarray(weight, np.float64), np.asarray(bias, np.float64), start, start, 0)
    j = objective(v)
    stale = 0
    it = 0
    for it in range(1, max_iter + 1):
        q = np.exp(log_softmax(a @ v))
        grad = a.T @ (q - p) / n + reg[:, None] * (v - v0)
        step = precond @ grad
        slope = float((grad * step).sum())
        if slope <= 0:
            break
        t = 2.0
        while t > 1e-8:
            j_new = objective(v - t * step)
            if j_new <= j - ARMIJO * t * slope:
                break
            t /= 2
        else:
            break
        v, j = v - t * step, j_new
        if it % CHECK_EVERY == 0:
            kl = mean_kl(zc, ac @ v)
            if kl < best:
                best_v, best, stale = v.copy(), kl, 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
    kl = mean_kl(zc, ac @ v)
    if kl < best:
        best_v, best = v, kl
    return SoftmaxFit(best_v[:-1].T.copy(), best_v[-1].copy(), start, best, it)
