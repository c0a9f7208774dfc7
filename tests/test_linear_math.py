"""linear_math against torch.nn.functional in float64: the reference conv, composition, residuals, BN, costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_easier.linear_math import (
    Composed,
    ConvLayer,
    _fuse_linear,
    add_identity,
    affine_layer,
    bn_affine,
    compose,
    conv_forward,
    conv_macs,
    conv_params,
    fused_layout,
    make_layer,
    output_spatial,
    regroup,
    to_dense,
)

RTOL, ATOL = 1e-9, 1e-10


# --------------------------------------------------------------------------------------------------------------------
# helpers


def rand_layer(
    rng: np.random.Generator,
    cin: int,
    cout: int,
    kernel: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
    pads: tuple[int, ...] | None = None,
    groups: int = 1,
    bias: bool = True,
) -> ConvLayer:
    weight = rng.normal(size=(cout, cin // groups) + tuple(kernel))
    b = rng.normal(size=cout) if bias else None
    return make_layer(weight, b, strides, dilations, pads, groups)


def torch_conv(x: np.ndarray, layer: ConvLayer) -> np.ndarray:
    """The layer through torch.nn.functional (F.pad for asymmetric pads)."""
    xt = torch.tensor(x, dtype=torch.float64)
    w = torch.tensor(layer.weight)
    b = torch.tensor(layer.bias)
    nd = layer.nd
    if nd == 0:
        if layer.groups == 1:
            return F.linear(xt, w, b).numpy()
        return F.conv1d(xt[..., None], w[..., None], b, groups=layer.groups)[..., 0].numpy()
    torch_pads: list[int] = []
    for a in reversed(range(nd)):
        torch_pads += [layer.pads[a], layer.pads[nd + a]]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(
        F.pad(xt, torch_pads), w, b, stride=layer.strides, dilation=layer.dilations, groups=layer.groups
    ).numpy()


def torch_chain(x: np.ndarray, layers: list[ConvLayer]) -> np.ndarray:
    for layer in layers:
        x = torch_conv(x, layer)
    return x


def fused_forward(x: np.ndarray, composed: Composed) -> np.ndarray:
    y = conv_forward(x, composed.layer)
    return y if composed.bias_map is None else y + composed.bias_map


def composed_ok(layers: list[ConvLayer], in_spatial: tuple[int, ...] | None) -> Composed:
    result = compose(layers, in_spatial)
    assert isinstance(result, Composed), result
    return result


def check_chain(rng: np.random.Generator, layers: list[ConvLayer], spatial: tuple[int, ...], known: bool = True):
    result = composed_ok(layers, spatial if known else None)
    x = rng.normal(size=(2, layers[0].cin) + spatial)
    expected = torch_chain(x, layers)
    np.testing.assert_allclose(fused_forward(x, result), expected, rtol=RTOL, atol=ATOL)
    return result


# --------------------------------------------------------------------------------------------------------------------
# conv_forward against torch


def _forward_grid() -> list[tuple]:
    cases = []
    pad_kinds = ("0", "1", "2", "asym")
    for nd in (1, 2):
        for k in (1, 3, 5):
            for s in (1, 2):
                for groups in (1, 2, 4):
                    for pad in pad_kinds:
                        for d in (1, 2):
                            cases.append((nd, k, s, groups, pad, d))
    for k in (1, 3):
        for s in (1, 2):
            for groups in (1, 4):
                for pad in ("0", "asym"):
                    for d in (1, 2):
                        cases.append((3, k, s, groups, pad, d))
    return cases


def _pads(kind: str, nd: int) -> tuple[int, ...]:
    if kind == "asym":
        return (2, 0, 1)[:nd] + (0, 1, 2)[:nd]
    return (int(kind),) * (2 * nd)


@pytest.mark.parametrize(("nd", "k", "s", "groups", "pad", "d"), _forward_grid())
def test_conv_forward_matches_torch(nd: int, k: int, s: int, groups: int, pad: str, d: int) -> None:
    rng = np.random.default_rng(hash((nd, k, s, groups, pad, d)) % 2**32)
    spatial = {1: (11,), 2: (10, 9), 3: (6, 5, 7)}[nd]
    layer = rand_layer(rng, 4, 8, (k,) * nd, (s,) * nd, (d,) * nd, _pads(pad, nd), groups)
    x = rng.normal(size=(2, 4) + spatial)
    y = conv_forward(x, layer)
    assert y.shape[2:] == output_spatial(layer, spatial)
    np.testing.assert_allclose(y, torch_conv(x, layer), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_forward_dense_layer(groups: int) -> None:
    rng = np.random.default_rng(groups)
    layer = rand_layer(rng, 4, 8, (), groups=groups)
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(conv_forward(x, layer), torch_conv(x, layer), rtol=RTOL, atol=ATOL)
    if groups == 1:
        np.testing.assert_allclose(conv_forward(x, layer), x @ layer.weight.T + layer.bias, rtol=RTOL)


def test_make_layer_defaults_and_validation() -> None:
    layer = make_layer(np.ones((2, 3, 3, 3), dtype=np.float32))
    assert layer.weight.dtype == np.float64
    assert (layer.strides, layer.dilations, layer.pads, layer.groups) == ((1, 1), (1, 1), (0, 0, 0, 0), 1)
    assert (layer.nd, layer.cin, layer.cout, layer.kernel) == (2, 3, 2, (3, 3))
    np.testing.assert_array_equal(layer.bias, np.zeros(2))
    assert not layer.weight.flags.writeable
    with pytest.raises(ValueError):
        make_layer(np.ones((2, 3, 3)), pads=(1,))
    with pytest.raises(ValueError):
        make_layer(np.ones((3, 1, 3)), groups=2)
    with pytest.raises(ValueError):
        make_layer(np.ones((2, 1, 3)), strides=(0,))
    with pytest.raises(ValueError):
        output_spatial(make_layer(np.ones((2, 1, 5))), (3,))


def test_output_spatial_formula() -> None:
    layer = make_layer(np.ones((1, 1, 3, 3)), strides=(2, 2), dilations=(1, 2), pads=(1, 0, 1, 2))
    # floor((S + pb + pe - d*(k-1) - 1) / s) + 1
    assert output_spatial(layer, (8, 9)) == ((8 + 2 - 2 - 1) // 2 + 1, (9 + 2 - 4 - 1) // 2 + 1)
    assert output_spatial(layer, (8, 9)) == tuple(torch_conv(np.zeros((1, 1, 8, 9)), layer).shape[2:])


# --------------------------------------------------------------------------------------------------------------------
# dense form and regrouping


def test_to_dense_is_block_diagonal_and_equivalent() -> None:
    rng = np.random.default_rng(1)
    layer = rand_layer(rng, 4, 6, (3,), groups=2)
    dense = to_dense(layer)
    assert dense.groups == 1 and dense.weight.shape == (6, 4, 3)
    assert not dense.weight[:3, 2:].any() and not dense.weight[3:, :2].any()
    x = rng.normal(size=(2, 4, 7))
    np.testing.assert_allclose(conv_forward(x, dense), conv_forward(x, layer), rtol=RTOL)


@pytest.mark.parametrize(
    ("cin", "cout", "groups", "expected"),
    [(6, 6, 6, 6), (4, 8, 4, 4), (4, 6, 2, 2), (6, 9, 3, 3), (4, 4, 1, 1)],
)
def test_regroup_detects_structure(cin: int, cout: int, groups: int, expected: int) -> None:
    rng = np.random.default_rng(cin * cout)
    layer = rand_layer(rng, cin, cout, (3, 3), groups=groups)
    found = regroup(to_dense(layer))
    assert found.groups == expected
    np.testing.assert_array_equal(found.weight, layer.weight)
    np.testing.assert_array_equal(found.bias, layer.bias)


def test_regroup_keeps_finer_structure_than_declared() -> None:
    # declared groups=2 but actually depthwise: regroup finds groups=4
    rng = np.random.default_rng(2)
    dw = rand_layer(rng, 4, 4, (3,), groups=4)
    assert regroup(to_dense(dw)).groups == 4
    dense = to_dense(dw).weight
    declared = make_layer(np.stack([dense[o, (o // 2) * 2 : (o // 2) * 2 + 2] for o in range(4)]), dw.bias, groups=2)
    x = rng.normal(size=(1, 4, 6))
    np.testing.assert_allclose(conv_forward(x, declared), conv_forward(x, dw), rtol=RTOL)
    assert regroup(declared).groups == 4


# --------------------------------------------------------------------------------------------------------------------
# BatchNormalization and affine layers


def test_bn_affine_matches_batch_norm() -> None:
    rng = np.random.default_rng(3)
    gamma, beta, mean = rng.normal(size=(3, 5))
    var = rng.uniform(0.1, 2.0, size=5)
    eps = 1e-3
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    x = rng.normal(size=(2, 5, 4, 3))
    expected = F.batch_norm(
        torch.tensor(x), torch.tensor(mean), torch.tensor(var), torch.tensor(gamma), torch.tensor(beta), False, 0.0, eps
    ).numpy()
    np.testing.assert_allclose(conv_forward(x, affine_layer(scale, shift, 2)), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scale * x.transpose(0, 2, 3, 1) + shift, expected.transpose(0, 2, 3, 1), rtol=RTOL)


def test_affine_layer_is_depthwise() -> None:
    layer = affine_layer(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -1.0]), 3)
    assert layer.groups == 3 and layer.weight.shape == (3, 1, 1, 1, 1)
    x = np.random.default_rng(0).normal(size=(1, 3, 2, 2, 2))
    np.testing.assert_allclose(conv_forward(x, layer), torch_conv(x, layer), rtol=RTOL)


# --------------------------------------------------------------------------------------------------------------------
# composition


def test_pointwise_then_3x3_pad1_with_bias_gives_bias_map() -> None:
    rng = np.random.default_rng(4)
    layers = [rand_layer(rng, 3, 5, (1, 1)), rand_layer(rng, 5, 4, (3, 3), pads=(1, 1, 1, 1))]
    result = check_chain(rng, layers, (6, 7))
    assert result.layer.kernel == (3, 3) and result.layer.groups == 1 and result.layer.pads == (1, 1, 1, 1)
    assert result.bias_map is not None and result.bias_map.shape == (4, 6, 7)
    assert not result.layer.bias.any()
    # interior positions see the full kernel, so the map is constant there and varies at the borders
    assert np.ptp(result.bias_map[:, 1:-1, 1:-1], axis=(1, 2)).max() < 1e-12
    assert np.ptp(result.bias_map, axis=(1, 2)).min() > 1e-6
    # without the input size the constant term cannot be placed
    assert isinstance(compose(layers, None), str)


def test_pointwise_then_3x3_pad1_without_bias_is_size_independent() -> None:
    rng = np.random.default_rng(5)
    layers = [rand_layer(rng, 3, 5, (1, 1), bias=False), rand_layer(rng, 5, 4, (3, 3), pads=(1, 1, 1, 1))]
    result = check_chain(rng, layers, (6, 7), known=False)
    assert result.bias_map is None
    np.testing.assert_allclose(result.layer.bias, layers[1].bias)


@pytest.mark.parametrize("spatial", [(8, 8), (7, 9)])
def test_mobilenet_inverted_residual(spatial: tuple[int, int]) -> None:
    rng = np.random.default_rng(6)
    layers = [
        rand_layer(rng, 16, 64, (1, 1)),
        rand_layer(rng, 64, 64, (3, 3), pads=(1, 1, 1, 1), groups=64),
        rand_layer(rng, 64, 16, (1, 1)),
    ]
    result = check_chain(rng, layers, spatial)
    assert result.layer.weight.shape == (16, 16, 3, 3) and result.layer.groups == 1
    assert result.bias_map is not None and result.bias_map.shape == (16,) + spatial
    # the residual x + block(x): identity added to the fused layer, the bias map added separately
    residual = add_identity(result.layer, spatial)
    assert isinstance(residual, ConvLayer)
    x = rng.normal(size=(2, 16) + spatial)
    np.testing.assert_allclose(
        conv_forward(x, residual) + result.bias_map, x + torch_chain(x, layers), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("size", [7, 8, 9, 10])
def test_strided_3x3_then_pointwise(size: int) -> None:
    rng = np.random.default_rng(7)
    layers = [rand_layer(rng, 3, 6, (3, 3), (2, 2), pads=(1, 1, 1, 1)), rand_layer(rng, 6, 5, (1, 1))]
    for known in (True, False):
        result = check_chain(rng, layers, (size, size + 1), known=known)
        assert result.bias_map is None
        assert result.layer.strides == (2, 2) and result.layer.kernel == (3, 3)


def test_bn_as_affine_in_the_middle() -> None:
    rng = np.random.default_rng(8)
    var = rng.uniform(0.5, 2.0, size=6)
    scale, shift = bn_affine(rng.normal(size=6), rng.normal(size=6), rng.normal(size=6), var, 1e-5)
    bn = affine_layer(scale, shift, 2)
    # conv 3x3 -> BN -> 1x1: uniform constant, size independent
    layers = [rand_layer(rng, 3, 6, (3, 3), pads=(1, 1, 1, 1)), bn, rand_layer(rng, 6, 4, (1, 1))]
    result = check_chain(rng, layers, (5, 6), known=False)
    assert result.bias_map is None
    # 1x1 -> BN -> 3x3 pad 1: the BN shift is padded by the 3x3, a bias map
    layers = [rand_layer(rng, 3, 6, (1, 1)), bn, rand_layer(rng, 6, 4, (3, 3), pads=(1, 1, 1, 1))]
    result = check_chain(rng, layers, (5, 6))
    assert result.bias_map is not None
    # depthwise -> BN stays depthwise
    layers = [rand_layer(rng, 6, 6, (3, 3), pads=(1, 1, 1, 1), groups=6), bn]
    result = check_chain(rng, layers, (5, 6), known=False)
    assert result.layer.groups == 6 and result.bias_map is None


def test_refuses_3x3_pad1_twice() -> None:
    rng = np.random.default_rng(9)
    layers = [rand_layer(rng, 3, 4, (3, 3), pads=(1, 1, 1, 1)), rand_layer(rng, 4, 4, (3, 3), pads=(1, 1, 1, 1))]
    for spatial in ((6, 6), None):
        reason = compose(layers, spatial)
        assert isinstance(reason, str) and "pads" in reason and "layer 1" in reason
    # and the refusal is necessary: the border-blind fused layer is wrong at the border, right inside
    x = rng.normal(size=(1, 3, 6, 6))
    naive = conv_forward(x, _fuse_linear(layers))
    chain = torch_chain(x, [make_layer(layer.weight, None, pads=layer.pads) for layer in layers])
    assert np.abs(naive - chain).max() > 1e-3
    np.testing.assert_allclose(naive[..., 1:-1, 1:-1], chain[..., 1:-1, 1:-1], rtol=RTOL, atol=ATOL)


def test_strided_pad1_then_pad1_depends_on_parity() -> None:
    # 3x3 s2 p1 -> 3x3 p1: with an odd input the ring of the intermediate projects entirely onto padding
    rng = np.random.default_rng(10)
    layers = [
        rand_layer(rng, 2, 3, (3,), (2,), pads=(1, 1), bias=False),
        rand_layer(rng, 3, 2, (3,), pads=(1, 1)),
    ]
    result = check_chain(rng, layers, (7,))
    assert result.layer.kernel == (7,) and result.layer.strides == (2,) and result.layer.pads == (3, 3)
    assert isinstance(compose(layers, (8,)), str)
    assert isinstance(compose(layers, None), str)


@pytest.mark.parametrize(
    "chain",
    [
        [((3,), (2,), (1,), (1, 1)), ((1,), (2,), (1,), (0, 0))],
        [((1,), (2,), (1,), (0, 0)), ((3,), (2,), (1,), (1, 1))],
        [((1,), (2,), (1,), (0, 0)), ((1,), (2,), (1,), (0, 0)), ((2,), (1,), (1,), (0, 1))],
        [((3,), (2,), (2,), (0, 0)), ((3,), (2,), (1,), (0, 0))],
    ],
)
def test_output_sizes_match_for_odd_and_even_inputs(chain: list[tuple]) -> None:
    rng = np.random.default_rng(11)
    layers = [rand_layer(rng, 2, 2, k, s, d, p, bias=False) for k, s, d, p in chain]
    result = composed_ok(layers, None)
    checked = 0
    for size in range(1, 30):
        try:
            expected = (size,)
            for layer in layers:
                expected = output_spatial(layer, expected)
        except ValueError:
            continue
        assert output_spatial(result.layer, (size,)) == expected
        checked += 1
        if size in (9, 10, 15, 16):
            check_chain(rng, layers, (size,), known=False)
    assert checked > 15


def test_dilation_is_kept_when_exact() -> None:
    rng = np.random.default_rng(12)
    # 1x1 stride 2 then 3x3: taps at multiples of 2 -> dilation 2
    result = check_chain(rng, [rand_layer(rng, 2, 3, (1, 1), (2, 2)), rand_layer(rng, 3, 2, (3, 3))], (9, 10))
    assert result.layer.dilations == (2, 2) and result.layer.kernel == (3, 3) and result.layer.strides == (2, 2)
    # 1x1 then dilated 3x3
    result = check_chain(rng, [rand_layer(rng, 2, 3, (1,)), rand_layer(rng, 3, 2, (3,), dilations=(2,))], (9,))
    assert result.layer.dilations == (2,) and result.layer.kernel == (3,)
    # dilated 3x3 (d2) then dilated 3x3 (d4): offsets multiples of 2
    layers = [rand_layer(rng, 2, 2, (3,), dilations=(2,)), rand_layer(rng, 2, 2, (3,), dilations=(4,))]
    result = check_chain(rng, layers, (20,))
    assert result.layer.dilations == (2,) and result.layer.kernel == (7,)
    # 3x3 then 3x3 with no padding: dense 5x5
    result = check_chain(rng, [rand_layer(rng, 2, 2, (3, 3)), rand_layer(rng, 2, 2, (3, 3))], (7, 8))
    assert result.layer.dilations == (1, 1) and result.layer.kernel == (5, 5)


def test_depthwise_chain_stays_depthwise() -> None:
    rng = np.random.default_rng(13)
    layers = [rand_layer(rng, 5, 5, (3, 3), groups=5), rand_layer(rng, 5, 5, (3, 3), (2, 2), groups=5)]
    result = check_chain(rng, layers, (9, 8), known=False)
    assert result.layer.groups == 5 and result.layer.kernel == (5, 5) and result.layer.strides == (2, 2)


@pytest.mark.parametrize(("g1", "g2", "g3"), [(2, 3, 1), (3, 2, 6), (6, 2, 3), (1, 6, 6), (6, 6, 1), (2, 6, 3)])
def test_mixed_group_counts(g1: int, g2: int, g3: int) -> None:
    rng = np.random.default_rng(g1 * 100 + g2 * 10 + g3)
    layers = [
        rand_layer(rng, 6, 6, (3,), groups=g1),
        rand_layer(rng, 6, 6, (1,), (2,), groups=g2),
        rand_layer(rng, 6, 6, (2,), groups=g3),
    ]
    result = check_chain(rng, layers, (11,), known=False)
    assert result.layer.groups == math.gcd(g1, g2, g3) == fused_layout(layers).groups


def test_three_d_chain() -> None:
    rng = np.random.default_rng(14)
    layers = [
        rand_layer(rng, 2, 3, (1, 1, 1)),
        rand_layer(rng, 3, 3, (3, 1, 3), pads=(1, 0, 1, 1, 0, 1), groups=3),
        rand_layer(rng, 3, 2, (1, 2, 1), (1, 2, 1)),
    ]
    result = check_chain(rng, layers, (4, 5, 6))
    assert result.bias_map is not None and result.bias_map.shape == (2, 4, 2, 6)


def test_dense_chains() -> None:
    rng = np.random.default_rng(15)
    layers = [rand_layer(rng, 5, 7, ()), rand_layer(rng, 7, 3, ()), rand_layer(rng, 3, 4, ())]
    for spatial in (None, ()):
        result = composed_ok(layers, spatial)
        assert result.bias_map is None and result.layer.weight.shape == (4, 5)
        w = [layer.weight for layer in layers]
        b = [layer.bias for layer in layers]
        np.testing.assert_allclose(result.layer.weight, w[2] @ w[1] @ w[0], rtol=RTOL)
        np.testing.assert_allclose(result.layer.bias, w[2] @ (w[1] @ b[0] + b[1]) + b[2], rtol=RTOL)
    x = rng.normal(size=(6, 5))
    np.testing.assert_allclose(conv_forward(x, result.layer), torch_chain(x, layers), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kinds", ["sdsd", "dsds", "dd", "ddsd", "sdds"])
def test_dense_chains_with_scalings(kinds: str) -> None:
    """Dense layers (d) and per-channel scalings (s, one channel per group) composed without densifying the
    scalings: equal to the torch chain; the structural layout (a row mask for s, the union of rows for a dense
    layer) matches the composed layer's groups, including a dense layer with a zero row."""
    rng = np.random.default_rng(17)
    width = 6
    layers = []
    for i, k in enumerate(kinds):
        if k == "d":
            layer = rand_layer(rng, width, width, ())
            if i == 1:
                w = np.array(layer.weight)
                w[2] = 0.0  # an output that reads nothing: connectivity is not all-true
                layer = make_layer(w, layer.bias)
        else:
            layer = affine_layer(rng.normal(size=width), rng.normal(size=width), 0)
        layers.append(layer)
    result = composed_ok(layers, ())
    x = rng.normal(size=(5, width))
    np.testing.assert_allclose(conv_forward(x, result.layer), torch_chain(x, layers), rtol=RTOL, atol=ATOL)
    assert fused_layout(layers).groups == result.layer.groups


