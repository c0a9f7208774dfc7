"""Work the search shares between states: statistics kept where an accepted candidate changed nothing upstream."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.activations import find_activations
from onnx_easier.calibrate import calibrate
from onnx_easier.data import CalibrationData
from onnx_easier.model_io import to_graph
from onnx_easier.select import stats_keys
from onnx_easier.shapes import infer_shapes


def chain(scale2: float = 1.0) -> onnx.ModelProto:
    """x[N,8] -> (MatMul -> Relu) x 3 -> y; ``scale2`` multiplies the second layer's weight (a re-fit stand-in)."""
    rng = np.random.default_rng(0)
    nodes, inits, t = [], [], "x"
    for i in range(3):
        w = rng.standard_normal((8, 8)).astype(np.float32) * (scale2 if i == 1 else 1.0)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [t, f"w{i}"], [f"h{i}"], name=f"m{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}" if i < 2 else "y"], name=f"r{i}")]
        t = f"a{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def samples(seed: int) -> tuple[CalibrationData, CalibrationData]:
    """96 fit and 32 check samples for ``chain``."""
    rng = np.random.default_rng(seed)
    return (CalibrationData("mem", 96, {"x": rng.standard_normal((96, 8)).astype(np.float32)}),
            CalibrationData("mem", 32, {"x": rng.standard_normal((32, 8)).astype(np.float32)}))


def last_scaled() -> onnx.ModelProto:
    """``chain(1.0)`` with the last layer's weight times 1.5."""
    current = chain(1.0)
    w2 = numpy_helper.to_array(current.graph.initializer[2])
    current.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2 * 1.5, "w2"))
    return current


def test_statistics_keys_change_only_downstream_of_a_change() -> None:
    before, after = chain(1.0), chain(2.0)
    acts = find_activations(to_graph(infer_shapes(before)))
    old, new = stats_keys(before, acts), stats_keys(after, acts)
    assert old == stats_keys(chain(1.0), acts)
    assert [a.name for a in acts if old[a.name] != new[a.name]] == ["r1", "r2"]
    rewired = chain(1.0)  # a node removed upstream (r0 bypassed): everything after it is stale, r0 has no key
    rewired.graph.node[2].input[0] = "h0"
    del rewired.graph.node[1]
    keys = stats_keys(rewired, acts)
    assert keys["r0"] is None and keys["r1"] != old["r1"] and keys["r2"] != old["r2"]


def test_kept_statistics_equal_a_fresh_calibration() -> None:
    before, after = chain(1.0), chain(2.0)
    acts = find_activations(to_graph(infer_shapes(before)))
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    data = CalibrationData("mem", 64, {"x": x})
    old = calibrate(before, acts, data, moments=True)
    new = calibrate(after, acts, data, moments=True)
    k_old, k_new = stats_keys(before, acts), stats_keys(after, acts)
    kept = [a.name for a in acts if k_old[a.name] == k_new[a.name]]
    assert kept == ["r0"]
    for name in kept:
        np.testing.assert_array_equal(old[name].count_on, new[name].count_on)
        np.testing.assert_allclose(old[name].affine_fit(), new[name].affine_fit(), rtol=1e-12)


def test_a_head_with_too_few_samples_for_its_unknowns_is_not_refitted() -> None:
    """A dense layer with one row per sample is re-fitted only from one row per unknown (9 here: 8 weights +
    bias): 6 samples skip it with a note (no pass of the model upstream), 64 re-fit it."""
    from onnx_easier.reconstruct import refit_layers

    rng = np.random.default_rng(2)
    check = CalibrationData("mem", 16, {"x": rng.standard_normal((16, 8)).astype(np.float32)})
    few = CalibrationData("mem", 6, {"x": rng.standard_normal((6, 8)).astype(np.float32)})
    _, records = refit_layers(chain(2.0), chain(1.0), ["m2"], few, check)
    assert len(records) == 1 and "skipped: 6 fit samples for 9 unknowns" in records[0].note
    enough = CalibrationData("mem", 64, {"x": rng.standard_normal((64, 8)).astype(np.float32)})
    _, records = refit_layers(chain(2.0), chain(1.0), ["m2"], enough, check)
    assert len(records) == 1 and records[0].accepted and records[0].error_after < records[0].error_before


