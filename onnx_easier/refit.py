"""Data-aware least-squares re-fit of one (fused) layer, in pure numpy (no ONNX, no graphs).

After activations are linearised and a chain is fused into one ``ConvLayer`` ``L``, ``L`` reproduces the chain
only approximately on real data. The re-fit keeps ``L``'s geometry (kernel, strides, dilations, pads, groups) and
chooses new weights and bias so that, on the inputs ``X`` the *current* model feeds ``L``, ``L(X)`` matches the
*original* model's tensor ``Y`` at the end of the chain (the reconstruction step of post-training quantisation).

**im2col.** Each output position ``p = (n, o_1..o_nd)`` of ``L`` reads, per group ``g``, the patch

    P_g[p] = ( x[n, g*Cg + c, o_a*s_a + t_a*d_a - pb_a]  for c < Cg = Cin/groups, t in kernel ;  1 )

(zeros outside the input: ONNX zero padding) followed by a constant 1 for the bias, which is added at every output
position, padded borders included. The feature count per group is ``f = Cg * prod(kernel) + 1``, ordered as
``weight[co, c, *t]`` flattens, so ``L(x)[n, g*Og + o, pos] = P_g[p] . W_g[:, o]`` with ``Og = Cout/groups`` and
``W_g = [weight_g.reshape(Og, -1).T ; bias_g]`` (``[f, Og]``).

**Normal equations.** Batch by batch, in float64, per group,

    A_g += P_g^T P_g        [f, f]        B_g += P_g^T Y_g        [f, Og]        yy_g += ||Y_g||^2

so the state is ``groups * (f*f + f*Og + 1)`` floats whatever the number of samples. Memory bound: a ``k x k``
conv with ``C`` inputs and no groups needs a ``(k*k*C + 1)^2`` float64 matrix (3x3, C = 512: 4609^2 * 8 B =
170 MB); layers with ``f > max_features`` raise ``RefitTooLarge`` before anything is allocated, so the caller can
skip them. Depthwise layers (``groups = Cin = Cout``) are ``C`` independent tiny systems (``f = prod(kernel) + 1``),
accumulated together as one stacked ``[C, f, f]`` product. With held-out batches, ``fit_layer`` keeps a second state
of the same size (their sums choose the ridge): twice the bound.

**Solve.** ``(A_g + lambda * s_g * D) W_g = B_g`` with ``D = diag(1, .., 1, 0)`` (the bias is not shrunk) and the
ridge scaled to the data, ``s_g = trace(A_g[:-1, :-1]) / (f - 1)``, the mean energy of one weight feature: ``lambda``
is then independent of the input scale and the sample count. ``fit_layer`` solves for each ridge of a grid
(``RIDGES``) and keeps the one with the lowest held-out error. ``np.linalg.solve``, falling back to ``lstsq``
(minimum-norm) for singular systems (e.g. ``lambda = 0`` with fewer positions than features).

**Position subsampling.** A batch with ``M`` output positions above ``max_positions_per_batch = m`` contributes
``m`` positions drawn uniformly without replacement (``numpy.random.default_rng(seed)``, so runs are
reproducible), each weighted by ``M / m``. Every position is drawn with probability ``m / M``, so the weighted sums
are unbiased estimates of the full ``A``, ``B`` and ``yy``: ``E[A_hat] = A`` (and the bias-bias entry, the position
count, is exact). The solution ``A_hat^-1 B_hat`` is a ratio of unbiased sums, consistent as batches accumulate.

**Errors.** The relative error of any layer ``W`` on the accumulated data follows from the same sums, without the
data: ``||P W - Y||^2 = sum_g tr(W_g^T A_g W_g) - 2 tr(W_g^T B_g) + yy_g`` (``NormalEquations.relative_error``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnx_easier.errors import OnnxEasierError
from onnx_easier.linear_math import ConvLayer, conv_forward, output_spatial

__all__ = [
    "NormalEquations",
    "RefitResult",
    "RefitTooLarge",
    "choose_fit",
    "feature_count",
    "fit_layer",
    "memory_estimate",
    "refit_error",
]

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)  # candidate ridges (relative to the mean feature energy), chosen on held-out data
# Upper bound on the transient patch buffer built per chunk of positions (the state itself is memory_estimate).
_CHUNK_BYTES = 32 * 2**20


class RefitTooLarge(OnnxEasierError):
    """The layer's normal equations would exceed ``max_features`` features per group; skip the re-fit."""


