"""fuse_chains: every element kind, the cost-aware segmentation, the blockers. Each case checks ORT equivalence
(optimizations off, rtol 1e-4 / atol 1e-5), the op types left, onnx.checker (full) and strict shape inference."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

try:
    from test_pass_fuse_common import Net, apply, assert_same, feeds, ops
except ImportError:  # tests/ imported as a package
    from tests.test_pass_fuse_common import Net, apply, assert_same, feeds, ops

from onnx_easier.passes import cleanup, fuse_chains


def fused(net_or_model, *passes):
    model = net_or_model.model() if isinstance(net_or_model, Net) else net_or_model
    out, results, ctx = apply(model, *(passes or (cleanup.run, fuse_chains.run)))
    assert_same(model, out)
    notes = [n for r in results for n in r.notes]
    return out, notes, ctx


# ----------------------------------------------------------------------------------------------------------------
# BatchNormalization and per-channel affines


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn_folds(nd: int) -> None:
    net = Net()
    x = net.input("x", ["N", 3] + [5] * nd)
    net.output(net.bn(net.conv(x, 3, 4, nd=nd, pads=[1] * (2 * nd), name="conv"), 4, name="y"))
    out, _notes, ctx = fused(net)
    assert ops(out) == ["Conv"]
    assert next(iter(ctx.mapping.values())) == ("x", "y", ["conv", "y"])


def test_gemm_bn_on_nc_folds() -> None:
    net = Net()
    x = net.input("x", ["N", 6])
    net.output(net.bn(net.gemm(x, 6, 5), 5))
    out, _, _ = fused(net)
    assert ops(out) == ["Gemm"]


def test_bn_before_unpadded_conv_folds() -> None:
    net = Net()
    x = net.input("x", ["N", 3, 6, 6])
    net.output(net.conv(net.bn(x, 3), 3, 4, strides=[2, 2]))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]


def test_bn_before_padded_conv_stays_when_the_shift_would_leak() -> None:
    """A shift in front of a zero-padding conv varies near the borders: folding needs a bias-map Add, which costs
    what the BatchNormalization did; the tie keeps the graph as it was."""
    net = Net()
    x = net.input("x", ["N", 3, 6, 6])
    net.output(net.conv(net.bn(x, 3), 3, 4, pads=[1, 1, 1, 1]))
    out, _, _ = fused(net)
    assert ops(out) == ["BatchNormalization", "Conv"]


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("const_first", [False, True])
@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), ()])
def test_affine_after_conv_folds(op: str, const_first: bool, shape: tuple) -> None:
    if op == "Div" and const_first:
        pytest.skip("c / x is not linear")
    net = Net()
    x = net.input("x", ["N", 3, 5, 5])
    h = net.conv(x, 3, 4, pads=[1, 1, 1, 1])
    c = net.const(net.rng.uniform(0.5, 2.0, shape))
    net.output(net.node(op, *((c, h) if const_first else (h, c))))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_affine_before_conv_folds(op: str) -> None:
    net = Net()
    x = net.input("x", ["N", 3, 5, 5])
    h = net.node(op, x, net.const(net.rng.uniform(0.5, 2.0, (3, 1, 1))))
    net.output(net.conv(h, 3, 4, k=3, strides=[2, 1]))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]


def test_affines_alone_become_one_depthwise_conv_or_stay() -> None:
    net = Net()
    x = net.input("x", ["N", 3, 4, 4])
    h = net.node("Mul", x, net.const(np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)))
    net.output(net.node("Add", h, net.const(np.array([0.5, -1.0, 2.0]).reshape(3, 1, 1))))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]
    node = out.graph.node[0]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == 3

    net = Net()  # on [N, F] a Mul + Add is already as cheap as it gets: nothing to do
    x = net.input("x", ["N", 3])
    h = net.node("Mul", x, net.const(np.array([1.0, 2.0, 3.0])))
    net.output(net.node("Add", h, net.const(np.array([0.5, -1.0, 2.0]))))
    out, _, _ = fused(net)
    assert ops(out) == ["Mul", "Add"]


# ----------------------------------------------------------------------------------------------------------------
# conv -> conv


CONV_PAIRS = {
    "plain": ({"k": 3}, {"k": 1}),
    "stride": ({"k": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}, {"k": 1}),
    "stride-then-3x3": ({"k": 1, "strides": [2, 2]}, {"k": 3}),
    "dilation": ({"k": 3, "dilations": [2, 2], "pads": [2, 2, 2, 2]}, {"k": 1}),
    "groups": ({"k": 3, "group": 2, "pads": [1, 1, 1, 1]}, {"k": 1}),
    "asym-pads": ({"k": 3, "pads": [0, 1, 2, 1]}, {"k": 1}),
    "bias-map": ({"k": 1}, {"k": 3, "pads": [1, 1, 1, 1]}),
    "bias-map-stride": ({"k": 1, "strides": [2, 2]}, {"k": 3, "pads": [1, 0, 1, 1]}),
}


@pytest.mark.parametrize("case", list(CONV_PAIRS))
def test_conv_conv_fuses_exactly(case: str) -> None:
    first, second = CONV_PAIRS[case]
    net = Net()
    x = net.input("x", ["N", 8, 9, 9])
    h = net.conv(x, 8, 32, **first)
    net.output(net.conv(h, 32, 4, **second))
    out, notes, _ = fused(net)
    expected = ["Conv", "Add"] if case.startswith("bias-map") else ["Conv"]
    assert ops(out) == expected, notes


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_conv_other_ranks_with_bias_map(nd: int) -> None:
    net = Net()
    x = net.input("x", ["N", 4] + [6] * nd)
    h = net.conv(x, 4, 16, k=1, nd=nd)
    net.output(net.conv(h, 16, 2, k=3, nd=nd, pads=[1] * (2 * nd)))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv", "Add"]


def test_two_padded_3x3_convs_are_refused_with_the_border_reason() -> None:
    net = Net()
    x = net.input("x", ["N", 8, 7, 7])
    h = net.conv(x, 8, 32, k=3, pads=[1, 1, 1, 1])  # a fused 5x5 8->2 would be cheaper, but not exact
    net.output(net.conv(h, 32, 2, k=3, pads=[1, 1, 1, 1]))
    out, notes, _ = fused(net)
    assert ops(out) == ["Conv", "Conv"]
    assert any("zero-pads" in n for n in notes), notes


# ----------------------------------------------------------------------------------------------------------------
# the cost examples


def test_gemm_chain_48_192_160_24_becomes_one_gemm() -> None:
    net = Net()
    x = net.input("x", ["N", 48])
    net.output(net.gemm(net.gemm(net.gemm(x, 48, 192), 192, 160), 160, 24))
    out, _, ctx = fused(net)
    assert ops(out) == ["Gemm"]
    assert onnx.numpy_helper.to_array(out.graph.initializer[0]).shape in ((24, 48), (24,))
    (name, layer), = ctx.mapping.items()
    assert name.startswith("fused(") and len(layer.sources) == 3


def test_bottleneck_gemm_stays_two() -> None:
    net = Net()
    x = net.input("x", ["N", 192])
    net.output(net.gemm(net.gemm(x, 192, 12), 12, 192))
    out, notes, _ = fused(net)
    assert ops(out) == ["Gemm", "Gemm"]
    assert any("costs more" in n for n in notes)


def test_depthwise_then_pointwise_stays_two() -> None:
    net = Net()
    x = net.input("x", ["N", 24, 8, 8])
    h = net.conv(x, 24, 24, k=3, group=24, pads=[1, 1, 1, 1])
    net.output(net.conv(h, 24, 24, k=1))
    out, notes, _ = fused(net)
    assert ops(out) == ["Conv", "Conv"]
    assert any("costs more" in n for n in notes)


def test_strided_conv_bn_pointwise_becomes_one_conv() -> None:
    net = Net()
    x = net.input("x", ["N", 8, 9, 9])
    h = net.bn(net.conv(x, 8, 48, k=3, strides=[2, 2], pads=[1, 1, 1, 1]), 48)
    net.output(net.conv(h, 48, 8, k=1))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]


def _inverted_residual(net: Net, x: str) -> str:
    h = net.bn(net.conv(x, 16, 64, k=1), 64)
    h = net.bn(net.conv(h, 64, 64, k=3, group=64, pads=[1, 1, 1, 1]), 64)
    return net.bn(net.conv(h, 64, 16, k=1), 16)


def test_inverted_residual_becomes_one_3x3_conv() -> None:
    """No pair of the block is cheaper fused; the whole block is (the DP over the chain finds it). The expand
    layer's bias leaks through the depthwise padding: a bias-map Add carries it exactly."""
    net = Net()
    x = net.input("x", ["N", 16, 8, 8])
    net.output(_inverted_residual(net, x))
    out, _notes, _ = fused(net)
    assert ops(out) == ["Conv", "Add"]
    w = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name.endswith(".weight")))
    assert w.shape == (16, 16, 3, 3)
    bias_map = next(i for i in out.graph.initializer if i.name.endswith(".bias_map"))
    assert list(bias_map.dims) == [1, 16, 8, 8]