def test_layout_of_block_diagonal_dense_chain() -> None:
    """Connectivity through block-diagonal dense weights keeps the blocks (the general boolean product)."""
    rng = np.random.default_rng(18)
    a = to_dense(rand_layer(rng, 4, 4, (), groups=2))
    b = to_dense(rand_layer(rng, 4, 4, (), groups=2))
    assert fused_layout([a, b]).groups == 2 == composed_ok([a, b], ()).layer.groups


def test_single_layer_and_misuse() -> None:
    rng = np.random.default_rng(16)
    layer = rand_layer(rng, 2, 3, (3,))
    assert composed_ok([layer], None).layer is layer
    with pytest.raises(ValueError):
        compose([layer, layer], (5,))  # 3 channels into a 2-channel layer
    with pytest.raises(ValueError):
        compose([layer, rand_layer(rng, 3, 3, (3, 3))], None)
    with pytest.raises(ValueError):
        compose([], None)
    reason = compose([layer, rand_layer(rng, 3, 3, (3,))], (3,))
    assert isinstance(reason, str) and "empty" in reason


# --------------------------------------------------------------------------------------------------------------------
# residuals


@pytest.mark.parametrize(
    ("kernel", "dilations", "pads", "groups"),
    [
        ((3, 3), (1, 1), (1, 1, 1, 1), 1),
        ((3, 3), (1, 1), (1, 1, 1, 1), 4),
        ((1, 1), (1, 1), (0, 0, 0, 0), 1),
        ((1, 1), (1, 1), (0, 0, 0, 0), 2),
        ((3, 3), (2, 2), (2, 2, 2, 2), 1),
        ((3, 2), (1, 1), (0, 1, 2, 0), 1),
        ((3, 3), (2, 3), (1, 3, 3, 3), 2),  # no tap on the centre: put on a finer grid first
    ],
)
def test_add_identity(kernel: tuple, dilations: tuple, pads: tuple, groups: int) -> None:
    rng = np.random.default_rng(17)
    layer = rand_layer(rng, 4, 4, kernel, dilations=dilations, pads=pads, groups=groups)
    for spatial in ((6, 5), None):
        residual = add_identity(layer, spatial)
        assert isinstance(residual, ConvLayer), residual
        assert residual.groups == groups
        if residual.dilations == layer.dilations:
            assert residual.kernel == layer.kernel
        else:
            assert residual.kernel == (5, 3) and residual.dilations == (1, 3)
        x = rng.normal(size=(2, 4, 6, 5))
        np.testing.assert_allclose(conv_forward(x, residual), x + torch_conv(x, layer), rtol=RTOL, atol=ATOL)


