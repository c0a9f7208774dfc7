"""Least-squares reconstruction of chosen layers against the ORIGINAL model's tensors (graph side of refit.py).

For a layer node ``L`` (Conv, Gemm, or MatMul [+ its bias Add]) of the current model whose output tensor ``y``
also exists in the original model, solve

    min_{W, b}  || L_{W,b}(x_current) - y_original ||^2  (+ ridge)

where ``x_current`` is what the current model feeds ``L`` and ``y_original`` is the original model's tensor of the
same name, streamed batch by batch (refit.NormalEquations). Layers are processed in topological order, each
seeing the changes made to earlier ones. A fit is kept only if it lowers the error on held-out batches that are
disjoint from the fit batches (and from the fidelity samples the caller keeps apart).

A Conv followed by a constant bias-map Add (what fusion emits when biases leak into a padded border) is fitted
through it: the target is the Add's output minus the map, which stays as it is.

Residual branches: when the layer's output (after that bias) is read only by an Add whose other input ``s`` is a
tensor of the current model that does not depend on the layer, and the Add's output exists in the original, the
target is ``y_original(Add) - s_current``: the layer then also makes up for what changed on the other branch (a
linearized ReLU upstream of an identity skip reaches the sum through ``s``). Where ``s`` is unchanged this is the
plain target (``y_original(Add) - s_original = y_original(L)``).

Skipped, with a note: a layer whose output is not an original tensor, whose weights are not constants, whose normal
equations exceed the memory bound (refit.RefitTooLarge). A layer reads samples until it has ROWS_PER_FEATURE rows
per unknown from at least MIN_SAMPLES samples (refit.fit_layer), heads all of them. The original's tensors come
from a ``Targets`` cache shared by the whole search (prefixes of batches within a memory budget).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnx_easier.calibrate import upstream
from onnx_easier.data import CalibrationData
from onnx_easier.execution import CPU, Execution
from onnx_easier.graph_utils import is_constant, single_consumer
from onnx_easier.joint import digests, joint
from onnx_easier.linear_math import ConvLayer, to_dense
from onnx_easier.memory import release
from onnx_easier.model_io import to_graph, to_model
from onnx_easier.passes.fuse_common import recognise
from onnx_easier.refit import RIDGES, RefitTooLarge, feature_count, fit_layer
from onnx_easier.shapes import infer_shapes
from onnx_easier.softmax_fit import fit_softmax

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
BATCH = 32
# rows enough for a layer's fit: ROWS_PER_FEATURE per unknown of a group (positions of one image are correlated,
# hence the margin), from at least MIN_SAMPLES samples; a conv over large images reaches it after a few batches.
# 200 / 64 (was 1000 / 256): the same activations linearized on mobilenetv2_digits (7, test accuracy equal) and
# mobilenetv2_wide_digits (8, 0.56 points lost), with a fifth less CPU time per default run
ROWS_PER_FEATURE = 200
MIN_SAMPLES = 64
MIN_ROWS_PER_FEATURE = 1  # a dense layer with one row per sample (a head) is re-fitted only from this many rows
MIN_SHARED = 0.5  # a joint session (original + current) when they share at least this share of the original's cut
HEAD_BYTES = 64 * 2**20  # features kept in memory per data set for the KL re-fit of a head


@dataclass
class RefitRecord:
    """One re-fit layer for the report: relative output errors before/after on held-out batches, time spent."""

    node: str
    target: str
    error_before: float
    error_after: float
    accepted: bool
    seconds: float
    note: str = ""
    ridge: float | None = None  # the ridge chosen on the check samples

    def as_report(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class _Site:
    node: gs.Node
    bias_add: gs.Node | None  # MatMul's following Add of a constant bias
    layer: ConvLayer
    offset: np.ndarray | None  # a Conv's following bias-map Add: a fixed input-independent term, kept as it is
    x: str  # input tensor name
    y: str  # target tensor name (the original model's)
    last: bool  # channel-last tokens ([N, ..., F]): reshape to [N*T, F]
    skip: str | None = None  # the other addend of a residual Add that ``y`` names: subtracted from the target

    @property
    def reads(self) -> list[str]:
        """The current model's tensors a fit needs: the layer's input (and the residual addend)."""
        return [self.x] if self.skip is None else [self.x, self.skip]


def _site(graph: gs.Graph, node: gs.Node, known: set[str]) -> _Site | str:
    """The re-fittable layer at ``node``, or why not; ``known``: the original's tensor names (the target must be
    one of them: the layer's output, or a residual Add's)."""
    if node.op not in LAYER_OPS:
        return f"{node.op} is not a layer"
    el = recognise(node)
    if isinstance(el, str) or el is None or el.layer is None:
        return el if isinstance(el, str) else "not a linear layer with constant weights"
    out = node.outputs[0]
    bias_add = None
    offset = None
    if node.op == "Conv":
        reader = single_consumer(graph, out)
        if reader is not None and reader.op == "Add":
            other = [t for t in reader.inputs if t is not out]
            vals = np.asarray(other[0].values) if len(other) == 1 and is_constant(other[0]) else None
            if vals is not None and vals.ndim >= 3 and vals.shape[0] == 1:
                offset = vals.astype(np.float64)[0]
                out = reader.outputs[0]
    if node.op == "MatMul":
        reader = single_consumer(graph, out)
        if reader is not None and reader.op == "Add":
            other = [t for t in reader.inputs if t is not out]
            if len(other) == 1 and is_constant(other[0]) and np.asarray(other[0].values).ndim <= 1:
                bias_add = reader
                out = reader.outputs[0]
    out, skip = _residual(graph, node, out, known)
    layer = el.layer
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    last = node.op == "MatMul" and (rank is None or rank > 2)
    if bias_add is not None:
        bias = np.broadcast_to(np.asarray(bias_add.inputs[1 - bias_add.inputs.index(node.outputs[0])].values,
                                          np.float64), (layer.cout,))
        layer = ConvLayer(layer.weight, layer.bias + bias, layer.strides, layer.dilations, layer.pads, layer.groups)
    if out.name not in known:
        return f"its output {out.name} is not a tensor of the original model"
    return _Site(node, bias_add, layer, offset, node.inputs[0].name, out.name, last, skip)


def _residual(graph: gs.Graph, node: gs.Node, out: gs.Tensor, known: set[str]) -> tuple[gs.Tensor, str | None]:
    """(the Add's output, its other input's name) when ``out`` is read only by a two-input Add whose output is in
    ``known`` and whose other input is a variable tensor of the same shape that does not depend on ``node``; else
    (``out``, None)."""
    reader = single_consumer(graph, out)
    if (reader is None or reader.op != "Add" or len(reader.inputs) != 2 or reader.inputs[0] is reader.inputs[1]
            or reader.outputs[0].name not in known):
        return out, None
    other = reader.inputs[1 - reader.inputs.index(out)]
    if is_constant(other) or other.shape is None or out.shape is None or list(other.shape) != list(out.shape):
        return out, None
    todo, seen = [other], set()
    while todo:  # ancestors of the other addend: it must not read the layer
        t = todo.pop()
        for n in t.inputs:
            if n is node:
                return out, None
            if id(n) not in seen:
                seen.add(id(n))
                todo.extend(n.inputs)
    return reader.outputs[0], other.name


def _write_back(graph: gs.Graph, site: _Site, layer: ConvLayer, tag: str = "refit") -> None:
    """Replace the node's weight/bias constants by fresh ones named ``{node}.{tag}_weight``/``_bias`` (never edits
    a constant in place: it may be shared)."""
    node = site.node
    dtype = np.asarray(node.inputs[1].values).dtype
    base = (node.name or node.outputs[0].name) + f".{tag}"
    if node.op == "Conv":
        node.inputs[1] = gs.Constant(f"{base}_weight", layer.weight.astype(dtype))
        bias = gs.Constant(f"{base}_bias", layer.bias.astype(dtype))
        if len(node.inputs) > 2 and node.inputs[2].name:
            node.inputs[2] = bias
        else:
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(bias)
    elif node.op == "Gemm":
        dense = to_dense(layer)
        node.attrs.update({"alpha": 1.0, "beta": 1.0, "transB": 1})
        node.inputs[1] = gs.Constant(f"{base}_weight", dense.weight.astype(dtype))
        bias = gs.Constant(f"{base}_bias", dense.bias.astype(dtype))
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
    else:  # MatMul [+ Add]
        dense = to_dense(layer)
        node.inputs[1] = gs.Constant(f"{base}_weight", dense.weight.T.astype(dtype))
        bias = gs.Constant(f"{base}_bias", dense.bias.astype(dtype))
        if site.bias_add is not None:
            i = 1 - site.bias_add.inputs.index(node.outputs[0])
            site.bias_add.inputs[i] = bias
        else:
            y = node.outputs[0]
            mid = gs.Variable(f"{base}_out", dtype=y.dtype, shape=y.shape)
            node.outputs[0] = mid
            graph.nodes.append(gs.Node("Add", f"{base}/bias", inputs=[mid, bias], outputs=[y]))


class Targets:
    """The original model's tensors per batch, computed once per (tensor, data set, batch size).

    Batches are kept as they are computed, so a reader that stops early (a layer's row cap) leaves the prefix it
    read for the next reader, which continues from there. Everything kept stays within ``max_bytes``: the least
    recently used tensors go first; a tensor that cannot fit even alone keeps the batches that did and recomputes
    the rest on every read. Its sessions, and those of the re-fits that read it, run on ``execution``."""

    def __init__(self, original: onnx.ModelProto, max_bytes: int = 128 * 2**20, execution: Execution = CPU) -> None:
        self.original = original
        self.execution = execution
        self.max_bytes = max_bytes
        # key -> (the data set, held so its id cannot be reused while cached; its batches computed so far)
        self._store: dict[tuple[str, int, int], tuple[CalibrationData, list[np.ndarray]]] = {}
        self._bytes = 0
        self._session: tuple[str, ort.InferenceSession] | None = None  # the last tensor's cut model
        self.computed = 0  # batches run through ORT (for tests and profiling)
        self._digests: dict[str, bytes] | None = None

    @property
    def digests(self) -> dict[str, bytes]:
        """joint.digests of the original (computed once)."""
        if self._digests is None:
            self._digests = digests(self.original)
        return self._digests

    def complete(self, name: str, data: CalibrationData, batch: int) -> bool:
        """Whether every batch of ``name`` over ``data`` is cached."""
        entry = self._store.get((name, id(data), batch))
        return entry is not None and len(entry[1]) >= -(-data.samples // batch)

    def offer(self, name: str, data: CalibrationData, batch: int, index: int, y: np.ndarray) -> None:
        """Batch ``index`` of ``name`` computed elsewhere (a joint session): cached when it extends the cached
        prefix and fits the budget, like a batch computed here."""
        key = (name, id(data), batch)
        entry = self._store.get(key)
        if entry is None:
            entry = self._store[key] = (data, [])
        kept = entry[1]
        if len(kept) == index and self._room(key, y.nbytes):
            kept.append(y.copy())
            self._bytes += y.nbytes

    def release(self) -> None:
        """Free the session of the last tensor's cut model (the batches computed stay cached)."""
        self._session = None

    def _session_for(self, name: str) -> ort.InferenceSession:
        if self._session is None or self._session[0] != name:
            self._session = (name, self.execution.session(upstream(self.original, [name])))
        return self._session[1]

    def _room(self, key: tuple[str, int, int], size: int) -> bool:
        """Make room for ``size`` more bytes under ``key`` by dropping other tensors, oldest first; none is dropped
        when ``key`` could not fit even alone."""
        if sum(a.nbytes for a in self._store[key][1]) + size > self.max_bytes:
            return False
        for other in [k for k in self._store if k != key]:
            if self._bytes + size <= self.max_bytes:
                break
            self._bytes -= sum(a.nbytes for a in self._store.pop(other)[1])
        return self._bytes + size <= self.max_bytes

    def batches(self, name: str, data: CalibrationData, batch: int) -> Iterator[np.ndarray]:
        key = (name, id(data), batch)
        entry = self._store.pop(key, (data, []))
        self._store[key] = entry  # most recently used last
        kept = entry[1]
        prefix = list(kept)
        yield from prefix
        for i, feed in enumerate(itertools.islice(data.batches(batch), len(prefix), None), start=len(prefix)):
            y = self._session_for(name).run([name], feed)[0]
            self.computed += 1
            # kept only as the next batch of a prefix still cached (another reader may have run ahead or evicted it)
            if len(kept) == i and self._store.get(key) is entry and self._room(key, y.nbytes):
                kept.append(y.copy())  # ORT's own output buffer, kept, held 2x its size (measured RSS)
                self._bytes += y.nbytes
            yield y


class _Reader:
    """Per batch, the current model's ``site.reads`` and the original's ``site.y``: from one joint session
    (joint.py) when the original's target is not cached yet and the two models share at least ``MIN_SHARED`` of
    the original's nodes up to it; else from the current model's cut session and the ``Targets`` cache."""

    def __init__(self, model: onnx.ModelProto, targets: Targets, site: _Site, data: list[CalibrationData],
                 batch: int) -> None:
        self.targets, self.site, self.batch = targets, site, batch
        cut = upstream(model, site.reads)
        self.y_name: str | None = None
        if not all(targets.complete(site.y, d, batch) for d in data):
            merged = joint(cut, upstream(targets.original, [site.y]), targets.digests, [site.y])
            if merged is not None and merged[2] >= MIN_SHARED:
                cut, names, shared = merged
                self.y_name = names[site.y]
                log.debug("refit %s: one joint session (%.0f%% of the original's nodes shared)", site.node.name,
                          100 * shared)
        self.fetch = list(dict.fromkeys([*site.reads, *([self.y_name] if self.y_name else [])]))
        self.session = targets.execution.session(cut)

    def batches(self, data: CalibrationData) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """(the reads, the target) per batch of ``data``."""
        if self.y_name is None:
            for feed, yv in zip(data.batches(self.batch), self.targets.batches(self.site.y, data, self.batch)):
                yield self.session.run(self.site.reads, feed), yv
            return
        for i, feed in enumerate(data.batches(self.batch)):
            got = dict(zip(self.fetch, self.session.run(self.fetch, feed)))
            self.targets.offer(self.site.y, data, self.batch, i, got[self.y_name])
            yield [got[r] for r in self.site.reads], got[self.y_name]


def _pairs(reader: _Reader, data: CalibrationData) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(layer input from the current model; target from the original minus the layer's fixed offset and minus
    the current residual addend) per batch."""
    site = reader.site
    last = site.last
    for got, yv in reader.batches(data):
        xv = got[0]
        yv = yv.astype(np.float64)
        if site.skip is not None:
            yv = yv - got[1].astype(np.float64)
        if site.offset is not None:
            yv = yv - site.offset
        if last:
            xv = xv.reshape(-1, xv.shape[-1])
            yv = yv.reshape(-1, yv.shape[-1])
        yield xv.astype(np.float64), yv


def refit_layers(
    model: onnx.ModelProto,
    original: onnx.ModelProto | Targets,
    nodes: list[str],
    fit: CalibrationData,
    check: CalibrationData,
    *,
    ridge: float | tuple[float, ...] = RIDGES,
    max_positions: int | None = 20000,
    batch: int = BATCH,
    softmax_head: bool = False,
    execution: Execution = CPU,
) -> tuple[onnx.ModelProto, list[RefitRecord]]:
    """Re-fit the layer nodes named ``nodes`` of ``model`` (topological order) to ``original``'s tensors.

    ``original`` may be a ``Targets`` cache shared across calls (the original's tensors are then computed once).
    ``fit`` gives the normal equations; ``check`` (disjoint samples) decides whether each fit is kept; ``batch``
    samples per ORT run (the model's fixed batch size when it has one). ``softmax_head``: the outputs are logits
    judged by KL (the agreement metric); a dense layer that writes a graph output ``[N, K]`` directly is then
    re-fitted once more, to the original's class probabilities (softmax_fit.py), kept if the KL on ``check``
    drops. Every session runs on the ``Targets``' execution (``execution`` when ``original`` is a model), so the
    layer inputs and the original's targets come from the same provider.
    Returns the new model and one record per layer tried (a second one for a KL re-fit).
    """
    targets = original if isinstance(original, Targets) else Targets(original, execution=execution)
    original_names = {o for n in targets.original.graph.node for o in n.output}
    records: list[RefitRecord] = []
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    # recognising a layer needs the ranks of its tensors: inferred once; re-fits write into this graph, and
    # ``model`` is exported from it after each one (the next layer's inputs come from the model re-fitted so far)
    graph = to_graph(infer_shapes(model)) if nodes else None
    for name in sorted(set(nodes), key=lambda n: order.get(n, 1 << 30)):
        node = next((n for n in graph.nodes if n.name == name), None)
        if node is None:
            continue
        site = _site(graph, node, original_names)
        if isinstance(site, str):
            log.debug("refit %s skipped: %s", name, site)
            continue
        if site.layer.nd == 0 and not site.last and fit.samples < MIN_ROWS_PER_FEATURE * feature_count(site.layer):
            # one row per sample (a classifier head after pooling): fewer samples than the unknowns need would
            # give an under-determined fit, and each costs a pass of the whole model upstream, in every trial
            records.append(RefitRecord(name, site.y, float("nan"), float("nan"), False, 0.0,
                                       f"skipped: {fit.samples} fit samples for {feature_count(site.layer)} unknowns "
                                       f"per output (needs {MIN_ROWS_PER_FEATURE} rows per unknown)"))
            continue
        t0 = time.perf_counter()
        head = softmax_head and _is_head(site, model)
        rows: tuple[list, list] = ([], [])  # a head's (features, logits) batches, kept for its KL re-fit
        reader = _Reader(model, targets, site, [fit, check], batch)  # the current model, cut: both passes
        fit_pairs = _pairs(reader, fit)
        check_pairs = _pairs(reader, check)
        if head:
            fit_pairs, check_pairs = _recorded(fit_pairs, rows[0]), _recorded(check_pairs, rows[1])
        try:
            new, res = fit_layer(site.layer, fit_pairs, check_pairs, ridge=ridge,
                                 max_positions_per_batch=max_positions,
                                 max_rows=None if head else ROWS_PER_FEATURE * feature_count(site.layer),
                                 min_samples=MIN_SAMPLES)
        except RefitTooLarge as exc:
            records.append(RefitRecord(name, site.y, float("nan"), float("nan"), False, 0.0, str(exc)))
            continue
        finally:
            del reader, fit_pairs, check_pairs  # this layer's session is freed before the next one is made
            release()
        seconds = time.perf_counter() - t0
        note = f"residual target: {site.y} of the original minus {site.skip} of this model" if site.skip else ""
        records.append(RefitRecord(name, site.y, float(res.error_before), float(res.error_after), bool(res.accepted),
                                   seconds, note, res.ridge))
        if res.accepted:
            _write_back(graph, site, new)
            model = to_model(graph, model)
            del model.graph.value_info[:]
        log.info("refit %s -> %s: error %.4g -> %.4g (%s, %.2fs)", name, site.y, res.error_before, res.error_after,
                 "kept" if res.accepted else "rejected", seconds)
        if head:
            model, record = _refit_head(model, graph, site, new if res.accepted else site.layer, *rows, res.ridge)
            records.append(record)
    targets.release()
    return model, records


def _recorded(pairs: Iterator[tuple[np.ndarray, np.ndarray]], into: list,
              max_bytes: int = HEAD_BYTES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``pairs`` passed through, the first ``max_bytes`` of features (and their targets) also kept in ``into``."""
    size = 0
    for x, y in pairs:
        if size < max_bytes:
            into.append((x, y))
            size += x.nbytes
        yield x, y


def _stack(rows: list, max_bytes: int = HEAD_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The recorded batches as two arrays, at most ``max_bytes`` of features (the first rows)."""
    x = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    keep = max(1, max_bytes // max(1, x.shape[1] * 8))
    return x[:keep], y[:keep]


def _is_head(site: _Site, model: onnx.ModelProto) -> bool:
    """A dense layer (no token axis, no fixed offset) whose output is a graph output: the logits themselves."""
    return (site.layer.nd == 0 and not site.last and site.offset is None and site.skip is None
            and site.y in {o.name for o in model.graph.output})


def _refit_head(model: onnx.ModelProto, graph: gs.Graph, site: _Site, layer: ConvLayer, fit_rows: list,
                check_rows: list, ridge: float) -> tuple[onnx.ModelProto, RefitRecord]:
    """The KL re-fit of a head (softmax_fit.fit_softmax) from ``layer`` on the rows recorded during its
    least-squares fit, kept if the check KL drops."""
    t0 = time.perf_counter()
    dense = to_dense(layer)
    x, z = _stack(fit_rows)
    xc, zc = _stack(check_rows)
    res = fit_softmax(x, z, xc, zc, dense.weight.reshape(dense.cout, -1), dense.bias, ridge=ridge)
    seconds = time.perf_counter() - t0
    note = "KL re-fit of the head to the original's class probabilities: errors are mean KL (nats) on check"
    if res.improved:
        _write_back(graph, site, ConvLayer(res.weight, res.bias, (), (), ()), tag="refit_kl")
        model = to_model(graph, model)
        del model.graph.value_info[:]
    log.info("KL refit %s: check KL %.4g -> %.4g (%s, %d iterations, %.2fs)", site.node.name, res.kl_before,
             res.kl_after, "kept" if res.improved else "rejected", res.iterations, seconds)
    return model, RefitRecord(site.node.name, site.y, res.kl_before, res.kl_after, res.improved, seconds, note, ridge)
