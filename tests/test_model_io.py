"""model_io: validation on load, Constant nodes -> initializers, overridable initializers, atomic saves."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.errors import InvalidModelError, UnsupportedModelError
from onnx_easier.execution import CPU
from onnx_easier.model_io import load_model, make_session, save_model, to_graph, to_model, weightless


def _matmul_model(weight_as: str) -> onnx.ModelProto:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])]
    inits = []
    if weight_as == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
        if weight_as == "overridable":
            inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 3]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_nodes_become_initializers() -> None:
    m = load_model(_matmul_model("constant"))
    assert [n.op_type for n in m.graph.node] == ["MatMul"]
    assert [t.name for t in m.graph.initializer] == ["W"]


def test_overridable_initializer_survives_round_trip() -> None:
    m = load_model(_matmul_model("overridable"))
    g = to_graph(m)
    assert [t.name for t in g.inputs] == ["x", "W"]
    back = to_model(g, m)
    assert [i.name for i in back.graph.input] == ["x", "W"]
    assert [t.name for t in back.graph.initializer] == ["W"]
    s = make_session(back)
    x = np.ones((1, 2), np.float32)
    np.testing.assert_allclose(s.run(None, {"x": x})[0], x @ np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_allclose(s.run(None, {"x": x, "W": np.zeros((2, 3), np.float32)})[0], 0)


def test_work_sessions_are_lean() -> None:
    """Work sessions give a run's memory back when it ends (no CPU arena) and hold no pre-packed weights; timed
    ones keep ORT's defaults."""
    model = _matmul_model("initializer")

    def lean(session: object) -> bool:
        options = session.get_session_options()
        try:
            packed = options.get_session_config_entry("session.disable_prepacking") != "1"
        except RuntimeError:  # not set: ORT's default
            packed = True
        assert options.enable_cpu_mem_arena == packed
        return not packed

    assert lean(make_session(model)) and not lean(make_session(model, lean=False))
    assert lean(CPU.session(model)) and not lean(CPU.session(model, timed=True))


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path: Path) -> None:
    m = load_model(_matmul_model("initializer"))
    out = tmp_path / "m.onnx"
    save_model(m, out)
    assert onnx.load(str(out)).graph.node[0].op_type == "MatMul"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # a normal new file, not mkstemp's 0600


def test_external_data_model_loads(tmp_path: Path) -> None:
    m = _matmul_model("initializer")
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    loaded = load_model(tmp_path / "ext.onnx")
    assert numpy_helper.to_array(loaded.graph.initializer[0]).shape == (2, 3)


def test_errors() -> None:
    with pytest.raises(InvalidModelError, match="no such file"):
        load_model("/nonexistent/model.onnx")
    old = _matmul_model("initializer")
    old.opset_import[0].version = 9
    with pytest.raises(UnsupportedModelError, match="opset 9"):
        load_model(old)


@pytest.mark.parametrize("ir", [6, 8])
def test_to_model_keeps_the_shape_field_of_graph_outputs(ir: int) -> None:
    """The checker requires a shape field on graph inputs and outputs (any IR): a rewrite that leaves the output
    tensor without a shape (a dynamically quantized IR-6 model after fusion: "Field 'shape' of 'type' is required
    but missing") gets the original's type back."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    original = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=ir)
    graph = to_graph(original)
    graph.outputs[0].shape = None  # what a rewrite left behind
    out = to_model(graph, original)
    assert out.graph.output[0].type == original.graph.output[0].type
    onnx.checker.check_model(out, full_check=True)


def test_unsorted_graph_is_sorted_on_load(tmp_path: Path) -> None:
    """ORT runs graphs whose nodes are out of order (onnxruntime.transformers' float16 converter writes them); the
    checker refuses them. load_model sorts the nodes (stable) and goes on; a cycle is still an invalid model."""
    nodes = [helper.make_node("Relu", ["h"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["h"], name="first")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = load_model(path)
    assert [n.name for n in model.graph.node] == ["first", "second"]
    cyc = helper.make_graph([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                             helper.make_node("Add", ["x", "a"], ["y"])], "c",
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(cyc, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "cycle.onnx")
    with pytest.raises(InvalidModelError, match="topologically sorted"):
        load_model(tmp_path / "cycle.onnx")


def test_weightless_keeps_shape_operands_and_types_the_weights() -> None:
    """Shape inference on the weightless copy gives the shapes it gives on the model (a Reshape's shape operand
    keeps its values; the weight becomes a typed input), without copying the weight."""
    w = numpy_helper.from_array(np.ones((8, 12), np.float32), "W")
    shape = numpy_helper.from_array(np.array([0, 4, 3], np.int64), "shape")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    light = weightless(model)
    assert [t.name for t in light.graph.initializer] == ["shape"] and [i.name for i in light.graph.input] == ["x", "W"]

    def shapes(m: onnx.ModelProto) -> dict:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        return {v.name: str(v.type) for v in [*inferred.graph.value_info, *inferred.graph.output]}

    assert shapes(light) == shapes(model) and "dim_value: 3" in shapes(light)["y"]


def test_a_work_session_holds_no_model_bytes_and_its_threads_do_not_spin() -> None:
    """Work sessions (lean): ORT's Python object no longer keeps the serialized model (a second copy of the
    weights for a CPU fallback, disabled), and intra-op threads sleep between runs (spinning ones held a core
    while the search's numpy work ran: tests of the timing are in the README, not here)."""
    from onnx import TensorProto, helper

    from onnx_easier.model_io import make_session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = make_session(model)
    assert getattr(sess, "_model_bytes", None) is None
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    timed = make_session(model, lean=False)  # as deployed: ORT's default (an unset entry raises)
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own RuntimeException type
        timed.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    np.testing.assert_array_equal(sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0], [0.0, 2.0])
