"""Recovery by distillation (onnx_easier/distill.py) and its wiring (``--distill``, ``optimize(distill=True)``):
which initializers are trained, that training moves a damaged layer back toward the original (KL for classifier
outputs, relative squared error otherwise) without touching the graph, determinism for a seed, the fallback on a
graph the torch executor does not run, the report, and torch staying optional."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from test_select import mlp

from onnx_easier.cli import main
from onnx_easier.data import CalibrationData
from onnx_easier.distill import BUDGET_SHARE, Recovery, distill, feature_pairs, trainable
from onnx_easier.model_io import make_session

ROOT = Path(__file__).resolve().parents[1]


def damaged(model: onnx.ModelProto, name: str, scale: float = 0.05, seed: int = 5) -> onnx.ModelProto:
    """``model`` with noise added to initializer ``name`` (what an inexact merge leaves)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for init in out.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init)
            noisy = arr + scale * np.abs(arr).mean() * rng.standard_normal(arr.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), name))
    return out


def data(n: int, seed: int = 3) -> CalibrationData:
    return CalibrationData("test", n, {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)})


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def layer_graph() -> onnx.ModelProto:
    """MatMul + bias Add, Gemm, Conv-free: x[N,4] -> MatMul W + b -> Relu -> Gemm (w2, b2) -> y."""
    f = lambda *s: np.ones(s, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["h"], name="bias"),
             helper.make_node("Relu", ["h"], ["a"], name="r"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(f(4, 3), "W"), numpy_helper.from_array(f(3), "b"),
             numpy_helper.from_array(f(3, 2), "w2"), numpy_helper.from_array(f(2), "b2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_trainable_scopes() -> None:
    """merged: the layers whose initializers changed or whose node is new (a MatMul's bias Add goes with it);
    all: every layer's."""
    base = layer_graph()
    assert trainable(base, base, "merged") == []
    assert trainable(base, base, "all") == ["W", "b", "w2", "b2"]
    changed = damaged(base, "b")
    assert trainable(changed, base, "merged") == ["W", "b"]
    renamed = onnx.ModelProto()
    renamed.CopyFrom(base)
    renamed.graph.node[3].name = "fused(fc)"
    assert trainable(renamed, base, "merged") == ["w2", "b2"]


def test_distill_recovers_a_damaged_layer() -> None:
    """KL on a classifier: the damaged head moves back toward the original; only its initializers change; the graph
    is the same; a second run with the same seed gives the same weights."""
    original = mlp(bias1=1.0, hidden=32)
    student = damaged(original, "w3")
    r = distill(original, student, data(256), data(64, seed=4), seconds=20, steps=80, seed=1)
    assert r.trained == ["w3", "b3"] and not r.note
    assert r.after < 0.5 * r.before
    assert [n.SerializeToString() for n in r.model.graph.node] == [n.SerializeToString() for n in student.graph.node]
    new, old = values(r.model), values(student)
    assert {k for k in new if not np.array_equal(new[k], old[k])} <= {"w3", "b3"}
    assert not np.array_equal(new["w3"], old["w3"])
    again = distill(original, student, data(256), data(64, seed=4), seconds=20, steps=80, seed=1)
    assert again.steps == r.steps
    np.testing.assert_array_equal(values(again.model)["w3"], new["w3"])
    x = data(64, seed=9).arrays["x"]
    ref = make_session(original).run(None, {"x": x})[0]
    err = [np.abs(make_session(m).run(None, {"x": x})[0] - ref).mean() for m in (student, r.model)]
    assert err[1] < err[0]  # closer to the original on samples it never saw


def test_logits_loss_compares_scores_not_only_distributions() -> None:
    """``loss="logits"``: a head whose logits are all shifted by 3 has the original's class distribution (KL 0:
    nothing to train) but not its scores: the relative squared error of the logits, measured before training as
    computed here by hand, falls by the shift."""
    original = mlp(bias1=1.0, hidden=32)
    shifted = onnx.ModelProto()
    shifted.CopyFrom(original)
    for init in shifted.graph.initializer:
        if init.name == "b3":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(3.0), "b3"))
    fit, check = data(256), data(64, seed=4)
    kl = distill(original, shifted, fit, check, seconds=20, steps=40, seed=0)
    assert kl.before < 1e-6 and kl.model is shifted  # same distribution: no gain to keep
    r = distill(original, shifted, fit, check, seconds=20, steps=200, seed=0, loss="logits", batch=32, lr=0.03)
    t = make_session(original).run(None, {"x": check.arrays["x"]})[0].astype(np.float64)
    s = make_session(shifted).run(None, {"x": check.arrays["x"]})[0].astype(np.float64)
    by_hand = np.mean([((s[i:i + 32] - t[i:i + 32]) ** 2).sum() / (t[i:i + 32] ** 2).sum() for i in (0, 32)])
    assert r.loss == "logits" and r.as_report()["loss"] == "logits"
    assert r.before == pytest.approx(by_hand, rel=1e-4)
    assert r.after < 0.2 * r.before
    after = make_session(r.model).run(None, {"x": check.arrays["x"]})[0]
    assert np.abs(after - t).mean() < 0.5 * np.abs(s - t).mean()


