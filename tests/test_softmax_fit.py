"""KL re-fit of a classifier head (softmax_fit.py) and its use by reconstruct.refit_layers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_easier.softmax_fit import fit_softmax, log_softmax, mean_kl


def teacher(rng: np.random.Generator, n: int, f: int = 12, k: int = 5, scale: float = 3.0):
    w = rng.standard_normal((k, f))
    x = rng.standard_normal((n, f))
    return x, w, x @ w.T * scale


def test_mean_kl_matches_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 4)), rng.standard_normal((7, 4))
    p, q = np.exp(log_softmax(a)), np.exp(log_softmax(b))
    assert mean_kl(a, b) == pytest.approx(float((p * np.log(p / q)).sum(1).mean()), rel=1e-12)
    assert mean_kl(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # a shift of all logits changes nothing


def test_recovers_a_linear_teacher_from_zero() -> None:
    rng = np.random.default_rng(1)
    x, w, z = teacher(rng, 600)
    xc, zc = x[500:], z[500:]
    res = fit_softmax(x[:500], z[:500], xc, zc, np.zeros_like(w), np.zeros(len(w)), ridge=0.0)
    assert res.improved
    assert res.kl_after < 0.02 * res.kl_before  # large logits: the softmax saturates, convergence is slow
    assert mean_kl(zc, xc @ res.weight.T + res.bias) == pytest.approx(res.kl_after, rel=1e-9)


def test_improves_on_least_squares_when_logits_saturate() -> None:
    """Teacher logits 6*tanh(x W): least squares on the logits spends its effort on the saturated, irrelevant
    classes; the KL fit from that start lowers the held-out KL."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1500, 10))
    w = rng.standard_normal((6, 10))
    z = 6.0 * np.tanh(x @ w.T)
    a = np.hstack([x[:1000], np.ones((1000, 1))])
    v = np.linalg.lstsq(a, z[:1000], rcond=None)[0]
    res = fit_softmax(x[:1000], z[:1000], x[1000:1250], z[1000:1250], v[:-1].T, v[-1])
    assert res.improved and res.kl_after < 0.9 * res.kl_before
    # and on rows used neither for fitting nor for early stopping
    ls = mean_kl(z[1250:], x[1250:] @ v[:-1] + v[-1])
    assert mean_kl(z[1250:], x[1250:] @ res.weight.T + res.bias) < ls


def test_exact_start_is_returned_unchanged() -> None:
    rng = np.random.default_rng(3)
    x, w, z = teacher(rng, 100)
    res = fit_softmax(x, z, x, z, w * 3.0, np.zeros(len(w)))
    assert res.kl_before == pytest.approx(0.0, abs=1e-12) and res.iterations == 0
    assert not res.improved
    np.testing.assert_allclose(res.weight, w * 3.0, atol=1e-9)


def test_non_finite_input_raises() -> None:
    rng = np.random.default_rng(4)
    x, w, z = teacher(rng, 50)
    z[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_softmax(x, z, x, z, w, np.zeros(len(w)))


def test_refit_layers_adds_a_kl_step_for_the_head() -> None:
    """The MLP of test_select with its last Relu linearized: the head (a Gemm writing the graph output) gets the
    least-squares record and a KL record; the KL record's errors are check KLs, lower when kept."""
    from test_select import mlp_without_r2

    from onnx_easier.model_io import make_session
    from onnx_easier.reconstruct import refit_layers

    original, built, x, fit, check = mlp_without_r2(64, 700)
    head = [n.name for n in built.model.graph.node if n.op_type == "Gemm"][-1]
    plain, rec_plain = refit_layers(built.model, original, [head], fit, check)
    model, records = refit_layers(built.model, original, [head], fit, check, softmax_head=True)
    assert len(rec_plain) == 1 and len(records) == 2
    kl = records[1]
    assert kl.node == head and "KL" in kl.note
    assert kl.error_after <= kl.error_before
    onnx.checker.check_model(model, full_check=True)
    z0 = make_session(original).run(None, {"x": x[500:]})[0]
    z_ls = make_session(plain).run(None, {"x": x[500:]})[0]
    z_kl = make_session(model).run(None, {"x": x[500:]})[0]
    assert mean_kl(z0, z_ls) == pytest.approx(kl.error_before, rel=1e-4)
    assert mean_kl(z0, z_kl) == pytest.approx(kl.error_after, rel=1e-4)
    if kl.accepted:
        assert mean_kl(z0, z_kl) < mean_kl(z0, z_ls)
