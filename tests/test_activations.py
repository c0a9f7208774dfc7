"""Recognising activations: every spelling on a tiny hand-built graph, refusals, channel axes, names, torch exports.

``SPELLINGS`` (hand-built ONNX spellings of each activation) is reused by test_linearize.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch_models import ACTIVATION_CASES, CHANNELS, LinearAct, MixedNet, export

from onnx_easier.activations import (
    Activation,
    activation_numpy,
    ensure_node_names,
    find_activations,
)
from onnx_easier.model_io import make_session, to_graph
from onnx_easier.shapes import infer_shapes

F32 = TensorProto.FLOAT
C = 4  # channels of the tensor h that every spelling reads


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, **attrs)


# ----------------------------------------------------------------------------------------------------------------------
# Spellings: each builder writes y = act(h) with nodes named by the model builder (never used for matching)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Spelling:
    build: Callable[[str, str], tuple[list[onnx.NodeProto], list[onnx.TensorProto]]]
    op: str
    spelling: str
    params: dict = field(default_factory=dict)
    opset: int = 17


def _hswish_core(h: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """c = Clip(h + 3, 0, 6)"""
    return ([node("Add", [h, "three"], ["hs_a"]), node("Clip", ["hs_a", "zero", "six"], ["hs_c"])],
            [const("three", 3.0), const("zero", 0.0), const("six", 6.0)])


def _hswish_div_after(h, y):
    nodes, inits = _hswish_core(h)
    return nodes + [node("Mul", [h, "hs_c"], ["hs_m"]), node("Div", ["hs_m", "six"], [y])], inits


def _hswish_mul_sixth_swapped(h, y):
    nodes, inits = _hswish_core(h)
    return nodes + [node("Mul", ["hs_c", h], ["hs_m"]), node("Mul", ["sixth", "hs_m"], [y])], inits + [
        const("sixth", 1 / 6)]


def _hswish_div_before(h, y):
    nodes, inits = _hswish_core(h)
    return nodes + [node("Div", ["hs_c", "six"], ["hs_d"]), node("Mul", ["hs_d", h], [y])], inits


def _hswish_clip_unit(h, y):
    """x * Clip(x / 6 + 1/2, 0, 1) (a HardSigmoid written out)"""
    return ([node("Mul", [h, "sixth"], ["hu_s"]), node("Add", ["hu_s", "half"], ["hu_a"]),
             node("Clip", ["hu_a", "zero", "one"], ["hu_c"]), node("Mul", [h, "hu_c"], [y])],
            [const("sixth", 1 / 6), const("half", 0.5), const("zero", 0.0), const("one", 1.0)])


def _hswish_hardsigmoid(h, y):
    return [node("HardSigmoid", [h], ["hsg"], alpha=1 / 6, beta=0.5), node("Mul", [h, "hsg"], [y])], []


def _gelu_erf_legacy(h, y):
    """torch legacy exporter: x * (erf(x / sqrt2) + 1) * 0.5"""
    return ([node("Div", [h, "sqrt2"], ["ge_d"]), node("Erf", ["ge_d"], ["ge_e"]),
             node("Add", ["ge_e", "one"], ["ge_a"]), node("Mul", [h, "ge_a"], ["ge_m"]),
             node("Mul", ["ge_m", "half"], [y])],
            [const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5)])


def _gelu_erf_dynamo(h, y):
    """torch dynamo / onnxscript: x * (0.5 * (erf(x / sqrt2) + 1))"""
    return ([node("Div", [h, "sqrt2"], ["ge_d"]), node("Erf", ["ge_d"], ["ge_e"]),
             node("Add", ["ge_e", "one"], ["ge_a"]), node("Mul", ["half", "ge_a"], ["ge_m"]),
             node("Mul", [h, "ge_m"], [y])],
            [const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5)])


def _gelu_erf_mul(h, y):
    """0.5 * x * (1 + erf(x * 0.7071))"""
    return ([node("Mul", [h, "rsqrt2"], ["ge_d"]), node("Erf", ["ge_d"], ["ge_e"]),
             node("Add", ["one", "ge_e"], ["ge_a"]), node("Mul", ["half", h], ["ge_m"]),
             node("Mul", ["ge_m", "ge_a"], [y])],
            [const("rsqrt2", 0.70710678), const("one", 1.0), const("half", 0.5)])


def _gelu_tanh_legacy(h, y):
    """torch legacy exporter: 0.5 * (x * (1 + tanh(k * (x + 0.044715 * (x * (x * x))))))"""
    return ([node("Mul", [h, h], ["gt_sq"]), node("Mul", [h, "gt_sq"], ["gt_cu"]),
             node("Mul", ["kappa", "gt_cu"], ["gt_kc"]), node("Add", [h, "gt_kc"], ["gt_in"]),
             node("Mul", ["k", "gt_in"], ["gt_z"]), node("Tanh", ["gt_z"], ["gt_t"]),
             node("Add", ["one", "gt_t"], ["gt_a"]), node("Mul", [h, "gt_a"], ["gt_m"]),
             node("Mul", ["half", "gt_m"], [y])],
            [const("kappa", 0.044715), const("k", math.sqrt(2 / math.pi)), const("one", 1.0), const("half", 0.5)])


def _gelu_tanh_pow(h, y):
    """torch dynamo / onnxscript: x * (0.5 * (tanh(k * (x + 0.044715 * x^3)) + 1)) with Pow"""
    return ([node("Pow", [h, "three"], ["gt_cu"]), node("Mul", ["kappa", "gt_cu"], ["gt_kc"]),
             node("Add", [h, "gt_kc"], ["gt_in"]), node("Mul", ["k", "gt_in"], ["gt_z"]),
             node("Tanh", ["gt_z"], ["gt_t"]), node("Add", ["gt_t", "one"], ["gt_a"]),
             node("Mul", ["half", "gt_a"], ["gt_m"]), node("Mul", [h, "gt_m"], [y])],
            [const("three", 3.0), const("kappa", 0.044715), const("k", 0.7978846), const("one", 1.0),
             const("half", 0.5)])


def _gelu_erf_expanded(h, y):
    """0.5 * x + (x * 0.5) * erf(x / sqrt2): the product distributed over the sum (an Add as the last node)"""
    return ([node("Mul", [h, "half"], ["ge_hx"]), node("Div", [h, "sqrt2"], ["ge_d"]), node("Erf", ["ge_d"], ["ge_e"]),
             node("Mul", ["half", h], ["ge_hx2"]), node("Mul", ["ge_hx2", "ge_e"], ["ge_m"]),
             node("Add", ["ge_hx", "ge_m"], [y])],
            [const("sqrt2", math.sqrt(2)), const("half", 0.5)])


SPELLINGS: dict[str, Spelling] = {
    "relu": Spelling(lambda h, y: ([node("Relu", [h], [y])], []), "Relu", "op"),
    "clip_relu6": Spelling(lambda h, y: ([node("Clip", [h, "lo", "hi"], [y])], [const("lo", 0.0), const("hi", 6.0)]),
                           "Clip", "op", {"min": 0.0, "max": 6.0}),
    "clip_general": Spelling(
        lambda h, y: ([node("Clip", [h, "lo", "hi"], [y])], [const("lo", -1.5), const("hi", 2.5)]),
        "Clip", "op", {"min": -1.5, "max": 2.5}),
    "clip_max_only": Spelling(lambda h, y: ([node("Clip", [h, "", "hi"], [y])], [const("hi", 1.0)]),
                              "Clip", "op", {"min": -math.inf, "max": 1.0}),
    "clip_min_only": Spelling(lambda h, y: ([node("Clip", [h, "lo"], [y])], [const("lo", -0.5)]),
                              "Clip", "op", {"min": -0.5, "max": math.inf}),
    "leaky_relu": Spelling(lambda h, y: ([node("LeakyRelu", [h], [y], alpha=0.2)], []), "LeakyRelu", "op",
                           {"alpha": 0.2}),
    "prelu_channel": Spelling(
        lambda h, y: ([node("PRelu", [h, "slope"], [y])], [const("slope", np.linspace(0.1, 0.4, C).reshape(C, 1, 1))]),
        "PRelu", "op"),
    "prelu_single": Spelling(lambda h, y: ([node("PRelu", [h, "slope"], [y])], [const("slope", [0.25])]),
                             "PRelu", "op"),
    "hardsigmoid": Spelling(lambda h, y: ([node("HardSigmoid", [h], [y], alpha=0.3, beta=0.4)], []),
                            "HardSigmoid", "op", {"alpha": 0.3, "beta": 0.4}),
    "hardswish_op": Spelling(lambda h, y: ([node("HardSwish", [h], [y])], []), "HardSwish", "op", opset=14),
    "gelu_op": Spelling(lambda h, y: ([node("Gelu", [h], [y])], []), "Gelu", "op", {"approximate": "none"}, 20),
    "gelu_op_tanh": Spelling(lambda h, y: ([node("Gelu", [h], [y], approximate="tanh")], []), "Gelu", "op",
                             {"approximate": "tanh"}, 20),
    "hswish_div_after": Spelling(_hswish_div_after, "HardSwish", "mul-clip-div"),
    "hswish_mul_sixth_swapped": Spelling(_hswish_mul_sixth_swapped, "HardSwish", "mul-clip-div"),
    "hswish_div_before": Spelling(_hswish_div_before, "HardSwish", "mul-clip-div"),
    "hswish_clip_unit": Spelling(_hswish_clip_unit, "HardSwish", "mul-clip-div"),
    "hswish_hardsigmoid": Spelling(_hswish_hardsigmoid, "HardSwish", "mul-hardsigmoid"),
    "gelu_erf_legacy": Spelling(_gelu_erf_legacy, "Gelu", "erf", {"approximate": "none"}),
    "gelu_erf_dynamo": Spelling(_gelu_erf_dynamo, "Gelu", "erf", {"approximate": "none"}),
    "gelu_erf_mul": Spelling(_gelu_erf_mul, "Gelu", "erf", {"approximate": "none"}),
    "gelu_erf_expanded": Spelling(_gelu_erf_expanded, "Gelu", "erf", {"approximate": "none"}),
    "gelu_tanh_legacy": Spelling(_gelu_tanh_legacy, "Gelu", "tanh", {"approximate": "tanh"}),
    "gelu_tanh_pow": Spelling(_gelu_tanh_pow, "Gelu", "tanh", {"approximate": "tanh"}),
    "silu": Spelling(lambda h, y: ([node("Sigmoid", [h], ["s"]), node("Mul", [h, "s"], [y])], []), "SiLU",
                     "mul-sigmoid", {"beta": 1.0}),
    "silu_swapped": Spelling(lambda h, y: ([node("Sigmoid", [h], ["s"]), node("Mul", ["s", h], [y])], []), "SiLU",
                             "mul-sigmoid", {"beta": 1.0}),
    "swish_beta": Spelling(
        lambda h, y: ([node("Mul", [h, "beta"], ["hb"]), node("Sigmoid", ["hb"], ["s"]), node("Mul", [h, "s"], [y])],
                      [const("beta", 1.702)]),
        "SiLU", "mul-sigmoid", {"beta": 1.702}),
}


# ----------------------------------------------------------------------------------------------------------------------
# Models around a spelling
# ----------------------------------------------------------------------------------------------------------------------


def make_model(
    act_nodes: list[onnx.NodeProto],
    act_inits: list[onnx.TensorProto],
    *,
    producer: str = "conv",
    opset: int = 17,
    outputs: tuple[str, ...] = ("y",),
    name_nodes: bool = True,
    extra_inputs: tuple[onnx.ValueInfoProto, ...] = (),
) -> onnx.ModelProto:
    """``x -> producer -> h -> (act nodes) -> ...``; ``outputs`` are graph outputs of unknown shape.

    producer "conv": x[1,3,5,5] -> Conv(4 channels, 1x1) -> h[1,4,5,5]; "matmul": x[1,5,8] -> MatMul -> Add(bias)
    -> h[1,5,4]; "input": h[2,4,5,5] is the graph input itself.
    """
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    if producer == "conv":
        graph_in = helper.make_tensor_value_info("x", F32, [1, 3, 5, 5])
        nodes.append(node("Conv", ["x", "W", "B"], ["h"]))
        inits += [const("W", rng.normal(size=(C, 3, 1, 1))), const("B", rng.normal(size=C))]
    elif producer == "matmul":
        graph_in = helper.make_tensor_value_info("x", F32, [1, 5, 8])
        nodes += [node("MatMul", ["x", "W"], ["mm"]), node("Add", ["mm", "B"], ["h"])]
        inits += [const("W", rng.normal(size=(8, C))), const("B", rng.normal(size=C))]
    elif producer == "input":
        graph_in = helper.make_tensor_value_info("h", F32, [2, C, 5, 5])
    else:
        raise ValueError(producer)
    nodes += act_nodes
    if name_nodes:
        for i, n in enumerate(nodes):
            n.name = f"n{i}_{n.op_type.lower()}"
    inits += act_inits
    graph = helper.make_graph(nodes, "g", [graph_in, *extra_inputs],
                              [helper.make_tensor_value_info(o, F32, None) for o in outputs], initializer=inits)
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), opset)


def _checked(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Output shapes filled in by inference (the checker wants them), no other value_info: passes must not need it."""
    model.ir_version = 8 if opset < 20 else 9
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def spelling_model(key: str, **kwargs) -> onnx.ModelProto:
    s = SPELLINGS[key]
    nodes, inits = s.build("h", "y")
    kwargs.setdefault("opset", s.opset)
    return make_model(nodes, inits, **kwargs)