def test_inverted_residual_without_leak_has_no_bias_map() -> None:
    net = Net()
    x = net.input("x", ["N", 16, 8, 8])
    h = net.conv(x, 16, 64, k=1, bias=False)
    h = net.conv(h, 64, 64, k=3, group=64, pads=[1, 1, 1, 1])
    net.output(net.conv(h, 64, 16, k=1))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]


def test_symbolic_spatial_sizes_fold_the_bns_only() -> None:
    """Without static sizes the bias map cannot be computed: compose refuses the whole block, BNs still fold."""
    net = Net()
    x = net.input("x", ["N", 16, "H", "W"])
    net.output(_inverted_residual(net, x))
    model = net.model()
    out, notes, _ = fused(model)
    assert ops(out) == ["Conv", "Conv", "Conv"]
    assert any("in_spatial" in n for n in notes)
    assert_same(model, out, feeds(model, dim=7))


# ----------------------------------------------------------------------------------------------------------------
# dense layers: Gemm options, MatMul on [N, T, F]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", ["vector", "row", "scalar", "none"])
def test_gemm_options(trans_b: int, alpha: float, beta: float, c_shape: str) -> None:
    net = Net()
    x = net.input("x", ["N", 6])
    fin, fout = 6, 8
    w = net.weight(fout, fin) if trans_b else net.const(net.rng.standard_normal((fin, fout)) / 3)
    shapes = {"vector": (fout,), "row": (1, fout), "scalar": ()}
    ins = [x, w] + ([net.const(net.rng.standard_normal(shapes[c_shape]))] if c_shape != "none" else [])
    h = net.node("Gemm", *ins, transB=trans_b, alpha=alpha, beta=beta)
    net.output(net.gemm(h, 8, 3, trans_b=1 - trans_b))
    out, _, _ = fused(net)
    assert ops(out) == ["Gemm"]


