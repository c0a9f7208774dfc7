from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.data import (
    BATCH_BYTES,
    RUN_BYTES,
    CalibrationData,
    InputSpec,
    activation_bytes,
    choose_batch_size,
    input_specs,
    load_data,
    load_feeds,
    parse_input_shapes,
    training_bytes,
)
from onnx_easier.errors import BadArgumentError, BadDataError, UnsupportedModelError

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(inputs: list[tuple[str, int, list | None]], initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """One Identity per input; inputs are (name, elem_type, shape or None for unknown rank)."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    vis += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in initializers]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(nodes, "m", vis, outs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


IMG = [("x", F32, ["N", 3, 4, 4])]
TWO = [("x", F32, ["N", 3, 4, 4]), ("ids", I64, ["N", 5])]


def _specs(inputs: list) -> list[InputSpec]:
    return input_specs(_model(inputs))


def _img(n: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(dtype)


def _ids(n: int) -> np.ndarray:
    return np.arange(n * 5, dtype=np.int64).reshape(n, 5)


# --- input signature ----------------------------------------------------------------------------------------------


def test_input_specs_skip_initializers_and_read_dims() -> None:
    w = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    m = _model([("x", F32, ["N", 3, None, 4]), ("s", I64, []), ("u", F32, None)], [w])
    specs = input_specs(m)
    assert [s.name for s in specs] == ["x", "s", "u"]
    assert specs[0] == InputSpec("x", np.dtype(np.float32), ("N", 3, None, 4))
    assert specs[1].scalar and specs[1].dtype == np.int64
    assert not specs[2].ranked


def test_input_specs_reject_non_tensor_inputs() -> None:
    seq = helper.make_tensor_sequence_value_info("seq", F32, None)
    out = helper.make_tensor_value_info("y", F32, None)
    graph = helper.make_graph([helper.make_node("SequenceLength", ["seq"], ["y"])], "m", [seq], [out])
    with pytest.raises(UnsupportedModelError, match="'seq' is a sequence_type"):
        input_specs(helper.make_model(graph))


# --- --input-shape ------------------------------------------------------------------------------------------------


def test_parse_input_shapes() -> None:
    assert parse_input_shapes(["x:1,3,224,224", "a:b:7"]) == {"x": (1, 3, 224, 224), "a:b": (7,)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("item", ["x", "x:", ":1,2", "x:1,a", "x:0,3", "x:-1", "x:1,,2", "x 1,2"])
def test_parse_input_shapes_malformed(item: str) -> None:
    with pytest.raises(BadDataError, match="expected NAME:D0,D1,... with positive integers") as err:
        parse_input_shapes([item])
    assert "\n" not in str(err.value)


def test_parse_input_shapes_duplicate() -> None:
    with pytest.raises(BadDataError, match="'x' is given twice"):
        parse_input_shapes(["x:1,2", "x:1,3"])


# --- reading files ------------------------------------------------------------------------------------------------


def test_npz_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x, ids = _img(10), _ids(10)
    np.savez(path, x=x, ids=ids)
    data = load_data(str(path), _specs(TWO))
    assert (data.source, data.samples, data.synthetic) == (str(path), 10, False)
    np.testing.assert_array_equal(data.arrays["x"], x)
    np.testing.assert_array_equal(data.arrays["ids"], ids)


def test_npy_single_input(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, _img(6))
    data = load_data(str(path), _specs(IMG), samples=4)
    assert data.samples == 4
    np.testing.assert_array_equal(data.arrays["x"], _img(6)[:4])


def test_npy_for_multi_input_model(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, _img(6))
    with pytest.raises(BadDataError, match=r"the model has 2 inputs \(x, ids\); give an .npz keyed by input name"):
        load_data(str(path), _specs(TWO))


def test_folder_of_npz_concatenates_in_sorted_order(tmp_path: Path) -> None:
    x = _img(9)
    np.savez(tmp_path / "part_1.npz", x=x[3:7], ids=_ids(9)[3:7])
    np.savez(tmp_path / "part_0.npz", x=x[:3], ids=_ids(9)[:3])
    np.savez(tmp_path / "part_2.npz", x=x[7:], ids=_ids(9)[7:])
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_data(str(tmp_path), _specs(TWO))
    assert data.samples == 9
    np.testing.assert_array_equal(data.arrays["x"], x)
    np.testing.assert_array_equal(data.arrays["ids"], _ids(9))


def test_folder_of_npy_with_sample_cap_reads_only_what_it_needs(tmp_path: Path) -> None:
    x = _img(9)
    np.save(tmp_path / "a.npy", x[:4])
    np.save(tmp_path / "b.npy", x[4:])
    (tmp_path / "c.npy").write_bytes(b"garbage that is never read")
    data = load_data(str(tmp_path), _specs(IMG), samples=3)
    assert data.samples == 3
    np.testing.assert_array_equal(data.arrays["x"], x[:3])
    with pytest.raises(BadDataError, match=r"c\.npy: cannot read it as \.npy"):
        load_data(str(tmp_path), _specs(IMG))


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadDataError, match="holds no .npz or .npy files"):
        load_data(str(tmp_path / "empty"), _specs(IMG))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", _img(2))
    np.savez(mixed / "b.npz", x=_img(2))
    with pytest.raises(BadDataError, match="mixes .npz and .npy files"):
        load_data(str(mixed), _specs(IMG))
    keys = tmp_path / "keys"
    keys.mkdir()
    np.savez(keys / "a.npz", x=_img(2), ids=_ids(2))
    np.savez(keys / "b.npz", x=_img(2))
    with pytest.raises(BadDataError, match=r"b\.npz: holds inputs \['x'\] but a\.npz holds \['ids', 'x'\]"):
        load_data(str(keys), _specs(TWO))
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    np.save(shapes / "a.npy", _img(2))
    np.save(shapes / "b.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(BadDataError, match=r"b\.npy: input 'x' has sample shape \(3, 4, 5\) but a\.npy has"):
        load_data(str(shapes), _specs(IMG))


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="no such file or folder"):
        load_data(str(tmp_path / "nope.npz"), _specs(IMG))
    (tmp_path / "d.csv").write_text("1,2,3")
    with pytest.raises(BadDataError, match="unknown data format '.csv'"):
        load_data(str(tmp_path / "d.csv"), _specs(IMG))


def test_corrupt_files(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=_img(8))
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(BadDataError, match=r"trunc\.npz: cannot read it as \.npz"):
        load_data(str(truncated), _specs(IMG))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(BadDataError, match="not an .npz archive"):
        load_data(str(garbage), _specs(IMG))
    npy = tmp_path / "trunc.npy"
    np.save(npy, _img(8))
    npy.write_bytes(npy.read_bytes()[:200])
    with pytest.raises(BadDataError, match=r"trunc\.npy: cannot read it as \.npy"):
        load_data(str(npy), _specs(IMG))
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BadDataError, match="cannot read it as .npz"):
        load_data(str(pickled), _specs(IMG))


# --- validation ---------------------------------------------------------------------------------------------------


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"no data for input\(s\) 'ids'; the model's inputs are: x, ids"):
        load_data(_npz(tmp_path, x=_img(2)), _specs(TWO))


def test_extra_input(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"data for unknown input\(s\) 'mask'; the model's inputs are: x"):
        load_data(_npz(tmp_path, x=_img(2), mask=_img(2)), _specs(IMG))


def test_wrong_rank_suggests_sample_axis(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"input 'x' has rank 3 .* needs rank 4 .*add the sample axis"):
        load_data(_npz(tmp_path, x=_img(1)[0]), _specs(IMG))
    with pytest.raises(BadDataError, match=r"input 'x' has rank 6 .* rank 4 .* or 5 \(axis 0 = samples, each one whole"):
        load_data(_npz(tmp_path, x=_img(2)[None, None]), _specs(IMG))


def test_fixed_dim_mismatch(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"input 'x' has shape \(2, 3, 4, 5\) .*axis 3 is 5, expected 4"):
        load_data(_npz(tmp_path, x=np.zeros((2, 3, 4, 5), np.float32)), _specs(IMG))


def test_wrong_dtype_kind(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"input 'x' is int64 but the model expects float32; convert it"):
        load_data(_npz(tmp_path, x=np.zeros((2, 3, 4, 4), np.int64)), _specs(IMG))
    with pytest.raises(BadDataError, match=r"input 'ids' is float32 but the model expects int64"):
        load_data(_npz(tmp_path, x=_img(2), ids=_ids(2).astype(np.float32)), _specs(TWO))


def test_same_kind_casts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="onnx_easier.data")
    data = load_data(_npz(tmp_path, x=_img(3, dtype=np.float64), ids=_ids(3).astype(np.int32)), _specs(TWO))
    assert data.arrays["x"].dtype == np.float32 and data.arrays["ids"].dtype == np.int64
    np.testing.assert_array_equal(data.arrays["x"], _img(3))
    assert "casting input 'x' from float64 to float32" in caplog.text


def test_int_out_of_range(tmp_path: Path) -> None:
    specs = [InputSpec("t", np.dtype(np.int8), ("N", 2))]
    with pytest.raises(BadDataError, match="input 't' holds values outside the range of int8"):
        load_data(_npz(tmp_path, t=np.array([[1, 300]], np.int64)), specs)
    assert load_data(_npz(tmp_path, t=np.array([[1, -128]], np.int64)), specs).arrays["t"].dtype == np.int8


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path: Path, bad: float) -> None:
    x = _img(3)
    x[2, 1, 0, 3] = bad
    with pytest.raises(BadDataError, match="input 'x' holds NaN or Inf; clean the data"):
        load_data(_npz(tmp_path, x=x), _specs(IMG))


def test_overflow_on_cast_is_reported(tmp_path: Path) -> None:
    specs = [InputSpec("h", np.dtype(np.float16), ("N", 2))]
    with pytest.raises(BadDataError, match="holds NaN or Inf after casting to float16"):
        load_data(_npz(tmp_path, h=np.array([[1.0, 1e6]], np.float32)), specs)


def test_zero_samples(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="input 'x' has 0 samples; give at least one"):
        load_data(_npz(tmp_path, x=_img(0)), _specs(IMG))


def test_sample_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"different sample counts \(x: 4, ids: 3\)"):
        load_data(_npz(tmp_path, x=_img(4), ids=_ids(3)), _specs(TWO))


def test_symbolic_dims_must_agree(tmp_path: Path) -> None:
    specs = _specs([("a", F32, ["N", "L"]), ("b", F32, ["N", "L"])])
    path = _npz(tmp_path, a=np.zeros((2, 5), np.float32), b=np.zeros((2, 6), np.float32))
    with pytest.raises(BadDataError, match=r"inputs 'a' and 'b' disagree on dimension 'L' \(5 vs 6\)"):
        load_data(path, specs)


def test_samples_cap_and_argument_check(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_img(10))
    assert load_data(path, _specs(IMG), samples=7).samples == 7
    assert load_data(path, _specs(IMG), samples=70).samples == 10
    with pytest.raises(BadArgumentError, match="--samples 0"):
        load_data(path, _specs(IMG), samples=0)


def test_fixed_batch_needs_enough_samples(tmp_path: Path) -> None:
    specs = _specs([("x", F32, [4, 3, 4, 4])])
    with pytest.raises(BadDataError, match="3 sample.* fixes its batch axis to 4; give at least 4 samples"):
        load_data(_npz(tmp_path, x=_img(3)), specs)
    data = load_data(_npz(tmp_path, x=_img(10)), specs)
    assert data.samples == 10 and choose_batch_size(specs, data) == 4


def test_conflicting_fixed_batches(tmp_path: Path) -> None:
    """Samples on axis 0 cannot feed inputs that fix it to different sizes; whole feeds can (random data is then
    made as whole feeds)."""
    specs = _specs([("a", F32, [4, 2]), ("b", F32, [2, 2])])
    with pytest.raises(BadDataError, match=r"inputs fix axis 0 to different sizes \(a: 4, b: 2\)"):
        load_data(_npz(tmp_path, a=np.zeros((8, 2), np.float32), b=np.zeros((8, 2), np.float32)), specs)
    data = load_data(None, specs, samples=3)
    assert data.whole == {"a", "b"} and data.arrays["a"].shape == (3, 4, 2) and data.arrays["b"].shape == (3, 2, 2)


# --- random data --------------------------------------------------------------------------------------------------


def test_random_data(caplog: pytest.LogCaptureFixture) -> None:
    specs = _specs(TWO + [("flag", TensorProto.BOOL, ["N"])])
    with caplog.at_level(logging.WARNING, logger="onnx_easier.data"):
        data = load_data(None, specs)
    assert "entropies of random data do not describe real inputs" in caplog.text
    assert (data.source, data.samples, data.synthetic) == ("random", 64, True)
    assert data.arrays["x"].shape == (64, 3, 4, 4) and data.arrays["x"].dtype == np.float32
    assert abs(float(data.arrays["x"].mean())) < 0.1 and 0.9 < float(data.arrays["x"].std()) < 1.1
    ids = data.arrays["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 10
    assert data.arrays["flag"].dtype == np.bool_ and 0 < data.arrays["flag"].sum() < 64
    again = load_data(None, specs)
    np.testing.assert_array_equal(again.arrays["x"], data.arrays["x"])
    other = load_data(None, specs, seed=1, samples=5)
    assert other.samples == 5 and not np.array_equal(other.arrays["x"], data.arrays["x"][:5])


def test_random_data_fixed_batch_makes_whole_batches() -> None:
    assert load_data(None, _specs([("x", F32, [5, 2])])).samples == 60
    assert load_data(None, _specs([("x", F32, [100, 2])])).samples == 100


def test_random_data_needs_dynamic_dims() -> None:
    specs = _specs([("x", F32, ["N", 3, "H", "W"])])
    with pytest.raises(BadDataError, match=r"input 'x' .* has dynamic axes \[2, 3\]; pass --input-shape x:d0,d1,"):
        load_data(None, specs)
    data = load_data(None, specs, input_shapes={"x": (1, 3, 8, 6)}, samples=3)
    assert data.arrays["x"].shape == (3, 3, 8, 6)
    unranked = _specs([("u", F32, None)])
    with pytest.raises(BadDataError, match="input 'u' has no known rank; pass --input-shape u:d0,d1"):
        load_data(None, unranked)
    assert load_data(None, unranked, input_shapes={"u": (1, 2)}, samples=2).arrays["u"].shape == (2, 2)


def test_input_shapes_checked_against_model(tmp_path: Path) -> None:
    specs = _specs([("x", F32, ["N", 3, "H", "W"])])
    with pytest.raises(BadDataError, match=r"--input-shape names unknown input\(s\) 'y'; the model's inputs are: x"):
        load_data(None, specs, input_shapes={"y": (1, 2)})
    with pytest.raises(BadDataError, match="--input-shape x: gives 3 dims but the model's input has rank 4"):
        load_data(None, specs, input_shapes={"x": (1, 3, 8)})
    with pytest.raises(BadDataError, match="--input-shape x: axis 1 is 4 but the model fixes it to 3"):
        load_data(None, specs, input_shapes={"x": (1, 4, 8, 8)})
    path = _npz(tmp_path, x=np.zeros((2, 3, 8, 7), np.float32))
    with pytest.raises(BadDataError, match="axis 3 is 7, expected 8"):
        load_data(path, specs, input_shapes={"x": (1, 3, 8, 8)})


def test_random_unsupported_dtype() -> None:
    specs = [InputSpec("s", np.dtype(np.str_), ("N",))]
    with pytest.raises(BadDataError, match="cannot make random data of type"):
        load_data(None, specs)


def test_scalar_input() -> None:
    specs = _specs([("x", F32, ["N", 2]), ("t", F32, [])])
    data = load_data(None, specs, samples=3)
    assert data.arrays["t"].shape == (3,) and data.whole == {"x", "t"}  # random data: whole feeds
    assert choose_batch_size(specs, data) == 1
    feeds = list(data.batches(1))
    assert (
        len(feeds) == 3
        and isinstance(feeds[1]["t"], np.ndarray)
        and feeds[1]["t"].shape == ()
        and feeds[1]["x"].shape == (1, 2)
    )
    with pytest.raises(ValueError, match="one sample at a time"):
        next(data.batches(2))


# --- batching -----------------------------------------------------------------------------------------------------


def _conv_relu_reshape(expose: bool) -> onnx.ModelProto:
    """x [N,4,8,8] -> Conv 4->16 (3x3, pad 1; a weight of 576 values) -> Relu -> Reshape [0, -1]; ``expose``: the
    Conv output is a graph output too (as calibration exposes pre-activations)."""
    w = numpy_helper.from_array(np.ones((16, 4, 3, 3), np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", F32, ["N", 1024])]
    if expose:
        outputs.append(helper.make_tensor_value_info("c", F32, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 4, 8, 8])], outputs, [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_activation_bytes_is_the_peak_of_live_tensors() -> None:
    """Tensors are freed after their last reader, graph outputs stay, weights never count; sizes for the given
    (one-sample) shapes: x 1 KiB, c / r / y 4 KiB each."""
    assert activation_bytes(_conv_relu_reshape(False), {"x": (1, 4, 8, 8)}) == 8192  # r + y, or c + r
    assert activation_bytes(_conv_relu_reshape(True), {"x": (1, 4, 8, 8)}) == 12288  # c kept: c + r + y
    assert activation_bytes(_conv_relu_reshape(False), {"x": (2, 4, 8, 8)}) == 16384


def test_training_bytes_counts_every_forward_tensor() -> None:
    """A training step may keep every node output of the forward pass: c, r, y (4 KiB each per sample), not the
    input, not the weights; per the given shape; a tensor inference cannot size counts as nothing."""
    assert training_bytes(_conv_relu_reshape(False), {"x": (1, 4, 8, 8)}) == 3 * 4096
    assert training_bytes(_conv_relu_reshape(False), {"x": (2, 4, 8, 8)}) == 6 * 4096
    broken = _conv_relu_reshape(False)
    broken.graph.node[0].input[1] = "missing"  # a Conv weight that exists nowhere: c and r cannot be sized
    assert training_bytes(broken, {"x": (1, 4, 8, 8)}) == 4096  # y only, from the graph output's declared shape


def test_choose_batch_size_from_the_run_budget() -> None:
    """The batch is capped by the run's tensors (sample_bytes) as well as by the inputs' bytes."""
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 4, 8, 8))]
    data = CalibrationData("mem", 1000, {"x": np.zeros((1000, 4, 8, 8), np.float32)})
    assert choose_batch_size(specs, data) == 256  # MAX_BATCH: the inputs are small
    assert choose_batch_size(specs, data, sample_bytes=RUN_BYTES // 10) == 10
    assert choose_batch_size(specs, data, sample_bytes=RUN_BYTES * 4) == 1


def test_batches_and_subset() -> None:
    x = _img(10)
    data = CalibrationData("mem", 10, {"x": x})
    sizes = [b["x"].shape[0] for b in data.batches(4)]
    assert sizes == [4, 4, 2]
    assert [b["x"].shape[0] for b in data.batches(4, drop_last=True)] == [4, 4]
    parts = list(data.batches(3, start=2, stop=9))
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), x[2:9])
    assert all(np.shares_memory(p["x"], x) for p in parts)
    sub = data.subset(3, 8)
    assert sub.samples == 5 and sub.source == "mem"
    np.testing.assert_array_equal(sub.arrays["x"], x[3:8])
    with pytest.raises(ValueError, match="at least 1"):
        next(data.batches(0))
    with pytest.raises(ValueError, match="does not hold 5 samples"):
        CalibrationData("mem", 5, {"x": x})


def test_choose_batch_size_dynamic() -> None:
    specs = _specs(IMG)  # one sample: 3*4*4 float32 = 192 bytes
    assert choose_batch_size(specs, CalibrationData("m", 1000, {"x": _img(1000)})) == 256
    assert choose_batch_size(specs, CalibrationData("m", 10, {"x": _img(10)})) == 10
    assert choose_batch_size(specs, CalibrationData("m", 1000, {"x": _img(1000)}), max_bytes=192 * 5) == 5
    big = np.zeros((3, 2**20 + 1, 4), np.float32)  # one sample > 16 MB
    specs_big = _specs([("x", F32, ["N", 2**20 + 1, 4])])
    assert choose_batch_size(specs_big, CalibrationData("m", 3, {"x": big})) == 1
    mid = np.zeros((300, 1000), np.float32)  # 4000 bytes per sample
    assert choose_batch_size(_specs([("x", F32, ["N", 1000])]), CalibrationData("m", 300, {"x": mid})) == min(
        256, BATCH_BYTES // 4000
    )


# --- Paddle's -1 dims, unnamed dims, whole feeds, feed dicts and readers (issue 12) -----------------------------


def _paddle_model() -> onnx.ModelProto:
    """A Paddle-style input ``x: [-1, 3, ?, ?]`` (dim_value -1, then two dims with neither a value nor a name) into
    a Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm classifier whose output is declared ``[-1, 5]``."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", F32, [-1, 3, None, None])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(5, np.float32), "bf")]
    g = helper.make_graph(nodes, "paddle", [x], [helper.make_tensor_value_info("y", F32, [-1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])


PADDLE_MACS = 4 * 3 * 9 * 48 * 192 + 4 * 5  # Conv over 48x192 (pads keep the size), Gemm 4 -> 5


def test_negative_and_placeholder_dims_are_dynamic_and_unnamed() -> None:
    (spec,) = input_specs(_paddle_model())
    assert spec.shape == (None, 3, None, None)
    specs = _specs([("a", F32, [-1, "?", "-1", "N", 0])])
    assert specs[0].shape == (None, None, None, "N", 0)  # 0 is a size (an empty axis), not a dynamic dim


def test_paddle_random_data_needs_only_its_unnamed_dims(tmp_path: Path) -> None:
    """The -1 batch is dynamic: ``--input-shape x:1,3,48,192`` is taken and without it only the two unnamed
    spatial axes are asked for; the run goes through, with the MACs of one 48x192 sample."""
    from onnx_easier.cli import main

    specs = input_specs(_paddle_model())
    with pytest.raises(BadDataError, match=r"input 'x' \[\?,3,\?,\?\] has dynamic axes \[2, 3\]; pass --input-shape"):
        load_data(None, specs)
    data = load_data(None, specs, samples=4, input_shapes={"x": (1, 3, 48, 192)})
    assert data.arrays["x"].shape == (4, 3, 48, 192) and not data.whole
    model, out, rep = tmp_path / "paddle.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_paddle_model(), model)
    argv = [str(model), str(out), "--input-shape", "x:1,3,48,192", "--samples", "8", "--tolerance", "0", "-q"]
    assert main([*argv, "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["before"]["macs"] == report["after"]["macs"] == PADDLE_MACS


def test_paddle_input_shape_and_data(tmp_path: Path) -> None:
    """Data [N,3,48,192] is taken (the two unnamed dims need not agree); the model runs through the whole tool in
    both modes, its MACs counted for one sample."""
    from onnx_easier.api import optimize

    specs = input_specs(_paddle_model())
    path = _npz(tmp_path, x=np.random.default_rng(1).standard_normal((24, 3, 48, 192)).astype(np.float32))
    assert load_data(path, specs).samples == 24
    model = tmp_path / "paddle.onnx"
    onnx.save(_paddle_model(), model)
    for tolerance in (0.0, 0.01):
        result = optimize(model, path, tolerance=tolerance)
        assert result.report["before"]["macs"] == PADDLE_MACS and result.report["after"]["macs"] > 0
        assert result.write(tmp_path / f"out{tolerance}.onnx")["ok"]


def test_unnamed_dims_are_independent_named_ones_tie(tmp_path: Path) -> None:
    specs = _specs([("a", F32, [-1, "?", None]), ("b", F32, ["N", "L", "L"])])
    path = _npz(tmp_path, a=np.zeros((2, 5, 7), np.float32), b=np.zeros((2, 6, 6), np.float32))
    assert load_data(path, specs).samples == 2
    path = _npz(tmp_path, a=np.zeros((2, 5, 7), np.float32), b=np.zeros((2, 6, 5), np.float32))
    with pytest.raises(BadDataError, match=r"inputs 'b' and 'b' disagree on dimension 'L' \(6 vs 5\)"):
        load_data(path, specs)


def _recurrent_model() -> onnx.ModelProto:
    """A voice-activity-style model: ``input [?, ?]`` (batch, samples), ``state [2, ?, 4]`` (its batch on axis 1)
    and a scalar int64 ``sr``. ``h = Relu(input @ W)``, ``out = h @ V * sr``, ``state_out = state + h``."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["input", "W"], ["m"]), helper.make_node("Relu", ["m"], ["h"]),
             helper.make_node("MatMul", ["h", "V"], ["o"]), helper.make_node("Cast", ["sr"], ["srf"], to=F32),
             helper.make_node("Mul", ["o", "srf"], ["out"]), helper.make_node("Add", ["state", "h"], ["state_out"])]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "V")]
    g = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("input", F32, ["?", "?"]),
                                         helper.make_tensor_value_info("state", F32, [2, "?", 4]),
                                         helper.make_tensor_value_info("sr", I64, [])],
                          [helper.make_tensor_value_info("out", F32, ["?", 2]),
                           helper.make_tensor_value_info("state_out", F32, [2, "?", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


RECURRENT_MACS = 8 * 4 + 4 * 2  # one feed: input [1, 8] @ W [8, 4], h [1, 4] @ V [4, 2]


def _recurrent_feeds(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"input": rng.standard_normal((n, 1, 8)).astype(np.float32),
            "state": rng.standard_normal((n, 2, 1, 4)).astype(np.float32),
            "sr": np.full(n, 16000, np.int64)}


def _feed_list(n: int) -> list[dict[str, np.ndarray]]:
    arrays = _recurrent_feeds(n)
    return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def test_whole_feeds_for_a_state_input(tmp_path: Path) -> None:
    """One more axis than the model input: each arr[i] is one feed, fed as it is (state's batch is axis 1, the
    model's axis 0 is fixed to 2 there: no samples-on-axis-0 layout can feed it). The CLI runs both modes on an
    .npz of whole feeds; the MACs are those of one feed (state's fixed 2 is no batch to divide by)."""
    from onnx_easier.cli import main

    specs = input_specs(_recurrent_model())
    data = load_data(_npz(tmp_path, **_recurrent_feeds(40)), specs)
    assert data.whole == {"input", "state", "sr"} and data.feedwise
    feed = next(data.batches(1))
    assert feed["state"].shape == (2, 1, 4) and feed["input"].shape == (1, 8) and feed["sr"].shape == ()
    assert data.feed_shapes() == {"input": (1, 8), "state": (2, 1, 4), "sr": ()}
    with pytest.raises(ValueError, match="whole feeds"):
        next(data.batches(2))
    model = tmp_path / "vad.onnx"
    onnx.save(_recurrent_model(), model)
    npz = _npz(tmp_path, **_recurrent_feeds(40))
    for extra in (["--tolerance", "0"], []):
        out, rep = tmp_path / f"out{len(extra)}.onnx", tmp_path / f"r{len(extra)}.json"
        assert main([str(model), str(out), "--data", npz, "--report", str(rep), "-q", *extra]) == 0
        assert [i.name for i in onnx.load(out).graph.input] == ["input", "state", "sr"]
        assert json.loads(rep.read_text())["before"]["macs"] == RECURRENT_MACS


def test_whole_feed_shape_is_checked_on_every_model_axis(tmp_path: Path) -> None:
    feeds = _recurrent_feeds(4)
    feeds["state"] = np.zeros((4, 3, 1, 4), np.float32)  # the model fixes axis 0 of state to 2
    with pytest.raises(BadDataError, match=r"input 'state' .*one whole feed\): model axis 0 is 3, expected 2"):
        load_data(_npz(tmp_path, **feeds), input_specs(_recurrent_model()))


def test_samples_on_axis_0_beside_whole_feeds_are_fed_one_at_a_time(tmp_path: Path) -> None:
    """Whole feeds run one sample per ORT run, so an input given as samples on axis 0 is fed with axis 0 = 1: a
    model that fixes it to 2 is told at once (not by ORT mid-calibration), and a named dim must agree at 1."""
    feeds = _recurrent_feeds(4)
    feeds["state"] = feeds["state"][:, 0]  # [S, 1, 4]: samples on axis 0, which the model fixes to 2
    with pytest.raises(BadDataError, match=r"input 'state' holds samples on the model's axis 0, which the model "
                                           r"fixes to 2 \[2,\?,4\], but 'input' holds whole feeds.*\[S,2,\?,4\]"):
        load_data(_npz(tmp_path, **feeds), input_specs(_recurrent_model()))
    specs = _specs([("x", F32, ["N", 8]), ("state", F32, [2, "N", 4])])
    path = _npz(tmp_path, x=np.zeros((4, 8), np.float32), state=np.zeros((4, 2, 3, 4), np.float32))
    with pytest.raises(BadDataError, match=r"disagree on dimension 'N' \(1 vs 3 in one ORT run"):
        load_data(path, specs)
    path = _npz(tmp_path, x=np.zeros((4, 8), np.float32), state=np.zeros((4, 2, 1, 4), np.float32))
    assert load_data(path, specs).whole == {"state"}


def test_random_data_for_state_inputs_is_whole_feeds() -> None:
    """A model that samples on axis 0 cannot feed (a scalar input, a state [2, ?, 4]) gets random whole feeds of
    the full input shapes; the unnamed batch of ``input`` defaults to 1, ``state``'s axis 1 is asked for."""
    from onnx_easier.api import optimize

    specs = input_specs(_recurrent_model())
    with pytest.raises(BadDataError, match=r"input 'state' \[2,\?,4\] has dynamic axes \[1\]; pass --input-shape "
                                           r"state:d0,d1,\.\.\. \(its whole shape"):
        load_data(None, specs, input_shapes={"input": (1, 8)})
    shapes = {"input": (1, 8), "state": (2, 1, 4)}
    data = load_data(None, specs, samples=5, input_shapes=shapes)
    assert data.whole == {"input", "state", "sr"}
    assert {k: v.shape for k, v in data.arrays.items()} == {"input": (5, 1, 8), "state": (5, 2, 1, 4), "sr": (5,)}
    result = optimize(_recurrent_model(), None, input_shapes=shapes, samples=16)
    assert result.report["data"]["synthetic"] and result.report["before"]["macs"] == RECURRENT_MACS


def _gru_model() -> onnx.ModelProto:
    """An ONNX GRU (layout 0): ``x [5, N, 3]`` (time, batch, features) and ``h0 [1, N, 4]``, both with the batch on
    axis 1; ``y = Relu(Y_h[0]) @ W``."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("GRU", ["x", "gw", "gr", "gb", "", "h0"], ["", "yh"], hidden_size=4),
             helper.make_node("Squeeze", ["yh", "axes"], ["hs"]), helper.make_node("Relu", ["hs"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["y"])]
    inits = [numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), name)
             for name, shape in (("gw", (1, 12, 3)), ("gr", (1, 12, 4)), ("gb", (1, 24)), ("W", (4, 2)))]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    g = helper.make_graph(nodes, "gru", [helper.make_tensor_value_info("x", F32, [5, "N", 3]),
                                         helper.make_tensor_value_info("h0", F32, [1, "N", 4])],
                          [helper.make_tensor_value_info("y", F32, ["N", 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_gru_state_input_end_to_end(tmp_path: Path) -> None:
    """A GRU's input and state: whole feeds from an .npz through the CLI (both modes), and random whole feeds
    where ``--input-shape x:5,1,3`` sizes the named batch ``N`` of ``h0`` too."""
    from onnx_easier.cli import main

    rng = np.random.default_rng(5)
    npz = _npz(tmp_path, x=rng.standard_normal((32, 5, 1, 3)).astype(np.float32),
               h0=(0.3 * rng.standard_normal((32, 1, 1, 4))).astype(np.float32))
    model = tmp_path / "gru.onnx"
    onnx.save(_gru_model(), model)
    for extra in (["--tolerance", "0"], [], ["--input-shape", "x:5,1,3", "--samples", "16"]):
        out = tmp_path / f"out{len(extra)}.onnx"
        data = [] if "--input-shape" in extra else ["--data", npz]
        assert main([str(model), str(out), *data, "-q", *extra]) == 0
        assert [i.name for i in onnx.load(out).graph.input] == ["x", "h0"]
    data = load_data(None, input_specs(_gru_model()), samples=3, input_shapes={"x": (5, 1, 3)})
    assert data.arrays["h0"].shape == (3, 1, 1, 4) and data.whole == {"x", "h0"}


def test_feed_dicts_and_calibration_data_reader(tmp_path: Path) -> None:
    """The Python API takes an iterable of feed dicts and ORT quantization's CalibrationDataReader, in both modes."""
    from onnxruntime.quantization import CalibrationDataReader

    from onnx_easier.api import analyze, optimize

    feeds = _feed_list(24)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    specs = input_specs(_recurrent_model())
    data = load_feeds(Reader(), specs, samples=10)
    assert data.samples == 10 and data.arrays["state"].shape == (10, 2, 1, 4) and data.source == "<10 feeds>"
    np.testing.assert_array_equal(data.arrays["input"][3], feeds[3]["input"])
    model = tmp_path / "vad.onnx"
    onnx.save(_recurrent_model(), model)
    result = optimize(model, Reader(), tolerance=0)
    assert result.report["data"]["samples"] == 24 and result.report["before"]["macs"] == RECURRENT_MACS
    assert result.write(tmp_path / "o.onnx")["ok"]
    assert optimize(model, Reader()).write(tmp_path / "o2.onnx")["ok"]
    assert optimize(model, iter(feeds), tolerance=0).report["data"]["samples"] == 24
    assert analyze(model, (f for f in feeds), samples=5).data.samples == 5


def test_feeds_are_copied_as_they_arrive() -> None:
    """A reader that refills one buffer per feed (common in calibration code) still gives distinct samples."""
    buffer = {"input": np.zeros((1, 8), np.float32), "state": np.zeros((2, 1, 4), np.float32),
              "sr": np.array(16000, np.int64)}

    def refilled() -> Iterator[dict[str, np.ndarray]]:
        for i in range(4):
            buffer["input"][...] = i
            yield buffer

    data = load_feeds(refilled(), input_specs(_recurrent_model()))
    assert data.arrays["input"][:, 0, 0].tolist() == [0, 1, 2, 3]


def test_feeds_checked_against_the_model_in_feed_terms() -> None:
    """Messages name the input, one feed's shape and the model's; the first feed is checked before the rest is
    read."""
    specs = input_specs(_recurrent_model())
    good = _feed_list(3)

    def first_bad() -> Iterator[dict[str, np.ndarray]]:
        yield {**good[0], "state": np.zeros((3, 1, 4), np.float32)}
        raise AssertionError("read past a bad first feed")

    with pytest.raises(BadDataError, match=r"^feed 0: input 'state': a feed of shape \(3, 1, 4\) but the model "
                                           r"expects \[2,\?,4\]: axis 0 is 3, expected 2$"):
        load_feeds(first_bad(), specs)
    with pytest.raises(BadDataError, match=r"^feed 0: input 'input': a feed of shape \(8,\) \(rank 1\) but the "
                                           r"model's input is \[\?,\?\] \(rank 2\)$"):
        load_feeds([{**good[0], "input": np.zeros(8, np.float32)}], specs)
    with pytest.raises(BadDataError, match=r"feed 0: no data for input\(s\) 'sr'.*every feed must hold every input"):
        load_feeds([{"input": good[0]["input"], "state": good[0]["state"]}], specs)
    with pytest.raises(BadDataError, match="feed 2 has no input 'sr'; every feed must hold the inputs of feed 0"):
        load_feeds([*good[:2], {"input": good[0]["input"], "state": good[0]["state"]}], specs)
    with pytest.raises(BadDataError, match="feed 1 gives input 'sr' as int32, feed 0 as int64"):
        load_feeds([good[0], {**good[1], "sr": np.int32(8000)}], specs)
    with pytest.raises(BadDataError, match=r"feed 1 gives input 'input' the shape \(2, 8\), feed 0 \(1, 8\); every "
                                           "feed must have the shapes of feed 0"):
        load_feeds([good[0], {**good[1], "input": np.zeros((2, 8), np.float32)}, good[2]], specs)
    with pytest.raises(BadDataError, match="the calibration feeds are empty"):
        load_feeds([], specs)
    with pytest.raises(BadDataError, match="feed 1 is a list"):
        load_feeds([good[0], [1, 2]], specs)
    with pytest.raises(BadDataError, match="calibration data of type int"):
        load_feeds(3, specs)


def test_shorter_last_feed_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """A batching reader's last batch is often shorter: it is left out with a warning, the rest is used."""
    specs = _specs([("x", F32, ["N", 3, 4, 4])])
    batches = [{"x": _img(8, seed=i)} for i in range(3)] + [{"x": _img(5)}]
    with caplog.at_level(logging.WARNING, logger="onnx_easier.data"):
        data = load_feeds(batches, specs)
    assert data.samples == 3 and data.whole == {"x"} and data.arrays["x"].shape == (3, 8, 3, 4, 4)
    assert "feed 3 gives input 'x' the shape (5, 3, 4, 4), feed 0 (8, 3, 4, 4): left out" in caplog.text


def test_dict_of_arrays_is_read_like_an_npz(tmp_path: Path) -> None:
    """``data={name: array}`` in the Python API: samples on axis 0, either layout per input, as an .npz."""
    from onnx_easier.api import analyze

    specs = _specs(TWO)
    data = load_feeds({"x": _img(6), "ids": _ids(6)}, specs, samples=4)
    assert data.samples == 4 and not data.whole and data.source == "<arrays>"
    model = tmp_path / "vad.onnx"
    onnx.save(_recurrent_model(), model)
    assert analyze(model, _recurrent_feeds(6)).data.whole == {"input", "state", "sr"}
