"""Linearize: replace chosen activations by a linear map of their input, written onto their original output.

For an activation y = act(x) with channel axis ``axis`` (see ``activations.Activation``):

    mode "identity":  y = x
    mode "affine":    y[..., c, ...] = a[c] * x[..., c, ...] + b[c]      (per channel c of ``axis``)

The affine map is emitted as ``Mul(x, A) -> Add(., B) -> y`` with A, B constants shaped to broadcast on ``axis``
(``[C, 1, 1]`` for axis 1 of a rank-4 tensor, ``[C]`` for the last axis, a scalar when C = 1); the Mul is left out
when every a[c] = 1, the Add when every b[c] = 0, and with both left out it is the identity. The identity is an
``Identity(x) -> y`` bypassed as in ``graph_utils.remove_node``: readers of y read x; when y is a graph output the
producer of x writes y instead (an Identity stays only between a graph input and a graph output, or when y is read
inside a subgraph). Every node of the activation's pattern is removed; graph output names never change.

The map is exact for the chosen (a, b): whether it is a good stand-in for the activation is decided elsewhere
(the entropy metric and the fidelity check).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnx_easier.activations import Activation
from onnx_easier.graph_utils import consumers, is_graph_output, producer, remove_node
from onnx_easier.passes.base import PassResult

_LOG = logging.getLogger(__name__)

MODES = ("identity", "affine")


def linearize(
    graph: gs.Graph,
    acts: list[Activation],
    mode: str,
    fits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> PassResult:
    """Replace each activation of ``acts`` by the identity or by its per-channel affine fit (see module docstring).

    ``fits[act.name] = (a, b)``, arrays of length ``act.channels`` (or 1), is required for every activation in
    affine mode. Activations no longer present in ``graph`` as recorded (a node or tensor missing, already
    replaced) are skipped with a note. Raises ValueError for an unknown mode or a missing / mis-sized fit, before
    touching the graph.
    """
    if mode not in MODES:
        raise ValueError(f"linearize: mode must be one of {MODES}, not {mode!r}")
    coeffs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if mode == "affine":
        for act in acts:
            coeffs[act.name] = _checked_fit(act, fits)
    else:
        for act in acts:
            coeffs[act.name] = (np.ones(1), np.zeros(1))

    result = PassResult("linearize")
    aliases: dict[str, str] = {}  # tensor names that vanished while bypassing -> the tensor that took their place
    in_subgraphs = _subgraph_node_ids(graph)
    by_name = {n.name: n for n in graph.nodes}  # replaced pattern nodes stay here with no outputs: "gone"
    names = _Namer(graph)
    removed_nodes = added_nodes = 0
    for act in acts:
        a, b = coeffs[act.name]
        use_mul, use_add = not np.all(a == 1.0), not np.all(b == 0.0)
        x, y, pattern, reason = _locate(by_name, act, aliases)
        shape = None
        if reason is None and (use_mul or use_add):
            shape = _broadcast_shape(act, x, y, a.size)
            if shape is None:
                reason = f"the rank of {x.name!r} is unknown, so per-channel constants cannot be placed on its axis"
        if reason is not None:
            result.notes.append(f"{act.name}: skipped, {reason}")
            _LOG.debug("linearize: %s skipped: %s", act.name, reason)
            continue
        for node in pattern:
            node.inputs.clear()
            node.outputs.clear()
        removed_nodes += len(pattern)
        if shape is not None:
            added_nodes += _emit_affine(graph, names, act, x, y, shape, a if use_mul else None,
                                        b if use_add else None)
        else:
            added_nodes += _emit_identity(graph, names, act, x, y, in_subgraphs, aliases)
        result.changed += 1
    graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    skipped = len(acts) - result.changed
    _LOG.info(
        "linearize (%s): %d of %d activations replaced, %d pattern nodes removed, %d nodes added%s",
        mode, result.changed, len(acts), removed_nodes, added_nodes, f", {skipped} skipped" if skipped else "",
    )
    return result


def _checked_fit(act: Activation, fits: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> tuple[np.ndarray, ...]:
    """(a, b) of ``act`` as 1-D float64 arrays of equal length, checked against ``act.channels``."""
    if fits is None or act.name not in fits:
        raise ValueError(f"linearize: affine mode needs fits[{act.name!r}] = (a, b)")
    a, b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in fits[act.name])
    if a.size != b.size or a.size == 0:
        raise ValueError(f"linearize: fit of {act.name!r} has {a.size} scales and {b.size} offsets")
    if a.size != 1 and act.channels is not None and a.size != act.channels:
        raise ValueError(f"linearize: fit of {act.name!r} has {a.size} channels, the activation has {act.channels}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"linearize: fit of {act.name!r} is not finite")
    return a, b


def _subgraph_node_ids(graph: gs.Graph) -> set[int]:
    """ids of every node inside the subgraphs (If/Loop/Scan bodies) of ``graph``, at any depth."""
    ids: set[int] = set()
    stack = [sg for n in graph.nodes for sg in n.subgraphs()]
    while stack:
        sg = stack.pop()
        for n in sg.nodes:
            ids.add(id(n))
            stack.extend(n.subgraphs())
    return ids


def _resolve(name: str, aliases: dict[str, str]) -> str:
    seen = set()
    while name in aliases and name not in seen:
        seen.add(name)
        name = aliases[name]
    return name


def _locate(
    by_name: dict[str, gs.Node], act: Activation, aliases: dict[str, str]
) -> tuple[gs.Tensor | None, gs.Tensor | None, list[gs.Node], str | None]:
    """(x, y, pattern nodes, None) for ``act`` in the graph now, or (.., reason) when it is no longer there."""
    missing = [name for name in act.nodes if name not in by_name or not by_name[name].outputs]
    if missing:
        return None, None, [], f"its node {missing[0]!r} is not in the graph (already replaced?)"
    if act.name not in act.nodes:
        return None, None, [], f"its output node {act.name!r} is not one of its pattern nodes"
    pattern = [by_name[name] for name in act.nodes]
    x_name, y_name = _resolve(act.input, aliases), _resolve(act.output, aliases)
    x = next((t for n in pattern for t in n.inputs if t.name == x_name), None)
    y = next((t for t in by_name[act.name].outputs if t.name == y_name), None)
    if x is None:
        return None, None, [], f"no node of it reads its input {act.input!r}"
    if y is None:
        return None, None, [], f"its output {act.output!r} is not written by {act.name!r}"
    return x, y, pattern, None


class _Namer:
    """Fresh node/tensor names for ``graph`` (``graph_utils.unique_name`` without a scan of the graph per call)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = set(graph.tensors()) | {n.name for n in graph.nodes}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _broadcast_shape(act: Activation, x: gs.Tensor, y: gs.Tensor, size: int) -> tuple[int, ...] | None:
    """Shape of a per-channel constant broadcasting on ``act.axis`` of x, or None when x's rank is unknown."""
    if size == 1:
        return ()
    if act.axis < 0:
        return (size,) + (1,) * (-1 - act.axis)
    shape = x.shape if x.shape is not None else y.shape
    if shape is None:
        return None
    return (size,) + (1,) * (len(shape) - 1 - act.axis)