def feature_count(layer: ConvLayer) -> int:
    """Features per group: ``(Cin / groups) * prod(kernel) + 1`` (the 1 is the bias column)."""
    return layer.weight.shape[1] * math.prod(layer.kernel) + 1


def memory_estimate(layer: ConvLayer) -> int:
    """Bytes of the normal-equation state of ``layer``: ``groups * (f^2 + f * Cout/groups + 1) * 8`` with
    ``f = feature_count(layer)`` (``A``, ``B`` and the target energy, all float64). Does not depend on the data."""
    f = feature_count(layer)
    return layer.groups * (f * f + f * (layer.cout // layer.groups) + 1) * 8


def refit_error(layer: ConvLayer, x: np.ndarray, y: np.ndarray) -> float:
    """Relative error ``||layer(x) - y|| / ||y||`` (Frobenius norms over the whole batch); 0 when both are 0."""
    y = np.asarray(y, dtype=np.float64)
    out = conv_forward(x, layer)
    if out.shape != y.shape:
        raise ValueError(f"target of shape {y.shape} does not match the layer's output {out.shape}")
    return _relative(float(np.sum((out - y) ** 2)), float(np.sum(y * y)))


def _relative(residual: float, energy: float) -> float:
    if energy > 0:
        return math.sqrt(max(residual, 0.0) / energy)
    return 0.0 if residual <= 0 else math.inf


def _patch_view(x: np.ndarray, layer: ConvLayer) -> np.ndarray:
    """``[N, *out, Cin, *kernel]``: a strided view (no copy beyond the padding) of the zero-padded input, whose entry
    ``[n, o, c, t]`` is ``x[n, c, o*s + t*d - pb]``. For nd = 0 it is ``x`` itself."""
    nd = layer.nd
    if nd == 0:
        return x
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(layer.pads_begin, layer.pads_end)))
    window = tuple(d * (k - 1) + 1 for k, d in zip(layer.kernel, layer.dilations))
    view = sliding_window_view(padded, window, axis=tuple(range(2, 2 + nd)))  # [N, C, *positions, *window]
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in layer.strides)]
    view = view[(Ellipsis,) + tuple(slice(None, None, d) for d in layer.dilations)]
    return np.moveaxis(view, 1, 1 + nd)