def test_gemm_c_per_sample_is_refused() -> None:
    net = Net()
    x = net.input("x", [2, 6])
    h = net.node("Gemm", x, net.weight(4, 6), net.const(net.rng.standard_normal((2, 4))), transB=1)
    net.output(net.gemm(h, 4, 3))
    out, notes, _ = fused(net)
    assert ops(out) == ["Gemm", "Gemm"]
    assert any("batch axis" in n for n in notes)


def _ffn(net: Net, x: str, d: int, hidden: int, act: str = "Identity") -> str:
    h = net.node("MatMul", x, net.weight(d, hidden, scale=d ** -0.5))
    h = net.node("Add", h, net.const(net.rng.standard_normal(hidden) * 0.1))
    h = net.node(act, h)
    h = net.node("MatMul", h, net.weight(hidden, d, scale=hidden ** -0.5))
    return net.node("Add", h, net.const(net.rng.standard_normal(d) * 0.1))


def test_ffn_with_identity_activation_becomes_one_matmul_add() -> None:
    net = Net()
    x = net.input("x", ["N", "T", 16])
    net.output(_ffn(net, x, 16, 64))
    out, _, ctx = fused(net)
    assert ops(out) == ["MatMul", "Add"]
    (layer,) = ctx.mapping.values()
    assert len(layer.sources) == 4 and layer.input == "x"