def activations_of(model: onnx.ModelProto) -> list[Activation]:
    return find_activations(to_graph(infer_shapes(model)))


def _writer(model: onnx.ModelProto, tensor: str) -> str:
    return next(n.name for n in model.graph.node if tensor in n.output)


# ----------------------------------------------------------------------------------------------------------------------
# Every spelling
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SPELLINGS))
def test_spelling_recognised(key: str) -> None:
    s = SPELLINGS[key]
    model = spelling_model(key)
    (act,) = activations_of(model)
    act_node_names = {n.name for n in model.graph.node if n.op_type != "Conv"}
    assert (act.op, act.spelling) == (s.op, s.spelling)
    assert (act.input, act.output) == ("h", "y")
    assert act.name == _writer(model, "y")
    assert set(act.nodes) == act_node_names and len(act.nodes) == len(act_node_names)
    assert (act.axis, act.channels) == (1, C)
    for k, v in s.params.items():
        assert act.params[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k


@pytest.mark.parametrize("key", list(SPELLINGS))
def test_activation_numpy_matches_ort(key: str) -> None:
    model = spelling_model(key, producer="input")
    (act,) = activations_of(model)
    h = (np.random.default_rng(1).normal(size=(2, C, 5, 5)) * 4).astype(np.float32)
    h.flat[:6] = [-3.0, 3.0, 0.0, 6.0, -6.0, 1.0]  # the kinks of the piecewise kinds
    (y,) = make_session(model).run(None, {"h": h})
    np.testing.assert_allclose(activation_numpy(act)(h), y, rtol=1e-5, atol=1e-5)


def test_activation_numpy_is_float64_and_rejects_unknown_kinds() -> None:
    act = Activation("a", "Gelu", "op", "x", "y", ("a",), 1, None, {"approximate": "none"})
    out = activation_numpy(act)(np.array([-1.0, 0.0, 2.0], dtype=np.float32))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [x * 0.5 * (1 + math.erf(x / math.sqrt(2))) for x in (-1.0, 0.0, 2.0)],
                               rtol=1e-15)
    with pytest.raises(ValueError, match="Softplus"):
        activation_numpy(Activation("a", "Softplus", "op", "x", "y", ("a",), 1, None))


