"""Calibration: run the model on the calibration data and count, per channel, how often each activation is ON.

Three steps, as in ONNX Runtime's quantization calibrator:

1. ``augment``: expose every pre-activation ``x`` (and, for moments, every activation output ``y = act(x)``) as a
   graph output;
2. collect: one ORT session with graph optimizations off (so tensor names survive), run batch by batch, fold each
   batch into per-channel statistics and drop it, so memory does not grow with the number of samples (numpy folds
   batch k on a worker thread while ORT runs batch k + 1, so two batches are alive at most);
3. compute: ``ChannelStats`` turns the counts into the on-fraction ``p``, the EASIER entropy and, from the moments,
   the per-channel least-squares affine fit ``y ~ a * x + b``::

       a = cov(x, y) / var(x),   b = mean(y) - a * mean(x)        (a = 0, b = mean(y) when var(x) ~ 0)

   A ReLU channel that is always ON has y = x, so the fit gives a = 1, b = 0; one that is always OFF has y = 0,
   so it gives a = 0, b = 0. The moments are float64 sums of float32 partial sums (one per sample and channel), as
   precise as the float32 tensors themselves (about 1e-7 relative); var(x) = E[x^2] - E[x]^2 then loses digits when
   |mean(x)| is many times std(x), which is why a channel with min(x) = max(x) or var(x) <= 1e-6 E[x^2] counts as constant.

Counts are integers, so the results do not depend on the batch size.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import Message
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from onnx_easier.activations import Activation
from onnx_easier.data import CalibrationData, activation_bytes, batch_multiple, choose_batch_size, input_specs
from onnx_easier.entropy import channel_on_fraction, layer_entropy
from onnx_easier.errors import BadArgumentError, BadDataError, OnnxEasierError
from onnx_easier.execution import CPU, Execution
from onnx_easier.shapes import augment, tensor_types

if TYPE_CHECKING:
    from onnx_easier.tensor_cache import TensorCache

log = logging.getLogger(__name__)

EXPOSED_BYTES = 128 * 2**20  # cap on the exposed tensors of one batch (two are alive), when their shapes are known
_BLOCK = 256  # positions per float32 partial dot product (longer SIMD runs drift: 1e-5 at 4096)
_DEGENERATE = 1e-6  # var(x) <= _DEGENERATE * E[x^2] (std below 1e-3 rms, near float32 rounding): constant
_ORT_RUN_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException)


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation over the calibration data.

    axis:     the channel axis of ``x`` (non-negative).
    count_on: int64 per channel, positions where ``x >= 0``.
    count:    positions counted per channel (samples * positions per sample).
    moments (float64 per channel, None unless requested): sums of x, x^2, y, x*y, y^2 where y = act(x) is the
    activation's output as ORT computes it, and the range ``min_x``, ``max_x``.
    """

    axis: int
    count_on: np.ndarray
    count: int
    sum_x: np.ndarray | None = None
    sum_x2: np.ndarray | None = None
    sum_y: np.ndarray | None = None
    sum_xy: np.ndarray | None = None
    sum_y2: np.ndarray | None = None
    min_x: np.ndarray | None = None
    max_x: np.ndarray | None = None

    @classmethod
    def from_batch(cls, x: np.ndarray, axis: int, y: np.ndarray | None = None) -> ChannelStats:
        """Statistics of one batch; moments are computed when ``y`` (the activation's output) is given."""
        x = np.asarray(x)
        if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
            raise ValueError(f"channel axis {axis} is out of range for a tensor of rank {x.ndim}")
        axis %= x.ndim
        x3 = _channels_in_middle(x, axis)
        stats = cls(axis, _count_on(x3), x3.shape[0] * x3.shape[2])
        if y is None:
            return stats
        y = np.asarray(y)
        if y.shape != x.shape:
            raise ValueError(f"activation output shape {y.shape} differs from its input shape {x.shape}")
        x3, y3 = _as_float(x3), _as_float(_channels_in_middle(y, axis))
        stats.sum_x, stats.sum_y = _channel_sums(x3), _channel_sums(y3)
        stats.sum_x2, stats.sum_xy, stats.sum_y2 = _channel_sums(x3, x3), _channel_sums(x3, y3), _channel_sums(y3, y3)
        if x3.size:
            stats.min_x = x3.min(axis=(0, 2)).astype(np.float64)
            stats.max_x = x3.max(axis=(0, 2)).astype(np.float64)
        else:
            stats.min_x, stats.max_x = np.full(x3.shape[1], np.inf), np.full(x3.shape[1], -np.inf)
        return stats

    @property
    def channels(self) -> int:
        return int(self.count_on.shape[0])

    @property
    def has_moments(self) -> bool:
        return self.sum_x is not None

    @property
    def p(self) -> np.ndarray:
        """On-fraction per channel, ``count_on / count``."""
        return channel_on_fraction(self.count_on, self.count)

    @property
    def entropy(self) -> float:
        """The EASIER entropy of this activation: mean over channels of the binary entropy of ``p``, in bits."""
        return layer_entropy(self.count_on, self.count)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both sets of samples together."""
        if other.axis != self.axis or other.channels != self.channels:
            raise ValueError(
                f"cannot merge statistics of axis {other.axis} with {other.channels} channels into axis {self.axis} "
                f"with {self.channels} channels"
            )
        if other.has_moments != self.has_moments:
            raise ValueError("cannot merge statistics with moments and statistics without")
        out = ChannelStats(self.axis, self.count_on + other.count_on, self.count + other.count)
        if self.has_moments:
            for name in ("sum_x", "sum_x2", "sum_y", "sum_xy", "sum_y2"):
                setattr(out, name, getattr(self, name) + getattr(other, name))
            out.min_x = np.minimum(self.min_x, other.min_x)
            out.max_x = np.maximum(self.max_x, other.max_x)
        return out

    def _centered(self) -> tuple[np.ndarray, ...]:
        """mean_x, mean_y, var_x, cov_xy, var_y, E[x^2] from the sums."""
        if not self.has_moments:
            raise ValueError("moments were not collected: calibrate with moments=True")
        if self.count <= 0:
            raise ValueError("no positions were counted")
        n = float(self.count)
        mx, my = self.sum_x / n, self.sum_y / n
        ex2 = self.sum_x2 / n
        return mx, my, ex2 - mx * mx, self.sum_xy / n - mx * my, self.sum_y2 / n - my * my, ex2

    def affine_fit(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel ``(a, b)`` minimising ``mean((y - a x - b)^2)``: ``a = cov(x, y) / var(x)``,
        ``b = mean(y) - a mean(x)``; a constant channel (min(x) = max(x), or var(x) <= 1e-6 E[x^2], below what
        float32 sums resolve) gets ``a = 0, b = mean(y)``."""
        mx, my, var_x, cov, _, ex2 = self._centered()
        flat = (self.min_x == self.max_x) | (var_x <= _DEGENERATE * ex2)
        a = np.where(flat, 0.0, cov / np.where(flat, 1.0, var_x))
        return a, my - a * mx

    def affine_mse(self) -> np.ndarray:
        """Per channel ``mean((y - a x - b)^2)`` of the affine fit: ``var(y) - 2 a cov(x, y) + a^2 var(x)``."""
        a, _ = self.affine_fit()
        _, _, var_x, cov, var_y, _ = self._centered()
        return np.maximum(var_y - 2 * a * cov + a * a * var_x, 0.0)

    def identity_mse(self) -> np.ndarray:
        """Per channel ``mean((y - x)^2)``: the error of replacing the activation by the identity."""
        if not self.has_moments:
            raise ValueError("moments were not collected: calibrate with moments=True")
        return np.maximum((self.sum_y2 - 2 * self.sum_xy + self.sum_x2) / float(self.count), 0.0)


