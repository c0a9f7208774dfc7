"""Execute an ONNX graph in torch, so that gradients reach its initializers (recovery by distillation, distill.py).

A small interpreter, not a converter: the graph's nodes run in their stored (topological) order, each through one
function of a dispatch table ``op type -> torch function``; the initializers named ``trainable`` become
``torch.nn.Parameter`` s, every other initializer a plain tensor. Nothing is traced or rewritten, so after training
``values()`` gives new initializer values for the very same graph.

Why not onnx2torch: its last release is from 2024, it maps nodes to ``nn.Module`` s whose weights no longer carry
the initializer names (writing trained values back would need its internals), and it would be one more
dependency for an op set that the tool's graphs keep small (the fused layers, normalizations, activations,
shape arithmetic of the exporters).

Supported: the default ONNX domain ops of ``OPS`` (``supported(model)`` says which ops of a model are not). An
attribute combination outside what torch computes the same way (a Resize coordinate mode, a pooling with
asymmetric padding that excludes the pads) raises ``NotExecutable`` when the node runs. Whatever the table says,
``check_against_ort`` runs both on given feeds before anyone trusts the executor: outputs within ``rtol`` of ORT's
(optimizations off), ``max|a - b| / max(1, max|a|)`` per output (safety.output_error).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnx_easier.errors import UnsupportedModelError
from onnx_easier.model_io import make_session
from onnx_easier.safety import output_error

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Inputs = list  # list[Tensor | None]: a missing optional input is None


class NotExecutable(UnsupportedModelError):
    """The graph holds an op or an attribute combination that this executor does not run as ORT does."""


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.detach().reshape(-1).cpu().tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


class Node:
    """One node ready to run: its function, input and output names, attributes (bytes decoded), opset."""

    def __init__(self, proto: onnx.NodeProto, opset: int) -> None:
        self.op = proto.op_type
        self.name = proto.name
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.opset = opset
        self.attrs: dict = {}
        for a in proto.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            self.attrs[a.name] = v

    def get(self, name: str, default: object = None) -> object:
        return self.attrs.get(name, default)


# --- the dispatch table ------------------------------------------------------------------------------------------


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, Inputs], Tensor]:
    return lambda n, x: fn(x[0], x[1])


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[Node, Inputs], Tensor]:
    return lambda n, x: fn(x[0])


def _div(n: Node, x: Inputs) -> Tensor:
    if x[0].is_floating_point():
        return x[0] / x[1]
    return torch.div(x[0], x[1], rounding_mode="trunc")


def _mod(n: Node, x: Inputs) -> Tensor:
    return torch.fmod(x[0], x[1]) if n.get("fmod", 0) else torch.remainder(x[0], x[1])


def _pow(n: Node, x: Inputs) -> Tensor:
    return torch.pow(x[0], x[1].to(x[0].dtype) if x[0].is_floating_point() else x[1])


def _clip(n: Node, x: Inputs) -> Tensor:
    if n.opset < 11:
        lo, hi = n.get("min"), n.get("max")
    else:
        lo = x[1] if len(x) > 1 else None
        hi = x[2] if len(x) > 2 else None
    out = x[0]
    if lo is not None:
        out = torch.clamp(out, min=lo) if not isinstance(lo, Tensor) else torch.maximum(out, lo.to(out.dtype))
    if hi is not None:
        out = torch.clamp(out, max=hi) if not isinstance(hi, Tensor) else torch.minimum(out, hi.to(out.dtype))
    return out


def _gelu(n: Node, x: Inputs) -> Tensor:
    return F.gelu(x[0], approximate="tanh" if n.get("approximate", "none") == "tanh" else "none")


def _prelu(n: Node, x: Inputs) -> Tensor:
    return torch.where(x[0] >= 0, x[0], x[0] * x[1])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, Inputs], Tensor]:
    def run(n: Node, x: Inputs) -> Tensor:
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return out
    return run


def _cast(n: Node, x: Inputs) -> Tensor:
    to = int(n.get("to"))
    if to not in _DTYPES:
        raise NotExecutable(f"Cast to ONNX type {to}")
    return x[0].to(_DTYPES[to])


def _constant(n: Node, x: Inputs) -> Tensor:
    if "value" in n.attrs:
        return torch.from_numpy(numpy_helper.to_array(n.attrs["value"]).copy())
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                       ("value_ints", torch.int64)):
        if key in n.attrs:
            return torch.tensor(n.attrs[key], dtype=dtype)
    raise NotExecutable(f"Constant {n.name} without a numeric value")


def _constant_of_shape(n: Node, x: Inputs) -> Tensor:
    value = n.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()).reshape(()) if value is not None else torch.tensor(0.0)
    return torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype, device=x[0].device)


def _shape(n: Node, x: Inputs) -> Tensor:
    dims = list(x[0].shape)
    start, end = int(n.get("start", 0)), n.get("end")
    return torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64, device=x[0].device)


def _range(n: Node, x: Inputs) -> Tensor:
    start, limit, delta = (t.item() for t in x[:3])
    return torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)


def _expand(n: Node, x: Inputs) -> Tensor:
    return x[0].expand(torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]))))


def _reshape(n: Node, x: Inputs) -> Tensor:
    shape = _ints(x[1])
    if not n.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


def _transpose(n: Node, x: Inputs) -> Tensor:
    perm = n.get("perm")
    return x[0].permute(*(perm if perm is not None else reversed(range(x[0].dim()))))


def _flatten(n: Node, x: Inputs) -> Tensor:
    axis = _axis(int(n.get("axis", 1)), x[0].dim())
    return x[0].reshape(math.prod(x[0].shape[:axis]), -1)


def _concat(n: Node, x: Inputs) -> Tensor:
    parts = [t for t in x if t is not None]
    return torch.cat(parts, dim=int(n.get("axis")))


def _split(n: Node, x: Inputs) -> tuple[Tensor, ...]:
    axis = int(n.get("axis", 0))
    sizes = n.get("split") if n.opset < 13 else (_ints(x[1]) if len(x) > 1 and x[1] is not None else None)
    count = len(n.outputs)
    if not sizes:
        dim = x[0].shape[axis]
        if "num_outputs" in n.attrs:
            count = int(n.attrs["num_outputs"])
        step = -(-dim // count)
        sizes = [min(step, dim - i * step) for i in range(count)]
    return tuple(torch.split(x[0], list(sizes), dim=axis))


def _slice(n: Node, x: Inputs) -> Tensor:
    data = x[0]
    if n.opset < 10:
        starts, ends = list(n.get("starts")), list(n.get("ends"))
        axes, steps = list(n.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = data
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, data.dim())
        dim = data.shape[a]
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            index = [slice(None)] * a + [slice(s, max(s, e), st)]
            out = out[tuple(index)]
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            idx = torch.arange(s, e, st, device=data.device)
            out = out.index_select(a, idx)
    return out


def _gather(n: Node, x: Inputs) -> Tensor:
    data, idx = x[0], x[1].to(torch.int64)
    axis = _axis(int(n.get("axis", 0)), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))


def _axes(n: Node, x: Inputs) -> list[int] | None:
    """Axes of Squeeze / Unsqueeze / Reduce*: an attribute before they became an input."""
    if "axes" in n.attrs:
        return list(n.attrs["axes"])
    if len(x) > 1 and x[1] is not None:
        return _ints(x[1])
    return None


def _squeeze(n: Node, x: Inputs) -> Tensor:
    axes = _axes(n, x)
    if axes is None:
        return x[0].squeeze()
    rank = x[0].dim()
    keep = [d for i, d in enumerate(x[0].shape) if i not in {_axis(a, rank) for a in axes}]
    return x[0].reshape(keep)


def _unsqueeze(n: Node, x: Inputs) -> Tensor:
    axes = _axes(n, x) or []
    rank = x[0].dim() + len(axes)
    out = x[0]
    for a in sorted(_axis(a, rank) for a in axes):
        out = out.unsqueeze(a)
    return out


def _tile(n: Node, x: Inputs) -> Tensor:
    return x[0].repeat(*_ints(x[1]))


def _pad(n: Node, x: Inputs) -> Tensor:
    data = x[0]
    rank = data.dim()
    if n.opset < 11:
        pads, value = list(n.get("pads")), float(n.get("value", 0.0))
    else:
        pads = _ints(x[1])
        value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    axes = [_axis(a, rank) for a in axes]
    k = len(axes)
    begin = dict(zip(axes, pads[:k]))
    end = dict(zip(axes, pads[k:]))
    first = min((a for a in axes if begin[a] or end[a]), default=rank)
    spec: list[int] = []
    for a in reversed(range(first, rank)):
        spec += [begin.get(a, 0), end.get(a, 0)]
    if not spec:
        return data
    mode = n.get("mode", "constant")
    if mode == "constant":
        return F.pad(data, spec, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None or rank - first > 3 or rank - first >= rank:
        raise NotExecutable(f"Pad mode {mode} over {rank - first} axes")
    return F.pad(data, spec, mode=torch_mode)


def _softmax(fn: Callable[..., Tensor]) -> Callable[[Node, Inputs], Tensor]:
    def run(n: Node, x: Inputs) -> Tensor:
        if n.opset >= 13:
            return fn(x[0], dim=int(n.get("axis", -1)))
        axis = _axis(int(n.get("axis", 1)), x[0].dim())  # before 13: coerced to 2D at axis
        flat = x[0].reshape(math.prod(x[0].shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x[0].shape)
    return run


def _reduce(fn: Callable[..., Tensor]) -> Callable[[Node, Inputs], Tensor]:
    def run(n: Node, x: Inputs) -> Tensor:
        axes = _axes(n, x)
        keep = bool(n.get("keepdims", 1))
        if not axes:
            if n.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        axes = sorted(_axis(a, x[0].dim()) for a in axes)
        return fn(x[0], axes, keep)
    return run


def _amax(t: Tensor, axes: list[int], keep: bool) -> Tensor:
    return torch.amax(t, dim=axes, keepdim=keep)


def _amin(t: Tensor, axes: list[int], keep: bool) -> Tensor:
    return torch.amin(t, dim=axes, keepdim=keep)


def _mean(t: Tensor, axes: list[int], keep: bool) -> Tensor:
    return torch.mean(t, dim=axes, keepdim=keep)


def _sum(t: Tensor, axes: list[int], keep: bool) -> Tensor:
    return torch.sum(t, dim=axes, keepdim=keep)


def _layer_norm(n: Node, x: Inputs) -> Tensor:
    if len([o for o in n.outputs if o]) > 1:
        raise NotExecutable("LayerNormalization with its Mean / InvStdDev outputs")
    data = x[0]
    axis = _axis(int(n.get("axis", -1)), data.dim())
    dims = list(range(axis, data.dim()))
    eps = float(n.get("epsilon", 1e-5))
    mean = data.mean(dim=dims, keepdim=True)
    var = (data - mean).pow(2).mean(dim=dims, keepdim=True)
    out = (data - mean) / torch.sqrt(var + eps) * x[1]
    return out + x[2] if len(x) > 2 and x[2] is not None else out


def _batch_norm(n: Node, x: Inputs) -> Tensor:
    if n.get("training_mode", 0) or len([o for o in n.outputs if o]) > 1:
        raise NotExecutable("BatchNormalization in training mode")
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=float(n.get("epsilon", 1e-5)))


def _instance_norm(n: Node, x: Inputs) -> Tensor:
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=float(n.get("epsilon", 1e-5)))


def _spatial_pads(n: Node, x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
                  ) -> list[int]:
    """[begin_1, ..., begin_k, end_1, ..., end_k] from ``pads`` or ``auto_pad``."""
    k = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(n.get("pads", [0] * 2 * k)) if auto == "NOTSET" else [0] * 2 * k
    begin, end = [], []
    for i in range(k):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bk, e1..ek] as F.pad's (last axis first) [bk, ek, ..., b1, e1]."""
    k = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(k)):
        out += [pads[i], pads[k + i]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(n: Node, x: Inputs) -> Tensor:
    data, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    k = w.dim() - 2
    if k not in _CONV:
        raise NotExecutable(f"Conv over {k} spatial axes")
    strides = list(n.get("strides", [1] * k))
    dilations = list(n.get("dilations", [1] * k))
    pads = _spatial_pads(n, data, list(w.shape[2:]), strides, dilations)
    if pads[:k] == pads[k:]:
        padding = pads[:k]
    else:
        data, padding = F.pad(data, _torch_pad(pads)), [0] * k
    return _CONV[k](data, w, b, strides, padding, dilations, int(n.get("group", 1)))


def _conv_transpose(n: Node, x: Inputs) -> Tensor:
    data, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    k = w.dim() - 2
    pads = list(n.get("pads", [0] * 2 * k))
    if k not in _CONV_T or n.get("auto_pad", "NOTSET") != "NOTSET" or "output_shape" in n.attrs \
            or pads[:k] != pads[k:]:
        raise NotExecutable("ConvTranspose with auto_pad, output_shape or asymmetric pads")
    return _CONV_T[k](data, w, b, list(n.get("strides", [1] * k)), pads[:k], list(n.get("output_padding", [0] * k)),
                      int(n.get("group", 1)), list(n.get("dilations", [1] * k)))


def _gemm(n: Node, x: Inputs) -> Tensor:
    a = x[0].transpose(0, 1) if n.get("transA", 0) else x[0]
    b = x[1].transpose(0, 1) if n.get("transB", 0) else x[1]
    out = torch.matmul(a, b)
    alpha, beta = float(n.get("alpha", 1.0)), float(n.get("beta", 1.0))
    if alpha != 1.0:
        out = out * alpha
    if len(x) > 2 and x[2] is not None:
        out = out + (x[2] * beta if beta != 1.0 else x[2])
    return out


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool(average: bool) -> Callable[[Node, Inputs], Tensor]:
    def run(n: Node, x: Inputs) -> Tensor:
        if len([o for o in n.outputs if o]) > 1:
            raise NotExecutable("MaxPool with its Indices output")
        data = x[0]
        kernel = list(n.get("kernel_shape"))
        k = len(kernel)
        strides = list(n.get("strides", [1] * k))
        dilations = list(n.get("dilations", [1] * k))
        pads = _spatial_pads(n, data, kernel, strides, dilations)
        ceil = bool(n.get("ceil_mode", 0))
        symmetric = pads[:k] == pads[k:] and all(p <= kk // 2 for p, kk in zip(pads[:k], kernel))
        if average:
            if any(d != 1 for d in dilations):
                raise NotExecutable("AveragePool with dilations")
            include = bool(n.get("count_include_pad", 0))
            if not symmetric and any(pads) and not include:
                raise NotExecutable("AveragePool with asymmetric pads that excludes them")
            if not symmetric:
                data, pads = F.pad(data, _torch_pad(pads)), [0] * 2 * k
            return _AVG_POOL[k](data, kernel, strides, pads[:k], ceil, include)
        if not symmetric:
            data, pads = F.pad(data, _torch_pad(pads), value=-math.inf), [0] * 2 * k
        return _MAX_POOL[k](data, kernel, strides, pads[:k], dilations, ceil)
    return run


def _global(fn: Callable[..., Tensor]) -> Callable[[Node, Inputs], Tensor]:
    return lambda n, x: fn(x[0], dim=list(range(2, x[0].dim())), keepdim=True)


_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _resize(n: Node, x: Inputs) -> Tensor:
    data = x[0]
    if n.opset < 11:
        scales = x[1].tolist() if len(x) > 1 else None
        sizes = None
    else:
        scales = x[2].tolist() if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes = _ints(x[3]) if len(x) > 3 and x[3] is not None and x[3].numel() else None
    if n.get("axes") is not None or n.get("antialias", 0):
        raise NotExecutable("Resize with axes or antialias")
    if sizes is None:
        if scales is None or scales[:2] != [1.0, 1.0]:
            raise NotExecutable("Resize of the batch or channel axis")
        sizes = [math.floor(d * s) for d, s in zip(data.shape, scales)]
    elif sizes[:2] != list(data.shape[:2]):
        raise NotExecutable("Resize of the batch or channel axis")
    k = data.dim() - 2
    mode = n.get("mode", "nearest")
    coord = n.get("coordinate_transformation_mode", "half_pixel" if n.opset >= 11 else "asymmetric")
    exact_ratio = scales is None or all(d * s == o for d, s, o in zip(data.shape, scales, sizes))
    if mode == "nearest" and coord == "asymmetric" and n.get("nearest_mode", "round_prefer_floor") == "floor" \
            and exact_ratio:
        return F.interpolate(data, size=sizes[2:], mode="nearest")
    if mode == "linear" and k in _INTERP and coord in ("half_pixel", "pytorch_half_pixel", "align_corners") \
            and exact_ratio:
        return F.interpolate(data, size=sizes[2:], mode=_INTERP[k], align_corners=coord == "align_corners")
    raise NotExecutable(f"Resize mode {mode} with coordinate_transformation_mode {coord}")


def _scatter_nd(n: Node, x: Inputs) -> Tensor:
    if n.get("reduction", "none") != "none":
        raise NotExecutable("ScatterND with a reduction")
    out = x[0].clone()
    idx = x[1].to(torch.int64)
    return out.index_put(tuple(idx.unbind(-1)), x[2])


def _where(n: Node, x: Inputs) -> Tensor:
    return torch.where(x[0], x[1], x[2])


def _identity(n: Node, x: Inputs) -> Tensor:
    return x[0]


def _einsum(n: Node, x: Inputs) -> Tensor:
    return torch.einsum(str(n.get("equation")), *x)


def _hard_sigmoid(n: Node, x: Inputs) -> Tensor:
    return torch.clamp(x[0] * float(n.get("alpha", 0.2)) + float(n.get("beta", 0.5)), 0.0, 1.0)


def _leaky(n: Node, x: Inputs) -> Tensor:
    return F.leaky_relu(x[0], float(n.get("alpha", 0.01)))


def _elu(n: Node, x: Inputs) -> Tensor:
    return F.elu(x[0], float(n.get("alpha", 1.0)))


OPS: dict[str, Callable[[Node, Inputs], Tensor | tuple[Tensor, ...]]] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div, "Mod": _mod,
    "Pow": _pow, "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu), "Clip": _clip,
    "LeakyRelu": _leaky, "PRelu": _prelu, "HardSigmoid": _hard_sigmoid, "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu, "Elu": _elu, "Softplus": _unary(F.softplus), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Round": _unary(torch.round), "Sign": _unary(torch.sign),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge), "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Where": _where,
    "Cast": _cast, "CastLike": lambda n, x: x[0].to(x[1].dtype), "Identity": _identity, "Dropout": _identity,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape,
    "Size": lambda n, x: torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device),
    "Range": _range, "Expand": _expand, "Reshape": _reshape, "Transpose": _transpose, "Flatten": _flatten,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Tile": _tile, "Pad": _pad, "ScatterND": _scatter_nd, "Einsum": _einsum,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce(_mean), "ReduceSum": _reduce(_sum), "ReduceMax": _reduce(_amax),
    "ReduceMin": _reduce(_amin), "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm, "GlobalAveragePool": _global(torch.mean),
    "GlobalMaxPool": _global(torch.amax), "MaxPool": _pool(average=False), "AveragePool": _pool(average=True),
    "Resize": _resize, "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
}


