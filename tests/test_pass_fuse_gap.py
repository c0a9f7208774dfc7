"""fuse_gap: GlobalAveragePool moved before position-wise linear elements; then the classifier fuses."""
from __future__ import annotations

import numpy as np

try:
    from test_pass_fuse_common import Net, apply, assert_same, ops
except ImportError:  # tests/ imported as a package
    from tests.test_pass_fuse_common import Net, apply, assert_same, ops

from onnx_easier.passes import fuse_chains, fuse_gap


def test_gap_moves_before_pointwise_conv_and_bn_then_fuses_with_the_head() -> None:
    net = Net()
    x = net.input("x", ["N", 8, 6, 6])
    h = net.bn(net.conv(x, 8, 32, k=1), 32)
    h = net.node("GlobalAveragePool", h, out="pooled")
    h = net.node("Flatten", h, axis=1)
    net.output(net.gemm(h, 32, 10, name="logits"))
    model = net.model()
    out, results, _ = apply(model, fuse_gap.run, fuse_chains.run)
    assert_same(model, out)
    assert results[0].changed == 2
    assert ops(out) == ["GlobalAveragePool", "Conv", "Flatten"]
    assert out.graph.output[0].name == "logits"


def test_gap_stays_after_spatial_or_strided_or_shared_elements() -> None:
    for kwargs in ({"k": 3}, {"k": 1, "strides": [2, 2]}, {"k": 1, "pads": [1, 1, 1, 1]}):
        net = Net()
        x = net.input("x", ["N", 4, 6, 6])
        net.output(net.node("GlobalAveragePool", net.conv(x, 4, 4, **kwargs)))
        model = net.model()
        out, results, _ = apply(model, fuse_gap.run)
        assert results[0].changed == 0 and ops(out) == ["Conv", "GlobalAveragePool"]

    net = Net()
    x = net.input("x", ["N", 4, 6, 6])
    c = net.conv(x, 4, 4, k=1)
    net.output(net.node("GlobalAveragePool", c), c)  # the conv output is also a graph output
    out, results, _ = apply(net.model(), fuse_gap.run)
    assert results[0].changed == 0


def test_gap_moves_before_a_per_channel_mul() -> None:
    net = Net()
    x = net.input("x", ["N", 4, "H", "W"])
    h = net.node("Mul", x, net.const(np.array([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1)))
    net.output(net.node("GlobalAveragePool", h, out="y"))
    model = net.model()
    out, results, _ = apply(model, fuse_gap.run)
    assert results[0].changed == 1 and ops(out) == ["GlobalAveragePool", "Mul"]
    assert_same(model, out)


def test_reduce_mean_over_spatial_axes_counts_as_a_global_pool() -> None:
    for opset, keepdims, moved in ((18, 1, True), (13, 1, True), (18, 0, False)):
        net = Net(opset=opset)
        x = net.input("x", ["N", 4, 5, 5])
        h = net.conv(x, 4, 6, k=1)
        if opset >= 18:
            h = net.node("ReduceMean", h, net.const(np.array([-1, -2], np.int64)), keepdims=keepdims)
        else:
            h = net.node("ReduceMean", h, axes=[2, 3], keepdims=keepdims)
        net.output(h)
        model = net.model()
        out, _, _ = apply(model, fuse_gap.run)
        assert_same(model, out)
        assert (ops(out) == ["ReduceMean", "Conv"]) is moved
