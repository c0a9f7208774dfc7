"""Recognise activation functions in a graph, whatever their spelling, as one record per activation.

The kinds and their math (``x`` is the pre-activation tensor):

    Relu          max(x, 0)
    Clip          min(max(x, lo), hi)                      ReLU6 is lo=0, hi=6; a missing bound is -inf / +inf
    LeakyRelu     x if x >= 0 else alpha * x
    PRelu         x if x >= 0 else slope * x               slope broadcast onto x (per channel or one value)
    HardSigmoid   max(0, min(1, alpha * x + beta))
    HardSwish     x * max(0, min(1, x / 6 + 1/2))
    Gelu          approximate="none":  x/2 * (1 + erf(x / sqrt(2)))
                  approximate="tanh":  x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    SiLU          x * sigmoid(beta * x)                    beta=1 is SiLU, other beta the Swish family

Spellings. Single ops ("op") are matched by op type. Decomposed forms are matched algebraically, never by node
names: starting at a final Mul/Div/Add/Sub node, the chain of elementwise Add/Sub/Mul/Div-by-constant/Pow/Neg nodes is
expanded into a polynomial whose variables ("leaves") are the tensors where the expansion stops. Expansion goes
through a tensor only when the tensor has a single reader, so the pre-activation ``x`` (read at least twice by every
decomposition) is always a leaf. The polynomial is then matched, with a relative tolerance of 1e-3 on constants:

    "mul-sigmoid"       c * x * g,  g = Sigmoid(beta x)                          c = 1
    "mul-clip-div"      c * x * g,  g = Clip(p x + q, 0, hi)                     c p = 1/6, c q = 1/2, c hi = 1
    "mul-hardsigmoid"   c * x * g,  g = HardSigmoid_{alpha,beta}(p x + q)        c = 1, alpha p = 1/6,
                                                                                 alpha q + beta = 1/2
    "erf"               a x + b x e,  e = Erf(k x)                               a = b = 1/2, k = 1/sqrt(2)
    "tanh"              a x + b x e,  e = Tanh(k x + m x^3)                      a = b = 1/2, k = sqrt(2/pi),
                                                                                 m = 0.044715 k

so every order of the factors (x*0.5*(1+erf), 0.5*x*(...), 0.5*x + 0.5*x*erf, Div by 1.4142 or Mul by 0.7071, /6
before or after the Mul, x*x*x or Pow(x, 3)) is one case. A decomposition whose intermediate tensors are read outside the pattern or
are graph outputs is refused (it could not be removed); its pieces may still be activations on their own (the Clip
of a refused HardSwish is then a Clip on x + 3).
"""
from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnx_easier.graph_utils import constant_value, consumers, is_graph_output, producer, single_consumer

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Activation:
    """One activation function of the graph.

    name:     the activation's name in reports (the name of the node that writes ``output``).
    op:       canonical kind: Relu, Clip, LeakyRelu, PRelu, HardSigmoid, HardSwish, Gelu, SiLU.
    spelling: how it is written, e.g. "op", "erf", "tanh", "mul-sigmoid", "mul-clip-div".
    input:    name of the pre-activation tensor x.
    output:   name of the activation's output tensor act(x).
    nodes:    names of every node that makes up the activation (1 for an op, several for a decomposition).
    axis:     channel axis of ``input``: 1 after Conv/ConvTranspose/BatchNormalization, -1 (last) after Gemm/MatMul.
    channels: size of that axis when known statically, else None.
    params:   constants of the function (alpha, beta, min, max, slope array for PRelu, approximate...).
    """

    name: str
    op: str
    spelling: str
    input: str
    output: str
    nodes: tuple[str, ...]
    axis: int
    channels: int | None
    params: dict = field(default_factory=dict, compare=False, hash=False)


# ----------------------------------------------------------------------------------------------------------------------
# Preparation: shapes and node names
# ----------------------------------------------------------------------------------------------------------------------

