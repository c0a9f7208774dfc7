"""Shared vocabulary of the fusion passes: linear *elements* recognised from nodes, the cost of what is emitted,
the emission of one fused layer, and the traceability record.

An element is a node (or Pad + Conv) that maps its data tensor ``x`` to ``y = L(x)`` with ``L`` an affine map
expressible as a ``linear_math.ConvLayer`` on the channel axis:

- ``Conv(x, W, B)``: the layer itself (explicit pads; ``auto_pad`` SAME_* needs static spatial sizes).
- ``BatchNormalization`` (inference): ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
- ``Mul / Add / Sub / Div`` with one constant ``c`` that varies only along the channel axis (after right-aligned
  broadcasting; scalars vary along none): ``x*c``, ``x+c``, ``x-c`` (shift ``-c``), ``c-x`` (scale ``-1``,
  shift ``c``), ``x/c`` (scale ``1/c``, refused when ``c`` has a zero). ``c/x`` is not linear.
- ``Gemm(A, B, C)`` with ``transA = 0``: ``W = alpha * op(B)^T`` ``[out, in]``, ``bias = beta * C`` (C must not vary
  along the batch axis).
- ``MatMul(x, B)`` with a constant 2-D ``B``: ``W = B^T``; ``x`` is ``[N, F]`` or ``[N, ..., F]`` (channel last).
- ``Pad`` (mode constant, value 0, spatial axes only, pads >= 0): only in front of a Conv, whose pads absorb it.
- ``Flatten(axis=1)`` / ``Reshape`` / ``Squeeze`` of ``[N, C, 1, .., 1]`` to ``[N, C]`` (static C and inferred
  output shape; the data order is the same whatever the op): no arithmetic; layers after it are lifted to 1x..x1
  convolutions when a segment crosses it.

A *layout* says where the channel axis is: axis 1 ("channel-first", Conv/BN; rank 2 is ``[N, C]``) or the last
axis ("channel-last", MatMul on ``[N, T, F]``). Channel-first rank ``r`` layers have ``nd = r - 2`` spatial axes;
channel-last and rank-2 layers are dense (``nd = 0``) and their cost is multiplied by the positions ``T``.

Every element refuses with a reason in words: a weight that is not a constant (a graph input the user may feed,
or a DequantizeLinear output in a QDQ model), a non-float tensor, a constant that varies along more than the
channel axis, unknown ranks (shape inference not run), and so on.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnx_easier.graph_utils import attr, constant_value, consumers, contiguous, is_constant
from onnx_easier.linear_math import (
    Composed,
    ConvLayer,
    affine_layer,
    bn_affine,
    make_layer,
    output_spatial,
    to_dense,
)
from onnx_easier.passes.base import PassResult

log = logging.getLogger(__name__)

FLOAT_DTYPES = tuple(np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in (
    TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE))
_ONNX_DOMAINS = ("", "ai.onnx", None)


# ----------------------------------------------------------------------------------------------------------------
# traceability


class Rewrite(NamedTuple):
    """One fusion rewrite as it happened: the fused node ``name`` and its ``helpers`` replaced the nodes
    ``replaced`` (names in the graph as it was, possibly fused nodes of earlier rewrites) and write ``output``."""

    name: str
    helpers: tuple[str, ...]
    replaced: tuple[str, ...]
    output: str


class FusedLayer(NamedTuple):
    """Where a fused node came from: it reads tensor ``input`` and writes ``output`` (an original tensor name,
    unchanged), and replaces the original nodes ``sources`` (in data-flow order)."""

    input: str
    output: str
    sources: list[str]


@dataclass
class FusionContext:
    """State shared by the passes of one ``fusion.fuse`` call: the traceability mapping
    ``fused node name -> FusedLayer``. A fused node that is fused again is replaced by the new one, whose sources
    are the original nodes of both (never intermediate fused names). ``helpers`` maps the extra nodes a fused layer
    is emitted with (bias-map Add, MatMul bias Add, Flatten) to the fused node's name."""

    mapping: dict[str, FusedLayer] = field(default_factory=dict)
    helpers: dict[str, str] = field(default_factory=dict)
    journal: list[Rewrite] = field(default_factory=list)  # every rewrite in order (fusion.fuse rolls back by it)

    def snapshot(self) -> tuple[dict[str, FusedLayer], dict[str, str], int]:
        """What ``restore`` needs to undo every ``record`` made after this call."""
        return dict(self.mapping), dict(self.helpers), len(self.journal)

    def restore(self, saved: tuple[dict[str, FusedLayer], dict[str, str], int]) -> None:
        mapping, helpers, length = saved
        self.mapping.clear()
        self.mapping.update(mapping)
        self.helpers.clear()
        self.helpers.update(helpers)
        del self.journal[length:]

    def expand(self, names: list[str]) -> list[str]:
        """Original node names behind ``names``: fused names are replaced by their sources; a helper node stands
        for its fused node's sources unless that node is among ``names`` too."""
        given = set(names)
        out: list[str] = []
        for name in names:
            if name in self.helpers:
                main = self.helpers[name]
                if main in given:
                    continue
                name = main
            for src in self.mapping[name].sources if name in self.mapping else [name]:
                if src not in out:
                    out.append(src)
        return out

    def record(self, new: list[str], input_name: str, output_name: str, replaced: list[str]) -> list[str]:
        """Record the nodes ``new`` (the fused node first, then its helpers) that replace the nodes ``replaced``
        (possibly fused ones themselves); returns the fused node's original sources."""
        sources = self.expand(replaced)
        for name in replaced:
            if name in self.mapping and not any(self.helpers.get(h) == name for h in self.helpers
                                                if h not in replaced):
                del self.mapping[name]
            self.helpers.pop(name, None)
        self.mapping[new[0]] = FusedLayer(input_name, output_name, sources)
        self.helpers.update({h: new[0] for h in new[1:]})
        self.journal.append(Rewrite(new[0], tuple(new[1:]), tuple(replaced), output_name))
        return sources