def test_add_identity_dense_and_refusals() -> None:
    rng = np.random.default_rng(18)
    dense = rand_layer(rng, 3, 3, ())
    np.testing.assert_allclose(add_identity(dense, None).weight, dense.weight + np.eye(3))
    refused = [
        rand_layer(rng, 3, 4, (1, 1)),  # channels change
        rand_layer(rng, 3, 3, (3, 3), (2, 2), pads=(1, 1, 1, 1)),  # strided
        rand_layer(rng, 3, 3, (3, 3)),  # shrinks
    ]
    for layer in refused:
        spatial = (7,) * layer.nd
        assert isinstance(add_identity(layer, spatial), str)
        assert isinstance(add_identity(layer, None), str)


# --------------------------------------------------------------------------------------------------------------------
# costs


def test_conv_macs_and_params() -> None:
    resnet_stem = make_layer(np.zeros((64, 3, 7, 7)), strides=(2, 2), pads=(3, 3, 3, 3))
    out = output_spatial(resnet_stem, (224, 224))
    assert out == (112, 112)
    assert conv_macs(resnet_stem, out) == 118_013_952
    assert conv_params(resnet_stem) == 64 * 3 * 49 + 64
    dw = make_layer(np.zeros((32, 1, 3, 3)), groups=32)
    assert conv_macs(dw, (10, 10)) == 32 * 9 * 100 and conv_params(dw) == 32 * 9 + 32
    fc = make_layer(np.zeros((10, 512)))
    assert conv_macs(fc, ()) == 5120 and conv_params(fc) == 5130


