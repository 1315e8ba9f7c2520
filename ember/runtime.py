"""Process-wide runtime choices: thread count."""
from __future__ import annotations

import os


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
