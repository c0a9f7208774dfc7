"""Confidence bounds of the fidelity loss (bounds.py, fidelity.py) and the Judge's acceptance / early rejection."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.bounds import binomial_lower, binomial_upper, bootstrap_bounds, samples_for
from onnx_easier.data import CalibrationData
from onnx_easier.fidelity import FidelityAccumulator, resolution, resolution_warning
from onnx_easier.select import Judge


@pytest.mark.parametrize("n", [10, 64, 314, 1000])
def test_no_event_upper_bound_has_its_closed_form(n: int) -> None:
    assert binomial_upper(0, n, 0.9) == pytest.approx(1 - 0.1 ** (1 / n), rel=1e-9)
    assert binomial_lower(0, n, 0.9) == 0.0
    assert binomial_upper(n, n, 0.9) == 1.0


def test_clopper_pearson_matches_beta_quantiles() -> None:
    """The exact bounds are quantiles of Beta(k+1, n-k) and Beta(k, n-k+1) (sampled here)."""
    rng = np.random.default_rng(0)
    for k, n in [(1, 50), (3, 100), (10, 40)]:
        assert binomial_upper(k, n, 0.9) == pytest.approx(np.quantile(rng.beta(k + 1, n - k, 400_000), 0.9), abs=2e-3)
        assert binomial_lower(k, n, 0.9) == pytest.approx(np.quantile(rng.beta(k, n - k + 1, 400_000), 0.1), abs=2e-3)


def test_upper_bound_covers_the_true_rate() -> None:
    """Coverage: over many draws of 200 samples at a true flip rate of 1%, the 90% upper bound is below the true
    rate at most ~10% of the time."""
    rng = np.random.default_rng(1)
    misses = sum(binomial_upper(int(k), 200, 0.9) < 0.01 for k in rng.binomial(200, 0.01, 400))
    assert misses / 400 <= 0.12


def test_samples_for() -> None:
    n = samples_for(0.01, 0.9)
    assert binomial_upper(0, n, 0.9) <= 0.01 < binomial_upper(0, n - 1, 0.9)
    n1 = samples_for(0.01, 0.9, events=1)
    assert binomial_upper(1, n1, 0.9) <= 0.01 < binomial_upper(1, n1 - 1, 0.9)


def test_bootstrap_brackets_the_mean() -> None:
    x = np.random.default_rng(2).exponential(1.0, 500)
    lo, up = bootstrap_bounds([x], lambda t: t / x.size, 0.9)
    assert lo < x.mean() < up
    assert up - lo < 0.3
    assert bootstrap_bounds([x], lambda t: t / x.size, 0.9) == (lo, up)  # seeded: reproducible


def _logits(n: int, flip: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n, 10)) * 3
    cand = ref + noise * rng.standard_normal((n, 10))
    for i in range(flip):  # swap the top class with another one
        top = ref[i].argmax()
        other = (top + 1) % 10
        cand[i, top], cand[i, other] = ref[i, other] - 1, ref[i, top] + 1
    return ref, cand


@pytest.mark.parametrize("metric", ["agreement", "rel-l2", "cosine"])
def test_accumulator_bounds_bracket_the_loss(metric: str) -> None:
    ref, cand = _logits(300, 3, 0.05)
    acc = FidelityAccumulator(metric, 0.01)
    for i in range(0, 300, 32):
        acc.update([ref[i:i + 32]], [cand[i:i + 32]])
    fid = acc.result()
    lo, up = acc.bounds(0.9)
    assert lo <= fid.value <= up
    if metric == "agreement":
        assert up >= binomial_upper(3, 300, 0.9)


def test_resolution_and_its_warning() -> None:
    assert resolution("rel-l2", 10) == 0.0
    assert resolution("agreement", 64) == pytest.approx(binomial_upper(0, 64, 0.9))
    assert resolution_warning("agreement", 1000, 0.01, 0.25) is None
    small = resolution_warning("agreement", 64, 0.01, 0.25)
    assert "effective tolerance" in small and "pass at least" in small
    mid = resolution_warning("agreement", 300, 0.01, 0.25)
    assert "flips a single held-out prediction" in mid
    assert resolution_warning("rel-l2", 4, 0.01, 0.25) is None


def _classifier(scale: float) -> onnx.ModelProto:
    """y = x @ W (x[N,8] -> 10 logits); ``scale`` multiplies W's first column (1 = the original)."""
    w = np.random.default_rng(3).standard_normal((8, 10)).astype(np.float32)
    w[:, 0] *= scale
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_judge_accepts_on_the_bound_and_rejects_early() -> None:
    x = np.random.default_rng(4).standard_normal((1024, 8)).astype(np.float32)
    data = CalibrationData("mem", 1024, {"x": x})
    judge = Judge(_classifier(1.0), data, None, 0.01, 32)
    assert judge.warning is None and judge.effective_tolerance == 0.01
    same = judge(_classifier(1.0), sequential=True)
    assert same.accepted and same.value == 0.0 and same.upper < 0.01 and same.samples == 1024
    bad = judge(_classifier(3.0), sequential=True)  # class 0 wins far too often: many flips
    assert not bad.accepted and bad.early and bad.samples < 1024
    full = judge(_classifier(3.0))
    assert full.samples == 1024 and not full.early and not full.accepted
    assert math.isfinite(full.upper) and full.upper >= full.value


def test_small_holdout_states_an_effective_tolerance_and_keeps_the_point_rule() -> None:
    """16 held-out samples cannot vouch for 0.01: the bound is held to the resolution, the point loss still to the
    tolerance, so a KL loss of 0.034 is rejected although its bound is within the effective tolerance."""
    x = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
    judge = Judge(_classifier(1.0), CalibrationData("mem", 16, {"x": x}), None, 0.01, 16)
    assert judge.effective_tolerance == pytest.approx(binomial_upper(0, 16, 0.9)) and judge.effective_tolerance > 0.1
    assert "effective tolerance" in judge.warning
    assert judge(_classifier(1.0)).accepted
    ref, _ = _logits(16, 0, 0.0)
    acc = FidelityAccumulator("agreement", 0.01)
    acc.update([ref], [ref * 0.6])  # softer logits: no flip, KL loss 0.034 > 0.01
    fid = acc.result()
    fid.upper, fid.effective_tolerance = acc.bounds()[1], judge.effective_tolerance
    assert fid.components["flip_loss"] == 0 and fid.value > 0.01
    assert fid.upper <= judge.effective_tolerance and not fid.accepted  # the bound alone would accept it
    fid.value = 0.0  # the same bound with a loss within the tolerance: accepted
    assert fid.accepted
