"""Fold residual Adds into linear layers.

**Pattern.** ``Add(a, b)`` where each operand is either the shared input ``x`` itself or a *branch*: a path of linear
elements (``fuse_common``) from ``x`` whose link tensors have one reader each and are not graph outputs, optionally
ended by an ``Add`` of a constant bias map ``[1, C, *S]`` (what ``fuse_chains`` emits when a constant leaks through
a padded layer). Two shapes of the rule:

- identity:    ``y = x + f(x)``  ->  ``F = add_identity(compose(f))`` (``+1`` on the centre tap of the diagonal
  channel; dense and MatMul layers get ``W + I``);
- two branches: ``y = g(x) + h(x)``  ->  ``F = sum_layers(compose(g), compose(h))``: both kernels written with
  dilation 1 and placed on a common grid (begin pad ``P = max(pb_g, pb_h)``, the kernel of ``g`` starts at tap
  ``P - pb_g``), summed, the common dilation restored; biases (and bias maps) add up.

**Check.** Refused, with the reason in words, when the composition is not exact, the layers differ in channels or
strides, the two branches' output sizes differ (for every input size when the spatial sizes are symbolic), a weight
is also read outside the pattern, or the fused layer costs more MACs than the branches plus the Add (a bottleneck
``192 -> 12 -> 192`` with a skip stays as it is) or has more weight parameters.

**Rewrite.** One fused layer from ``x`` writing the Add's output tensor (same name), emitted like a chain
(``fuse_common.emit``) and recorded in ``FusionContext.mapping`` with the Add among its sources. Adds are visited in
topological order on the live graph, so nested patterns (RepVGG: ``(conv3x3(x) + conv1x1(x)) + bn(x)``) fold in one
pass; ``fusion.fuse`` then runs chain fusion again, since a folded block may now fuse with its neighbours.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from onnx_easier.graph_utils import constant_value, consumers, is_constant, producer, single_consumer
from onnx_easier.linear_math import (
    Composed,
    ConvLayer,
    add_identity,
    compose,
    conv_params,
    make_layer,
    output_spatial,
    regroup,
    to_dense,
)
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import (
    FLOAT_DTYPES,
    Element,
    FusionContext,
    Names,
    Sized,
    detach,
    emit,
    fused_name,
    merge_pad,
    node_label,
    np_dtype,
    plan,
    recognise,
    refuse,
    resolve_layouts,
    shared_weight,
    sized,
)

log = logging.getLogger(__name__)

MAX_BRANCH = 16


def run(graph: gs.Graph, ctx: FusionContext | None = None) -> PassResult:
    """Fold every foldable residual / two-branch Add of the main graph."""
    ctx = ctx if ctx is not None else FusionContext()
    result = PassResult("fuse_residual")
    names = Names(graph)
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    for add in list(graph.nodes):
        if add.op != "Add" or add.domain not in ("", "ai.onnx", None) or not add.outputs:
            continue
        match = _match(graph, add)
        if match is None:
            continue
        fold = _fold(match, result)
        if isinstance(fold, str):
            refuse(result, f"Add {add.name!r} kept: {fold}")
            continue
        _rewrite(graph, names, ctx, add, fold, result)
        result.changed += 1
    if result.changed:
        graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    log.info("fuse_residual: %d residual Adds folded", result.changed)
    return result


# ----------------------------------------------------------------------------------------------------------------
# pattern


@dataclass
class _Branch:
    """Elements from ``source`` to the Add (data-flow order) and an optional bias-map Add at the end."""

    source: gs.Tensor
    elements: list[Element]
    tail: gs.Node | None = None
    tail_map: np.ndarray | None = None  # [C, *S]

    @property
    def nodes(self) -> list[gs.Node]:
        return [n for e in self.elements for n in e.nodes] + ([self.tail] if self.tail is not None else [])


def _bias_map_tail(graph: gs.Graph, t: gs.Tensor) -> tuple[gs.Node, gs.Tensor, np.ndarray] | None:
    """``t = Add(y, M)`` with a constant ``M`` of shape ``[1, C, *S]`` equal to ``t``'s static shape (not per-channel)."""
    p = producer(t)
    if p is None or p.op != "Add" or len(p.inputs) != 2:
        return None
    y, m = (p.inputs[0], p.inputs[1]) if is_constant(p.inputs[1]) else (p.inputs[1], p.inputs[0])
    if is_constant(y) or not is_constant(m) or len(consumers(m)) != 1:
        return None
    value = np.asarray(constant_value(m), dtype=np.float64)
    shape = t.shape
    if shape is None or value.ndim != len(shape) or value.ndim < 3 or value.shape[0] != 1:
        return None
    if list(value.shape[1:]) != list(shape[1:]) or single_consumer(graph, y) is not p:
        return None
    return p, y, value[0]


