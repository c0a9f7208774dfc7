"""Static cost of a model: nodes, compute nodes, depth, parameters, MACs, ops per type.

Definitions (the report's contract):
- compute nodes: Conv, ConvTranspose, Gemm, MatMul, except a *per-channel affine* Conv: 1x1 kernel, one input and
  one output channel per group, stride 1, no padding (``y_c = w_c x_c + b_c``, what a BatchNormalization or a
  per-channel Mul/Add computes; the exact fusions may turn such a pair into one, and that must not read as a layer
  more: per-channel affines count as no layer, in whatever spelling);
- depth: the largest number of compute nodes on any path from a graph input (or constant) to a graph output;
- params: number of elements of all initializers of the main graph (overridable ones included);
- macs: multiply-accumulates of the compute nodes (so none for a per-channel affine, in any spelling, as for the
  Mul/Add or BatchNormalization that compute the same) for ONE sample, from ONNX shape inference: a dynamic first
  dim is set to 1, other dynamic dims are taken from ``input_shapes``; a model whose every input fixes
  axis 0 to N (``data.common_batch``) has its MACs divided by N. Nodes whose shapes cannot be inferred count 0 MACs (and ``macs_complete`` says so).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
from onnx import shape_inference

from onnx_easier.data import common_batch, input_specs
from onnx_easier.model_io import weightless
from onnx_easier.shapes import fill_unknown

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass
class Cost:
    """The report's ``before``/``after`` block (plus ``per_op`` for the tables)."""

    nodes: int
    compute_nodes: int
    activations: int
    depth: int
    params: int
    macs: int
    macs_complete: bool = True
    per_op: dict[str, int] = field(default_factory=dict)

    def as_report(self) -> dict:
        """The JSON form: the six contract fields, then the op histogram."""
        d = asdict(self)
        d.pop("macs_complete")
        return d


def with_static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose dynamic input dims are made concrete, with inferred value_info.

    A dynamic first dim becomes 1; other dynamic dims take their size from ``input_shapes`` (full shapes, the
    first dim ignored) or stay symbolic. Fixed dims are never changed.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        given = (input_shapes or {}).get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value >= 0:
                continue  # a negative size (Paddle's -1) is dynamic, as ONNX Runtime reads it
            if i == 0:
                d.ClearField("dim_param")
                d.dim_value = 1
            elif given is not None and i < len(given):
                d.ClearField("dim_param")
                d.dim_value = int(given[i])
            elif d.HasField("dim_value"):
                d.ClearField("dim_value")
    for out in m.graph.output:  # a declared -1 would stand for a size: unknown instead, for inference to fill
        for d in out.type.tensor_type.shape.dim if out.type.HasField("tensor_type") else ():
            if d.HasField("dim_value") and d.dim_value < 0:
                d.ClearField("dim_value")
    del m.graph.value_info[:]
    try:  # inferred without the weights (model_io.weightless): the same shapes, no serialised copy of them
        light = shape_inference.infer_shapes(weightless(m), data_prop=True)
    except Exception:  # noqa: BLE001 - best effort for cost figures; the model itself was validated on load
        return m
    m.graph.value_info.extend(light.graph.value_info)
    del m.graph.output[:]
    m.graph.output.extend(light.graph.output)
    # sizes inference leaves unknown (ops without inference, Shape arithmetic it cannot follow): from ORT, which
    # can run the model once every input dim is concrete
    fill_unknown(m, dims=True)
    return m


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                         for d in vi.type.tensor_type.shape.dim)
            known = out.get(vi.name)
            if known is None or len(known) != len(dims):
                out[vi.name] = dims
            else:  # a declared output shape may be symbolic where value_info (inference, ORT) knows the size
                out[vi.name] = tuple(k if d is None else d for k, d in zip(known, dims))
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def _prod(dims) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return math.prod(dims)


def layer_macs(op: str, x: tuple | None, w: tuple | None, y: tuple | None, trans_a: bool = False) -> int | None:
    """MACs of one compute layer from its shapes (None when a needed one is unknown; 0 for other ops):
    Conv: output elements x (Cin/groups * kernel); ConvTranspose: input elements x (Cout/groups * kernel);
    Gemm / MatMul: output elements x the contracted dim."""
    if op not in COMPUTE_OPS:
        return 0
    if op in ("Conv", "ConvTranspose"):
        elements, per = (y if op == "Conv" else x), (None if w is None else _prod(w[1:]))
    else:
        elements, per = y, (None if x is None else x[0] if trans_a else x[-1])
    n = _prod(elements)
    return None if n is None or per is None else n * per


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int | None:
    """``layer_macs`` of one node, its shapes read from ``shapes`` (tensor name -> dims)."""
    x = shapes.get(node.input[0])
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    trans_a = node.op_type == "Gemm" and bool(next((a.i for a in node.attribute if a.name == "transA"), 0))
    return layer_macs(node.op_type, x, w, shapes.get(node.output[0]), trans_a)


def is_compute_layer(op: str, weight: tuple | None, attrs: dict) -> bool:
    """A compute node (module doc) from its op, weight shape (None: not a constant) and attributes: a
    Conv/ConvTranspose/Gemm/MatMul that is not a per-channel affine Conv."""
    if op not in COMPUTE_OPS:
        return False
    if op != "Conv" or weight is None:
        return True
    w = list(weight)
    group = int(attrs.get("group", 1))
    pointwise = len(w) >= 3 and all(k == 1 for k in w[2:]) and w[1] == 1 and w[0] == group
    # a 1x1 kernel at stride 1 pads nothing under any auto_pad; explicit pads would add a border of bias only
    plain = all(v == 1 for v in attrs.get("strides", [1])) and not any(attrs.get("pads", [0]))
    return not (pointwise and plain)


def is_compute(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """``is_compute_layer`` of an ONNX node (``weights``: the initializers by name)."""
    if node.op_type not in COMPUTE_OPS:
        return False
    w = weights.get(node.input[1]) if len(node.input) > 1 else None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} if w is not None else {}
    return is_compute_layer(node.op_type, None if w is None else tuple(w.dims), attrs)


def depth(model: onnx.ModelProto) -> int:
    """Largest number of compute nodes on any input-to-output path (nodes are topologically ordered)."""
    weights = {t.name: t for t in model.graph.initializer}
    best: dict[str, int] = {}
    for node in model.graph.node:
        d = max((best.get(i, 0) for i in node.input if i), default=0) + is_compute(node, weights)
        for o in node.output:
            best[o] = d
    return max((best.get(o.name, 0) for o in model.graph.output), default=0)


def measure(model: onnx.ModelProto, activations: int, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Cost:
    """The cost of ``model``; ``activations`` is counted by the caller (activation recognition lives elsewhere)."""
    inferred = with_static_shapes(model, input_shapes)
    shapes = _shapes(inferred)
    weights = {t.name: t for t in model.graph.initializer}
    macs, complete = 0, True
    for node in inferred.graph.node:
        m = node_macs(node, shapes) if is_compute(node, weights) else 0
        if m is None:
            complete = False
        else:
            macs += m
    macs //= common_batch(input_specs(model)) or 1  # else (state inputs [layers, N, H]...) the MACs of one run
    ops = Counter(n.op_type for n in model.graph.node)
    return Cost(
        nodes=len(model.graph.node),
        compute_nodes=sum(is_compute(n, weights) for n in model.graph.node),
        activations=activations,
        depth=depth(model),
        params=sum(math.prod(t.dims) for t in model.graph.initializer),
        macs=macs,
        macs_complete=complete,
        per_op=dict(sorted(ops.items())),
    )
