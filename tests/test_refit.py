"""refit: least-squares reconstruction of a layer from streamed (input, target) batches.

Targets come from torch.nn.functional in float64 (independent of the im2col in refit.py); every fit starts from a
WRONG layer (random weights of the right shape) and must recover the true one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_easier.errors import OnnxEasierError
from onnx_easier.linear_math import ConvLayer, make_layer, output_spatial
from onnx_easier.refit import (
    NormalEquations,
    RefitTooLarge,
    feature_count,
    fit_layer,
    memory_estimate,
    refit_error,
)


def torch_forward(layer: ConvLayer, x: np.ndarray) -> np.ndarray:
    """The layer through torch.nn.functional (float64); ONNX pads applied with F.pad (last axis first)."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    w, b = torch.from_numpy(np.array(layer.weight)), torch.from_numpy(np.array(layer.bias))
    if layer.nd == 0:
        out = F.linear(xt, w, b) if layer.groups == 1 else _grouped_linear(xt, w, b, layer.groups)
        return out.numpy()
    torch_pads: list[int] = []
    for a in reversed(range(layer.nd)):
        torch_pads += [layer.pads_begin[a], layer.pads_end[a]]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.nd]
    return conv(F.pad(xt, torch_pads), w, b, layer.strides, 0, layer.dilations, layer.groups).numpy()


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    n, cin = x.shape
    out = torch.einsum("ngc,goc->ngo", x.reshape(n, groups, cin // groups), w.reshape(groups, -1, cin // groups))
    return out.reshape(n, -1) + b


def random_like(layer: ConvLayer, rng: np.random.Generator) -> ConvLayer:
    """Same geometry, random weights and bias."""
    return ConvLayer(
        rng.normal(size=layer.weight.shape),
        rng.normal(size=layer.cout),
        layer.strides,
        layer.dilations,
        layer.pads,
        layer.groups,
    )


def assert_recovered(fitted: ConvLayer, true: ConvLayer, rel: float = 1e-6) -> None:
    assert fitted.weight.shape == true.weight.shape
    assert (fitted.strides, fitted.dilations, fitted.pads, fitted.groups) == (
        true.strides,
        true.dilations,
        true.pads,
        true.groups,
    )
    scale = max(np.abs(true.weight).max(), np.abs(true.bias).max())
    assert np.abs(fitted.weight - true.weight).max() <= rel * scale
    assert np.abs(fitted.bias - true.bias).max() <= rel * scale


# name: (weight shape, strides, dilations, pads, groups, input shape)
CASES = {
    "dense": ((5, 12), (), (), (), 1, (40, 12)),
    "dense_groups3": ((6, 3), (), (), (), 3, (40, 9)),
    "conv2d_stride2": ((4, 3, 3, 3), (2, 2), (1, 1), (0, 0, 0, 0), 1, (6, 3, 11, 12)),
    "conv2d_dilation2": ((4, 3, 3, 3), (1, 1), (2, 2), (0, 0, 0, 0), 1, (4, 3, 10, 9)),
    "conv2d_groups2": ((6, 2, 3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, (4, 4, 8, 8)),
    "depthwise": ((6, 1, 3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 6, (3, 6, 7, 7)),
    "depthwise_stride2_dilation2": ((5, 1, 3, 3), (2, 2), (2, 2), (2, 2, 2, 2), 5, (4, 5, 9, 9)),
    "conv2d_padding1": ((4, 3, 3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, (3, 3, 8, 8)),
    "conv2d_asymmetric_padding": ((4, 3, 3, 2), (2, 1), (1, 2), (1, 0, 2, 1), 1, (4, 3, 9, 10)),
    "conv2d_1x1": ((7, 5, 1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1, (2, 5, 6, 6)),
    "conv1d": ((4, 3, 5), (2,), (2,), (3, 1), 1, (5, 3, 30)),
    "conv1d_groups3": ((6, 1, 3), (1,), (1,), (1, 1), 3, (4, 3, 20)),
    "conv3d": ((3, 2, 2, 3, 2), (1, 2, 1), (1, 1, 2), (1, 0, 1, 0, 1, 1), 1, (2, 2, 5, 7, 6)),
}


def make_case(name: str, rng: np.random.Generator) -> tuple[ConvLayer, np.ndarray]:
    shape, strides, dilations, pads, groups, in_shape = CASES[name]
    true = make_layer(rng.normal(size=shape), rng.normal(size=shape[0]), strides, dilations, pads, groups)
    return true, rng.normal(size=in_shape)


@pytest.mark.parametrize("name", sorted(CASES))
def test_recovers_known_layer_from_wrong_start(name: str) -> None:
    rng = np.random.default_rng(sorted(CASES).index(name))
    true, x = make_case(name, rng)
    y = torch_forward(true, x)
    wrong = random_like(true, rng)
    assert refit_error(wrong, x, y) > 0.5
    equations = NormalEquations(wrong)
    for part in np.array_split(np.arange(x.shape[0]), 2):  # two batches
        equations.update(x[part], y[part])
    fitted = equations.solve(ridge=0.0)
    assert_recovered(fitted, true)
    assert refit_error(fitted, x, y) < 1e-9
    assert equations.relative_error(fitted) < 1e-6
    assert equations.relative_error(wrong) == pytest.approx(refit_error(wrong, x, y), rel=1e-9)


def test_tiny_ridge_still_recovers() -> None:
    rng = np.random.default_rng(1)
    true, x = make_case("conv2d_asymmetric_padding", rng)
    equations = NormalEquations(random_like(true, rng))
    equations.update(x, torch_forward(true, x))
    assert_recovered(equations.solve(ridge=1e-12), true)


def test_channel_last_tokens_reshaped_by_caller() -> None:
    """A Linear on [N, T, F] tokens is a dense layer on [N*T, F]."""
    rng = np.random.default_rng(2)
    true = make_layer(rng.normal(size=(6, 10)), rng.normal(size=6))
    tokens = rng.normal(size=(4, 7, 10))
    y = F.linear(
        torch.from_numpy(tokens), torch.from_numpy(np.array(true.weight)), torch.from_numpy(np.array(true.bias))
    )
    equations = NormalEquations(random_like(true, rng))
    equations.update(tokens.reshape(-1, 10), y.numpy().reshape(-1, 6))
    assert_recovered(equations.solve(ridge=0.0), true)


@st.composite
def geometries(draw: st.DrawFn) -> tuple[ConvLayer, np.ndarray]:
    nd = draw(st.integers(0, 2))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * nd))
    spatial = tuple(draw(st.integers(d * (k - 1) + 1, 9)) for k, d in zip(kernel, dilations))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(groups * cout_g, cin_g) + kernel)
    true = make_layer(weight, rng.normal(size=groups * cout_g), strides, dilations, pads, groups)
    # enough positions for a full-rank system: features per group (+ margin) over the positions per sample
    per_sample = math.prod(output_spatial(true, spatial)) if nd else 1
    n = max(2, math.ceil(2 * feature_count(true) / per_sample) + 1)
    return true, rng.normal(size=(n, groups * cin_g) + spatial)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries())
def test_recovery_property(case: tuple[ConvLayer, np.ndarray]) -> None:
    true, x = case
    y = torch_forward(true, x)
    equations = NormalEquations(random_like(true, np.random.default_rng(7)))
    equations.update(x, y)
    fitted = equations.solve(ridge=0.0)
    assert refit_error(fitted, x, y) < 1e-9
    if all(np.linalg.matrix_rank(a) == equations.features for a in equations.gram):
        assert_recovered(fitted, true)
    # else some tap only ever reads padding (e.g. k=2, d=2, pad 1, one output): its weight is not identifiable and
    # lstsq's minimum-norm solution sets it to 0, which reproduces the data exactly all the same


def test_streaming_equals_one_batch_and_memory_is_constant() -> None:
    rng = np.random.default_rng(3)
    true = make_layer(rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4), (2, 2), (1, 1), (1, 0, 1, 1), 2)
    x = rng.normal(size=(64, 4, 9, 9))
    clean = torch_forward(true, x)
    y = clean + 0.1 * rng.normal(size=clean.shape)  # noisy, so that the ridge matters
    start = random_like(true, rng)
    whole = NormalEquations(start)
    whole.update(x, y)
    streamed = NormalEquations(start)
    for i in range(8):
        streamed.update(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    assert streamed.positions == whole.positions == 64 * 5 * 4
    np.testing.assert_allclose(streamed.gram, whole.gram, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(streamed.cross, whole.cross, rtol=1e-12, atol=1e-9)
    for ridge in (0.0, 1e-4):
        a, b = whole.solve(ridge), streamed.solve(ridge)
        np.testing.assert_allclose(b.weight, a.weight, rtol=0, atol=1e-9)
        np.testing.assert_allclose(b.bias, a.bias, rtol=0, atol=1e-9)
    one = NormalEquations(start)
    one.update(x[:1], y[:1])
    assert one.memory_bytes == whole.memory_bytes == streamed.memory_bytes == memory_estimate(true)


def test_memory_estimate_formula() -> None:
    conv = make_layer(np.zeros((64, 32, 3, 3)), groups=2)
    f = 32 * 9 + 1
    assert feature_count(conv) == f
    assert memory_estimate(conv) == 2 * (f * f + f * 32 + 1) * 8
    depthwise = make_layer(np.zeros((16, 1, 3, 3)), groups=16)
    assert memory_estimate(depthwise) == 16 * (10 * 10 + 10 + 1) * 8
    assert NormalEquations(depthwise).memory_bytes == memory_estimate(depthwise)


def test_noisy_fit_improves_on_wrong_layer() -> None:
    rng = np.random.default_rng(4)
    true, x = make_case("conv2d_groups2", rng)
    x = np.concatenate([x, rng.normal(size=(8,) + x.shape[1:])])
    y = torch_forward(true, x)
    y = y + 0.05 * np.abs(y).mean() * rng.normal(size=y.shape)
    wrong = random_like(true, rng)
    fitted, result = fit_layer(wrong, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert result.accepted and not result.holdout
    assert result.error_after <= result.error_before
    assert result.error_after < 0.1 < result.error_before
    assert result.error_before == pytest.approx(refit_error(wrong, x, y), rel=1e-9)
    assert result.error_after == pytest.approx(refit_error(fitted, x, y), rel=1e-6)
    assert result.positions == 12 * 8 * 8
    assert result.seconds >= 0
    np.testing.assert_allclose(fitted.weight, true.weight, atol=0.1 * np.abs(true.weight).max())


def test_fit_layer_with_holdout_accepts_a_better_fit() -> None:
    rng = np.random.default_rng(5)
    true, x = make_case("conv1d", rng)
    y = torch_forward(true, x)
    y = y + 0.01 * rng.normal(size=y.shape)
    x_hold = rng.normal(size=x.shape)
    y_hold = torch_forward(true, x_hold) + 0.01 * rng.normal(size=y.shape)
    wrong = random_like(true, rng)
    fitted, result = fit_layer(wrong, [(x, y)], holdout=[(x_hold, y_hold)])
    assert result.accepted and result.holdout
    assert result.error_before == pytest.approx(refit_error(wrong, x_hold, y_hold), rel=1e-12)
    assert result.error_after == pytest.approx(refit_error(fitted, x_hold, y_hold), rel=1e-12)
    assert result.error_after < result.error_before


def test_fit_layer_keeps_old_layer_when_holdout_gets_worse() -> None:
    """Exact old layer, 64 features fitted to 70 noisy samples without ridge: the fit chases the noise."""
    rng = np.random.default_rng(6)
    true = make_layer(rng.normal(size=(4, 64)), rng.normal(size=4))
    x, x_hold = rng.normal(size=(70, 64)), rng.normal(size=(200, 64))
    noise = 0.5
    y = torch_forward(true, x) + noise * rng.normal(size=(70, 4))
    y_hold = torch_forward(true, x_hold) + noise * rng.normal(size=(200, 4))
    kept, result = fit_layer(
        true, iter([(x, y)]), holdout=iter([(x_hold[:100], y_hold[:100]), (x_hold[100:], y_hold[100:])]), ridge=0.0
    )
    assert kept is true
    assert not result.accepted
    assert result.error_after == result.error_before == pytest.approx(refit_error(true, x_hold, y_hold), rel=1e-12)
    # the rejected fit really is worse on the holdout, and better on its own data
    equations = NormalEquations(true)
    equations.update(x, y)
    overfit = equations.solve(ridge=0.0)
    assert refit_error(overfit, x_hold, y_hold) > 1.5 * refit_error(true, x_hold, y_hold)
    assert refit_error(overfit, x, y) < refit_error(true, x, y)


def test_too_large_raises_before_allocating() -> None:
    big = make_layer(np.zeros((512, 512, 3, 3)))  # f = 4609 > 4096
    with pytest.raises(RefitTooLarge, match="4609 features"):
        NormalEquations(big)
    assert issubclass(RefitTooLarge, OnnxEasierError)
    layer = make_layer(np.zeros((2, 4, 3)))  # f = 13
    assert NormalEquations(layer, max_features=13).features == 13
    with pytest.raises(RefitTooLarge):
        NormalEquations(layer, max_features=12)
    with pytest.raises(RefitTooLarge):
        fit_layer(layer, [], max_features=12)


def test_subsampling_is_reproducible_unbiased_and_exact_on_noiseless_data() -> None:
    rng = np.random.default_rng(8)
    true, x = make_case("conv2d_padding1", rng)  # 3 x 64 positions
    y = torch_forward(true, x)
    start = random_like(true, rng)

    def sampled(seed: int, m: int = 48) -> NormalEquations:
        equations = NormalEquations(start, max_positions_per_batch=m, seed=seed)
        equations.update(x[:2], y[:2])
        equations.update(x[2:], y[2:])
        return equations

    full = NormalEquations(start)
    full.update(x, y)
    first, again, other = sampled(0), sampled(0), sampled(1)
    np.testing.assert_array_equal(first.gram, again.gram)
    assert not np.array_equal(first.gram, other.gram)
    # the bias-bias entry counts positions: exact under the M/m weighting
    assert first.gram[0, -1, -1] == pytest.approx(full.gram[0, -1, -1], rel=1e-12) == 3 * 64
    assert first.positions == full.positions
    # noiseless data: any full-rank subset recovers the layer
    assert_recovered(first.solve(ridge=0.0), true)
    # unbiased: the mean over seeds converges to the full sums (without M/m it would be 3/8 of them)
    mean = np.mean([sampled(seed).gram for seed in range(300)], axis=0)
    single = np.linalg.norm(first.gram - full.gram) / np.linalg.norm(full.gram)
    assert np.linalg.norm(mean - full.gram) / np.linalg.norm(full.gram) < single / 5
    # a batch at or under the limit is not subsampled
    exact = NormalEquations(start, max_positions_per_batch=64)
    exact.update(x[:1], y[:1])
    reference = NormalEquations(start)
    reference.update(x[:1], y[:1])
    np.testing.assert_array_equal(exact.gram, reference.gram)


def test_singular_system_falls_back_to_minimum_norm() -> None:
    """Fewer positions than features and no ridge: lstsq gives an exact interpolating fit."""
    rng = np.random.default_rng(9)
    layer = make_layer(rng.normal(size=(3, 20)), rng.normal(size=3))
    x = rng.normal(size=(5, 20))
    y = rng.normal(size=(5, 3))
    equations = NormalEquations(layer)
    equations.update(x, y)
    fitted = equations.solve(ridge=0.0)
    assert np.all(np.isfinite(fitted.weight))
    assert refit_error(fitted, x, y) < 1e-8


def test_zero_input_fits_the_mean_as_bias() -> None:
    layer = make_layer(np.ones((2, 3, 3)), pads=(1, 1))
    x = np.zeros((4, 3, 6))
    y = np.broadcast_to(np.array([1.5, -2.0])[None, :, None], (4, 2, 6))
    equations = NormalEquations(layer)
    equations.update(x, y)
    fitted = equations.solve()  # trace(A) = 0: the scaled ridge vanishes, lstsq keeps the weights at 0
    np.testing.assert_allclose(fitted.bias, [1.5, -2.0], rtol=1e-12)
    np.testing.assert_allclose(fitted.weight, 0.0, atol=1e-12)


def test_bad_input() -> None:
    layer = make_layer(np.zeros((2, 3, 3, 3)), pads=(1, 1, 1, 1))
    equations = NormalEquations(layer)
    with pytest.raises(ValueError, match="no data"):
        equations.solve()
    with pytest.raises(ValueError, match="Cin = 3"):
        equations.update(np.zeros((1, 4, 5, 5)), np.zeros((1, 2, 5, 5)))
    with pytest.raises(ValueError, match="target of shape"):
        equations.update(np.zeros((1, 3, 5, 5)), np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match="max_positions_per_batch"):
        NormalEquations(layer, max_positions_per_batch=0)
    equations.update(np.ones((1, 3, 5, 5)), np.ones((1, 2, 5, 5)))
    with pytest.raises(ValueError, match="ridge"):
        equations.solve(ridge=-1.0)
    with pytest.raises(ValueError, match="does not match the accumulated"):
        equations.relative_error(make_layer(np.zeros((2, 3, 1, 1))))
    with pytest.raises(ValueError, match="holdout"):
        fit_layer(layer, [(np.ones((1, 3, 5, 5)), np.ones((1, 2, 5, 5)))], holdout=[])


def test_ridge_is_chosen_on_the_holdout() -> None:
    """Noisy, few samples: every ridge of the grid is solved, the one with the lowest held-out error is kept."""
    rng = np.random.default_rng(9)
    true = make_layer(rng.normal(size=(4, 40)), rng.normal(size=4))
    x, x_hold = rng.normal(size=(45, 40)), rng.normal(size=(300, 40))
    y = torch_forward(true, x) + 3.0 * rng.normal(size=(45, 4))
    y_hold = torch_forward(true, x_hold) + 3.0 * rng.normal(size=(300, 4))
    wrong = random_like(true, rng)
    grid = (0.0, 0.1, 1.0, 10.0)
    fitted, result = fit_layer(wrong, [(x, y)], holdout=[(x_hold, y_hold)], ridge=grid)
    equations = NormalEquations(true)
    equations.update(x, y)
    errors = {r: refit_error(equations.solve(r), x_hold, y_hold) for r in grid}
    assert refit_error(fitted, x_hold, y_hold) == pytest.approx(min(errors.values()), rel=1e-9)
    assert result.ridge == min(errors, key=errors.get)
    assert result.error_after == pytest.approx(min(errors.values()), rel=1e-9)
    assert errors[result.ridge] < errors[0.0]  # the noise makes some shrinkage pay here


def test_fit_layer_stops_reading_once_it_has_rows_enough() -> None:
    """A conv with 12 x 12 outputs per sample: 144 rows each. max_rows 1000 from at least 16 samples stops after the
    second batch of 8 (16 samples, 2304 rows), on both iterables; the fit is still exact on noiseless data."""
    rng = np.random.default_rng(9)
    true = make_layer(rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3))
    read = {"fit": 0, "hold": 0}

    def stream(kind: str, n: int):
        for _ in range(n):
            x = rng.normal(size=(8, 2, 14, 14))
            read[kind] += 1
            yield x, torch_forward(true, x)

    fitted, result = fit_layer(random_like(true, rng), stream("fit", 10), stream("hold", 10), ridge=1e-9,
                               max_rows=1000, min_samples=16)
    assert read == {"fit": 2, "hold": 2}
    assert result.positions == 16 * 144 and result.accepted
    assert_recovered(fitted, true, rel=1e-5)
    read.update(fit=0, hold=0)  # min_samples dominates: 40 samples = 5 batches
    fit_layer(true, stream("fit", 10), stream("hold", 10), max_rows=1000, min_samples=40)
    assert read == {"fit": 5, "hold": 5}
    read.update(fit=0, hold=0)  # no cap: everything is read
    fit_layer(true, stream("fit", 10), stream("hold", 3))
    assert read == {"fit": 10, "hold": 3}
