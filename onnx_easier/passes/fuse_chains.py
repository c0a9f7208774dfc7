"""Fuse chains of linear elements into fewer layers, choosing the cheapest exact partition of each chain.

**Pattern.** A chain is a path ``e_1 -> e_2 -> ... -> e_n`` of linear elements (see ``fuse_common``: Conv, inference
BatchNormalization, per-channel Mul/Add/Sub/Div, Gemm, MatMul by a constant, zero Pad before a Conv, Flatten/Reshape
of ``[N, C, 1.., 1]`` to ``[N, C]``) where each link tensor has exactly one reader, is not a graph output and is not
read inside a subgraph, and consecutive elements agree on the layout (channel axis 1 or last, same rank).

**Check.** Each element is a ``ConvLayer`` ``L_i`` (per-channel affines are 1x..x1 depthwise layers, Gemm/MatMul are
dense ``nd = 0`` layers, layers after a Flatten are lifted to 1x1 convolutions). A segment ``e_i..e_j`` of two or
more elements may become one layer only when

- ``linear_math.compose([L_i..L_j], in_spatial)`` is exact (it states why not otherwise: the border condition of a
  padded later layer, a constant term that varies across positions without a known input size, ...);
- its weights are read by no node outside the segment (``shared_weight``; vectors may be: the rewrite leaves the
  old constants to their other readers) and none is a graph input (those are not constants at all: the user may
  feed them);
- what would be emitted costs no more MACs than the elements it replaces: ``conv_macs`` at the real output size
  (static shapes from shape inference; with symbolic spatial sizes the positions are counted relative to the chain's
  input, ``1 / prod(strides so far)``), per-channel affines ``C * positions``, a bias map adds ``C * positions``;
- its weight parameters are no more than the elements' (a bias map is an input-independent constant, not counted).

**Segmentation.** Over each maximal chain a dynamic programme picks the partition into consecutive segments with the
least total MACs (ties: fewer nodes, then no change), so a segment whose pairs are all refused may still be chosen
(1x1 expand -> depthwise 3x3 -> 1x1 project becomes one 3x3 convolution while neither pair alone is cheaper).
Segments are at most ``MAX_SEGMENT`` elements long.

**Rewrite.** A chosen segment becomes one Conv (+ Add of the bias map) (+ Flatten when it crossed a Flatten), one
Gemm, MatMul (+ Add), or per-channel Mul/Add (``fuse_common.emit``), writing the segment's original output tensor, so
graph outputs and downstream readers are untouched. A Pad + Conv pair alone becomes one Conv with larger pads.
Each fused node is named ``fused(a+b+...)`` and recorded in ``FusionContext.mapping``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import onnx_graphsurgeon as gs

from onnx_easier.graph_utils import consumers, is_graph_output, producer
from onnx_easier.linear_math import Composed, compose, conv_params, fused_layout
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import (
    LINEAR_OPS,
    Element,
    Emission,
    FusionContext,
    Names,
    Sized,
    detach,
    emit,
    fused_name,
    lift,
    merge_pad,
    node_label,
    plan,
    recognise,
    refuse,
    resolve_layouts,
    shared_weight,
    sized,
)

log = logging.getLogger(__name__)

MAX_SEGMENT = 16
KEEP_BYTES = 64 * 2**20  # a composed segment larger than this is not kept while the partition is chosen (below)


def run(graph: gs.Graph, ctx: FusionContext | None = None) -> PassResult:
    """Fuse every linear chain of ``graph`` (main graph only) into its cheapest exact partition."""
    ctx = ctx if ctx is not None else FusionContext()
    result = PassResult("fuse_chains")
    chains = find_chains(graph, result)
    names = Names(graph)
    replaced = 0
    emitted = 0
    for chain in chains:
        for run_ in _runs(chain, result):
            for seg in _partition(run_, result):
                n_old, n_new = _rewrite(graph, names, ctx, seg, result)
                replaced += n_old
                emitted += n_new
                result.changed += 1
    if result.changed:
        graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    log.info("fuse_chains: %d chains, %d segments fused (%d nodes -> %d)", len(chains), result.changed,
             replaced, emitted)
    return result


# ----------------------------------------------------------------------------------------------------------------
# pattern: maximal chains


def find_chains(graph: gs.Graph, result: PassResult) -> list[list[Element]]:
    """Maximal chains of linked elements of the main graph, in graph order.

    Only nodes that can link to a neighbour are recognised (``_may_link``): recognising reads a node's weights
    (in float64), and a layer between two nonlinear nodes (most Convs of a CNN, every Linear of an MLP with ReLUs)
    can fuse with nothing, so its weights are never read."""
    elements: dict[int, Element] = {}
    for node in graph.nodes:
        if not _may_link(graph, node):
            continue
        e = recognise(node)
        if isinstance(e, str):
            refuse(result, e)
        elif e is not None:
            elements[id(node)] = e
    succ: dict[int, Element] = {}
    has_pred: set[int] = set()
    for key, e in elements.items():
        nxt = _link(graph, e, elements, result)
        if nxt is not None:
            succ[key] = nxt
            has_pred.add(id(nxt.nodes[0]))
    chains = []
    for key, e in elements.items():
        if key in has_pred:
            continue
        chain = [e]
        while id(chain[-1].nodes[0]) in succ:
            chain.append(succ[id(chain[-1].nodes[0])])
        chains.append(chain)
    return chains


def _linear_op(node: gs.Node | None) -> bool:
    return node is not None and node.op in LINEAR_OPS and node.domain in ("", "ai.onnx", None)


def _may_link(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether ``node`` could be linked into a chain of two or more elements, judged from ops alone: it is a
    linear op, and a linear op reads its output or it reads (as any input: ``c * x`` has its data second) the
    output of a linear op. (Where such a link is then refused, e.g. a tensor with two readers, the note says why.)"""
    if not _linear_op(node) or not node.outputs:
        return False
    if any(_linear_op(r) for r in consumers(node.outputs[0])):
        return True
    return any(_linear_op(producer(t)) for t in node.inputs if t.name)


