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

from onnx_easier.calibrate import upstream
from onnx_easier.data import CalibrationData
from onnx_easier.execution import CPU, Execution
from onnx_easier.graph_utils import is_constant, single_consumer
from onnx_easier.joint import digests, joint
from onnx_easier.linear_math import ConvLayer, to_dense
from onnx_easier.memory import release
from onnx_easier.model_io import to_graph, to_model
from onnx_easier.passes.fuse_common import recognise
from onnx_easier.refit import RIDGES, NormalEquations, RefitTooLarge, choose_fit, feature_count
from onnx_easier.shapes import infer_shapes
from onnx_easier.softmax_fit import fit_softmax
from onnx_easier.tensor_cache import CachedRun, TensorCache

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
BATCH = 32
# rows enough for a layer's fit: ROWS_PER_FEATURE per unknown of a group (positions of one image are correlated,
# hence the margin), from at least MIN_SAMPLES samples; a conv over large images reaches it after a few batches.
# 200 / 64 (was 1000 / 256): the same activations linearized on mobilenetv2_digits (7, test accuracy equal) and
# mobilenetv2_wide_digits (8, 0.56 points lost), with a fifth less CPU time per default run
ROWS_PER_FEATURE = 200
MIN_SAMPLES = 64
# positions per batch of a conv's re-fit: ROWS_MARGIN times its rows spread over MIN_SAMPLES, at least MIN_POSITIONS
ROWS_MARGIN = 4
MIN_POSITIONS = 1024
MIN_ROWS_PER_FEATURE = 1  # a dense layer with one row per sample (a head) is re-fitted only from this many rows
MIN_SHARED = 0.5  # a joint session (original + current) when they share at least this share of the original's cut
HEAD_BYTES = 64 * 2**20  # features kept in memory per data set for the KL re-fit of a head
PASS_BYTES = 512 * 2**20  # normal equations (fit + check) of the layers read in one pass
FETCH_BYTES = 64 * 2**20  # and the tensors one batch of that pass fetches for them (layer inputs, targets)
# a layer whose output is already this close to the original's (relative l2 on its first NEGLIGIBLE_SAMPLES fit
# samples, at least one batch) is not re-fitted: its pass stops reading for it (an SE block's excitation behind a
# nearly linear SiLU measures 0 to 1e-5; layers worth a re-fit, 1e-3 and up)
NEGLIGIBLE = 1e-4
NEGLIGIBLE_SAMPLES = 8


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
    the rest on every read. Its sessions, and those of the re-fits that read it, run on ``execution``.

    ``exact``: the original with exact fusions only (the search's starting point), which computes the values: every
    tensor name the fusions keep holds the original's values (tests/test_targets.py checks it on the example
    models), and the models the search re-fits share its nodes, so one joint session computes a layer's input and
    its target together (from the original itself, nothing is shared past the first folded LayerNorm or
    BatchNorm: a ViT-S re-fit pass ran a second whole forward pass, in a second session). Targets are the
    tensors of both models (``names``)."""

    def __init__(self, original: onnx.ModelProto, max_bytes: int = 128 * 2**20, execution: Execution = CPU,
                 cache: TensorCache | None = None, exact: onnx.ModelProto | None = None) -> None:
        self.names = {o for n in original.graph.node for o in n.output}
        if exact is not None:
            self.names &= {o for n in exact.graph.node for o in n.output}
        self.original = exact if exact is not None else original  # the model the targets are computed from
        self.execution = execution
        self.cache = cache if cache is not None else TensorCache()  # checkpoints of every run (tensor_cache.py)
        self.max_bytes = max_bytes
        # key -> (the data set, held so its id cannot be reused while cached; its batches computed so far)
        self._store: dict[tuple[str, int, int], tuple[CalibrationData, list[np.ndarray]]] = {}
        self._bytes = 0
        self._last_cut: tuple[tuple[str, ...], onnx.ModelProto] | None = None  # the last cut of the original
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
        self._last_cut = None

    def _cut(self, names: tuple[str, ...]) -> onnx.ModelProto:
        """The original cut to ``names`` (the last cut kept: readers of one tensor follow each other)."""
        if self._last_cut is None or self._last_cut[0] != names:
            self._last_cut = (names, upstream(self.original, list(names)))
        return self._last_cut[1]

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
        """The original's tensor ``name`` per batch of ``data``."""
        for got in self.read([name], data, batch):
            yield got[name]

    def read(self, names: list[str], data: CalibrationData, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """The original's tensors ``names`` per batch of ``data``: cached batches where they are held, the rest from
        one session cut to the names not complete when the read began (all of them computed in one run)."""
        names = list(dict.fromkeys(names))
        entries = {}
        for name in names:
            key = (name, id(data), batch)
            entries[name] = self._store.pop(key, (data, []))
            self._store[key] = entries[name]  # most recently used last
        todo = [n for n in names if not self.complete(n, data, batch)]
        skip = min((len(entries[n][1]) for n in todo), default=0)
        runs = CachedRun(self._cut(tuple(todo)), todo, self.cache, self.execution).batches(data, batch, skip) \
            if todo else itertools.repeat(None)
        for i, (_, got) in enumerate(zip(data.batches(batch), runs)):
            out = {n: entries[n][1][i] for n in names if len(entries[n][1]) > i}
            if len(out) < len(names):
                self.computed += 1
                for name in todo:
                    if name in out:
                        continue
                    y = got[name]
                    key = (name, id(data), batch)
                    kept = entries[name][1]
                    # kept only as the next batch of a prefix still cached (another reader may have run ahead or
                    # evicted it); ORT's own output buffer, kept, is held 2x its size (measured RSS): a copy
                    if len(kept) == i and self._store.get(key) is entries[name] and self._room(key, y.nbytes):
                        kept.append(y.copy())
                        self._bytes += y.nbytes
                    out[name] = y
            yield out


class _Pass:
    """One session for several sites' data: per batch, the current model's ``reads`` of every site and the
    original's targets ``y``. The targets not cached yet come from the same session (a joint model, joint.py) when
    the two models share at least ``MIN_SHARED`` of the original's nodes up to them; the others from the
    ``Targets`` cache (which computes what it lacks with its own cut of the original, all of them in one run)."""

    def __init__(self, model: onnx.ModelProto, targets: Targets, sites: list[_Site], data: list[CalibrationData],
                 batch: int) -> None:
        self.targets, self.batch = targets, batch
        self.reads = list(dict.fromkeys(r for s in sites for r in s.reads))
        ys = list(dict.fromkeys(s.y for s in sites))
        cut = upstream(model, self.reads)
        missing = [y for y in ys if not all(targets.complete(y, d, batch) for d in data)]
        self.joint: dict[str, str] = {}  # the original's target -> its name in the joint model
        if missing:
            merged = joint(cut, upstream(targets.original, missing), targets.digests, missing)
            if merged is not None and merged[2] >= MIN_SHARED:
                cut, names, shared = merged
                self.joint = {y: names[y] for y in missing}
                log.debug("refit of %d layer(s): one joint session (%.0f%% of the original's nodes shared)",
                          len(sites), 100 * shared)
        self.cached = [y for y in ys if y not in self.joint]
        self.fetch = list(dict.fromkeys([*self.reads, *self.joint.values()]))
        self.run = CachedRun(cut, self.fetch, targets.cache, targets.execution)

    def batches(self, data: CalibrationData) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(the current model's reads, the original's targets) per batch of ``data``, each by tensor name (a name
        may be in both: the two models' values differ)."""
        cached = self.targets.read(self.cached, data, self.batch) if self.cached else itertools.repeat({})
        for i, (got, ys) in enumerate(zip(self.run.batches(data, self.batch), cached)):
            ys = dict(ys)
            for y, name in self.joint.items():
                self.targets.offer(y, data, self.batch, i, got[name])
                ys[y] = got[name]
            yield {r: got[r] for r in self.reads}, ys


def _pair(site: _Site, reads: dict[str, np.ndarray], ys: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(layer input from the current model; target from the original minus the layer's fixed offset and minus
    the current residual addend), float64; channel-last tokens flattened to rows."""
    xv = reads[site.x]
    yv = ys[site.y].astype(np.float64)
    if site.skip is not None:
        yv = yv - reads[site.skip].astype(np.float64)
    if site.offset is not None:
        yv = yv - site.offset
    if site.last:
        xv = xv.reshape(-1, xv.shape[-1])
        yv = yv.reshape(-1, yv.shape[-1])
    return xv.astype(np.float64), yv


@dataclass
class _Fit:
    """A site's sums (fit, check) read from one model, and for a head the rows kept for its KL re-fit."""

    key: tuple  # what the sums depend on: the site's reads, target and geometry
    equations: tuple[NormalEquations, NormalEquations]
    head: bool
    rows: tuple[list, list]  # a head's (features, target) batches per data set, the first HEAD_BYTES of features
    seconds: float = 0.0  # its share of the pass that read it
    negligible: float | None = None  # the error that made reading stop early (NEGLIGIBLE), if it did
    judged: bool = False  # whether the early test was made (once, on the first NEGLIGIBLE_SAMPLES fit samples)

    def enough(self, which: int) -> bool:
        return self.negligible is not None or self.equations[which].enough(self.max_rows, MIN_SAMPLES)

    def judge_early(self, layer: ConvLayer) -> None:
        """Stop reading when ``layer`` already matches its target to NEGLIGIBLE on the first fit samples."""
        eq = self.equations[0]
        if not self.judged and not self.head and eq.samples >= NEGLIGIBLE_SAMPLES:
            self.judged = True
            error = eq.relative_error(layer)
            if error < NEGLIGIBLE:
                self.negligible = error

    @property
    def max_rows(self) -> int | None:
        return None if self.head else ROWS_PER_FEATURE * feature_count(self.equations[0].layer)


def _key(site: _Site) -> tuple:
    layer = site.layer
    return (tuple(site.reads), site.y, layer.weight.shape, layer.strides, layer.dilations, layer.pads, layer.groups,
            site.last)


def _read(model: onnx.ModelProto, targets: Targets, sites: dict[str, _Site], fits: dict[str, _Fit],
          fit: CalibrationData, check: CalibrationData, batch: int) -> None:
    """Accumulate every ``fits`` entry (keyed like ``sites``) from one pass over ``fit`` then one over ``check``,
    each stopped once every site has read enough (refit.NormalEquations.enough)."""
    t0 = time.perf_counter()
    reader = _Pass(model, targets, [sites[n] for n in fits], [fit, check], batch)
    try:
        for which, data in enumerate((fit, check)):
            if all(f.enough(which) for f in fits.values()):
                continue  # every layer stopped early: the check samples are not read
            for reads, ys in reader.batches(data):
                for name, f in fits.items():
                    if f.enough(which):
                        continue
                    x, y = _pair(sites[name], reads, ys)
                    f.equations[which].update(x, y)
                    if which == 0:
                        f.judge_early(sites[name].layer)
                    if f.head and sum(r[0].nbytes for r in f.rows[which]) < HEAD_BYTES:
                        f.rows[which].append((x, y))
                if all(f.enough(which) for f in fits.values()):
                    break
    finally:
        del reader  # the pass's session is freed before the next one is made
        release()
    share = (time.perf_counter() - t0) / len(fits)
    for f in fits.values():
        f.seconds = share


def _sample_bytes(graph: gs.Graph, site: _Site) -> int:
    """Bytes per sample of the tensors a pass fetches for ``site`` (its reads and target, float32; 0 for a
    tensor whose shape past the batch axis is not static)."""
    tensors = graph.tensors()
    total = 0
    for name in [*site.reads, site.y]:
        shape = getattr(tensors.get(name), "shape", None)
        if shape and all(isinstance(d, int) and d > 0 for d in shape[1:]):
            total += 4 * int(np.prod(shape[1:], dtype=np.int64))
    return total


def _positions_cap(layer: ConvLayer, max_positions: int | None, batch: int, head: bool) -> int | None:
    """Output positions used per batch: ``max_positions``, and no more than ROWS_MARGIN times the layer's rows
    (ROWS_PER_FEATURE per unknown) spread over the MIN_SAMPLES samples it reads anyway, at least MIN_POSITIONS.
    A depthwise 3x3 (10 unknowns: 2000 rows) at 112x112 in batches of 5 so uses 1024 positions per batch, not
    20000 (the same rows per unknown, from the same samples; the normal equations' cost is per position)."""
    if head or layer.nd == 0:
        return max_positions
    need = ROWS_MARGIN * ROWS_PER_FEATURE * feature_count(layer) * batch // MIN_SAMPLES
    cap = max(MIN_POSITIONS, need)
    return cap if max_positions is None else min(max_positions, cap)


def _downstream(node: gs.Node) -> set[str]:
    """Names of the tensors computed from ``node``'s outputs (its outputs included)."""
    seen: set[str] = set()
    todo = list(node.outputs)
    while todo:
        t = todo.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for reader in t.outputs:
            todo.extend(reader.outputs)
    return seen


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
    max_bytes: int = PASS_BYTES,
) -> tuple[onnx.ModelProto, list[RefitRecord]]:
    """Re-fit the layer nodes named ``nodes`` of ``model`` (topological order) to ``original``'s tensors.

    ``original`` may be a ``Targets`` cache shared across calls (the original's tensors are then computed once).
    ``fit`` gives the normal equations; ``check`` (disjoint samples) decides whether each fit is kept; ``batch``
    samples per ORT run (the model's fixed batch size when it has one). ``softmax_head``: the outputs are logits
    judged by KL (the agreement metric); a dense layer that writes a graph output ``[N, K]`` directly is then
    re-fitted once more, to the original's class probabilities (softmax_fit.py), kept if the KL on ``check``
    drops. Every session runs on the ``Targets``' execution (``execution`` when ``original`` is a model), so the
    layer inputs and the original's targets come from the same provider.

    The layers' sums are read together, in one pass of one session (as many as fit in ``max_bytes`` of sums per
    pass), and solved in topological order; a kept fit changes what the layers downstream of it read, so theirs
    are read again from the model with it. Each layer so gets the same sums as when fitted alone after the ones
    before it, at one forward pass per kept fit instead of one per layer.
    Returns the new model and one record per layer tried (a second one for a KL re-fit).
    """
    targets = original if isinstance(original, Targets) else Targets(original, execution=execution)
    original_names = targets.names
    ridges = (float(ridge),) if isinstance(ridge, (int, float)) else tuple(float(r) for r in ridge)
    records: list[tuple[int, RefitRecord]] = []
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    # recognising a layer needs the ranks of its tensors: inferred once; re-fits write into this graph, and
    # ``model`` is exported from it after each kept one (the layers after it read the model re-fitted so far)
    graph = to_graph(infer_shapes(model)) if nodes else None
    pending = sorted(set(nodes), key=lambda n: order.get(n, 1 << 30))
    fits: dict[str, _Fit] = {}  # sums read from the current model
    while pending:
        sites: dict[str, _Site] = {}
        for name in list(pending):
            node = next((n for n in graph.nodes if n.name == name), None)
            site = _site(graph, node, original_names) if node is not None else "not in the model"
            if isinstance(site, str):
                log.debug("refit %s skipped: %s", name, site)
                pending.remove(name)
                continue
            if site.layer.nd == 0 and not site.last and fit.samples < MIN_ROWS_PER_FEATURE * feature_count(site.layer):
                # one row per sample (a classifier head after pooling): fewer samples than the unknowns need would
                # give an under-determined fit, and each costs a pass of the whole model upstream, in every trial
                records.append((order.get(name, 1 << 30), RefitRecord(
                    name, site.y, float("nan"), float("nan"), False, 0.0,
                    f"skipped: {fit.samples} fit samples for {feature_count(site.layer)} unknowns per output "
                    f"(needs {MIN_ROWS_PER_FEATURE} rows per unknown)")))
                pending.remove(name)
                continue
            if name in fits and fits[name].key != _key(site):
                del fits[name]
            sites[name] = site
        fresh: dict[str, _Fit] = {}  # read in this round: the first unread layers whose sums fit in max_bytes
        size = volume = 0  # their sums; the tensors one batch of the pass fetches for them
        for name in [n for n in sites if n not in fits]:
            site = sites[name]
            try:
                equations = tuple(NormalEquations(site.layer, seed=k, max_positions_per_batch=_positions_cap(
                    site.layer, max_positions, batch, softmax_head and _is_head(site, model))) for k in (0, 1))
            except RefitTooLarge as exc:
                records.append((order.get(name, 1 << 30),
                                RefitRecord(name, site.y, float("nan"), float("nan"), False, 0.0, str(exc))))
                pending.remove(name)
                del sites[name]
                continue
            fetched = batch * _sample_bytes(graph, site)
            if fresh and (size + 2 * equations[0].memory_bytes > max_bytes or volume + fetched > FETCH_BYTES):
                break  # this pass is full: the rest in a later one
            size += 2 * equations[0].memory_bytes
            volume += fetched
            fresh[name] = _Fit(_key(site), equations, softmax_head and _is_head(site, model), ([], []))
        if fresh:
            _read(model, targets, sites, fresh, fit, check, batch)
            fits.update(fresh)
        for name in list(sites):
            if name not in fits:
                break  # not read yet (the pass was full): the next round reads it
            site, f = sites[name], fits.pop(name)
            pending.remove(name)
            if f.negligible is not None:
                records.append((order.get(name, 1 << 30), RefitRecord(
                    name, site.y, f.negligible, f.negligible, False, f.seconds,
                    f"skipped: error {f.negligible:.2g} < {NEGLIGIBLE:g} on the first {f.equations[0].samples} fit "
                    "samples")))
                continue
            t0 = time.perf_counter()
            new, res = choose_fit(site.layer, *f.equations, ridges)
            seconds = f.seconds + time.perf_counter() - t0
            note = f"residual target: {site.y} of the original minus {site.skip} of this model" if site.skip else ""
            records.append((order.get(name, 1 << 30), RefitRecord(
                name, site.y, float(res.error_before), float(res.error_after), bool(res.accepted), seconds, note,
                res.ridge)))
            log.info("refit %s -> %s: error %.4g -> %.4g (%s, %.2fs)", name, site.y, res.error_before,
                     res.error_after, "kept" if res.accepted else "rejected", seconds)
            changed = res.accepted
            if res.accepted:
                _write_back(graph, site, new)
                model = to_model(graph, model)
                del model.graph.value_info[:]
            if f.head:
                before = model
                model, record = _refit_head(model, graph, site, new if res.accepted else site.layer, *f.rows,
                                            res.ridge)
                records.append((order.get(name, 1 << 30), record))
                changed = changed or model is not before
            if changed:  # what reads this layer's output now reads other values: read again
                stale = _downstream(site.node)
                for other in [n for n, g in fits.items() if stale & set(g.key[0])]:
                    del fits[other]
                break
    targets.release()
    return model, [r for _, r in sorted(records, key=lambda t: t[0])]


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
