"""Models over 2 GB (model_io: weights stay on disk, ORT and the checker read them by path, the output gets its own
data file). The fast tests lower ``EXTERNAL_LIMIT`` so the whole path runs on a small model; the slow one builds a
real 2.4 GB model and measures the peak memory of the CLI."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_easier import execution, model_io
from onnx_easier.cli import main
from onnx_easier.errors import UnsupportedModelError


def _external_mlp(folder: Path, width: int, layers: int, name: str = "mlp.onnx", scale: bool = True) -> Path:
    """``layers`` x (MatMul by a [width, width] weight -> Relu), the first MatMul followed by a per-channel Mul
    (which the exact fusions fold into its weight: a pass must read an external weight), saved with every weight in
    one external data file written with a memmap (the weights are never all in memory)."""
    path = folder / name
    data = folder / f"{name}.data"
    itemsize = 4
    step = width * width * itemsize
    mm = np.memmap(data, dtype=np.float32, mode="w+", shape=(layers, width, width))
    rng = np.random.default_rng(0)
    for k in range(layers):
        mm[k] = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
    mm.flush()
    del mm
    inits, nodes = [], []
    x = "x"
    for k in range(layers):
        t = onnx.TensorProto(name=f"W{k}", data_type=TensorProto.FLOAT, dims=[width, width])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(k * step)), ("length", str(step))):
            t.external_data.add(key=key, value=value)
        inits.append(t)
        nodes.append(helper.make_node("MatMul", [x, f"W{k}"], [f"m{k}"], name=f"mm{k}"))
        pre = f"m{k}"
        if k == 0 and scale:
            inits.append(onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, width, dtype=np.float32), "s0"))
            nodes.append(helper.make_node("Mul", [pre, "s0"], ["s0_out"], name="scale0"))
            pre = "s0_out"
        nodes.append(helper.make_node("Relu", [pre], [f"r{k}"], name=f"relu{k}"))
        x = f"r{k}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("tolerance", ["0", "0.01"])
def test_large_model_round_trip(tmp_path: Path, monkeypatch, tolerance: str) -> None:
    """Weights on disk all the way: exit 0, OUT and OUT.data written (the data under OUT's name), no temporary file
    left in either folder, the input and its data untouched, the output equal to the input's."""
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 4096)
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = _external_mlp(src_dir, 64, 3)
    before = {p.name: _digest(p) for p in src_dir.iterdir()}
    out, rep = out_dir / "o.onnx", out_dir / "r.json"
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    code = main([str(src), str(out), "--data", str(tmp_path / "d.npz"), "--tolerance", tolerance,
                 "--report", str(rep), "-q"])
    assert code == 0
    assert {p.name: _digest(p) for p in src_dir.iterdir()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx", "o.onnx.data", "r.json"]
    report = json.loads(rep.read_text())
    assert report["verification"]["ok"]
    assert report["after"]["nodes"] == report["before"]["nodes"] - 1  # the Mul folded into the first weight
    written = onnx.load(out, load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"o.onnx.data"}
    assert model_io.EXTERNAL_DIR_KEY not in {p.key for p in written.metadata_props}
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_allclose(_outputs(out, x[:8]), _outputs(src, x[:8]), rtol=1e-4, atol=1e-5)
    if tolerance != "0":
        assert any("over 2 GB" in w for w in report["warnings"])


def test_failed_check_leaves_no_data_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 4096)
    src = _external_mlp(tmp_path, 32, 2)
    model = model_io.load_model(src)
    assert model_io.external_dir(model) == str(tmp_path.resolve())

    def refuse(tmp: str) -> None:
        raise RuntimeError("verification failed")

    out = tmp_path / "o.onnx"
    with pytest.raises(RuntimeError):
        model_io.save_model(model, out, refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]


def test_tensor_bytes_counts_external_data(tmp_path: Path) -> None:
    src = _external_mlp(tmp_path, 16, 2, scale=False)
    model = onnx.load(src, load_external_data=False)
    assert model_io.tensor_bytes(model) == 2 * 16 * 16 * 4


