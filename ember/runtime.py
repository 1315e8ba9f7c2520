"""Process-wide runtime choices: thread counts, giving load-time memory back."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator

import torch


def default_threads() -> int:
    """Threads for torch's intra-op pool: the cores this process may use (decode is memory-bound, and
    more threads than cores only adds contention)."""
    env = os.environ.get("EMBER_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one thread for the duration (restored after).

    Used for load-time repacking: many medium elementwise ops that gain little from a second thread, and
    when the machine is busy an oversubscribed OpenMP pool makes them 10x slower (measured: 1.2 s vs 18.7 s
    to repack SmolLM2 with the other core loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _glibc(function: str):
    """A glibc malloc function by name, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_heap() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim). Loading frees hundreds of MiB of numpy and
    torch temporaries that glibc would otherwise keep in its arenas, counted in RSS (SmolLM2: ~60 MiB)."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_malloc_tuned = False


def keep_buffers_in_heap() -> None:
    """Serve per-step buffers (activations, dequantized weight slabs of a few MiB) from glibc's heap instead
    of fresh mmaps. By default glibc maps every block over 128 KiB anew and unmaps it on free, so each
    prefill step page-faults and zeroes all of its temporaries again (measured on a 1B model: pp128 90 t/s
    against 135 with this; a process that had just repacked weights got the same effect by accident, from
    glibc raising its threshold as the load freed large blocks). Freed heap above TRIM_THRESHOLD still goes
    back to the system. Once per process, glibc only."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