def test_regression_output_trains_by_squared_error() -> None:
    """An output that is no classifier (``[N, 1]``): relative squared error, and it falls."""
    original = mlp(bias1=1.0, hidden=32)
    g = original.graph
    g.node.append(helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=1, name="sum"))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1]))
    student = damaged(original, "w3")
    r = distill(original, student, data(256), data(64, seed=4), seconds=20, steps=80, seed=0)
    assert r.trained == ["w3", "b3"] and r.after < 0.5 * r.before


def test_feature_matching_at_a_trained_layer() -> None:
    """``feature_weight``: the trained layer's output, which the original computes under the same name, is matched
    too (a hidden layer: the final output is no feature)."""
    original = mlp(bias1=1.0, hidden=32)
    student = damaged(original, "w2")
    r = distill(original, student, data(256), data(64, seed=4), seconds=20, steps=60, seed=0, feature_weight=1.0)
    assert r.features == ["h2"] and r.trained == ["w2", "b2"]
    assert r.after < 0.5 * r.before
    plain = distill(original, student, data(256), data(64, seed=4), seconds=20, steps=1, seed=0)
    assert r.before == pytest.approx(plain.before, rel=1e-6)  # the check loss is the outputs' alone


def test_feature_pairs_take_the_bias_add_of_a_fused_matmul() -> None:
    """A fused MatMul writes a new tensor; the bias Add after it writes the name the original's layer wrote: that is
    the feature matched. A layer whose output the original lacks, or the graph output, is none."""
    original = layer_graph()
    fused = onnx.ModelProto()
    fused.CopyFrom(original)
    fused.graph.node[0].output[0] = "fused_m"  # the merged layer's own output: a name the original lacks
    fused.graph.node[1].input[0] = "fused_m"
    assert feature_pairs(fused, original, ["W", "b"]) == ["h"]
    assert feature_pairs(fused, original, ["w2", "b2"]) == []  # fc writes the graph output y
    shared = onnx.ModelProto()
    shared.CopyFrom(fused)  # a second reader of the MatMul's output: the Add is no bias of it alone
    shared.graph.node.append(helper.make_node("Relu", ["fused_m"], ["extra"], name="extra"))
    assert feature_pairs(shared, original, ["W", "b"]) == []


def test_a_feature_of_another_shape_is_not_matched() -> None:
    """A student whose hidden layers are narrower than the original's writes h1 and h2 under the original's names
    but not of its shapes: nothing to match, and the outputs are still distilled."""
    original, student = mlp(bias1=1.0, hidden=32), mlp(bias1=1.0, hidden=16, seed=1)
    r = distill(original, student, data(256), data(64, seed=4), seconds=20, steps=40, seed=0, feature_weight=1.0)
    assert r.features == [] and not r.note and r.steps > 0 and r.after < r.before


