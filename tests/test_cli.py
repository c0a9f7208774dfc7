"""The command line as a user meets it: exit codes, one-line errors, nothing written on failure, the report."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.cli import main
from onnx_easier.model_io import make_session


def small_model(opset: int = 17) -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv 3->8 -> Relu -> Conv 1x1 8->8 -> Clip(0,6) -> Flatten -> Gemm 288->5 -> y."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
        helper.make_node("Conv", ["ra", "w2", "b2"], ["b"], name="conv2"),
        helper.make_node("Clip", ["b", "lo", "hi"], ["rb"], name="relu6"),
        helper.make_node("Flatten", ["rb"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1, name="fc"),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 1, 1), init("b2", 8), init("wg", 5, 288),
             init("bg", 5), numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    m = tmp_path / "m.onnx"
    onnx.save(small_model(), str(m))
    d = tmp_path / "calib.npz"
    np.savez(d, x=np.random.default_rng(1).standard_normal((40, 3, 6, 6)).astype(np.float32))
    return {"model": m, "data": d, "dir": tmp_path}


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_analysis_prints_table_and_writes_report(files, capsys) -> None:
    rep = files["dir"] / "r.json"
    code, out, err = run_cli([files["model"], "--data", files["data"], "--report", rep], capsys)
    assert code == 0, err
    assert "relu1" in out and "relu6" in out
    r = json.loads(rep.read_text())
    assert r["data"] == {"source": str(files["data"]), "samples": 40, "synthetic": False}
    assert [a["node"] for a in r["activations"]] == ["relu1", "relu6"]
    for a in r["activations"]:
        assert set(a) >= {"node", "op", "tensor", "channels", "entropy", "action"}
        assert a["channels"] == 8 and a["action"] == "kept" and 0.0 <= a["entropy"] <= 1.0
    assert r["activations"][0]["tensor"] == "a" and r["activations"][1]["op"] == "Clip"
    b = r["before"]
    assert (b["nodes"], b["compute_nodes"], b["activations"], b["depth"]) == (6, 3, 2, 3)
    assert b["params"] == 8 * 27 + 8 + 64 + 8 + 5 * 288 + 5 + 2
    assert b["macs"] == 8 * 36 * 27 + 8 * 36 * 8 + 5 * 288


def test_random_data_warns(files, capsys) -> None:
    code, _, err = run_cli([files["model"], "--input-shape", "x:1,3,6,6", "--samples", "8"], capsys)
    assert code == 0
    assert "random" in err.lower()


def test_remove_zero_is_exact_and_remove_all_fuses(files, capsys) -> None:
    out0 = files["dir"] / "o0.onnx"
    code, _, err = run_cli([files["model"], out0, "--data", files["data"], "--remove", "0"], capsys)
    assert code == 0, err
    x = np.load(files["data"])["x"][:4]
    ya = make_session(onnx.load(str(files["model"]))).run(None, {"x": x})[0]
    yb = make_session(onnx.load(str(out0))).run(None, {"x": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-5)

    out2 = files["dir"] / "o2.onnx"
    rep = files["dir"] / "r2.json"
    code, _, err = run_cli([files["model"], out2, "--data", files["data"], "--remove", "2", "--linearize",
                            "identity", "--report", rep], capsys)
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert [a["action"] for a in r["activations"]] == ["linearized", "linearized"]
    assert r["after"]["activations"] == 0
    assert r["after"]["compute_nodes"] < r["before"]["compute_nodes"]
    onnx.checker.check_model(onnx.load(str(out2)), full_check=True)


BAD_DATA = {
    "missing name": {"z": np.zeros((4, 3, 6, 6), np.float32)},
    "extra name": {"x": np.zeros((4, 3, 6, 6), np.float32), "extra": np.zeros((4, 2), np.float32)},
    "wrong rank": {"x": np.zeros((4, 3, 6), np.float32)},
    "wrong dtype": {"x": np.zeros((4, 3, 6, 6), np.int32)},
    "nan": {"x": np.full((4, 3, 6, 6), np.nan, np.float32)},
    "inf": {"x": np.full((4, 3, 6, 6), np.inf, np.float32)},
    "zero samples": {"x": np.zeros((0, 3, 6, 6), np.float32)},
    "wrong fixed dim": {"x": np.zeros((4, 3, 7, 6), np.float32)},
}


def _assert_refused(code: int, err: str, folder: Path, before: dict[str, str], *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0 or len(err.strip().splitlines()) <= 2  # one line (rich may soft-wrap)
    for w in words:
        assert w.lower() in err.lower(), err
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused(files, capsys, case: str) -> None:
    bad = files["dir"] / "bad.npz"
    np.savez(bad, **BAD_DATA[case])
    before = snapshot(files["dir"])
    code, _, err = run_cli([files["model"], files["dir"] / "out.onnx", "--data", bad], capsys)
    _assert_refused(code, err, files["dir"], before)


def test_corrupt_npz_and_missing_data(files, capsys) -> None:
    bad = files["dir"] / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    before = snapshot(files["dir"])
    code, _, err = run_cli([files["model"], files["dir"] / "out.onnx", "--data", bad], capsys)
    _assert_refused(code, err, files["dir"], before)
    code, _, err = run_cli([files["model"], files["dir"] / "out.onnx", "--data", files["dir"] / "nope.npz"], capsys)
    _assert_refused(code, err, files["dir"], before)


def test_mismatched_sample_counts(tmp_path: Path, capsys) -> None:
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "two",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(m))
    d = tmp_path / "d.npz"
    np.savez(d, a=np.zeros((4, 3), np.float32), b=np.zeros((5, 3), np.float32))
    before = snapshot(tmp_path)
    code, _, err = run_cli([m, tmp_path / "o.onnx", "--data", d], capsys)
    _assert_refused(code, err, tmp_path, before)


def _write_bad_models(folder: Path) -> dict[str, Path]:
    out = {}
    (folder / "empty.onnx").write_bytes(b"")
    out["empty file"] = folder / "empty.onnx"
    (folder / "text.onnx").write_text("this is not a model\n")
    out["text file"] = folder / "text.onnx"
    full = small_model().SerializeToString()
    (folder / "trunc.onnx").write_bytes(full[: len(full) // 2])
    out["truncated"] = folder / "trunc.onnx"
    bad = small_model()
    bad.graph.node[0].input[1] = "no_such_weight"
    (folder / "checker.onnx").write_bytes(bad.SerializeToString())
    out["fails checker"] = folder / "checker.onnx"
    (folder / "opset9.onnx").write_bytes(small_model(opset=9).SerializeToString())
    out["old opset"] = folder / "opset9.onnx"
    custom = small_model()
    custom.graph.node[1].op_type = "MyRelu"
    custom.graph.node[1].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    (folder / "custom.onnx").write_bytes(custom.SerializeToString())
    out["custom op"] = folder / "custom.onnx"
    out["directory"] = folder / "adir"
    out["directory"].mkdir()
    out["missing"] = folder / "missing.onnx"
    return out


@pytest.mark.parametrize("case", ["empty file", "text file", "truncated", "fails checker", "old opset",
                                  "custom op", "directory", "missing"])
def test_bad_model_is_refused(tmp_path: Path, capsys, case: str) -> None:
    models = _write_bad_models(tmp_path)
    d = tmp_path / "calib.npz"
    np.savez(d, x=np.zeros((4, 3, 6, 6), np.float32))
    before = snapshot(tmp_path)
    code, _, err = run_cli([models[case], tmp_path / "out.onnx", "--data", d], capsys)
    _assert_refused(code, err, tmp_path, before)


def test_output_paths(files, capsys) -> None:
    before = snapshot(files["dir"])
    code, _, err = run_cli([files["model"], files["model"], "--data", files["data"]], capsys)
    _assert_refused(code, err, files["dir"], before, "--overwrite")
    code, _, err = run_cli([files["model"], files["dir"] / "no" / "out.onnx", "--data", files["data"]], capsys)
    _assert_refused(code, err, files["dir"], before, "does not exist")
    code, _, err = run_cli([files["model"], files["model"], "--data", files["data"], "--overwrite"], capsys)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(files["model"])))
    assert not [p for p in files["dir"].iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(files, capsys) -> None:
    ro = files["dir"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run_cli([files["model"], ro / "out.onnx", "--data", files["data"]], capsys)
        assert code == 2 and "not writable" in err
    finally:
        ro.chmod(0o755)


def test_read_only_output_folder_as_root_too(files, capsys, monkeypatch) -> None:
    """root may write anywhere, so the permission is simulated: the CLI must ask os.access before any work."""
    from onnx_easier import cli

    ro = files["dir"] / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    before = snapshot(files["dir"])
    code, _, err = run_cli([files["model"], ro / "out.onnx", "--data", files["data"]], capsys)
    _assert_refused(code, err, files["dir"], before, "not writable")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("spec", ["x", "x:", "x:1,a,3", ":1,2", "x:1,-3,6,6"])
def test_malformed_input_shape(files, capsys, spec: str) -> None:
    before = snapshot(files["dir"])
    code, _, err = run_cli([files["model"], "--input-shape", spec], capsys)
    _assert_refused(code, err, files["dir"], before)


def test_input_file_never_modified(files, capsys) -> None:
    h = hashlib.sha256(files["model"].read_bytes()).hexdigest()
    code, _, err = run_cli([files["model"], files["dir"] / "o.onnx", "--data", files["data"], "--remove", "2"],
                           capsys)
    assert code == 0, err
    assert hashlib.sha256(files["model"].read_bytes()).hexdigest() == h


def test_help_lists_every_exit_code(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 ok", "2 bad input", "1 internal failure", "130 interrupted"):
        assert code in text


def test_report_gives_seconds_per_phase_and_steps_are_counted(files, capsys) -> None:
    """The report's phases add up to its seconds (the written file's verification included); ``on_step`` hears
    each phase start and each search trial with trials done / planned (planned never below done)."""
    from onnx_easier.api import optimize

    steps: list[tuple[str, int, int, str]] = []
    result = optimize(files["model"], files["data"], strategy="entropy", on_step=lambda *a: steps.append(a))
    result.write(files["dir"] / "out.onnx")
    phases, total = result.report["phases"], result.report["seconds"]
    assert {"calibration", "exact_fusion", "search", "latency", "verification", "write"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(total, abs=0.01)
    started = [p for p, done, planned, _ in steps if done == planned == 0]
    assert started[:3] == ["calibration", "exact_fusion", "search"] and "latency" in started
    trials = [(done, planned) for p, done, planned, _ in steps if p == "search entropy" and done]
    assert [d for d, _ in trials] == list(range(1, result.report["trials"] + 1))
    assert all(0 < d <= p for d, p in trials) and trials[-1][0] == trials[-1][1]  # the plan ends where it stops
    first_plan = next(p for ph, d, p, _ in steps if ph == "search entropy" and d == 0)
    assert trials[0][1] <= first_plan <= len(result.report["activations"])  # at most one candidate per activation


def test_step_display_shows_phase_count_and_time_left() -> None:
    """On a terminal: the phase, trials done / planned, an estimate of the time left; messages as lines."""
    import io

    from rich.console import Console

    from onnx_easier.cli import StepDisplay

    out = io.StringIO()
    display = StepDisplay(Console(file=out, force_terminal=True, width=100))
    display("calibration", 0, 0, "")
    display("search entropy", 0, 4, "entropy search: 4 candidates")
    display._t0 -= 30.0  # as if the first trial took 30 s
    display("search entropy", 1, 4, "entropy trial 1: relu1: loss 0.0010 kept")
    assert display.finish(1, 4, display._t0 + 30.0) == pytest.approx(display._t0 + 120.0)
    display._progress.refresh()
    display.close()
    text = out.getvalue()
    assert "entropy trial 1: relu1" in text and "search entropy" in text and "1/4" in text
    assert "~1m30s left" in text or "~1m29s left" in text
    limited = StepDisplay(Console(file=io.StringIO()), deadline=100.0)
    limited._t0 = 0.0
    assert limited.finish(1, 20, 10.0) == pytest.approx(110.0)  # at most one trial after the time limit


def test_no_progress_when_not_a_terminal(files, capsys) -> None:
    """stderr not a terminal (a log file, CI; here pytest's capture): no progress lines or bars, only what a warning
    or error says."""
    import sys

    assert not sys.stderr.isatty()
    out = files["dir"] / "o.onnx"
    code, stdout, stderr = run_cli([files["model"], out, "--data", files["data"], "--max-remove", "1", "--strategy",
                                    "entropy"], capsys)
    assert code == 0, stderr
    for line in ("entropy trial 1:", "entropy search:", "measuring latency of", "reload and verify", " left",
                 "calibrating", "\x1b["):  # what the display prints on a terminal
        assert line not in stderr, stderr
    assert "trials" in stdout  # the summary (stdout) still says how many trials ran


def test_identical_models_are_timed_once(files, monkeypatch) -> None:
    """The exact fusions of a model they do not change are the input's graph: latency times it once, and the
    report gives both the same figures."""
    from onnx_easier import api

    timed: list[list[str]] = []
    real = api.measure_latency
    monkeypatch.setattr(api, "measure_latency", lambda models, *a, **k: timed.append(list(models)) or real(models, *a, **k))
    r = api.optimize(files["model"], files["data"], max_remove=0, tolerance=0.5)
    assert r.report["passes"] and not any(p["changed"] for p in r.report["passes"])
    assert timed == [] and r.report["latency_ms"]["after"] is None  # max_remove 0 and nothing fuses: no timing
    r = api.optimize(files["model"], files["data"], tolerance=0.5, strategy="entropy", max_remove=1)
    assert timed and "exact" not in timed[-1] and "original" in timed[-1]
    lat = r.report["latency_ms"]["candidates"]
    assert lat["exact"] == lat["original"]


def test_exact_mode_on_a_graph_no_pass_changes_runs_nothing_more(files, monkeypatch, capsys) -> None:
    """``--tolerance 0`` where nothing fuses (conv -> relu -> conv -> clip -> flatten -> gemm): after calibration
    only the cheap checks; no held-out comparison, no latency, and the file read back is compared with the input."""
    from onnx_easier import api

    def refuse(*args, **kwargs):
        raise AssertionError("not needed when no pass changed the graph")

    monkeypatch.setattr(api, "Judge", refuse)
    monkeypatch.setattr(api, "measure_latency", refuse)
    monkeypatch.setattr(api, "check_data", refuse)
    out, rep = files["dir"] / "o.onnx", files["dir"] / "r.json"
    assert main([str(files["model"]), str(out), "--data", str(files["data"]), "--tolerance", "0", "--report",
                 str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["verification"]["ok"] and report["verification"]["metric"] == "identical"
    assert report["latency_ms"]["before"] is None and "no change" in report["latency_ms"]["note"]
    assert "no change" in report["exactness"]["note"] and report["after"] == report["before"]
    assert report["warnings"] == []  # nothing to warn about: the input is written as it is
    written, original = onnx.load(str(out)), onnx.load(str(files["model"]))
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    x = np.load(files["data"])["x"][:4]
    np.testing.assert_array_equal(make_session(written).run(None, {"x": x})[0],
                                  make_session(original).run(None, {"x": x})[0])
    assert "exact fusions: not measured: no change" in capsys.readouterr().out