def _link(graph: gs.Graph, e: Element, elements: dict[int, Element], result: PassResult) -> Element | None:
    """The element reading ``e``'s output as its only reader, or None (with a note when a chain is cut)."""
    t = e.out
    readers = consumers(t)
    linear_readers = [elements[id(r)] for r in readers if id(r) in elements]
    if not linear_readers:
        return None
    if is_graph_output(graph, t):
        refuse(result, f"chain cut at {t.name!r}: it is a graph output")
        return None
    if len(readers) != 1:
        refuse(result, f"chain cut at {t.name!r}: it has {len(readers)} readers")
        return None
    n = linear_readers[0]
    if n.inp is not t:
        return None
    out_rank = 2 if e.kind == "reshape" else e.rank
    lo, li = e.out_layout, n.layout
    if out_rank != n.rank or (lo is not None and li is not None and lo != li):
        refuse(result, f"chain cut at {t.name!r}: {e.nodes[-1].name!r} and {n.nodes[0].name!r} disagree on the "
                       "channel axis")
        return None
    return n


# ----------------------------------------------------------------------------------------------------------------
# check: runs of fusable elements, costs, the partition


@dataclass
class _Segment:
    items: list[Sized]
    composed: Composed | None  # None: weighed and dropped (over KEEP_BYTES); composed again if chosen
    emission: Emission
    parts_macs: Fraction


def _runs(chain: list[Element], result: PassResult) -> list[list[Sized]]:
    """Merge Pad into the next Conv, fix the layout and channels of per-channel affines, and cut the chain where an
    element cannot take part in a fusion; returns runs with their sizes and costs."""
    merged: list[Element] = []
    for e in chain:
        prev = merged[-1] if merged else None
        if prev is not None and prev.kind == "pad" and e.kind == "layer" and e.nodes[0].op == "Conv":
            merged[-1] = merge_pad(prev, e)
        else:
            merged.append(e)
    resolve_layouts(merged, result)
    runs: list[list[Element]] = [[]]
    for e in merged:
        if e.kind == "pad" or (e.kind == "affine" and e.layer is None):
            if e.kind == "pad":
                refuse(result, f"Pad {e.nodes[0].name!r} kept: it is not followed by a Conv")
            runs.append([])
        else:
            runs[-1].append(e)
    return [sized(r) for r in runs if r]


def _check(items: list[Sized]) -> _Segment | str:
    """The fused segment, or why ``items`` (two or more) cannot become one layer."""
    elements = [it.e for it in items]
    label = "+".join(n for e in elements for n in e.names)
    if elements[0].kind == "reshape" or elements[-1].kind == "reshape":
        return f"{label}: a Flatten/Reshape is fused only from inside a segment"
    reason = shared_weight(elements, vectors_ok=True)  # the rewrite emits new constants (``emit``)
    if reason:
        return f"{label}: {reason}"
    layout = elements[0].layout
    layers = [lift(e.layer, layout.nd) for e in elements if e.kind != "reshape"]
    spatial = items[0].spatial if layout.nd else ()
    parts = sum((it.macs for it in items), Fraction(0))
    try:
        geometry = fused_layout(layers)  # weigh the fusion before computing it (structural groups)
        dense = layout.nd >= 1 or not (geometry.groups == geometry.cin == geometry.cout
                                       and all(k == 1 for k in geometry.kernel))
        if dense and geometry.macs(()) * items[-1].positions > parts:
            return (f"{label}: fusing costs more ({_fmt(geometry.macs(()) * items[-1].positions)} MACs > "
                    f"{_fmt(parts)})")
        composed = compose(layers, spatial)
    except (ValueError, AssertionError) as err:
        return f"{label}: {err}"
    if isinstance(composed, str):
        return f"{label}: {composed}"
    flatten = any(e.kind == "reshape" for e in elements)
    emission = plan(layout, composed, items[-1].positions, flatten)
    if emission.macs > parts:
        return f"{label}: fusing costs more ({_fmt(emission.macs)} MACs > {_fmt(parts)})"
    params = sum(conv_params(e.layer) for e in elements if e.layer is not None)
    if conv_params(composed.layer) > params:
        return f"{label}: fusing needs more parameters ({conv_params(composed.layer)} > {params})"
    return _Segment(items, composed, emission, parts)


