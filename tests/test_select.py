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
from onnx_easier.model_io import make_session
from onnx_easier.reconstruct import refit_layers
from onnx_easier.select import _adjacent, linearize_and_fuse, split_data


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
    assert r.report["fidelity"]["samples"] == 100
    assert r.report["latency_ms"]["batch"] == 1
    x = np.load(setup["data"])["x"][:50]
    ya = make_session(onnx.load(str(setup["model"]))).run(None, {"x": x})[0]
    yb = make_session(r.model).run(None, {"x": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4)  # r1 is exactly linear on this data


def test_tolerance_zero_writes_only_exact_fusions(setup) -> None:
    r = optimize(setup["model"], setup["data"], tolerance=0.0)
    assert all(a["action"] == "kept" for a in r.report["activations"])
    assert r.report["trials"] == 0
    assert r.report["after"]["macs"] <= r.report["before"]["macs"]
    assert r.report["latency_ms"]["after"] <= r.report["latency_ms"]["before"] * 1.03


def test_max_remove_caps_the_count(setup) -> None:
    r = optimize(setup["model"], setup["data"], tolerance=1.0, max_remove=1, strategy="entropy")
    assert sum(a["action"] == "linearized" for a in r.report["activations"]) <= 1


def test_split_is_disjoint() -> None:
    data = CalibrationData("t", 100, {"x": np.arange(100, dtype=np.float32)[:, None]})
    fit, check, hold = split_data(data)
    seen = [set(d.arrays["x"][:, 0].tolist()) for d in (fit, check, hold)]
    assert (fit.samples, check.samples, hold.samples) == (60, 15, 25)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_adjacent_runs_follow_the_chain() -> None:
    from onnx_easier.activations import find_activations, infer_shapes
    from onnx_easier.model_io import to_graph

    m = infer_shapes(mlp(1.0))
    acts = find_activations(to_graph(m))
    runs = _adjacent(m, acts)
    assert [[a.name for a in run] for run in runs] == [["r1", "r2"]]


def test_refit_recovers_what_linearization_lost(setup) -> None:
    """Linearize r2 (a real nonlinearity) by identity; re-fitting fc3 to the original output lowers the error."""
    from onnx_easier.activations import find_activations, infer_shapes
    from onnx_easier.model_io import to_graph

    original = infer_shapes(mlp(bias1=8.0, hidden=256))
    acts = {a.name: a for a in find_activations(to_graph(original))}
    built = linearize_and_fuse(original, [acts["r2"]], "identity", None)
    x = np.random.default_rng(5).standard_normal((600, 16)).astype(np.float32)
    fit = CalibrationData("t", 500, {"x": x[:500]})
    check = CalibrationData("t", 100, {"x": x[500:]})
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
