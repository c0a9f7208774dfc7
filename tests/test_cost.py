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


def test_per_channel_affine_is_no_layer_in_any_spelling() -> None:
    """Standalone per-channel Mul + Add and the 1x1 depthwise Conv the exact fusions may make of them count the
    same: no compute node, no depth (a text detector read 64 -> 77 compute nodes after a rewrite that made it
    faster). A 1x1 depthwise Conv with a stride, or a real 1x1 conv, still counts."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_easier.cost import measure

    c = 4
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 8, 8])]
    scale = numpy_helper.from_array(np.linspace(0.5, 2, c).astype(np.float32).reshape(c, 1, 1), "s")
    shift = numpy_helper.from_array(np.ones((c, 1, 1), np.float32), "b")
    conv_w = numpy_helper.from_array(np.ones((c, c, 3, 3), np.float32), "w")

    def model(tail: list, inits: list, out_hw: int = 8) -> onnx.ModelProto:
        nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
                 *tail]
        g = helper.make_graph(nodes, "g", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                             ["N", c, out_hw, out_hw])],
                              [conv_w, *inits])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    mul_add = model([helper.make_node("Mul", ["r", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                    [scale, shift])
    dw = numpy_helper.from_array(np.linspace(0.5, 2, c).astype(np.float32).reshape(c, 1, 1, 1), "dw")
    bias = numpy_helper.from_array(np.ones(c, np.float32), "db")
    depthwise = model([helper.make_node("Conv", ["r", "dw", "db"], ["y"], group=c)], [dw, bias])
    strided = model([helper.make_node("Conv", ["r", "dw", "db"], ["y"], group=c, strides=[2, 2])], [dw, bias], 4)
    a, b, s = measure(mul_add, 1), measure(depthwise, 1), measure(strided, 1)
    assert (a.compute_nodes, a.depth) == (b.compute_nodes, b.depth) == (1, 1)
    assert (s.compute_nodes, s.depth) == (2, 2)
