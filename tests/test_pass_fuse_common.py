"""Helpers shared by the fusion-pass tests (a tiny graph builder, the ORT equivalence check), and tests of the
element recognisers of ``onnx_easier.passes.fuse_common``."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.linear_math import conv_forward
from onnx_easier.model_io import make_session, to_graph, to_model
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import Element, FusionContext, recognise

RTOL, ATOL = 1e-4, 1e-5
_NP_TO_ONNX = {np.dtype(helper.tensor_dtype_to_np_dtype(t)): t for t in (
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)}


class Net:
    """Smallest possible graph builder: ``x = net.input(...)``, ``y = net.node("Conv", x, w)``, ``net.model()``.

    Node names default to their first output's name; weights come from one seeded generator."""

    def __init__(self, opset: int = 17, seed: int = 0, dtype: type = np.float32) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.out_types: dict[str, int | None] = {}
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def input(self, name: str, shape: list, dtype: type | None = None) -> str:
        elem = _NP_TO_ONNX[np.dtype(dtype or self.dtype)]
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def const(self, value, name: str | None = None, dtype: type | None = None) -> str:
        name = name or self._fresh("c")
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(dtype or self.dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, *shape: int, name: str | None = None, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.const(self.rng.standard_normal(shape) * s, name)

    def node(self, op: str, *inputs: str, out: str | None = None, name: str | None = None, n_out: int = 1,
             **attrs) -> str:
        outs = [out or self._fresh(op.lower())] + [self._fresh(op.lower()) for _ in range(n_out - 1)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name or outs[0], **attrs))
        return outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int | tuple = 3, nd: int = 2, bias: bool = True,
             group: int = 1, name: str | None = None, **attrs) -> str:
        ks = (k,) * nd if isinstance(k, int) else tuple(k)
        w = self.weight(cout, cin // group, *ks)
        ins = [x, w] + ([self.const(self.rng.standard_normal(cout) * 0.1)] if bias else [])
        return self.node("Conv", *ins, out=name, group=group, **attrs)

    def bn(self, x: str, c: int, name: str | None = None, eps: float = 1e-5) -> str:
        r = self.rng
        return self.node("BatchNormalization", x, self.const(r.uniform(0.5, 1.5, c)), self.const(r.normal(0, .1, c)),
                         self.const(r.normal(0, .1, c)), self.const(r.uniform(0.5, 1.5, c)), out=name, epsilon=eps)

    def gemm(self, x: str, fin: int, fout: int, name: str | None = None, trans_b: int = 1, bias: bool = True,
             **attrs) -> str:
        w = self.weight(fout, fin) if trans_b else self.const(self.rng.standard_normal((fin, fout)) / np.sqrt(fin))
        ins = [x, w] + ([self.const(self.rng.standard_normal(fout) * 0.1)] if bias else [])
        return self.node("Gemm", *ins, out=name, transB=trans_b, **attrs)

    def output(self, *names: str, elem: int | None = None) -> None:
        self.outputs.extend(names)
        for n in names:
            self.out_types[n] = elem

    def model(self) -> onnx.ModelProto:
        elem = _NP_TO_ONNX[self.dtype]
        outs = [helper.make_tensor_value_info(n, self.out_types[n] or elem, None) for n in self.outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model

    def _fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"


PassFn = Callable[..., PassResult]


def apply(model: onnx.ModelProto, *passes: PassFn) -> tuple[onnx.ModelProto, list[PassResult], FusionContext]:
    """Run ``passes`` on the shape-inferred graph of ``model``; returns the new model (checked), results, context."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = to_graph(inferred)
    ctx = FusionContext()
    results = [p(graph, ctx) for p in passes]
    out = to_model(graph, model)
    check_valid(out)
    return out, results, ctx


def check_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def feeds(model: onnx.ModelProto, seed: int = 1, dim: int = 3) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (symbolic dimensions become ``dim``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        out[vi.name] = rng.standard_normal(shape).astype(dtype)
    return out


def assert_same(before: onnx.ModelProto, after: onnx.ModelProto, data: dict[str, np.ndarray] | None = None,
                rtol: float = RTOL, atol: float = ATOL) -> None:
    """Same input/output names and the same outputs in ORT (optimizations off)."""
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    data = data if data is not None else feeds(before)
    ya = make_session(before).run(None, data)
    yb = make_session(after).run(None, data)
    for a, b in zip(ya, yb):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ----------------------------------------------------------------------------------------------------------------
# recognisers


def _element(model: onnx.ModelProto, node_name: str) -> Element | str | None:
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    node = next(n for n in graph.nodes if n.name == node_name)
    return recognise(node)


@pytest.mark.parametrize("op,first,expect_scale,expect_shift", [
    ("Mul", True, 2.0, 0.0), ("Add", True, 1.0, 2.0), ("Sub", True, 1.0, -2.0), ("Sub", False, -1.0, 2.0),
    ("Div", True, 0.5, 0.0), ("Mul", False, 2.0, 0.0), ("Add", False, 1.0, 2.0),
])
def test_binary_affine(op: str, first: bool, expect_scale: float, expect_shift: float) -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    c = net.const(np.full((4, 1, 1), 2.0))
    net.output(net.node(op, *((x, c) if first else (c, x)), name="n"))
    e = _element(net.model(), "n")
    assert isinstance(e, Element) and e.kind == "affine" and e.layout.axis == 1
    e.resolve(e.layout, None)
    np.testing.assert_allclose(e.layer.weight.reshape(-1), expect_scale)
    np.testing.assert_allclose(e.layer.bias, expect_shift)


@pytest.mark.parametrize("shape,axis", [((), None), ((1, 4, 1, 1), 1), ((4, 1, 1), 1), ((5,), 3), ((1,), None)])
def test_binary_channel_axis(shape: tuple, axis: int | None) -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    net.output(net.node("Mul", x, net.const(np.ones(shape) * 3.0), name="n"))
    e = _element(net.model(), "n")
    assert isinstance(e, Element)
    assert (e.layout.axis if e.layout else None) == axis


@pytest.mark.parametrize("shape,words", [((4, 5, 1), "varies along"), ((1, 1, 4, 5, 5), "more axes")])
def test_binary_not_per_channel(shape: tuple, words: str) -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    net.output(net.node("Add", x, net.const(np.ones(shape)), name="n"))
    e = _element(net.model(), "n")
    assert isinstance(e, str) and words in e


def test_div_by_data_and_integer_math_are_not_elements() -> None:
    net = Net()
    x = net.input("x", ["N", 4])
    net.output(net.node("Div", net.const(np.ones(4)), x, name="d"))
    assert _element(net.model(), "d") is None
    net = Net()
    s = net.input("s", [2], dtype=np.float32)
    net.inputs[-1] = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    net.output(net.node("Mul", s, net.const(np.array([2, 3], np.int64)), name="m"), elem=TensorProto.INT64)
    assert _element(net.model(), "m") is None


def test_conv_same_padding_and_gemm_layers() -> None:
    net = Net()
    x = net.input("x", [2, 3, 7, 6])
    net.output(net.conv(x, 3, 4, k=4, name="c", auto_pad="SAME_LOWER", strides=[2, 1]))
    model = net.model()
    e = _element(model, "c")
    xv = feeds(model)["x"]
    y = make_session(model).run(None, {"x": xv})[0]
    np.testing.assert_allclose(conv_forward(xv, e.layer), y, rtol=RTOL, atol=ATOL)

    net = Net()
    x = net.input("x", ["N", 5])
    net.output(net.gemm(x, 5, 3, name="g", trans_b=0, alpha=0.7, beta=1.3))
    model = net.model()
    e = _element(model, "g")
    xv = feeds(model)["x"]
    np.testing.assert_allclose(conv_forward(xv, e.layer), make_session(model).run(None, {"x": xv})[0],
                               rtol=RTOL, atol=ATOL)