def test_clip_bounds_as_attributes_before_opset_11() -> None:
    model = make_model([node("Clip", ["h"], ["y"], min=-0.5, max=2.0)], [], producer="input", opset=10)
    (act,) = activations_of(model)
    assert (act.op, act.params) == ("Clip", {"min": -0.5, "max": 2.0})
    h = np.random.default_rng(2).normal(size=(2, C, 5, 5)).astype(np.float32) * 3
    (y,) = make_session(model).run(None, {"h": h})
    np.testing.assert_allclose(activation_numpy(act)(h), y, rtol=1e-5, atol=1e-5)


def test_constants_held_in_constant_nodes() -> None:
    """Graphs not loaded through model_io keep Constant nodes; they are read but are not pattern nodes."""
    nodes, inits = SPELLINGS["gelu_erf_legacy"].build("h", "y")
    const_nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits]
    model = make_model(const_nodes + nodes, [])
    (act,) = find_activations(gs.import_onnx(infer_shapes(model)))
    assert (act.op, act.spelling, len(act.nodes)) == ("Gelu", "erf", 5)
    assert not any("constant" in name for name in act.nodes)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------------


def test_intermediate_read_outside_refuses_silu() -> None:
    nodes, inits = SPELLINGS["silu"].build("h", "y")
    model = make_model(nodes + [node("Add", ["s", "s"], ["other"])], inits, outputs=("y", "other"))
    assert activations_of(model) == []


