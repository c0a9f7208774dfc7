"""The EASIER loop after export: linearize under a fidelity budget, fuse, re-fit, keep what stays within tolerance.

Pipeline of one search (``search``), starting from the exact-fused original ``M_0``:

    for each candidate C in order (single activations by entropy; or groups whose joint linearization lets a
    chain collapse into a cheaper layer, ranked by entropy then predicted gain; candidates whose gain,
    predicted from the graph alone (gain.py), is nothing are skipped and reported):
        M' = fuse(linearize(M_k, C, affine fits from M_k's own statistics: cached by the digests of the tensors
             they are taken from, so calibrated again only downstream of an accepted change, when first needed))
             (if an affine map would stay as a node of its own, i.e. M' has more nodes, compute nodes or MACs than
             with the identity, the identity is used: it never adds a node, and the re-fit absorbs a and b)
        M' = re-fit the layers downstream of C (and those ending the other branch of a residual Add that C's
             output reaches), then the output layers, to the ORIGINAL model's tensors (least squares with the
             ridge chosen on the check samples; a classifier head also by softmax KL; the layer's input and the
             original's target from one joint session where the two models share the graph upstream, joint.py)
        loss = fidelity(original, M') on held-out samples (disjoint from the fit samples), read in order and
               stopped early once its lower confidence bound is above the tolerance (Judge)
        keep M_{k+1} = M' if loss <= tolerance and its upper confidence bound <= the effective tolerance, else undo;
        one failure does not end the search; ``max_remove`` caps the count.

Galloping (``gallop``, default): after an acceptance the next trial takes the next 2x as many candidates together
(at most MAX_CHUNK), one linearize + fuse + re-fit + fidelity run for all; a rejected group is bisected: tried
again from its first candidate with half as many (rounded up), and after an accepted half, half of what is left
of the group (the failing candidate is there), until a single is rejected, passed, and galloping starts again at 1.
Where the loss grows with each linearization (the greedy search's own premise), this accepts what one-by-one trials
accept, in fewer trials when most candidates pass (a 12-block ViT: 4 trials instead of 12); each rejection costs up
to log2(MAX_CHUNK) trials more.

Data split: the last ``holdout`` samples measure fidelity and are never used to fit anything; of the others, the
last fifth decides whether each re-fit is kept and the rest fit (affine statistics and normal equations).

Strategies: ``entropy`` = single activations in EASIER order (the paper); ``merge`` = groups first (both
activations of an inverted-residual block, the GELU of an FFN: whatever lets fusion remove MACs), then the
remaining singles; ``auto`` (default) runs ``merge``, then ``entropy`` only when some merge group holds several
activations and the merge search kept none of them (otherwise ``entropy`` would try the same candidates in another
order, or walk one activation at a time where a whole group already merged), and api.optimize keeps the faster
result (measured latency; of two as fast, the shallower).
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_easier.activations import Activation
from onnx_easier.calibrate import ChannelStats, calibrate
from onnx_easier.cost import measure
from onnx_easier.data import CalibrationData, batch_multiple, input_specs
from onnx_easier.errors import OnnxEasierError
from onnx_easier.execution import CPU, Execution
from onnx_easier.fidelity import (
    CONFIDENCE,
    Fidelity,
    FidelityAccumulator,
    default_metric,
    looks_like_probabilities,
    resolution,
    resolution_warning,
)
from onnx_easier.fusion import FusionResult, fuse
from onnx_easier.gain import Gain, GainModel
from onnx_easier.graph_utils import is_constant
from onnx_easier.joint import digests
from onnx_easier.memory import release
from onnx_easier.model_io import to_graph, to_model
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.linearize import linearize
from onnx_easier.reconstruct import LAYER_OPS, RefitRecord, Targets, refit_layers
from onnx_easier.safety import CheckData, Failure, output_error
from onnx_easier.shapes import infer_shapes
from onnx_easier.tensor_cache import CachedRun, TensorCache

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "entropy", "merge")
MAX_GROUP = 3  # activations per merge candidate
MAX_CHUNK = 8  # candidates tried together at most (galloping)
REFIT_DEPTH = 1  # re-fit the first layer(s) downstream of a linearized activation (2 helped little, cost 2x)
HOLDOUT_FRACTION = 0.25
MAX_HOLDOUT = 1024
MAX_HOLDOUT_SHARE = 1 / 3  # the held-out part grows up to this share of the data to resolve the tolerance
LOOKS = (0.125, 0.25, 0.5)  # shares of the held-out samples after which a trial may be rejected early (Judge)
MIN_LOOK = 32  # samples before the first look
REJECT_ERROR = 0.05  # chance of rejecting early a candidate within the tolerance (union bound over the looks)


# ---------------------------------------------------------------------------------------------------------------
# building one candidate model


@dataclass
class Built:
    """A model with some activations linearized and everything fused; ``reference`` is the same before fusion."""

    model: onnx.ModelProto
    reference: onnx.ModelProto
    fusion: FusionResult
    linearized: int  # activations actually replaced (the pass skips what it cannot prove exact)
    notes: list[str] = field(default_factory=list)


def fuse_model(model: onnx.ModelProto, template: onnx.ModelProto, protected: Collection[str] = (),
               checks: CheckData | None = None) -> tuple[onnx.ModelProto, FusionResult]:
    """Shape inference -> fusion passes (``protected`` nodes untouched) -> export (value_info dropped: it may be
    stale after rewrites).

    ``checks``: fail-safe fusion. The fused model is checked against ``model`` (safety.Guard); when it fails, the
    fusion runs again with every pass checked and what breaks rolled back (fusion.py); if even that result fails,
    every fusion is given up and ``model`` comes back unfused, with a warning. Without ``checks`` (cost estimates)
    nothing is checked, nor is a graph that no pass changed (``same_graph``: nothing to check)."""
    graph = to_graph(infer_shapes(model))
    if checks is None:
        result = fuse(graph, protected=protected)
        return _export(graph, template), result
    guard = checks.guard(model, template)
    try:
        result = fuse(graph, protected=protected)
        out = _export(graph, template)
    except Exception as exc:  # noqa: BLE001 - a pass that crashes: find it pass by pass below
        failure = Failure(f"fusion raised {type(exc).__name__}: {exc}")
    else:
        failure = None if same_graph(out, model) else guard.failure(out)
        if failure is None:
            return out, result
    log.info("the fused model fails its check (%s): fusing again pass by pass", failure.reason)
    graph = to_graph(infer_shapes(model))
    result = fuse(graph, protected=protected, guard=guard)
    out = _export(graph, template)
    failure = guard.failure(out)
    if failure is not None:
        note = f"rolled back every fusion: the fused model still fails its check ({failure.reason})"
        log.warning("%s", note)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        del out.graph.value_info[:]
        result = FusionResult(results=[PassResult("fusion", 0, [note])])
    return out, result


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether ``a`` and ``b`` hold the same computation: equal nodes, initializers, inputs, outputs, opsets and
    functions (value_info, doc strings and the graph's name aside)."""
    ga, gb = a.graph, b.graph
    return (list(ga.node) == list(gb.node) and list(ga.initializer) == list(gb.initializer)
            and list(ga.sparse_initializer) == list(gb.sparse_initializer) and list(ga.input) == list(gb.input)
            and list(ga.output) == list(gb.output) and list(a.opset_import) == list(b.opset_import)
            and list(a.functions) == list(b.functions))


