"""reconstruct.Targets: the original's tensors per batch, cached as prefixes within a memory budget."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.data import CalibrationData
from onnx_easier.reconstruct import Targets

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 6)).astype(np.float32)


def _model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r"], ["y"], name="sum", keepdims=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(W, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = RNG.standard_normal((40, 4)).astype(np.float32)
DATA = CalibrationData("t", 40, {"x": X})
EXPECT = {"h": X @ W, "r": np.maximum(X @ W, 0)}


def _check(got: list[np.ndarray], name: str, batch: int = 8) -> None:
    assert len(got) == 5
    for i, y in enumerate(got):
        np.testing.assert_allclose(y, EXPECT[name][i * batch:(i + 1) * batch], rtol=1e-5, atol=1e-5)


def test_an_early_stop_leaves_its_prefix_and_the_next_reader_continues() -> None:
    t = Targets(_model())
    first = t.batches("h", DATA, 8)
    head = [next(first), next(first)]
    assert t.computed == 2
    second = [y for _, y in zip(range(3), t.batches("h", DATA, 8))]
    _check(head + second[2:] + [EXPECT["h"][24:32], EXPECT["h"][32:]], "h")
    _check(second + [EXPECT["h"][24:32], EXPECT["h"][32:]], "h")
    assert t.computed == 3  # 2 by the first reader, which stopped; the second got them from the cache + 1 more
    _check(list(t.batches("h", DATA, 8)), "h")
    assert t.computed == 5  # only the missing batches were run
    _check(list(t.batches("h", DATA, 8)), "h")
    assert t.computed == 5


def test_keys_are_per_data_set_and_batch_size() -> None:
    t = Targets(_model())
    list(t.batches("r", DATA, 8))
    other = CalibrationData("u", 40, {"x": X[::-1].copy()})
    got = list(t.batches("r", other, 8))
    np.testing.assert_allclose(np.concatenate(got), np.maximum(X[::-1] @ W, 0), rtol=1e-5, atol=1e-5)
    got = list(t.batches("r", DATA, 20))
    assert [g.shape[0] for g in got] == [20, 20] and t.computed == 5 + 5 + 2


def test_the_budget_evicts_the_least_recently_used_tensor() -> None:
    one = 40 * 6 * 4  # one tensor of the 40 samples, float32
    t = Targets(_model(), max_bytes=one)
    list(t.batches("h", DATA, 8))
    list(t.batches("r", DATA, 8))  # evicts h
    _check(list(t.batches("r", DATA, 8)), "r")
    assert t.computed == 10
    _check(list(t.batches("h", DATA, 8)), "h")
    assert t.computed == 15


@pytest.mark.parametrize("max_bytes", [0, 8 * 6 * 4 * 2])
def test_a_tensor_over_the_budget_keeps_what_fits_and_recomputes_the_rest(max_bytes: int) -> None:
    t = Targets(_model(), max_bytes=max_bytes)
    _check(list(t.batches("h", DATA, 8)), "h")
    _check(list(t.batches("h", DATA, 8)), "h")
    kept = max_bytes // (8 * 6 * 4)
    assert t.computed == 5 + 5 - kept


def test_interleaved_readers_of_one_tensor_get_the_same_batches() -> None:
    t = Targets(_model())
    a, b = t.batches("r", DATA, 8), t.batches("r", DATA, 8)
    got_a, got_b = [], []
    for _ in range(5):
        got_a.append(next(a))
        got_b.append(next(b))
    _check(got_a, "r")
    _check(got_b, "r")
    _check(list(t.batches("r", DATA, 8)), "r")


def test_a_tensor_that_cannot_fit_evicts_nothing() -> None:
    t = Targets(_model(), max_bytes=8 * 6 * 4 * 3)  # three batches of one tensor
    list(t.batches("h", DATA, 8))  # keeps 3 of its 5 batches
    list(t.batches("r", DATA, 40))  # one batch of 40 samples cannot fit at all: h stays
    list(t.batches("h", DATA, 8))
    assert t.computed == 5 + 1 + 2


@pytest.mark.parametrize("name", ["ffn_digits", "mobilenetv2_digits", "resnet_digits"])
def test_the_exact_fusions_keep_the_values_of_every_name_they_keep(name: str) -> None:
    """Targets computes the original's tensors from the exact-fused model (``exact=``): each tensor name both models
    hold must carry the same values (the fusions rename what they change). Unfused BatchNorm (mobilenetv2), chains
    (ffn) and residual blocks (resnet) are folded here."""
    from pathlib import Path

    from onnx_easier.api import optimize
    from onnx_easier.calibrate import upstream
    from onnx_easier.model_io import make_session

    models = Path(__file__).resolve().parents[1] / "models"
    original = onnx.load(models / f"{name}.onnx")
    feeds = np.load(models / "digits16_calib.npz")
    exact = optimize(original, str(models / "digits16_calib.npz"), tolerance=0).model
    t = Targets(original, exact=exact)
    shared = sorted(t.names)
    assert len(shared) > 10 and t.original is exact
    x = {"x": feeds["x"][:16]}
    got = [make_session(upstream(m, shared)).run(shared, x) for m in (original, exact)]
    for tensor, a, b in zip(shared, *got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())), err_msg=tensor)