def _count_on(x3: np.ndarray) -> np.ndarray:
    """Per channel ``#{x >= 0}`` of ``[before, C, after]``: first along the contiguous axis, then across samples."""
    inner = np.int32 if x3.shape[2] < 2**31 else np.int64
    return np.add.reduce(np.add.reduce(x3 >= 0, axis=2, dtype=inner), axis=0, dtype=np.int64)


def _as_float(a: np.ndarray) -> np.ndarray:
    """float32 and float64 stay as they are; float16 and integers are summed as float32 / float64."""
    if a.dtype in (np.float32, np.float64):
        return a
    return a.astype(np.float32 if a.dtype.kind == "f" and a.dtype.itemsize < 4 else np.float64)


def _channel_sums(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Per channel sum of ``a`` (or ``a * b``) over axes 0 and 2 of ``[before, C, after]``, as float64.

    Fast and accurate to about 1e-7 relative: partial sums over the positions of one sample run in the tensor's own
    type (pairwise for ``a``; for ``a * b`` SIMD dot products over blocks of at most _BLOCK positions, since longer
    runs drift, or pairwise when no block size divides the positions) and are added in float64.
    """
    if b is None:
        return np.add.reduce(a, axis=2).sum(axis=0, dtype=np.float64)
    n, c, p = a.shape
    block = _block(p)
    if block is None:
        return np.add.reduce(np.multiply(a, b), axis=2).sum(axis=0, dtype=np.float64)
    q = p // block
    part = np.einsum("ncqb,ncqb->ncq", a.reshape(n, c, q, block), b.reshape(n, c, q, block))
    return part.sum(axis=(0, 2), dtype=np.float64)


def _block(p: int) -> int | None:
    """The block of positions for the dot products: all ``p`` when short, else the largest divisor of ``p`` in
    [_BLOCK / 4, _BLOCK] (so blocks are reshaped views), else None."""
    if p <= _BLOCK:
        return p
    return next((b for b in range(_BLOCK, _BLOCK // 4 - 1, -1) if p % b == 0), None)


def _channels_in_middle(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as ``[before, C, after]`` (a view for contiguous arrays): ``[N, C, H*W]`` or ``[N*T, C, 1]``."""
    before = int(np.prod(x.shape[:axis], dtype=np.int64))
    after = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    return x.reshape(before, x.shape[axis], after)


# --- step 1: augment ----------------------------------------------------------------------------------------------


def upstream(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``tensors`` (in that order) and whose nodes and initializers are only
    those they are computed from (every graph input stays, so the same feeds serve). ONNX Runtime runs every node of
    a graph whatever the fetches: an early tensor costs a whole forward pass unless the rest is cut away. Only what
    is kept is copied (an early cut of a 100 MB model copies a few MB). Models with subgraphs (If/Loop/Scan bodies
    may read outer tensors implicitly) are not cut, only ``augment``-ed."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return augment(model, tensors)
    producer = {o: n for n in g.node for o in n.output}
    needed: set[str] = set()
    todo = list(tensors)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None:
            todo.extend(i for i in node.input if i)
    inputs = {i.name for i in g.input}  # an initializer also listed as a graph input (old IR) stays: ORT needs it
    outputs = {o.name: o for o in g.output}
    known = set(producer) | inputs | {t.name for t in g.initializer}
    unknown = [t for t in tensors if t not in known]
    if unknown:
        raise OnnxEasierError(f"tensor {unknown[0]!r} is not in the model's main graph; cannot expose it")
    types = tensor_types(model) if any(t not in outputs for t in tensors) else {}
    out = onnx.ModelProto()
    _copy_fields(out, model, skip={"graph"})
    _copy_fields(out.graph, g, skip={"node", "initializer", "value_info", "output"})
    out.graph.node.extend(n for n in g.node if any(o in needed for o in n.output))
    out.graph.initializer.extend(t for t in g.initializer if t.name in needed or t.name in inputs)
    out.graph.value_info.extend(v for v in g.value_info if v.name in needed)
    for name in dict.fromkeys(tensors):
        if name in outputs:
            out.graph.output.append(outputs[name])
            continue
        vi = out.graph.output.add(name=name)
        t = types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            vi.type.tensor_type.elem_type = t.tensor_type.elem_type
    return out


def _copy_fields(dst: Message, src: Message, skip: set[str]) -> None:
    """Every field set in ``src`` but those named in ``skip``, copied into ``dst`` (of the same type)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


# --- step 2 and 3: collect and compute ----------------------------------------------------------------------------


def calibrate(
    model: onnx.ModelProto,
    activations: list[Activation],
    data: CalibrationData,
    *,
    batch_size: int | None = None,
    moments: bool = False,
    progress: bool = False,
    execution: Execution = CPU,
    cache: TensorCache | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of every activation over ``data``, keyed by activation name.

    One ORT session (optimizations off) on the augmented model runs batch by batch and fetches only the exposed
    tensors. ``batch_size`` defaults to ``choose_batch_size`` with the tensors one sample keeps alive in the
    augmented model (``data.activation_bytes``: the exposed ones to the end of the run), further capped so that one
    batch of exposed tensors stays near 128 MB (two are alive at a time); a model whose batch axis is fixed to N
    runs in batches of exactly N and the remaining samples are dropped with a warning. ``moments=True`` also
    fetches the activation outputs and collects the sums that ``ChannelStats.affine_fit`` needs. The session runs on ``execution``'s provider.
    ``cache`` (tensor_cache.py): the run starts from the last tensor kept there that it computes, and keeps its own
    checkpoints (not for a fixed batch size or whole-feed data).
    """
    names = [a.name for a in activations]
    if len(set(names)) != len(names):
        raise OnnxEasierError("activation names must be unique")
    specs = input_specs(model)
    _check_feeds([s.name for s in specs], data)
    fetch = list(dict.fromkeys([a.input for a in activations] + ([a.output for a in activations] if moments else [])))
    types = tensor_types(model)
    fixed = batch_multiple(specs, data)
    augmented = augment(model, fetch, types) if activations else None
    if batch_size is None:
        # the run's own tensors (the exposed ones stay to the end) within the budget of one ORT run
        batched = augmented is not None and fixed is None and not data.feedwise
        sample = activation_bytes(augmented, data.feed_shapes()) if batched else 0
        batch_size = choose_batch_size(specs, data, sample_bytes=sample)
        if fixed is None and not data.feedwise:
            batch_size = min(batch_size, _exposed_cap(fetch, types))
    elif batch_size < 1:
        raise BadArgumentError(f"batch size {batch_size}: give a positive batch size")
    elif fixed is not None and batch_size != fixed:
        raise BadArgumentError(f"batch size {batch_size}: the model fixes its batch axis to {fixed}; use {fixed}")
    elif data.feedwise and batch_size != 1:
        raise BadArgumentError(f"batch size {batch_size}: the data holds whole feeds, fed one sample at a time; use 1")
    used = data.samples
    if fixed is not None and data.samples < fixed:
        raise BadDataError(
            f"{data.source}: {data.samples} sample(s), but the model fixes its batch axis to {fixed}; "
            f"give at least {fixed} samples"
        )
    if fixed is not None and data.samples % fixed:
        used = data.samples - data.samples % fixed
        log.warning(
            "dropping the last %d of %d calibration samples: the model's batch axis is fixed to %d",
            data.samples - used,
            data.samples,
            fixed,
        )
    if not activations:
        return {}
    if cache is not None and fixed is None and not data.feedwise:
        from onnx_easier.tensor_cache import CachedRun

        runs = CachedRun(model, fetch, cache, execution).batches(data, batch_size)
    else:
        sess = execution.session(augmented, optimize=False)
        runs = (dict(zip(fetch, sess.run(fetch, feed)))
                for feed in data.batches(batch_size, 0, used, drop_last=fixed is not None))
    del augmented  # the session holds its own copy of the weights
    stats: dict[str, ChannelStats] = {}

    def fold(values: dict[str, np.ndarray]) -> None:
        for act in activations:
            batch = _batch_stats(act, values, moments)
            stats[act.name] = batch if act.name not in stats else stats[act.name].merge(batch)

    start = time.perf_counter()
    # numpy folds batch k on one worker thread while ORT runs batch k + 1: at most two batches are alive
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibrate") as worker:
        pending: Future | None = None
        for k in _with_progress(itertools.count(), used, batch_size, progress):
            try:
                values = next(runs, None)
                if values is None:
                    break
            except _ORT_RUN_ERRORS as exc:
                stop = min((k + 1) * batch_size, used)
                raise BadDataError(
                    f"ONNX Runtime failed on calibration samples {k * batch_size}-{stop - 1}: "
                    f"{_first_line(exc)}; check the data's shapes against the model"
                ) from exc
            if pending is not None:
                pending.result()
            pending = worker.submit(fold, values)
            del values
        if pending is not None:
            pending.result()
    log.debug(
        "calibrated %d activation(s) on %d %s sample(s) in batches of %d (%.2f s)",
        len(activations),
        used,
        "random" if data.synthetic else "data",
        batch_size,
        time.perf_counter() - start,
    )
    return stats


def _check_feeds(inputs: list[str], data: CalibrationData) -> None:
    missing = [n for n in inputs if n not in data.arrays]
    extra = [k for k in data.arrays if k not in inputs]
    if missing or extra:
        raise BadDataError(
            f"{data.source}: the data does not match the model's inputs ({', '.join(inputs)}): "
            f"missing {missing or 'none'}, unknown {extra or 'none'}; load it with data.load_data for this model"
        )


def _exposed_cap(fetch: list[str], types: dict[str, onnx.TypeProto]) -> int:
    """Largest batch whose exposed tensors fit EXPOSED_BYTES, from the statically known shapes (axis 0 = batch)."""
    per_sample = 0
    for name in fetch:
        t = types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        dims = t.tensor_type.shape.dim[1:]
        if all(d.HasField("dim_value") for d in dims):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type)).itemsize
            per_sample += int(np.prod([d.dim_value for d in dims], dtype=np.int64)) * itemsize
    return max(1, EXPOSED_BYTES // per_sample) if per_sample else sys.maxsize


def _batch_stats(act: Activation, values: dict[str, np.ndarray], moments: bool) -> ChannelStats:
    x = values[act.input]
    try:
        batch = ChannelStats.from_batch(x, act.axis, values[act.output] if moments else None)
    except ValueError as exc:
        raise OnnxEasierError(f"activation {act.name!r}: {exc}") from exc
    if act.channels is not None and batch.channels != act.channels:
        raise OnnxEasierError(
            f"activation {act.name!r}: expected {act.channels} channels on axis {act.axis}, ORT gave {batch.channels}"
        )
    return batch


def _with_progress(items: Iterable, total: int, step: int, enabled: bool) -> Iterator:
    """``items`` unchanged, with a transient rich progress bar on stderr when enabled and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("calibrating", total=total)
        done = 0
        for item in items:
            yield item
            bar.advance(task, min(step, total - done))
            done += step


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
