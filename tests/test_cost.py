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


C = 4  # channels of the per-channel affine tests


def _chain(*tail: onnx.NodeProto, out_hw: int = 8, inits: tuple[onnx.TensorProto, ...] = ()) -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv3x3 (pads 1) -> h, then ``tail`` ending in y; random weights (the fusion tests run it)."""
    rng = np.random.default_rng(0)

    def arr(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.uniform(0.5, 1.5, shape).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), *tail]
    weights = [arr("w1", C, C, 3, 3), arr("w2", C, C, 3, 3), arr("s", C, 1, 1), arr("b", C, 1, 1),
               arr("dw", C, 1, 1, 1), arr("db", C), *inits]
    used = {i for n in nodes for i in n.input}
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, out_hw, out_hw])],
                          [w for w in weights if w.name in used])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _mul_add(src: str, dst: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Mul", [src, "s"], [src + "_m"]), helper.make_node("Add", [src + "_m", "b"], [dst])]


def test_per_channel_affine_is_no_layer_in_any_spelling() -> None:
    """Standalone per-channel Mul + Add and the 1x1 depthwise Conv the exact fusions may make of them count the
    same: no compute node, no depth, no MACs (a text detector read 64 -> 77 compute nodes after a rewrite that made
    it faster). A 1x1 depthwise Conv with a stride or padding, or a real 1x1 conv, still counts."""
    relu = helper.make_node("Relu", ["h"], ["r"])
    mul_add = _chain(relu, *_mul_add("r", "y"))
    depthwise = _chain(relu, helper.make_node("Conv", ["r", "dw", "db"], ["y"], group=C))
    same = _chain(relu, helper.make_node("Conv", ["r", "dw", "db"], ["y"], group=C, auto_pad="SAME_UPPER"))
    strided = _chain(relu, helper.make_node("Conv", ["r", "dw", "db"], ["y"], group=C, strides=[2, 2]), out_hw=4)
    padded = _chain(relu, helper.make_node("Conv", ["r", "dw", "db"], ["y"], group=C, pads=[1, 1, 1, 1]), out_hw=10)
    a, b, c = measure(mul_add, 1), measure(depthwise, 1), measure(same, 1)
    conv_macs = C * 64 * C * 9
    assert (a.compute_nodes, a.depth, a.macs) == (b.compute_nodes, b.depth, b.macs) == (1, 1, conv_macs)
    assert (c.compute_nodes, c.depth, c.macs) == (1, 1, conv_macs)
    s, p = measure(strided, 1), measure(padded, 1)
    assert (s.compute_nodes, s.depth, s.macs) == (2, 2, conv_macs + C * 16)
    assert (p.compute_nodes, p.depth) == (2, 2)
    pointwise = _chain(relu, helper.make_node("Conv", ["r", "pw"], ["y"]), inits=(_init("pw", C, C, 1, 1),))
    assert (measure(pointwise, 1).compute_nodes, measure(pointwise, 1).depth) == (2, 2)  # mixes channels: a layer


def test_exact_fusions_never_read_as_deeper() -> None:
    """Conv -> Mul -> Add (per channel) -> Relu -> Conv, and the same with the Mul/Add standing alone between two
    Relus, before and after the exact fusions: nodes go down, compute nodes, depth and MACs never up (the first
    pair folds into the Conv; the standalone pair may become a 1x1 depthwise Conv)."""
    from onnx_easier.fusion import fuse
    from onnx_easier.model_io import to_graph, to_model

    after_conv = _chain(*_mul_add("h", "a"), helper.make_node("Relu", ["a"], ["r"]),
                        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]))
    standalone = _chain(helper.make_node("Relu", ["h"], ["r0"]), *_mul_add("r0", "a"),
                        helper.make_node("Relu", ["a"], ["r"]),
                        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]))
    for model in (after_conv, standalone):
        graph = to_graph(onnx.shape_inference.infer_shapes(model))
        assert fuse(graph).changed
        fused = to_model(graph, model)
        onnx.checker.check_model(fused, full_check=True)
        before, after = measure(model, 1), measure(fused, 1)
        assert after.nodes < before.nodes
        assert (before.compute_nodes, before.depth) == (2, 2)
        assert after.compute_nodes <= before.compute_nodes and after.depth <= before.depth
        assert after.macs <= before.macs
