"""Giving memory back to the operating system between the search's steps.

Model copies (protobuf messages, onnx-graphsurgeon graphs: reference cycles) are freed by the garbage collector;
what they held goes back to the C heap, where glibc keeps it unless asked: after the first large block it frees,
glibc raises its mmap threshold, so later weights of a few MB come from the heap and stay in the process's
resident set once freed. ``release`` collects the cycles and, on glibc, trims the heap (``malloc_trim(0)``):
peak RSS then follows what is alive, not what once was.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from functools import lru_cache


@lru_cache(maxsize=2)
def _libc(symbol: str):
    """The C library's function ``symbol`` (glibc's malloc_trim, mallopt), or None (other systems, other C
    libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), symbol)
    except (OSError, AttributeError):
        return None


def _trim():
    """glibc's malloc_trim, or None."""
    return _libc("malloc_trim")


RESIDENT_FLOOR = 256 * 2**20  # below this resident set there is nothing worth giving back: release() returns


def _resident() -> int | None:
    """The process's resident set in bytes (Linux: /proc/self/statm), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release() -> None:
    """Collect reference cycles, then return the C heap's free memory to the system where glibc allows it. Skipped
    while the process holds under RESIDENT_FLOOR (a full collection takes ~12 ms however small the model: 18 of
    them were 8% of ffn_digits' default run)."""
    resident = _resident()
    if resident is not None and resident < RESIDENT_FLOOR:
        return
    gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_heap() -> bool:
    """Make every thread allocate from glibc's main heap (``mallopt(M_ARENA_MAX, 1)``); False where not glibc.

    ORT's intra-op threads otherwise get heaps of their own: what a run frees in one of them is not reused by the
    next run's allocations in another, and a ViT-S default run peaked anywhere from 2.0 to 3.1 GB (a re-fit pass
    grew by 1.2 GB over 8 batches); with one heap 1.83-1.88 GB in three runs, at the same time. Process-wide and
    for threads not yet started, so the CLI calls it first thing (a library should not change its host's
    allocator: the Python API does not)."""
    mallopt = _libc("mallopt")
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, 1))
