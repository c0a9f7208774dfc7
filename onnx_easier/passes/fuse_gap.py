"""Move GlobalAveragePool (or a ReduceMean over all spatial axes, keepdims=1) before position-wise linear elements, so that they run on one position per channel and
can then fuse with the layers after the pool.

A position-wise element acts on each position independently and identically: a 1x..x1 Conv with unit strides and
no padding (any groups, with bias), an inference BatchNormalization, a per-channel Mul/Add/Sub/Div. For such an
element ``f(x)[p] = W x[p] + b``, so the mean over positions commutes with it:

    GAP(f(x)) = mean_p (W x[p] + b) = W mean_p x[p] + b = f(GAP(x))

**Pattern.** ``GlobalAveragePool(t)`` where ``t = f(x)`` is read only by the pool and is not a graph output.
**Rewrite.** ``GAP`` reads ``x`` and writes a new tensor ``<x>.pooled`` ``[N, Cin, 1, .., 1]``; ``f`` (the same node,
same weights) reads it and writes the pool's original output tensor, so readers and graph outputs are unchanged.
Repeated while the pool's new producer is position-wise. Each move divides the element's MACs by the number of
positions. The moved elements are reported in the notes (``fusion.fuse`` then fuses e.g.
``conv1x1 -> GAP -> Flatten -> Gemm`` into ``GAP -> Conv -> Flatten``).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnx_easier.graph_utils import attr, constant_value, producer, single_consumer
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import Element, FusionContext, Names, recognise

log = logging.getLogger(__name__)


def run(graph: gs.Graph, ctx: FusionContext | None = None) -> PassResult:
    """Move every GlobalAveragePool of the main graph before the position-wise elements that feed it."""
    result = PassResult("fuse_gap")
    names = Names(graph)
    for gap in list(graph.nodes):
        if not is_global_mean(gap):
            continue
        moved = []
        while True:
            e = _position_wise_producer(graph, gap)
            if e is None:
                break
            _swap(names, gap, e)
            moved.append(e.nodes[0].name)
        if moved:
            result.changed += len(moved)
            result.notes.append(f"GlobalAveragePool {gap.name!r} moved before {', '.join(moved)}")
    if result.changed:
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    log.info("fuse_gap: %d position-wise elements moved after a GlobalAveragePool", result.changed)
    return result


def is_global_mean(node: gs.Node) -> bool:
    """GlobalAveragePool, or ReduceMean with keepdims=1 over exactly the spatial axes 2..r-1 (axes as attribute or
    as a constant input, as torch.onnx's dynamo exporter writes adaptive_avg_pool2d(x, 1))."""
    if node.domain not in ("", "ai.onnx", None) or not node.inputs or not node.outputs:
        return False
    if node.op == "GlobalAveragePool":
        return True
    if node.op != "ReduceMean" or not int(attr(node, "keepdims", 1)):
        return False
    shape = node.inputs[0].shape
    if shape is None or len(shape) < 3:
        return False
    axes = attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1:
        axes = constant_value(node.inputs[1])
    if axes is None:
        return False
    rank = len(shape)
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)) == list(range(2, rank))


def _position_wise_producer(graph: gs.Graph, gap: gs.Node) -> Element | None:
    t = gap.inputs[0]
    p = producer(t)
    if p is None or single_consumer(graph, t) is not gap:
        return None
    e = recognise(p)
    if not isinstance(e, Element) or e.out is not t or e.rank < 3:
        return None
    if e.kind == "affine":
        return e if e.layout is None or not e.layout.last else None
    if e.kind == "layer" and p.op == "Conv":
        layer = e.layer
        if all(k == 1 for k in layer.kernel) and all(s == 1 for s in layer.strides) and not any(layer.pads):
            return e
    return None


def _swap(names: Names, gap: gs.Node, e: Element) -> None:
    node = e.nodes[0]
    x, pooled_out = e.inp, gap.outputs[0]
    shape = None
    if x.shape is not None:
        shape = [x.shape[0], x.shape[1]] + [1] * (len(x.shape) - 2)
    pooled = gs.Variable(names.take(f"{x.name}.pooled"), dtype=x.dtype, shape=shape)
    gap.inputs[0] = x
    gap.outputs[0] = pooled
    idx = next(i for i, inp in enumerate(node.inputs) if inp is x)
    node.inputs[idx] = pooled
    node.outputs[0] = pooled_out  # the element's old output tensor is left with no producer and no reader