def test_matmul_on_nf_becomes_gemm_and_scalar_mul_folds() -> None:
    net = Net()
    x = net.input("x", ["N", 10])
    h = net.node("MatMul", x, net.weight(10, 20))
    h = net.node("Mul", h, net.const(np.float32(0.5)))
    net.output(net.node("MatMul", h, net.weight(20, 4)))
    out, _, _ = fused(net)
    assert ops(out) == ["Gemm"]


def test_matmul_keeps_a_gelu() -> None:
    net = Net(opset=20)
    x = net.input("x", ["N", "T", 16])
    net.output(_ffn(net, x, 16, 64, act="Gelu"))
    out, _, _ = fused(net)
    assert ops(out) == ["MatMul", "Add", "Gelu", "MatMul", "Add"]


# ----------------------------------------------------------------------------------------------------------------
# see-through elements


def test_identity_and_dropout_are_seen_through() -> None:
    net = Net(opset=13)
    x = net.input("x", ["N", 4, 6, 6])
    h = net.conv(x, 4, 16, k=3)
    h = net.node("Identity", h)
    h = net.node("Dropout", h, net.const(np.float32(0.3)))
    net.output(net.conv(h, 16, 4, k=1))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]


@pytest.mark.parametrize("how", ["Flatten", "Reshape", "Squeeze"])
def test_conv_flatten_gemm_fuses_across_the_flatten(how: str) -> None:
    net = Net()
    x = net.input("x", ["N", 8, 3, 3])
    h = net.bn(net.conv(x, 8, 32, k=3), 32)  # -> [N, 32, 1, 1]
    if how == "Flatten":
        h = net.node("Flatten", h, axis=1)
    elif how == "Reshape":
        h = net.node("Reshape", h, net.const(np.array([-1, 32])))
    else:
        h = net.node("Squeeze", h, net.const(np.array([2, 3])))
    net.output(net.gemm(net.gemm(h, 32, 16), 16, 5))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv", "Flatten"]


def test_pad_is_absorbed_into_the_next_conv() -> None:
    net = Net()
    x = net.input("x", ["N", 3, 6, 6])
    h = net.node("Pad", x, net.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), mode="constant")
    net.output(net.conv(h, 3, 4, k=3))
    out, _, _ = fused(net)
    assert ops(out) == ["Conv"]
    pads = helper.get_attribute_value(next(a for a in out.graph.node[0].attribute if a.name == "pads"))
    assert pads == [1, 2, 2, 1]


def test_reflect_pad_and_channel_pad_are_kept() -> None:
    for pads, mode in (([0, 0, 1, 1, 0, 0, 1, 1], "reflect"), ([0, 1, 0, 0, 0, 0, 0, 0], "constant")):
        net = Net()
        x = net.input("x", ["N", 3, 6, 6])
        h = net.node("Pad", x, net.const(np.array(pads, np.int64)), mode=mode)
        net.output(net.conv(h, 4 if pads[1] else 3, 4, k=3))
        out, notes, _ = fused(net)
        assert ops(out) == ["Pad", "Conv"], notes


# ----------------------------------------------------------------------------------------------------------------
# blockers: each prevents the fusion, the output stays exact


def test_shared_weight_blocks() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    w = net.weight(4, 4, 1, 1)
    a = net.node("Conv", x, w)
    b = net.node("Conv", a, net.weight(2, 4, 1, 1))
    c = net.node("Conv", x, w)  # another reader of w
    net.output(b, c)
    out, notes, _ = fused(net)
    assert ops(out).count("Conv") == 3
    assert any("also read by" in n for n in notes)


def test_two_readers_block() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    a = net.conv(x, 4, 16, k=3)
    net.output(net.conv(a, 16, 2, k=1), net.node("Relu", a))
    out, notes, _ = fused(net)
    assert ops(out) == ["Conv", "Conv", "Relu"]
    assert any("2 readers" in n for n in notes)


def test_graph_output_in_the_middle_blocks() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    a = net.conv(x, 4, 16, k=3)
    net.output(a, net.conv(a, 16, 2, k=1))
    out, notes, _ = fused(net)
    assert ops(out) == ["Conv", "Conv"]
    assert any("graph output" in n for n in notes)