def node_label(node: gs.Node) -> str:
    """A node's name, or ``<Op:first output>`` for an unnamed node (exporters may leave names empty)."""
    if node.name:
        return node.name
    return f"<{node.op}:{node.outputs[0].name if node.outputs else '?'}>"


def fused_name(sources: list[str]) -> str:
    """``fused(a+b+c)``; long lists are shortened to ``fused(a+b+...+z|12)`` (the mapping has them all)."""
    if len(sources) <= 6:
        return f"fused({'+'.join(sources)})"
    return f"fused({sources[0]}+{sources[1]}+...+{sources[-1]}|{len(sources)})"


class Names:
    """Fresh node/tensor names for one pass (the graph's names are read once)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def take(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def refuse(result: PassResult, reason: str) -> None:
    """Log a refusal at DEBUG and keep it in the pass notes."""
    log.debug("%s: %s", result.name, reason)
    result.notes.append(reason)


# ----------------------------------------------------------------------------------------------------------------
# layouts and elements


@dataclass(frozen=True)
class Layout:
    """Rank of the data tensor and whether its channel axis is the last one (rank 2 is always channel-first)."""

    rank: int
    last: bool = False

    @property
    def nd(self) -> int:
        """Spatial axes of the ConvLayer (0 for dense layers)."""
        return 0 if self.last else self.rank - 2

    @property
    def axis(self) -> int:
        return self.rank - 1 if self.last else 1

    def spatial(self, shape: list | None) -> tuple[int, ...] | None:
        """Static spatial sizes of a tensor of this layout (``()`` for dense layouts), or None."""
        if self.nd == 0:
            return ()
        if shape is None or len(shape) != self.rank:
            return None
        dims = shape[2:]
        return tuple(int(d) for d in dims) if all(isinstance(d, int) and d > 0 for d in dims) else None

    def positions(self, shape: list | None) -> int:
        """Positions per sample a dense layer of this layout is applied at (1 when channel-first or unknown)."""
        if not self.last or shape is None or len(shape) != self.rank:
            return 1
        dims = shape[1:-1]
        return math.prod(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else 1


@dataclass(eq=False)
class Element:
    """One linear element. ``kind``: "layer" (Conv, Gemm, MatMul: ``layer`` set), "affine" (per-channel; the
    layer is built once the layout and channel count are known), "pad" or "reshape" (no arithmetic).

    ``layout`` is the layout of ``inp`` (None: a per-channel affine whose constant fits either channel axis);
    ``scale``/``shift`` are the affine's constants right-aligned to the data rank; ``pads`` the Pad's spatial
    pads; ``weights`` the float constants the element reads."""

    kind: str
    nodes: list[gs.Node]
    inp: gs.Tensor
    out: gs.Tensor
    rank: int
    layout: Layout | None
    dtype: np.dtype
    layer: ConvLayer | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    pads: tuple[int, ...] | None = None
    weights: list[gs.Constant] = field(default_factory=list)

    @property
    def out_layout(self) -> Layout | None:
        if self.kind == "reshape":
            return Layout(2)
        return self.layout

    @property
    def names(self) -> list[str]:
        return [node_label(n) for n in self.nodes]

    def channels(self) -> int | None:
        """Channel count of the input when known from the layer, the constant or the static shape."""
        if self.layer is not None:
            return self.layer.cin
        layout = self.layout
        if self.kind == "affine" and layout is not None:
            shape = self.inp.shape
            if shape is not None and len(shape) == self.rank and isinstance(shape[layout.axis], int):
                return int(shape[layout.axis])
            for arr in (self.scale, self.shift):
                if arr is not None and arr.shape[layout.axis] > 1:
                    return int(arr.shape[layout.axis])
        return None

    def resolve(self, layout: Layout, channels: int | None) -> str | None:
        """Fix the layout of a flexible affine and build its layer; returns a reason when it cannot."""
        if self.kind != "affine":
            return None
        self.layout = layout
        c = self.channels() or channels
        if c is None:
            return f"{self.nodes[0].name!r}: channel count unknown"
        self.layer = affine_layer(_channel_vector(self.scale, layout.axis, c),
                                  _channel_vector(self.shift, layout.axis, c), layout.nd)
        return None


def _channel_vector(arr: np.ndarray, axis: int, channels: int) -> np.ndarray:
    vec = np.asarray(arr, dtype=np.float64)
    vec = vec.reshape(-1) if vec.size == vec.shape[axis] else vec.reshape(-1)[:1]
    return np.broadcast_to(vec, (channels,)).copy()


def data_rank(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    return len(shape) if shape is not None else None


def np_dtype(dt: object) -> np.dtype | None:
    """numpy dtype of a gs tensor dtype (gs keeps types numpy lacks, such as bfloat16, as ONNX enums)."""
    if dt is None:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(dt)) if isinstance(dt, int) else np.dtype(dt)
    except (TypeError, KeyError, ValueError):
        return None


def _float_dtype(*tensors: gs.Tensor) -> np.dtype | None:
    """The float dtype of the first tensor whose dtype is known (None when it is not a float type)."""
    for t in tensors:
        dt = getattr(t, "dtype", None)
        if dt is not None:
            dt = np_dtype(dt)
            return dt if dt in FLOAT_DTYPES else None
    return None


def recognise(node: gs.Node) -> Element | str | None:
    """The element ``node`` is, a reason (str) when it looks linear but cannot be used, or None when it is not a
    linear op at all."""
    if node.domain not in _ONNX_DOMAINS:
        return None
    fn = _RECOGNISERS.get(node.op)
    return fn(node) if fn is not None else None


def _constant_weight(node: gs.Node, index: int, what: str) -> tuple[np.ndarray | None, str | None]:
    """(value, None) for a constant input, (None, None) for an absent optional one, (None, reason) otherwise."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None, None
    t = node.inputs[index]
    if not is_constant(t):
        return None, f"{node.op} {node.name!r}: {what} {t.name!r} is not a constant (graph input or computed)"
    return np.asarray(constant_value(t)), None