def _nbytes(composed: Composed) -> int:
    layer = composed.layer
    return layer.weight.nbytes + layer.bias.nbytes + (0 if composed.bias_map is None else composed.bias_map.nbytes)


def _fmt(v: Fraction) -> str:
    return str(int(v)) if v.denominator == 1 else f"{float(v):.4g} (relative)"


def _partition(items: list[Sized], result: PassResult) -> list[_Segment]:
    """Segments to rewrite in the least-MACs partition of ``items`` (dynamic programme over split points).

    Every candidate segment is composed to be weighed; one whose arrays exceed KEEP_BYTES keeps only its cost and
    is composed again if the partition chooses it, so a chain of large dense layers (8192 x 8192 weights of a model
    over 2 GB) holds one float64 product at a time, not one per candidate segment."""
    n = len(items)
    cache: dict[tuple[int, int], _Segment | str] = {}

    def segment(i: int, j: int) -> _Segment | str:
        if (i, j) not in cache:
            s = _check(items[i:j])
            if isinstance(s, _Segment) and s.composed is not None and _nbytes(s.composed) > KEEP_BYTES:
                s = _Segment(s.items, None, s.emission, s.parts_macs)
            cache[(i, j)] = s
        return cache[(i, j)]

    inf = (Fraction(10**30), 0)
    best: list[tuple[Fraction, int]] = [(Fraction(0), 0)] + [inf] * n
    choice: list[tuple[int, _Segment | None]] = [(0, None)] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - MAX_SEGMENT), -1):
            if j - i == 1:
                e = items[i].e
                seg: _Segment | None = None
                if len(e.nodes) > 1:  # Pad + Conv: rewritten as one Conv at the same cost
                    composed = Composed(e.layer, None)
                    seg = _Segment([items[i]], composed, plan(e.layout, composed, items[i].positions, False),
                                   items[i].macs)
                cost = (items[i].macs, 1 if seg else len(e.nodes))
            else:
                s = segment(i, j)
                if isinstance(s, str):
                    continue
                seg, cost = s, (s.emission.macs, s.emission.nodes)
            total = (best[i][0] + cost[0], best[i][1] + cost[1])
            if total < best[j]:
                best[j], choice[j] = total, (i, seg)
    chosen: list[_Segment] = []
    bounds: list[int] = []
    j = n
    while j > 0:
        i, seg = choice[j]
        if seg is not None and seg.composed is None:
            seg = _check(seg.items)  # deterministic: the same segment as weighed
            assert isinstance(seg, _Segment), seg
        if seg is not None:
            chosen.append(seg)
        bounds.append(i)
        j = i
    for k in bounds:
        if 0 < k < n and "reshape" not in (items[k - 1].e.kind, items[k].e.kind):
            why = segment(k - 1, k + 1)
            if isinstance(why, str):
                refuse(result, f"not fused {why}")
    return chosen[::-1]


# ----------------------------------------------------------------------------------------------------------------
# rewrite


def _rewrite(graph: gs.Graph, names: Names, ctx: FusionContext, seg: _Segment, result: PassResult) -> tuple[int, int]:
    elements = [it.e for it in seg.items]
    old = [n for e in elements for n in e.nodes]
    replaced = [node_label(n) for n in old]
    x, out = elements[0].inp, elements[-1].out
    name = names.take(fused_name(ctx.expand(replaced)))
    detach(old)
    new = emit(graph, names, name, elements[0].layout, x, out, seg.composed, elements[0].dtype,
               flatten=any(e.kind == "reshape" for e in elements))
    sources = ctx.record([n.name for n in new], x.name, out.name, replaced)
    layer = seg.composed.layer
    extra = " + bias map" if seg.composed.bias_map is not None else ""
    result.notes.append(
        f"{name}: {'+'.join(sources)} -> {'+'.join(n.op for n in new)} "
        f"({layer.cin}->{layer.cout}, kernel {list(layer.kernel)}, groups {layer.groups}{extra}); "
        f"MACs {_fmt(seg.parts_macs)} -> {_fmt(seg.emission.macs)}")
    log.debug("fuse_chains: %s", result.notes[-1])
    return len(old), len(new)
