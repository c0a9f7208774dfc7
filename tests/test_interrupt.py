"""Ctrl-C while the tool works: ``python -m onnx_easier.cli`` as a subprocess, SIGINT in each phase of the work.

Whatever the phase, the tool must stop with a non-zero exit code (130), say so in one line without a traceback, and
leave the output folder as it was: no OUT, no report, no temporary files.

The phases are found with ``-v``: the signal goes right after the log line that ends a phase (so it lands in the
next one); one more run uses ``-q`` and a fixed delay, where stderr must be exactly the one line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_odd_graphs import Builder

# With -v the tool logs these lines (in this order) as phases end; SIGINT right after one lands in the next phase.
PHASES = {
    "calibration": "found",  # activations found: calibration (ORT runs, worker thread) starts
    "linearize and fusion": "calibrated",
    "verification and save": "fusion:",
}
TIMEOUT = 60


def slow_model() -> onnx.ModelProto:
    """Eight conv-bn-relu layers of 24 channels on 48x48: a few seconds of calibration on 192 samples."""
    b = Builder()
    h, c = b.input("x", ["N", 3, 48, 48]), 3
    for _ in range(8):
        h = b.node("Relu", b.bn(b.conv(h, c, 24, pads=[1] * 4), 24))
        c = 24
    b.conv(h, 24, 4, k=1, out="y")
    b.output("y", ["N", 4, 48, 48])
    return b.model()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    model, data = folder / "m.onnx", folder / "calib.npz"
    onnx.save(slow_model(), str(model))
    np.savez(data, x=np.random.default_rng(0).standard_normal((192, 3, 48, 48)).astype(np.float32))
    return model, data


def start(model: Path, data: Path, out_dir: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "onnx_easier.cli", str(model), str(out_dir / "out.onnx"), "--data", str(data),
           "--report", str(out_dir / "report.json"), "--remove", "4", "--linearize", "identity", *flags]
    env = dict(os.environ, COLUMNS="200")  # rich wraps at the terminal width: keep log lines whole
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_cpu(proc: subprocess.Popen, seconds: float, limit: float = 60.0) -> None:
    """Wait until ``proc`` has used ``seconds`` of CPU time (Linux /proc; elsewhere: that much wall time)."""
    stat = Path(f"/proc/{proc.pid}/stat")
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < limit:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            time.sleep(seconds)
            return
        if (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") >= seconds:
            return
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the tool did not stop within {TIMEOUT}s of SIGINT (a thread kept it alive?)")
    return proc.returncode, err


SWALLOWED = ("the KeyboardInterrupt was raised inside a finalizer or weakref callback, where Python prints "
             "'Exception ignored' and drops it: the tool went on and wrote OUT (see test_sigint_in_a_finalizer)")


def assert_clean_stop(code: int, err: str, out_dir: Path) -> None:
    assert "Exception ignored" not in err, SWALLOWED
    assert code == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("onnx-easier: interrupted"), err
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no output, no report, no temporaries


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigint_in_each_phase(tmp_path: Path, inputs: tuple[Path, Path], phase: str) -> None:
    model, data = inputs
    proc = start(model, data, tmp_path, "-v")
    seen: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:  # read the log until the phase marker, then interrupt
        seen.append(line)
        if PHASES[phase] in line:
            break
    else:
        pytest.fail(f"the run ended before the {PHASES[phase]!r} log line: {''.join(seen)[-2000:]}")
    assert proc.poll() is None, "the tool finished before SIGINT: make slow_model slower"
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert_clean_stop(code, "".join(seen) + err, tmp_path)


def test_sigint_quiet_is_one_line(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    model, data = inputs
    proc = start(model, data, tmp_path, "-q")
    wait_for_cpu(proc, 1.0)  # past start-up (imports, handler installed) even on a loaded machine
    if proc.poll() is not None:
        pytest.fail(f"the tool finished before SIGINT (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert_clean_stop(code, err, tmp_path)
    assert len(err.strip().splitlines()) == 1, err


def test_uninterrupted_run_writes_both_files(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """The control: the same command, left alone, succeeds and writes exactly OUT and the report (so the empty
    folders above are the interrupt's doing)."""
    model, data = inputs
    code, err = finish(start(model, data, tmp_path, "-q"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "report.json"]


FINALIZER_SCRIPT = """
import os, signal, sys
import onnx
from onnx_easier.cli import main

class Finalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while a finalizer runs
        for _ in range(100):
            pass

real, calls = onnx.checker.check_model, []

def check(*args, **kwargs):
    if not calls:
        Finalizer()  # dropped at once: __del__ runs here, on the first check of the input model
    calls.append(1)
    return real(*args, **kwargs)

onnx.checker.check_model = check
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_in_a_finalizer(tmp_path: Path) -> None:
    """Deterministic form of the race: the signal is delivered while a __del__ runs."""
    model = tmp_path / "in" / "m.onnx"
    model.parent.mkdir()
    onnx.save(slow_model(), str(model))
    data = model.parent / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 48, 48)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-c", FINALIZER_SCRIPT, str(model), str(out / "out.onnx"), "--data", str(data),
           "--remove", "1", "--linearize", "identity", "-q"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 130, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []
