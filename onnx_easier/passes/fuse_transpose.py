"""Fold per-channel affines (BatchNormalization, Mul/Add/Sub/Div by a per-channel constant) into ConvTranspose.

ConvTranspose weights are ``[Cin, Cout / group, *k]``; output channel ``o = g * (Cout / group) + j`` of group ``g``
gets ``y[o] = sum_{i in g, taps} W[i, j, t] x[i, ...] + b[o]``.

- **after**: ``s * ConvT(x) + t``  ->  ``W'[i, j] = W[i, j] * s[o(i, j)]``, ``b' = s * b + t`` (exact everywhere);
- **before**: ``ConvT(s * x)``  ->  ``W'[i] = s[i] * W[i]``, only when the affine has no shift: a constant shift
  ``t`` would become ``sum_taps W`` at the centre but fewer taps near the borders (and output_padding positions),
  so it is not a per-channel bias (refused, with that reason).

ConvTranspose chains are not composed with each other or with Conv (not part of ``linear_math``). The pattern needs
constant W/B, the affine to be the only reader of the link tensor (not a graph output), and no weight read by
another node. The folded node keeps every attribute (strides, pads, output_padding, output_shape, ...).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnx_easier.graph_utils import attr, constant_value, contiguous, is_constant, producer, single_consumer
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import (
    FLOAT_DTYPES,
    Element,
    FusionContext,
    Layout,
    Names,
    detach,
    fused_name,
    node_label,
    recognise,
    refuse,
    shared_weight,
)

log = logging.getLogger(__name__)


def run(graph: gs.Graph, ctx: FusionContext | None = None) -> PassResult:
    """Fold every adjacent per-channel affine into its ConvTranspose (repeatedly, both sides)."""
    ctx = ctx if ctx is not None else FusionContext()
    result = PassResult("fuse_transpose")
    names = Names(graph)
    for node in list(graph.nodes):
        if node.op != "ConvTranspose" or node.domain not in ("", "ai.onnx", None):
            continue
        while node.outputs:
            match = _match(graph, node)
            if match is None:
                break
            if isinstance(match, str):
                refuse(result, f"ConvTranspose {node.name!r}: {match}")
                break
            node = _rewrite(graph, names, ctx, node, *match, result)
            result.changed += 1
    if result.changed:
        graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    log.info("fuse_transpose: %d affines folded into ConvTranspose", result.changed)
    return result


def _params(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return "its weight is not a constant"
    if len(node.inputs) > 2 and node.inputs[2].name and not is_constant(node.inputs[2]):
        return "its bias is not a constant"
    w = np.asarray(constant_value(node.inputs[1]))
    if w.dtype not in FLOAT_DTYPES:
        return "not a float tensor"
    b = np.asarray(constant_value(node.inputs[2])) if len(node.inputs) > 2 and node.inputs[2].name else None
    return w, b


def _match(graph: gs.Graph, node: gs.Node) -> tuple[str, Element] | str | None:
    """("after" | "before", the affine element) adjacent to ``node``, a reason, or None."""
    params = _params(node)
    if isinstance(params, str):
        return None
    w, _ = params
    rank = w.ndim
    group = int(attr(node, "group", 1))
    reader = single_consumer(graph, node.outputs[0])
    if reader is not None:
        e = recognise(reader)
        if isinstance(e, Element) and e.kind == "affine" and e.inp is node.outputs[0]:
            reason = _check(e, node, rank, w.shape[1] * group, "after")
            return reason if reason else ("after", e)
    p = producer(node.inputs[0])
    if p is not None and single_consumer(graph, node.inputs[0]) is node:
        e = recognise(p)
        if isinstance(e, Element) and e.kind == "affine" and e.out is node.inputs[0]:
            reason = _check(e, node, rank, w.shape[0], "before")
            if reason:
                return reason
            if np.any(e.layer.bias != 0):
                return (f"the affine {e.nodes[0].name!r} before it has a shift, which is not a per-channel bias "
                        "after a transposed convolution (borders)")
            return ("before", e)
    return None


def _check(e: Element, node: gs.Node, rank: int, channels: int, side: str) -> str | None:
    if e.rank != rank or (e.layout is not None and e.layout.last):
        return f"the affine {e.nodes[0].name!r} {side} it is not on the channel axis"
    reason = e.resolve(Layout(rank), channels)
    if reason:
        return reason
    if e.layer.cin != channels:
        return f"the affine {e.nodes[0].name!r} has {e.layer.cin} channels, not {channels}"
    owner = Element("layer", [node], node.inputs[0], node.outputs[0], rank, Layout(rank), e.dtype,
                    weights=[t for t in node.inputs[1:] if is_constant(t)])
    return shared_weight([owner, e])


def _rewrite(graph: gs.Graph, names: Names, ctx: FusionContext, node: gs.Node, side: str, e: Element,
             result: PassResult) -> gs.Node:
    w, b = _params(node)
    dtype = w.dtype
    w64 = w.astype(np.float64)
    group = int(attr(node, "group", 1))
    cin, cout_g = w.shape[0], w.shape[1]
    scale = e.layer.weight.reshape(-1)
    shift = e.layer.bias
    bias = np.zeros(cout_g * group) if b is None else b.astype(np.float64)
    if side == "after":
        per_weight = scale.reshape(group, 1, cout_g)  # [g, 1, Cout/g] against W viewed as [g, Cin/g, Cout/g, ...]
        w_new = (w64.reshape((group, cin // group, cout_g) + w.shape[2:])
                 * per_weight.reshape(per_weight.shape + (1,) * (w.ndim - 2))).reshape(w.shape)
        b_new = scale * bias + shift
        x, out = node.inputs[0], e.out
        replaced = [node_label(node)] + e.names
    else:
        w_new = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        b_new = bias
        x, out = e.inp, node.outputs[0]
        replaced = e.names + [node_label(node)]
    name = names.take(fused_name(ctx.expand(replaced)))
    attrs = dict(node.attrs)
    inputs = [x, gs.Constant(names.take(f"{name}.weight"), contiguous(w_new.astype(dtype)))]
    if b is not None or np.any(b_new != 0):
        inputs.append(gs.Constant(names.take(f"{name}.bias"), contiguous(b_new.astype(dtype))))
    detach([node] + e.nodes)
    new = gs.Node("ConvTranspose", name, attrs, inputs, [out])
    graph.nodes.append(new)
    sources = ctx.record([name], x.name, out.name, replaced)
    result.notes.append(f"{name}: {'+'.join(sources)} -> ConvTranspose ({side}: {e.nodes[0].op} folded)")
    log.debug("fuse_transpose: %s", result.notes[-1])
    return new
