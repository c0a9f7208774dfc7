"""Valid but odd graphs through the command line: each comes out correct (or untouched) and passes the full checker.

"Correct" means, for ``--remove 0``, numerically equivalent to the input in ORT with optimizations off
(``rtol=1e-4, atol=1e-5``) on inputs the calibration never saw, and for ``--remove K --linearize identity`` equal
to a reference built here independently: the input model with an ``Identity`` swapped in for each activation the
report marks "linearized". The odd parts of each graph (subgraph bodies, QDQ regions, overridable initializers)
are checked to be left as they were.

The helpers at the top (``Builder``, ``optimize_cli``, ``assert_equivalent``, ``identity_reference``) are also
used by test_exporters.py and test_properties.py.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.cli import main

RTOL, ATOL = 1e-4, 1e-5
OPSET = 17
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
         np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16, np.dtype(np.bool_): TensorProto.BOOL,
         np.dtype(np.int64): TensorProto.INT64}


# ----------------------------------------------------------------------------------------------------------------
# helpers


class Builder:
    """A tiny graph writer: ``x = b.input(...)``; ``h = b.conv(x, 3, 8)``; ``b.output(h)``; ``b.model()``.

    Every node is named after its output; weights come from one seeded generator; ``dtype`` is the float type of
    weights and of inputs unless told otherwise."""

    def __init__(self, dtype: type = np.float32, seed: int = 0, prefix: str = "") -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.prefix = prefix  # subgraph builders use their own prefix: ONNX forbids shadowing outer names
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{self.prefix}{base}{self._count}"

    def input(self, name: str, shape: list | None, dtype: type | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _ELEM[np.dtype(dtype or self.dtype)], shape))
        return name

    def output(self, name: str, shape: list | None = None, dtype: type | None = None) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, _ELEM[np.dtype(dtype or self.dtype)], shape))

    def const(self, value, name: str | None = None, dtype: type | None = None) -> str:
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(dtype or self.dtype)
        name = name or self.fresh("c")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, *shape: int) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.const(self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1)))

    def node(self, op: str, *inputs: str, out: str | None = None, domain: str | None = None, **attrs) -> str:
        out = out or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, domain=domain, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, nd: int = 2, group: int = 1, bias: bool = True,
             out: str | None = None, **attrs) -> str:
        w = self.weight(cout, cin // group, *(k,) * nd)
        ins = [x, w] + ([self.const(self.rng.standard_normal(cout) * 0.1)] if bias else [])
        return self.node("Conv", *ins, out=out, group=group, **attrs)

    def bn(self, x: str, c: int, out: str | None = None) -> str:
        r = self.rng
        return self.node("BatchNormalization", x, self.const(r.uniform(0.5, 1.5, c)), self.const(r.normal(0, .2, c)),
                         self.const(r.normal(0, .2, c)), self.const(r.uniform(0.5, 1.5, c)), out=out, epsilon=1e-5)

    def gemm(self, x: str, fin: int, fout: int, out: str | None = None) -> str:
        return self.node("Gemm", x, self.weight(fout, fin), self.const(self.rng.standard_normal(fout) * 0.1),
                         out=out, transB=1)

    def graph(self, name: str = "g") -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)

    def model(self, opset: int = OPSET, extra_opsets: tuple[tuple[str, int], ...] = ()) -> onnx.ModelProto:
        ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(self.graph(), opset_imports=ops)
        onnx.checker.check_model(model, full_check=True)
        return model


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    """ORT on the CPU with every graph optimization off (the numbers are those of the graph as written)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def assert_equivalent(expected: onnx.ModelProto | str | Path, actual: onnx.ModelProto | str | Path,
                      feeds: dict[str, np.ndarray], rtol: float = RTOL, atol: float = ATOL) -> None:
    """Same output names, in the same order, with the same values on ``feeds``."""
    want, got = run(expected, feeds), run(actual, feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name].astype(np.float64), want[name].astype(np.float64), rtol=rtol,
                                   atol=atol, err_msg=name)


