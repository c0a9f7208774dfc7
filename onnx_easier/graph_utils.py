"""Named safety checks and small accessors on onnx-graphsurgeon graphs, written once for every pass.

A pass that cannot prove a rewrite exact does not do it; these helpers are the vocabulary of that proof.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def is_constant(t: gs.Tensor | None) -> bool:
    """True for an initializer (gs.Constant). Overridable initializers are graph inputs (Variables): False."""
    return isinstance(t, gs.Constant)


def constant_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, or None when ``t`` is not a constant."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    """True when ``t`` is one of the graph's outputs (its name and value must survive)."""
    return any(o is t or o.name == t.name for o in graph.outputs)


def consumers(t: gs.Tensor) -> list[gs.Node]:
    """Nodes reading ``t`` (each node once, even when it reads ``t`` twice)."""
    seen: list[gs.Node] = []
    for n in t.outputs:
        if not any(n is s for s in seen):
            seen.append(n)
    return seen


def single_consumer(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    """The only node reading ``t``, or None if ``t`` has several readers, none, or is a graph output."""
    readers = consumers(t)
    if len(readers) != 1 or is_graph_output(graph, t):
        return None
    return readers[0]


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node writing ``t`` (None for graph inputs and constants)."""
    return t.inputs[0] if len(t.inputs) == 1 else None


def weight_shared(t: gs.Tensor) -> bool:
    """True when a constant is read by more than one node (changing it in place would change the others)."""
    return len(consumers(t)) > 1


def attr(node: gs.Node, name: str, default=None):
    """Attribute value of ``node`` or ``default``."""
    return node.attrs.get(name, default)


def remove_node(graph: gs.Graph, node: gs.Node, keep_output_name: bool = True) -> None:
    """Bypass a one-input/one-output node: its readers read its input instead.

    When its output is a graph output, the producer of the input is rewired to write the output tensor, so that
    graph output names never change (requires the input to have a producer and no other readers; otherwise
    the node is replaced by Identity).
    """
    src, dst = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, dst):
        prod = producer(src)
        if prod is not None and len(consumers(src)) == 1 and not is_graph_output(graph, src):
            idx = next(i for i, o in enumerate(prod.outputs) if o is src)
            prod.outputs[idx] = dst
            node.inputs.clear()
            node.outputs.clear()
        else:
            node.op = "Identity"
            node.attrs = {}
            while len(node.inputs) > 1:
                node.inputs.pop()
        return
    for reader in list(dst.outputs):
        for i, t in enumerate(reader.inputs):
            if t is dst:
                reader.inputs[i] = src
    node.inputs.clear()
    node.outputs.clear()


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not yet used in ``graph``."""
    used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if base not in used:
        return base
    i = 1
    while f"{base}_{i}" in used:
        i += 1
    return f"{base}_{i}"


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous array of the SAME shape: ``np.ascontiguousarray`` turns a 0-d scalar into shape (1,),
    and a scalar and a one-element vector are different constants to ONNX (Gather, Slice, Concat, Reshape)."""
    return np.ascontiguousarray(a).reshape(np.shape(a))