def test_intermediate_graph_output_refuses_gelu() -> None:
    nodes, inits = SPELLINGS["gelu_erf_dynamo"].build("h", "y")
    assert activations_of(make_model(nodes, inits, outputs=("y", "ge_e"))) == []


def test_intermediate_read_outside_refuses_gelu_tanh() -> None:
    nodes, inits = SPELLINGS["gelu_tanh_legacy"].build("h", "y")
    model = make_model(nodes + [node("Relu", ["gt_cu"], ["other"])], inits, outputs=("y", "other"))
    assert [a.op for a in activations_of(model)] == ["Relu"]  # only the outside Relu on the cube


@pytest.mark.parametrize("outside", ["reader", "graph_output"])
def test_refused_hardswish_leaves_its_clip(outside: str) -> None:
    """When an intermediate of x*Clip(x+3,0,6)/6 is used elsewhere, only the Clip (on x + 3) is an activation."""
    nodes, inits = SPELLINGS["hswish_div_after"].build("h", "y")
    if outside == "reader":
        model = make_model(nodes + [node("Neg", ["hs_c"], ["other"])], inits, outputs=("y", "other"))
    else:
        model = make_model(nodes, inits, outputs=("y", "hs_m"))
    (act,) = activations_of(model)
    assert (act.op, act.input, act.output, len(act.nodes)) == ("Clip", "hs_a", "hs_c", 1)
    assert act.params == {"min": 0.0, "max": 6.0}


