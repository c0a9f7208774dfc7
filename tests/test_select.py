"""The budgeted loop (select.py + api.optimize budget mode) and graph-side re-fit (reconstruct.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier import optimize
from onnx_easier.cli import main
from onnx_easier.data import CalibrationData
from onnx_easier.execution import CPU
from onnx_easier.model_io import make_session
from onnx_easier.reconstruct import refit_layers
from onnx_easier.select import Judge, _adjacent, linearize_and_fuse, split_data


def mlp(bias1: float, seed: int = 0, hidden: int = 64) -> onnx.ModelProto:
    """x[N,16] -> Gemm 16->hidden (+bias1) -> Relu 'r1' -> Gemm hidden->hidden -> Relu 'r2' -> Gemm hidden->10.

    With a large ``bias1`` the first Relu is always ON (exactly linear on the data); the second is a real
    nonlinearity (zero-mean pre-activations)."""
    rng = np.random.default_rng(seed)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], transB=1, name="fc3"),
    ]
    w2 = rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
    inits = [
        init("w1", rng.standard_normal((hidden, 16)) * 0.25), init("b1", np.full(hidden, bias1)),
        init("w2", w2), init("b2", -w2.sum(1) * bias1),
        init("w3", rng.standard_normal((10, hidden)) * 0.5), init("b3", np.zeros(10)),
    ]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    m = tmp_path / "mlp.onnx"
    onnx.save(mlp(bias1=8.0, hidden=256), str(m))  # wide: merging fc1+fc2 saves 94% of the MACs, clearly faster
    d = tmp_path / "calib.npz"
    np.savez(d, x=np.random.default_rng(3).standard_normal((400, 16)).astype(np.float32))
    return {"model": m, "data": d, "dir": tmp_path}


def test_always_on_activation_is_linearized_and_its_layers_merge(setup) -> None:
    r = optimize(setup["model"], setup["data"], tolerance=0.01, strategy="entropy")
    acts = {a["node"]: a for a in r.report["activations"]}
    assert acts["r1"]["entropy"] == 0.0
    assert acts["r1"]["action"] == "linearized"
    assert acts["r2"]["action"] == "kept"  # a real nonlinearity: removing it breaks the 1% budget
    assert acts["r2"]["fidelity"] > 0.01
    assert r.report["after"]["compute_nodes"] == 2  # fc1 and fc2 became one Gemm
    assert r.report["fidelity"]["value"] <= 0.01
    assert r.report["fidelity"]["samples"] == 133  # a third of 400: 388 would resolve 0.01 (holdout_needed)
    assert r.report["latency_ms"]["batch"] == 1
    x = np.load(setup["data"])["x"][:50]
    ya = make_session(onnx.load(str(setup["model"]))).run(None, {"x": x})[0]
    yb = make_session(r.model).run(None, {"x": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4)  # r1 is exactly linear on this data


def test_tolerance_zero_writes_only_exact_fusions(setup) -> None:
    r = optimize(setup["model"], setup["data"], tolerance=0.0)
    assert all(a["action"] == "kept" for a in r.report["activations"])
    assert r.report["trials"] == 0
    assert r.report["after"] == r.report["before"]  # fc1 -> r1 -> fc2 -> r2 -> fc3: nothing fuses exactly
    # the same graph runs as fast and computes the same: nothing is timed or run (only the cheap checks)
    assert r.report["latency_ms"]["after"] is None and "no change" in r.report["latency_ms"]["note"]
    assert r.report["exactness"]["samples"] == 0 and r.report["fidelity"]["value"] == 0.0


def test_max_remove_caps_the_count(setup) -> None:
    r = optimize(setup["model"], setup["data"], tolerance=1.0, max_remove=1, strategy="entropy")
    assert sum(a["action"] == "linearized" for a in r.report["activations"]) <= 1


def test_split_is_disjoint_random_and_seeded() -> None:
    data = CalibrationData("t", 100, {"x": np.arange(100, dtype=np.float32)[:, None]})
    fit, check, hold = split_data(data)
    seen = [set(d.arrays["x"][:, 0].tolist()) for d in (fit, check, hold)]
    assert (fit.samples, check.samples, hold.samples) == (60, 15, 25)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(range(100))
    assert all(np.all(np.diff(d.arrays["x"][:, 0]) > 0) for d in (fit, check, hold))  # file order kept in a part
    assert [d.arrays["x"].tolist() for d in split_data(data)] == [d.arrays["x"].tolist() for d in (fit, check, hold)]
    other = split_data(data, seed=1)[2].arrays["x"][:, 0].tolist()
    assert set(other) != seen[2]


def test_split_of_data_stored_class_by_class_gives_every_class_to_every_part() -> None:
    """A calibration file written class after class (10 classes of 40): positional parts would hold out only the
    last classes and fit the re-fits on the others."""
    labels = np.repeat(np.arange(10), 40)
    data = CalibrationData("t", 400, {"x": labels.astype(np.float32)[:, None]})
    for part in split_data(data):
        counts = np.bincount(part.arrays["x"][:, 0].astype(int), minlength=10)
        share = counts / part.samples
        assert counts.min() > 0 and share.max() < 0.2, counts


def test_split_in_whole_batches_for_a_fixed_batch_model() -> None:
    """A model whose batch is fixed at 4: every part is a whole number of batches (ORT refuses a shorter one), the
    remainder is left out, and the parts stay disjoint; too few batches: one whole set for all three."""
    data = CalibrationData("t", 103, {"x": np.arange(103, dtype=np.float32)[:, None]})
    fit, check, hold = split_data(data, 4)
    assert (fit.samples, check.samples, hold.samples) == (64, 12, 24)  # 25 -> 24 held out, 76 // 5 = 15 -> 12
    assert all(d.samples % 4 == 0 for d in (fit, check, hold))
    seen = [set(d.arrays["x"][:, 0].tolist()) for d in (fit, check, hold)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(set().union(*seen)) == 100  # 3 left out
    small = split_data(CalibrationData("t", 30, {"x": np.zeros((30, 1), np.float32)}), 4)
    assert [d.samples for d in small] == [28, 28, 28]
    assert [d.samples for d in split_data(data)] == [62, 15, 26]  # no fixed batch: as before


def test_the_held_out_part_grows_to_resolve_the_tolerance_up_to_a_third() -> None:
    """With the agreement metric a quarter may not resolve the tolerance: 388 samples do at 0.01 (one flip's 90%
    bound within it); the held-out part takes them, up to a third of the data; other metrics and tolerance 0 keep a
    quarter. The parts stay disjoint and cover the data."""
    from onnx_easier.bounds import binomial_upper
    from onnx_easier.fidelity import holdout_needed
    from onnx_easier.select import permuted_split

    need = holdout_needed("agreement", 0.01)
    assert need == 388 and binomial_upper(1, need, 0.9) <= 0.01 < binomial_upper(1, need - 1, 0.9)
    assert holdout_needed("rel-l2", 0.01) == 0 and holdout_needed("agreement", 0.0) == 0
    for n, held in [(1257, 388), (400, 133), (4000, 1000), (200, 66)]:
        data = CalibrationData("t", n, {"x": np.arange(n, dtype=np.float32)[:, None]})
        _, (fit, check, hold) = permuted_split(data, holdout=need)
        assert hold.samples == held, n
        seen = [set(d.arrays["x"][:, 0].tolist()) for d in (fit, check, hold)]
        assert sum(map(len, seen)) == n and len(set().union(*seen)) == n
    data = CalibrationData("t", 1257, {"x": np.zeros((1257, 1), np.float32)})
    assert permuted_split(data, holdout=0)[1][2].samples == 314


def test_adjacent_runs_follow_the_chain() -> None:
    from onnx_easier.activations import find_activations
    from onnx_easier.model_io import to_graph
    from onnx_easier.shapes import infer_shapes

    m = infer_shapes(mlp(1.0))
    acts = find_activations(to_graph(m))
    runs = _adjacent(m, acts)
    assert [[a.name for a in run] for run in runs] == [["r1", "r2"]]


def mlp_without_r2(hidden: int, samples: int, n_fit: int = 500) -> tuple:
    """(original, built, x, fit, check): ``mlp(bias1=8.0, hidden)`` and the same with r2 linearized by identity and
    fused; ``samples`` standard-normal inputs, the first ``n_fit`` to fit, the rest to check."""
    from onnx_easier.activations import find_activations
    from onnx_easier.model_io import to_graph
    from onnx_easier.shapes import infer_shapes

    original = infer_shapes(mlp(bias1=8.0, hidden=hidden))
    acts = {a.name: a for a in find_activations(to_graph(original))}
    built = linearize_and_fuse(original, [acts["r2"]], "identity", None)
    x = np.random.default_rng(5).standard_normal((samples, 16)).astype(np.float32)
    fit = CalibrationData("t", n_fit, {"x": x[:n_fit]})
    check = CalibrationData("t", samples - n_fit, {"x": x[n_fit:]})
    return original, built, x, fit, check


def test_refit_recovers_what_linearization_lost(setup) -> None:
    """Linearize r2 (a real nonlinearity) by identity; re-fitting fc3 to the original output lowers the error."""
    original, built, x, fit, check = mlp_without_r2(256, 600)
    names = [n.name for n in built.model.graph.node if n.op_type == "Gemm"]
    model, records = refit_layers(built.model, original, names[-1:], fit, check)
    assert len(records) == 1 and records[0].accepted
    assert records[0].error_after < 0.8 * records[0].error_before
    onnx.checker.check_model(model, full_check=True)
    y0 = make_session(original).run(None, {"x": x[500:]})[0]
    e_before = np.linalg.norm(make_session(built.model).run(None, {"x": x[500:]})[0] - y0)
    e_after = np.linalg.norm(make_session(model).run(None, {"x": x[500:]})[0] - y0)
    assert e_after < e_before


def test_cli_budget_mode_report_and_html(setup, capsys) -> None:
    import json

    out, rep, html = setup["dir"] / "o.onnx", setup["dir"] / "r.json", setup["dir"] / "r.html"
    code = main([str(setup["model"]), str(out), "--data", str(setup["data"]), "--report", str(rep),
                 "--report", str(html), "--strategy", "entropy"])
    err = capsys.readouterr().err
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert {"after", "fidelity", "latency_ms", "verification", "trials"} <= set(r)
    assert set(r["fidelity"]) >= {"metric", "value", "tolerance", "samples"}
    assert set(r["latency_ms"]) >= {"before", "after", "provider", "batch"}
    assert r["verification"]["ok"] is True
    assert "<svg" in html.read_text()


def test_failed_verification_leaves_no_output(setup, capsys, monkeypatch) -> None:
    from onnx_easier import api

    real = api.Result.write

    def corrupting_write(self, path, *, keep_failed=False):
        self.verifier = lambda model: {"ok": False, "metric": "agreement", "value": 1.0, "tolerance": 0.01}
        return real(self, path, keep_failed=keep_failed)

    monkeypatch.setattr(api.Result, "write", corrupting_write)
    out = setup["dir"] / "o.onnx"
    code = main([str(setup["model"]), str(out), "--data", str(setup["data"]), "--tolerance", "0"])
    assert code == 1 and not out.exists()
    assert "verification failed" in capsys.readouterr().err
    code = main([str(setup["model"]), str(out), "--data", str(setup["data"]), "--tolerance", "0", "--keep-failed"])
    assert code == 1 and out.exists()


def residual_mlp(seed: int = 0, width: int = 32) -> onnx.ModelProto:
    """ResNet's pattern on tokens: x[N,16] -> fc0 -> Relu r0 -> a0;  s1 = a0 + f1(a0) -> Relu r1 -> a1;
    s2 = a1 + f2(a1) -> Relu r2 -> fc3 -> y[N,10], with f_i = Gemm -> Relu k_i -> Gemm (a nonlinear branch).

    r1's input is an Add with an identity skip of a nonlinear tensor and its output feeds a Gemm and an identity
    skip: its affine map folds neither backward nor forward (it would stay as a node of its own). r1 is almost
    ON (bias +1: the lowest entropy, but not 0); the other Relus see centred pre-activations."""
    rng = np.random.default_rng(seed)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    def gemm(a: str, w: str, y: str) -> onnx.NodeProto:
        return helper.make_node("Gemm", [a, w, f"{w}_b"], [y], transB=1, name=w)

    nodes = [gemm("x", "w0", "h0"), helper.make_node("Relu", ["h0"], ["a0"], name="r0")]
    inits = [init("w0", rng.standard_normal((width, 16)) * 0.5), init("w0_b", np.zeros(width))]
    for i, shift in ((1, 1.0), (2, 0.0)):
        prev = f"a{i - 1}"
        nodes += [gemm(prev, f"w{i}a", f"u{i}"), helper.make_node("Relu", [f"u{i}"], [f"v{i}"], name=f"k{i}"),
                  gemm(f"v{i}", f"w{i}b", f"h{i}"), helper.make_node("Add", [f"h{i}", prev], [f"s{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"s{i}"], [f"a{i}"], name=f"r{i}")]
        inits += [init(f"w{i}a", rng.standard_normal((width, width)) / np.sqrt(width)),
                  init(f"w{i}a_b", np.zeros(width)),
                  init(f"w{i}b", rng.standard_normal((width, width)) * 0.1),
                  init(f"w{i}b_b", np.full(width, shift - (0.5 if i == 2 else 0.0)))]
    nodes.append(gemm("a2", "w3", "y"))
    inits += [init("w3", rng.standard_normal((10, width)) * 0.5), init("w3_b", np.zeros(10))]
    g = helper.make_graph(nodes, "resmlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_affine_that_cannot_fold_falls_back_to_identity(tmp_path: Path) -> None:
    """r1's affine map would stay as a node: the search tries the identity + re-fit instead, and no trial ever adds
    a compute node or MACs."""
    m = residual_mlp()
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((400, 16)).astype(np.float32))
    r = optimize(m, data, tolerance=1.0, strategy="entropy", max_remove=1)
    acts = {a["node"]: a for a in r.report["activations"]}
    assert min(acts, key=lambda n: acts[n]["entropy"]) == "r1"
    trials = {tuple(t["activations"]): t for t in r.report["search"]["entropy"]["trials"]}
    t1 = trials[("r1",)]
    assert "identity + re-fit" in t1.get("note", "")
    assert t1["accepted"]  # tolerance 1.0 accepts everything
    for t in trials.values():
        assert t["compute_nodes"] <= r.report["before"]["compute_nodes"]
        assert t["macs"] <= r.report["before"]["macs"]
    assert r.report["search"]["entropy"]["linearized"] == ["r1"]
    # (which model is written depends on a latency measurement: not asserted here)


def test_output_layers_walks_back_through_non_layers() -> None:
    from onnx_easier.select import output_layers

    assert output_layers(mlp(1.0)) == ["fc3"]
    m = residual_mlp()
    m.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="sm", axis=-1))
    m.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10]))
    assert output_layers(m) == ["w3"]  # through the Softmax, and not beyond the layer
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("a1", TensorProto.FLOAT, ["N", 32]))
    assert sorted(output_layers(m)) == ["w0", "w1b"]  # a1 = Relu(f1(a0) + Relu(w0 x)): both branches, through Relu


def _lat(ms: float) -> object:
    from onnx_easier.latency import LatencyStats

    return LatencyStats(ms, ms, ms, 1, 1, "cpu", 1)


def test_choose_prefers_shallowest_among_equally_fast() -> None:
    from onnx_easier.api import _choose

    models = {k: onnx.ModelProto() for k in ("original", "exact", "search:entropy", "search:merge")}
    lin = {"search:entropy": 3, "search:merge": 2}
    macs = {"original": 10, "exact": 10, "search:entropy": 10, "search:merge": 8}.__getitem__
    # all within 3% of each other: the most linearized wins, although the exact model measured fastest
    lat = {"original": _lat(1.0), "exact": _lat(0.98), "search:entropy": _lat(1.0), "search:merge": _lat(0.99)}
    assert _choose(models, lat, lin, macs) == "search:entropy"
    # a clearly faster result wins over a shallower one of the same speed as the input
    lat["search:merge"] = _lat(0.6)
    assert _choose(models, lat, lin, macs) == "search:merge"
    # everything slower than the input beyond the noise margin: the original
    lat = {"original": _lat(1.0), "exact": _lat(1.2), "search:entropy": _lat(1.1), "search:merge": _lat(1.05)}
    assert _choose(models, lat, lin, macs) == "original"
    # equal depth and speed: fewer MACs
    lat = {"original": _lat(1.0), "exact": _lat(1.0), "search:entropy": _lat(1.0), "search:merge": _lat(1.0)}
    assert _choose(models, lat, {"search:entropy": 2, "search:merge": 2}, macs) == "search:merge"
    # equal depth, MACs and speed: the lower fidelity loss, before a latency difference within the noise
    same = {"original": 10, "exact": 10, "search:entropy": 8, "search:merge": 8}.__getitem__
    lat["search:merge"] = _lat(0.99)
    two = {"search:entropy": 2, "search:merge": 2}
    assert _choose(models, lat, two, same) == "search:merge"
    assert _choose(models, lat, two, same, {"search:entropy": 0.004, "search:merge": 0.006}) == "search:entropy"


def test_auto_runs_one_search_when_no_group_holds_several_activations(tmp_path: Path) -> None:
    """A model whose merge candidates are single activations: ``entropy`` would try the same candidates in
    another order, so ``auto`` runs ``merge`` alone and says why the other did not run. (a2 is also a graph output:
    otherwise linearizing k2 and r2 together folds both residual branches and fc3 into one Gemm, a group.)"""
    m = residual_mlp()
    m.graph.output.append(helper.make_tensor_value_info("a2", TensorProto.FLOAT, ["N", 32]))
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((400, 16)).astype(np.float32))
    r = optimize(m, data, tolerance=0.05, strategy="auto", try_all=True)
    assert list(r.report["search"]) == ["merge"]
    assert "no group of several activations" in r.report["strategy"]["not_run"]["entropy"]
    assert r.report["search"]["merge"]["trials"]
    both = optimize(m, data, tolerance=0.05, strategy="entropy", try_all=True)
    assert sorted(map(tuple, (t["activations"] for t in both.report["search"]["entropy"]["trials"]))) == \
        sorted(map(tuple, (t["activations"] for t in r.report["search"]["merge"]["trials"])))


def test_downstream_layers_include_the_other_branch_of_a_residual_add() -> None:
    """r1's output a1 feeds w2a and the identity skip into add2: the layers re-fitted after linearizing r1 are w2a,
    w3 (past add2 and r2), and w2b, which ends add2's other branch; nothing upstream of r1."""
    from onnx_easier.activations import find_activations
    from onnx_easier.model_io import to_graph
    from onnx_easier.select import downstream_layers
    from onnx_easier.shapes import infer_shapes

    m = infer_shapes(residual_mlp())
    acts = {a.name: a for a in find_activations(to_graph(m))}
    assert downstream_layers(m, [acts["r1"]]) == ["w2a", "w3", "w2b"]
    assert downstream_layers(m, [acts["r2"]]) == ["w3"]  # no Add after r2
    # from r0 through the skip: add1, r1, add2, r2 are all non-layer nodes, so both Adds' other branches count
    assert downstream_layers(m, [acts["r0"]]) == ["w1a", "w2a", "w3", "w1b", "w2b"]


