"""latency.py: interleaved timing on tiny MatMul chains; identical models tie, 10x the work is slower; errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.errors import BadArgumentError, BadDataError
from onnx_easier.latency import LatencyStats, measure_latency, ratio

WIDTH = 192


def _chain(layers: int, seed: int = 0) -> onnx.ModelProto:
    """x[32, WIDTH] -> layers x (MatMul WIDTHxWIDTH -> Relu) -> y: work grows linearly with ``layers``."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(32, WIDTH)).astype(np.float32)}


def test_identical_models_tie() -> None:
    m = _chain(2)
    stats = measure_latency({"before": m, "after": m.SerializeToString()}, _feeds(), budget_s=0.4)
    assert set(stats) == {"before", "after"}
    r = ratio(stats["after"], stats["before"])
    assert 0.5 < r < 2.0, stats
    for s in stats.values():
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms
        assert s.rounds >= 5 and s.block >= 1 and s.provider == "cpu" and s.threads == 1


def test_ten_times_the_work_is_slower() -> None:
    stats = measure_latency({"small": _chain(1), "big": _chain(10, seed=2)}, _feeds(), budget_s=0.5)
    assert ratio(stats["big"], stats["small"]) > 3.0, stats
    # blocks are sized to take about the same time, so the cheap model runs more per block
    assert stats["small"].block > stats["big"].block


def test_explicit_rounds_and_repeats_are_honoured() -> None:
    stats = measure_latency({"m": _chain(1)}, {**_feeds(), "unused": np.zeros(1)}, warmup=0, repeats=3, rounds=4)
    s = stats["m"]
    assert (s.rounds, s.block, s.runs) == (4, 3, 12)
    assert s.as_report()["rounds"] == 4 and s.as_report()["median_ms"] == s.median_ms


def test_missing_input_is_bad_data() -> None:
    with pytest.raises(BadDataError, match="'x'"):
        measure_latency({"m": _chain(1)}, {"z": np.zeros((1, WIDTH), np.float32)}, rounds=1, repeats=1)


def test_bad_arguments() -> None:
    with pytest.raises(BadArgumentError, match="provider"):
        measure_latency({"m": _chain(1)}, _feeds(), provider="tpu")
    with pytest.raises(BadArgumentError, match="threads"):
        measure_latency({"m": _chain(1)}, _feeds(), threads=-1)
    with pytest.raises(BadArgumentError, match="rounds"):
        measure_latency({"m": _chain(1)}, _feeds(), rounds=0)
    assert measure_latency({}, _feeds()) == {}


def test_ratio() -> None:
    a = LatencyStats(2.0, 1.5, 2.5, 5, 1, "cpu", 1)
    b = LatencyStats(4.0, 3.0, 5.0, 5, 1, "cpu", 1)
    assert ratio(a, b) == 0.5 and ratio(b, a) == 2.0


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is available")
def test_cuda_unavailable_is_a_bad_argument() -> None:
    with pytest.raises(BadArgumentError, match="CUDAExecutionProvider") as info:
        measure_latency({"m": _chain(1)}, _feeds(), provider="cuda")
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_listed_but_not_starting_is_a_bad_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    # ORT falls back to CPU (with a warning only) when the CUDA provider cannot load: that must not pass as CUDA
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"])
    with pytest.raises(BadArgumentError, match="could not start"):
        measure_latency({"m": _chain(1)}, _feeds(), provider="cuda")


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(), reason="no CUDA")
def test_cuda_ten_times_the_work_is_slower() -> None:
    stats = measure_latency({"small": _chain(1), "big": _chain(10, seed=2)}, _feeds(), provider="cuda",
                            budget_s=0.5)
    assert stats["big"].provider == "cuda"
    assert ratio(stats["big"], stats["small"]) > 1.5, stats