def identity_reference(model: onnx.ModelProto, report: dict) -> onnx.ModelProto:
    """``model`` with each activation the report marks "linearized" replaced by ``Identity(pre-activation)``.

    The node the report names writes the activation's output; an Identity from the report's pre-activation tensor
    takes its place. Other nodes of a decomposed activation are left dangling (ORT ignores them)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    chosen = {a["node"]: a["tensor"] for a in report["activations"] if a["action"] == "linearized"}
    found = 0
    for i, node in enumerate(ref.graph.node):
        if node.name in chosen:
            ref.graph.node[i].CopyFrom(helper.make_node("Identity", [chosen[node.name]], [node.output[0]],
                                                        name=node.name))
            found += 1
    assert found == len(chosen), f"report names nodes not in the model: {sorted(chosen)}"
    return ref


def random_feeds(model: onnx.ModelProto, seed: int, sizes: dict[str, int] | None = None,
                 batch: int = 3, samples: bool = False) -> dict[str, np.ndarray]:
    """One array per graph input that is not an initializer: symbolic axis 0 -> ``batch``, other symbols from
    ``sizes``; floats standard normal (in the input's type), bools random. ``samples=True`` makes calibration
    arrays instead: axis 0 (fixed or not) holds ``batch`` samples, and a scalar input gets a 1-D array."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if samples and axis == 0:
                shape.append(batch)
            elif d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(batch if axis == 0 else (sizes or {})[d.dim_param])
        if samples and not shape:
            shape = [batch]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


@dataclass
class Outcome:
    """What one CLI run left: exit code, stderr, the written model (None if nothing) and the report."""

    code: int
    err: str
    model: onnx.ModelProto | None
    report: dict | None
    out_path: Path
    folder_after: set[str] = field(default_factory=set)


def optimize_cli(tmp_path: Path, model: onnx.ModelProto | Path, calib: dict[str, np.ndarray] | None, *args: str,
                 capsys: pytest.CaptureFixture | None = None, name: str = "m") -> Outcome:
    """Save ``model`` (unless it is a path), save ``calib`` as .npz, run ``onnx-easier IN OUT --data ... args``
    in process, and collect what it left."""
    if isinstance(model, Path):
        src = model
    else:
        src = tmp_path / f"{name}.onnx"
        onnx.save(model, str(src))
    out = tmp_path / f"{name}_out.onnx"
    rep = tmp_path / f"{name}_report.json"
    argv = [str(src), str(out), "--report", str(rep), "-q", *args]
    if calib is not None:
        data = tmp_path / f"{name}_calib.npz"
        np.savez(data, **calib)
        argv += ["--data", str(data)]
    code = main(argv)
    err = capsys.readouterr().err if capsys is not None else ""
    written = onnx.load(str(out)) if out.exists() else None
    report = json.loads(rep.read_text()) if rep.exists() else None
    return Outcome(code, err, written, report, out, {p.name for p in tmp_path.iterdir()})


def check_optimized(model: onnx.ModelProto, result: Outcome, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The run succeeded, the output passes the full checker, keeps the input and output names, and equals the
    identity reference (= ``model`` itself when nothing was linearized) on ``feeds``."""
    assert result.code == 0, result.err
    assert result.model is not None and result.report is not None
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert_equivalent(identity_reference(model, result.report), result.model, feeds)
    return result.model


def calib_for(model: onnx.ModelProto, samples: int = 16, sizes: dict[str, int] | None = None,
              seed: int = 1) -> dict[str, np.ndarray]:
    """Calibration arrays: ``samples`` on axis 0 (a scalar input gets a 1-D array)."""
    return random_feeds(model, seed, sizes, batch=samples, samples=True)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (found,) = [n for n in model.graph.node if n.name == name]
    return found


def subgraph_bytes(n: onnx.NodeProto) -> dict[str, bytes]:
    return {a.name: a.g.SerializeToString() for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}


def subgraph_contents(n: onnx.NodeProto) -> dict[str, tuple]:
    """What a body computes, byte for byte: its nodes, initializers, and input/output names and element types
    (not the declared shapes of its inputs/outputs: see test_subgraph_declared_shapes_untouched)."""
    def io(values) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in values]
    return {a.name: ([x.SerializeToString() for x in a.g.node], [t.SerializeToString() for t in a.g.initializer],
                     io(a.g.input), io(a.g.output))
            for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}


MODES = {"exact": ("--remove", "0"), "identity": ("--remove", "2", "--linearize", "identity")}


# ----------------------------------------------------------------------------------------------------------------
# the graphs


def conv_bn_relu(b: Builder, x: str, cin: int, cout: int, act: str = "Relu", **conv_attrs) -> str:
    return b.node(act, b.bn(b.conv(x, cin, cout, **conv_attrs), cout))


def if_model() -> onnx.ModelProto:
    """Main: conv-bn-relu -> t; cond = sum(x) > 0; If(cond) then [conv-bn-relu on t] else [identity of t] -> y;
    conv-bn-relu-conv on t -> z. (cond is computed, not an input: see test_scalar_input.)"""
    then = Builder(seed=5, prefix="then_")
    then.output(then.node("Relu", then.bn(then.conv("t", 4, 4, pads=[1] * 4), 4)), [None, 4, 6, 6])
    other = Builder(prefix="else_")
    other.output(other.node("Identity", "t"), [None, 4, 6, 6])
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    conv_bn_relu(b, x, 3, 4, pads=[1] * 4)
    b.nodes[-1].output[0] = b.nodes[-1].name = "t"
    cond = b.node("Greater", b.node("ReduceSum", x, keepdims=0), b.const(np.array(0.0)))
    b.node("If", cond, out="y", then_branch=then.graph("then"), else_branch=other.graph("else"))
    h = b.node("Relu", b.bn(b.conv("t", 4, 4, k=1), 4))
    b.conv(h, 4, 2, k=1, out="z")
    b.output("y", ["N", 4, 6, 6])
    b.output("z", ["N", 2, 6, 6])
    return b.model()


def loop_model() -> onnx.ModelProto:
    """Main: conv-bn-relu -> h0; Loop 2 times: h <- relu(bn(conv(h))); then a 1x1 conv -> y."""
    body = Builder(seed=7, prefix="body_")
    body.input("body_i", [], np.int64)
    body.input("body_cond", [], np.bool_)
    body.input("body_h", [None, 4, 5, 5])
    body.node("Identity", "body_cond", out="body_cond_out")
    body.output("body_cond_out", [], np.bool_)
    body.output(body.node("Relu", body.bn(body.conv("body_h", 4, 4, pads=[1] * 4), 4)), [None, 4, 5, 5])
    b = Builder()
    x = b.input("x", ["N", 3, 5, 5])
    h0 = conv_bn_relu(b, x, 3, 4, pads=[1] * 4)
    trips = b.const(np.array(2, np.int64))
    go = b.const(np.array(True))
    b.node("Loop", trips, go, h0, out="looped", body=body.graph("body"))
    b.conv(b.node("Relu", b.conv("looped", 4, 4, k=1)), 4, 2, k=1, out="y")
    b.output("y", ["N", 2, 5, 5])
    return b.model()


def scan_model() -> onnx.ModelProto:
    """Main: x[N, T, 6] -> MatMul/Add -> Relu -> MatMul/Add -> u; Scan over T (axis 1): s <- relu(s @ U + u_t);
    outputs the final state (then Gemm-Relu-Gemm) and the sequence of states."""
    body = Builder(seed=9, prefix="scan_")
    body.input("scan_s", ["N", 5])
    body.input("scan_u", ["N", 5])
    pre = body.node("Add", body.node("MatMul", "scan_s", body.weight(5, 5)), "scan_u")
    s2 = body.node("Relu", pre)
    body.node("Identity", s2, out="scan_seq")
    body.output(s2, ["N", 5])
    body.output("scan_seq", ["N", 5])
    b = Builder()
    x = b.input("x", ["N", 4, 6])
    s0 = b.input("s0", ["N", 5])
    h = b.node("Relu", b.node("Add", b.node("MatMul", x, b.weight(6, 8)), b.const(b.rng.standard_normal(8) * .1)))
    u = b.node("Add", b.node("MatMul", h, b.weight(8, 5)), b.const(b.rng.standard_normal(5) * .1))
    b.nodes.append(helper.make_node("Scan", [s0, u], ["final", "seq"], name="scan", num_scan_inputs=1,
                                    scan_input_axes=[1], scan_output_axes=[1], body=body.graph("scan_body")))
    b.gemm(b.node("Relu", b.gemm("final", 5, 5)), 5, 3, out="y")
    b.output("y", ["N", 3])
    b.output("seq", ["N", 4, 5])
    return b.model()


def activation_outputs_model() -> onnx.ModelProto:
    """An activation that is a graph output *and* feeds two convs; another read by a conv and an Add."""
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    a = b.node("Relu", b.bn(b.conv(x, 3, 4, pads=[1] * 4), 4), out="act_out")
    left = b.conv(a, 4, 4, k=1)
    right = b.conv(a, 4, 4, pads=[1] * 4)
    c = b.node("LeakyRelu", b.node("Add", left, right), alpha=0.1)
    b.node("Add", b.conv(c, 4, 4, k=1), c, out="y")
    b.output("act_out", ["N", 4, 6, 6])
    b.output("y", ["N", 4, 6, 6])
    return b.model()


def shared_weights_model() -> onnx.ModelProto:
    """One conv weight read by two convs (each followed by its own BN), one Gemm weight read twice (tied)."""
    b = Builder()
    x = b.input("x", ["N", 4, 5, 5])
    w = b.weight(4, 4, 1, 1)
    h1 = b.bn(b.node("Conv", x, w), 4)
    h2 = b.bn(b.node("Conv", b.node("Relu", h1), w), 4)
    f = b.node("Flatten", b.node("Relu", h2))
    g = b.weight(100, 100)
    b.node("Gemm", b.node("Relu", b.node("Gemm", f, g, transB=1)), g, out="y", transB=1)
    b.output("y", ["N", 100])
    return b.model()


def multi_io_model() -> onnx.ModelProto:
    """Two inputs (image, vector), three outputs; the branches meet in a Concat."""
    b = Builder()
    img = b.input("img", ["N", 3, 6, 6])
    vec = b.input("vec", ["N", 5])
    h = conv_bn_relu(b, img, 3, 4, pads=[1] * 4)
    h = conv_bn_relu(b, h, 4, 4, k=1)
    pooled = b.node("Flatten", b.node("GlobalAveragePool", h))
    v = b.gemm(b.node("Relu", b.gemm(vec, 5, 6)), 6, 4, out="vec_feat")
    both = b.node("Concat", pooled, v, axis=1)
    b.gemm(b.node("Relu", b.gemm(both, 8, 8)), 8, 2, out="logits")
    b.conv(h, 4, 1, k=1, out="mask")
    b.output("logits", ["N", 2])
    b.output("mask", ["N", 1, 6, 6])
    b.output("vec_feat", ["N", 4])
    return b.model()


def conv_transpose_model() -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", ["N", 4, 4, 4])
    h = b.node("ConvTranspose", x, b.weight(4, 3, 3, 3), b.const(b.rng.standard_normal(3) * .1), strides=[2, 2],
               pads=[1, 1, 1, 1], output_padding=[1, 1])
    h = b.node("Relu", b.bn(h, 3))
    h = b.node("ConvTranspose", h, b.weight(3, 2, 2, 2), strides=[2, 2])
    h = b.node("Clip", b.bn(h, 2), b.const(np.array(0.0)), b.const(np.array(6.0)))
    b.conv(h, 2, 2, k=1, out="y")
    b.output("y", ["N", 2, 16, 16])
    return b.model()


def conv1d_model() -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", ["N", 3, 12])
    h = b.node("LeakyRelu", b.bn(b.conv(x, 3, 6, k=3, nd=1, pads=[1, 1]), 6), alpha=0.2)
    h = b.node("Relu", b.bn(b.conv(h, 6, 6, k=3, nd=1, group=3, strides=[2], dilations=[2], pads=[2, 2]), 6))
    b.conv(h, 6, 2, k=1, nd=1, out="y")
    b.output("y", ["N", 2, 6])
    return b.model()


def conv3d_model() -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", ["N", 2, 4, 5, 5])
    h = b.node("Relu", b.bn(b.conv(x, 2, 4, k=3, nd=3, pads=[1] * 6), 4))
    h = b.node("Relu", b.conv(h, 4, 4, k=1, nd=3))
    b.bn(b.conv(h, 4, 3, k=3, nd=3), 3, out="y")
    b.output("y", ["N", 3, 2, 3, 3])
    return b.model()


def constant_nodes_model() -> onnx.ModelProto:
    """Every weight, bias and BN parameter in a Constant node (some as value_float / value_floats)."""
    b = conv_chain_builder()
    for i, t in enumerate(b.inits):
        arr = numpy_helper.to_array(t)
        if arr.ndim == 1 and i % 2:
            b.nodes.insert(0, helper.make_node("Constant", [], [t.name], name=f"const_{t.name}",
                                               value_floats=arr.astype(np.float32).tolist()))
        elif arr.ndim == 0:
            b.nodes.insert(0, helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value_float=float(arr)))
        else:
            b.nodes.insert(0, helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
    b.inits = []
    return b.model()


def conv_chain_builder() -> Builder:
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = conv_bn_relu(b, x, 3, 6, pads=[1] * 4)
    h = b.node("Clip", b.bn(b.conv(h, 6, 6, k=3, group=6, pads=[1] * 4), 6), b.const(np.array(0.0)),
               b.const(np.array(6.0)))
    b.bn(b.conv(h, 6, 4, k=1), 4, out="y")
    b.output("y", ["N", 4, 6, 6])
    return b


def unfused_bn_model() -> onnx.ModelProto:
    """BatchNormalization with no convolution before it: on the input, after a Relu before a padded conv, after
    an Add; and one before a Gemm (through Flatten)."""
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.bn(x, 3)
    h = b.node("Relu", b.conv(h, 3, 4, pads=[1] * 4))
    h = b.conv(b.bn(h, 4), 4, 4, pads=[1] * 4)
    h = b.bn(b.node("Add", h, b.node("Relu", h)), 4)
    b.gemm(b.node("Flatten", b.bn(b.node("Relu", h), 4)), 144, 3, out="y")
    b.output("y", ["N", 3])
    return b.model()


def no_activation_model() -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.bn(b.conv(x, 3, 4), 4)
    h = b.conv(h, 4, 4, k=1)
    b.gemm(b.node("Flatten", h), 64, 2, out="y")
    b.output("y", ["N", 2])
    return b.model()


def identity_only_model() -> onnx.ModelProto:
    b = Builder()
    b.node("Identity", b.input("x", ["N", 3]), out="y")
    b.output("y", ["N", 3])
    return b.model()


def symbolic_hw_model() -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", ["N", 3, "H", "W"])
    h = conv_bn_relu(b, x, 3, 4, pads=[1] * 4)
    h = conv_bn_relu(b, h, 4, 4, k=1)
    h = b.node("Relu", b.conv(b.bn(h, 4), 4, 4, pads=[1] * 4))
    b.conv(h, 4, 2, k=1, out="y")
    b.output("y", ["N", 2, "H", "W"])
    return b.model()


@dataclass(frozen=True)
class Case:
    build: Callable[[], onnx.ModelProto]
    sizes: dict[str, int] = field(default_factory=dict)  # symbolic sizes other than the batch, for calibration
    check_sizes: tuple[dict[str, int], ...] = ({},)  # and for the checks (may differ from calibration)
    batch: int = 3


CASES = {
    "if": Case(if_model),
    "loop": Case(loop_model),
    "scan": Case(scan_model),
    "activation outputs and fan-out": Case(activation_outputs_model),
    "shared weights": Case(shared_weights_model),
    "several inputs and outputs": Case(multi_io_model),
    "conv transpose": Case(conv_transpose_model),
    "conv1d": Case(conv1d_model),
    "conv3d": Case(conv3d_model),
    "constant nodes": Case(constant_nodes_model),
    "unfused batchnorm": Case(unfused_bn_model),
    "no activations": Case(no_activation_model),
    "identity only": Case(identity_only_model),
    "symbolic H, W": Case(symbolic_hw_model, {"H": 7, "W": 5}, ({"H": 7, "W": 5}, {"H": 11, "W": 4}, {"H": 3, "W": 9})),
}


# ----------------------------------------------------------------------------------------------------------------
# every graph, both modes: correct, checker-clean, names kept


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_odd_graph_comes_out_correct(tmp_path: Path, capsys, case: str, mode: str) -> None:
    spec = CASES[case]
    model = spec.build()
    result = optimize_cli(tmp_path, model, calib_for(model, sizes=spec.sizes), *MODES[mode], capsys=capsys)
    out = check_optimized(model, result, random_feeds(model, 11, spec.check_sizes[0], spec.batch))
    for i, sizes in enumerate(spec.check_sizes[1:]):
        assert_equivalent(identity_reference(model, result.report), out, random_feeds(model, 20 + i, sizes, 2))
    if mode == "exact":
        assert all(a["action"] == "kept" for a in result.report["activations"])
    else:
        linearized = [a for a in result.report["activations"] if a["action"] == "linearized"]
        assert len(linearized) == min(2, len(result.report["activations"]))
    assert len(out.graph.node) <= len(model.graph.node) + 1  # at most the Identity of a subgraph-read activation
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "m_calib.npz", "m_out.onnx", "m_report.json"}


# ----------------------------------------------------------------------------------------------------------------
# what each odd part must keep


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case,control", [("if", "If"), ("loop", "Loop"), ("scan", "Scan")])
def test_subgraph_bodies_untouched_main_graph_optimized(tmp_path: Path, capsys, case: str, control: str,
                                                        mode: str) -> None:
    model = CASES[case].build()
    (before,) = [n for n in model.graph.node if n.op_type == control]
    result = optimize_cli(tmp_path, model, calib_for(model), *MODES[mode], capsys=capsys)
    assert result.code == 0, result.err
    (after,) = [n for n in result.model.graph.node if n.op_type == control]
    assert subgraph_contents(after) == subgraph_contents(before)
    reference = identity_reference(model, result.report)
    assert [_source(result.model, t) for t in after.input] == [_source(reference, t) for t in before.input]
    assert list(after.output) == list(before.output)
    assert "BatchNormalization" not in ops(result.model)  # the main graph's BNs were folded
    assert ops(result.model).count("Conv") + ops(result.model).count("MatMul") + ops(result.model).count("Gemm") \
        < ops(model).count("Conv") + ops(model).count("MatMul") + ops(model).count("Gemm") or mode == "exact"
    body_nodes = {n.name for a in before.attribute if a.type == onnx.AttributeProto.GRAPH for n in a.g.node}
    assert not body_nodes & {a["node"] for a in result.report["activations"]}  # never even a candidate


def test_subgraph_declared_shapes_untouched(tmp_path: Path, capsys) -> None:
    model = loop_model()
    result = optimize_cli(tmp_path, model, calib_for(model), *MODES["exact"], capsys=capsys)
    assert result.code == 0, result.err
    (before,) = [n for n in model.graph.node if n.op_type == "Loop"]
    (after,) = [n for n in result.model.graph.node if n.op_type == "Loop"]
    assert subgraph_bytes(after) == subgraph_bytes(before)


def test_if_both_branches(tmp_path: Path, capsys) -> None:
    model = if_model()
    result = optimize_cli(tmp_path, model, calib_for(model), *MODES["identity"], capsys=capsys)
    x = random_feeds(model, 3, batch=2)["x"]
    x -= x.mean()
    for sign in (1.0, -1.0):  # sum(x) > 0, then < 0: both branches
        feeds = {"x": np.float32(sign) * x + np.float32(sign * 1e-3)}
        assert_equivalent(identity_reference(model, result.report), result.model, feeds)
    # t is read inside the then-branch: it must still be written under its name
    assert "t" in {o for n in result.model.graph.node for o in n.output}


def test_inexact_folds_are_refused(tmp_path: Path, capsys) -> None:
    """A BN after a conv whose weight another conv also reads, and a BN before a padded conv (its shift would be
    wrong at the zero-padded border), stay as they are with nothing linearized."""
    shared = shared_weights_model()
    result = optimize_cli(tmp_path, shared, calib_for(shared), *MODES["exact"], capsys=capsys, name="shared")
    out = check_optimized(shared, result, random_feeds(shared, 14))
    assert ops(out).count("BatchNormalization") == 2
    (w,) = {n.input[1] for n in shared.graph.node if n.op_type == "Conv"}
    assert [n.op_type for n in out.graph.node if w in n.input] == ["Conv", "Conv"]

    padded = unfused_bn_model()
    result = optimize_cli(tmp_path, padded, calib_for(padded), *MODES["exact"], capsys=capsys, name="padded")
    out = check_optimized(padded, result, random_feeds(padded, 15))
    first = out.graph.node[0]
    assert (first.op_type, first.input[0]) == ("BatchNormalization", "x")
    assert [n.op_type for n in out.graph.node if first.output[0] in n.input] == ["Conv"]


def overridable_model() -> onnx.ModelProto:
    """conv1's weight and bn1's scale are initializers *and* graph inputs (the user may feed them)."""
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    w = b.const(b.rng.standard_normal((4, 3, 3, 3)) * 0.3, name="w_in")
    h = b.node("Conv", x, w, b.const(np.zeros(4)), pads=[1] * 4)
    scale = b.const(np.linspace(0.5, 1.5, 4), name="scale_in")
    h = b.node("BatchNormalization", h, scale, b.const(np.zeros(4)), b.const(np.full(4, 0.1)), b.const(np.ones(4)))
    h = b.node("Relu", h)
    h = b.node("Relu", b.bn(b.conv(h, 4, 4, k=1), 4))
    b.conv(h, 4, 2, k=1, out="y")
    b.input("w_in", [4, 3, 3, 3])
    b.input("scale_in", [4])
    b.output("y", ["N", 2, 6, 6])
    return b.model()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_initializers_that_are_inputs_stay_inputs(tmp_path: Path, capsys, mode: str) -> None:
    model = overridable_model()
    result = optimize_cli(tmp_path, model, calib_for(model), *MODES[mode], capsys=capsys)
    out = check_optimized(model, result, random_feeds(model, 4))
    for name in ("w_in", "scale_in"):
        assert name in {i.name for i in out.graph.input}
        (orig,) = [t for t in model.graph.initializer if t.name == name]
        (kept,) = [t for t in out.graph.initializer if t.name == name]
        assert kept.SerializeToString() == orig.SerializeToString()
    ref = identity_reference(model, result.report)
    feeds = random_feeds(model, 4)
    fed = feeds | {"w_in": np.full((4, 3, 3, 3), 0.05, np.float32), "scale_in": np.array([2, -1, 0.5, 3], np.float32)}
    assert_equivalent(ref, out, fed)
    assert not np.allclose(run(ref, fed)["y"], run(ref, feeds)["y"])  # feeding them does change the output


def qdq_model() -> onnx.ModelProto:
    """Float conv-bn-relu, then an int8 QDQ region (Q/DQ on activations, DQ of int8 weights and int32 bias around
    a Conv, with a BN inside the region), then float conv-bn again."""
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = conv_bn_relu(b, x, 3, 4, pads=[1] * 4)
    xs, xz = b.const(np.array(0.05)), b.const(np.array(0, np.int8))
    q = b.node("QuantizeLinear", h, xs, xz, out="q_in")
    dq = b.node("DequantizeLinear", q, xs, xz, out="dq_in")
    w_int = b.const(b.rng.integers(-60, 60, (4, 4, 3, 3)).astype(np.int8))
    ws = b.const(np.array([0.01, 0.02, 0.015, 0.012]))
    w_dq = b.node("DequantizeLinear", w_int, ws, b.const(np.zeros(4, np.int8)), axis=0, out="dq_w")
    bias_int = b.const(b.rng.integers(-200, 200, 4).astype(np.int32))
    bias_dq = b.node("DequantizeLinear", bias_int, b.const(np.array([0.0005, 0.001, 0.00075, 0.0006])),
                     b.const(np.zeros(4, np.int32)), axis=0, out="dq_b")
    c = b.node("Conv", dq, w_dq, bias_dq, pads=[1] * 4, out="qconv")
    c = b.bn(c, 4, out="qbn")
    ys, yz = b.const(np.array(0.04)), b.const(np.array(0, np.int8))
    dq2 = b.node("DequantizeLinear", b.node("QuantizeLinear", c, ys, yz, out="q_out"), ys, yz, out="dq_out")
    h = b.node("Relu", dq2)
    b.bn(b.conv(h, 4, 2, k=1), 2, out="y")
    b.output("y", ["N", 2, 6, 6])
    return b.model()


def _source(model: onnx.ModelProto, tensor: str) -> tuple:
    """Where ``tensor`` comes from, seen through Identity nodes: ("const", dtype, shape, bytes) for an initializer,
    else ("tensor", name)."""
    writers = {o: n for n in model.graph.node for o in n.output}
    while tensor in writers and writers[tensor].op_type == "Identity":
        tensor = writers[tensor].input[0]
    for t in model.graph.initializer:
        if t.name == tensor:
            arr = numpy_helper.to_array(t)
            return ("const", arr.dtype.str, arr.shape, arr.tobytes())
    return ("tensor", tensor)


def assert_nodes_kept(reference: onnx.ModelProto, out: onnx.ModelProto, names: list[str]) -> None:
    """Each named node of ``reference`` is in ``out`` with the same op, domain and attributes, reading the same
    tensors or constants of the same values (a merged constant may be renamed; an Identity may be bypassed)."""
    for name in names:
        want, got = node(reference, name), node(out, name)
        assert (got.op_type, got.domain, list(got.output)) == (want.op_type, want.domain, list(want.output)), name
        assert [a.SerializeToString() for a in got.attribute] == [a.SerializeToString() for a in want.attribute]
        assert [_source(out, t) for t in got.input] == [_source(reference, t) for t in want.input], name


@pytest.mark.parametrize("mode", sorted(MODES))
def test_qdq_region_untouched(tmp_path: Path, capsys, mode: str) -> None:
    model = qdq_model()
    result = optimize_cli(tmp_path, model, calib_for(model), *MODES[mode], capsys=capsys)
    out = check_optimized(model, result, random_feeds(model, 5))
    region = ["q_in", "dq_in", "dq_w", "dq_b", "qconv", "qbn", "q_out", "dq_out"]
    assert_nodes_kept(identity_reference(model, result.report), out, region)
    assert ops(out).count("BatchNormalization") == 1  # only the one inside the region is left
    assert ops(out).count("QuantizeLinear") == 2 and ops(out).count("DequantizeLinear") == 4


def test_custom_domain_op_is_left_alone(tmp_path: Path, capsys) -> None:
    """com.microsoft Gelu (an op ORT runs) is no activation of ours: never linearized, never fused through."""
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Gelu", b.bn(b.conv(x, 3, 4, k=1), 4), domain="com.microsoft", out="ms_gelu")
    h = b.node("Relu", b.conv(h, 4, 4, k=1))
    b.conv(h, 4, 2, k=1, out="y")
    b.output("y", ["N", 2, 6, 6])
    model = b.model(extra_opsets=(("com.microsoft", 1),))
    result = optimize_cli(tmp_path, model, calib_for(model), "--remove", "5", "--linearize", "identity",
                          capsys=capsys)
    out = check_optimized(model, result, random_feeds(model, 6))
    relu = next(n.name for n in model.graph.node if n.op_type == "Relu")
    assert [a["node"] for a in result.report["activations"]] == [relu]
    gelu = node(out, "ms_gelu")
    assert gelu.domain == "com.microsoft" and ops(out).count("Conv") == 2  # relu gone: conv-conv fused, not Gelu


@pytest.mark.parametrize("mode", sorted(MODES))
def test_external_data_model(tmp_path: Path, capsys, mode: str) -> None:
    model = conv_chain_builder().model()
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    copy = onnx.ModelProto.FromString(model.SerializeToString())  # save_model moves the tensors out in place
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.weights", size_threshold=0)
    assert (folder / "m.weights").stat().st_size > 0
    stripped = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stripped.graph.initializer)
    result = optimize_cli(tmp_path, path, calib_for(model), *MODES[mode], capsys=capsys)
    check_optimized(model, result, random_feeds(model, 7))
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.weights"]  # the input is left as it was


def float16_model() -> onnx.ModelProto:
    b = conv_chain_builder()
    half = Builder(np.float16)
    half.nodes, half.inputs, half.outputs = b.nodes, [], []
    half.inits = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name) for t in b.inits]
    half.input("x", ["N", 3, 6, 6])
    half.output("y", ["N", 4, 6, 6])
    return half.model()


def test_float16_model(tmp_path: Path, capsys) -> None:
    """A float16 model, exact fusions only: it must come out optimized (compared within float16 rounding of the
    output: the fused weights are rounded to float16 once) or untouched, not refused."""
    model = float16_model()
    feeds = random_feeds(model, 8)
    result = optimize_cli(tmp_path, model, calib_for(model), "--remove", "0", capsys=capsys)
    if result.code == 0:
        onnx.checker.check_model(result.model, full_check=True)
        want = run(model, feeds)["y"].astype(np.float64)
        got = run(result.model, feeds)["y"].astype(np.float64)
        assert run(result.model, feeds)["y"].dtype == np.float16
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * np.finfo(np.float16).eps * max(1, np.abs(want).max()))
    else:
        pytest.fail(f"a valid fp16 model must be optimized or left untouched, not refused: {result.err}")


def bfloat16_model(bf16_input: bool) -> onnx.ModelProto:
    """conv-bn-relu-conv computed in bfloat16; the input is bfloat16 or float32 cast to bfloat16."""
    b = conv_chain_builder()
    bf = Builder(ml_dtypes.bfloat16)
    bf.inits = [numpy_helper.from_array(numpy_helper.to_array(t).astype(ml_dtypes.bfloat16), t.name)
                for t in b.inits]
    bf.nodes = list(b.nodes)
    if bf16_input:
        bf.input("x", ["N", 3, 6, 6])
        bf.output("y", ["N", 4, 6, 6])
    else:
        bf.input("x32", ["N", 3, 6, 6], np.float32)
        bf.nodes.insert(0, helper.make_node("Cast", ["x32"], ["x"], name="to_bf16", to=TensorProto.BFLOAT16))
        bf.nodes.append(helper.make_node("Cast", ["y"], ["y32"], name="to_f32", to=TensorProto.FLOAT))
        bf.output("y32", ["N", 4, 6, 6], np.float32)
    model = helper.make_model(bf.graph(), opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def ort_runs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    try:
        run(model, feeds)
    except Exception:  # noqa: BLE001 - any refusal by ORT (invalid graph, missing kernel) means "cannot run"
        return False
    return True


@pytest.mark.parametrize("bf16_input", [
    False, True], ids=["float32 input", "bfloat16 input"])
def test_bfloat16_model_fails_cleanly_or_comes_out_correct(tmp_path: Path, capsys, bf16_input: bool) -> None:
    model = bfloat16_model(bf16_input)
    name = model.graph.input[0].name
    feeds = {name: np.random.default_rng(9).standard_normal((2, 3, 6, 6)).astype(
        ml_dtypes.bfloat16 if bf16_input else np.float32)}
    calib = {name: np.random.default_rng(1).standard_normal((8, 3, 6, 6)).astype(np.float32)}
    onnx.save(model, str(tmp_path / "m.onnx"))
    before = {p.name for p in tmp_path.iterdir()}
    result = optimize_cli(tmp_path, tmp_path / "m.onnx", calib, "--remove", "0", capsys=capsys)
    if ort_runs(model, feeds):
        check_optimized(model, result, feeds)
    else:
        assert result.code == 2, result.err
        assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1, result.err
        assert result.err.startswith("onnx-easier: error:")
        assert result.folder_after == before | {"m_calib.npz"}  # no output, no report, no temporaries


def test_symbolic_sizes_from_input_shape_and_random_data(tmp_path: Path, capsys) -> None:
    """Without --data, --input-shape fixes H, W for calibration only; the model stays symbolic and correct at
    other sizes."""
    model = symbolic_hw_model()
    result = optimize_cli(tmp_path, model, None, "--input-shape", "x:2,3,9,6", "--samples", "8",
                          *MODES["identity"], capsys=capsys)
    out = check_optimized(model, result, random_feeds(model, 12, {"H": 9, "W": 6}))
    dims = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert_equivalent(identity_reference(model, result.report), out, random_feeds(model, 13, {"H": 5, "W": 13}))


# ----------------------------------------------------------------------------------------------------------------
# known bugs in other modules (minimal reproductions; strict: they fail loudly once fixed)


def _gemm_times(second: str, shape: list) -> onnx.ModelProto:
    """y = Gemm(x) * s, with ``s`` a second input of ``shape``."""
    b = Builder()
    x = b.input("x", ["N", 3])
    b.input(second, shape)
    b.node("Mul", b.gemm(x, 3, 3), second, out="y")
    b.output("y", ["N", 3])
    return b.model()


def test_scalar_input(tmp_path: Path, capsys) -> None:
    model = _gemm_times("s", [])
    calib = {"x": np.ones((4, 3), np.float32), "s": np.ones(4, np.float32)}
    result = optimize_cli(tmp_path, model, calib, "--remove", "0", capsys=capsys)
    check_optimized(model, result, {"x": np.ones((2, 3), np.float32), "s": np.array(2.0, np.float32)})


def test_fixed_batch_on_second_input(tmp_path: Path, capsys) -> None:
    model = _gemm_times("s", [1, 1])
    calib = {"x": np.ones((4, 3), np.float32), "s": np.ones((4, 1), np.float32)}
    result = optimize_cli(tmp_path, model, calib, "--remove", "0", capsys=capsys)
    check_optimized(model, result, {"x": np.ones((1, 3), np.float32), "s": np.full((1, 1), 2.0, np.float32)})


def _zipmap_model(activation: bool) -> onnx.ModelProto:
    """x -> Gemm [-> Relu] -> Gemm -> y, and ZipMap(y) -> probs of type seq(map(int64, float))."""
    b = Builder()
    h = b.gemm(b.input("x", ["N", 3]), 3, 4)
    if activation:
        h = b.node("Relu", h)
    b.node("ZipMap", b.gemm(h, 4, 2, out="y"), out="probs", domain="ai.onnx.ml", classlabels_int64s=[0, 1])
    b.output("y", ["N", 2])
    value = helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    b.outputs.append(helper.make_value_info("probs", helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, value))))
    return b.model(extra_opsets=(("ai.onnx.ml", 1),))


@pytest.mark.parametrize("activation", [True, False], ids=["with activation", "without"])
def test_map_output(tmp_path: Path, capsys, activation: bool) -> None:
    model = _zipmap_model(activation)
    session(model).run(None, {"x": np.ones((2, 3), np.float32)})  # ORT runs it
    result = optimize_cli(tmp_path, model, {"x": np.ones((8, 3), np.float32)}, "--remove", "0", capsys=capsys)
    assert result.code == 0, result.err
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.graph.output[1].type == model.graph.output[1].type
