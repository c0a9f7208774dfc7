"""tensor_cache.py: checkpoints of a run kept by digest; later runs of other models start from them."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.data import CalibrationData
from onnx_easier.tensor_cache import CachedRun, TensorCache, checkpoints


def residual_chain(blocks: int = 4, changed: int | None = None) -> onnx.ModelProto:
    """x[N,6] -> blocks of h = h + Relu(h @ W_i) -> y; block ``changed`` gets another weight."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        w = rng.standard_normal((6, 6)).astype(np.float32) * 0.3
        if i == changed:
            w = w * 2.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == blocks - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Add", [h, f"r{i}"], [out], name=f"add{i}")]
        h = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def plain(model: onnx.ModelProto, outputs: list[str], data: CalibrationData) -> np.ndarray:
    from onnx_easier.calibrate import upstream

    sess = ort.InferenceSession(upstream(model, outputs).SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(outputs, feed)[0] for feed in data.batches(7)])


def data(n: int = 40) -> CalibrationData:
    return CalibrationData("mem", n, {"x": np.random.default_rng(1).standard_normal((n, 6)).astype(np.float32)})


def test_checkpoints_are_the_block_boundaries_of_a_residual_chain() -> None:
    assert checkpoints(residual_chain(), ["y"], count=10) == ["h0", "h1", "h2"]
    assert checkpoints(residual_chain(), ["y"], count=1) == ["h2"]


def test_a_later_model_starts_from_the_tensors_an_earlier_one_kept() -> None:
    """The original fills the cache with its block boundaries; a model changed in block 3 runs from h2 (same
    digest in both): its outputs equal a plain run's, and every batch ran on the cut model."""
    d, cache = data(), TensorCache()
    first = CachedRun(residual_chain(), ["y"], cache)
    np.testing.assert_allclose(np.concatenate([b["y"] for b in first.batches(d, 8)]),
                               plain(residual_chain(), ["y"], d), rtol=1e-6)
    assert cache.fed_runs == 0 and cache.filled(first.digests["h2"], d) == 40
    changed = residual_chain(changed=3)
    second = CachedRun(changed, ["y"], cache)
    got = np.concatenate([b["y"] for b in second.batches(d, 16)])  # another batch size
    np.testing.assert_allclose(got, plain(changed, ["y"], d), rtol=1e-6)
    assert cache.fed_runs == 3
    early = CachedRun(residual_chain(changed=0), ["y"], cache)  # changed before every kept tensor: from x
    runs = cache.fed_runs
    np.testing.assert_allclose(np.concatenate([b["y"] for b in early.batches(d, 8)]),
                               plain(residual_chain(changed=0), ["y"], d), rtol=1e-6)
    assert cache.fed_runs == runs


def test_a_prefix_kept_by_a_run_that_stopped_early_is_not_fed_but_extended() -> None:
    """A run that stopped after 16 of 40 samples leaves a prefix: the next run does not start from it (one
    session per run) but computes the tensor and completes it, so the run after that starts from it."""
    d, cache = data(), TensorCache()
    first = CachedRun(residual_chain(), ["y"], cache)
    for i, _ in enumerate(first.batches(d, 8)):
        if i == 1:
            break  # 16 samples kept
    assert cache.filled(first.digests["h2"], d) == 16
    changed = residual_chain(changed=3)
    got = np.concatenate([b["y"] for b in CachedRun(changed, ["y"], cache).batches(d, 8)])
    np.testing.assert_allclose(got, plain(changed, ["y"], d), rtol=1e-6)
    assert cache.fed_runs == 0 and cache.filled(first.digests["h2"], d) == 40
    list(CachedRun(changed, ["y"], cache).batches(d, 8))
    assert cache.fed_runs == 5


def test_a_kept_tensor_asked_for_directly_is_served_without_a_run() -> None:
    d, cache = data(), TensorCache()
    list(CachedRun(residual_chain(), ["y"], cache).batches(d, 8))
    run = CachedRun(residual_chain(changed=3), ["h1"], cache)
    got = np.concatenate([b["h1"] for b in run.batches(d, 8)])
    np.testing.assert_allclose(got, plain(residual_chain(), ["h1"], d), rtol=1e-6)