def _chain_macs(layers: list[ConvLayer], spatial: tuple[int, ...]) -> int:
    total = 0
    for layer in layers:
        spatial = output_spatial(layer, spatial)
        total += conv_macs(layer, spatial)
    return total


def test_cost_examples() -> None:
    rng = np.random.default_rng(19)
    spatial = (8, 8)
    expand = [
        rand_layer(rng, 16, 64, (1, 1)),
        rand_layer(rng, 64, 64, (3, 3), pads=(1, 1, 1, 1), groups=64),
        rand_layer(rng, 64, 16, (1, 1)),
    ]
    fused = composed_ok(expand, spatial).layer
    assert fused.weight.shape == (16, 16, 3, 3) and fused.groups == 1
    assert _chain_macs(expand, spatial) == (16 * 64 + 64 * 9 + 64 * 16) * 64 == 167_936
    assert conv_macs(fused, spatial) == 16 * 16 * 9 * 64 == 147_456
    assert fused_layout(expand).macs(spatial) == 147_456 and fused_layout(expand).params == conv_params(fused)
    separable = [rand_layer(rng, 24, 24, (3, 3), pads=(1, 1, 1, 1), groups=24), rand_layer(rng, 24, 24, (1, 1))]
    fused = composed_ok(separable, spatial).layer
    assert fused.weight.shape == (24, 24, 3, 3) and fused.groups == 1
    assert _chain_macs(separable, spatial) == (24 * 9 + 24 * 24) * 64 == 50_688
    assert conv_macs(fused, spatial) == 24 * 24 * 9 * 64 == 331_776


