"""Property-based tests of the whole optimizer on random chains of Conv / Gemm / BN / residual Add / affine /
activations (Relu, Clip, LeakyRelu, PRelu, HardSigmoid, HardSwish, Gelu as op or decomposed, SiLU decomposed) with
random shapes, strides, groups, paddings and dilations, 1-d to 3-d, static or symbolic spatial sizes.

Two properties, each checked in ORT with optimizations off (``rtol=1e-4, atol=1e-5``) on samples calibration never
saw:

- ``optimize(remove=0)`` is numerically equivalent to its input;
- ``optimize(remove=K, linearize_mode="identity")`` equals a reference built here: the K activations of lowest
  EASIER entropy, *computed here* from the pre-activations ORT gives on the calibration data (fraction of
  ``x >= 0`` per channel, mean binary entropy in bits; ties in graph order), each replaced by an Identity. The
  report must have linearized exactly those K, and report the entropies computed here.

The default run is bounded and derandomized; ``tools/property_long.py`` runs the same properties with many more
examples.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_odd_graphs import ATOL, RTOL, assert_equivalent, identity_reference, session

from onnx_easier import optimize

ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Gelu", "GeluErf", "SiLU")
CALIB_SAMPLES = 12
DEFAULT_EXAMPLES = 40


# ----------------------------------------------------------------------------------------------------------------
# the random chains


@dataclass(frozen=True)
class Layer:
    """One element of the chain; ``params`` are what ``build`` needs, drawn once so examples print readably."""

    kind: str  # conv, bn, act, affine, residual, gemm
    params: tuple = ()


@dataclass(frozen=True)
class Chain:
    nd: int
    channels: int
    size: tuple[int, ...]
    symbolic: bool
    opset: int
    layers: tuple[Layer, ...]
    tail: str  # "none", "gap", "flatten"
    tail_layers: tuple[Layer, ...] = ()
    seed: int = 0


def _out_size(size: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


@st.composite
def convs(draw, cin: int, size: tuple[int, ...]) -> tuple[Layer, int, tuple[int, ...]]:
    """A Conv with random cout, kernel, stride, dilation, per-side pads and groups that keeps every size >= 1."""
    nd = len(size)
    cout = draw(st.integers(1, 6), label="cout")
    common = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
    group = draw(st.sampled_from(common), label="group")
    k = draw(st.integers(1, 3), label="k")
    stride = draw(st.integers(1, 2), label="stride")
    dil = draw(st.integers(1, 2), label="dilation") if k > 1 else 1
    pads = [draw(st.integers(0, dil * (k - 1)), label="pad") for _ in range(2 * nd)]
    out = tuple(_out_size(s, k, stride, dil, pads[i], pads[i + nd]) for i, s in enumerate(size))
    if min(out) < 1:  # too small for this kernel: a 1x1 conv instead
        k, stride, dil, pads, out = 1, 1, 1, [0] * (2 * nd), size
    bias = draw(st.booleans(), label="bias")
    return Layer("conv", (cout, group, k, stride, dil, tuple(pads), bias)), cout, out


@st.composite
def activations(draw) -> Layer:
    kind = draw(st.sampled_from(ACTIVATIONS), label="activation")
    if kind == "Clip":
        return Layer("act", (kind, draw(st.sampled_from([-1.0, 0.0])), draw(st.sampled_from([1.0, 6.0]))))
    if kind == "LeakyRelu":
        return Layer("act", (kind, draw(st.sampled_from([0.01, 0.1, 0.3]))))
    if kind == "Gelu":
        return Layer("act", (kind, draw(st.sampled_from(["none", "tanh"]))))
    return Layer("act", (kind,))


@st.composite
def chains(draw, max_blocks: int = 4) -> Chain:
    """1 to ``max_blocks`` blocks of one or two linear layers (conv, BN, affine, residual) each followed, most of
    the time, by an activation; then no tail, or GlobalAveragePool/Flatten and Gemms with activations."""
    nd = draw(st.sampled_from([1, 2, 2, 3]), label="nd")
    c = draw(st.integers(1, 4), label="channels")
    top = 4 if nd == 3 else 8
    size = tuple(draw(st.integers(3, top), label="size") for _ in range(nd))
    c0, size0 = c, size
    layers = []
    for _ in range(draw(st.integers(1, max_blocks), label="blocks")):
        for _ in range(draw(st.integers(1, 2), label="linear layers")):
            kind = draw(st.sampled_from(["conv", "conv", "bn", "affine", "residual"]), label="kind")
            if kind == "conv":
                layer, c, size = draw(convs(c, size))
            elif kind == "residual":  # x + conv_same(act(conv_same(x))), the inner act optional
                k = draw(st.sampled_from([1, 3]), label="residual k")
                inner = draw(st.one_of(st.none(), activations()), label="residual act")
                layer = Layer("residual", (k, inner))
            else:
                layer = Layer(kind)
            layers.append(layer)
        if draw(st.integers(0, 4), label="activation?") > 0:
            layers.append(draw(activations()))
    tail = draw(st.sampled_from(["none", "gap", "flatten"]), label="tail")
    tail_layers: list[Layer] = []
    if tail != "none":
        for _ in range(draw(st.integers(1, 3), label="gemms")):
            tail_layers.append(Layer("gemm", (draw(st.integers(1, 6), label="features"),)))
            if draw(st.booleans(), label="gemm act"):
                tail_layers.append(draw(activations()))
    symbolic = tail != "flatten" and draw(st.booleans(), label="symbolic")
    opset = draw(st.sampled_from([17, 20]), label="opset")
    seed = draw(st.integers(0, 2**16), label="seed")
    return Chain(nd, c0, size0, symbolic, opset, tuple(layers), tail, tuple(tail_layers), seed)


class _Writer:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.layer_seen = False  # a Conv/BN/Gemm is upstream: the channel axis is known
        self.axes: dict[str, int] = {}  # pre-activation tensor -> its channel axis

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, arr: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def node(self, op: str, *inputs: str, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


def _conv(w: _Writer, x: str, cin: int, params: tuple, nd: int) -> str:
    cout, group, k, stride, dil, pads, bias = params
    fan_in = cin // group * k**nd
    ins = [x, w.const(w.rng.standard_normal((cout, cin // group) + (k,) * nd) / math.sqrt(fan_in))]
    if bias:
        ins.append(w.const(w.rng.standard_normal(cout) * 0.2))
    return w.node("Conv", *ins, group=group, kernel_shape=[k] * nd, strides=[stride] * nd, dilations=[dil] * nd,
                  pads=list(pads))


def _activation(w: _Writer, x: str, layer: Layer, c: int, rank: int, opset: int) -> str:
    # the channel axis as the README defines it: 1 after a Conv/BN and for 2-D tensors; with no layer upstream
    # of a higher-rank tensor the layout is unknown and the last axis counts
    w.axes[x] = 1 if w.layer_seen or rank == 2 else -1
    kind = layer.params[0]
    if kind == "Clip":
        return w.node("Clip", x, w.const(np.array(layer.params[1])), w.const(np.array(layer.params[2])))
    if kind == "LeakyRelu":
        return w.node("LeakyRelu", x, alpha=layer.params[1])
    if kind == "PRelu":
        slope = w.rng.uniform(0.05, 0.4, (c,) + (1,) * (rank - 2)) if rank > 2 else w.rng.uniform(0.05, 0.4, c)
        return w.node("PRelu", x, w.const(slope))
    if kind == "Gelu" and opset >= 20:
        return w.node("Gelu", x, approximate=layer.params[1])
    if kind in ("Gelu", "GeluErf"):  # x * 0.5 * (1 + erf(x / sqrt(2))), as the legacy exporter writes it
        e = w.node("Erf", w.node("Div", x, w.const(np.array(math.sqrt(2.0)))))
        return w.node("Mul", w.node("Mul", x, w.node("Add", e, w.const(np.array(1.0)))), w.const(np.array(0.5)))
    if kind == "SiLU":
        return w.node("Mul", x, w.node("Sigmoid", x))
    return w.node(kind, x)


def build(chain: Chain) -> onnx.ModelProto:
    """The model a Chain describes: input x [N, C, *size] (size symbolic when asked), output y."""
    return build_with_axes(chain)[0]


def build_with_axes(chain: Chain) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``build``, and the channel axis of each pre-activation tensor."""
    w = _Writer(chain.seed)
    nd, c, h = chain.nd, chain.channels, "x"
    rank = nd + 2
    for layer in chain.layers:
        w.layer_seen |= layer.kind in ("conv", "bn")
        if layer.kind == "conv":
            h = _conv(w, h, c, layer.params, nd)
            c = layer.params[0]
        elif layer.kind == "bn":
            r = w.rng
            h = w.node("BatchNormalization", h, w.const(r.uniform(0.5, 1.5, c)), w.const(r.normal(0, .3, c)),
                       w.const(r.normal(0, .3, c)), w.const(r.uniform(0.5, 1.5, c)), epsilon=1e-5)
        elif layer.kind == "affine":
            shape = (c,) + (1,) * nd
            h = w.node("Add", w.node("Mul", h, w.const(w.rng.uniform(0.5, 1.5, shape))),
                       w.const(w.rng.normal(0, .3, shape)))
        elif layer.kind == "act":
            h = _activation(w, h, layer, c, rank, chain.opset)
        else:
            k, inner = layer.params
            same = (c, 1, k, 1, 1, (k // 2,) * (2 * nd), True)
            branch = _conv(w, h, c, same, nd)
            w.layer_seen = True
            if inner is not None:
                branch = _activation(w, branch, inner, c, rank, chain.opset)
            h = w.node("Add", h, _conv(w, branch, c, same, nd))
    if chain.tail != "none":
        h = w.node("Flatten", w.node("GlobalAveragePool", h) if chain.tail == "gap" else h)
        features = c if chain.tail == "gap" else c * _spatial(chain)
        rank = 2
        for layer in chain.tail_layers:
            if layer.kind == "gemm":
                (out,) = layer.params
                h = w.node("Gemm", h, w.const(w.rng.standard_normal((out, features)) / math.sqrt(features)),
                           w.const(w.rng.normal(0, .2, out)), transB=1)
                features = c = out
            else:
                h = _activation(w, h, layer, c, rank, chain.opset)
    w.nodes[-1].output[0] = "y"  # the last node's output: nothing else reads it
    dims = ["N", chain.channels] + ([f"S{i}" for i in range(nd)] if chain.symbolic else list(chain.size))
    graph = helper.make_graph(w.nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", chain.opset)])
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model, w.axes


def _spatial(chain: Chain) -> int:
    size = chain.size
    for layer in chain.layers:
        if layer.kind == "conv":
            _, _, k, s, d, pads, _ = layer.params
            size = tuple(_out_size(v, k, s, d, pads[i], pads[i + len(size)]) for i, v in enumerate(size))
    return int(np.prod(size))


def inputs(chain: Chain, samples: int, seed: int, grow: int = 0) -> dict[str, np.ndarray]:
    """``samples`` inputs; ``grow`` > 0 enlarges symbolic spatial sizes (output sizes only grow with them)."""
    size = tuple(s + grow for s in chain.size) if chain.symbolic else chain.size
    x = np.random.default_rng(seed).standard_normal((samples, chain.channels) + size).astype(np.float32)
    return {"x": x}


# ----------------------------------------------------------------------------------------------------------------
# the independent reference: entropies from the pre-activations, K lowest, Identity swapped in


def easier_entropy(x: np.ndarray, axis: int) -> float:
    """Mean over channels (``axis``) of the binary entropy (bits) of the fraction of ``x >= 0``."""
    moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    p = (moved >= 0).mean(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return float(np.nan_to_num(h, nan=0.0).mean())


def pre_activation_entropies(model: onnx.ModelProto, axes: dict[str, int], tensors: list[str],
                             data: dict[str, np.ndarray]) -> list[float]:
    """EASIER entropy of each tensor of ``tensors`` on ``data``, by exposing them as outputs of a copy of model."""
    if not tensors:
        return []
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    values = session(exposed).run(tensors, data)
    return [easier_entropy(v, axes[t]) for t, v in zip(tensors, values)]


def lowest(entropies: list[float], k: int) -> list[int]:
    """Indices of the k lowest entropies, ties in order (a stable sort)."""
    return sorted(range(len(entropies)), key=lambda i: entropies[i])[:k]


# ----------------------------------------------------------------------------------------------------------------
# the properties (also run by tools/property_long.py)


def _data_file(folder: str, data: dict[str, np.ndarray]) -> str:
    path = str(Path(folder) / "calib.npz")
    np.savez(path, **data)
    return path


def check_exact(chain: Chain) -> None:
    """remove=0: the optimized model computes what the input computes."""
    model = build(chain)
    calib = inputs(chain, CALIB_SAMPLES, 1)
    with tempfile.TemporaryDirectory() as folder:
        result = optimize(model, _data_file(folder, calib), remove=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert all(a["action"] == "kept" for a in result.report["activations"])
    assert_equivalent(model, result.model, inputs(chain, 3, 2), RTOL, ATOL)
    if chain.symbolic:
        assert_equivalent(model, result.model, inputs(chain, 2, 3, grow=3), RTOL, ATOL)
    assert len(result.model.graph.node) <= len(model.graph.node)


def check_identity(chain: Chain, k: int) -> None:
    """remove=k, identity: the report linearized the k lowest-entropy activations (entropies recomputed here) and
    the optimized model equals the input with an Identity in place of each."""
    model, axes = build_with_axes(chain)
    calib = inputs(chain, CALIB_SAMPLES, 1)
    with tempfile.TemporaryDirectory() as folder:
        result = optimize(model, _data_file(folder, calib), remove=k, linearize_mode="identity")
    onnx.checker.check_model(result.model, full_check=True)
    acts = result.report["activations"]
    assert sorted(a["tensor"] for a in acts) == sorted(axes)  # every activation written is found, nothing else
    ours = pre_activation_entropies(model, axes, [a["tensor"] for a in acts], calib)
    np.testing.assert_allclose([a["entropy"] for a in acts], ours, rtol=0, atol=1e-9)
    expected = {acts[i]["node"] for i in lowest(ours, k)}
    chosen = {a["node"] for a in acts if a["action"] == "linearized"}
    if chosen != expected:  # only a tie within float noise may choose differently
        border = sorted(ours)[min(k, len(ours)) - 1]
        assert all(abs(ours[i] - border) < 1e-9 for i, a in enumerate(acts) if a["node"] in chosen ^ expected)
    reference = identity_reference(model, result.report)
    assert_equivalent(reference, result.model, inputs(chain, 3, 2), RTOL, ATOL)
    if chain.symbolic:
        assert_equivalent(reference, result.model, inputs(chain, 2, 3, grow=3), RTOL, ATOL)
    assert result.report["after"]["activations"] == len(acts) - min(k, len(acts))


def property_settings(examples: int, derandomize: bool = True) -> settings:
    return settings(max_examples=examples, derandomize=derandomize, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@property_settings(DEFAULT_EXAMPLES)
@given(chains())
def test_exact_fusions_keep_the_output(chain: Chain) -> None:
    check_exact(chain)


@property_settings(DEFAULT_EXAMPLES)
@given(chains(), st.integers(1, 8))
def test_identity_linearization_equals_the_reference(chain: Chain, k: int) -> None:
    check_identity(chain, k)


def test_builder_covers_every_kind() -> None:
    """The strategy's building blocks all build valid models that ORT runs (a fixed chain with each of them)."""
    layers = [Layer("conv", (4, 2, 3, 2, 2, (2, 1, 0, 2), True)), Layer("bn"), Layer("affine"),
              Layer("residual", (3, Layer("act", ("Relu",))))]
    layers += [Layer("act", p) for p in [("Relu",), ("Clip", 0.0, 6.0), ("LeakyRelu", 0.1), ("PRelu",),
                                         ("HardSigmoid",), ("HardSwish",), ("Gelu", "tanh"), ("GeluErf",),
                                         ("SiLU",)]]
    for opset, tail in ((17, "gap"), (20, "flatten")):
        chain = Chain(2, 2, (7, 6), False, opset, tuple(layers), tail,
                      (Layer("gemm", (5,)), Layer("act", ("Relu",)), Layer("gemm", (3,))), seed=1)
        model = build(chain)
        out = session(model).run(None, inputs(chain, 2, 0))[0]
        assert out.shape == (2, 3) and np.isfinite(out).all()
        check_identity(chain, 4)
