"""Tensors computed once over a data set, kept by what computes them, so later runs of any model start from there.

The search runs many models that share most of their graph with the original and with each other (a trial
changes a few layers; a re-fit after a kept fit changes one more). Each run fetches a few *checkpoints*: float
tensors of the region it computes that every later tensor depends on only through them (at some point of the
node order, the only float tensor still to be read; a block boundary on a residual stream). Their values over
the data set are kept, keyed by the tensor's digest (joint.digests: equal digests, equal values) and the data
set. A later run of any model walks up from the tensors it needs and stops at tensors whose values are kept:
those are fed, and only the nodes after them run. Batch sizes may differ between runs (values are kept per
sample, in order).

Rules:
- Kept only: float tensors whose axis 0 is the batch (its length is the batch's sample count, and that count
  does not also appear in another axis), computed from a graph input, over a prefix of the data set (a run that
  stops early leaves the prefix it read); the least recently used entries go first beyond ``max_bytes``.
- Integer tensors (shapes) are never fed: a run recomputes them from where they come from, which may reach back
  to the graph inputs (every graph input is fed in any case, so a cut model accepts the same feeds).
- Models with subgraphs (If/Loop/Scan) or local functions, data sets with whole-feed inputs and models with a
  fixed batch size run as they are.
- Only tensors kept for the whole data set are fed (a run holds one session: a prefix kept by a run that stopped
  early is not used; it is extended by the next run that computes the tensor).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_easier.calibrate import upstream
from onnx_easier.data import CalibrationData
from onnx_easier.execution import CPU, Execution
from onnx_easier.joint import digests, mergeable

log = logging.getLogger(__name__)

CHECKPOINTS = 6  # checkpoints fetched per run, spread over the region it computes (too large ones are not kept)
MAX_CHECKPOINTS = 10  # with those of the outputs of a run for several
MAX_BYTES = 64 * 2**20
_SHAPE_OPS = {"Shape", "Size", "NonZero", "NonMaxSuppression", "ArgMax", "ArgMin", "Range", "ConstantOfShape"}
_FLOAT_KINDS = "f"


@dataclass
class _Entry:
    data: CalibrationData  # held so that its id cannot be reused while the entry lives
    chunks: list[np.ndarray] = field(default_factory=list)
    filled: int = 0  # samples kept, from the first
    nbytes: int = 0

    def take(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` (within ``filled``) as one array."""
        parts, offset = [], 0
        for c in self.chunks:
            a, b = max(start, offset), min(stop, offset + c.shape[0])
            if a < b:
                parts.append(c[a - offset:b - offset])
            offset += c.shape[0]
            if offset >= stop:
                break
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TensorCache:
    """Values per (tensor digest, data set), each a prefix of the data set's samples, within ``max_bytes``."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple[bytes, int], _Entry] = OrderedDict()
        self._refused: set[bytes] = set()  # digests whose values are not batch-major
        self._bytes = 0
        self.pinned: set[tuple[bytes, int]] = set()  # entries a run is reading: never evicted meanwhile
        self.fed_runs = 0  # batches run from kept tensors (for tests and profiling)
        self.sample_bytes: dict[str, int] = {}  # bytes per sample of the checkpoints fetched so far, by tensor name

    def too_big(self, name: str, data: CalibrationData) -> bool:
        """Whether a checkpoint called ``name`` took, when fetched before, over half the budget for ``data`` (a
        fused model keeps the names and shapes of the tensors after its change: not fetched again.)"""
        size = self.sample_bytes.get(name)
        return size is not None and size * data.samples > self.max_bytes // 2

    def filled(self, digest: bytes, data: CalibrationData) -> int:
        entry = self._store.get((digest, id(data)))
        return entry.filled if entry is not None else 0

    def take(self, digest: bytes, data: CalibrationData, start: int, stop: int) -> np.ndarray:
        key = (digest, id(data))
        self._store.move_to_end(key)
        return self._store[key].take(start, stop)

    def offer(self, digest: bytes, data: CalibrationData, start: int, value: np.ndarray, samples: int) -> bool:
        """``value``, computed from samples ``[start, start + samples)``: kept when it is batch-major (axis 0 of
        length ``samples``, a length no other axis has), float, extends the kept prefix and fits. False when this
        tensor will never be kept for ``data`` (not batch-major, or its values over ``data`` would take over half
        the budget): the caller stops fetching it."""
        n = samples
        stop = start + n
        if digest in self._refused:
            return False
        if value.dtype.kind not in _FLOAT_KINDS or value.ndim == 0 or n == 0 or value.shape[0] != n \
                or (n > 1 and n in value.shape[1:]):
            self._refused.add(digest)
            self._drop((digest, id(data)))
            return False
        if value.nbytes * data.samples > n * (self.max_bytes // 2):
            return False  # the whole data set's values would take over half the budget
        key = (digest, id(data))
        entry = self._store.get(key)
        if entry is None:
            if start != 0:
                return True
            entry = self._store[key] = _Entry(data)
        if entry.filled != start or stop > data.samples:
            return True
        if not self._room(key, value.nbytes):
            return True
        entry.chunks.append(np.array(value, copy=True))
        entry.filled = stop
        entry.nbytes += value.nbytes
        self._bytes += value.nbytes
        self._store.move_to_end(key)
        return True

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0

    def _drop(self, key: tuple[bytes, int]) -> None:
        entry = self._store.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def _room(self, key: tuple[bytes, int], size: int) -> bool:
        if size > self.max_bytes // 2:
            return False
        for other in [k for k in self._store if k != key and k not in self.pinned]:
            if self._bytes + size <= self.max_bytes:
                break
            self._drop(other)
        return self._bytes + size <= self.max_bytes


def _data_tensors(g: onnx.GraphProto) -> set[str]:
    """Tensors computed from a graph input other than through shape-like ops (see _SHAPE_OPS)."""
    consts = {t.name for t in g.initializer}
    live = {i.name for i in g.input if i.name not in consts}
    for n in g.node:
        if n.op_type in _SHAPE_OPS:
            continue
        if any(i in live for i in n.input if i):
            live.update(o for o in n.output if o)
    return live


def checkpoints(model: onnx.ModelProto, outputs: list[str], count: int = CHECKPOINTS) -> list[str]:
    """Checkpoints of a run of ``model`` for ``outputs``: ``articulations`` of all of them (up to ``count``, spread
    evenly, the last included) and, where there are several outputs, the last articulation of each one's own
    upstream (where a run that needs only some of them, after a change between them, can start)."""
    found = articulations(model, outputs)
    if len(found) > count:
        step = len(found) / count
        found = [found[min(len(found) - 1, round((k + 1) * step) - 1)] for k in range(count)]
    if len(outputs) > 1:
        for o in outputs:
            own = articulations(model, [o], only=True)
            if own and own[-1] not in found and len(found) < MAX_CHECKPOINTS:
                found.append(own[-1])
    return found


def articulations(model: onnx.ModelProto, outputs: list[str], only: bool = False) -> list[str]:
    """The tensors of ``model`` (nodes in file order; with ``only``, just those ``outputs`` need, returned or not)
    that are, after their producer, the only data tensor (``_data_tensors``) still to be read by a later node or
    to be returned: every later tensor depends on the graph inputs' data only through them."""
    g = model.graph
    data = _data_tensors(g)
    nodes = list(g.node)
    if only:
        needed = region(model, outputs, set())
        nodes = [n for n in nodes if any(o in needed for o in n.output)]
    wanted = set(outputs) | (set() if only else {o.name for o in g.output})
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in data:
                last_use[t] = i
    end = len(nodes)
    for t in wanted:
        if t in data:
            last_use[t] = end
    live: set[str] = {i.name for i in g.input if i.name in data and i.name in last_use}
    found: list[str] = []
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in live and last_use.get(t, -1) <= i:
                live.discard(t)
        for o in n.output:
            if o in data and last_use.get(o, -1) > i:
                live.add(o)
        if len(live) == 1 and i < end - 1:
            (t,) = live
            if t not in found and t in {o for o in n.output}:
                found.append(t)
    return found