# --------------------------------------------------------------------------------------------------------------------
# property: compose is exact whenever it does not refuse, and a border refusal is necessary


@st.composite
def chains(draw: st.DrawFn) -> tuple[list[ConvLayer], tuple[int, ...], bool, int]:
    nd = draw(st.integers(1, 2))
    depth = draw(st.integers(2, 3))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    channels = [draw(st.sampled_from([1, 2, 3, 4, 6])) for _ in range(depth + 1)]
    layers = []
    for i in range(depth):
        cin, cout = channels[i], channels[i + 1]
        common = math.gcd(cin, cout)
        groups = draw(st.sampled_from([g for g in range(1, common + 1) if common % g == 0]))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        strides = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        dilations = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * nd))
        layers.append(rand_layer(rng, cin, cout, kernel, strides, dilations, pads, groups, bias=draw(st.booleans())))
    spatial = tuple(draw(st.integers(1, 10)) for _ in range(nd))
    return layers, spatial, draw(st.booleans()), seed


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_compose_property(case: tuple[list[ConvLayer], tuple[int, ...], bool, int]) -> None:
    layers, spatial, known, seed = case
    try:
        expected_size = spatial
        for layer in layers:
            expected_size = output_spatial(layer, expected_size)
    except ValueError:
        assert isinstance(compose(layers, spatial), str)
        return
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(2, layers[0].cin) + spatial)
    result = compose(layers, spatial if known else None)
    if isinstance(result, Composed):
        assert output_spatial(result.layer, spatial) == expected_size
        layout = fused_layout(layers)
        fused = result.layer
        assert (layout.cout, layout.cin, layout.groups, layout.kernel) == (
            fused.cout,
            fused.cin,
            fused.groups,
            fused.kernel,
        )
        assert (layout.strides, layout.dilations, layout.pads) == (fused.strides, fused.dilations, fused.pads)
        assert layout.params == conv_params(fused) and layout.macs(expected_size) == conv_macs(fused, expected_size)
        assert result.bias_map is None or result.bias_map.shape == (layers[-1].cout,) + expected_size
        np.testing.assert_allclose(fused_forward(x, result), conv_forward_chain(x, layers), rtol=RTOL, atol=ATOL)
        if not known:
            # the size-independent check is sufficient: the exact check at any size agrees
            at_size = compose(layers, spatial)
            assert isinstance(at_size, Composed) and at_size.bias_map is None
            np.testing.assert_array_equal(at_size.layer.weight, result.layer.weight)
            assert at_size.layer.pads == result.layer.pads and at_size.layer.dilations == result.layer.dilations
        return
    if known and "zero-pads" in result:
        # the refusal is necessary: the border-blind fused layer differs from the (bias-free) chain
        linear = [
            make_layer(layer.weight, None, layer.strides, layer.dilations, layer.pads, layer.groups) for layer in layers
        ]
        difference = conv_forward(x, _fuse_linear(linear)) - conv_forward_chain(x, linear)
        assert np.abs(difference).max() > 1e-8


def conv_forward_chain(x: np.ndarray, layers: list[ConvLayer]) -> np.ndarray:
    for layer in layers:
        x = conv_forward(x, layer)
    return x


def test_property_sequential_reference_matches_torch() -> None:
    """The property test uses conv_forward as its sequential reference; tie it to torch on a mixed chain."""
    rng = np.random.default_rng(20)
    layers = [
        rand_layer(rng, 4, 4, (3, 2), (2, 1), (1, 2), (1, 0, 2, 1), groups=2),
        rand_layer(rng, 4, 2, (2, 3), (1, 2), (2, 1), (0, 2, 1, 1)),
    ]
    x = rng.normal(size=(2, 4, 9, 8))
    np.testing.assert_allclose(conv_forward_chain(x, layers), torch_chain(x, layers), rtol=RTOL, atol=ATOL)