class NormalEquations:
    """Streams ``X^T X`` and ``X^T Y`` for one layer (per group), from batches of (layer input, target output).

    ``layer`` fixes the geometry (its weights are not used). ``update(x, y)`` takes the layer's input
    ``[N, Cin, *S]`` (nd = 0: ``[N, Cin]``; a channel-last token batch ``[N, T, F]`` is passed by the caller as
    ``[N*T, F]``) and the target ``[N, Cout, *S_out]``; ``solve(ridge)`` returns the least-squares layer.
    See the module docstring for the math. Memory: ``memory_bytes`` (= ``memory_estimate(layer)``) for the state,
    plus a transient patch buffer of about 32 MB per update chunk, independent of the number of samples; ``solve``
    briefly holds about two more ``groups x f x f`` float64 arrays (the regularised system and LAPACK's LU copy).

    Raises ``RefitTooLarge`` when ``feature_count(layer) > max_features``: the state holds ``groups`` float64
    matrices of ``f x f``, e.g. ``(k*k*C + 1)^2 * 8`` bytes for a dense ``k x k`` conv with ``C`` inputs.
    ``max_positions_per_batch`` subsamples output positions per batch (unbiased, reproducible with ``seed``).
    """

    def __init__(
        self,
        layer: ConvLayer,
        *,
        max_features: int = 4096,
        max_positions_per_batch: int | None = None,
        seed: int = 0,
    ) -> None:
        f = feature_count(layer)
        if f > max_features:
            raise RefitTooLarge(
                f"re-fitting needs {f} features per group (Cin/groups = {layer.weight.shape[1]} x kernel "
                f"{layer.kernel} + bias) > max_features = {max_features}: {layer.groups} float64 matrix(es) of "
                f"{f} x {f} = {memory_estimate(layer) / 2**20:.0f} MB"
            )
        if max_positions_per_batch is not None and max_positions_per_batch < 1:
            raise ValueError(f"max_positions_per_batch must be >= 1, got {max_positions_per_batch}")
        self.layer = layer
        self.max_positions_per_batch = max_positions_per_batch
        self._rng = np.random.default_rng(seed)
        g, og = layer.groups, layer.cout // layer.groups
        self._a = np.zeros((g, f, f))
        self._b = np.zeros((g, f, og))
        self._yy = np.zeros(g)
        self.positions = 0  # output positions seen (before subsampling)
        self.rows = 0  # positions accumulated (after subsampling)
        self.samples = 0  # leading-axis entries seen (samples; rows for token batches passed as [N*T, F])
        self.batches = 0

    @property
    def features(self) -> int:
        """Features per group, ``f``."""
        return self._a.shape[1]

    @property
    def gram(self) -> np.ndarray:
        """``A`` ``[groups, f, f]``: the accumulated ``sum P_g^T P_g`` (a read-only view)."""
        view = self._a.view()
        view.flags.writeable = False
        return view

    @property
    def cross(self) -> np.ndarray:
        """``B`` ``[groups, f, Cout/groups]``: the accumulated ``sum P_g^T Y_g`` (a read-only view)."""
        view = self._b.view()
        view.flags.writeable = False
        return view

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the accumulated state (``A``, ``B``, ``yy``); constant in the number of samples."""
        return self._a.nbytes + self._b.nbytes + self._yy.nbytes

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add one batch: ``x`` the layer's input ``[N, Cin, *S]``, ``y`` the target ``[N, Cout, *S_out]``."""
        layer = self.layer
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != layer.nd + 2 or x.shape[1] != layer.cin:
            raise ValueError(f"input of shape {x.shape} does not fit a {layer.nd}-d layer with Cin = {layer.cin}")
        out = output_spatial(layer, x.shape[2:]) if layer.nd else ()
        if y.shape != (x.shape[0], layer.cout) + out:
            raise ValueError(
                f"target of shape {y.shape} does not match the layer's output {(x.shape[0], layer.cout) + out}"
            )
        patches = _patch_view(x, layer)  # [N, *out, Cin, *k]
        targets = np.moveaxis(y, 1, -1)  # [N, *out, Cout]
        grid = (x.shape[0],) + out
        total = math.prod(grid)
        if self.max_positions_per_batch is not None and total > self.max_positions_per_batch:
            chosen = np.sort(self._rng.choice(total, size=self.max_positions_per_batch, replace=False))
            weight = total / self.max_positions_per_batch
        else:
            chosen, weight = None, 1.0
        count = total if chosen is None else chosen.size
        chunk = max(1, _CHUNK_BYTES // (8 * self.features * layer.groups))
        for start in range(0, count, chunk):
            flat = np.arange(start, min(start + chunk, count)) if chosen is None else chosen[start : start + chunk]
            index = np.unravel_index(flat, grid)
            self._accumulate(patches[index], targets[index], weight)
        self.positions += total
        self.rows += count
        self.samples += x.shape[0]
        self.batches += 1

    def enough(self, max_rows: int | None, min_samples: int) -> bool:
        """Whether at least ``max_rows`` rows from at least ``min_samples`` samples are in (never, with None)."""
        return max_rows is not None and self.rows >= max_rows and self.samples >= min_samples

    def _accumulate(self, patches: np.ndarray, targets: np.ndarray, weight: float) -> None:
        """``patches`` ``[m, Cin, *k]``, ``targets`` ``[m, Cout]`` (gathered, contiguous) into ``A``, ``B``, ``yy``.

        The bias column is never materialised: with ``P = [Q 1]``, ``P^T P = [[Q^T Q, Q^T 1], [1^T Q, m]]`` and
        ``P^T Y = [Q^T Y; 1^T Y]``, so only column sums are added to the products of the patch matrix ``Q``."""
        g, fi = self.layer.groups, self.features - 1
        m = patches.shape[0]
        q = patches.reshape(m, g, fi)
        ys = targets.reshape(m, g, -1)
        if g == 1:
            q2, y2 = q[:, 0], ys[:, 0]
            gram = (q2.T @ q2)[None]  # the same buffer transposed: BLAS syrk
            cross = (q2.T @ y2)[None]
        else:  # stacked per group, contracted over positions without transposing copies
            gram = np.einsum("mgf,mgh->gfh", q, q, optimize=True)
            cross = np.einsum("mgf,mgo->gfo", q, ys, optimize=True)
        q_sum, y_sum = q.sum(axis=0), ys.sum(axis=0)  # [g, fi], [g, Og]
        energy = np.einsum("mgo,mgo->g", ys, ys)
        if weight != 1.0:  # subsampled: every sum is scaled by M / m (in place, these are fresh arrays)
            for part in (gram, cross, q_sum, y_sum, energy):
                part *= weight
        a, b = self._a, self._b
        a[:, :fi, :fi] += gram
        a[:, :fi, fi] += q_sum
        a[:, fi, :fi] += q_sum
        a[:, fi, fi] += weight * m
        b[:, :fi] += cross
        b[:, fi] += y_sum
        self._yy += energy

    def _check_data(self) -> None:
        if self.positions == 0:
            raise ValueError("no data: call update() with at least one batch before solve()")

    def solve(self, ridge: float = 1e-4) -> ConvLayer:
        """The layer (same geometry and groups) minimising ``||P W - Y||^2 + ridge * s * ||weight||^2`` on the
        accumulated data: ``(A + ridge * s * D) W = B`` per group, ``s = trace(A[:-1, :-1]) / (f - 1)``, ``D`` the
        identity without its bias entry. Singular systems fall back to ``lstsq`` (minimum-norm solution)."""
        self._check_data()
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        f = self.features
        scale = np.einsum("gii->g", self._a[:, :-1, :-1]) / (f - 1)
        shrink = np.ones(f)
        shrink[-1] = 0.0
        system = self._a + (ridge * scale)[:, None, None] * np.diag(shrink)[None]
        try:
            solution = np.linalg.solve(system, self._b)
            if not np.all(np.isfinite(solution)):
                raise np.linalg.LinAlgError("non-finite solution")
        except np.linalg.LinAlgError:
            solution = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(system, self._b)])
        return self._to_layer(solution)

    def _to_layer(self, solution: np.ndarray) -> ConvLayer:
        """``[g, f, Og]`` stacked ``W_g`` -> ConvLayer with ``layer``'s geometry."""
        layer = self.layer
        weight = solution[:, :-1, :].transpose(0, 2, 1).reshape(layer.weight.shape)
        bias = solution[:, -1, :].reshape(-1)
        return ConvLayer(weight, bias, layer.strides, layer.dilations, layer.pads, layer.groups)

    def _from_layer(self, layer: ConvLayer) -> np.ndarray:
        """ConvLayer -> stacked ``W_g`` ``[g, f, Og]`` (inverse of ``_to_layer``)."""
        own = self.layer
        if layer.weight.shape != own.weight.shape or layer.groups != own.groups:
            raise ValueError(
                f"layer of weight {layer.weight.shape}, groups {layer.groups} does not match the accumulated "
                f"{own.weight.shape}, groups {own.groups}"
            )
        g, og = own.groups, own.cout // own.groups
        weights = layer.weight.reshape(g, og, -1).transpose(0, 2, 1)
        return np.concatenate([weights, layer.bias.reshape(g, 1, og)], axis=1)

    def relative_error(self, layer: ConvLayer) -> float:
        """``||layer(X) - Y|| / ||Y||`` on the accumulated data (estimated when subsampled), from the sums alone:
        ``sum_g tr(W_g^T A_g W_g) - 2 tr(W_g^T B_g) + yy_g``. ``layer`` must have the accumulated geometry. Rounding
        limits it to about 1e-8 for an exact fit (a difference of squares)."""
        self._check_data()
        w = self._from_layer(layer)
        quadratic = float(np.sum(w * np.matmul(self._a, w)))
        linear = float(np.sum(w * self._b))
        energy = float(self._yy.sum())
        return _relative(quadratic - 2.0 * linear + energy, energy)