@pytest.mark.parametrize(
    "case",
    ["hswish_div_5", "gelu_half_0.6", "erf_div_2", "hardsigmoid_default", "swish_scaled", "tanh_no_cubic",
     "broadcast_rank5"],
)
def test_wrong_constants_are_not_recognised(case: str) -> None:
    if case == "hswish_div_5":
        nodes, inits = _hswish_div_after("h", "y")
        inits = [const("six", 5.0) if t.name == "six" else t for t in inits]  # Clip(.., 0, 5) and / 5
        expected = ["Clip"]
    elif case == "gelu_half_0.6":
        nodes, inits = _gelu_erf_legacy("h", "y")
        inits = [const("half", 0.6) if t.name == "half" else t for t in inits]
        expected = []
    elif case == "erf_div_2":
        nodes, inits = _gelu_erf_legacy("h", "y")
        inits = [const("sqrt2", 2.0) if t.name == "sqrt2" else t for t in inits]
        expected = []
    elif case == "hardsigmoid_default":
        nodes, inits = [node("HardSigmoid", ["h"], ["g"]), node("Mul", ["h", "g"], ["y"])], []
        expected = ["HardSigmoid"]  # x * HardSigmoid_{0.2, 0.5}(x) is not HardSwish; the HardSigmoid still counts
    elif case == "swish_scaled":
        nodes, inits = SPELLINGS["silu"].build("h", "m")
        nodes, inits = nodes + [node("Mul", ["m", "two"], ["y"])], [const("two", 2.0)]
        expected = ["SiLU"]  # the inner x * sigmoid(x) is found; the scaled product around it is not an activation
    elif case == "tanh_no_cubic":
        nodes, inits = _gelu_tanh_pow("h", "y")
        inits = [const("kappa", 0.0) if t.name == "kappa" else t for t in inits]
        expected = []
    else:  # x * Clip(x + 3, 0, 6) / six5 with six5 of shape [1,1,1,1,1]: the output is rank 5, h is rank 4
        nodes, inits = _hswish_div_after("h", "y")
        nodes[-1] = node("Div", ["hs_m", "six5"], ["y"])
        inits.append(const("six5", np.full((1, 1, 1, 1, 1), 6.0)))
        expected = ["Clip"]
    assert [a.op for a in activations_of(make_model(nodes, inits))] == expected