def ensure_node_names(graph: gs.Graph) -> int:
    """Give every node of ``graph`` (main graph only) a unique name; return how many were (re)named.

    An unnamed node becomes ``{op}_{index}`` with ``index`` its position in ``graph.nodes``; a node whose name
    repeats an earlier node's becomes ``{name}_{index}``. A generated name that is already taken gets a further
    ``_1``, ``_2``... suffix. Existing unique names never change, so calling it twice changes nothing.
    """
    used = {n.name for n in graph.nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name}_{index}" if node.name else f"{node.op}_{index}"
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        used.add(name)
        seen.add(name)
        renamed += 1
    return renamed


# ----------------------------------------------------------------------------------------------------------------------
# Small accessors
# ----------------------------------------------------------------------------------------------------------------------

_DEFAULT_DOMAINS = ("", "ai.onnx")
_REL_TOL = 1e-3
_ABS_TOL = 1e-6
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
_MAX_PATTERN_NODES = 24
_MAX_TERMS = 16


def _close(value: float, target: float) -> bool:
    """|value - target| <= 1e-3 |target| + 1e-6: float32 constants written by any exporter pass."""
    return abs(value - target) <= _REL_TOL * abs(target) + _ABS_TOL


def _is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


def _const_array(t: gs.Tensor | None) -> np.ndarray | None:
    """Value of an initializer, or of the output of a ``Constant`` node (graphs not loaded through model_io)."""
    value = constant_value(t)
    if value is not None or t is None:
        return value
    p = producer(t)
    if p is None or p.op != "Constant" or not _is_default_domain(p):
        return None
    attrs = p.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return np.asarray(attrs["value"].values)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def _scalar(t: gs.Tensor | None) -> float | None:
    """The value of a one-element numeric constant, else None."""
    value = _const_array(t)
    if value is None or value.size != 1 or value.dtype.kind not in "fiu":
        return None
    return float(value.reshape(()))


