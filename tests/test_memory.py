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
    monkeypatch.setattr(memory, "_collected_at", None)
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
    monkeypatch.setattr(memory, "_collected_at", None)
    assert memory._resident() > 0
    monkeypatch.setattr(memory, "RESIDENT_FLOOR", memory._resident() + 2**30)
    release()
    assert calls == []
    monkeypatch.setattr(memory, "RESIDENT_FLOOR", 0)
    release()
    assert calls == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_collects_again_only_after_the_resident_set_grew(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a collection the next one waits until the process holds GROWTH more (less would free at most that)."""
    calls: list[int] = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: calls.append(1) or 0)
    monkeypatch.setattr(memory, "RESIDENT_FLOOR", 0)
    monkeypatch.setattr(memory, "_collected_at", None)
    release()
    release()
    assert calls == [1]
    grown = np.ones(2 * memory.GROWTH // 8)  # touched: resident
    release()
    assert calls == [1, 1]
    del grown


def test_objects_alive_at_exemption_are_left_out_of_collections() -> None:
    import gc

    before = gc.get_freeze_count()
    alive = [[i] for i in range(1000)]
    try:
        memory.exempt_live_objects()
        assert gc.get_freeze_count() >= before + 1000
    finally:
        gc.unfreeze()
    del alive


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