def _conv(node: gs.Node) -> Element | str:
    if len(node.inputs) < 2:
        return f"Conv {node.name!r}: no weight"
    x = node.inputs[0]
    w, why = _constant_weight(node, 1, "weight")
    if w is None:
        return why or f"Conv {node.name!r}: no weight"
    b, why = _constant_weight(node, 2, "bias")
    if why:
        return why
    dtype = _float_dtype(x, node.inputs[1])
    if dtype is None:
        return f"Conv {node.name!r}: not a float tensor"
    nd = w.ndim - 2
    if nd < 1:
        return f"Conv {node.name!r}: weight of rank {w.ndim}"
    strides = tuple(attr(node, "strides", [1] * nd))
    dilations = tuple(attr(node, "dilations", [1] * nd))
    pads = tuple(attr(node, "pads", [0] * (2 * nd)))
    groups = int(attr(node, "group", 1))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        pads = (0,) * (2 * nd)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = Layout(nd + 2).spatial(x.shape)
        if spatial is None:
            return f"Conv {node.name!r}: auto_pad={auto_pad} with unknown spatial sizes"
        begins, ends = [], []
        for size, k, s, d in zip(spatial, w.shape[2:], strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        pads = tuple(begins + ends)
    try:
        layer = make_layer(w, b, strides, dilations, pads, groups)
    except ValueError as err:
        return f"Conv {node.name!r}: {err}"
    return Element("layer", [node], x, node.outputs[0], nd + 2, Layout(nd + 2), dtype, layer=layer,
                   weights=_weights(node, 1, 2))


def _batchnorm(node: gs.Node) -> Element | str:
    x = node.inputs[0]
    if int(attr(node, "training_mode", 0)):
        return f"BatchNormalization {node.name!r}: training mode"
    if any(o.name and (o.outputs) for o in node.outputs[1:]):
        return f"BatchNormalization {node.name!r}: its running statistics outputs are used"
    params = []
    for i, what in enumerate(("scale", "B", "mean", "var"), start=1):
        v, why = _constant_weight(node, i, what)
        if v is None:
            return why or f"BatchNormalization {node.name!r}: no {what}"
        params.append(v)
    rank = data_rank(x)
    if rank is None or rank < 2:
        return f"BatchNormalization {node.name!r}: input rank unknown or < 2 (run shape inference)"
    dtype = _float_dtype(x, node.outputs[0])
    if dtype is None:
        return f"BatchNormalization {node.name!r}: not a float tensor"
    scale, shift = bn_affine(*params, float(attr(node, "epsilon", 1e-5)))
    shape = (1, -1) + (1,) * (rank - 2)
    return Element("affine", [node], x, node.outputs[0], rank, Layout(rank), dtype,
                   scale=scale.reshape(shape), shift=shift.reshape(shape), weights=_weights(node, 1, 2, 3, 4))


def _binary(node: gs.Node) -> Element | str | None:
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if is_constant(a) == is_constant(b):
        return None
    data_first = not is_constant(a)
    x, c_t = (a, b) if data_first else (b, a)
    if node.op == "Div" and not data_first:
        return None  # c / x is not linear
    c = np.asarray(constant_value(c_t), dtype=np.float64)
    dtype = _float_dtype(x, c_t)
    if dtype is None:
        return None  # integer arithmetic (shape computations) is not ours
    rank = data_rank(x)
    if rank is None:
        return f"{node.op} {node.name!r}: rank of {x.name!r} unknown (run shape inference)"
    if c.ndim > rank:
        return f"{node.op} {node.name!r}: the constant has more axes than the data (broadcast grows the output)"
    if rank < 2:
        return f"{node.op} {node.name!r}: data of rank {rank} has no channel axis"
    aligned = c.reshape((1,) * (rank - c.ndim) + c.shape)
    varying = [i for i, d in enumerate(aligned.shape) if d != 1]
    shape = x.shape
    for i in varying:
        if not (isinstance(shape[i], int) and shape[i] == aligned.shape[i]):
            return f"{node.op} {node.name!r}: the constant's axis {i} ({aligned.shape[i]}) is not statically equal to the data's"
    if not varying:
        layout = Layout(2) if rank == 2 else None
    elif varying == [1]:
        layout = Layout(rank)
    elif varying == [rank - 1] and rank > 2:
        layout = Layout(rank, last=True)
    else:
        return f"{node.op} {node.name!r}: the constant varies along axes {varying}, not only the channel axis"
    ones, zeros = np.ones_like(aligned), np.zeros_like(aligned)
    if node.op == "Mul":
        scale, shift = aligned, zeros
    elif node.op == "Add":
        scale, shift = ones, aligned
    elif node.op == "Sub":
        scale, shift = (ones, -aligned) if data_first else (-ones, aligned)
    else:
        if np.any(aligned == 0):
            return f"Div {node.name!r}: division by a constant with zeros"
        scale, shift = 1.0 / aligned, zeros
    return Element("affine", [node], x, node.outputs[0], rank, layout, dtype, scale=scale, shift=shift,
                   weights=[c_t])


def _gemm(node: gs.Node) -> Element | str:
    if int(attr(node, "transA", 0)):
        return f"Gemm {node.name!r}: transA=1"
    x = node.inputs[0]
    w, why = _constant_weight(node, 1, "B")
    if w is None:
        return why or f"Gemm {node.name!r}: no B"
    c, why = _constant_weight(node, 2, "C")
    if why:
        return why
    dtype = _float_dtype(x, node.inputs[1])
    if dtype is None:
        return f"Gemm {node.name!r}: not a float tensor"
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    w = np.asarray(w, dtype=np.float64)
    weight = alpha * (w if int(attr(node, "transB", 0)) else w.T)  # [out, in]
    bias = np.zeros(weight.shape[0])
    if c is not None:
        c = np.asarray(c, dtype=np.float64)
        if c.ndim == 2 and c.shape[0] != 1:
            return f"Gemm {node.name!r}: C varies along the batch axis"
        if c.size not in (1, weight.shape[0]):
            return f"Gemm {node.name!r}: C of shape {c.shape} is not per output"
        bias = beta * np.broadcast_to(c.reshape(-1), (weight.shape[0],))
    return Element("layer", [node], x, node.outputs[0], 2, Layout(2), dtype, layer=make_layer(weight, bias),
                   weights=_weights(node, 1, 2))


def _matmul(node: gs.Node) -> Element | str | None:
    if len(node.inputs) != 2:
        return None
    x, w_t = node.inputs
    if is_constant(x) or not is_constant(w_t):
        return None  # activations times activations (attention), or a constant on the left
    w = np.asarray(constant_value(w_t))
    dtype = _float_dtype(x, w_t)
    if dtype is None:
        return None
    if w.ndim != 2:
        return f"MatMul {node.name!r}: constant of rank {w.ndim} (batched weights are not a per-position layer)"
    rank = data_rank(x)
    if rank is None or rank < 2:
        return f"MatMul {node.name!r}: data rank unknown or < 2 (run shape inference)"
    layer = make_layer(np.asarray(w, dtype=np.float64).T)
    return Element("layer", [node], x, node.outputs[0], rank, Layout(rank, last=rank > 2), dtype, layer=layer,
                   weights=[w_t])


def _pad(node: gs.Node) -> Element | str:
    x = node.inputs[0]
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"Pad {node.name!r}: mode {mode}"
    pads, why = _constant_weight(node, 1, "pads")
    if pads is None:
        return why or f"Pad {node.name!r}: pads given as an attribute (opset < 11)"
    value, why = _constant_weight(node, 2, "constant_value")
    if why:
        return why
    if value is not None and np.any(np.asarray(value) != 0):
        return f"Pad {node.name!r}: pads with a non-zero value"
    rank = data_rank(x)
    dtype = _float_dtype(x, node.outputs[0])
    if rank is None or rank < 3 or dtype is None:
        return f"Pad {node.name!r}: not a float tensor with spatial axes"
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes_v, why = _constant_weight(node, 3, "axes")
    if why:
        return why
    full = [0] * (2 * rank)
    axes = [int(a) % rank for a in np.asarray(axes_v).reshape(-1)] if axes_v is not None else list(range(rank))
    if len(pads) != 2 * len(axes):
        return f"Pad {node.name!r}: {len(pads)} pads for {len(axes)} axes"
    for j, a in enumerate(axes):
        full[a], full[rank + a] = pads[j], pads[len(axes) + j]
    if any(p < 0 for p in full):
        return f"Pad {node.name!r}: negative pads (cropping)"
    if full[0] or full[1] or full[rank] or full[rank + 1]:
        return f"Pad {node.name!r}: pads the batch or channel axis"
    spatial = tuple(full[2:rank] + full[rank + 2:])
    return Element("pad", [node], x, node.outputs[0], rank, Layout(rank), dtype, pads=spatial)


def _reshape(node: gs.Node) -> Element | str | None:
    x, y = node.inputs[0], node.outputs[0]
    dtype = _float_dtype(x, y)
    if dtype is None:
        return None
    if node.op == "Flatten" and int(attr(node, "axis", 1)) != 1:
        return None
    sx, sy = x.shape, y.shape
    if sx is None or sy is None or len(sx) < 3 or len(sy) != 2:
        return None
    if not (isinstance(sx[1], int) and all(d == 1 for d in sx[2:]) and sy[1] == sx[1]):
        return None
    return Element("reshape", [node], x, y, len(sx), Layout(len(sx)), dtype)


def _weights(node: gs.Node, *indices: int) -> list[gs.Constant]:
    return [node.inputs[i] for i in indices if i < len(node.inputs) and is_constant(node.inputs[i])]


LINEAR_OPS = frozenset(("Conv", "BatchNormalization", "Mul", "Add", "Sub", "Div", "Gemm", "MatMul", "Pad", "Flatten",
                        "Reshape", "Squeeze"))  # the ops ``recognise`` may take for an element

_RECOGNISERS = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Mul": _binary,
    "Add": _binary,
    "Sub": _binary,
    "Div": _binary,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Pad": _pad,
    "Flatten": _reshape,
    "Reshape": _reshape,
    "Squeeze": _reshape,
}