def _skip_model(p: np.ndarray, p_bias: np.ndarray, w: np.ndarray, b: np.ndarray,
                extra: bool = False) -> onnx.ModelProto:
    """y = Gemm_w(x) + Gemm_p(x) (``extra``: + Relu(Gemm_w(x)) too, a second addend that reads the layer)."""
    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
             helper.make_node("Gemm", ["x", "p", "pb"], ["s"], transB=1, name="skip")]
    if extra:
        nodes += [helper.make_node("Relu", ["h"], ["rh"], name="r"), helper.make_node("Add", ["h", "rh"], ["y"])]
    else:
        nodes.append(helper.make_node("Add", ["h", "s"], ["y"], name="add"))
    g = helper.make_graph(nodes, "skip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                          [init("w", w), init("b", b), init("p", p), init("pb", p_bias)])
    if extra:
        g.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 6]))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_residual_target_makes_up_for_a_changed_skip() -> None:
    """The current model's skip branch differs from the original's (P2, p2 instead of P, p): re-fitting fc to
    y_original - s_current recovers W + P - P2 and b + p - p2 exactly, so the sum matches the original in ORT."""
    rng = np.random.default_rng(3)
    w, p = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    b, pb = rng.standard_normal(6), rng.standard_normal(6)
    p2, pb2 = p + rng.standard_normal((6, 8)) * 0.3, pb + 0.5
    original, current = _skip_model(p, pb, w, b), _skip_model(p2, pb2, w, b)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    fit, check = CalibrationData("t", 200, {"x": x[:200]}), CalibrationData("t", 100, {"x": x[200:]})
    model, records = refit_layers(current, original, ["fc"], fit, check, ridge=1e-9)
    assert [(r.node, r.target, r.accepted) for r in records] == [("fc", "y", True)]
    assert records[0].error_after < 1e-5 < records[0].error_before
    assert records[0].note == "residual target: y of the original minus s of this model"
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    fc = next(n for n in model.graph.node if n.name == "fc")
    np.testing.assert_allclose(weights[fc.input[1]], w + p - p2, atol=1e-4)
    np.testing.assert_allclose(weights[fc.input[2]], b + pb - pb2, atol=1e-4)
    y0 = make_session(original).run(["y"], {"x": x[200:]})[0]
    np.testing.assert_allclose(make_session(model).run(["y"], {"x": x[200:]})[0], y0, atol=1e-4)


