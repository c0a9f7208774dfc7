from __future__ import annotations

import logging
import sys
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier import execution as execution_module
from onnx_easier.activations import Activation
from onnx_easier.calibrate import ChannelStats, calibrate, upstream
from onnx_easier.data import CalibrationData, input_specs, load_data
from onnx_easier.entropy import layer_entropy
from onnx_easier.errors import BadArgumentError, BadDataError, OnnxEasierError
from onnx_easier.model_io import make_session
from onnx_easier.shapes import augment

F32 = TensorProto.FLOAT
C, HW, K = 4, 6, 5  # conv channels, spatial size, gemm units


def _act_nodes(op: str, x: str, y: str, name: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    if op == "Relu":
        return [helper.make_node("Relu", [x], [y], name=name)], []
    if op == "LeakyRelu":
        return [helper.make_node("LeakyRelu", [x], [y], name=name, alpha=0.1)], []
    if op == "Clip":  # ReLU6
        lo, hi = (
            numpy_helper.from_array(np.array(0, np.float32), f"{name}_lo"),
            numpy_helper.from_array(np.array(6, np.float32), f"{name}_hi"),
        )
        return [helper.make_node("Clip", [x, lo.name, hi.name], [y], name=name)], [lo, hi]
    raise ValueError(op)


def _net(
    op: str = "Relu", batch: int | str = "N", conv_bias: np.ndarray | None = None, seed: int = 0
) -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv(4, 3x3, pad 1) -> act1 -> Flatten -> Gemm(5) -> act2 -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32) * 0.5, "W"),
        numpy_helper.from_array((rng.standard_normal(C) if conv_bias is None else conv_bias).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((C * HW * HW, K)).astype(np.float32) * 0.2, "G"),
        numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "GB"),
    ]
    a1, i1 = _act_nodes(op, "conv", "act1", "act1")
    a2, i2 = _act_nodes(op, "gemm", "y", "act2")
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        *a1,
        helper.make_node("Flatten", ["act1"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "G", "GB"], ["gemm"], name="gemm"),
        *a2,
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", F32, [batch, 3, HW, HW])],
        [helper.make_tensor_value_info("y", F32, [batch, K])],
        inits + i1 + i2,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _acts(op: str = "Relu") -> list[Activation]:
    return [
        Activation("act1", op, "op", "conv", "act1", ("act1",), 1, C),
        Activation("act2", op, "op", "gemm", "y", ("act2",), -1, K),
    ]


def _data(n: int, seed: int = 0) -> CalibrationData:
    x = np.random.default_rng(seed).standard_normal((n, 3, HW, HW)).astype(np.float32)
    return CalibrationData("mem", n, {"x": x})


def _exposed(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Independent reference: a copy whose graph outputs are ``names`` (written by hand), run on all of ``x``."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    del ref.graph.output[:]
    ref.graph.output.extend(helper.make_tensor_value_info(n, F32, None) for n in names)
    return dict(zip(names, make_session(ref).run(names, {"x": x})))


def _per_channel(t: np.ndarray, axis: int) -> np.ndarray:
    """[C, everything else] by moving the channel axis to the front (a copy; the reference way)."""
    return np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)


# --- counts -------------------------------------------------------------------------------------------------------


def test_counts_match_numpy_reference() -> None:
    model, data = _net(), _data(40)
    stats = calibrate(model, _acts(), data)
    ref = _exposed(model, ["conv", "gemm"], data.arrays["x"])
    for act in _acts():
        xs = _per_channel(ref[act.input], act.axis)
        p_ref = (xs >= 0).mean(axis=1)
        s = stats[act.name]
        assert s.count == xs.shape[1]
        np.testing.assert_array_equal(s.count_on, (xs >= 0).sum(axis=1))
        np.testing.assert_allclose(s.p, p_ref, rtol=0, atol=1e-6)
        assert s.entropy == pytest.approx(layer_entropy((xs >= 0).sum(axis=1), xs.shape[1]), abs=1e-12)
    assert stats["act1"].count == 40 * HW * HW and stats["act1"].axis == 1
    assert stats["act2"].count == 40 and stats["act2"].axis == 1  # -1 normalised for the rank-2 Gemm output
    assert 0 < stats["act1"].entropy <= 1