def _export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    out = to_model(graph, template)
    del out.graph.value_info[:]
    return out


def linearize_and_fuse(model: onnx.ModelProto, acts: list[Activation], mode: str,
                       fits: dict[str, tuple[np.ndarray, np.ndarray]] | None,
                       protected: Collection[str] = (), checks: CheckData | None = None) -> Built:
    """Linearize ``acts`` in ``model`` (identity or affine with ``fits``), then fuse (fail-safe with ``checks``),
    leaving the ``protected`` nodes (those of the activations that stay) alone. Shapes are inferred first: the
    affine map needs the rank of each pre-activation tensor."""
    graph = to_graph(infer_shapes(model))
    lin = linearize(graph, acts, mode, fits)
    reference = to_model(graph, model)
    del reference.graph.value_info[:]
    fused, result = fuse_model(reference, model, protected, checks)
    del graph
    release()  # gs graphs are reference cycles (nodes <-> tensors) holding model copies: 300 MB on ConvNeXt-T
    return Built(fused, reference, result, lin.changed, lin.notes)


def _leftover(model: onnx.ModelProto, acts: Collection[Activation]) -> bool:
    """Whether a node the linearization of ``acts`` made (passes/linearize.py names them after the activation)
    is still in ``model`` after fusion."""
    prefixes = tuple(f"{a.name}_linear_" for a in acts)
    return any(n.name.startswith(prefixes) for n in model.graph.node)


def kept_nodes(acts: list[Activation], removed: Collection[Activation] = ()) -> set[str]:
    """Node names of the activations in ``acts`` that are not in ``removed`` (they must stay intact)."""
    gone = {a.name for a in removed}
    return {n for a in acts if a.name not in gone for n in a.nodes}


def _nearest_layers(start: list[gs.Tensor], seen: set[int], forward: bool,
                    through: list[gs.Node] | None = None) -> list[gs.Node]:
    """The layer nodes (Conv/Gemm/MatMul) reached from the tensors ``start`` through non-layer nodes only:
    downstream (``forward``) or upstream. ``seen`` (node ids) is shared across calls and updated; the non-layer
    nodes passed are appended to ``through`` when given."""
    layers: list[gs.Node] = []
    todo = list(start)
    while todo:
        t = todo.pop()
        for n in t.outputs if forward else t.inputs:
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op in LAYER_OPS:
                layers.append(n)
            else:
                if through is not None:
                    through.append(n)
                todo.extend(n.outputs if forward else n.inputs)
    return layers


def downstream_layers(reference: onnx.ModelProto, acts: list[Activation], depth: int = REFIT_DEPTH) -> list[str]:
    """Names of the layer nodes (Conv/Gemm/MatMul) within ``depth`` layers downstream of each activation's output
    (or, when the identity linearization removed that tensor, its input), through any non-layer nodes; then the
    layers that end the other branch of every Add so reached (a residual block's last conv, fed the changed tensor
    through its skip: its re-fit target subtracts the skip, reconstruct.py)."""
    graph = to_graph(reference)
    tensors = graph.tensors()
    found: list[str] = []
    for act in acts:
        start = tensors.get(act.output) or tensors.get(act.input)
        if start is None:
            continue
        frontier: list[gs.Tensor] = [start]
        seen: set[int] = set()
        through: list[gs.Node] = []
        reached = {id(start)}
        for _ in range(depth):
            layers = _nearest_layers(frontier, seen, forward=True, through=through)
            found.extend(n.name for n in layers if n.name not in found)
            frontier = [o for n in layers for o in n.outputs]
            reached.update(id(o) for n in (*layers, *through) for o in n.outputs)
        for add in (n for n in through if n.op == "Add"):
            others = [t for t in add.inputs if id(t) not in reached and not is_constant(t)]
            siblings = _nearest_layers(others, set(map(id, through)), forward=False)
            found.extend(n.name for n in siblings if n.name not in found)
    return found