def test_refit_reads_both_models_from_one_joint_session_when_they_share_the_prefix(monkeypatch) -> None:
    """Re-fitting the last layer of a model changed only there: its input and the original's target come from one
    session (joint.py), the Targets cache computes nothing and is filled for the next reader, and the fitted
    weights equal those of two separate sessions."""
    import onnx_easier.reconstruct as rc

    fit, check = samples(3)
    current = last_scaled()
    targets = rc.Targets(chain(1.0))
    joint_model, joint_records = rc.refit_layers(current, targets, ["m2"], fit, check)
    assert targets.computed == 0 and targets.complete("h2", fit, rc.BATCH) and targets.complete("h2", check, rc.BATCH)
    monkeypatch.setattr(rc, "MIN_SHARED", 2.0)  # never joint: two sessions
    separate = rc.Targets(chain(1.0))
    plain_model, plain_records = rc.refit_layers(current, separate, ["m2"], fit, check)
    assert separate.computed > 0
    assert joint_records[0].accepted and plain_records[0].accepted
    weights = [numpy_helper.to_array(t) for t in joint_model.graph.initializer]
    for a, b in zip(weights, [numpy_helper.to_array(t) for t in plain_model.graph.initializer]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_layers_refitted_together_equal_one_by_one_with_a_pass_per_kept_fit(monkeypatch) -> None:
    """Three layers re-fitted in one call read their sums in one pass of one session; the kept fit of m1 (scaled
    by 2 in the current model) changes what m2 reads, so m2 is read again: 2 passes, where one call per layer
    takes 3. Weights and records equal those of the one-by-one calls (each seeing the fits before it)."""
    import onnx_easier.reconstruct as rc

    fit, check = samples(4)
    passes = []
    init = rc._Pass.__init__

    def counted(self, model, targets, sites, data, batch):
        passes.append([s.node.name for s in sites])
        init(self, model, targets, sites, data, batch)

    monkeypatch.setattr(rc._Pass, "__init__", counted)
    together, records = rc.refit_layers(chain(2.0), chain(1.0), ["m0", "m1", "m2"], fit, check)
    assert passes == [["m0", "m1", "m2"], ["m2"]]
    assert [r.node for r in records] == ["m0", "m1", "m2"]
    assert [r.accepted for r in records] == [False, True, False]
    passes.clear()
    alone, alone_records = chain(2.0), []
    for name in ("m0", "m1", "m2"):
        alone, rec = rc.refit_layers(alone, chain(1.0), [name], fit, check)
        alone_records += rec
    assert len(passes) == 3
    for a, b in zip(records, alone_records):
        assert (a.node, a.accepted, a.ridge) == (b.node, b.accepted, b.ridge)
        np.testing.assert_allclose([a.error_before, a.error_after], [b.error_before, b.error_after], rtol=1e-6)
    got = {t.name: numpy_helper.to_array(t) for t in together.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in alone.graph.initializer}
    assert got.keys() == want.keys()
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-6, atol=1e-7)


def test_a_pass_holds_the_sums_of_as_many_layers_as_fit_its_memory_budget(monkeypatch) -> None:
    """With room for one layer's sums per pass, each layer gets its own pass, in order, and the same result."""
    import onnx_easier.reconstruct as rc

    fit, check = samples(5)
    passes = []
    init = rc._Pass.__init__
    monkeypatch.setattr(rc._Pass, "__init__", lambda self, m, t, sites, d, b: (
        passes.append([s.node.name for s in sites]), init(self, m, t, sites, d, b))[-1])
    small, small_records = rc.refit_layers(chain(2.0), chain(1.0), ["m0", "m1", "m2"], fit, check, max_bytes=1)
    assert passes == [["m0"], ["m1"], ["m2"]]
    passes.clear()
    big, big_records = rc.refit_layers(chain(2.0), chain(1.0), ["m0", "m1", "m2"], fit, check)
    assert len(passes) == 2
    assert [(r.node, r.accepted) for r in small_records] == [(r.node, r.accepted) for r in big_records]
    for a, b in zip(small.graph.initializer, big.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-6, atol=1e-7)


def test_a_layer_already_matching_the_original_stops_reading_after_its_first_samples(monkeypatch) -> None:
    """m0 and m1 equal the original's: their error on the first batch is below NEGLIGIBLE, so they are not
    re-fitted (a note says why) and are read no further; m2 (scaled) still is. With m2 matching too, the pass
    reads one batch of the fit samples and none of the check samples."""
    import onnx_easier.reconstruct as rc

    fit, check = samples(6)
    current = last_scaled()
    _, records = rc.refit_layers(current, chain(1.0), ["m0", "m1", "m2"], fit, check)
    assert [r.node for r in records] == ["m0", "m1", "m2"]
    for r in records[:2]:
        assert not r.accepted and r.error_before < rc.NEGLIGIBLE and r.note.startswith("skipped: error")
    assert records[2].accepted and records[2].error_after < records[2].error_before
    runs = []
    run = rc._Pass.batches

    def counted(self, data):
        for got in run(self, data):
            runs.append(data.samples)
            yield got

    monkeypatch.setattr(rc._Pass, "batches", counted)
    model, records = rc.refit_layers(chain(1.0), chain(1.0), ["m0", "m1", "m2"], fit, check)
    assert runs == [96] and all(r.note.startswith("skipped: error") for r in records)
    assert same_weights(model, chain(1.0))


def same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return all(np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
               for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True))