def test_graph_the_executor_cannot_run_is_not_distilled() -> None:
    original = mlp(bias1=1.0, hidden=32)
    student = damaged(original, "w3")
    student.graph.node[3].op_type = "Celu"  # ORT runs it, the torch executor does not
    r = distill(original, student, data(64), data(32, seed=4), seconds=5)
    assert r.model is student and r.steps == 0 and "Celu" in r.note


def test_distill_runs_torch_on_one_cpu_thread_and_restores_it(monkeypatch) -> None:
    """On CPU torch trains with CPU_THREADS threads (small layers: more threads only synchronise), with the caller's
    count when a step's forward tensors pass PARALLEL_BYTES; the caller's setting is back afterwards."""
    import onnx_easier.distill as D

    seen = []
    check = D.check_against_ort

    def spy(*args: object) -> str | None:
        seen.append(torch.get_num_threads())
        return check(*args)

    monkeypatch.setattr(D, "check_against_ort", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        original = mlp(bias1=1.0, hidden=32)
        distill(original, damaged(original, "w3"), data(64), data(32, seed=4), seconds=5, steps=5)
        assert seen == [D.CPU_THREADS] and torch.get_num_threads() == 2
        monkeypatch.setattr(D, "PARALLEL_BYTES", 1)  # every step is "large"
        distill(original, damaged(original, "w3"), data(64), data(32, seed=4), seconds=5, steps=5)
        assert seen == [D.CPU_THREADS, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_recovery_tries_close_candidates_within_its_budget() -> None:
    """A loss far over the tolerance is not tried; a close one is distilled (the original's outputs computed once
    for all candidates); no time left, nothing."""
    original = mlp(bias1=1.0, hidden=32)
    rec = Recovery(original, original, data(256), data(64, seed=4), tolerance=0.01, metric=None, seconds=20)
    student = damaged(original, "w3")
    assert rec(student, 0.5) is None and not rec.records
    out = rec(student, 0.02)
    assert out is not None and out is not student and len(rec.records) == 1
    session = rec.teacher["session"]
    rec(damaged(original, "w3", seed=6), 0.02)
    assert rec.teacher["session"] is session and len(rec.records) == 2
    assert 0 < rec.used <= 20 and rec.left() == pytest.approx(20 - rec.used)
    rec.used = 19.0
    assert rec(student, 0.02) is None and len(rec.records) == 2


def test_recovery_sets_the_judging_of_a_distilled_candidate_aside() -> None:
    """The search judges a distilled candidate again, on the budget: the longest such judging so far is set aside
    before the next candidate is distilled (6 s left, 5 s of judging: under RECOVER_MIN_SECONDS remains)."""
    original = mlp(bias1=1.0, hidden=32)
    rec = Recovery(original, original, data(256), data(64, seed=4), tolerance=0.01, metric=None, seconds=20)
    student = damaged(original, "w3")
    rec.used = 14.0
    assert rec(student, 0.02) is not None and len(rec.records) == 1  # 6 s left: distilled
    rec.judged(5.0, 0.02, 0.015)
    assert rec.judging == 5.0
    rec.used = 14.0
    assert rec(student, 0.02) is None and len(rec.records) == 1


def test_recovery_learns_how_far_distillation_reaches_on_the_model(monkeypatch) -> None:
    """Until LEARN_AFTER candidates were judged, losses up to RECOVER_FACTOR x the tolerance are distilled; then up
    to REACH_SLACK x the best gain seen (a distillation with no gain on the check samples counts 1)."""
    import onnx_easier.distill as D

    original = mlp(bias1=1.0, hidden=32)
    rec = Recovery(original, original, data(64), data(32, seed=4), tolerance=0.01, metric=None, seconds=60)
    tried: list[onnx.ModelProto] = []

    def fake(model: onnx.ModelProto, seconds: float) -> D.DistillResult:
        tried.append(model)
        return D.DistillResult(model, ["w3"], 1.0, 1.0, 10, 0.01, "merged")  # no gain: the model itself

    monkeypatch.setattr(rec, "_distill", fake)
    assert rec.reach() == D.RECOVER_FACTOR
    rec(original, 0.024)
    rec.judged(0.1, 0.02, 0.0125)  # one candidate of the search won back by 1.6x
    assert rec.gains == pytest.approx([1.0, 1.6]) and rec.reach() == pytest.approx(min(D.RECOVER_FACTOR, 1.6 * D.REACH_SLACK))
    assert rec(original, 0.0195) is original and len(tried) == 2  # 1.95x: within 1.6 x 1.25
    assert rec(original, 0.0205) is None and len(tried) == 2  # 2.05x: over
    no_gain = Recovery(original, original, data(64), data(32, seed=4), tolerance=0.01, metric=None, seconds=60)
    monkeypatch.setattr(no_gain, "_distill", fake)
    no_gain(original, 0.02)
    no_gain(original, 0.02)
    assert no_gain.reach() == pytest.approx(D.REACH_SLACK)
    assert no_gain(original, 0.013) is None and no_gain(original, 0.012) is original


def test_recovery_default_budget_is_a_share_of_the_run_time() -> None:
    """Without ``seconds`` the budget is BUDGET_SHARE of the run's own time so far (the distillation's, the charged
    import included, excluded), so a run with distillation stays within twice the run without; the chosen model
    gets what is left, nothing under FINAL_MIN_SECONDS."""
    original = mlp(bias1=1.0, hidden=32)
    rec = Recovery(original, original, data(64), data(32, seed=4), tolerance=0.01, metric=None, seconds=None,
                   spent=1.0)
    assert rec.left() == 0.0 and rec(damaged(original, "w3"), 0.02) is None  # no run time yet: nothing
    assert rec.final(damaged(original, "w3")) is None and not rec.records
    rec.started -= 12.0  # the run has taken 12 s, 1 s of it torch's import (charged)
    assert rec.budget() == pytest.approx(BUDGET_SHARE * 11.0, abs=0.05)
    assert rec.left() == pytest.approx(BUDGET_SHARE * 11.0 - 1.0, abs=0.05)
    rec.used += 2.0  # a distillation of 2 s: not the run's own time, and charged
    assert rec.left() == pytest.approx(BUDGET_SHARE * 9.0 - 3.0, abs=0.05)
    r = rec.final(damaged(original, "w3"))
    assert r is not None and r.seconds <= BUDGET_SHARE * 9.0 - 3.0 + 0.5 and not rec.records


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    m = tmp_path / "mlp.onnx"
    onnx.save(mlp(bias1=2.0, hidden=256), str(m))  # r1 partly off: linearizing it costs fidelity to win back
    d = tmp_path / "calib.npz"
    np.savez(d, x=np.random.default_rng(3).standard_normal((400, 16)).astype(np.float32))
    return {"model": m, "data": d, "dir": tmp_path}


def test_cli_distill_inside_and_after_the_search(setup, capsys, monkeypatch) -> None:
    """Inside the search: r1 fails a 0.03 budget by less than 2.5x (loss about 0.04), so it is distilled and judged
    again before it is rejected (that judging charged to the distillation's time); its trial gives the loss before
    and after and whether that was accepted. After the search, the report's ``distill``: fidelity on the held-out
    samples before / after, kept, the training's figures, the candidates distilled in the search; the written model
    passes the verification of every written model."""
    import onnx_easier.distill as D

    charged: list[tuple[float, float, float]] = []
    judged = D.Recovery.judged
    monkeypatch.setattr(D.Recovery, "judged", lambda self, *a: charged.append(a) or judged(self, *a))
    out, rep = setup["dir"] / "out.onnx", setup["dir"] / "r.json"
    args = [setup["model"], out, "--data", setup["data"], "--strategy", "entropy", "--tolerance", "0.03",
            "--max-remove", "1", "--report", rep, "-q", "--distill", "--distill-seconds", "8"]
    assert main([str(a) for a in args]) == 0
    report = json.loads(rep.read_text())
    trial = report["search"]["entropy"]["trials"][0]
    assert trial["activations"] == ["r1"]
    t = trial["distill"]
    assert set(t) == {"before", "after", "accepted"} and t["before"] > 0.03
    assert trial["accepted"] == t["accepted"] and trial["fidelity"] == (t["after"] if t["accepted"] else t["before"])
    d = report["distill"]
    assert d["search"]["distilled"] == 1 and d["search"]["accepted"] == int(t["accepted"])
    assert len(charged) == (t["after"] != t["before"]) and all(c[0] > 0 for c in charged)
    assert all(c[1:] == (t["before"], t["after"]) for c in charged)
    assert report["verification"]["ok"]
    if t["accepted"]:  # a search model was chosen: distilled once more
        assert {"before", "after", "kept", "steps", "seconds", "scope", "loss_before", "loss_after"} <= set(d)
        assert d["scope"] == "merged" and d["seconds"] < 20
        assert report["fidelity"]["value"] == pytest.approx(d["after"] if d["kept"] else d["before"])
    capsys.readouterr()


def test_cli_distill_with_no_time_left_says_so(setup) -> None:
    """A budget too small for any distillation: none in the search, none of the chosen model; the report's
    ``distill`` says why and the model written is the search's, verified."""
    out, rep = setup["dir"] / "out.onnx", setup["dir"] / "r.json"
    args = [setup["model"], out, "--data", setup["data"], "--strategy", "entropy", "--tolerance", "0.5",
            "--max-remove", "1", "--report", rep, "-q", "--distill", "--distill-seconds", "0.1"]
    assert main([str(a) for a in args]) == 0
    report = json.loads(rep.read_text())
    d = report["distill"]
    assert report["strategy"]["chosen"] == "entropy" and report["verification"]["ok"]
    assert d["kept"] is False and d["note"].startswith("no time left") and d["search"]["distilled"] == 0
    assert d["before"] == d["after"] == report["fidelity"]["value"]


def test_cli_distill_skips_a_chosen_model_that_is_exact(tmp_path) -> None:
    """r1 always ON (bias 8): linearizing it is exact up to rounding, so the chosen model's fidelity loss is float
    noise; no distillation is spent on it, and the report says why."""
    m, d = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(mlp(bias1=8.0, hidden=64), str(m))
    np.savez(d, x=np.random.default_rng(3).standard_normal((400, 16)).astype(np.float32))
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    args = [m, out, "--data", d, "--strategy", "entropy", "--tolerance", "0.5", "--max-remove", "1", "--report", rep,
            "-q", "--distill", "--distill-seconds", "30"]
    assert main([str(a) for a in args]) == 0
    report = json.loads(rep.read_text())
    assert [a["action"] for a in report["activations"]] == ["linearized", "kept"]
    assert 0 <= report["fidelity"]["value"] <= 1e-6
    assert report["distill"]["note"].startswith("nothing to recover") and "steps" not in report["distill"]


def test_distill_batch_is_bounded_by_the_step_memory(monkeypatch) -> None:
    """The samples per step follow TRAIN_BYTES over one sample's forward tensors (data.training_bytes): the mlp
    with 32 hidden units holds 32 + 32 + 32 + 32 + 10 floats per sample (the Gemm and Relu outputs); a budget of
    four samples' worth gives batches of 4; the default budget the usual 32."""
    import onnx_easier.distill as D

    original = mlp(bias1=1.0, hidden=32)
    student = damaged(original, "w3")
    assert distill(original, student, data(128), data(64, seed=4), steps=3, seed=1).batch == D.BATCH
    monkeypatch.setattr(D, "TRAIN_BYTES", 4 * (4 * 32 + 10) * 4)
    r = distill(original, student, data(128), data(64, seed=4), steps=3, seed=1)
    assert r.batch == 4 and r.as_report()["batch"] == 4 and r.steps == 3


def test_cli_distill_steps_and_loss_reach_the_training(setup, capsys) -> None:
    """--distill-steps sets each distillation's schedule and --distill-loss its loss (the report gives both);
    a schedule under one step is refused with exit 2 and one line."""
    out, rep = setup["dir"] / "out.onnx", setup["dir"] / "r.json"
    base = [setup["model"], out, "--data", setup["data"], "--strategy", "entropy", "--tolerance", "0.5",
            "--max-remove", "1", "--report", rep, "-q", "--distill", "--distill-seconds", "30"]
    assert main([str(a) for a in base + ["--distill-steps", "7", "--distill-loss", "logits"]]) == 0
    d = json.loads(rep.read_text())["distill"]
    assert d["steps"] <= 7 and d["loss"] == "logits"
    capsys.readouterr()
    assert main([str(a) for a in base + ["--distill-steps", "0"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--distill-steps" in err


def test_cli_distill_features_reach_the_training(setup, capsys) -> None:
    """--distill-features W adds the feature-matching term: the report gives its weight and the tensors matched;
    a negative weight is refused with exit 2 and one line."""
    out, rep = setup["dir"] / "out.onnx", setup["dir"] / "r.json"
    base = [setup["model"], out, "--data", setup["data"], "--strategy", "entropy", "--tolerance", "0.5",
            "--max-remove", "1", "--report", rep, "-q", "--distill", "--distill-seconds", "30", "--distill-steps", "7"]
    assert main([str(a) for a in base + ["--distill-features", "0.5"]]) == 0
    d = json.loads(rep.read_text())["distill"]
    assert d["feature_weight"] == 0.5 and d["features"] == ["h2"]  # fc1 and fc2 merged: their output, h2
    assert main([str(a) for a in base]) == 0
    assert "feature_weight" not in json.loads(rep.read_text())["distill"]
    capsys.readouterr()
    assert main([str(a) for a in base + ["--distill-features", "-1"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--distill-features" in err


def test_cli_distill_is_deterministic_for_a_seed(setup) -> None:
    """Two runs with the same --seed and a budget that does not cut the training write the same weights; the
    distillations (of the candidate in the search, of the chosen model if any) give the same figures."""
    runs = []
    for i in range(2):
        out, rep = setup["dir"] / f"out{i}.onnx", setup["dir"] / f"r{i}.json"
        args = [setup["model"], out, "--data", setup["data"], "--strategy", "entropy", "--tolerance", "0.03",
                "--max-remove", "1", "--report", rep, "-q", "--distill", "--distill-seconds", "60", "--seed", "1"]
        assert main([str(a) for a in args]) == 0
        runs.append((values(onnx.load(str(out))), json.loads(rep.read_text())))
    (a, ra), (b, rb) = runs
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    timeless = lambda d: {k: timeless(v) if isinstance(v, dict) else v for k, v in d.items() if k != "seconds"}
    da, db = timeless(ra["distill"]), timeless(rb["distill"])
    assert not da.get("cut_by_time") and da == db and da["search"]["distilled"] == 1
    ta, tb = ra["search"]["entropy"]["trials"][0], rb["search"]["entropy"]["trials"][0]
    assert "distill" in ta and ta["distill"] == tb["distill"] and ta["fidelity"] == tb["fidelity"]


def test_cli_distill_without_torch_exits_2(setup, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # importlib.util.find_spec("torch") is then None
    out = setup["dir"] / "out.onnx"
    code = main([str(setup["model"]), str(out), "--data", str(setup["data"]), "--distill"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.count("\n") == 0 and 'pip install "onnx-easier[distill]"' in err


def test_torch_stays_optional() -> None:
    """The distill extra bounds torch as the test extra does; the package's import of the CLI and API loads no
    torch (it is imported only when distillation runs)."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("torch") for d in meta["dependencies"])
    torch_test = next(d for d in meta["optional-dependencies"]["test"] if d.startswith("torch"))
    assert torch_test in meta["optional-dependencies"]["distill"]
    code = "import sys, onnx_easier.cli, onnx_easier.api; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT).returncode == 0


def test_readme_states_the_budget_and_threads_of_the_code() -> None:
    """The README's "Distillation" section gives the code's default budget share and its CPU thread count."""
    import onnx_easier.distill as D

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"by default, at any moment {D.BUDGET_SHARE:g} of the run's own time so far" in readme
    assert D.CPU_THREADS == 1 and "On CPU torch runs on one thread while distilling" in readme
    assert f"(default: {D.BUDGET_SHARE:g} of the run's own time)" in readme