def test_residual_target_not_used_when_the_other_addend_reads_the_layer() -> None:
    """y = h + Relu(h): the other addend depends on fc itself, so fc keeps its own output h as target."""
    rng = np.random.default_rng(4)
    w, p = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    b, pb = rng.standard_normal(6), rng.standard_normal(6)
    original = _skip_model(p, pb, w, b, extra=True)
    current = _skip_model(p, pb, w * 1.1, b, extra=True)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    fit, check = CalibrationData("t", 200, {"x": x[:200]}), CalibrationData("t", 100, {"x": x[200:]})
    model, records = refit_layers(current, original, ["fc"], fit, check, ridge=1e-9)
    assert [(r.node, r.target, r.accepted) for r in records] == [("fc", "h", True)]
    np.testing.assert_allclose(make_session(model).run(["y"], {"x": x[200:]})[0],
                               make_session(original).run(["y"], {"x": x[200:]})[0], atol=1e-4)


def test_judge_measures_fidelity_and_max_error_in_one_run() -> None:
    """api asks for both figures of the same model (the exact check, the written file's verification): one run."""
    class Counting:
        def __init__(self) -> None:
            self.sessions = 0

        def session(self, model: onnx.ModelProto) -> object:
            self.sessions += 1
            return CPU.session(model)

    def matmul(scale: float) -> onnx.ModelProto:
        w = numpy_helper.from_array(np.eye(8, 10, dtype=np.float32) * scale, "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    judge = Judge(matmul(1.0), CalibrationData("t", 64, {"x": x}), None, 0.01, 16)
    counting = Counting()
    judge.execution = counting
    model = matmul(1.01)
    err = judge.max_relative_error(model)
    fid = judge(model)
    assert counting.sessions == 1 and judge.max_relative_error(model) == err
    assert err == pytest.approx(0.01 * np.abs(x).max() / max(1.0, np.abs(x).max()), rel=1e-5)
    assert fid.value == judge(model).value
    other = matmul(1.01)  # an equal model, another object: run again
    assert judge.max_relative_error(other) == err and counting.sessions == 2


def test_the_written_file_holding_the_measured_model_is_not_run_again(setup, monkeypatch) -> None:
    """Result.write reloads the file; when it holds the graph and weights measured on the held-out samples, those
    figures stand (no session); a file that differs is run."""
    r = optimize(setup["model"], setup["data"], tolerance=1.0, max_remove=1, strategy="entropy")
    sessions = []
    real = type(CPU).session
    monkeypatch.setattr(type(CPU), "session", lambda self, *a, **k: sessions.append(1) or real(self, *a, **k))
    figures = r.write(setup["dir"] / "out.onnx")
    assert figures["ok"] and not sessions and "measured on the held-out samples" in figures["note"]
    assert figures["value"] == r.report["fidelity"]["value"]


def deep_mlp(nonlinear: int = 3, layers: int = 6, hidden: int = 32) -> onnx.ModelProto:
    """x[N,16] -> ``layers`` x (Gemm -> Relu r<i>) -> Gemm 10. Every Relu is always ON (a large bias, removed by
    the next layer's bias) except r<``nonlinear``>, whose zero-mean pre-activations make it a real nonlinearity."""
    rng = np.random.default_rng(5)
    nodes, inits, t, width = [], [], "x", 16
    shift = 0.0
    for i in range(layers):
        w = rng.standard_normal((hidden, width)) / np.sqrt(width)
        bias = 8.0 if i != nonlinear else 0.0
        b = np.full(hidden, bias) - w.sum(1) * shift
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [t, f"w{i}", f"b{i}"], [f"h{i}"], transB=1, name=f"fc{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"r{i}")]
        t, width, shift = f"a{i}", hidden, bias
    w = rng.standard_normal((10, hidden)) / np.sqrt(hidden)
    inits += [numpy_helper.from_array(w.astype(np.float32), "wo"),
              numpy_helper.from_array((-w.sum(1) * shift).astype(np.float32), "bo")]
    nodes.append(helper.make_node("Gemm", [t, "wo", "bo"], ["y"], transB=1, name="out"))
    g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_galloping_accepts_what_one_by_one_accepts_in_fewer_trials(tmp_path: Path, monkeypatch) -> None:
    import onnx_easier.select as sel

    m = tmp_path / "deep.onnx"
    onnx.save(deep_mlp(), str(m))
    d = tmp_path / "calib.npz"
    np.savez(d, x=np.random.default_rng(3).standard_normal((400, 16)).astype(np.float32))
    fast = optimize(m, d, tolerance=0.002, strategy="entropy", try_all=True, metric="rel-l2")
    monkeypatch.setattr(sel, "MAX_CHUNK", 1)
    slow = optimize(m, d, tolerance=0.002, strategy="entropy", try_all=True, metric="rel-l2")
    lin = [{a["node"] for a in r.report["activations"] if a["action"] == "linearized"} for r in (fast, slow)]
    assert lin[0] == lin[1] == {f"r{i}" for i in range(6) if i != 3}
    trials = [r.report["search"]["entropy"]["trials"] for r in (fast, slow)]
    assert len(trials[1]) == 6 and all(len(t["activations"]) == 1 for t in trials[1])
    assert len(trials[0]) < len(trials[1])
    assert any("candidates tried together" in t.get("note", "") for t in trials[0])
    assert [t["activations"] for t in trials[0] if not t["accepted"]][-1] == ["r3"]