def test_runtime_bounds_and_slopes_are_not_recognised() -> None:
    """A Clip bound or PRelu slope that is a graph input (overridable) is not a constant."""
    model = make_model([node("Clip", ["h", "lo", "hi"], ["c"]), node("PRelu", ["c", "slope"], ["y"])],
                       [const("lo", 0.0), const("hi", 6.0), const("slope", [0.1])])
    model.graph.input.extend([helper.make_tensor_value_info(n, F32, []) for n in ("hi",)])
    model.graph.input.extend([helper.make_tensor_value_info(n, F32, [1]) for n in ("slope",)])
    assert activations_of(model) == []


def test_integer_clip_and_relu_are_not_activations() -> None:
    """Clip on indices (int64) is not an activation to linearize; Relu on int32 neither."""
    i64, i32 = TensorProto.INT64, TensorProto.INT32
    nodes = [node("Clip", ["idx", "lo", "hi"], ["clipped"]), node("Relu", ["n"], ["r"])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "lo"), numpy_helper.from_array(np.array(9, np.int64), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("idx", i64, [3]),
                                           helper.make_tensor_value_info("n", i32, [3])],
                              [helper.make_tensor_value_info("clipped", i64, [3]),
                               helper.make_tensor_value_info("r", i32, [3])], initializer=inits)
    model = _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 17)
    assert activations_of(model) == []


# ----------------------------------------------------------------------------------------------------------------------
# Channel axis and channel count
# ----------------------------------------------------------------------------------------------------------------------


def _single_act_graph(x_shape: list[int], pre: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                      x_in: str = "x") -> onnx.ModelProto:
    nodes = pre + [node("Relu", [pre[-1].output[0] if pre else x_in], ["y"])]
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x_in, F32, x_shape)],
                              [helper.make_tensor_value_info("y", F32, None)], initializer=inits)
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 17)


