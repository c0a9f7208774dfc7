"""cost.py: node counts, depth, params and MACs on hand-built graphs with known answers."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.cost import depth, measure


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def _conv_gemm_model(batch: int | str = "N") -> onnx.ModelProto:
    # x[N,3,8,8] -Conv(4,3,3,3 pad1)-> a[N,4,8,8] -Relu-> b -Flatten-> c[N,256] -Gemm(10x256)-> y
    # plus a side branch: x -Conv 1x1 -> s, Add(a, s) so depth counts the longest path
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a0"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Conv", ["x", "w2"], ["s"], name="c2"),
        helper.make_node("Add", ["a0", "s"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="r"),
        helper.make_node("Flatten", ["b"], ["c"], name="f"),
        helper.make_node("Gemm", ["c", "wg", "bg"], ["y"], transB=1, name="g"),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [_init("w1", 4, 3, 3, 3), _init("b1", 4), _init("w2", 4, 3, 1, 1), _init("wg", 10, 256), _init("bg", 10)],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_counts_params_macs_depth() -> None:
    c = measure(_conv_gemm_model(), activations=1)
    assert c.nodes == 6 and c.compute_nodes == 3 and c.activations == 1
    assert c.params == 4 * 27 + 4 + 12 + 2560 + 10
    assert c.macs == 4 * 64 * 27 + 4 * 64 * 3 + 10 * 256
    assert c.macs_complete
    assert c.depth == 2
    assert c.per_op == {"Add": 1, "Conv": 2, "Flatten": 1, "Gemm": 1, "Relu": 1}


def test_macs_are_per_sample_for_fixed_batch() -> None:
    assert measure(_conv_gemm_model(batch=8), 1).macs == measure(_conv_gemm_model(), 1).macs


def test_matmul_batched_and_depth_chain() -> None:
    # [N,T,F] x [F,H] -> [N,T,H] -> x [H,F]: two compute nodes in series
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8])],
        [_init("w1", 8, 32), _init("w2", 32, 8)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    c = measure(m, 0)
    assert c.macs == 16 * 8 * 32 * 2
    assert depth(m) == 2


def test_dynamic_spatial_dims_use_given_shapes() -> None:
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", 5, 2, 1, 1)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert not measure(m, 0).macs_complete
    c = measure(m, 0, {"x": (7, 2, 4, 6)})
    assert c.macs_complete and c.macs == 5 * 2 * 24