def shared_weight(elements: list[Element], vectors_ok: bool = False) -> str | None:
    """Why the elements cannot be replaced together: a weight also read by a node outside them; None if fine.

    ``vectors_ok``: a shared weight of rank 0 or 1 (a bias, a per-channel scale) does not stop a rewrite that emits
    new constants and leaves the old ones to their other readers: exporters and constant merging share equal
    vectors between unrelated layers (every zero bias of a freshly initialised network), and a copy of a vector
    costs nothing. A shared matrix (tied weights) still does: the fused layer would add a copy of it."""
    inside = {id(n) for e in elements for n in e.nodes}
    for e in elements:
        for w in e.weights:
            if vectors_ok and w.shape is not None and len(w.shape) <= 1:
                continue
            for reader in consumers(w):
                if id(reader) not in inside:
                    return f"weight {w.name!r} of {e.nodes[-1].name!r} is also read by {reader.name!r}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# chains: pads, layouts, sizes


@dataclass
class Sized:
    """An element of a run with its sizes: ``spatial`` of its input (None unknown), output ``positions``."""

    e: Element
    spatial: tuple[int, ...] | None
    positions: Fraction
    macs: Fraction


def merge_pad(pad: Element, conv: Element) -> Element:
    """``Conv(Pad(x))`` with zero padding as one Conv element: the pads add up (begins with begins, ends with ends)."""
    layer = conv.layer
    pads = tuple(a + b for a, b in zip(layer.pads, pad.pads))
    fused = ConvLayer(layer.weight, layer.bias, layer.strides, layer.dilations, pads, layer.groups)
    return Element("layer", pad.nodes + conv.nodes, pad.inp, conv.out, conv.rank, conv.layout, conv.dtype,
                   layer=fused, weights=conv.weights)


