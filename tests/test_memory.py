"""memory.release: cycles collected and, on glibc, the heap's free memory returned."""
from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from onnx_easier import memory
from onnx_easier.memory import _trim, release


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_blocks_go_back_to_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "RESIDENT_FLOOR", 0)
    assert _trim() is not None
    # blocks just under glibc's raised mmap threshold come from the heap; freed, they stay resident until trimmed
    big = np.empty(16 * 2**20, np.uint8)  # freeing a 16 MB mmap'ed block raises the threshold to 16 MB
    big[:] = 1
    del big
    blocks = [np.ones(2**20 // 8) for _ in range(300)]  # 300 x 1 MB from the heap
    blocks = blocks[-1:]  # the last one keeps the heap's top from shrinking by itself
    before = _rss_mb()
    release()
    assert _rss_mb() < before - 100
    del blocks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_small_process_is_not_collected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under RESIDENT_FLOOR there is nothing worth giving back: no collection (each one costs ~12 ms)."""
    calls: list[int] = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: calls.append(1) or 0)
    assert memory._resident() > 0
    monkeypatch.setattr(memory, "RESIDENT_FLOOR", memory._resident() + 2**30)
    release()
    assert calls == []
    monkeypatch.setattr(memory, "RESIDENT_FLOOR", 0)
    release()
    assert calls == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_cli_asks_glibc_for_one_heap_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory.one_heap sets M_ARENA_MAX (glibc accepts it); the CLI calls it before parsing leads anywhere."""
    from onnx_easier import cli

    assert memory.one_heap() is True
    calls: list[int] = []
    monkeypatch.setattr(cli, "one_heap", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert calls == []  # argparse exits on --version before: nothing runs, nothing to set
    assert cli.main(["/nonexistent/in.onnx", "/tmp/out.onnx"]) != 0
    assert calls == [1]