@dataclass(frozen=True)
class RefitResult:
    """What ``fit_layer`` did. Errors are relative (``||L(X) - Y|| / ||Y||``), on the held-out batches when given
    (``holdout``), else on the fit batches (from the normal equations). ``accepted``: the new fit was kept; when it
    was not, ``error_after == error_before``. ``positions``: output positions accumulated for the fit."""

    error_before: float
    error_after: float
    seconds: float
    accepted: bool
    holdout: bool
    positions: int
    ridge: float = 0.0  # the ridge chosen (the one with the lowest held-out error)


def fit_layer(
    layer: ConvLayer,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    holdout: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
    ridge: float | Sequence[float] = RIDGES,
    *,
    max_features: int = 4096,
    max_positions_per_batch: int | None = None,
    max_rows: int | None = None,
    min_samples: int = 0,
    seed: int = 0,
) -> tuple[ConvLayer, RefitResult]:
    """Re-fit ``layer`` on ``batches`` of (layer input, target) and keep the result only if it lowers the error.

    Each iterable is read once, or only until it has given ``max_rows`` rows (positions accumulated) from at least
    ``min_samples`` samples: a convolution over a large image gets thousands of rows per sample, far more than
    its ``f`` unknowns per output need, and every batch costs forward passes upstream.

    With ``holdout``: its normal equations are accumulated too (same geometry and position subsampling, another
    ``memory_estimate(layer)`` bytes), the layer is solved for every ridge of ``ridge`` and the one with the lowest
    held-out error is chosen (errors from the held-out sums, ``NormalEquations.relative_error``: no forward pass);
    without it, the first ridge only, compared on the fit data. When the new layer is not strictly better the
    original ``layer`` is returned and ``error_after == error_before``. ``RefitTooLarge`` propagates (raised before
    any batch is read).
    """
    start = time.perf_counter()
    ridges = (float(ridge),) if isinstance(ridge, (int, float)) else tuple(float(r) for r in ridge)
    if not ridges:
        raise ValueError("fit_layer: no ridge given")
    equations = NormalEquations(
        layer, max_features=max_features, max_positions_per_batch=max_positions_per_batch, seed=seed
    )
    for x, y in batches:
        equations.update(x, y)
        if equations.enough(max_rows, min_samples):
            break
    check = None
    if holdout is not None:
        check = NormalEquations(
            layer, max_features=max_features, max_positions_per_batch=max_positions_per_batch, seed=seed + 1
        )
        for x, y in holdout:
            check.update(x, y)
            if check.enough(max_rows, min_samples):
                break
    return choose_fit(layer, equations, check, ridges, start)