def resolve_layouts(chain: list[Element], result: PassResult) -> None:
    """Give flexible affines their neighbours' layout (default channel-first) and channel count; build their
    layers."""
    for seq in (chain, chain[::-1]):
        known: Layout | None = None
        for e in seq:
            if e.layout is None and known is not None and known.rank == e.rank:
                e.layout = known
            known = e.out_layout if seq is chain else e.layout
    for e in chain:
        if e.layout is None:
            e.layout = Layout(e.rank)
    n = len(chain)
    chan: list[int | None] = [e.channels() for e in chain]
    for i in range(n):
        if chan[i] is None and i > 0:
            prev = chain[i - 1]
            chan[i] = prev.layer.cout if prev.layer is not None else chan[i - 1]
    for i in range(n - 2, -1, -1):
        if chan[i] is None:
            chan[i] = chan[i + 1]
    for e, c in zip(chain, chan):
        if e.kind == "affine" and e.layer is None:
            reason = e.resolve(e.layout, c)
            if reason:
                refuse(result, f"affine {reason}")


def sized(elements: list[Element]) -> list[Sized]:
    """Input spatial sizes, output positions and MACs of each element of a run."""
    items = []
    first = elements[0]
    spatial = first.layout.spatial(first.inp.shape)
    stride = 1
    for e in elements:
        if e.kind == "reshape":
            items.append(Sized(e, spatial, Fraction(1), Fraction(0)))
            spatial = ()
            continue
        layer = e.layer
        out = out_spatial(layer, spatial)
        if out is not None:
            positions = Fraction(math.prod(out) * e.layout.positions(e.inp.shape))
        else:
            stride *= math.prod(layer.strides)
            positions = Fraction(1, stride)
        items.append(Sized(e, spatial, positions, layer.weight.size * positions))
        spatial = out
    return items