def test_only_batch_major_float_tensors_are_kept_and_the_budget_holds() -> None:
    cache = TensorCache(max_bytes=1000)
    d = data(8)
    d40 = data(40)
    cache.offer(b"big", d40, 0, np.zeros((8, 4), np.float32), 8)  # 40 samples would take 640 > 500 bytes
    assert cache.filled(b"big", d40) == 0
    cache.offer(b"big", d, 0, np.zeros((8, 4), np.float32), 8)  # 8 samples: 128 bytes
    assert cache.filled(b"big", d) == 8
    cache.offer(b"t", d, 0, np.zeros((8, 10), np.float32), 8)  # [8, 10]: kept
    assert cache.filled(b"t", d) == 8
    cache.offer(b"t", d, 16, np.zeros((8, 10), np.float32), 8)  # not the next samples: ignored
    assert cache.filled(b"t", d) == 8
    cache.offer(b"s", d, 0, np.zeros((8, 8), np.float32), 8)  # 8 also in another axis: never kept
    cache.offer(b"s", d, 0, np.zeros((4, 3), np.float32), 4)
    assert cache.filled(b"s", d) == 0
    cache.offer(b"i", d, 0, np.zeros((8, 4), np.int64), 8)  # integers: never
    assert cache.filled(b"i", d) == 0
    cache.offer(b"tnc", d, 0, np.zeros((5, 8, 4), np.float32), 8)  # tokens first ([T, N, C]): never
    assert cache.filled(b"tnc", d) == 0
    cache.offer(b"u", d, 0, np.zeros((8, 20), np.float32), 8)  # 640 bytes > half the budget: refused
    assert cache.filled(b"u", d) == 0
    cache.offer(b"v", d, 0, np.zeros((8, 12), np.float32), 8)  # 384 bytes: both fit
    assert cache.filled(b"v", d) == 8 and cache.filled(b"t", d) == 8
    cache.offer(b"w", d, 0, np.zeros((8, 15), np.float32), 8)  # 480 more: the oldest (t) goes
    assert cache.filled(b"w", d) == 8 and cache.filled(b"t", d) == 0


def test_calibration_from_kept_tensors_equals_a_plain_one() -> None:
    """The statistics of the activations of block 3 in a model changed there: from h2 kept by the original's run,
    the same as a plain calibration (ORT's values are the same up to rounding)."""
    from onnx_easier.activations import find_activations
    from onnx_easier.calibrate import calibrate
    from onnx_easier.model_io import to_graph
    from onnx_easier.shapes import infer_shapes

    d, cache = data(), TensorCache()
    list(CachedRun(residual_chain(), ["y"], cache).batches(d, 8))
    changed = residual_chain(changed=3)
    acts = find_activations(to_graph(infer_shapes(changed)))
    last = [a for a in acts if a.name == "relu3"]
    with_cache = calibrate(changed, last, d, moments=True, cache=cache)
    assert cache.fed_runs > 0
    plain_stats = calibrate(changed, last, d, moments=True)
    np.testing.assert_array_equal(with_cache["relu3"].count_on, plain_stats["relu3"].count_on)
    np.testing.assert_allclose(with_cache["relu3"].affine_fit(), plain_stats["relu3"].affine_fit(), rtol=1e-9)


def test_a_run_for_several_outputs_also_keeps_the_last_checkpoint_before_each() -> None:
    """Outputs h1 and y: spread over all (h0, h1: the returned h1 alone is live after block 1; one kept: h1), plus
    the last one upstream of h1 (h0: where a later run that needs h1 of a model changed in block 1 starts) and of y
    (h2)."""
    assert checkpoints(residual_chain(), ["h1", "y"], count=1) == ["h1", "h0", "h2"]


def test_checkpoints_too_big_to_keep_are_not_fetched_again() -> None:
    """A cache whose budget cannot hold a checkpoint over the data set refuses it after the first batch; later
    runs (another model with the same tensor names, as after a fusion) no longer ask ORT for it, and still
    compute the right outputs."""
    d = data()
    cache = TensorCache(max_bytes=2 * 40 * 6 * 4 - 8)  # half the budget is just under one tensor over 40 samples
    first = CachedRun(residual_chain(), ["y"], cache)
    assert first.keep == ["h0", "h1", "h2"]
    list(first.batches(d, 8))
    assert cache.sample_bytes == {"h0": 24, "h1": 24, "h2": 24} and cache.too_big("h1", d)
    assert not cache.too_big("h1", data(20))  # another data set, half the samples: it would fit
    changed = residual_chain(changed=3)
    second = CachedRun(changed, ["y"], cache)
    got = np.concatenate([b["y"] for b in second.batches(d, 8)])
    assert second.keep == [] and cache.fed_runs == 0
    np.testing.assert_allclose(got, plain(changed, ["y"], d), rtol=1e-6)