def _walk(graph: gs.Graph, t: gs.Tensor, reader: gs.Node) -> _Branch:
    """The longest branch of linear elements ending at ``t`` (read only by ``reader``)."""
    branch = _Branch(t, [])
    if single_consumer(graph, t) is not reader:
        return branch
    tail = _bias_map_tail(graph, t)
    cur, nxt = t, reader
    if tail is not None:
        branch.tail, cur, branch.tail_map = tail[0], tail[1], tail[2]
        nxt = tail[0]
    while len(branch.elements) < MAX_BRANCH and single_consumer(graph, cur) is nxt:
        p = producer(cur)
        e = recognise(p) if p is not None else None
        if not isinstance(e, Element) or e.out is not cur or e.kind == "reshape":
            break
        branch.elements.insert(0, e)
        cur, nxt = e.inp, e.nodes[0]
    branch.source = cur
    if not branch.elements and branch.tail is not None:
        return _Branch(t, [])
    return branch


@dataclass
class _Match:
    x: gs.Tensor
    branches: list[_Branch]  # one (identity + branch) or two


def _match(graph: gs.Graph, add: gs.Node) -> _Match | None:
    """``x`` and the branches of a residual (``x + f(x)``) or two-branch (``g(x) + h(x)``) Add, or None."""
    if len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if a is b or is_constant(a) or is_constant(b):
        return None
    if np_dtype(getattr(a, "dtype", None)) not in FLOAT_DTYPES:
        return None
    wa, wb = _walk(graph, a, add), _walk(graph, b, add)
    if wb.elements and wb.source is a:
        return _Match(a, [wb])
    if wa.elements and wa.source is b:
        return _Match(b, [wa])
    if wa.elements and wb.elements and wa.source is wb.source:
        return _Match(wa.source, [wa, wb])
    return None  # not a residual: the operands come from different tensors


# ----------------------------------------------------------------------------------------------------------------
# check


def sum_layers(a: ConvLayer, b: ConvLayer, in_spatial: tuple[int, ...] | None) -> ConvLayer | str:
    """``y = a(x) + b(x)`` as one layer, or the reason it cannot be one.

    Needs the same channels and strides and the same output size (for the given input size, or for every input size
    when ``in_spatial`` is None: ``pb + pe - span`` equal per axis, ``span = d*(k-1)``). Per axis both kernels are
    written with dilation 1, the begin pad becomes ``P = max(pb_a, pb_b)``, the kernel of ``a`` starts at tap
    ``P - pb_a`` of a kernel of ``K = max(P - pb + span + 1)`` taps, and the end pad is the smaller of the two
    layers' end pads so extended (each gives the original output size). Taps read the same input positions as
    before and every extra tap is zero, so the sum is exact. The common dilation (gcd of the used tap offsets) is
    restored and the result regrouped.
    """
    if a.nd != b.nd or a.cin != b.cin or a.cout != b.cout:
        return f"the branches differ in shape ({a.cin}->{a.cout}, {a.nd}-d vs {b.cin}->{b.cout}, {b.nd}-d)"
    nd = a.nd
    if a.strides != b.strides:
        return f"the branches have different strides {a.strides} and {b.strides}"
    if nd == 0:
        return regroup(make_layer(to_dense(a).weight + to_dense(b).weight, a.bias + b.bias))
    if in_spatial is not None:
        try:
            sa, sb = output_spatial(a, in_spatial), output_spatial(b, in_spatial)
        except ValueError as err:
            return f"a branch has an empty output: {err}"
        if sa != sb:
            return f"the branches give different output sizes {sa} and {sb}"
    wa, wb = _undilate(to_dense(a)), _undilate(to_dense(b))
    begins, ends, off_a, off_b, size = [], [], [], [], []
    for ax in range(nd):
        ka, kb = wa.shape[2 + ax], wb.shape[2 + ax]
        pa, pb, ea, eb = a.pads[ax], b.pads[ax], a.pads[nd + ax], b.pads[nd + ax]
        if in_spatial is None and pa + ea - ka != pb + eb - kb:
            return f"the branches' output sizes differ for some input sizes on axis {ax} (pads and kernels)"
        p = max(pa, pb)
        k = max(p - pa + ka, p - pb + kb)
        begins.append(p)
        ends.append(min(ea + k - (p - pa) - ka, eb + k - (p - pb) - kb))
        off_a.append(p - pa)
        off_b.append(p - pb)
        size.append(k)
    weight = np.zeros((a.cout, a.cin) + tuple(size))
    for w, off in ((wa, off_a), (wb, off_b)):
        index = tuple(slice(o, o + n) for o, n in zip(off, w.shape[2:]))
        weight[(slice(None), slice(None)) + index] += w
    dilations = []
    for ax in range(nd):
        used = np.nonzero(np.any(weight != 0, axis=tuple(i for i in range(weight.ndim) if i != 2 + ax)))[0]
        g = math.gcd(size[ax] - 1, *(int(u) for u in used))
        dilations.append(max(g, 1))
    weight = weight[(slice(None), slice(None)) + tuple(slice(None, None, g) for g in dilations)]
    fused = regroup(ConvLayer(weight, a.bias + b.bias, a.strides, tuple(dilations), tuple(begins + ends), 1))
    if in_spatial is not None and output_spatial(fused, in_spatial) != output_spatial(a, in_spatial):
        return "internal: the summed layer changes the output size"
    return fused


