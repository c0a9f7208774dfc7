"""Shapes ONNX inference leaves unknown, read from ONNX Runtime (shapes.py)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.shapes import infer_shapes, ort_value_info, unknown_tensors


def scaler_mlp(batch: str | int = "N") -> onnx.ModelProto:
    """X[batch, 4] -> ai.onnx.ml Scaler -> MatMul 4x3 -> Relu -> MatMul 3x2 -> Y (no ONNX inference for Scaler)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Scaler", ["X"], ["s"], domain="ai.onnx.ml", offset=[0.5] * 4, scale=[2.0] * 4, name="sc"),
        helper.make_node("MatMul", ["s", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["a"], name="r"),
        helper.make_node("MatMul", ["a", "w2"], ["Y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    return {vi.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                      for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.value_info if vi.type.tensor_type.HasField("shape")}


def test_onnx_inference_alone_leaves_them_unknown() -> None:
    inferred = onnx.shape_inference.infer_shapes(scaler_mlp(), data_prop=True)
    assert unknown_tensors(inferred) == ["s", "h", "a"]  # Y is a declared graph output


def test_ranks_and_batch_dim_from_ort() -> None:
    m = infer_shapes(scaler_mlp())
    assert shapes(m) == {"s": ["N", 4], "h": ["N", 3], "a": ["N", 3]}
    assert unknown_tensors(m) == []
    assert {vi.name: vi.type.tensor_type.elem_type for vi in m.graph.value_info} == dict.fromkeys("sha", 1)
    onnx.checker.check_model(m, full_check=False)


def test_fixed_batch_and_unrunnable_models() -> None:
    assert shapes(infer_shapes(scaler_mlp(batch=3))) == {"s": [3, 4], "h": [3, 3], "a": [3, 3]}
    m = scaler_mlp()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"  # a dynamic non-batch dim: not run
    assert ort_value_info(onnx.shape_inference.infer_shapes(m), ["s"]) == []
    assert unknown_tensors(infer_shapes(m)) == ["s", "h", "a"]  # left as they were, no error


def test_non_tensor_types_are_not_listed() -> None:
    m = scaler_mlp()
    m.graph.value_info.append(helper.make_value_info("s", helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None))))
    assert "s" not in unknown_tensors(m)


def test_cost_counts_the_layers_after_an_op_without_inference() -> None:
    from onnx_easier.cost import measure

    assert measure(scaler_mlp(), 1).macs == 4 * 3 + 3 * 2  # per sample; 0 for both MatMuls without ORT's shapes


def test_unknown_dims_listed_on_request() -> None:
    m = infer_shapes(scaler_mlp())
    assert unknown_tensors(m) == []
    assert unknown_tensors(m, dims=True) == ["s", "h", "a", "Y"]  # their batch dim is symbolic


def test_models_with_subgraphs_are_not_run() -> None:
    m = scaler_mlp()
    then = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["s"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m.graph.node.append(helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [],
                                                                                            [True])))
    m.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other))
    assert ort_value_info(m, ["s", "z"]) == []


def test_shapes_module_has_no_import_cycle() -> None:
    """shapes.py is the one home for shapes: importing it first, in a fresh interpreter, pulls in none of the modules
    that use it (calibrate, activations, passes), so no function-level import is needed anywhere."""
    import subprocess
    import sys

    code = ("import sys, onnx_easier.shapes; "
            "bad = [m for m in ('onnx_easier.calibrate', 'onnx_easier.activations', 'onnx_easier.fusion') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_strict_failure_names_the_problem() -> None:
    from onnx_easier.shapes import strict_failure

    bad = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) { s = Constant <value = int64[1] {4}> () y = Reshape(x, s) }""")
    assert strict_failure(bad) is not None and "Reshape" in strict_failure(bad)
    good = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }""")
    assert strict_failure(good) is None


def test_what_ort_read_is_reused_for_tensors_computed_alike(monkeypatch) -> None:
    """A second model computing the same tensors from the same nodes and weight shapes (other weight values, as
    after a re-fit) runs nothing; one with another weight shape upstream runs again."""
    import onnx_easier.shapes as sh

    runs: list[list[str]] = []
    real = sh.ort_value_info

    def counted(model, names):
        runs.append(list(names))
        return real(model, names)

    monkeypatch.setattr(sh, "ort_value_info", counted)
    monkeypatch.setattr(sh, "_FOUND", {})
    def hidden8(scale: float) -> onnx.ModelProto:  # weights of more than 16 elements: digested by shape
        m = scaler_mlp()
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 8), scale, np.float32), "w1"))
        m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full((8, 2), scale, np.float32), "w2"))
        return m

    first = infer_shapes(hidden8(1.0))
    second = infer_shapes(hidden8(3.0))  # other values, as after a re-fit
    assert shapes(second) == shapes(first) == {"s": ["N", 4], "h": ["N", 8], "a": ["N", 8]}
    assert [r for r in runs if r] == [["s", "h", "a"]]
    third = infer_shapes(scaler_mlp())  # hidden 3: the Scaler's output is the same tensor, h and a are not
    assert shapes(third) == {"s": ["N", 4], "h": ["N", 3], "a": ["N", 3]}
    assert [r for r in runs if r] == [["s", "h", "a"], ["h", "a"]]