def _axis_case(case: str) -> tuple[onnx.ModelProto, int, int | None]:
    rng = np.random.default_rng(3)
    w = const("W", rng.normal(size=(C, 3, 1, 1)))
    if case == "conv":
        return _single_act_graph([1, 3, 5, 5], [node("Conv", ["x", "W"], ["h"])], [w]), 1, C
    if case == "conv1d":
        return _single_act_graph([1, 3, 7], [node("Conv", ["x", "W1"], ["h"])],
                                 [const("W1", rng.normal(size=(C, 3, 1)))]), 1, C
    if case == "conv_transpose":
        return _single_act_graph([1, 3, 5, 5], [node("ConvTranspose", ["x", "Wt"], ["h"])],
                                 [const("Wt", rng.normal(size=(3, C, 2, 2)))]), 1, C
    if case == "batchnorm":
        bn = [const(n, v) for n, v in (("s", np.ones(3)), ("b", np.zeros(3)), ("m", np.zeros(3)), ("v", np.ones(3)))]
        return _single_act_graph([2, 3, 4, 4], [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"])],
                                 bn), 1, 3
    if case == "conv_scale_identity_dropout":
        pre = [node("Conv", ["x", "W"], ["c"]), node("Mul", ["k", "c"], ["k1"]), node("Identity", ["k1"], ["i"]),
               node("Dropout", ["i"], ["h"])]
        return _single_act_graph([1, 3, 5, 5], pre, [w, const("k", 2.0)]), 1, C
    if case == "gemm":
        return _single_act_graph([2, 8], [node("Gemm", ["x", "Wg"], ["h"])],
                                 [const("Wg", rng.normal(size=(8, 6)))]), -1, 6
    if case == "matmul_bias":
        pre = [node("MatMul", ["x", "Wm"], ["m"]), node("Add", ["m", "Bm"], ["h"])]
        return _single_act_graph([1, 5, 8], pre, [const("Wm", rng.normal(size=(8, 6))), const("Bm", np.zeros(6))]), \
            -1, 6
    if case == "residual_after_conv":  # Add of two variables: unknown producer, a Conv upstream
        pre = [node("Conv", ["x", "Wsq"], ["c"]), node("Add", ["c", "x"], ["h"])]
        return _single_act_graph([1, C, 5, 5], pre, [const("Wsq", rng.normal(size=(C, C, 1, 1)))]), 1, C
    if case == "residual_after_matmul":
        pre = [node("MatMul", ["x", "Wsq"], ["c"]), node("Add", ["c", "x"], ["h"])]
        return _single_act_graph([1, 5, 6], pre, [const("Wsq", rng.normal(size=(6, 6)))]), -1, 6
    if case == "conv_then_transpose":  # NCHW -> NHWC: the channels are now last
        pre = [node("Conv", ["x", "W"], ["c"]), node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
               node("Add", ["t", "t"], ["h"])]
        return _single_act_graph([1, 3, 5, 5], pre, [w]), -1, C
    if case == "input_rank3":
        return _single_act_graph([1, 5, 6], [], []), -1, 6
    if case == "input_rank2":
        return _single_act_graph([2, 6], [], []), 1, 6
    if case == "input_rank4_no_conv":
        return _single_act_graph([1, 3, 5, 7], [], []), -1, 7
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    ["conv", "conv1d", "conv_transpose", "batchnorm", "conv_scale_identity_dropout", "gemm", "matmul_bias",
     "residual_after_conv", "residual_after_matmul", "conv_then_transpose", "input_rank3", "input_rank2",
     "input_rank4_no_conv"],
)
def test_channel_axis_and_count(case: str) -> None:
    model, axis, channels = _axis_case(case)
    (act,) = activations_of(model)
    assert (act.axis, act.channels) == (axis, channels)


def test_channels_need_shapes_and_infer_shapes_gives_them() -> None:
    model = make_model([node("Relu", ["h"], ["r"]), node("Neg", ["r"], ["y"])], [])
    assert not model.graph.value_info
    (act,) = find_activations(to_graph(model))
    assert (act.axis, act.channels) == (1, None)
    (act,) = find_activations(to_graph(infer_shapes(model)))
    assert (act.axis, act.channels) == (1, C)


def test_infer_shapes_tolerates_failure() -> None:
    """A node whose declared output rank contradicts inference: strict inference raises, infer_shapes does not."""
    model = spelling_model("relu")
    model.graph.value_info.append(helper.make_tensor_value_info("h", F32, [1, 2, 3]))
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert isinstance(infer_shapes(model), onnx.ModelProto)


# ----------------------------------------------------------------------------------------------------------------------
# Names and order
# ----------------------------------------------------------------------------------------------------------------------


def test_ensure_node_names_unique_stable_and_deterministic() -> None:
    nodes = [node("Relu", ["h"], ["a"]), node("Relu", ["a"], ["b"]), node("Sigmoid", ["b"], ["s"]),
             node("Mul", ["b", "s"], ["c"]), node("Relu", ["c"], ["y"])]
    nodes[3].name = "Relu_1"  # taken: the unnamed Relu at index 1 must avoid it
    nodes[4].name = "Relu_1"  # duplicate of an earlier name
    model = make_model(nodes, [], producer="input", name_nodes=False)
    graph = to_graph(model)
    assert ensure_node_names(graph) == 4
    names = [n.name for n in graph.nodes]
    assert names == ["Relu_0", "Relu_1_1", "Sigmoid_2", "Relu_1", "Relu_1_4"]
    assert ensure_node_names(graph) == 0 and [n.name for n in graph.nodes] == names
    again = to_graph(model)
    assert [a.name for a in find_activations(again)] == ["Relu_0", "Relu_1_1", "Relu_1", "Relu_1_4"]