def test_results_do_not_depend_on_batch_size() -> None:
    model, data = _net(), _data(50)
    runs = [calibrate(model, _acts(), data, batch_size=b, moments=True) for b in (1, 7, 64)]
    auto = calibrate(model, _acts(), data, moments=True)
    for other in [*runs[1:], auto]:
        for name, s in runs[0].items():
            o = other[name]
            np.testing.assert_array_equal(o.count_on, s.count_on)
            assert o.count == s.count
            for field in ("sum_x", "sum_x2", "sum_y", "sum_xy", "sum_y2"):
                _close_sums(getattr(o, field), getattr(s, field), s.sum_x2 + s.sum_y2)
            # extremes are values ORT computed: the same up to float32 rounding, which may differ with the batch
            # shape (ORT picks kernels per shape)
            np.testing.assert_allclose(o.min_x, s.min_x, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(o.max_x, s.max_x, rtol=1e-6, atol=1e-6)


def _close_sums(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> None:
    """Moments are float32 partial sums added in float64: exact to ~1e-7 of the sum of magnitudes (``scale``)."""
    assert np.all(np.abs(got - want) <= 1e-6 * scale), np.max(np.abs(got - want) / scale)


def test_moments_match_numpy_reference() -> None:
    model, data = _net("LeakyRelu"), _data(30)
    stats = calibrate(model, _acts("LeakyRelu"), data, moments=True)
    ref = _exposed(model, ["conv", "act1", "gemm", "y"], data.arrays["x"])
    for act in _acts("LeakyRelu"):
        xs = _per_channel(ref[act.input], act.axis).astype(np.float64)
        ys = _per_channel(ref[act.output], act.axis).astype(np.float64)
        s = stats[act.name]
        scale = (np.abs(xs) + xs * xs + ys * ys).sum(1)
        _close_sums(s.sum_x, xs.sum(1), scale)
        _close_sums(s.sum_x2, (xs * xs).sum(1), scale)
        _close_sums(s.sum_y, ys.sum(1), scale)
        _close_sums(s.sum_xy, (xs * ys).sum(1), scale)
        _close_sums(s.sum_y2, (ys * ys).sum(1), scale)
        np.testing.assert_array_equal(s.min_x, xs.min(1))
        np.testing.assert_array_equal(s.max_x, xs.max(1))


def test_npy_memory_mapped_data(tmp_path: Path) -> None:
    model, data = _net(), _data(20)
    np.save(tmp_path / "x.npy", data.arrays["x"])
    mapped = load_data(str(tmp_path / "x.npy"), input_specs(model))
    assert isinstance(mapped.arrays["x"], np.memmap)
    a, b = calibrate(model, _acts(), data), calibrate(model, _acts(), mapped, batch_size=3)
    for name in a:
        np.testing.assert_array_equal(a[name].count_on, b[name].count_on)


# --- affine fit ---------------------------------------------------------------------------------------------------


def test_affine_fit_recovers_exact_affine_map() -> None:
    """y = a_c * x + b_c per channel (Mul, Add on axis 1): the fit returns a_c, b_c and zero error."""
    a = np.array([2.5, -1.0, 0.25], np.float32)
    b = np.array([-1.0, 3.0, 0.5], np.float32)
    inits = [
        numpy_helper.from_array(a.reshape(1, 3, 1), "a"),
        numpy_helper.from_array(b.reshape(1, 3, 1), "b"),
    ]
    nodes = [helper.make_node("Mul", ["x", "a"], ["ax"]), helper.make_node("Add", ["ax", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "aff",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 7])],
        [helper.make_tensor_value_info("y", F32, ["N", 3, 7])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    act = Activation("aff", "Affine", "mul-add", "x", "y", ("m", "a"), 1, 3)
    x = np.random.default_rng(3).standard_normal((25, 3, 7)).astype(np.float32) * 2 + 1
    s = calibrate(model, [act], CalibrationData("mem", 25, {"x": x}), moments=True)["aff"]
    fa, fb = s.affine_fit()
    np.testing.assert_allclose(fa, a, rtol=1e-6)
    np.testing.assert_allclose(fb, b, rtol=1e-6, atol=1e-6)
    assert np.all(s.affine_mse() < 1e-10)
    assert np.all(s.identity_mse() > 0.1)


def test_saturated_relu_channels_fit_identity_and_zero() -> None:
    """Conv biases +-50 with small weights: channel 0 is always ON (y = x), channel 1 always OFF (y = 0)."""
    model = _net(conv_bias=np.array([50.0, -50.0, 0.0, 0.0]))
    stats = calibrate(model, _acts()[:1], _data(16), moments=True)["act1"]
    np.testing.assert_array_equal(stats.p[:2], [1.0, 0.0])
    a, b = stats.affine_fit()
    assert a[0] == pytest.approx(1.0, abs=1e-9) and b[0] == pytest.approx(0.0, abs=1e-6)
    assert a[1] == 0.0 and b[1] == 0.0
    assert stats.affine_mse()[:2] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert stats.identity_mse()[0] == 0.0 and stats.identity_mse()[1] > 100


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu", "Clip"])
def test_affine_fit_is_least_squares_and_beats_identity(op: str) -> None:
    model, data = _net(op, seed=1), _data(40, seed=2)
    stats = calibrate(model, _acts(op), data, moments=True)
    ref = _exposed(model, ["conv", "act1", "gemm", "y"], data.arrays["x"])
    for act in _acts(op):
        s = stats[act.name]
        a, b = s.affine_fit()
        xs = _per_channel(ref[act.input], act.axis).astype(np.float64)
        ys = _per_channel(ref[act.output], act.axis).astype(np.float64)
        for c in range(xs.shape[0]):
            ra, rb = np.polyfit(xs[c], ys[c], 1)
            scale = np.mean(xs[c] ** 2) + np.mean(ys[c] ** 2)  # the sums' magnitude sets their rounding
            assert a[c] == pytest.approx(ra, rel=1e-5, abs=1e-6)
            assert b[c] == pytest.approx(rb, rel=1e-5, abs=1e-6)
            mse = np.mean((ys[c] - ra * xs[c] - rb) ** 2)
            assert s.affine_mse()[c] == pytest.approx(mse, abs=1e-6 * scale)
            assert s.identity_mse()[c] == pytest.approx(np.mean((ys[c] - xs[c]) ** 2), abs=1e-6 * scale)
            assert s.affine_mse()[c] <= s.identity_mse()[c] + 1e-6 * scale


def test_constant_channel_is_degenerate() -> None:
    """Constant channels (0.3 is not exact in float32, so its sums round) and channels whose spread is below what
    float32 sums resolve fit y by its mean with slope 0."""
    x = np.zeros((4, 4, 5000), np.float32)
    x[:, 0] = 2.0  # constant, ON
    x[:, 1] = 0.3 + 1e-5 * np.random.default_rng(0).standard_normal((4, 5000))  # std 3e-5 of rms: below resolution
    x[:, 2] = np.float32(0.3)
    x[:, 3] = np.linspace(-1, 1, 20000, dtype=np.float32).reshape(4, 5000)
    s = ChannelStats.from_batch(x, 1, np.maximum(x, 0))
    a, b = s.affine_fit()
    assert a[:3].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(b[:3], [2.0, 0.3, 0.3], rtol=1e-6)
    assert a[3] == pytest.approx(0.5, rel=1e-3)  # relu on a ramp over [-1, 1]: cov = 1/6, var = 1/3
    # the residual is var(y) = 0 up to the sums' float32 resolution, 1e-6 of E[y^2]
    assert np.isfinite(s.affine_mse()).all() and np.all(s.affine_mse()[:3] <= 1e-6 * s.sum_y2[:3] / s.count)


def test_moments_required_for_fit() -> None:
    s = ChannelStats.from_batch(np.ones((2, 3), np.float32), -1)
    with pytest.raises(ValueError, match="moments=True"):
        s.affine_fit()
    with pytest.raises(ValueError, match="moments=True"):
        s.identity_mse()


# --- ChannelStats -------------------------------------------------------------------------------------------------


def test_merge_equals_whole() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 6, 3)).astype(np.float32)
    y = np.maximum(x, 0)
    whole = ChannelStats.from_batch(x, -1, y)
    merged = ChannelStats.from_batch(x[:4], -1, y[:4]).merge(ChannelStats.from_batch(x[4:], 2, y[4:]))
    assert whole.axis == merged.axis == 2 and whole.count == merged.count == 60
    np.testing.assert_array_equal(whole.count_on, merged.count_on)
    for field in ("sum_x", "sum_x2", "sum_y", "sum_xy", "sum_y2", "min_x", "max_x"):
        np.testing.assert_allclose(getattr(merged, field), getattr(whole, field), rtol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(ChannelStats.from_batch(x, 1, y))
    with pytest.raises(ValueError, match="without"):
        whole.merge(ChannelStats.from_batch(x, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32])
def test_from_batch_moments_over_many_positions(dtype: type) -> None:
    """More positions per sample than one partial-sum block (256), in every input type."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 2, 9000)) * 4 + 1).astype(dtype)
    y = np.where(x >= 0, x, x // 4 if np.dtype(dtype).kind == "i" else x * 0.25).astype(dtype)
    s = ChannelStats.from_batch(x, 1, y)
    xs, ys = _per_channel(x, 1).astype(np.float64), _per_channel(y, 1).astype(np.float64)
    scale = (np.abs(xs) + xs * xs + ys * ys).sum(1)
    for got, want in [
        (s.sum_x, xs.sum(1)),
        (s.sum_x2, (xs * xs).sum(1)),
        (s.sum_y, ys.sum(1)),
        (s.sum_xy, (xs * ys).sum(1)),
        (s.sum_y2, (ys * ys).sum(1)),
    ]:
        _close_sums(got, want, scale)
    assert s.count == 27000 and s.count_on.tolist() == (xs >= 0).sum(1).tolist()
    assert s.min_x.tolist() == xs.min(1).tolist() and s.max_x.dtype == np.float64


def test_from_batch_checks() -> None:
    x = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        ChannelStats.from_batch(x, 3)
    with pytest.raises(ValueError, match="differs"):
        ChannelStats.from_batch(x, 1, np.ones((2, 3), np.float32))
    on = ChannelStats.from_batch(np.array([[0.0, -0.0, -1e-30]], np.float32), -1).count_on
    assert on.tolist() == [1, 1, 0] and on.dtype == np.int64


# --- augment ------------------------------------------------------------------------------------------------------


def test_augment() -> None:
    model = _net()
    before = model.SerializeToString()
    aug = augment(model, ["conv", "gemm", "conv", "y", "x"])
    assert model.SerializeToString() == before
    outs = [o.name for o in aug.graph.output]
    assert outs == ["y", "conv", "gemm", "x"]
    assert all(o.type.tensor_type.elem_type == F32 for o in aug.graph.output)
    sess = make_session(aug)
    got = sess.run(["conv"], {"x": _data(2).arrays["x"]})[0]
    assert got.shape == (2, C, HW, HW)
    with pytest.raises(OnnxEasierError, match="'nope' is not in the model's main graph"):
        augment(model, ["nope"])


def test_upstream_keeps_only_what_the_tensors_need() -> None:
    """x -> Conv (w0) -> Relu -> Conv (w1) -> Add(., x-branch Conv w2) -> Relu -> y: asking for the first Relu keeps
    two nodes and one weight; asking for the Add's output keeps its both branches; values equal the full model's."""
    rng = np.random.default_rng(0)
    w = {f"w{i}": numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), f"w{i}")
         for i in range(3)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"]), helper.make_node("Conv", ["x", "w2"], ["c2"]),
             helper.make_node("Add", ["c1", "c2"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", F32, ["N", 3, 4, 4])], list(w.values()))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    full = make_session(augment(model, ["r0", "s"])).run(["r0", "s"], {"x": x})
    cut = upstream(model, ["r0"])
    assert [n.op_type for n in cut.graph.node] == ["Conv", "Relu"]
    assert [t.name for t in cut.graph.initializer] == ["w0"]
    assert [o.name for o in cut.graph.output] == ["r0"] and [i.name for i in cut.graph.input] == ["x"]
    np.testing.assert_array_equal(make_session(cut).run(["r0"], {"x": x})[0], full[0])
    both = upstream(model, ["s", "x", "r0"])
    assert [o.name for o in both.graph.output] == ["s", "x", "r0"]
    assert [n.op_type for n in both.graph.node] == ["Conv", "Relu", "Conv", "Conv", "Add"]
    got = make_session(both).run(["s", "x", "r0"], {"x": x})
    np.testing.assert_array_equal(got[0], full[1])
    np.testing.assert_array_equal(got[1], x)
    assert model.SerializeToString() == before


def test_upstream_keeps_initializers_that_are_graph_inputs() -> None:
    """Old exporters list every initializer as a graph input too: cutting one away would leave an input ORT
    requires. Such initializers stay (only the real input is fed)."""
    rng = np.random.default_rng(1)
    w0, w1 = (numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), n) for n in ("w0", "w1"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]), helper.make_node("Conv", ["c0", "w1"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 3, 4, 4]),
                                       helper.make_tensor_value_info("w0", F32, [3, 3, 1, 1]),
                                       helper.make_tensor_value_info("w1", F32, [3, 3, 1, 1])],
                          [helper.make_tensor_value_info("y", F32, ["N", 3, 4, 4])], [w0, w1])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 3
    cut = upstream(model, ["c0"])
    assert [n.op_type for n in cut.graph.node] == ["Conv"]
    assert sorted(t.name for t in cut.graph.initializer) == ["w0", "w1"]
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(make_session(cut).run(["c0"], {"x": x})[0],
                               make_session(augment(model, ["c0"])).run(["c0"], {"x": x})[0])


def test_upstream_does_not_cut_graphs_with_subgraphs() -> None:
    """A body may read an outer tensor without naming it as an input: such models are only augmented."""
    then = helper.make_graph([helper.make_node("Identity", ["c0"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F32, None)])
    nodes = [helper.make_node("Relu", ["x"], ["c0"]), helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
             helper.make_node("Greater", ["sum", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N"])],
                          [helper.make_tensor_value_info("y", F32, None)],
                          [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cut = upstream(model, ["cond"])
    assert len(cut.graph.node) == 4
    assert [o.name for o in cut.graph.output][-1] == "cond"


# --- calibrate: batching, errors, memory --------------------------------------------------------------------------


def test_fixed_batch_drops_remainder(caplog: pytest.LogCaptureFixture) -> None:
    model = _net(batch=4)
    with caplog.at_level(logging.WARNING, logger="onnx_easier.calibrate"):
        stats = calibrate(model, _acts(), _data(10))
    assert "dropping the last 2 of 10 calibration samples" in caplog.text
    assert stats["act2"].count == 8
    ref = calibrate(_net(), _acts(), _data(10).subset(0, 8))
    np.testing.assert_array_equal(stats["act1"].count_on, ref["act1"].count_on)
    with pytest.raises(BadArgumentError, match="fixes its batch axis to 4; use 4"):
        calibrate(model, _acts(), _data(10), batch_size=3)
    with pytest.raises(BadDataError, match="mem: 3 sample.* fixes its batch axis to 4; give at least 4 samples"):
        calibrate(model, _acts(), _data(3))


def test_calibrate_errors() -> None:
    model = _net()
    with pytest.raises(BadArgumentError, match="positive batch size"):
        calibrate(model, _acts(), _data(4), batch_size=0)
    bad = CalibrationData("mem", 2, {"image": _data(2).arrays["x"]})
    with pytest.raises(BadDataError, match=r"missing \['x'\], unknown \['image'\]"):
        calibrate(model, _acts(), bad)
    wrong = CalibrationData("mem", 2, {"x": np.zeros((2, 3, 5, 5), np.float32)})  # Gemm needs 4*6*6 features
    with pytest.raises(BadDataError, match="ONNX Runtime failed on calibration samples 0-1"):
        calibrate(model, _acts(), wrong)
    miscounted = [Activation("act1", "Relu", "op", "conv", "act1", ("act1",), 1, 7)]
    with pytest.raises(OnnxEasierError, match="expected 7 channels on axis 1, ORT gave 4"):
        calibrate(model, miscounted, _data(2))
    with pytest.raises(OnnxEasierError, match="unique"):
        calibrate(model, _acts()[:1] * 2, _data(2))
    assert calibrate(model, [], _data(2)) == {}


def test_scalar_input_fed_one_sample_at_a_time() -> None:
    nodes = [helper.make_node("Mul", ["x", "t"], ["m"]), helper.make_node("Relu", ["m"], ["y"], name="r")]
    graph = helper.make_graph(
        nodes,
        "s",
        [helper.make_tensor_value_info("x", F32, ["N", 3]), helper.make_tensor_value_info("t", F32, [])],
        [helper.make_tensor_value_info("y", F32, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[1, -1, 2], [1, 1, -3]], np.float32)
    t = np.array([1.0, -1.0], np.float32)
    act = Activation("r", "Relu", "op", "m", "y", ("r",), -1, 3)
    data = CalibrationData("mem", 2, {"x": x, "t": t}, whole=frozenset({"t"}))
    s = calibrate(model, [act], data)["r"]
    assert s.count_on.tolist() == [1, 0, 2] and s.count == 2  # x * t = [1, -1, 2], [-1, -1, 3]
    with pytest.raises(BadArgumentError, match="whole feeds, fed one sample at a time; use 1"):
        calibrate(model, [act], data, batch_size=2)


def test_no_batch_outlives_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory must not grow with the sample count: when ORT runs batch k, the tensors fetched for batches before
    k - 1 are released (batch k - 1 may still be folded on the worker thread)."""
    fetched: list[list[weakref.ref]] = []

    class Watched:
        def __init__(self, sess):
            self.sess = sess

        def __getattr__(self, name):  # get_providers and the rest: the session's own
            return getattr(self.sess, name)

        def run(self, names, feed):
            for old in fetched[:-1]:
                assert all(r() is None for r in old), "a tensor fetched two batches ago is still referenced"
            outs = self.sess.run(names, feed)
            fetched.append([weakref.ref(o) for o in outs])
            return outs

    real = execution_module.make_session  # the sessions of calibrate (execution.Execution.session)
    monkeypatch.setattr(execution_module, "make_session", lambda *a, **k: Watched(real(*a, **k)))
    calibrate(_net(), _acts(), _data(30), batch_size=4, moments=True)
    assert [len(f) for f in fetched] == [4] * 8  # 8 batches, 4 fetched tensors each (conv, gemm, act1, y)
    assert all(r() is None for f in fetched for r in f)


def test_worker_errors_surface() -> None:
    """A failure while folding a batch on the worker thread reaches the caller as the same error."""
    wrong_axis = [Activation("act1", "Relu", "op", "conv", "act1", ("act1",), 4, None)]
    with pytest.raises(
        OnnxEasierError, match="activation 'act1': channel axis 4 is out of range for a tensor of rank 4"
    ):
        calibrate(_net(), wrong_axis, _data(9), batch_size=2)


def test_progress_bar_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    model, data = _net(), _data(12)
    shown = calibrate(model, _acts(), data, batch_size=5, progress=True)
    plain = calibrate(model, _acts(), data, batch_size=5)
    for name in plain:
        np.testing.assert_array_equal(shown[name].count_on, plain[name].count_on)
