"""``--provider``: one place (execution.py) turns it into ORT providers, and it reaches every session of a run.

No GPU here: CUDA is simulated by an ``ort.InferenceSession`` that records the providers it is asked for, runs on
CPU, and reports the providers asked for as the ones it uses (or only CPU, to simulate a CUDA that fails to load).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_select import mlp

from onnx_easier import analyze, latency, optimize
from onnx_easier.cli import main
from onnx_easier.errors import BadArgumentError
from onnx_easier.execution import CPU, WORK_OPTIONS, Execution, resolve

_SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_check)  # its session_caller: which module asked for a session

CUDA = "CUDAExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
WORK = {"calibrate", "select", "reconstruct", "api", "execution", "tensor_cache"}  # sessions on the run's provider
GUARDS = {"safety", "shapes"}  # sessions that stay on CPU (exactness of rewrites)


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    m, d = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(mlp(bias1=8.0, hidden=32), str(m))  # r1 always ON: linearized, fc1 and fc2 merge
    np.savez(d, x=np.random.default_rng(1).standard_normal((160, 16)).astype(np.float32))
    return {"model": m, "data": d, "dir": tmp_path}


def _name(p: str | tuple) -> str:
    return p if isinstance(p, str) else p[0]


@pytest.fixture()
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list]]:
    """Every ORT session made from now on, as (calling module, providers asked for); CUDA is 'available' and
    'starts' (the session runs on CPU and says it runs on what was asked)."""
    made: list[tuple[str, list]] = []
    real = ort.InferenceSession

    class Recorded(real):
        def __init__(self, src, sess_options=None, providers=None, **kw) -> None:
            asked = list(providers or ["CPUExecutionProvider"])
            made.append((gpu_check.session_caller(), asked))
            self._asked = [_name(p) for p in asked]
            super().__init__(src, sess_options, providers=["CPUExecutionProvider"], **kw)

        def get_providers(self) -> list[str]:
            return self._asked

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    real_runner = latency._runner  # CUDA IO binding needs a GPU: time the simulated sessions as CPU ones
    monkeypatch.setattr(latency, "_runner", lambda sess, feeds, label, provider, *a, **k:
                        real_runner(sess, feeds, label, "cpu", *a, **k))
    return made


def test_providers_per_kind_of_session() -> None:
    assert CPU.providers() == ["CPUExecutionProvider"] == CPU.providers(timed=True)
    cuda = Execution("cuda")
    assert cuda.providers() == [(CUDA, WORK_OPTIONS["cuda"]), "CPUExecutionProvider"]
    assert WORK_OPTIONS["cuda"]["use_tf32"] == "0"  # exactness is checked against float32, not TF32
    assert cuda.providers(timed=True) == [(CUDA, {}), "CPUExecutionProvider"]  # latency: ORT's defaults
    assert resolve("cpu") == CPU


def test_unknown_provider_is_a_bad_argument() -> None:
    with pytest.raises(BadArgumentError, match="--provider must be one of cpu, cuda"):
        resolve("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available")
def test_cuda_missing_is_one_line() -> None:
    with pytest.raises(BadArgumentError, match="no CUDAExecutionProvider; install onnxruntime-gpu") as info:
        resolve("cuda")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available")
@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_listed_but_failing_to_load_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime-gpu without the CUDA / cuDNN libraries: ORT lists the provider, then falls back to CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    with pytest.raises(BadArgumentError, match="could not start CUDAExecutionProvider") as info:
        resolve("cuda")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available")
@pytest.mark.parametrize("with_output", [True, False])
def test_cli_cuda_without_cuda_exits_2_with_one_line(files, capsys, with_output: bool) -> None:
    out = files["dir"] / "out.onnx"
    argv = [str(files["model"]), *([str(out)] if with_output else []), "--data", str(files["data"]),
            "--provider", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnx-easier: error: --provider cuda:") and "\n" not in err
    assert not out.exists()


def test_cuda_reaches_every_session(files, sessions) -> None:
    r = optimize(files["model"], files["data"], tolerance=0.05, provider="cuda", seed=0)
    assert r.report["latency_ms"]["provider"] == "cuda"
    assert r.report["trials"] >= 1
    by_module: dict[str, list[list]] = {}
    for module, asked in sessions:
        by_module.setdefault(module, []).append(asked)
    # calibration, fidelity (Judge) and re-fit collection (through tensor_cache.CachedRun), latency made sessions
    assert {"calibrate", "tensor_cache", "latency"} <= set(by_module), sorted(by_module)
    for module, asked in sessions:
        if module in WORK:
            assert asked == [(CUDA, WORK_OPTIONS["cuda"]), "CPUExecutionProvider"], module
        elif module == "latency":
            assert asked == [(CUDA, {}), "CPUExecutionProvider"], module
        else:
            assert module in GUARDS and asked == ["CPUExecutionProvider"], module


def test_cuda_reaches_paper_mode_and_analysis(files, sessions) -> None:
    optimize(files["model"], files["data"], remove=1, provider="cuda")
    analyze(files["model"], files["data"], provider="cuda")
    assert {"calibrate", "api"} <= {m for m, _ in sessions}
    assert all(_name(a[0]) == CUDA for m, a in sessions if m in WORK | {"latency"})


def test_cpu_sessions_are_cpu_only(files, sessions) -> None:
    r = optimize(files["model"], files["data"], tolerance=0.05, provider="cpu", seed=0)
    assert r.report["latency_ms"]["provider"] == "cpu"
    assert {"calibrate", "tensor_cache", "latency"} <= {m for m, _ in sessions}
    assert all(asked == ["CPUExecutionProvider"] for _, asked in sessions)


def test_cuda_failing_mid_run_is_a_bad_argument(files, monkeypatch: pytest.MonkeyPatch, sessions) -> None:
    # a session that falls back to CPU after the up-front check (e.g. a model whose CUDA session cannot start)
    def fallback(self) -> list[str]:
        return ["CPUExecutionProvider"]

    resolve("cuda")  # the probe passes
    monkeypatch.setattr(ort.InferenceSession, "get_providers", fallback)
    with pytest.raises(BadArgumentError, match="could not start CUDAExecutionProvider"):
        Execution("cuda").session(mlp(bias1=8.0))
