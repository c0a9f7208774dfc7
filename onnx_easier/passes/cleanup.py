"""Cleanup: remove pass-through nodes, dead nodes and unused initializers; merge duplicate constants.

Rules (main graph only; the insides of If/Loop/Scan subgraphs are never modified):

- ``Identity(x) -> y``: readers of ``y`` read ``x``. When ``y`` is a graph output, the producer of ``x`` writes
  ``y`` instead (graph_utils.remove_node), so graph input/output names never change. Refused when ``y`` is read
  inside a subgraph (the subgraph refers to it by name) or when ``x`` is a graph input and ``y`` a graph output
  (an Identity is the only way to express that).
- ``Dropout`` at inference is the identity: removed like Identity when ``training_mode`` is absent or a constant
  false and its ``mask`` output is unused.
- dead nodes (contributing to no graph output) and initializers no node reads are dropped.
- ``merge_constants`` (a separate pass, run once after fusion): initializers with the same dtype, shape and bytes
  become one. It is not part of ``run`` on purpose: merging first would make, say, two BatchNormalizations with
  the same freshly-initialised parameters look as if they shared weights, which blocks their fusion.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnx_easier.graph_utils import constant_value, consumers, is_graph_output, producer, remove_node
from onnx_easier.passes.base import PassResult

log = logging.getLogger(__name__)


def run(graph: gs.Graph, ctx: object | None = None) -> PassResult:
    """Remove Identity / inference Dropout, dead nodes and unused initializers. ``ctx`` is unused."""
    result = PassResult("cleanup")
    removed = 0
    main = {id(n) for n in graph.nodes}
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Dropout") or node.domain not in ("", "ai.onnx", None):
            continue
        reason = check_passthrough(graph, node, main)
        if reason:
            _refuse(result, f"{node.op} {node.name!r} kept: {reason}")
            continue
        while len(node.outputs) > 1:  # an unused Dropout mask
            node.outputs.pop()
        remove_node(graph, node)
        removed += 1
    before_nodes = len(graph.nodes)
    before_consts = _constant_names(graph)
    graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
    dead = before_nodes - len(graph.nodes) - removed  # bypassed nodes are dropped here too
    unused = len(before_consts - _constant_names(graph))
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    result.changed = removed + dead + unused
    if removed:
        result.notes.append(f"removed {removed} Identity/Dropout nodes")
    if dead or unused:
        result.notes.append(f"removed {dead} dead nodes and {unused} unused initializers")
    log.info("cleanup: %d pass-through nodes, %d dead nodes, %d unused initializers removed", removed, dead, unused)
    return result


def check_passthrough(graph: gs.Graph, node: gs.Node, main: set[int]) -> str | None:
    """Why ``node`` (Identity or Dropout) cannot be bypassed, or None when it can."""
    if not node.inputs or not node.outputs:
        return "it has no data input or output"
    src, out = node.inputs[0], node.outputs[0]
    if any(id(r) not in main for r in out.outputs):
        return f"its output {out.name!r} is read inside a subgraph"
    if is_graph_output(graph, out):
        prod = producer(src)
        if prod is None or id(prod) not in main or len(consumers(src)) != 1 or is_graph_output(graph, src):
            return (f"its output {out.name!r} is a graph output and its input {src.name!r} cannot be renamed "
                    "(a graph input, a constant, or read elsewhere)")
    if node.op == "Dropout":
        if len(node.outputs) > 1 and node.outputs[1].name and (
            node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])
        ):
            return "its mask output is used"
        if len(node.inputs) > 2 and node.inputs[2].name:
            mode = constant_value(node.inputs[2])
            if mode is None:
                return "training_mode is not a constant"
            if bool(np.asarray(mode).reshape(-1)[0]):
                return "training_mode is true"
    return None


def merge_constants(graph: gs.Graph, ctx: object | None = None) -> PassResult:
    """Make main-graph readers of equal initializers (dtype, shape, bytes) read one of them.

    Constants read inside a subgraph or that are graph outputs are left alone. ``ctx`` is unused.
    """
    result = PassResult("merge_constants")
    in_subgraphs = _names_read_in_subgraphs(graph)
    names_before = _constant_names(graph)
    reads = [(node, i, t) for node in graph.nodes for i, t in enumerate(node.inputs)
             if isinstance(t, gs.Constant) and t.name not in in_subgraphs and not is_graph_output(graph, t)]
    # only constants that share dtype and shape with another one are read and hashed (weights on disk never are)
    by_form = Counter(_form(t) for t in {id(t): t for _, _, t in reads}.values())
    first: dict[tuple, gs.Constant] = {}
    merged = 0
    for node, i, t in reads:
        form = _form(t)
        if by_form[form] < 2 or _on_disk(t):
            continue
        values = np.asarray(t.values)  # its own shape: ascontiguousarray would make a 0-d scalar look (1,)
        key = (*form, hashlib.sha256(values.tobytes(order="C")).hexdigest())
        keep = first.setdefault(key, t)
        if keep is not t:
            node.inputs[i] = keep
            merged += 1
    graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
    dropped = len(names_before - _constant_names(graph))
    result.changed = dropped
    if dropped:
        result.notes.append(f"merged {dropped} duplicate initializers ({merged} reads redirected)")
    log.info("merge_constants: %d duplicate initializers merged", dropped)
    return result


def _form(t: gs.Constant) -> tuple:
    """(dtype, shape) of a constant without reading its values (graphsurgeon knows both for lazy ones)."""
    return str(np.dtype(t.dtype)) if t.dtype is not None else "?", tuple(t.shape or ())


def _on_disk(t: gs.Constant) -> bool:
    """A weight still on disk (a large model's): merging would read it; equal weights on disk are not expected."""
    lazy = getattr(t, "_values", None)
    tensor = getattr(lazy, "tensor", None)
    return tensor is not None and getattr(tensor, "data_location", 0) == 1  # TensorProto.EXTERNAL


def _constant_names(graph: gs.Graph) -> set[str]:
    return {t.name for n in graph.nodes for t in n.inputs if isinstance(t, gs.Constant)}


def _names_read_in_subgraphs(graph: gs.Graph) -> set[str]:
    names: set[str] = set()
    stack = [sg for n in graph.nodes for sg in n.subgraphs()]
    while stack:
        sg = stack.pop()
        for n in sg.nodes:
            names.update(t.name for t in n.inputs)
            stack.extend(n.subgraphs())
    return names


def _refuse(result: PassResult, reason: str) -> None:
    log.debug("%s: %s", result.name, reason)
    result.notes.append(reason)
