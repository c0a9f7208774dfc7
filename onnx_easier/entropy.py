"""The EASIER metric: the entropy of an activation's ON/OFF state, per channel, averaged over channels.

For one channel ``c`` of an activation's input ``x``, over every sample and every position of that channel::

    p_c = #{x >= 0} / #{x}                                  (fraction of the time the channel is ON)
    H(p) = -p log2(p) - (1 - p) log2(1 - p),  H(0) = H(1) = 0   (binary entropy, in bits)
    H_layer = (1 / C) * sum_c H(p_c)

A layer whose channels are always ON (or always OFF) has entropy 0: on the calibration data it behaves as an
affine map, and EASIER replaces it by one. H_layer is at most 1 bit.
"""

from __future__ import annotations

import numpy as np


def channel_on_fraction(count_on: np.ndarray, count: int | np.ndarray) -> np.ndarray:
    """``p_c = count_on_c / count_c``: the fraction of positions where channel ``c`` is ON (x >= 0), as float64.

    ``count`` is the number of positions counted per channel (a scalar, or one value per channel) and must be
    positive.
    """
    on = np.asarray(count_on, dtype=np.float64)
    total = np.asarray(count, dtype=np.float64)
    if np.any(total <= 0):
        raise ValueError("count must be positive: no positions were counted")
    if np.any(on < 0) or np.any(on > total):
        raise ValueError("count_on must lie in [0, count]")
    return on / total


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """``H(p) = -p log2 p - (1 - p) log2(1 - p)`` elementwise, in bits, with ``H(0) = H(1) = 0``.

    ``p`` must lie in [0, 1].
    """
    p = np.asarray(p, dtype=np.float64)
    if np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ValueError("p must lie in [0, 1]")
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0) - np.where(q > 0, q * np.log2(q), 0.0)
    # -0.0 -> 0.0 so that a saturated channel prints as 0
    return h + 0.0


def layer_entropy(count_on: np.ndarray, count: int | np.ndarray) -> float:
    """``H_layer = mean_c H(count_on_c / count_c)``: the EASIER entropy of one activation, in bits."""
    h = binary_entropy(channel_on_fraction(count_on, count))
    if h.size == 0:
        raise ValueError("an activation with no channels has no entropy")
    return float(h.mean())