def test_data_bytes_reads_no_data(tmp_path: Path) -> None:
    """Sizes from external lengths and dims: raw, external, typed-field, 4-bit and attribute tensors."""
    src = _external_mlp(tmp_path, 16, 2, scale=False)
    model = onnx.load(src, load_external_data=False)
    raw = onnx.numpy_helper.from_array(np.zeros((3, 5), np.float16), "h")
    typed = helper.make_tensor("f", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    packed = helper.make_tensor("q", TensorProto.INT4, [5], bytes(3), raw=True)
    assert [model_io.data_bytes(t) for t in (raw, packed)] == [30, 3]
    assert model_io.data_bytes(typed) == typed.ByteSize()
    model.graph.initializer.extend([raw, typed])
    const = helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.ones(8, np.int64)))
    model.graph.node.insert(0, const)
    weights = 2 * 16 * 16 * 4
    assert model_io.tensor_bytes(model) == weights + 30 + typed.ByteSize()
    assert model_io.inline_bytes(model) == 30 + typed.ByteSize() + 64


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.bool_])
def test_external_values_read_into_one_array(tmp_path: Path, monkeypatch, dtype: type) -> None:
    """A weight left on disk reads back (through graphsurgeon) equal to onnx's reader, writable, at its offset."""
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 64)
    values = (np.arange(48).reshape(6, 8) % 3).astype(dtype)
    x = helper.make_tensor_value_info("x", onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [6, 8])
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", x.type.tensor_type.elem_type, [6, 8])],
                          [onnx.numpy_helper.from_array(np.zeros(300, np.float32), "pad"),
                           onnx.numpy_helper.from_array(values, "w")])
    path = tmp_path / "v.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path, save_as_external_data=True,
              size_threshold=0)
    model = model_io.load_model(path)
    assert model_io.external_dir(model) is not None
    w = model_io.to_graph(model).tensors()["w"]
    got = w.values
    assert got.flags.writeable and got.dtype == values.dtype
    np.testing.assert_array_equal(got, values)


def test_in_memory_models_that_need_a_path(tmp_path: Path, monkeypatch) -> None:
    """A ModelProto with external references (no folder known) or over 2 GB in memory: one line saying to pass the
    path, not the checker's 'Failed to serialize proto'."""
    src = _external_mlp(tmp_path, 16, 2, scale=False)
    with pytest.raises(UnsupportedModelError, match="pass the model's path"):
        model_io.load_model(onnx.load(src, load_external_data=False))
    monkeypatch.setattr(model_io, "_TWO_GB", 1024)
    with pytest.raises(UnsupportedModelError, match="save_as_external_data=True"):
        model_io.load_model(onnx.load(src))


def test_external_constants_stay_on_disk(tmp_path: Path, monkeypatch) -> None:
    """``onnx.save(..., convert_attribute=True)`` puts Constant values in the data file too: they count in the size
    and become initializers that still refer to the data."""
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 4096)
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
                           helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])])
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path, save_as_external_data=True,
              convert_attribute=True, size_threshold=0)
    model = model_io.load_model(path)
    assert model_io.external_dir(model) is not None
    (t,) = model.graph.initializer
    assert t.name == "w" and t.data_location == TensorProto.EXTERNAL
    x = np.ones((2, 32), np.float32)
    np.testing.assert_allclose(model_io.make_session(model).run(None, {"x": x})[0], x @ w, rtol=1e-5)


def test_failed_check_keeps_the_previous_output(tmp_path: Path, monkeypatch) -> None:
    """The pair is checked under temporary names: a failure leaves an existing OUT and OUT.data as they were (the
    data file was published before the check, and removed on failure, before)."""
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 4096)
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    model = model_io.load_model(_external_mlp(src_dir, 32, 2))
    out = tmp_path / "o.onnx"
    seen: list[set[str]] = []

    def record(tmp: str) -> None:
        seen.append({e.value for t in onnx.load(tmp, load_external_data=False).graph.initializer
                     for e in t.external_data if e.key == "location"})

    model_io.save_model(model, out, record)
    assert seen[0] != {"o.onnx.data"} and len(seen[0]) == 1  # checked while it referred to its temporary data
    before = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()}

    def refuse(tmp: str) -> None:
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError):
        model_io.save_model(model, out, refuse)
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()} == before
    np.testing.assert_allclose(_outputs(out, np.ones((2, 32), np.float32)),
                               _outputs(src_dir / "mlp.onnx", np.ones((2, 32), np.float32)), rtol=1e-5)