def output_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the layer nodes that produce a graph output through non-layer nodes only (a classifier's head).

    Re-fitting them to the original's outputs after every change makes the head absorb what it can of the error
    upstream: their target is the very tensor the fidelity compares."""
    return [n.name for n in _nearest_layers(list(to_graph(model).outputs), set(), forward=False)]


def fused_names(fusion: FusionResult, originals: list[str], model: onnx.ModelProto) -> list[str]:
    """Where the nodes ``originals`` went: the fused node whose sources include them, or themselves if present."""
    present = {n.name for n in model.graph.node}
    out: list[str] = []
    for name in originals:
        hit = next((fused for fused, rec in fusion.mapping.items() if name in rec.sources), None)
        target = hit if hit is not None else name if name in present else None
        if target is not None and target in present and target not in out:
            out.append(target)
    return out


def refit_targets(reference: onnx.ModelProto, fusion: FusionResult | None, model: onnx.ModelProto,
                  acts: list[Activation]) -> list[str]:
    """The layers of ``model`` to re-fit after linearizing ``acts``: those downstream of each activation (found in
    the unfused ``reference``, mapped through ``fusion`` when ``model`` was fused from it), then the output
    layers."""
    layers = downstream_layers(reference, acts)
    names = fused_names(fusion, layers, model) if fusion is not None else layers
    return names + [n for n in output_layers(model) if n not in names]


def stats_keys(model: onnx.ModelProto, acts: list[Activation]) -> dict[str, tuple | None]:
    """Per activation, the digests (joint.digests) of its input and output tensors in ``model``: equal keys in two
    models mean the same nodes, weights and inputs compute those tensors, so their statistics on the same data are
    the same numbers. None for an activation whose tensors ``model`` does not compute."""
    d = digests(model)
    return {a.name: (d[a.input], d[a.output]) if a.input in d and a.output in d else None for a in acts}


def split_data(data: CalibrationData, multiple: int = 1,
               seed: int = 0) -> tuple[CalibrationData, CalibrationData, CalibrationData]:
    """(fit, check, holdout): ``permuted_split``'s parts."""
    return permuted_split(data, multiple, seed)[1]


def permuted_split(data: CalibrationData, multiple: int = 1, seed: int = 0, holdout: int = 0
                   ) -> tuple[CalibrationData, tuple[CalibrationData, CalibrationData, CalibrationData]]:
    """``data`` reordered (one copy) and its (fit, check, holdout) parts as views of that copy, drawn at random
    (seeded) so that data stored in any order (e.g. class by class) give three parts alike: a quarter (at most
    MAX_HOLDOUT samples) measures fidelity, or ``holdout`` samples where that is more (fidelity.holdout_needed: what
    resolves the tolerance), up to MAX_HOLDOUT_SHARE of the data; of the rest, a fifth decides whether a re-fit is
    kept. Each part keeps the file's order. The copy holds the fit, check and holdout samples in that order, then
    the samples left out: the same samples as ``data``, which a caller may drop for it (the data is then held once,
    not twice).
    Fewer than 8 samples (8 batches): the three sets are the same (the report says how many samples each had), and
    ``data`` itself comes back. ``multiple``: a model's fixed batch size; every part is then a whole number of
    batches (``samples % multiple`` samples are left out: ORT refuses a shorter batch)."""
    n = data.samples - data.samples % multiple if data.samples >= multiple else data.samples
    if n < 8 * multiple:
        whole = data.subset(0, n) if n < data.samples else data
        return data, (whole, whole, whole)

    def down(k: int) -> int:  # at least one batch, whole batches
        return max(multiple, k - k % multiple)

    h = down(min(MAX_HOLDOUT, max(1, round(n * HOLDOUT_FRACTION), min(holdout, int(n * MAX_HOLDOUT_SHARE)))))
    c = down(max(1, (n - h) // 5))
    order = np.random.default_rng(seed).permutation(data.samples)
    parts = (np.sort(order[h + c:n]), np.sort(order[h:h + c]), np.sort(order[:h]))
    permuted = data.take(np.concatenate([*parts, np.sort(order[n:])]))
    bounds = np.cumsum([0] + [len(p) for p in parts])
    return permuted, tuple(permuted.subset(int(a), int(b)) for a, b in itertools.pairwise(bounds))  # type: ignore


# ---------------------------------------------------------------------------------------------------------------
# fidelity


class Judge:
    """Fidelity of candidates against the original on the held-out samples (original outputs computed once).

    Acceptance (``Fidelity.accepted``): the upper confidence bound of the loss (fidelity.py, at CONFIDENCE) within
    the effective tolerance ``max(tolerance, resolution)``: the held-out samples cannot vouch for a loss below their
    resolution (agreement: the bound with no flip), and ``warning`` says so when one flip already breaks the
    tolerance.

    Sequential rejection (``sequential=True``): the held-out batches are read in order, and after the first
    eighth, quarter and half of the samples (at least MIN_LOOK) the lower bound at confidence
    ``1 - REJECT_ERROR / (2 * looks)`` is compared with the effective tolerance: above it, the candidate is
    rejected there (``Fidelity.early``). By the union bound over the looks (and the two parts of the agreement
    loss), a candidate whose true loss is within the tolerance is rejected early with probability at most
    REJECT_ERROR; one clearly above it costs a fraction of the held-out runs."""

    def __init__(self, original: onnx.ModelProto, holdout: CalibrationData, metric: str | None, tolerance: float,
                 batch: int, execution: Execution = CPU, cache: TensorCache | None = None) -> None:
        self.execution = execution  # the run's provider: every candidate is compared with the original run on it
        # checkpoints of every run (the original's first): a candidate runs from the last one it shares
        self.cache = cache if cache is not None else TensorCache()
        self.holdout = holdout
        self.metric = metric
        self.tolerance = tolerance
        self.batch = batch
        self._last: tuple[onnx.ModelProto, tuple[Fidelity, float]] | None = None  # Judge._measure
        self.names = [o.name for o in original.graph.output]
        self.reference = [[as_array(got[n]) for n in self.names]
                          for got in CachedRun(original, self.names, self.cache, execution).batches(holdout, batch)]
        first = self.reference[0] if self.reference else []
        effective = metric or default_metric([r.shape for r in first])
        # logits judged by KL: a head re-fit to the original's class probabilities serves the metric directly
        self.softmax_head = bool(first) and effective == "agreement" and not any(
            looks_like_probabilities(r.reshape(r.shape[0], -1)) for r in first)
        self.effective_metric = effective
        samples = sum(r[0].shape[0] for r in self.reference) if self.reference else 0
        self.resolution = resolution(effective, samples)
        self.effective_tolerance = max(tolerance, self.resolution) if tolerance > 0 else tolerance
        self.warning = resolution_warning(effective, samples, tolerance, MAX_HOLDOUT_SHARE)
        counts = np.cumsum([r[0].shape[0] for r in self.reference]) if self.reference else np.zeros(0)
        wanted = [samples * f for f in LOOKS if samples * f >= MIN_LOOK]
        self.looks = sorted({int(np.searchsorted(counts, w)) for w in wanted} - {len(counts) - 1})

    def __call__(self, model: onnx.ModelProto, sequential: bool = False) -> Fidelity:
        """The fidelity of ``model`` with its confidence bounds; ``sequential``: stop early when the loss is
        clearly above the tolerance (class doc)."""
        return self._measure(model, sequential)[0]

    def max_relative_error(self, model: onnx.ModelProto) -> float:
        """``output_error`` of ``model`` against the original on the held-out samples (metric-independent)."""
        return self._measure(model, False)[1]

    def _measure(self, model: onnx.ModelProto, sequential: bool) -> tuple[Fidelity, float]:
        """Fidelity and max relative error from one run over the held-out samples; the figures of the last model
        run to the end are kept, so asking for the other figure of the same model object runs nothing."""
        if self._last is not None and self._last[0] is model:
            return self._last[1]
        self._last = None  # the previous model is not held while this one runs
        run = CachedRun(model, self.names, self.cache, self.execution)
        acc = FidelityAccumulator(self.metric, self.tolerance)
        looks = self.looks if sequential and self.tolerance > 0 else []
        early = False
        err = 0.0
        for i, (ref, values) in enumerate(zip(self.reference, run.batches(self.holdout, self.batch))):
            got = [as_array(values[n]) for n in self.names]
            acc.update(ref, got)
            err = max(err, output_error(ref, got))
            if i in looks and acc.bounds(1.0 - REJECT_ERROR / (2 * len(looks)))[0] > self.effective_tolerance:
                early = True
                break
        del run
        fid = acc.result()
        fid.upper = acc.bounds(CONFIDENCE)[1]
        fid.confidence = CONFIDENCE
        fid.effective_tolerance = self.effective_tolerance
        fid.early = early
        if not early:
            self._last = (model, (fid, err))
        return fid, err


def as_array(value: object) -> np.ndarray:
    """An ORT output as an array: tensors as they are; a sequence of maps (skl2onnx's ZipMap: one {label: prob}
    per sample) as [N, K] with the keys in sorted order."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[d[k] for k in keys] for d in value], dtype=np.float64)
    return np.asarray(value)


def run_batch(model: onnx.ModelProto, data: CalibrationData, preferred: int) -> int:
    """Samples per ORT run: 1 for whole-feed data (scalar inputs among them), the model's fixed batch size (any
    input's axis 0), else ``preferred`` (at most the sample count)."""
    if data.feedwise:
        return 1
    fixed = batch_multiple(input_specs(model), data)
    if fixed:
        return fixed
    return max(1, min(preferred, data.samples))


# ---------------------------------------------------------------------------------------------------------------
# candidates


@dataclass
class Candidate:
    """Activations to linearize together; ``entropy`` is their mean; ``saving`` the MACs fusion then removes;
    ``gain`` what the graph predicts the candidate can buy."""

    acts: tuple[Activation, ...]
    entropy: float
    saving: int = 0
    gain: Gain | None = None  # predicted from the graph (gain.py); None: not predicted

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.acts]


def _adjacent(model: onnx.ModelProto, acts: list[Activation]) -> list[list[Activation]]:
    """Runs of activations along single-consumer chains: b follows a when the first layer after a (through
    non-layer nodes) feeds b through non-layer nodes only. Runs are in data-flow order."""
    graph = to_graph(model)
    tensors = graph.tensors()
    by_input = {a.input: a for a in acts}

    def next_act(a: Activation) -> Activation | None:
        t = tensors.get(a.output)
        layer = None
        for _ in range(8):  # a few non-layer nodes (BN, Mul/Add, Reshape) at most
            if t is None or len(t.outputs) != 1:
                return None
            n = t.outputs[0]
            if n.op in LAYER_OPS:
                layer = n
                break
            t = n.outputs[0] if n.outputs else None
        if layer is None:
            return None
        t = layer.outputs[0]
        for _ in range(8):
            if t.name in by_input:
                return by_input[t.name]
            if len(t.outputs) != 1 or t.outputs[0].op in LAYER_OPS or not t.outputs[0].outputs:
                return None
            t = t.outputs[0].outputs[0]
        return None

    following = {a.name: next_act(a) for a in acts}
    has_prev = {b.name for b in following.values() if b is not None}
    runs = []
    for a in acts:
        if a.name in has_prev:
            continue
        run = [a]
        while following.get(run[-1].name) is not None and len(run) < len(acts):
            run.append(following[run[-1].name])
        runs.append(run)
    return runs


def merge_candidates(model: onnx.ModelProto, acts: list[Activation], entropy: dict[str, float],
                     gain: Callable[[tuple[Activation, ...]], Gain]) -> list[Candidate]:
    """Contiguous sub-runs of ``_adjacent`` activations (up to MAX_GROUP) worth a trial of their own: a single
    activation with a predicted gain (gain.py), or a group whose joint gain exceeds the sum of its members' (a
    merge that needs all of them). Ranked by expected loss, then predicted gain (``gain_order``)."""
    out: list[Candidate] = []
    own: dict[str, Gain] = {}
    for run in _adjacent(model, acts):
        for i in range(len(run)):
            for j in range(i + 1, min(i + MAX_GROUP, len(run)) + 1):
                group = tuple(run[i:j])
                g = gain(group)
                if len(group) == 1:
                    own[group[0].name] = g
                if not g.known or not g.any:
                    continue
                members = [own.get(a.name) or gain((a,)) for a in group]
                if len(group) > 1 and g.relative <= sum(m.relative for m in members) + 1e-12:
                    continue  # no merge needs the whole group: its members are tried on their own
                out.append(Candidate(group, float(np.mean([entropy[a.name] for a in group])), max(0, g.macs), g))
    return gain_order(out)


def gain_order(cands: list[Candidate]) -> list[Candidate]:
    """Candidates by expected loss, then predicted gain: increasing mean entropy (the paper's proxy for the loss a
    linearization costs), ties by decreasing ``gain.relative``, then graph order (stable sort).

    Measured alternative, not used: increasing ``(entropy + 0.05) / gain.relative`` (gain per expected loss) tried
    mobilenetv2_wide_digits' three-activation group with the stem first; it failed, and the search ended at 15
    compute nodes (0.61x latency) in 17 trials where this order reaches 13 (0.54x) in 12."""
    def key(c: Candidate) -> tuple[float, float]:
        rel = c.gain.relative if c.gain is not None and c.gain.known else 0.0
        return round(c.entropy, 6), -rel
    return sorted(cands, key=key)


# ---------------------------------------------------------------------------------------------------------------
# the search


class Spill:
    """Models kept on disk (a temporary directory removed with this object) instead of in memory: an accepted
    trial's model is read again only when another strategy reaches the same state."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory | None = None
        self._count = 0

    def put(self, model: onnx.ModelProto) -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="onnx-easier-")
        self._count += 1
        path = os.path.join(self._dir.name, f"state{self._count}.onnx")
        onnx.save(model, path)
        return path

    def get(self, path: str) -> onnx.ModelProto:
        return onnx.load(path)


@dataclass
class Trial:
    """One candidate tried: its activations, the fidelity loss measured, whether it was kept, time spent."""

    acts: list[str]
    fidelity: float
    accepted: bool
    seconds: float
    macs: int
    compute_nodes: int
    refit: list[RefitRecord] = field(default_factory=list)
    note: str = ""
    upper: float | None = None  # upper confidence bound of the loss (the acceptance criterion)
    samples: int = 0  # held-out samples measured (fewer when rejected early)
    early: bool = False  # rejected after part of the held-out samples (select.Judge, sequential)
    distill: dict | None = None  # the loss before / after distillation of a candidate that failed (Search.recover)

    def as_report(self) -> dict:
        bound = {} if self.upper is None else {"upper_bound": self.upper if np.isfinite(self.upper) else None,
                                               "samples": self.samples}
        return {"activations": self.acts, "fidelity": self.fidelity, "accepted": self.accepted, **bound,
                **({"early_rejection": True} if self.early else {}),
                "seconds": round(self.seconds, 3), "macs": self.macs, "compute_nodes": self.compute_nodes,
                "refit": [r.as_report() for r in self.refit], **({"note": self.note} if self.note else {}),
                **({"distill": self.distill} if self.distill else {})}


@dataclass
class SearchResult:
    strategy: str
    model: onnx.ModelProto
    linearized: list[str]
    trials: list[Trial]
    fidelity: Fidelity | None
    seconds: float
    untried: int = 0  # candidates left when the time limit cut the search short (0: it ran to the end)
    skipped: list[tuple[list[str], str]] = field(default_factory=list)  # (activations, why) never tried


StepHook = Callable[[str, int, int, str], None]
"""``on_step(phase, done, planned, message)``: ``done`` of ``planned`` steps of ``phase`` are finished. For a search
``planned`` is an upper bound that shrinks as candidates are accepted (max_remove, overlapping candidates)."""


@dataclass
class Search:
    """Everything a search needs; built once by api.optimize and shared by the strategies."""

    original: onnx.ModelProto  # named original (the reference every fidelity is measured against)
    exact: onnx.ModelProto  # original with exact fusions only (the starting point)
    activations: list[Activation]
    entropy: dict[str, float]
    fit: CalibrationData
    check: CalibrationData
    judge: Judge
    mode: str = "affine"
    refit: bool = True
    max_remove: int | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    progress: Callable[[str], None] | None = None  # one line per trial (kept for callers of the string form)
    checks: CheckData | None = None  # fail-safe fusion of every trial (select.fuse_model)
    deadline: float | None = None  # time.perf_counter() after which no trial starts (api's time limit)
    on_step: StepHook | None = None  # on_step("search <strategy>", trials done, trials planned, message)
    try_all: bool = False  # also try candidates predicted to gain nothing (gain.py)
    # a last chance for a candidate that fails the budget: recover(model, loss) -> a model to judge again, or None
    # (distill.Recovery: distillation to the original); where it has judged(seconds, before, after), it is told the
    # time of that judging (its time budget covers all it causes) and the loss before and after
    recover: Callable[[onnx.ModelProto, float], onnx.ModelProto | None] | None = None
    gallop: bool = True  # try consecutive candidates together after acceptances (module doc); False: one by one

    def __post_init__(self) -> None:
        self.targets = Targets(self.original, execution=self.judge.execution, cache=self.judge.cache,
                               exact=self.exact)
        self._memo: dict[tuple, tuple[Trial, str | None, Fidelity | None]] = {}  # model: a file of _spill
        self._spill = Spill()
        self._stats_cache: dict[tuple, ChannelStats] = {}  # stats_keys -> the statistics on the fit samples
        self._gain_model: GainModel | bool | None = None  # False: the prediction could not be set up
        self._gains: dict[tuple[str, ...], Gain] = {}
        self.skipped: list[tuple[list[str], str]] = []
        self._multi: bool | None = None  # has_groups, once ordered() has run

    def gain(self, group: tuple[Activation, ...]) -> Gain:
        """Predicted gain of linearizing ``group`` in the exact model (gain.py; memoized, one model for all)."""
        key = tuple(a.name for a in group)
        if key not in self._gains:
            if self._gain_model is None:
                try:
                    self._gain_model = GainModel(self.exact, self.activations, self.input_shapes)
                except Exception as exc:  # noqa: BLE001 - no prediction: every candidate is tried, as before
                    log.warning("no gain prediction (%s): every candidate is tried", exc)
                    self._gain_model = False
            self._gains[key] = (Gain(known=False) if self._gain_model is False
                                else self._gain_model.predict(group, kept_nodes(self.activations, group)))
        return self._gains[key]

    def has_groups(self) -> bool:
        """Whether a merge candidate holds several activations (only then do the two strategies try different
        candidates; without, ``merge`` tries ``entropy``'s singles in another order)."""
        if self._multi is None:
            self.ordered("merge")
        return bool(self._multi)

    def ordered(self, strategy: str) -> list[Candidate]:
        """The candidates of ``strategy`` in the order they are tried; those that cannot gain anything go to
        ``self.skipped`` (unless ``try_all``). ``entropy``: single activations by entropy (the paper's order);
        ``merge``: ``merge_candidates`` (by entropy, then predicted gain), then the remaining singles by
        entropy. A single without a gain of its own stays a candidate when a merge group needs it (its partner
        may be accepted before it)."""
        singles = [Candidate((a,), self.entropy[a.name], 0, self.gain((a,))) for a in self.activations]
        singles.sort(key=lambda c: c.entropy)  # stable: ties keep graph order
        groups = merge_candidates(self.exact, self.activations, self.entropy, self.gain)
        self._multi = any(len(c.acts) > 1 for c in groups)
        needed = {n for c in groups for n in c.names}
        tried = {c.names[0]: self.try_all or c.gain.any or c.names[0] in needed for c in singles}
        useful = [c for c in singles if tried[c.names[0]]]
        self.skipped = [(c.names, c.gain.reason()) for c in singles if not tried[c.names[0]]]
        if self._gain_model:
            self._gain_model = None  # every candidate's gain is memoized: its graph (the exact weights) is not held
        if strategy == "entropy":
            return useful
        grouped = {tuple(c.names) for c in groups}
        return groups + [c for c in useful if tuple(c.names) not in grouped]

    def _more_work(self, a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
        """Whether ``a`` has more nodes, compute nodes or MACs than ``b``."""
        ca, cb = measure(a, 0, self.input_shapes), measure(b, 0, self.input_shapes)
        return ca.nodes > cb.nodes or ca.compute_nodes > cb.compute_nodes or ca.macs > cb.macs

    def _candidate_stats(self, current: onnx.ModelProto, remaining: list[Activation],
                         cand: Candidate) -> dict[str, ChannelStats]:
        """The affine-fit statistics of ``cand``'s activations in ``current``, cached by ``stats_keys``: a state that
        changed nothing upstream of an activation (the same nodes, weights and inputs compute its tensors) reuses
        its statistics without a run. On a miss, every remaining activation whose statistics ``current`` lacks is
        calibrated in the same pass (the next candidates in this state need them)."""
        if self.mode != "affine":
            return {}
        keys = stats_keys(current, remaining)
        missing = [a for a in remaining if keys[a.name] not in self._stats_cache]  # None (unkeyed) never is
        uncached: dict[str, ChannelStats] = {}
        if any(a in missing for a in cand.acts):
            fresh = self._stats(current, missing)
            log.info("affine statistics: %d activations calibrated, %d reused", len(missing),
                     len(remaining) - len(missing))
            for a in missing:
                if a.name in fresh and keys[a.name] is not None:
                    self._stats_cache[keys[a.name]] = fresh[a.name]
                elif a.name in fresh:
                    uncached[a.name] = fresh[a.name]
        return {a.name: uncached[a.name] if a.name in uncached else self._stats_cache[keys[a.name]]
                for a in cand.acts}

    def _stats(self, model: onnx.ModelProto, acts: list[Activation]) -> dict[str, ChannelStats]:
        if self.mode != "affine" or not acts:
            return {}
        return calibrate(model, acts, self.fit, moments=True, execution=self.judge.execution, cache=self.judge.cache)

    def run(self, strategy: str) -> SearchResult:
        """One greedy pass over the candidates of ``strategy`` (module doc).

        Trials are memoized by (the candidates accepted so far, in order; the candidate): everything a trial does
        is deterministic, so when the strategies try the same candidate from the same state (e.g. ``merge`` on a
        model without merge groups repeats ``entropy``), the second gets the first's result without recomputing
        (its trial says "reused")."""
        t_start = time.perf_counter()
        current = self.exact
        done: list[str] = []
        path: tuple[tuple[str, ...], ...] = ()  # the accepted candidates, in order: the state's key
        trials: list[Trial] = []
        remaining = list(self.activations)
        best: Fidelity | None = None
        candidates = self.ordered(strategy)
        untried = 0
        self._step(strategy, 0, candidates, 0, done, f"{strategy} search: {len(candidates)} candidates")
        index, size = 0, 1
        limit: int | None = None  # end of the last rejected group: a failing candidate lies before it (bisection)
        while index < len(candidates):
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                untried = sum(1 for c in candidates[index:] if self._eligible(c, done))
                log.warning("time limit reached: the %s search stops with %d candidates untried", strategy, untried)
                break
            members, after = self._chunk(candidates, index, done, size if self.gallop else 1, limit)
            if not members:
                if limit is not None:  # nothing eligible left before the limit: gallop on past it
                    limit, size = None, 1
                    continue
                break
            cand = members[0] if len(members) == 1 else Candidate(
                tuple(a for c in members for a in c.acts), float(np.mean([c.entropy for c in members])),
                sum(c.saving for c in members))
            key = (path, tuple(cand.names))
            if key in self._memo:
                trial, kept, fid = self._memo[key]
                model = self._spill.get(kept) if kept is not None else None
                reused = "reused: same state and candidate as an earlier trial"
                trial = replace(trial, note=f"{trial.note}; {reused}" if trial.note else reused)
            else:
                try:
                    trial, model, fid = self._trial(current, path, remaining, cand, len(members))
                except OnnxEasierError as exc:  # a candidate that breaks the model is a rejected candidate
                    log.warning("trial %s failed and was undone: %s", cand.names, exc)
                    trial, model, fid = Trial(cand.names, float("nan"), False, 0.0, 0, 0,
                                              note=f"failed and undone: {exc}"), None, None
                # a rejected trial's model is never used again: not held (100 MB a trial on ResNet-50); an
                # accepted one waits on disk for another strategy that reaches the same state
                self._memo[key] = (trial, self._spill.put(model) if fid is not None and fid.accepted else None,
                                   fid)
            trials.append(trial)
            line = (f"{strategy} trial {len(trials)}: {' + '.join(cand.names)}: "
                    + (f"loss {fid.value:.4f} (upper bound {fid.upper:.4f}) {'kept' if fid.accepted else 'undone'}"
                       if fid is not None else "undone"))
            if self.progress and fid is not None:
                self.progress(line)
            accepted = fid is not None and fid.accepted
            if accepted:
                current, best = model, fid
                done.extend(cand.names)
                path = (*path, tuple(cand.names))
                remaining = [a for a in remaining if a.name not in done]
            # galloping: after an acceptance the next trial takes twice as many candidates; a rejected group is
            # tried again from its first candidate with half as many; a rejected single is passed
            if accepted or len(members) == 1:
                index = after
            if not accepted and len(members) > 1:  # a failing candidate among them: bisect this group
                limit, size = after, (len(members) + 1) // 2
            elif not accepted:  # the failing one, found: gallop again after it
                limit, size = None, 1
            elif limit is not None and index < limit:  # the failure is in the rest of the group: its first half
                size = max(1, (sum(1 for c in candidates[index:limit] if self._eligible(c, done)) + 1) // 2)
            else:
                limit, size = None, min(2 * len(members), MAX_CHUNK)
            model = None
            release()  # the trial's gs graphs (re-fit, fusion checks) are reference cycles holding model copies
            self._step(strategy, len(trials), candidates, index, done, line)
        return SearchResult(strategy, current, done, trials, best, time.perf_counter() - t_start, untried,
                            list(self.skipped))

    def _chunk(self, candidates: list[Candidate], index: int, done: list[str], size: int,
               stop: int | None = None) -> tuple[list[Candidate], int]:
        """Up to ``size`` candidates in ``[index, stop)`` that can be tried together once ``done`` are linearized
        (each eligible with the others taken), and the index after the last one."""
        end = len(candidates) if stop is None else min(stop, len(candidates))
        members: list[Candidate] = []
        taken = list(done)
        i = index
        while i < end and len(members) < size:
            if self._eligible(candidates[i], taken):
                members.append(candidates[i])
                taken.extend(candidates[i].names)
            i += 1
        return members, (i if members else end)

    def _eligible(self, cand: Candidate, done: list[str]) -> bool:
        """Whether ``cand`` can still be tried once ``done`` are linearized (max_remove, no overlap)."""
        if self.max_remove is not None and len(done) + len(cand.acts) > self.max_remove:
            return False
        return not any(n in done for n in cand.names)

    def _step(self, strategy: str, tried: int, candidates: list[Candidate], start: int, done: list[str],
              message: str) -> None:
        """Tell ``on_step`` how far the search is: ``tried`` trials, planned = those + the candidates from
        ``start`` on that are still eligible."""
        if self.on_step:
            left = sum(1 for c in candidates[start:] if self._eligible(c, done))
            self.on_step(f"search {strategy}", tried, tried + left, message)

    def _trial(self, current: onnx.ModelProto, path: tuple, remaining: list[Activation],
               cand: Candidate, members: int = 1) -> tuple[Trial, onnx.ModelProto | None, Fidelity | None]:
        """Linearize ``cand`` in ``current`` (the state reached by ``path``), fuse, re-fit, measure."""
        t0 = time.perf_counter()
        stats = self._candidate_stats(current, remaining, cand)
        fits = {a.name: stats[a.name].affine_fit() for a in cand.acts} if self.mode == "affine" else None
        others = kept_nodes(remaining, cand.acts)
        built = linearize_and_fuse(current, list(cand.acts), self.mode, fits, others, self.checks)
        fallback = ""
        if self.mode == "affine" and built.linearized == len(cand.acts) and _leftover(built.model, cand.acts):
            # an affine map that cannot fold (e.g. into an identity skip and a padded conv at once) stays as
            # nodes of its own; the identity never does, and the re-fit of the consumers absorbs a and b (when
            # every Mul/Add the linearization made was folded, the identity cannot do better: not built)
            try:  # unchecked: only compared; checked below if chosen
                plain = linearize_and_fuse(current, list(cand.acts), "identity", None, others)
            except Exception:  # noqa: BLE001 - a pass that crashes: the fail-safe fusion finds and rolls it back
                plain = linearize_and_fuse(current, list(cand.acts), "identity", None, others, self.checks)
            if plain.linearized == len(cand.acts) and self._more_work(built.model, plain.model):
                if self.checks is not None and not same_graph(plain.model, plain.reference) and \
                        self.checks.guard(plain.reference, current).failure(plain.model) is not None:
                    plain = linearize_and_fuse(current, list(cand.acts), "identity", None, others, self.checks)
                built = plain
                fallback = "the affine map would stay as a node: identity + re-fit"
        if built.linearized != len(cand.acts):
            return (Trial(cand.names, float("nan"), False, time.perf_counter() - t0, 0, 0,
                          note="; ".join(built.notes) or "could not be linearized"), None, None)
        model = built.model
        records: list[RefitRecord] = []
        targets = refit_targets(built.reference, built.fusion, model, list(cand.acts)) if self.refit else []
        built = plain = None  # the references and the unchosen model: not held through re-fit and fidelity
        if self.refit:
            model, records = refit_layers(model, self.targets, targets, self.fit, self.check,
                                          batch=self.judge.batch, softmax_head=self.judge.softmax_head)
        fid = self.judge(model, sequential=True)
        distilled = None
        if not fid.accepted and self.recover is not None and members == 1:  # a group is split and tried again
            recovered = self.recover(model, float(fid.value))
            if recovered is model:  # distilled, no gain on the check samples: the loss stands
                distilled = {"before": float(fid.value), "after": float(fid.value), "accepted": False}
            elif recovered is not None:  # same graph, new weights: judged again, kept only if accepted
                t_judge = time.perf_counter()
                again = self.judge(recovered, sequential=True)
                judged = getattr(self.recover, "judged", None)
                if judged is not None:
                    judged(time.perf_counter() - t_judge, float(fid.value), float(again.value))
                distilled = {"before": float(fid.value), "after": float(again.value), "accepted": bool(again.accepted)}
                if again.accepted:
                    model, fid = recovered, again
        cost = measure(model, 0, self.input_shapes)
        log.info("trial %s: fidelity loss %.5f, upper bound %.5f on %d samples (%s)", cand.names, fid.value,
                 fid.upper, fid.samples, "kept" if fid.accepted else "undone")
        return (Trial(cand.names, float(fid.value), bool(fid.accepted), time.perf_counter() - t0, cost.macs,
                      cost.compute_nodes, records,
                      "; ".join(x for x in (f"{members} candidates tried together" if members > 1 else "", fallback) if x),
                      fid.upper, fid.samples, fid.early, distilled), model, fid)