def _rank(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    return None if shape is None else len(shape)


def _maybe_float(t: gs.Tensor) -> bool:
    """False only when ``t``'s element type is known and is not a floating type (Clip or Relu on indices)."""
    dtype = getattr(t, "dtype", None)
    if dtype is None:
        return True
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:  # ONNX-only types numpy cannot hold: bfloat16 and float8 are floats, the rest are not used here
        return "float" in str(dtype).lower()


def _present(t: gs.Tensor | None) -> bool:
    """True for an optional input that is actually given (not absent, not the empty name)."""
    return t is not None and bool(t.name)


# ----------------------------------------------------------------------------------------------------------------------
# Polynomial expansion of elementwise arithmetic
# ----------------------------------------------------------------------------------------------------------------------

Monomial = tuple[tuple[str, int], ...]  # sorted (leaf tensor name, power) pairs; () is the constant term
Poly = dict[Monomial, float]


def _poly_const(c: float) -> Poly:
    return {(): c} if c != 0.0 else {}


def _poly_add(p: Poly, q: Poly, sign: float = 1.0) -> Poly:
    out = dict(p)
    for m, c in q.items():
        v = out.get(m, 0.0) + sign * c
        if v == 0.0:
            out.pop(m, None)
        else:
            out[m] = v
    return out


def _mono_mul(m: Monomial, n: Monomial) -> Monomial:
    powers: dict[str, int] = dict(m)
    for name, k in n:
        powers[name] = powers.get(name, 0) + k
    return tuple(sorted(powers.items()))


def _poly_mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for m, c in p.items():
        for n, d in q.items():
            key = _mono_mul(m, n)
            v = out.get(key, 0.0) + c * d
            if v == 0.0:
                out.pop(key, None)
            else:
                out[key] = v
    return out


class _Expansion:
    """Expands a tensor into a polynomial of its leaf tensors, remembering the nodes it went through.

    Goes through Add, Sub, Mul, Div by a one-element constant, Pow by a small integer constant and Neg, and only
    through tensors with a single reader that are not graph outputs (the start tensor excepted). Gives up (None)
    past ``_MAX_PATTERN_NODES`` nodes or ``_MAX_TERMS`` terms, so a long arithmetic chain costs little.
    """

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.nodes: dict[str, gs.Node] = {}
        self.leaves: dict[str, gs.Tensor] = {}
        self.const_ndim = 0  # largest rank of a constant folded into the coefficients (it broadcasts onto x)

    def expand(self, t: gs.Tensor, start: bool = False) -> Poly | None:
        value = _const_array(t)
        if value is not None:
            if value.size != 1 or value.dtype.kind not in "fiu":
                return None
            self.const_ndim = max(self.const_ndim, value.ndim)
            return _poly_const(float(value.reshape(())))
        node = producer(t)
        if (
            node is None
            or not _is_default_domain(node)
            or node.op not in ("Add", "Sub", "Mul", "Div", "Pow", "Neg")
            or len(node.outputs) != 1
            or (not start and single_consumer(self.graph, t) is None)
        ):
            return self._leaf(t)
        if node.op == "Div" and _scalar(node.inputs[1]) in (None, 0.0):
            return self._leaf(t)
        if node.op == "Pow":
            exponent = _scalar(node.inputs[1])
            if exponent is None or exponent not in (1.0, 2.0, 3.0, 4.0):
                return self._leaf(t)
        self.nodes[node.name] = node
        if len(self.nodes) > _MAX_PATTERN_NODES:
            return None
        result = self._expand_node(node)
        if result is not None and len(result) > _MAX_TERMS:
            return None
        return result

    def _expand_node(self, node: gs.Node) -> Poly | None:
        a = self.expand(node.inputs[0])
        if a is None:
            return None
        if node.op == "Neg":
            return {m: -c for m, c in a.items()}
        if node.op == "Div":
            scale = _scalar(node.inputs[1])
            self.const_ndim = max(self.const_ndim, np.ndim(_const_array(node.inputs[1])))
            return {m: c / scale for m, c in a.items()}
        if node.op == "Pow":
            exponent = int(_scalar(node.inputs[1]))
            self.const_ndim = max(self.const_ndim, np.ndim(_const_array(node.inputs[1])))
            result: Poly = _poly_const(1.0)
            for _ in range(exponent):
                result = _poly_mul(result, a)
            return result
        b = self.expand(node.inputs[1])
        if b is None:
            return None
        if node.op == "Add":
            return _poly_add(a, b)
        if node.op == "Sub":
            return _poly_add(a, b, sign=-1.0)
        return _poly_mul(a, b)

    def _leaf(self, t: gs.Tensor) -> Poly:
        self.leaves[t.name] = t
        return {((t.name, 1),): 1.0}


def _affine_in(poly: Poly | None, x: str) -> tuple[float, float] | None:
    """(p, q) when ``poly`` is p * x + q with p != 0, else None."""
    if poly is None or not poly:
        return None
    p = poly.get(((x, 1),), 0.0)
    q = poly.get((), 0.0)
    if p == 0.0 or set(poly) - {((x, 1),), ()}:
        return None
    return p, q


# ----------------------------------------------------------------------------------------------------------------------
# Decomposed activations: pattern, check, rewrite-free record
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Match:
    op: str
    spelling: str
    x: gs.Tensor
    root: gs.Node
    nodes: dict[str, gs.Node]
    params: dict
    const_ndim: int = 0  # largest rank of a constant folded into the pattern (it broadcasts onto x)


def _match_decomposed(graph: gs.Graph, root: gs.Node) -> _Match | None:
    """Pattern: expand the root Mul/Div/Add/Sub into a polynomial and read off which gated product it is."""
    if root.op not in ("Mul", "Div", "Add", "Sub") or not _is_default_domain(root) or len(root.outputs) != 1:
        return None
    outer = _Expansion(graph)
    poly = outer.expand(root.outputs[0], start=True)
    if poly is None:
        return None
    candidates: list[_Match] = []
    if len(poly) == 1:
        ((mono, c),) = poly.items()
        if len(mono) == 2 and mono[0][1] == 1 and mono[1][1] == 1:
            (n1, _), (n2, _) = mono
            for x_name, g_name in ((n1, n2), (n2, n1)):
                found = _match_gate(graph, outer, root, c, outer.leaves[x_name], outer.leaves[g_name])
                if found is not None:
                    candidates.append(found)
    elif len(poly) == 2:
        found = _match_gelu(graph, outer, root, poly)
        if found is not None:
            candidates.append(found)
    for m in candidates:
        reason = _check(graph, m)
        if reason is None:
            return m
        _LOG.debug("%s at %s refused: %s", m.op, root.name, reason)
    return None


def _match_gate(graph: gs.Graph, outer: _Expansion, root: gs.Node, c: float, x: gs.Tensor,
                g: gs.Tensor) -> _Match | None:
    """c * x * g with g one of Sigmoid(beta x), Clip(p x + q, 0, hi), HardSigmoid(p x + q)."""
    gate = producer(g)
    if gate is None or not _is_default_domain(gate) or len(gate.outputs) != 1 or not gate.inputs:
        return None
    inner = _Expansion(graph)
    affine = _affine_in(inner.expand(gate.inputs[0]), x.name)
    if affine is None:
        return None
    p, q = affine
    nodes = {**outer.nodes, gate.name: gate, **inner.nodes}
    ndim = max(outer.const_ndim, inner.const_ndim)
    if gate.op == "Sigmoid" and _close(c, 1.0) and q == 0.0:
        return _Match("SiLU", "mul-sigmoid", x, root, nodes, {"beta": p}, ndim)
    if gate.op == "HardSigmoid":
        alpha = float(gate.attrs.get("alpha", 0.2))
        beta = float(gate.attrs.get("beta", 0.5))
        if _close(c, 1.0) and _close(alpha * p, 1 / 6) and _close(alpha * q + beta, 0.5):
            return _Match("HardSwish", "mul-hardsigmoid", x, root, nodes, {}, ndim)
    if gate.op == "Clip":
        bounds = _clip_bounds(gate)
        if bounds is not None:
            lo, hi = bounds
            if (_close(lo, 0.0) and 0.0 < hi < math.inf and _close(c * p, 1 / 6) and _close(c * q, 0.5)
                    and _close(c * hi, 1.0)):
                return _Match("HardSwish", "mul-clip-div", x, root, nodes, {}, ndim)
    return None


def _match_gelu(graph: gs.Graph, outer: _Expansion, root: gs.Node, poly: Poly) -> _Match | None:
    """a x + b x e with e = Erf(x / sqrt 2) or Tanh(sqrt(2/pi) (x + 0.044715 x^3)) and a = b = 1/2."""
    linear = [m for m in poly if len(m) == 1 and m[0][1] == 1]
    gated = [m for m in poly if len(m) == 2 and m[0][1] == 1 and m[1][1] == 1]
    if len(linear) != 1 or len(gated) != 1:
        return None
    x_name = linear[0][0][0]
    names = {name for name, _ in gated[0]}
    if x_name not in names:
        return None
    (e_name,) = names - {x_name}
    if not (_close(poly[linear[0]], 0.5) and _close(poly[gated[0]], 0.5)):
        return None
    x, e = outer.leaves[x_name], outer.leaves[e_name]
    gate = producer(e)
    if gate is None or not _is_default_domain(gate) or gate.op not in ("Erf", "Tanh") or len(gate.outputs) != 1:
        return None
    inner = _Expansion(graph)
    arg = inner.expand(gate.inputs[0])
    if arg is None:
        return None
    x1, x3 = ((x_name, 1),), ((x_name, 3),)
    nodes = {**outer.nodes, gate.name: gate, **inner.nodes}
    ndim = max(outer.const_ndim, inner.const_ndim)
    if gate.op == "Erf" and set(arg) == {x1} and _close(arg[x1], _SQRT_HALF):
        return _Match("Gelu", "erf", x, root, nodes, {"approximate": "none"}, ndim)
    if (gate.op == "Tanh" and set(arg) == {x1, x3} and _close(arg[x1], _TANH_K)
            and _close(arg[x3], _TANH_K * _TANH_CUBIC)):
        return _Match("Gelu", "tanh", x, root, nodes, {"approximate": "tanh"}, ndim)
    return None


def _check(graph: gs.Graph, m: _Match) -> str | None:
    """Why the match cannot be one removable activation, or None when it can."""
    if _const_array(m.x) is not None:
        return "its input is a constant"
    if not _maybe_float(m.x):
        return f"its input has the non-float type {m.x.dtype}"
    if producer(m.x) is not None and producer(m.x).name in m.nodes:
        return "its input is computed inside the pattern"
    rank = _rank(m.x)
    if m.const_ndim > (rank if rank is not None else 1):
        return f"a constant of rank {m.const_ndim} would broadcast the output beyond the input's shape"
    if len(m.nodes) > _MAX_PATTERN_NODES:
        return "too many nodes"
    names = set(m.nodes)
    for node in m.nodes.values():
        if node is m.root:
            continue
        for out in node.outputs:
            if is_graph_output(graph, out):
                return f"intermediate tensor {out.name!r} is a graph output"
            outside = [r.name for r in consumers(out) if r.name not in names]
            if outside:
                return f"intermediate tensor {out.name!r} is also read by {outside[0]!r}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Single-op activations
# ----------------------------------------------------------------------------------------------------------------------


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(lo, hi) of a Clip whose bounds are constants (inputs from opset 11, attributes before); a missing bound is
    -inf / +inf. None when a bound is computed at run time."""
    lo, hi = -math.inf, math.inf
    if "min" in node.attrs:
        lo = float(node.attrs["min"])
    if "max" in node.attrs:
        hi = float(node.attrs["max"])
    for index in (1, 2):
        if len(node.inputs) > index and _present(node.inputs[index]):
            value = _scalar(node.inputs[index])
            if value is None:
                return None
            if index == 1:
                lo = value
            else:
                hi = value
    return lo, hi


def _match_single(node: gs.Node) -> tuple[str, dict] | None:
    """(kind, params) for a node that is an activation op by itself."""
    if not _is_default_domain(node) or len(node.outputs) != 1 or not node.inputs or not _present(node.inputs[0]):
        return None
    op = node.op
    if op in ("Relu", "HardSwish"):
        return op, {}
    if op == "LeakyRelu":
        return op, {"alpha": float(node.attrs.get("alpha", 0.01))}
    if op == "HardSigmoid":
        return op, {"alpha": float(node.attrs.get("alpha", 0.2)), "beta": float(node.attrs.get("beta", 0.5))}
    if op == "Clip":
        bounds = _clip_bounds(node)
        return None if bounds is None else (op, {"min": bounds[0], "max": bounds[1]})
    if op == "PRelu":
        slope = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if slope is None or slope.dtype.kind != "f":
            return None
        return op, {"slope": np.array(slope, copy=True)}
    if op == "Gelu":
        approximate = node.attrs.get("approximate", "none")
        if isinstance(approximate, bytes):
            approximate = approximate.decode()
        if approximate not in ("none", "tanh"):
            return None
        return op, {"approximate": approximate}
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Channel axis
# ----------------------------------------------------------------------------------------------------------------------

_CHANNEL_FIRST_LAYERS = ("Conv", "ConvTranspose", "BatchNormalization")
_CHANNEL_LAST_LAYERS = ("Gemm", "MatMul")
_LAYOUT_CHANGING = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Einsum", "DepthToSpace",
                    "SpaceToDepth")
_UPSTREAM_LIMIT = 2000


def _channel_axis(x: gs.Tensor) -> int:
    """Channel axis of ``x``: follow its producer back through layout-keeping ops (Add/Sub/Mul/Div with a
    constant, Identity, Dropout); Conv/ConvTranspose/BatchNormalization -> 1, Gemm/MatMul -> -1. Otherwise decide by
    rank: 2-D -> 1 (the last axis too), else 1 when the nearest layer upstream (not across a reshape or
    transpose) is a Conv, else -1."""
    t = x
    for _ in range(_UPSTREAM_LIMIT):
        node = producer(t)
        if node is None or not _is_default_domain(node):
            break
        if node.op in _CHANNEL_FIRST_LAYERS:
            return 1
        if node.op in _CHANNEL_LAST_LAYERS:
            return -1
        if node.op in ("Identity", "Dropout"):
            t = node.inputs[0]
            continue
        if node.op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            a, b = node.inputs
            a_const, b_const = _const_array(a) is not None, _const_array(b) is not None
            if a_const != b_const:
                t = b if a_const else a
                continue
        break
    if _rank(x) == 2:
        return 1
    return 1 if _nearest_layer_is_conv(x) else -1


def _nearest_layer_is_conv(x: gs.Tensor) -> bool:
    """Breadth-first search upstream of ``x`` for the nearest Conv-like or Gemm/MatMul layer."""
    frontier, seen = [x], {x.name}
    visited = 0
    while frontier and visited < _UPSTREAM_LIMIT:
        nxt: list[gs.Tensor] = []
        for t in frontier:
            node = producer(t)
            visited += 1
            if node is None:
                continue
            if node.op in _CHANNEL_FIRST_LAYERS:
                return True
            if node.op in _CHANNEL_LAST_LAYERS or node.op in _LAYOUT_CHANGING:
                return False
            for inp in node.inputs:
                if inp.name and inp.name not in seen and not isinstance(inp, gs.Constant):
                    seen.add(inp.name)
                    nxt.append(inp)
        frontier = nxt
    return False


def _channels(x: gs.Tensor, out: gs.Tensor, axis: int) -> int | None:
    """Static size of ``axis`` of ``x`` (or of ``out`` when x's shape is unknown), else None."""
    for t in (x, out):
        shape = getattr(t, "shape", None)
        if shape is None:
            continue
        rank = len(shape)
        index = axis if axis >= 0 else rank + axis
        if 0 <= index < rank:
            dim = shape[index]
            if isinstance(dim, (int, np.integer)) and dim > 0:
                return int(dim)
        return None
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------------


def _topological_order(graph: gs.Graph) -> list[gs.Node]:
    """Nodes of ``graph`` in a topological order (stable with respect to ``graph.nodes``), without mutating it."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    pending = {id(n): 0 for n in graph.nodes}
    readers: dict[int, list[gs.Node]] = {id(n): [] for n in graph.nodes}
    for n in graph.nodes:
        for t in n.inputs:
            p = producer(t)
            if p is not None and id(p) in pending and p is not n:
                pending[id(n)] += 1
                readers[id(p)].append(n)
    order: list[gs.Node] = []
    heap = [(index[id(n)], id(n), n) for n in graph.nodes if pending[id(n)] == 0]
    heapq.heapify(heap)
    while heap:
        _, _, n = heapq.heappop(heap)
        order.append(n)
        for r in readers[id(n)]:
            pending[id(r)] -= 1
            if pending[id(r)] == 0:
                heapq.heappush(heap, (index[id(r)], id(r), r))
    if len(order) != len(graph.nodes):  # a cycle: not a valid ONNX graph; keep the given order
        return list(graph.nodes)
    return order


def find_activations(graph: gs.Graph) -> list[Activation]:
    """Every activation of ``graph``'s main graph, in topological order, one record per activation.

    Names unnamed nodes first (``ensure_node_names``), so records' names are unique and stable. Decompositions
    are matched before single ops, largest first; a node belongs to at most one activation. Shapes come from the
    graph's tensors: run ``shapes.infer_shapes`` on the model before import when they are missing.
    """
    ensure_node_names(graph)
    order = _topological_order(graph)
    position = {n.name: i for i, n in enumerate(order)}

    matches: list[_Match] = []
    for node in order:
        m = _match_decomposed(graph, node)
        if m is not None:
            matches.append(m)
    matches.sort(key=lambda m: (-len(m.nodes), position[m.root.name]))
    claimed: set[str] = set()
    chosen: list[_Match] = []
    for m in matches:
        if claimed.isdisjoint(m.nodes):
            claimed.update(m.nodes)
            chosen.append(m)
    for node in order:
        if node.name in claimed:
            continue
        single = _match_single(node)
        if single is None or _const_array(node.inputs[0]) is not None or not _maybe_float(node.inputs[0]):
            continue
        kind, params = single
        chosen.append(_Match(kind, "op", node.inputs[0], node, {node.name: node}, params))

    chosen.sort(key=lambda m: position[m.root.name])
    records = []
    for m in chosen:
        out = m.root.outputs[0]
        axis = _channel_axis(m.x)
        pattern = tuple(sorted(m.nodes, key=lambda name: position[name]))
        records.append(Activation(name=m.root.name, op=m.op, spelling=m.spelling, input=m.x.name, output=out.name,
                                  nodes=pattern, axis=axis, channels=_channels(m.x, out, axis), params=m.params))
    _LOG.debug("found %d activations", len(records))
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Exact numpy functions
# ----------------------------------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), written as (1 + tanh(z/2)) / 2 so that it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def activation_numpy(act: Activation) -> Callable[[np.ndarray], np.ndarray]:
    """The exact function of ``act`` in float64 numpy (the math in the module docstring), elementwise on any shape.

    PRelu broadcasts its slope onto x as ONNX does. Raises ValueError for an unknown kind.
    """
    p = act.params
    if act.op == "Relu":
        return lambda x: np.maximum(np.asarray(x, np.float64), 0.0)
    if act.op == "Clip":
        lo, hi = float(p.get("min", -math.inf)), float(p.get("max", math.inf))
        return lambda x: np.minimum(np.maximum(np.asarray(x, np.float64), lo), hi)
    if act.op == "LeakyRelu":
        alpha = float(p.get("alpha", 0.01))

        def leaky(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, np.float64)
            return np.where(x >= 0.0, x, alpha * x)

        return leaky
    if act.op == "PRelu":
        slope = np.asarray(p["slope"], np.float64)

        def prelu(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, np.float64)
            return np.where(x >= 0.0, x, slope * x)

        return prelu
    if act.op == "HardSigmoid":
        alpha, beta = float(p.get("alpha", 0.2)), float(p.get("beta", 0.5))
        return lambda x: np.clip(alpha * np.asarray(x, np.float64) + beta, 0.0, 1.0)
    if act.op == "HardSwish":

        def hardswish(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, np.float64)
            return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)

        return hardswish
    if act.op == "Gelu":
        if p.get("approximate", "none") == "tanh":

            def gelu_tanh(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x, np.float64)
                return 0.5 * x * (1.0 + np.tanh(_TANH_K * (x + _TANH_CUBIC * x**3)))

            return gelu_tanh

        def gelu(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, np.float64)
            return 0.5 * x * (1.0 + _erf(x * _SQRT_HALF))

        return gelu
    if act.op == "SiLU":
        beta = float(p.get("beta", 1.0))

        def silu(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, np.float64)
            return x * _sigmoid(beta * x)

        return silu
    raise ValueError(f"activation_numpy: unknown activation kind {act.op!r} (of {act.name!r})")