# ----------------------------------------------------------------------------------------------------------------
# cost and emission of one fused layer


def lift(layer: ConvLayer, nd: int) -> ConvLayer:
    """A dense (nd = 0) layer as a 1x..x1 convolution over ``nd`` spatial axes (for inputs of spatial size 1)."""
    if layer.nd == nd:
        return layer
    return make_layer(layer.weight.reshape(layer.weight.shape + (1,) * nd), layer.bias, groups=layer.groups)


def is_diagonal(layer: ConvLayer) -> bool:
    """A per-channel affine (1x..x1 depthwise, unit strides, no pads)."""
    return (layer.groups == layer.cin == layer.cout and all(k == 1 for k in layer.kernel)
            and not any(layer.pads) and all(s == 1 for s in layer.strides))


@dataclass(frozen=True)
class Emission:
    """What ``emit`` will write for a composed layer: its MACs per sample and node count."""

    macs: Fraction
    nodes: int


def plan(layout: Layout, composed: Composed, positions: Fraction, flatten: bool) -> Emission:
    """The cost of emitting ``composed`` on a ``layout`` input; ``positions`` = output positions per sample."""
    layer = composed.layer
    c = layer.cout
    nodes = 1 + int(flatten)
    if layout.nd >= 1:
        macs = layer.weight.size * positions
        if composed.bias_map is not None:
            macs += c * positions
            nodes += 1
        return Emission(macs, nodes)
    if is_diagonal(layer):
        scale = layer.weight.reshape(-1)
        parts = int(np.any(scale != 1)) + int(np.any(layer.bias != 0))
        return Emission(c * positions * parts, max(parts, 1))
    macs = layer.cout * layer.cin * positions  # Gemm / MatMul weights are dense
    if layout.last and np.any(layer.bias != 0):
        return Emission(macs + c * positions, 2)
    return Emission(macs, 1)