def test_records_follow_topological_order_not_list_order() -> None:
    nodes, inits = SPELLINGS["gelu_erf_dynamo"].build("r", "g")
    nodes = [node("Relu", ["h"], ["r"])] + nodes + [node("LeakyRelu", ["g"], ["y"], alpha=0.1)]
    graph = to_graph(infer_shapes(make_model(nodes, inits)))
    graph.nodes.reverse()
    acts = find_activations(graph)
    assert [(a.op, a.input, a.output) for a in acts] == [("Relu", "h", "r"), ("Gelu", "r", "g"),
                                                         ("LeakyRelu", "g", "y")]
    assert len({a.name for a in acts}) == 3


def test_activation_output_with_many_readers_is_fine() -> None:
    nodes, inits = SPELLINGS["silu"].build("h", "m")
    model = make_model(nodes + [node("Add", ["m", "m"], ["y"]), node("Neg", ["m"], ["z"])], inits,
                       outputs=("y", "z", "m"))
    (act,) = activations_of(model)
    assert (act.op, act.output) == ("SiLU", "m")


# ----------------------------------------------------------------------------------------------------------------------
# Torch exports
# ----------------------------------------------------------------------------------------------------------------------


def _export_or_skip(module: torch.nn.Module, example: torch.Tensor, path, *, dynamo: bool, opset: int):
    """Export; a dynamo-exporter failure on this torch version is a skip with the reason, a legacy one a failure."""
    if not dynamo:
        return export(module, example, path, dynamo=False, opset=opset)
    try:
        return export(module, example, path, dynamo=True, opset=opset)
    except torch.onnx.errors.OnnxExporterError as exc:  # base of its ConversionError / TorchExportError
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        pytest.skip(f"torch {torch.__version__} dynamo exporter cannot export {type(module).__name__} at opset "
                    f"{opset}: {type(exc).__name__}: {first}")


def _check_numbers_against_ort(model: onnx.ModelProto, acts: list[Activation], feed: dict[str, np.ndarray]) -> None:
    """Expose every activation's input and output, run ORT, compare with activation_numpy."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names = [n for a in acts for n in (a.input, a.output) if n not in {o.name for o in model.graph.output}]
    exposed.graph.output.extend(helper.make_tensor_value_info(n, F32, None) for n in dict.fromkeys(names))
    sess = make_session(exposed)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    for a in acts:
        np.testing.assert_allclose(activation_numpy(a)(values[a.input]), values[a.output], rtol=1e-5, atol=1e-5,
                                   err_msg=a.name)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_export_mixed_net(tmp_path, dynamo: bool, opset: int) -> None:
    torch.manual_seed(0)
    names = list(ACTIVATION_CASES)
    example = torch.randn(2, CHANNELS, 5, 5) * 3
    model = _export_or_skip(MixedNet(names), example, tmp_path / "m.onnx", dynamo=dynamo, opset=opset)
    model = infer_shapes(model)
    acts = find_activations(to_graph(model))
    assert [a.op for a in acts] == [ACTIVATION_CASES[n][1] for n in names]
    gelu_spellings = [a.spelling for a in acts if a.op == "Gelu"]
    assert gelu_spellings == (["erf", "tanh"] if opset < 20 else ["op", "op"])
    by_name = dict(zip(names, acts))
    assert by_name["manual_hardswish"].spelling == "mul-clip-div"
    assert by_name["silu"].spelling == by_name["manual_silu"].spelling == "mul-sigmoid"
    assert all((a.axis, a.channels) == (1, CHANNELS) for a in acts)
    assert len({a.name for a in acts}) == len(acts)
    _check_numbers_against_ort(model, acts, {"x": example.numpy()})


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k in ACTIVATION_CASES if k != "prelu_channel"])  # slope is on torch's dim 1
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_export_after_linear_is_channels_last(tmp_path, key: str, dynamo: bool) -> None:
    torch.manual_seed(0)
    factory, kind = ACTIVATION_CASES[key]
    example = torch.randn(1, 5, 8) * 3
    model = infer_shapes(_export_or_skip(LinearAct(factory()), example, tmp_path / "m.onnx", dynamo=dynamo,
                                         opset=17))
    (act,) = find_activations(to_graph(model))
    assert act.op == kind
    assert (act.axis, act.channels) == (-1, CHANNELS)
    _check_numbers_against_ort(model, [act], {"x": example.numpy()})