def test_output_never_replaces_the_inputs_data(tmp_path: Path, monkeypatch) -> None:
    """OUT whose data file would be the input's data file: refused (exit 2, nothing changed), unless OUT is the
    input itself (--overwrite), which replaces the pair after the check."""
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 4096)
    src = _external_mlp(tmp_path, 32, 2, name="w.onnx")
    other = tmp_path / "a.onnx"
    other.write_bytes(src.read_bytes())  # a.onnx reads w.onnx.data; OUT=w.onnx would rewrite it
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    before["d.npz"] = _digest(tmp_path / "d.npz")
    src.unlink()
    assert main([str(other), str(src), "--data", str(tmp_path / "d.npz"), "--tolerance", "0", "-q"]) == 2
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == {k: v for k, v in before.items() if k != "w.onnx"}
    src.write_bytes(other.read_bytes())
    expected = _outputs(src, x[:4])
    assert main([str(src), str(src), "--data", str(tmp_path / "d.npz"), "--tolerance", "0", "--overwrite",
                 "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "d.npz", "w.onnx", "w.onnx.data"]
    np.testing.assert_allclose(_outputs(src, x[:4]), expected, rtol=1e-4, atol=1e-5)


def test_paper_mode_one_session_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """``--remove 0`` on a model whose weights stay on disk: exit 0, and the final comparison never holds two ORT
    sessions (each would map the weights once more)."""
    monkeypatch.setattr(model_io, "EXTERNAL_LIMIT", 4096)
    src = _external_mlp(tmp_path, 32, 2)
    live: list[weakref.ref] = []
    most = [0]
    real = execution.make_session

    def counted(model, **kw):
        session = real(model, **kw)
        live.append(weakref.ref(session))
        most[0] = max(most[0], sum(r() is not None for r in live))
        return session

    monkeypatch.setattr(execution, "make_session", counted)
    assert main([str(src), str(tmp_path / "o.onnx"), "--remove", "0", "-q"]) == 0
    assert most[0] == 1
    assert (tmp_path / "o.onnx.data").exists()


def _external_linear_mlp(folder: Path, width: int, layers: int) -> Path:
    """What a torch MLP of ``layers`` x Linear(width, width) with ReLU between exports to: Gemm(transB=1) with its
    bias, every tensor in one external data file, written layer by layer through a memmap (never all in memory)."""
    path, data = folder / "mlp.onnx", folder / "mlp.onnx.data"
    w_bytes, b_bytes = width * width * 4, width * 4
    mm = np.memmap(data, dtype=np.uint8, mode="w+", shape=(layers * (w_bytes + b_bytes),))
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "input"
    for k in range(layers):
        offset = k * (w_bytes + b_bytes)
        w = mm[offset:offset + w_bytes].view(np.float32).reshape(width, width)
        for row in range(0, width, 1024):  # a block at a time: no full-size temporary
            w[row:row + 1024] = rng.standard_normal((min(1024, width - row), width), dtype=np.float32)
            w[row:row + 1024] *= np.float32(1.5 / np.sqrt(width))
        mm[offset + w_bytes:offset + w_bytes + b_bytes].view(np.float32)[:] = 0.01 * np.arange(width) / width
        for name, dims, at, length in ((f"fc{k}.weight", [width, width], offset, w_bytes),
                                       (f"fc{k}.bias", [width], offset + w_bytes, b_bytes)):
            t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(at)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
        nodes.append(helper.make_node("Gemm", [x, f"fc{k}.weight", f"fc{k}.bias"], [f"fc{k}"], name=f"/fc{k}/Gemm",
                                      transB=1))
        x = f"fc{k}"
        if k < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"relu{k}"], name=f"/relu{k}/Relu"))
            x = f"relu{k}"
    mm.flush()
    del mm
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])], inits)
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.fixture(scope="module")
def mlp_2_4_gb(tmp_path_factory) -> tuple[Path, np.ndarray, str]:
    folder = tmp_path_factory.mktemp("big")
    src = _external_linear_mlp(folder, 8192, 9)
    x = np.random.default_rng(1).standard_normal((64, 8192)).astype(np.float32)
    np.savez(folder / "d.npz", input=x)
    return src, x, _digest(folder / "mlp.onnx.data")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--tolerance", "0"], []], ids=["exact", "default"])
def test_real_2_4_gb_model(mlp_2_4_gb: tuple[Path, np.ndarray, str], tmp_path: Path, mode: list[str]) -> None:
    """9 Linear 8192x8192 layers with ReLU between (2.25 GiB of float32 weights) through the CLI in a child
    process, in both modes: exit 0, OUT and OUT.data written, the input's data untouched, the output equal to the
    input's, and the child's peak RSS (RUSAGE_CHILDREN of a wrapper that runs only it) under 2x the weights."""
    src, x, digest = mlp_2_4_gb
    weights = 9 * (8192 * 8192 + 8192) * 4
    out = tmp_path / "o.onnx"
    cli = [sys.executable, "-c", "import sys; from onnx_easier.cli import main; sys.exit(main())", str(src),
           str(out), "--data", str(src.parent / "d.npz"), *mode, "--report", str(tmp_path / "r.json"), "-q"]
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *cli], capture_output=True, text=True, timeout=900,
                          check=False)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split("maxrss_kb")[1].split()[0]) * 1024
    print(f"{' '.join(mode) or 'default'}: {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB = "
          f"{peak / weights:.2f}x the weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "o.onnx.data", "r.json"]
    assert (tmp_path / "o.onnx.data").stat().st_size >= weights
    report = json.loads((tmp_path / "r.json").read_text())
    # nothing fuses in Gemm -> Relu -> Gemm: the pair read back is compared with the input by content, not run
    assert report["verification"]["ok"] and report["verification"]["metric"] == "identical"
    assert any("over 2 GB" in w for w in report["warnings"])
    assert _digest(src.parent / "mlp.onnx.data") == digest
    so = ort.SessionOptions()
    so.log_severity_level = 3
    expected = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"input": x[:4]})[0]
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"input": x[:4]})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))
    assert peak < 2 * weights, f"peak RSS {peak / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of weights"
