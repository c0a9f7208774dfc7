"""fuse_transpose: per-channel affines folded into ConvTranspose (after: any affine; before: pure scales only)."""
from __future__ import annotations

import numpy as np
import pytest

try:
    from test_pass_fuse_common import Net, apply, assert_same, ops
except ImportError:  # tests/ imported as a package
    from tests.test_pass_fuse_common import Net, apply, assert_same, ops

from onnx_easier.passes import fuse_transpose


def folded(net: Net):
    model = net.model()
    out, results, ctx = apply(model, fuse_transpose.run)
    assert_same(model, out)
    return out, results[0], ctx


def _convt(net: Net, x: str, cin: int, cout: int, group: int = 1, bias: bool = True, nd: int = 2, **attrs) -> str:
    w = net.weight(cin, cout // group, *([3] * nd))
    ins = [x, w] + ([net.const(net.rng.standard_normal(cout) * 0.1)] if bias else [])
    return net.node("ConvTranspose", *ins, group=group, **attrs)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nd", [1, 2])
def test_bn_after_convtranspose_folds(group: int, bias: bool, nd: int) -> None:
    net = Net()
    x = net.input("x", ["N", 4] + [5] * nd)
    h = _convt(net, x, 4, 6, group=group, bias=bias, nd=nd, strides=[2] * nd, pads=[1] * (2 * nd),
               output_padding=[1] * nd)
    net.output(net.bn(h, 6))
    out, res, ctx = folded(net)
    assert ops(out) == ["ConvTranspose"] and res.changed == 1
    assert len(next(iter(ctx.mapping.values())).sources) == 2


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_affines_after_convtranspose_fold_repeatedly(op: str) -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    h = _convt(net, x, 4, 6, strides=[2, 2])
    h = net.node(op, h, net.const(net.rng.uniform(0.5, 2.0, (6, 1, 1))))
    net.output(net.node("Mul", h, net.const(np.float32(3.0))))
    out, res, _ = folded(net)
    assert ops(out) == ["ConvTranspose"] and res.changed == 2


def test_scale_before_convtranspose_folds_but_a_shift_does_not() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    h = net.node("Mul", x, net.const(net.rng.uniform(0.5, 2.0, (1, 4, 1, 1))))
    net.output(_convt(net, h, 4, 6, group=2, strides=[2, 2]))
    out, _, _ = folded(net)
    assert ops(out) == ["ConvTranspose"]

    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    h = net.bn(x, 4)
    net.output(_convt(net, h, 4, 6, strides=[2, 2]))
    out, res, _ = folded(net)
    assert ops(out) == ["BatchNormalization", "ConvTranspose"]
    assert any("shift" in n for n in res.notes)


def test_shared_convtranspose_weight_is_not_folded() -> None:
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    w = net.weight(4, 6, 3, 3)
    a = net.node("ConvTranspose", x, w)
    b = net.node("ConvTranspose", x, w)
    net.output(net.bn(a, 6), b)
    out, res, _ = folded(net)
    assert ops(out).count("BatchNormalization") == 1
    assert any("also read by" in n for n in res.notes)