def test_initializer_that_is_a_graph_input_is_never_folded() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    s = net.const(np.full((4, 1, 1), 2.0, np.float32), name="scale")
    net.inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [4, 1, 1]))
    h = net.conv(x, 4, 4, k=1)
    net.output(net.node("Mul", h, s))
    model = net.model()
    out, _, _ = fused(model)
    assert ops(out) == ["Conv", "Mul"]
    assert "scale" in {i.name for i in out.graph.initializer} and "scale" in {i.name for i in out.graph.input}
    data = feeds(model)
    data["scale"] = np.full((4, 1, 1), -3.0, np.float32)  # the user feeds it: the result must follow
    assert_same(model, out, data)


def test_dequantized_weights_are_not_constants() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    q = net.const(np.random.default_rng(0).integers(-5, 5, (8, 4, 1, 1)).astype(np.int8))
    w = net.node("DequantizeLinear", q, net.const(np.float32(0.1)))
    h = net.node("Conv", x, w)
    net.output(net.conv(h, 8, 2, k=1))
    out, notes, _ = fused(net)
    assert ops(out) == ["DequantizeLinear", "Conv", "Conv"]
    assert any("not a constant" in n for n in notes)


# ----------------------------------------------------------------------------------------------------------------
# dtypes, names


def test_float16_weights_stay_float16() -> None:
    net = Net(dtype=np.float16)
    x = net.input("x", ["N", 3, 6, 6])
    h = net.bn(net.conv(x, 3, 16, k=3, pads=[1, 1, 1, 1]), 16)
    net.output(net.conv(h, 16, 4, k=1))
    model = net.model()
    out, _, _ = apply(model, fuse_chains.run)
    assert ops(out) == ["Conv"]
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.FLOAT16}
    # fp16 keeps ~3 decimal digits: compared at fp16 resolution, not at the fp32 tolerance
    assert_same(model, out, rtol=1e-2, atol=1e-2)


def test_graph_output_names_and_downstream_readers_survive() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    h = net.bn(net.conv(x, 4, 4, k=1, name="mid"), 4, name="bn_out")
    net.output(net.node("Relu", h, out="y"))
    out, _, ctx = fused(net)
    assert ops(out) == ["Conv", "Relu"]
    assert out.graph.node[0].output[0] == "bn_out" and out.graph.node[1].input[0] == "bn_out"
    assert out.graph.node[0].name == "fused(mid+bn_out)"
    assert ctx.mapping["fused(mid+bn_out)"] == ("x", "bn_out", ["mid", "bn_out"])


def test_second_run_changes_nothing() -> None:
    net = Net()
    x = net.input("x", ["N", 16, 8, 8])
    net.output(_inverted_residual(net, x))
    once, _, _ = fused(net)
    twice, results, _ = apply(once, fuse_chains.run)
    assert results[0].changed == 0 and ops(twice) == ops(once)


def test_bfloat16_matmul_chain_stays_bfloat16() -> None:
    """ORT's CPU provider has no bf16 MatMul: checked with the ONNX reference evaluator at bf16 resolution (8 bits
    of mantissa: relative steps of 2^-8), since the fused weights are rounded once instead of twice."""
    bf16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    net = Net(dtype=bf16)
    x = net.input("x", ["N", 5, 16])
    h = net.node("Add", net.node("MatMul", x, net.weight(16, 32)), net.const(np.full(32, 0.1)))
    net.output(net.node("Add", net.node("MatMul", h, net.weight(32, 4)), net.const(np.full(4, 0.1))))
    model = net.model()
    out, _, _ = apply(model, fuse_chains.run)
    assert ops(out) == ["MatMul", "Add"]
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.BFLOAT16}
    data = {"x": np.random.default_rng(0).standard_normal((2, 5, 16)).astype(bf16)}
    a = ReferenceEvaluator(model).run(None, data)[0].astype(np.float32)
    b = ReferenceEvaluator(out).run(None, data)[0].astype(np.float32)
    assert np.abs(a - b).max() <= 2 ** -5 * np.abs(a).max()


