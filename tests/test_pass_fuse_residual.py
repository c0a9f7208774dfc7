"""fuse_residual: ``x + f(x)`` and ``g(x) + h(x)`` folds, ``sum_layers`` against the numpy reference, refusals."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from test_pass_fuse_common import Net, apply, assert_same, feeds, ops
except ImportError:  # tests/ imported as a package
    from tests.test_pass_fuse_common import Net, apply, assert_same, feeds, ops

from onnx_easier.linear_math import conv_forward, make_layer
from onnx_easier.passes import cleanup, fuse_chains, fuse_residual
from onnx_easier.passes.fuse_residual import sum_layers

PASSES = (cleanup.run, fuse_chains.run, fuse_residual.run, fuse_chains.run)


def folded(net_or_model, passes=PASSES, data=None):
    model = net_or_model.model() if isinstance(net_or_model, Net) else net_or_model
    out, results, ctx = apply(model, *passes)
    assert_same(model, out, data)
    return out, [n for r in results for n in r.notes], ctx


# ----------------------------------------------------------------------------------------------------------------
# sum_layers (pure math)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_sum_layers_matches_the_sum_of_both(data) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    nd = data.draw(st.integers(1, 2))
    stride = data.draw(st.integers(1, 2))
    size = data.draw(st.integers(5, 9))

    def layer(groups: int) -> object:
        k = data.draw(st.integers(1, 3))
        d = data.draw(st.integers(1, 2))
        span = d * (k - 1)
        pb = data.draw(st.integers(0, span + 1))
        return make_layer(rng.standard_normal((4, 4 // groups) + (k,) * nd), rng.standard_normal(4),
                          (stride,) * nd, (d,) * nd, (pb,) * nd + (span - pb + 1,) * nd, groups)

    a, b = layer(data.draw(st.sampled_from([1, 2, 4]))), layer(data.draw(st.sampled_from([1, 4])))
    fused = sum_layers(a, b, (size,) * nd)
    x = rng.standard_normal((2, 4) + (size,) * nd)
    ya, yb = conv_forward(x, a), conv_forward(x, b)
    if isinstance(fused, str):
        assert ya.shape != yb.shape or "output sizes" in fused
        return
    np.testing.assert_allclose(conv_forward(x, fused), ya + yb, rtol=1e-10, atol=1e-10)


def test_sum_layers_refusals() -> None:
    a = make_layer(np.ones((4, 4, 3, 3)), pads=(1, 1, 1, 1))
    assert "strides" in sum_layers(a, make_layer(np.ones((4, 4, 1, 1)), strides=(2, 2)), (6, 6))
    assert "output sizes" in sum_layers(a, make_layer(np.ones((4, 4, 1, 1)), pads=(1, 1, 1, 1)), None)
    assert "differ in shape" in sum_layers(a, make_layer(np.ones((2, 4, 1, 1))), None)
    dense = sum_layers(make_layer(np.eye(3)), make_layer(2 * np.eye(3), np.ones(3)), None)
    np.testing.assert_allclose(dense.weight.reshape(3, -1) if dense.groups == 3 else dense.weight,
                               3 * np.ones((3, 1)) if dense.groups == 3 else 3 * np.eye(3))


# ----------------------------------------------------------------------------------------------------------------
# identity residuals


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn_plus_x_becomes_one_conv(nd: int) -> None:
    net = Net()
    x = net.input("x", ["N", 6] + [5] * nd)
    y = net.bn(net.conv(x, 6, 6, k=3, nd=nd, pads=[1] * (2 * nd), name="conv"), 6, name="bn")
    net.output(net.node("Add", x, y, out="y"))
    out, _, ctx = folded(net)
    assert ops(out) == ["Conv"]
    assert ctx.mapping == {"fused(conv+bn+y)": ("x", "y", ["conv", "bn", "y"])}


def test_depthwise_plus_x_stays_depthwise() -> None:
    net = Net()
    x = net.input("x", ["N", 8, 6, 6])
    net.output(net.node("Add", net.conv(x, 8, 8, k=3, group=8, pads=[1, 1, 1, 1]), x))
    out, _, _ = folded(net)
    assert ops(out) == ["Conv"]
    group = next(a.i for a in out.graph.node[0].attribute if a.name == "group")
    assert group == 8


def test_symbolic_spatial_residual_folds() -> None:
    net = Net()
    x = net.input("x", ["N", 8, "H", "W"])
    net.output(net.node("Add", net.bn(net.conv(x, 8, 8, k=3, pads=[1, 1, 1, 1]), 8), x))
    model = net.model()
    out, _, _ = folded(model, data=feeds(model, dim=5))
    assert ops(out) == ["Conv"]


def test_ffn_with_residual_folds_the_identity() -> None:
    net = Net()
    x = net.input("x", ["N", "T", 16])
    h = net.node("MatMul", x, net.weight(16, 64, scale=0.25))
    h = net.node("Add", h, net.const(net.rng.standard_normal(64) * 0.1))
    h = net.node("Identity", h)  # the linearized GELU
    h = net.node("MatMul", h, net.weight(64, 16, scale=0.125))
    h = net.node("Add", h, net.const(net.rng.standard_normal(16) * 0.1))
    net.output(net.node("Add", x, h, out="y"))
    out, _, ctx = folded(net)
    assert ops(out) == ["MatMul", "Add"]
    (layer,) = ctx.mapping.values()
    assert layer.input == "x" and layer.output == "y" and layer.sources[-1] == "y"


def test_inverted_residual_with_skip_keeps_its_bias_map() -> None:
    net = Net()
    x = net.input("x", ["N", 16, 8, 8])
    h = net.bn(net.conv(x, 16, 64, k=1), 64)
    h = net.bn(net.conv(h, 64, 64, k=3, group=64, pads=[1, 1, 1, 1]), 64)
    h = net.bn(net.conv(h, 64, 16, k=1), 16)
    net.output(net.node("Add", x, h))
    out, _, ctx = folded(net)
    assert ops(out) == ["Conv", "Add"]
    (layer,) = ctx.mapping.values()
    assert len(layer.sources) == 7 and all("/" not in s for s in layer.sources)


def test_strided_or_channel_changing_branch_is_refused() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 6, 6])
    a = net.conv(x, 4, 4, k=1, strides=[2, 2])
    net.output(net.node("Add", net.node("MaxPool", x, kernel_shape=[1, 1], strides=[2, 2]), a))
    out, _, _ = folded(net)
    assert "Add" in ops(out)

    net = Net()  # a bottleneck with a skip: folding builds a 32x32 dense layer, costlier than 32->2->32
    x = net.input("x", ["N", 32])
    net.output(net.node("Add", x, net.gemm(net.gemm(x, 32, 2), 2, 32)))
    out, notes, _ = folded(net)
    assert ops(out) == ["Gemm", "Gemm", "Add"]
    assert any("costs more" in n for n in notes)


def test_residual_with_shared_weight_or_graph_output_inside_is_kept() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    w = net.weight(4, 4, 1, 1)
    a = net.node("Conv", x, w)
    other = net.node("Conv", x, w)
    net.output(net.node("Add", x, a), other)
    out, notes, _ = folded(net)
    assert ops(out).count("Add") == 1
    assert any("also read by" in n for n in notes)

    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    a = net.conv(x, 4, 4, k=1)
    net.output(net.node("Add", x, a), a)
    out, _, _ = folded(net)
    assert ops(out) == ["Conv", "Add"]


# ----------------------------------------------------------------------------------------------------------------
# two branches


def test_repvgg_block_becomes_one_conv() -> None:
    """(BN(conv3x3(x)) + BN(conv1x1(x))) + BN(x): both Adds fold (nested patterns, one pass)."""
    net = Net()
    x = net.input("x", ["N", 8, 6, 6])
    a = net.bn(net.conv(x, 8, 8, k=3, pads=[1, 1, 1, 1], bias=False), 8)
    b = net.bn(net.conv(x, 8, 8, k=1, bias=False), 8)
    net.output(net.node("Add", net.node("Add", a, b), net.bn(x, 8)))
    out, _, ctx = folded(net)
    assert ops(out) == ["Conv"]
    (layer,) = ctx.mapping.values()
    assert len(layer.sources) == 7


@pytest.mark.parametrize("case", ["dilated", "asymmetric", "strided", "dense"])
def test_two_branch_geometries(case: str) -> None:
    net = Net()
    if case == "dense":
        x = net.input("x", ["N", 6])
        net.output(net.node("Add", net.gemm(x, 6, 5), net.node("MatMul", x, net.weight(6, 5))))
        out, _, _ = folded(net)
        assert ops(out) == ["Gemm"]
        return
    x = net.input("x", ["N", 4, 9, 9])
    if case == "dilated":
        a = net.conv(x, 4, 8, k=3, dilations=[2, 2], pads=[2, 2, 2, 2])
        b = net.conv(x, 4, 8, k=1)  # its tap lands on the dilated grid: the sum stays a 3x3 with dilation 2
    elif case == "asymmetric":
        a = net.conv(x, 4, 8, k=3, pads=[2, 0, 0, 2])
        b = net.conv(x, 4, 8, k=1)
    else:
        a = net.conv(x, 4, 8, k=3, strides=[2, 2], pads=[1, 1, 1, 1])
        b = net.conv(x, 4, 8, k=1, strides=[2, 2])
    net.output(net.node("Add", a, b))
    out, notes, _ = folded(net)
    assert ops(out) == ["Conv"], notes


def test_two_branches_of_different_geometry_fold_or_are_refused_exactly() -> None:
    net = Net()  # pad-1 3x3 then valid 3x3 is one exact 5x5 (pad 1): it sums with a 5x5
    x = net.input("x", ["N", 4, 6, 6])
    a = net.conv(x, 4, 4, k=5, pads=[1, 1, 1, 1])
    b = net.conv(net.conv(x, 4, 4, k=3, pads=[1, 1, 1, 1]), 4, 4, k=3)
    net.output(net.node("Add", a, b))
    out, _, _ = folded(net)
    assert ops(out) == ["Conv"]

    net = Net()  # two padded 3x3 in a branch are not one layer: the Add stays
    x = net.input("x", ["N", 4, 6, 6])
    a = net.conv(x, 4, 4, k=5, pads=[2, 2, 2, 2])
    b = net.conv(net.conv(x, 4, 4, k=3, pads=[1, 1, 1, 1]), 4, 4, k=3, pads=[1, 1, 1, 1])
    net.output(net.node("Add", a, b))
    out, notes, _ = folded(net)
    assert ops(out) == ["Conv", "Conv", "Conv", "Add"]
    assert any("zero-pads" in n for n in notes)


def test_two_branches_where_the_sum_costs_more_are_refused() -> None:
    net = Net()
    x = net.input("x", ["N", 16, 6, 6])
    a = net.conv(x, 16, 16, k=3, group=16, pads=[1, 1, 1, 1])  # depthwise 3x3
    b = net.conv(x, 16, 16, k=1)  # dense 1x1: their sum is a dense 3x3
    net.output(net.node("Add", a, b))
    out, notes, _ = folded(net)
    assert ops(out) == ["Conv", "Conv", "Add"]
    assert any("costs more" in n for n in notes)
