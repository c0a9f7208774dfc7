"""joint.py: one session for two models' tensors, sharing the nodes they compute alike."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.calibrate import upstream
from onnx_easier.joint import digests, joint


def chain(scale: dict[int, float] | None = None, names: str = "") -> onnx.ModelProto:
    """x[N,8] -> (MatMul -> Relu) x 3 -> y; ``scale[i]`` multiplies layer i's weight; ``names`` prefixes the
    initializers and intermediate tensors (same computation, other names)."""
    scale = scale or {}
    rng = np.random.default_rng(0)
    nodes, inits, t = [], [], "x"
    for i in range(3):
        w = rng.standard_normal((8, 8)).astype(np.float32) * scale.get(i, 1.0)
        inits.append(numpy_helper.from_array(w, f"{names}w{i}"))
        out = f"{names}a{i}" if i < 2 else "y"
        nodes += [helper.make_node("MatMul", [t, f"{names}w{i}"], [f"{names}h{i}"], name=f"m{i}"),
                  helper.make_node("Relu", [f"{names}h{i}"], [out], name=f"r{i}")]
        t = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(names, {"x": x})


X = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)


def test_digests_follow_the_computation_not_the_names() -> None:
    a, b = digests(chain()), digests(chain(names="other_"))
    assert a["h0"] == b["other_h0"] and a["a1"] == b["other_a1"] and a["y"] == b["y"]
    changed = digests(chain({1: 2.0}))
    assert changed["h0"] == a["h0"] and changed["a0"] == a["a0"]
    assert changed["h1"] != a["h1"] and changed["y"] != a["y"]  # everything downstream of the change differs


def test_shared_prefix_is_computed_once_and_both_values_come_out() -> None:
    current = upstream(chain({1: 2.0}), ["a1"])  # changed at layer 1: its input a0 is shared
    original = upstream(chain(), ["h1"])
    merged = joint(current, original, wanted=["h1"])
    assert merged is not None
    model, names, shared = merged
    # original's m0, r0 are computed by current already; only m1 (other weight) is added
    assert shared == pytest.approx(2 / 3)
    assert [n.op_type for n in model.graph.node].count("MatMul") == 3
    got = run(model, ["a1", names["h1"]], X)
    np.testing.assert_array_equal(got[0], run(current, ["a1"], X)[0])
    np.testing.assert_array_equal(got[1], run(original, ["h1"], X)[0])


def test_identical_tensor_maps_to_the_first_models_name() -> None:
    current = upstream(chain(names="c_"), ["c_a1"])
    original = upstream(chain(), ["a1"])
    model, names, shared = joint(current, original, wanted=["a1"])
    assert names["a1"] == "c_a1" and shared == 1.0
    assert len(model.graph.node) == len(current.graph.node)


def test_name_clash_with_another_value_is_renamed() -> None:
    current = upstream(chain({0: 3.0}), ["a1"])  # every tensor differs, with the same names
    original = upstream(chain(), ["a1"])
    model, names, shared = joint(current, original, wanted=["a1"])
    assert shared == 0.0 and names["a1"] != "a1"
    assert len({t.name for t in model.graph.initializer}) == len(model.graph.initializer)
    got = run(model, ["a1", names["a1"]], X)
    np.testing.assert_array_equal(got[1], run(original, ["a1"], X)[0])
    assert not np.array_equal(got[0], got[1])


def test_not_merged_with_local_functions_or_other_inputs() -> None:
    with_function = chain()
    with_function.functions.add().name = "f"
    assert joint(with_function, chain()) is None
    other_input = chain()
    other_input.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 9
    assert joint(other_input, chain()) is None


def test_identity_nodes_and_constant_nodes_digest_as_their_values() -> None:
    """Exporters spell shared weights as Identity nodes and constants as Constant nodes; the tool's exact passes
    turn them into initializers: the digests must not see the difference (else nothing downstream is shared)."""
    plain = chain()
    spelled = chain()
    w0 = spelled.graph.initializer[0]
    spelled.graph.node.insert(0, helper.make_node("Constant", [], ["c0"], value=w0))
    spelled.graph.node.insert(1, helper.make_node("Identity", ["c0"], ["w0_alias"]))
    spelled.graph.node[2].input[1] = "w0_alias"
    del spelled.graph.initializer[0]
    stored = chain()  # the same value stored in typed fields, not raw bytes
    values = numpy_helper.to_array(stored.graph.initializer[1])
    typed = helper.make_tensor("w1", TensorProto.FLOAT, values.shape, values.flatten().tolist())
    stored.graph.initializer[1].CopyFrom(typed)
    a, b, c = digests(plain), digests(spelled), digests(stored)
    assert a["w0"] == b["w0_alias"] == b["c0"] and a["y"] == b["y"] == c["y"]
