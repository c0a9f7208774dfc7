from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnx_easier.entropy import binary_entropy, channel_on_fraction, layer_entropy


def _h(p: float) -> float:
    """Reference binary entropy with the math module, written out independently."""
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_binary_entropy_known_values() -> None:
    h = binary_entropy(np.array([0.0, 0.5, 1.0, 0.25, 0.75]))
    np.testing.assert_allclose(h, [0.0, 1.0, 0.0, 0.8112781244591328, 0.8112781244591328], rtol=1e-12, atol=0)
    assert not np.signbit(h[[0, 2]]).any()  # saturated channels give +0, not -0


@given(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_binary_entropy_matches_reference_and_is_symmetric(p: float) -> None:
    h = float(binary_entropy(np.array(p)))
    assert h == pytest.approx(_h(p), abs=1e-12)
    assert h == pytest.approx(float(binary_entropy(np.array(1.0 - p))), abs=1e-9)
    assert 0.0 <= h <= 1.0


def test_layer_entropy_of_hand_built_tensor() -> None:
    # [N=2, C=4, H=2, W=2]: 8 positions per channel; ON counts 8, 4, 2, 0 -> p = 1, 0.5, 0.25, 0.
    x = -np.ones((2, 4, 2, 2), dtype=np.float32)
    x[:, 0] = 3.0
    x[0, 1] = 0.0  # x == 0 counts as ON
    x[1, 2, 0, 0] = 2.0
    x[0, 2, 1, 1] = 0.5
    on = (x >= 0).sum(axis=(0, 2, 3))
    assert on.tolist() == [8, 4, 2, 0]
    p = channel_on_fraction(on, 8)
    np.testing.assert_allclose(p, [1.0, 0.5, 0.25, 0.0])
    assert layer_entropy(on, 8) == pytest.approx((0.0 + 1.0 + 0.8112781244591328 + 0.0) / 4, abs=1e-12)


def test_per_channel_counts_are_accepted() -> None:
    assert layer_entropy(np.array([1, 3]), np.array([2, 4])) == pytest.approx((1.0 + _h(0.75)) / 2, abs=1e-12)


@pytest.mark.parametrize(
    ("on", "count", "message"),
    [
        (np.array([1, 2]), 0, "positive"),
        (np.array([3]), 2, r"\[0, count\]"),
        (np.array([-1]), 2, r"\[0, count\]"),
    ],
)
def test_bad_counts_raise(on: np.ndarray, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_on_fraction(on, count)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_p_outside_unit_interval_raises(p: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binary_entropy(np.array([p]))


def test_no_channels_raises() -> None:
    with pytest.raises(ValueError, match="no channels"):
        layer_entropy(np.array([], dtype=np.int64), 4)