def region(model: onnx.ModelProto, outputs: list[str], fed: set[str]) -> set[str]:
    """Names of the tensors computed for ``outputs`` when the tensors ``fed`` are given (those excluded)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    needed: set[str] = set()
    todo = [t for t in outputs if t not in fed]
    while todo:
        t = todo.pop()
        if t in needed or t in fed:
            continue
        node = producer.get(t)
        if node is None:
            continue
        needed.update(o for o in node.output if o)
        todo.extend(i for i in node.input if i)
    return needed


def _cut(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """``upstream(model, outputs)``, or ``model`` itself when that would be a copy of it (its outputs are
    ``outputs`` and every node is needed): the callers' models are mostly cut already, and a copy is the weights
    once more while the session is made (a ViT-S re-fit pass: 88 MB)."""
    g = model.graph
    if [o.name for o in g.output] == list(outputs):
        needed = region(model, outputs, set())
        if all(any(o in needed for o in n.output) for n in g.node):
            return model
    return upstream(model, outputs)


def cut_from(model: onnx.ModelProto, outputs: list[str], fed: set[str], types: dict[str, np.dtype]
             ) -> onnx.ModelProto:
    """``model`` computing ``outputs`` where the tensors ``fed`` are graph inputs (of the given dtypes): only the
    nodes between them (or the graph inputs, every one of which stays) and the outputs are kept."""
    computed = region(model, outputs, fed)
    cut = upstream(model, outputs)
    keep = [n for n in cut.graph.node if any(o in computed for o in n.output)]
    del cut.graph.node[:]
    cut.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inputs = {i.name for i in cut.graph.input}
    inits = [t for t in cut.graph.initializer if t.name in used or t.name in inputs]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(inits)
    del cut.graph.value_info[:]
    for name in [t for t in fed if t in used]:
        cut.graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(types[name]), None))
    return cut


class CachedRun:
    """``model``'s ``outputs`` over a data set, batch by batch, from the ``cache``'s kept tensors where it holds
    them, keeping this run's checkpoints (and nothing else) in it."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str], cache: TensorCache | None,
                 execution: Execution = CPU) -> None:
        self.model, self.outputs, self.cache, self.execution = model, list(outputs), cache, execution
        usable = cache is not None and mergeable(model) and all(
            d.dim_value == 0 for i in model.graph.input[:1] for d in i.type.tensor_type.shape.dim[:1])
        self.digests = digests(model) if usable else None
        self.keep = [c for c in checkpoints(model, self.outputs) if c not in self.outputs] if usable else []
        self._full = None  # the uncut session, made when a batch needs it

    def _full_session(self):
        if self._full is None:
            self._full = self.execution.session(_cut(self.model, self.outputs + self.keep))
        return self._full

    def batches(self, data: CalibrationData, batch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray] | None]:
        """The outputs per batch of ``data`` (``batch`` samples each, the last one shorter); None, without a run,
        for the first ``skip`` batches. Checkpoints known to be too big to keep are not fetched: an extra output
        of a session is a buffer of its own, apart from those ORT reuses within a run (a ViT-S token tensor of a
        batch is 7.5 MB, ten of them per run)."""
        if self.cache is not None and self._full is None:
            self.keep = [k for k in self.keep if not self.cache.too_big(k, data)]
        if self.digests is None or data.whole:
            session = None
            for i, feed in enumerate(data.batches(batch)):
                if i < skip:
                    yield None
                    continue
                session = session or self.execution.session(upstream(self.model, self.outputs))
                yield dict(zip(self.outputs, session.run(self.outputs, feed)))
            return
        fed, filled = self._plan(data)
        cut, fetch, inputs = None, [], set()
        if fed:
            types = {t: self.cache.take(self.digests[t], data, 0, 1).dtype for t in fed}
            rest = [o for o in self.outputs if o not in fed]
            computed = region(self.model, rest, set(fed))
            fetch = rest + [k for k in self.keep if k in computed]
            if fetch:
                cut = self.execution.session(cut_from(self.model, fetch, set(fed), types))
                inputs = {i.name for i in cut.get_inputs()}
            log.debug("cached run: %d tensor(s) fed from the cache for %d of %d samples", len(fed), filled,
                      data.samples)
        pins = {(self.digests[t], id(data)) for t in fed} - self.cache.pinned
        self.cache.pinned |= pins
        try:
            yield from self._run(data, batch, skip, fed, filled, cut, fetch, inputs)
        finally:
            self.cache.pinned -= pins

    def _run(self, data: CalibrationData, batch: int, skip: int, fed: list[str], filled: int, cut, fetch: list[str],
             inputs: set[str]) -> Iterator[dict[str, np.ndarray] | None]:
        keep = list(self.keep)  # checkpoints still fetched: those the cache refuses are dropped after one batch
        fetch = list(fetch)
        start = 0
        for i, feed in enumerate(data.batches(batch)):
            n = next(iter(feed.values())).shape[0] if feed else 0
            stop = start + n
            if i < skip:
                start = stop
                yield None
                continue
            if fed and stop <= filled:
                values = {t: self.cache.take(self.digests[t], data, start, stop) for t in fed}
                got = dict(zip(fetch, cut.run(fetch, {**{k: v for k, v in feed.items() if k in inputs},
                                                      **{t: v for t, v in values.items() if t in inputs}}))) \
                    if cut is not None else {}
                got.update({o: values[o] for o in self.outputs if o in values})
                self.cache.fed_runs += 1
            else:
                fetch_all = self.outputs + keep
                got = dict(zip(fetch_all, self._full_session().run(fetch_all, feed)))
            for k in keep:
                if k in got and n:
                    self.cache.sample_bytes[k] = got[k].nbytes // n
            refused = [k for k in keep if k in got and not self.cache.offer(self.digests[k], data, start, got[k], n)]
            if refused:
                keep = [k for k in keep if k not in refused]
                fetch = [f for f in fetch if f not in refused]
            out = {o: got[o] for o in self.outputs}
            del got  # the checkpoints' buffers go before the next batch runs
            start = stop
            yield out

    def _plan(self, data: CalibrationData) -> tuple[list[str], int]:
        """The tensors to feed (the first kept ones met walking up from the outputs) and for how many samples."""
        g = self.model.graph
        producer = {o: n for n in g.node for o in n.output}
        fed: list[str] = []
        filled = data.samples
        seen: set[str] = set()
        todo = list(self.outputs)
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None:
                continue
            have = self.cache.filled(self.digests[t], data)
            if have >= data.samples and len([o for o in node.output if o]) == 1:
                fed.append(t)
                filled = min(filled, have)
                continue
            todo.extend(i for i in node.input if i)
        return fed, (filled if fed else 0)
