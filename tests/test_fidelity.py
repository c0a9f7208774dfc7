"""fidelity.py: every metric on hand-built outputs with known values, streaming == one-shot, worst output wins,
probability detection, the training-data warning."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import rel_entr, softmax

from onnx_easier.errors import BadArgumentError, BadDataError, VerificationError
from onnx_easier.fidelity import (
    KL_COEF,
    FidelityAccumulator,
    default_metric,
    looks_like_probabilities,
    measure_fidelity,
    training_data_warning,
)


def _kl2(a: float, b: float) -> float:
    """KL(sigmoid-pair of logit a || of logit b) for two classes, written out with math."""
    p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_agreement_kl_dominates_before_any_flip() -> None:
    r = np.array([[3.0, 0.0], [0.0, 2.0]], np.float32)
    c = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    f = measure_fidelity([r], [c])
    kl = _kl2(3.0, 1.0) / 2
    assert f.metric == "agreement" and f.samples == 2
    assert f.components["top1_agreement"] == 1.0 and f.components["flip_loss"] == 0.0
    assert f.components["mean_kl"] == pytest.approx(kl, rel=1e-6)
    assert f.value == pytest.approx(KL_COEF * math.sqrt(kl), rel=1e-6)
    assert f.components["outputs_are"] == "logits"


def test_agreement_flip_dominates() -> None:
    # the last row's logits are swapped: KL(p || reversed p) = (p2 - p1) * log(p2 / p1) = tanh(1/2) for a 1-logit gap
    r = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    c = r.copy()
    c[3] = [1.0, 0.0]
    f = measure_fidelity([r], [c], "agreement")
    assert f.components["flip_loss"] == 0.25
    assert f.components["mean_kl"] == pytest.approx(math.tanh(0.5) / 4, rel=1e-12)
    assert f.value == 0.25 and not f.ok


def test_kl_matches_scipy_on_random_logits() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=(50, 7)) * 3
    c = r + rng.normal(size=r.shape) * 0.3
    want = rel_entr(softmax(r, axis=1), softmax(c, axis=1)).sum(axis=1).mean()
    assert measure_fidelity([r], [c]).components["mean_kl"] == pytest.approx(want, rel=1e-9)


def test_probabilities_are_not_softmaxed_twice_and_log_probs_need_nothing() -> None:
    rng = np.random.default_rng(1)
    r = rng.normal(size=(20, 5)) * 4
    c = r + rng.normal(size=r.shape)
    on_logits = measure_fidelity([r], [c])
    on_probs = measure_fidelity([softmax(r, axis=1)], [softmax(c, axis=1)])
    r_log, c_log = np.log(softmax(r, axis=1)), np.log(softmax(c, axis=1))
    on_log_probs = measure_fidelity([r_log], [c_log])
    assert on_probs.components["outputs_are"] == "probabilities"
    assert on_log_probs.components["outputs_are"] == "logits"
    assert on_probs.components["mean_kl"] == pytest.approx(on_logits.components["mean_kl"], rel=1e-6)
    assert on_log_probs.components["mean_kl"] == pytest.approx(on_logits.components["mean_kl"], rel=1e-9)
    # a second softmax would flatten the distributions and shrink KL a lot
    twice = rel_entr(softmax(softmax(r, 1), 1), softmax(softmax(c, 1), 1)).sum(1).mean()
    assert twice < 0.5 * on_probs.components["mean_kl"]


def test_looks_like_probabilities() -> None:
    assert looks_like_probabilities(np.array([[0.2, 0.8], [1.0, 0.0]], np.float32))
    assert looks_like_probabilities(np.array([[0.3333, 0.3333, 0.3334]]))
    assert not looks_like_probabilities(np.array([[-0.1, 1.1]]))
    assert not looks_like_probabilities(np.array([[0.5, 0.6]]))
    assert not looks_like_probabilities(np.array([0.5, 0.5]))
    assert not looks_like_probabilities(np.array([[np.nan, 1.0]]))


def test_cosine_known_values() -> None:
    r = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    c = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [-3.0, -4.0]])
    f = measure_fidelity([r], [c], "cosine")
    # cosines 0, 1, 1 (both zero), -1
    assert f.components["mean_cosine"] == pytest.approx(0.25)
    assert f.value == pytest.approx(0.75)


def test_cosine_flattens_each_sample() -> None:
    r = np.ones((2, 3, 4, 4))
    c = r.copy()
    c[1] = 0.0
    c[1, 0] = 1.0  # one of three channels kept: cos = 16 / sqrt(48 * 16) = 1 / sqrt(3)
    f = measure_fidelity([r], [c], "cosine")
    assert f.value == pytest.approx(1 - (1 + 1 / math.sqrt(3)) / 2)


def test_rel_l2_known_value_over_all_samples() -> None:
    r = np.array([[3.0, 4.0], [0.0, 0.0]])
    c = np.array([[3.0, 4.0], [0.0, 0.05]])
    f = measure_fidelity([r], [c], "rel-l2")
    assert f.value == pytest.approx(0.01) and f.components["rel_l2"] == pytest.approx(0.01)
    assert f.ok  # 0.01 <= the default tolerance 0.01


def test_rel_l2_zero_reference() -> None:
    z = np.zeros((2, 3))
    assert measure_fidelity([z], [z], "rel-l2").value == 0.0
    assert measure_fidelity([z], [z + 1], "rel-l2").value == math.inf


@pytest.mark.parametrize("metric", ["agreement", "cosine", "rel-l2"])
def test_streaming_equals_one_shot(metric: str) -> None:
    rng = np.random.default_rng(2)
    r1, r2 = rng.normal(size=(37, 6)) * 2, rng.normal(size=(37, 4))
    c1, c2 = r1 + rng.normal(size=r1.shape) * 0.5, r2 + rng.normal(size=r2.shape) * 0.1
    whole = measure_fidelity([r1, r2], [c1, c2], metric)
    acc = FidelityAccumulator(metric)
    for lo, hi in ((0, 1), (1, 16), (16, 16), (16, 37)):
        acc.update([r1[lo:hi], r2[lo:hi]], [c1[lo:hi], c2[lo:hi]])
    streamed = acc.result()
    assert streamed.samples == whole.samples == 37
    assert streamed.value == pytest.approx(whole.value, rel=1e-12)
    assert streamed.components.keys() == whole.components.keys()


def test_several_outputs_worst_counts() -> None:
    r = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    boxes = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    f = measure_fidelity([r, boxes], [r, boxes * 1.2], "rel-l2")
    assert f.value == pytest.approx(0.2) and f.components["worst_output"] == 1
    assert [o["loss"] for o in f.components["per_output"]] == [0.0, pytest.approx(0.2)]
    g = measure_fidelity([boxes, r], [boxes * 1.2, r], "rel-l2")
    assert g.value == pytest.approx(0.2) and g.components["worst_output"] == 0


def test_default_metric() -> None:
    assert default_metric([["N", 10]]) == "agreement"
    assert default_metric([["N", 10], [8, 4]]) == "agreement"
    assert default_metric([["N", 10], ["N", 4, 4]]) == "rel-l2"
    assert default_metric([["N", 1]]) == "rel-l2"
    assert default_metric([["N", "K"]]) == "rel-l2"
    assert default_metric([["N", 3, 8, 8]]) == "rel-l2"
    assert default_metric([]) == "rel-l2"
    assert measure_fidelity([np.ones((2, 3, 2))], [np.ones((2, 3, 2))]).metric == "rel-l2"


def test_nonfinite_candidate_fails_and_reports_none() -> None:
    r = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = r.copy()
    c[0, 0] = np.nan
    for metric in ("agreement", "cosine", "rel-l2"):
        f = measure_fidelity([r], [c], metric)
        assert f.value == math.inf and not f.ok and f.components["nonfinite_samples"] == 1
        assert f.as_report()["value"] is None


def test_bad_inputs_raise_one_line_errors() -> None:
    r = np.zeros((4, 3))
    with pytest.raises(VerificationError, match="shape"):
        measure_fidelity([r], [np.zeros((4, 2))])
    with pytest.raises(VerificationError, match="outputs"):
        measure_fidelity([r], [r, r])
    with pytest.raises(BadArgumentError, match="agreement"):
        measure_fidelity([np.zeros((4, 1))], [np.zeros((4, 1))], "agreement")
    with pytest.raises(BadArgumentError, match="metric"):
        FidelityAccumulator("top5")
    with pytest.raises(BadDataError, match="NaN"):
        measure_fidelity([np.full((2, 2), np.inf)], [np.zeros((2, 2))], "rel-l2")
    acc = FidelityAccumulator("cosine")
    acc.update([np.zeros((2, 3))], [np.zeros((2, 3))])
    with pytest.raises(BadDataError, match="first batch"):
        acc.update([np.zeros((2, 4))], [np.zeros((2, 4))])


def _with_confidence(conf: float, n: int = 10, k: int = 10) -> np.ndarray:
    """Logits [n, k] whose top-1 softmax probability is exactly ``conf`` on every row."""
    gap = math.log(conf * (k - 1) / (1 - conf))
    x = np.zeros((n, k))
    x[np.arange(n), np.arange(n) % k] = gap
    return x


def test_training_data_warning_threshold() -> None:
    assert softmax(_with_confidence(0.995), axis=1).max(axis=1) == pytest.approx(0.995)
    msg = training_data_warning([_with_confidence(0.995)])
    assert msg is not None and "\n" not in msg and "99.5%" in msg
    assert "mean top-1 confidence" in msg and "understate" in msg and "probably" not in msg  # what it measured
    assert training_data_warning([_with_confidence(0.985)]) is None
    assert training_data_warning([softmax(_with_confidence(0.995), axis=1)]) is not None  # probabilities
    assert training_data_warning([np.ones((5, 3, 4))]) is None  # not a classifier
    # the least confident classifier output decides
    assert training_data_warning([_with_confidence(0.999), _with_confidence(0.95)]) is None
    r = _with_confidence(0.997)
    assert measure_fidelity([r], [r]).training_data_warning() is not None
    assert measure_fidelity([r], [r], "rel-l2").components["reference_confidence"] == pytest.approx(0.997)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31 - 1), st.sampled_from(["agreement", "cosine",
                                                                                          "rel-l2"]))
def test_identical_outputs_lose_nothing_and_noise_loses_something(n: int, k: int, seed: int, metric: str) -> None:
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(n, k)).astype(np.float32) * 3 + 0.5
    assert measure_fidelity([r], [r.copy()], metric).value == pytest.approx(0.0, abs=1e-12)
    c = r + rng.normal(size=r.shape).astype(np.float32)
    assert measure_fidelity([r], [c], metric).value > 0.0
