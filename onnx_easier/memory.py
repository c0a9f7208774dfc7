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
GROWTH = 32 * 2**20  # release() collects only once the resident set grew by this since its last collection
_collected_at: int | None = None  # the resident set right after release()'s last collection


def _resident() -> int | None:
    """The process's resident set in bytes (Linux: /proc/self/statm), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release() -> None:
    """Collect reference cycles, then return the C heap's free memory to the system where glibc allows it.

    Skipped while the process holds under RESIDENT_FLOOR (a full collection takes ~12 ms however small the model:
    18 of them were 8% of ffn_digits' default run), and while the resident set is within GROWTH of what it was
    right after the last collection: what could be freed is then at most about that much (the step's garbage is
    part of the resident set), and a process holding a large library pays its collection again and again for
    nothing (with torch imported, 85 ms each)."""
    global _collected_at
    resident = _resident()
    if resident is not None and (resident < RESIDENT_FLOOR
                                 or (_collected_at is not None and resident < _collected_at + GROWTH)):
        return
    gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)
    _collected_at = _resident()


def exempt_live_objects() -> None:
    """Collect, then move every object alive now into the collector's permanent generation (``gc.freeze``): later
    collections do not scan them again. Called right after a large library is imported (torch: a collection of
    ffn_digits' run took 85 ms with its objects, 12 ms without). What is alive at that moment and later becomes
    cyclic garbage is not collected: call it where only long-lived objects are."""
    gc.collect()
    gc.freeze()


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