def choose_fit(layer: ConvLayer, equations: NormalEquations, check: NormalEquations | None,
               ridges: Sequence[float], start: float | None = None) -> tuple[ConvLayer, RefitResult]:
    """The decision of ``fit_layer`` from accumulated sums: ``equations`` (fit) solved for every ridge, the one
    with the lowest error on ``check`` chosen and kept only if strictly better than ``layer`` there; without
    ``check``, the first ridge, compared on the fit sums. ``start``: ``perf_counter`` time the work began (the
    result's seconds). Raises ValueError when ``check`` holds no data or ``ridges`` is empty."""
    start = time.perf_counter() if start is None else start
    if not ridges:
        raise ValueError("fit_layer: no ridge given")
    if check is None:
        chosen = ridges[0]
        fitted = equations.solve(chosen)
        before, after = equations.relative_error(layer), equations.relative_error(fitted)
    else:
        if check.positions == 0:
            raise ValueError("the holdout iterable is empty")
        before = check.relative_error(layer)
        solved = [(r, equations.solve(r)) for r in ridges]
        after, chosen, fitted = min(((check.relative_error(f), r, f) for r, f in solved), key=lambda t: t[0])
    accepted = after < before
    result = RefitResult(
        error_before=before,
        error_after=after if accepted else before,
        seconds=time.perf_counter() - start,
        accepted=accepted,
        holdout=check is not None,
        positions=equations.positions,
        ridge=chosen,
    )
    return (fitted if accepted else layer), result