def _undilate(layer: ConvLayer) -> np.ndarray:
    """The dense weight with dilation 1 (zeros between the taps)."""
    w = layer.weight
    size = tuple((k - 1) * d + 1 for k, d in zip(layer.kernel, layer.dilations))
    out = np.zeros(w.shape[:2] + size)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in layer.dilations)] = w
    return out


@dataclass
class _Fold:
    x: gs.Tensor
    elements: list[Element]
    nodes: list[gs.Node]
    composed: Composed
    macs_before: Fraction
    macs_after: Fraction
    kind: str


def _branch_layer(branch: _Branch, result: PassResult) -> tuple[list[Sized], Composed] | str:
    chain: list[Element] = []
    for e in branch.elements:
        if chain and chain[-1].kind == "pad" and e.kind == "layer" and e.nodes[0].op == "Conv":
            chain[-1] = merge_pad(chain[-1], e)
        else:
            chain.append(e)
    resolve_layouts(chain, result)
    if any(e.layer is None for e in chain):
        return "a branch element is not a layer (a Pad not before a Conv, or an affine of unknown width)"
    items = sized(chain)
    try:
        composed = compose([e.layer for e in chain], items[0].spatial)
    except (ValueError, AssertionError) as err:
        return str(err)
    if isinstance(composed, str):
        return composed
    if branch.tail is not None:
        out = composed.bias_map
        if out is None:
            out = np.broadcast_to(composed.layer.bias.reshape((-1,) + (1,) * composed.layer.nd),
                                  branch.tail_map.shape)
        if out.shape != branch.tail_map.shape:
            return "the bias map does not match the layer's output"
        layer = composed.layer
        zero = ConvLayer(layer.weight, np.zeros(layer.cout), layer.strides, layer.dilations, layer.pads, layer.groups)
        composed = Composed(zero, out + branch.tail_map)
    return items, composed


def _bias_map(composed: Composed, shape: tuple[int, ...]) -> np.ndarray:
    if composed.bias_map is not None:
        return composed.bias_map
    return np.broadcast_to(composed.layer.bias.reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def _fold(match: _Match, result: PassResult) -> _Fold | str:
    parts = []
    for br in match.branches:
        got = _branch_layer(br, result)
        if isinstance(got, str):
            return got
        parts.append(got)
    layouts = {items[0].e.layout for items, _ in parts}
    if len(layouts) != 1:
        return "the branches disagree on the channel axis"
    layout = layouts.pop()
    elements = [it.e for items, _ in parts for it in items]
    reason = shared_weight(elements)
    if reason:
        return reason
    spatial = parts[0][0][0].spatial
    if len(parts) == 1:
        items, comp = parts[0]
        layer = add_identity(comp.layer, spatial)
        if isinstance(layer, str):
            return layer
        composed, kind = Composed(layer, comp.bias_map), "identity"
    else:
        (items_a, ca), (_items_b, cb) = parts
        layer = sum_layers(ca.layer, cb.layer, spatial)
        if isinstance(layer, str):
            return layer
        if ca.bias_map is not None or cb.bias_map is not None:
            shape = (ca.bias_map if ca.bias_map is not None else cb.bias_map).shape
            bias_map = _bias_map(ca, shape) + _bias_map(cb, shape)
            layer = ConvLayer(layer.weight, np.zeros(layer.cout), layer.strides, layer.dilations, layer.pads,
                              layer.groups)
            composed = Composed(layer, bias_map)
        else:
            composed = Composed(layer, None)
        kind = "two branches"
        items = items_a
    positions = items[-1].positions
    before = sum((it.macs for its, _ in parts for it in its), Fraction(0))
    before += layer.cout * positions * (1 + sum(br.tail is not None for br in match.branches))
    emission = plan(layout, composed, positions, False)
    if emission.macs > before:
        return f"folding costs more ({float(emission.macs):.6g} MACs > {float(before):.6g})"
    params = sum(conv_params(e.layer) for e in elements)
    if conv_params(composed.layer) > params:
        return f"folding needs more parameters ({conv_params(composed.layer)} > {params})"
    nodes = [n for br in match.branches for n in br.nodes]
    return _Fold(match.x, elements, nodes, composed, before, emission.macs, kind)


# ----------------------------------------------------------------------------------------------------------------
# rewrite


def _rewrite(graph: gs.Graph, names: Names, ctx: FusionContext, add: gs.Node, fold: _Fold,
             result: PassResult) -> None:
    out = add.outputs[0]
    old = fold.nodes + [add]
    replaced = [node_label(n) for n in old]
    name = names.take(fused_name(ctx.expand(replaced)))
    layout = fold.elements[0].layout
    dtype = fold.elements[0].dtype
    detach(old)
    new = emit(graph, names, name, layout, fold.x, out, fold.composed, dtype)
    sources = ctx.record([n.name for n in new], fold.x.name, out.name, replaced)
    result.notes.append(f"{name}: {fold.kind} residual {'+'.join(sources)} -> {'+'.join(n.op for n in new)}; "
                        f"MACs {float(fold.macs_before):.6g} -> {float(fold.macs_after):.6g}")
    log.debug("fuse_residual: %s", result.notes[-1])