def test_block_diagonal_dense_product_is_emitted_dense() -> None:
    """Two block-diagonal Gemms compose to a block-diagonal weight (regrouped to 2 groups); Gemm has no groups, so
    the emitted weight is the dense one."""
    net = Net()
    x = net.input("x", ["N", 8])
    blocks = []
    for _ in range(2):
        w = np.zeros((8, 8))
        w[:4, :4], w[4:, 4:] = net.rng.standard_normal((4, 4)), net.rng.standard_normal((4, 4))
        blocks.append(net.const(w))
    h = net.node("Gemm", x, blocks[0], transB=1)
    net.output(net.node("Gemm", h, blocks[1], net.const(np.ones(8)), transB=1))
    out, _, _ = fused(net)
    assert ops(out) == ["Gemm"]
    assert list(out.graph.initializer[0].dims) in ([8, 8], [8])


def test_unnamed_nodes_get_labels_in_names_and_mapping() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    net.output(net.bn(net.conv(x, 4, 4, k=1, name="h"), 4, name="y"))
    model = net.model()
    for n in model.graph.node:
        n.name = ""
    _, _, ctx = fused(model)
    assert ctx.mapping == {"fused(<Conv:h>+<BatchNormalization:y>)": ("x", "y", ["<Conv:h>", "<BatchNormalization:y>"])}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_chains_stay_exact(data) -> None:
    """Random chains of convs (kernel, stride, dilation, pads, groups), BNs and per-channel affines on 1-d or 2-d
    inputs of static or symbolic size: whatever the partition chosen, the output is unchanged."""
    nd = data.draw(st.sampled_from([1, 2]), label="nd")
    symbolic = data.draw(st.booleans(), label="symbolic")
    net = Net(seed=data.draw(st.integers(0, 1000), label="seed"))
    c = data.draw(st.sampled_from([2, 4]), label="c0")
    size = 9
    h = net.input("x", ["N", c] + (["S"] * nd if symbolic else [size] * nd))
    for i in range(data.draw(st.integers(2, 4), label="length")):
        kind = data.draw(st.sampled_from(["conv", "conv", "bn", "mul", "add"]), label=f"kind{i}")
        if kind == "conv":
            cout = data.draw(st.sampled_from([2, 4, 8]), label=f"cout{i}")
            k = data.draw(st.sampled_from([1, 3]), label=f"k{i}")
            s = data.draw(st.sampled_from([1, 1, 2]), label=f"s{i}")
            d = data.draw(st.sampled_from([1, 2]), label=f"d{i}") if k > 1 else 1
            p = data.draw(st.integers(0, d * (k - 1)), label=f"p{i}")
            g = data.draw(st.sampled_from([1, 2]), label=f"g{i}")
            size = (size + 2 * p - d * (k - 1) - 1) // s + 1
            if size < 1:
                break
            h = net.conv(h, c, cout, k=k, nd=nd, strides=[s] * nd, dilations=[d] * nd, pads=[p] * (2 * nd), group=g)
            c = cout
        elif kind == "bn":
            h = net.bn(h, c)
        else:
            shape = data.draw(st.sampled_from([(c,) + (1,) * nd, ()]), label=f"shape{i}")
            h = net.node("Mul" if kind == "mul" else "Add", h, net.const(net.rng.uniform(0.5, 1.5, shape)))
    net.output(h)
    model = net.model()
    out, _, _ = apply(model, cleanup.run, fuse_chains.run)
    assert_same(model, out, feeds(model, dim=9))
    assert len(out.graph.node) <= len(model.graph.node) + 1


def test_a_bias_shared_with_another_layer_does_not_block() -> None:
    """Exporters and constant merging share equal vectors (every zero bias of a fresh network) between unrelated
    layers: the chain still fuses, the other reader keeps the old constant, and the outputs stay exact."""
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    bias = net.weight(4)
    a = net.node("Conv", x, net.weight(4, 4, 1, 1), bias)
    b = net.node("Conv", a, net.weight(2, 4, 1, 1))
    c = net.node("Conv", x, net.weight(4, 4, 1, 1), bias)  # another reader of the bias
    net.output(b, c)
    out, notes, _ = fused(net)
    assert ops(out).count("Conv") == 2, notes