def _float_dtype(x: gs.Tensor, y: gs.Tensor) -> np.dtype:
    for t in (x, y):
        try:
            dtype = np.dtype(t.dtype) if t.dtype is not None else None
        except TypeError:  # an ONNX-only type (bfloat16, float8) that numpy cannot hold
            dtype = None
        if dtype is not None and dtype.kind == "f":
            return dtype
    return np.dtype(np.float32)


def _emit_affine(graph: gs.Graph, names: _Namer, act: Activation, x: gs.Tensor, y: gs.Tensor,
                 shape: tuple[int, ...], a: np.ndarray | None, b: np.ndarray | None) -> int:
    """Write ``y = x * A + B`` (either part may be absent; A, B of ``shape``) with nodes appended to ``graph``;
    return how many."""
    dtype = _float_dtype(x, y)
    added = 0
    current = x
    if a is not None:
        scale = gs.Constant(names.fresh(f"{act.name}_linear_scale"), a.astype(dtype).reshape(shape))
        target = y if b is None else gs.Variable(names.fresh(f"{act.name}_linear_scaled"), dtype=dtype,
                                                 shape=x.shape)
        graph.nodes.append(gs.Node("Mul", names.fresh(f"{act.name}_linear_mul"), inputs=[current, scale],
                                   outputs=[target]))
        current = target
        added += 1
    if b is not None:
        offset = gs.Constant(names.fresh(f"{act.name}_linear_offset"), b.astype(dtype).reshape(shape))
        graph.nodes.append(gs.Node("Add", names.fresh(f"{act.name}_linear_add"), inputs=[current, offset],
                                   outputs=[y]))
        added += 1
    return added


def _emit_identity(graph: gs.Graph, names: _Namer, act: Activation, x: gs.Tensor, y: gs.Tensor,
                   in_subgraphs: set[int], aliases: dict[str, str]) -> int:
    """``y = x``: an Identity, bypassed unless y is read inside a subgraph; return the number of nodes added."""
    node = gs.Node("Identity", names.fresh(f"{act.name}_linear_identity"), inputs=[x], outputs=[y])
    graph.nodes.append(node)
    if any(id(r) in in_subgraphs for r in y.outputs):  # a subgraph reads y by name: keep the Identity
        return 1
    y_is_output = is_graph_output(graph, y)
    if y_is_output and (producer(x) is None or len(consumers(x)) != 1 or is_graph_output(graph, x)):
        return 1  # a graph input (or another output, or a shared tensor) straight to a graph output: keep it
    remove_node(graph, node)
    if y_is_output:
        aliases[x.name] = y.name  # x's producer now writes y
    else:
        aliases[y.name] = x.name  # y's readers now read x
    return 0
