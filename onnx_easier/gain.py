"""What linearizing a group of activations can buy, predicted from the graph alone (no data, no ORT session).

For a candidate ``C`` (activations to linearize together) in a model ``M``:

    M_C = fuse(linearize_identity(M, C))          (the other activations protected, as in a search trial)
    gain(C) = cost(M) - cost(M_C)                 in compute nodes, depth and MACs (cost.py's definitions)
              + the elementwise nodes of C that cost time of their own

The identity stands for any linear map: the affine fit folds wherever the identity does, and where it cannot fold
the search falls back to the identity (select.py), so the geometry after fusion is the identity's.

Elementwise work: an activation removed without any layer merging still saves its own pass over the tensor, unless
ONNX Runtime fuses it into its producer for free. ORT's CPU provider folds a single Relu, Clip, LeakyRelu,
HardSigmoid, Sigmoid or Tanh into a preceding Conv or Gemm (FusedConv / FusedGemm), and into a Conv + Add (the
residual sum) as well; those count 0. Every other spelling (Gelu and its Erf/Tanh decompositions, SiLU as
Mul(x, Sigmoid(x)), HardSwish, PRelu, and a Relu after a MatMul) counts its nodes.

A candidate with no gain in any of the four (no compute node, no depth, no MACs, no elementwise node) cannot make
the model faster: the search does not try it (it would spend accuracy for nothing), e.g. a post-add ReLU of a
ResNet BasicBlock, or a bottleneck whose merge would cost more MACs than it saves (cost-aware fusion refuses it).

Cost: one graph copy (weights shared, not copied: onnx-graphsurgeon's ``Graph.copy``), the linearize and fusion
passes, and a walk over the nodes; no serialization and no shape inference per candidate (shapes come from one
inference of ``M`` with concrete input dims; a tensor that fusion creates without a shape gets it from its
layer's geometry).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_easier.activations import Activation
from onnx_easier.cost import COMPUTE_OPS, is_compute_layer, layer_macs, with_static_shapes
from onnx_easier.fusion import fuse
from onnx_easier.model_io import to_graph
from onnx_easier.passes.linearize import linearize

log = logging.getLogger(__name__)

FREE_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh"})  # ORT folds into Conv/Gemm
FREE_AFTER = frozenset({"Conv", "Gemm"})


@dataclass(frozen=True)
class GraphCost:
    """Compute nodes, depth and MACs (one sample) of a graph; ``complete`` is False when some MACs are unknown."""

    compute_nodes: int
    depth: int
    macs: int
    complete: bool = True


@dataclass(frozen=True)
class Gain:
    """Predicted saving of one candidate (positive = less work). ``known``: the prediction could be made (the
    candidate linearizes and every MAC is known); an unknown gain is never a reason to skip."""

    compute_nodes: int = 0
    depth: int = 0
    macs: int = 0
    elementwise: int = 0
    known: bool = True
    relative: float = 0.0  # MACs saved / MACs of the model, plus a share per node saved (``score``)

    @property
    def any(self) -> bool:
        """Whether the candidate can save anything (or its gain is unknown)."""
        return not self.known or self.compute_nodes > 0 or self.depth > 0 or self.macs > 0 or self.elementwise > 0

    def reason(self) -> str:
        """Why a candidate without gain is skipped (one line)."""
        return ("no predicted gain: linearizing it lets fusion remove no compute node, no depth and no MACs, and "
                "ONNX Runtime already fuses it into its producer")

    def as_report(self) -> dict:
        return {"compute_nodes": self.compute_nodes, "depth": self.depth, "macs": self.macs,
                "elementwise_nodes": self.elementwise, "known": self.known, "relative": round(self.relative, 6)}


def _shape(t: gs.Tensor) -> tuple | None:
    if t.shape is None:
        return None
    dims = tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in t.shape)
    return dims


def _attrs(node: gs.Node) -> dict:
    return dict(node.attrs)


def _conv_out(node: gs.Node, x: tuple | None, w: tuple | None) -> tuple | None:
    """Output shape of a Conv from its input and weight shapes and attributes (explicit pads or auto_pad)."""
    if x is None or w is None or any(d is None for d in x[2:]):
        return None
    nd = len(x) - 2
    a = _attrs(node)
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    pads = a.get("pads", [0] * 2 * nd)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    out = []
    for i in range(nd):
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(math.ceil(x[2 + i] / strides[i]))
        else:
            span = dil[i] * (w[2 + i] - 1) + 1
            p = (pads[i] + pads[nd + i]) if auto == "NOTSET" else 0
            out.append((x[2 + i] + p - span) // strides[i] + 1)
    return (x[0], w[0], *out)


def _matmul_out(x: tuple | None, w: tuple | None) -> tuple | None:
    if x is None or w is None or len(w) != 2:
        return None
    return (*x[:-1], w[-1])


def graph_cost(graph: gs.Graph) -> GraphCost:
    """Compute nodes, depth and MACs of ``graph`` (its tensors' shapes for one sample; cost.py's definitions).
    The graph must be topologically sorted."""
    computes = macs = 0
    complete = True
    depth_of: dict[str, int] = {}
    best = 0
    for node in graph.nodes:
        compute = False
        if node.op in COMPUTE_OPS and len(node.inputs) > 1:
            w_t = node.inputs[1]
            weight = tuple(w_t.values.shape) if isinstance(w_t, gs.Constant) else None
            compute = is_compute_layer(node.op, weight, _attrs(node))
            if compute:
                x = _shape(node.inputs[0])
                w = weight or _shape(w_t)
                y = _shape(node.outputs[0]) if node.outputs else None
                if y is None or any(d is None for d in y):
                    y = _conv_out(node, x, w) if node.op == "Conv" else _matmul_out(x, w) if node.op == "MatMul" else y
                if y is not None and y and y[0] is None:
                    y = (1, *y[1:])
                trans_a = node.op == "Gemm" and bool(node.attrs.get("transA", 0))
                m = layer_macs(node.op, x, w, y, trans_a)
                if m is None:
                    complete = False
                else:
                    macs += m
        elif node.op in COMPUTE_OPS:
            compute = True
        computes += compute
        d = max((depth_of.get(t.name, 0) for t in node.inputs), default=0) + compute
        for o in node.outputs:
            depth_of[o.name] = d
    best = max((depth_of.get(o.name, 0) for o in graph.outputs), default=0)
    return GraphCost(computes, best, macs, complete)


def _free(graph: gs.Graph, act: Activation) -> bool:
    """Whether ORT fuses ``act`` into its producer at no cost of its own (module doc)."""
    if len(act.nodes) != 1 or act.op not in FREE_OPS:
        return False
    x = graph.tensors().get(act.input)
    producer = x.inputs[0] if x is not None and x.inputs else None
    if producer is None:
        return False
    if producer.op in FREE_AFTER:
        return True
    if producer.op == "Add":  # Conv + Add + activation: ORT's FusedConv with a sum
        return any(t.inputs and t.inputs[0].op == "Conv" for t in producer.inputs if isinstance(t, gs.Variable))
    return False


class GainModel:
    """Predicts ``Gain`` for candidates of one model (module doc). ``input_shapes``: per input, a full sample
    shape used for dynamic dims other than the batch (as cost.measure)."""

    def __init__(self, model: onnx.ModelProto, activations: Sequence[Activation],
                 input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        self.graph = to_graph(with_static_shapes(model, input_shapes))
        self.graph.toposort(recurse_subgraphs=False, recurse_functions=False)
        self.activations = list(activations)
        self.base = graph_cost(self.graph)
        nodes = max(1, self.base.compute_nodes)
        self._node_share = 1.0 / nodes
        self._free = {a.name: _free(self.graph, a) for a in self.activations}

    def predict(self, group: Sequence[Activation], protected: Collection[str] = ()) -> Gain:
        """The gain of linearizing ``group`` (identity) and fusing, the ``protected`` nodes untouched (the other
        activations' nodes). Unknown (never skipped) when the group cannot be linearized or fusion fails."""
        graph = self.graph.copy()
        try:
            lin = linearize(graph, list(group), "identity", None)
            if lin.changed != len(group):
                return Gain(known=False)
            fuse(graph, protected=protected)
            graph.toposort(recurse_subgraphs=False, recurse_functions=False)
            after = graph_cost(graph)
        except Exception as exc:  # noqa: BLE001 - a prediction only: an unknown gain is tried as before
            log.debug("gain of %s not predicted: %s", [a.name for a in group], exc)
            return Gain(known=False)
        elementwise = sum(len(a.nodes) for a in group if not self._free.get(a.name, False))
        known = self.base.complete and after.complete
        saved_macs = self.base.macs - after.macs
        relative = (saved_macs / self.base.macs if self.base.macs else 0.0) + self._node_share * (
            self.base.compute_nodes - after.compute_nodes) + 0.1 * self._node_share * elementwise
        return Gain(self.base.compute_nodes - after.compute_nodes, self.base.depth - after.depth, saved_macs,
                    elementwise, known, relative)