def emit(graph: gs.Graph, names: Names, name: str, layout: Layout, x: gs.Tensor, out: gs.Tensor,
         composed: Composed, dtype: np.dtype, flatten: bool = False) -> list[gs.Node]:
    """New nodes computing ``out = composed(x)`` (``out`` keeps its name and readers), appended to the graph:

    - channel-first with spatial axes: ``Conv`` [+ ``Add`` of the bias map] [+ ``Flatten`` when the segment crossed
      a Flatten/Reshape to ``[N, C]``];
    - dense, per-channel (diagonal): ``Mul`` and/or ``Add`` by ``[C]`` constants (``Identity`` when neither);
    - dense on ``[N, C]``: ``Gemm(x, W[out, in], b, transB=1)``;
    - dense channel-last ``[N, .., F]``: ``MatMul(x, W^T)`` [+ ``Add`` of the bias].
    The first node is the fused node (named ``name``); the weights are cast to ``dtype``."""
    layer = composed.layer
    nodes: list[gs.Node] = []

    def const(suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(names.take(f"{name}.{suffix}"), contiguous(value.astype(dtype)))

    def tmp(suffix: str, shape: list | None) -> gs.Variable:
        return gs.Variable(names.take(f"{name}.{suffix}"), dtype=out.dtype, shape=shape)

    def node(op: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], attrs: dict | None = None,
             suffix: str = "") -> None:
        nodes.append(gs.Node(op, name if not nodes else names.take(f"{name}/{suffix or op}"), attrs or {},
                             inputs, outputs))

    if layout.nd >= 1:
        steps = int(composed.bias_map is not None) + int(flatten)
        conv_shape = None
        if out.shape is not None:
            conv_shape = list(out.shape) + [1] * layout.nd if flatten else list(out.shape)
        y = tmp("conv_out", conv_shape) if steps else out
        inputs = [x, const("weight", layer.weight)]
        if np.any(layer.bias != 0):
            inputs.append(const("bias", layer.bias))
        node("Conv", inputs, [y], {
            "kernel_shape": list(layer.kernel), "strides": list(layer.strides),
            "dilations": list(layer.dilations), "pads": list(layer.pads), "group": layer.groups})
        if composed.bias_map is not None:
            z = tmp("biased", conv_shape) if flatten else out
            node("Add", [y, const("bias_map", composed.bias_map[None])], [z], suffix="bias_map")
            y = z
        if flatten:
            node("Flatten", [y], [out], {"axis": 1})
    elif is_diagonal(layer):
        scale = layer.weight.reshape(-1)
        ops = [("Mul", scale, np.any(scale != 1)), ("Add", layer.bias, np.any(layer.bias != 0))]
        ops = [(op, v) for op, v, needed in ops if needed]
        if not ops:
            node("Identity", [x], [out])
        y = x
        for i, (op, value) in enumerate(ops):
            z = out if i == len(ops) - 1 else tmp("scaled", out.shape)
            node(op, [y, const("scale" if op == "Mul" else "shift", value)], [z])
            y = z
    elif not layout.last:
        layer = to_dense(layer)
        inputs = [x, const("weight", layer.weight)]
        if np.any(layer.bias != 0):
            inputs.append(const("bias", layer.bias))
        node("Gemm", inputs, [out], {"transB": 1})
    else:
        layer = to_dense(layer)
        has_bias = bool(np.any(layer.bias != 0))
        y = tmp("matmul_out", out.shape) if has_bias else out
        node("MatMul", [x, const("weight", layer.weight.T)], [y])
        if has_bias:
            node("Add", [y, const("bias", layer.bias)], [out], suffix="bias")
    graph.nodes.extend(nodes)
    return nodes


def detach(nodes: list[gs.Node]) -> None:
    """Disconnect ``nodes`` from every tensor (``graph.cleanup`` then drops them)."""
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()


def out_spatial(layer: ConvLayer, spatial: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """``output_spatial`` that returns None for an unknown or invalid input size."""
    if spatial is None:
        return None
    if layer.nd == 0:
        return ()
    try:
        return output_spatial(layer, spatial)
    except ValueError:
        return None