# --- the executor ------------------------------------------------------------------------------------------------


def unsupported(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model``'s graph that the executor has no function for (other domains as ``domain:op``)."""
    out = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            out.add(f"{node.domain}:{node.op_type}")
        elif node.op_type not in OPS:
            out.add(node.op_type)
    return sorted(out)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class TorchGraph:
    """``model`` as a torch computation: ``run(feeds)`` gives its outputs as tensors; the initializers named in
    ``trainable`` (float ones only) are ``nn.Parameter`` s (``parameters()``), their current values as numpy arrays
    in ``values()``."""

    def __init__(self, model: onnx.ModelProto, trainable: Collection[str] = (), device: str = "cpu") -> None:
        missing = unsupported(model)
        if missing:
            raise NotExecutable(f"ops the torch executor does not run: {', '.join(missing)}")
        self.device = torch.device(device)
        opset = _opset(model)
        self.nodes = [Node(n, opset) for n in model.graph.node]
        self.outputs = [o.name for o in model.graph.output]
        self.inputs = [i.name for i in model.graph.input]
        self.params: dict[str, torch.nn.Parameter] = {}
        self.consts: dict[str, Tensor] = {}
        wanted = set(trainable)
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            t = torch.from_numpy(np.array(arr, copy=True)).to(self.device)
            if init.name in wanted and t.is_floating_point():
                self.params[init.name] = torch.nn.Parameter(t)
            else:
                self.consts[init.name] = t
        self._plans: dict[tuple[str, ...], list[tuple[Node, list[str]]]] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def values(self) -> dict[str, np.ndarray]:
        """The trainable initializers' current values."""
        return {k: p.detach().cpu().numpy().copy() for k, p in self.params.items()}

    def load(self, values: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, v in values.items():
                self.params[k].copy_(torch.from_numpy(v))

    def _plan(self, outputs: tuple[str, ...]) -> list[tuple[Node, list[str]]]:
        """The nodes that ``outputs`` need, each with the tensors that are read for the last time there."""
        if outputs not in self._plans:
            needed = set(outputs)
            keep: list[Node] = []
            for node in reversed(self.nodes):
                if any(o in needed for o in node.outputs):
                    keep.append(node)
                    needed.update(i for i in node.inputs if i)
            keep.reverse()
            last: dict[str, int] = {}
            for i, node in enumerate(keep):
                for name in node.inputs:
                    last[name] = i
            free: list[list[str]] = [[] for _ in keep]
            for name, i in last.items():
                if name not in outputs and name not in self.params and name not in self.consts:
                    free[i].append(name)
            self._plans[outputs] = list(zip(keep, free))
        return self._plans[outputs]

    def run(self, feeds: Mapping[str, np.ndarray | Tensor], outputs: Sequence[str] | None = None) -> list[Tensor]:
        """The tensors ``outputs`` (default: the graph's outputs) for ``feeds``."""
        names = tuple(outputs) if outputs is not None else tuple(self.outputs)
        env: dict[str, Tensor] = {**self.consts, **self.params}
        for k, v in feeds.items():
            env[k] = (v if isinstance(v, Tensor) else torch.from_numpy(np.ascontiguousarray(v))).to(self.device)
        for node, free in self._plan(names):
            args = [env[i] if i else None for i in node.inputs]
            try:
                result = OPS[node.op](node, args)
            except NotExecutable:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise NotExecutable(f"{node.op} node {node.name!r} failed in torch: {exc}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results):
                if name:  # a Constant's value is made on the CPU
                    env[name] = value if value.device == self.device else value.to(self.device)
            for name in free:
                env.pop(name, None)
        return [env[n] for n in names]


def check_against_ort(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], rtol: float,
                      graph: TorchGraph | None = None) -> str | None:
    """None when ``model`` runs in torch (``graph``, or a new executor) with every output within ``rtol`` of ORT's
    (optimizations off) on every feed, relative error ``max|a - b| / max(1, max|a|)`` per output; else the reason,
    in words."""
    try:
        graph = graph or TorchGraph(model)
    except NotExecutable as exc:
        return str(exc)
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for feed in feeds:
        expected = session.run(names, dict(feed))
        try:
            with torch.no_grad():
                got = [t.detach().cpu().numpy() for t in graph.run(feed, names)]
        except NotExecutable as exc:
            return str(exc)
        worst = max(worst, output_error(expected, got))
    if not worst <= rtol:
        return f"torch execution differs from ONNX Runtime's: relative error {worst:.3g} > {rtol:.3g}"
    log.debug("torch execution matches ONNX Runtime (relative error %.3g <= %.3g)", worst, rtol)
    return None
