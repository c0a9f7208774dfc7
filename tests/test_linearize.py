"""The linearize pass: identity and per-channel affine replacement, checked against hand-built reference graphs."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_activations import SPELLINGS, C, _checked, const, make_model, node

from onnx_easier.activations import Activation, find_activations
from onnx_easier.model_io import make_session, to_graph, to_model
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.linearize import linearize
from onnx_easier.shapes import infer_shapes

RNG = np.random.default_rng(7)
A = RNG.uniform(0.5, 1.5, size=C)
B = RNG.normal(size=C)
DOWNSTREAM = [const("W2", RNG.normal(size=(2, C, 1, 1))), const("B2", RNG.normal(size=2))]


def run_linearize(model: onnx.ModelProto, mode: str, fits=None, select=None) -> tuple[onnx.ModelProto, PassResult]:
    """find -> linearize -> export; the result must pass the full checker and strict, typed shape inference."""
    model = infer_shapes(model)
    graph = to_graph(model)
    acts = find_activations(graph)
    if select is not None:
        acts = [a for a in acts if select(a)]
    if callable(fits):
        fits = {a.name: fits(a) for a in acts}
    result = linearize(graph, acts, mode, fits)
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    return out, result


def assert_same_outputs(model: onnx.ModelProto, reference: onnx.ModelProto, seed: int = 0) -> None:
    """Both models, fed the same random inputs through ORT without optimizations, give the same named outputs."""
    sess, ref = make_session(model), make_session(reference)
    rng = np.random.default_rng(seed)
    feed = {}
    for i in ref.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = np.float16 if i.type == "tensor(float16)" else np.float32
        feed[i.name] = (rng.normal(size=shape) * 3).astype(dtype)
    assert [o.name for o in sess.get_outputs()] == [o.name for o in ref.get_outputs()]
    for got, want in zip(sess.run(None, feed), ref.run(None, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def affine_nodes(x: str, y: str, a: np.ndarray | None, b: np.ndarray | None, shape: tuple[int, ...]):
    """Hand-written y = x * A + B with A, B of ``shape`` (either part may be absent)."""
    nodes, inits, cur = [], [], x
    if a is not None:
        nodes.append(node("Mul", [cur, "ref_A"], ["ref_s" if b is not None else y]))
        inits.append(const("ref_A", np.reshape(a, shape)))
        cur = "ref_s"
    if b is not None:
        nodes.append(node("Add", [cur, "ref_B"], [y]))
        inits.append(const("ref_B", np.reshape(b, shape)))
    return nodes, inits


def conv_sandwich(act_nodes, act_inits, opset: int = 17) -> onnx.ModelProto:
    """x -> Conv -> h -> (act) -> a -> Conv -> y"""
    return make_model(act_nodes + [node("Conv", ["a", "W2", "B2"], ["y"])], act_inits + DOWNSTREAM, opset=opset)


# ----------------------------------------------------------------------------------------------------------------------
# Every spelling, both modes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SPELLINGS))
def test_identity_every_spelling(key: str) -> None:
    s = SPELLINGS[key]
    model = conv_sandwich(*s.build("h", "a"), opset=s.opset)
    out, result = run_linearize(model, "identity")
    assert (result.name, result.changed, result.notes) == ("linearize", 1, [])
    assert ops(out) == ["Conv", "Conv"]
    assert [o.name for o in out.graph.output] == ["y"]
    reference = conv_sandwich([node("Identity", ["h"], ["a"])], [], opset=s.opset)
    assert_same_outputs(out, reference)


@pytest.mark.parametrize("key", list(SPELLINGS))
def test_affine_every_spelling(key: str) -> None:
    s = SPELLINGS[key]
    model = conv_sandwich(*s.build("h", "a"), opset=s.opset)
    out, result = run_linearize(model, "affine", fits=lambda act: (A, B))
    assert result.changed == 1
    assert ops(out) == ["Conv", "Mul", "Add", "Conv"]
    assert [o.name for o in out.graph.output] == ["y"]
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert shapes[mul.input[1]] == (C, 1, 1)
    reference = conv_sandwich(*affine_nodes("h", "a", A, B, (C, 1, 1)), opset=s.opset)
    assert_same_outputs(out, reference)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(np.ones(C), B, ["Conv", "Add", "Conv"]), (A, np.zeros(C), ["Conv", "Mul", "Conv"]),
     (np.ones(C), np.zeros(C), ["Conv", "Conv"]), (np.array([2.0]), np.array([0.5]), ["Conv", "Mul", "Add", "Conv"])],
    ids=["scale_one", "offset_zero", "both_trivial", "one_value_for_all_channels"],
)
def test_affine_leaves_out_trivial_parts(a: np.ndarray, b: np.ndarray, expected: list[str]) -> None:
    model = conv_sandwich(*SPELLINGS["silu"].build("h", "a"))
    out, _ = run_linearize(model, "affine", fits=lambda act: (a, b))
    assert ops(out) == expected
    shape = () if a.size == 1 else (C, 1, 1)
    ref_a, ref_b = None if np.all(a == 1) else a, None if np.all(b == 0) else b
    if ref_a is None and ref_b is None:
        reference = conv_sandwich([node("Identity", ["h"], ["a"])], [])
    else:
        reference = conv_sandwich(*affine_nodes("h", "a", ref_a, ref_b, shape))
    assert_same_outputs(out, reference)


# ----------------------------------------------------------------------------------------------------------------------
# Graph outputs and inputs keep their names
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["relu", "gelu_erf_legacy", "hswish_div_after"])
def test_activation_output_is_graph_output(key: str) -> None:
    model = make_model(*SPELLINGS[key].build("h", "y"))
    out, result = run_linearize(model, "identity")
    assert ops(out) == ["Conv"] and list(out.graph.node[0].output) == ["y"]
    assert [o.name for o in out.graph.output] == ["y"] and result.changed == 1
    assert_same_outputs(out, make_model([node("Identity", ["h"], ["y"])], []))

    out, _ = run_linearize(model, "affine", fits=lambda act: (A, B))
    assert ops(out) == ["Conv", "Mul", "Add"] and list(out.graph.node[-1].output) == ["y"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(out, make_model(*affine_nodes("h", "y", A, B, (C, 1, 1))))


def test_graph_input_straight_to_graph_output_keeps_an_identity() -> None:
    model = make_model(*SPELLINGS["gelu_op"].build("h", "y"), producer="input", opset=20)
    out, _ = run_linearize(model, "identity")
    assert ops(out) == ["Identity"]
    assert ([i.name for i in out.graph.input], [o.name for o in out.graph.output]) == (["h"], ["y"])
    assert_same_outputs(out, make_model([node("Identity", ["h"], ["y"])], [], producer="input"))


def test_activation_output_that_is_also_read_downstream() -> None:
    """y is a graph output and also read by another node: readers and the output name both survive."""
    nodes, inits = SPELLINGS["silu"].build("h", "y")
    model = make_model(nodes + [node("Neg", ["y"], ["z"])], inits, outputs=("y", "z"))
    for mode, expected in (("identity", ["Conv", "Neg"]), ("affine", ["Conv", "Mul", "Add", "Neg"])):
        out, _ = run_linearize(model, mode, fits=lambda act: (A, B))
        assert ops(out) == expected and [o.name for o in out.graph.output] == ["y", "z"]
        ref_nodes, ref_inits = ([node("Identity", ["h"], ["y"])], []) if mode == "identity" else affine_nodes(
            "h", "y", A, B, (C, 1, 1))
        assert_same_outputs(out, make_model(ref_nodes + [node("Neg", ["y"], ["z"])], ref_inits, outputs=("y", "z")))


# ----------------------------------------------------------------------------------------------------------------------
# Channel axes
# ----------------------------------------------------------------------------------------------------------------------


def test_channels_last_affine_uses_a_vector() -> None:
    """MatMul + bias -> GELU(tanh) -> MatMul: the fit broadcasts on the last axis as a [C] constant."""
    w3 = const("W3", RNG.normal(size=(C, 3)))
    nodes, inits = SPELLINGS["gelu_tanh_legacy"].build("h", "a")
    model = make_model(nodes + [node("MatMul", ["a", "W3"], ["y"])], inits + [w3], producer="matmul")
    out, _ = run_linearize(model, "affine", fits=lambda act: (A, B))
    assert ops(out) == ["MatMul", "Add", "Mul", "Add", "MatMul"]
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert shapes[mul.input[1]] == (C,)
    ref_nodes, ref_inits = affine_nodes("h", "a", A, B, (C,))
    reference = make_model(ref_nodes + [node("MatMul", ["a", "W3"], ["y"])], ref_inits + [w3], producer="matmul")
    assert_same_outputs(out, reference)


def test_rank3_channels_first_affine() -> None:
    """Conv1d: x[1,3,7] -> Conv -> h[1,C,7] -> Relu: constants of shape [C, 1]."""
    w = const("W", RNG.normal(size=(C, 3, 1)))

    def conv1d(act_nodes, act_inits):
        graph = helper.make_graph([node("Conv", ["x", "W"], ["h"]), *act_nodes], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=[w, *act_inits])
        return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 17)

    out, _ = run_linearize(conv1d([node("Relu", ["h"], ["y"])], []), "affine", fits=lambda act: (A, B))
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert ops(out) == ["Conv", "Mul", "Add"] and shapes[out.graph.node[1].input[1]] == (C, 1)
    assert_same_outputs(out, conv1d(*affine_nodes("h", "y", A, B, (C, 1))))


def test_float16_constants_follow_the_input_type() -> None:
    """A float16 graph input of shape [1, 2, 2, C] (no layer upstream: channels last) -> Relu."""
    graph = helper.make_graph([node("Relu", ["h"], ["y"])], "g",
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT16, [1, 2, 2, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2, 2, C])])
    model = _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 17)
    out, _ = run_linearize(model, "affine", fits=lambda act: (A, B))
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    ref_inits = [numpy_helper.from_array(np.reshape(v, (C,)).astype(np.float16), n)
                 for n, v in (("ref_A", A), ("ref_B", B))]
    ref_graph = helper.make_graph([node("Mul", ["h", "ref_A"], ["s"]), node("Add", ["s", "ref_B"], ["y"])], "g",
                                  list(model.graph.input), list(model.graph.output), initializer=ref_inits)
    assert_same_outputs(out, _checked(helper.make_model(ref_graph, opset_imports=[helper.make_opsetid("", 17)]), 17))


# ----------------------------------------------------------------------------------------------------------------------
# Several activations
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["graph_order", "reverse_order"])
@pytest.mark.parametrize("mode", ["identity", "affine"])
def test_chain_of_activations(mode: str, reverse: bool) -> None:
    """h -> Relu -> r -> SiLU -> y (graph output): both replaced, whatever the order of the list."""
    nodes, inits = SPELLINGS["silu"].build("r", "y")
    model = make_model([node("Relu", ["h"], ["r"])] + nodes, inits)
    model = infer_shapes(model)
    graph = to_graph(model)
    acts = find_activations(graph)
    assert [a.op for a in acts] == ["Relu", "SiLU"]
    fits = {acts[0].name: (A, B), acts[1].name: (B + 2.0, A)}
    result = linearize(graph, acts[::-1] if reverse else acts, mode, fits if mode == "affine" else None)
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    assert result.changed == 2 and [o.name for o in out.graph.output] == ["y"]
    if mode == "identity":
        assert ops(out) == ["Conv"] and list(out.graph.node[0].output) == ["y"]
        reference = make_model([node("Identity", ["h"], ["y"])], [])
    else:
        assert ops(out) == ["Conv", "Mul", "Add", "Mul", "Add"]
        n1, i1 = affine_nodes("h", "r", A, B, (C, 1, 1))
        n2, i2 = affine_nodes("r", "y", B + 2.0, A, (C, 1, 1))
        for n in n2:
            n.input[:] = [{"ref_A": "ref_A2", "ref_B": "ref_B2", "ref_s": "ref_s2"}.get(t, t) for t in n.input]
            n.output[:] = [{"ref_s": "ref_s2"}.get(t, t) for t in n.output]
        i2 = [const(t.name + "2", numpy_helper.to_array(t)) for t in i2]
        reference = make_model(n1 + n2, i1 + i2)
    assert_same_outputs(out, reference)


def test_only_the_chosen_activations_change() -> None:
    nodes, inits = SPELLINGS["gelu_erf_dynamo"].build("r", "a")
    model = conv_sandwich([node("Relu", ["h"], ["r"])] + nodes, inits)
    out, result = run_linearize(model, "identity", select=lambda act: act.op == "Gelu")
    assert result.changed == 1 and ops(out) == ["Conv", "Relu", "Conv"]
    assert_same_outputs(out, conv_sandwich([node("Relu", ["h"], ["a"])], []))


def test_identity_kept_when_a_subgraph_reads_the_output() -> None:
    """An If branch reads the activation's output by name: the pass keeps an Identity writing that name."""
    then_g = helper.make_graph([node("Neg", ["a"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, C, 5, 5])])
    else_g = helper.make_graph([node("Abs", ["a"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, C, 5, 5])])
    act_nodes = [node("Relu", ["h"], ["a"]), node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    model = make_model(act_nodes, [], extra_inputs=(cond,))
    out, result = run_linearize(model, "identity")
    assert result.changed == 1 and ops(out) == ["Conv", "Identity", "If"]
    assert list(out.graph.node[1].output) == ["a"]
    reference = make_model([node("Identity", ["h"], ["a"]), act_nodes[1]], [], extra_inputs=(cond,))
    for cond in (True, False):
        feed = {"x": RNG.normal(size=(1, 3, 5, 5)).astype(np.float32), "cond": np.array(cond)}
        np.testing.assert_allclose(make_session(out).run(None, feed)[0], make_session(reference).run(None, feed)[0],
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals, errors and the log line
# ----------------------------------------------------------------------------------------------------------------------


def test_stale_activations_are_skipped_with_a_note() -> None:
    model = infer_shapes(conv_sandwich(*SPELLINGS["silu"].build("h", "a")))
    graph = to_graph(model)
    acts = find_activations(graph)
    assert linearize(graph, acts, "identity").changed == 1
    again = linearize(graph, acts, "identity")
    assert again.changed == 0 and len(again.notes) == 1 and "skipped" in again.notes[0]
    assert ops(to_model(graph, model)) == ["Conv", "Conv"]


def test_unknown_rank_on_a_leading_axis_is_skipped() -> None:
    model = conv_sandwich([node("Relu", ["h"], ["a"])], [])  # no value_info: h has no shape
    graph = to_graph(model)
    (act,) = find_activations(graph)
    assert act.channels is None and act.axis == 1
    result = linearize(graph, [act], "affine", {act.name: (A, B)})
    assert result.changed == 0 and "rank" in result.notes[0]
    assert ops(to_model(graph, model)) == ["Conv", "Relu", "Conv"]


@pytest.mark.parametrize(
    ("mode", "fits", "message"),
    [("cubic", None, "mode"), ("affine", None, "needs fits"), ("affine", {"other": (A, B)}, "needs fits"),
     ("affine", "short", "channels"), ("affine", "mismatch", "scales"), ("affine", "nan", "finite")],
)
def test_bad_arguments_raise_before_touching_the_graph(mode: str, fits, message: str) -> None:
    model = infer_shapes(conv_sandwich(*SPELLINGS["relu"].build("h", "a")))
    graph = to_graph(model)
    (act,) = find_activations(graph)
    if isinstance(fits, str):
        fits = {act.name: {"short": (A[:3], B[:3]), "mismatch": (A, B[:2]), "nan": (A * np.nan, B)}[fits]}
    with pytest.raises(ValueError, match=message):
        linearize(graph, [act], mode, fits)
    assert ops(to_model(graph, model)) == ["Conv", "Relu", "Conv"]


def test_logs_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    model = infer_shapes(conv_sandwich(*SPELLINGS["gelu_erf_legacy"].build("h", "a")))
    graph = to_graph(model)
    acts = find_activations(graph)
    stale = Activation("gone", "Relu", "op", "h", "nowhere", ("gone",), 1, C)
    with caplog.at_level(logging.INFO, logger="onnx_easier.passes.linearize"):
        linearize(graph, acts + [stale], "identity")
    lines = [r.getMessage() for r in caplog.records if r.name == "onnx_easier.passes.linearize"
             and r.levelno == logging.INFO]
    expected = "linearize (identity): 1 of 2 activations replaced, 5 pattern nodes removed, 0 nodes added, 1 skipped"
    assert lines == [expected]
