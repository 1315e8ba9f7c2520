"""How OpenMP threads wait between torch ops, chosen from how busy the machine is when Ember starts.

Measured on the 2-core development machine, SmolLM2 decode (tg64, 2 threads):
    idle machine:   sleep at once (PASSIVE) 47 t/s, spin 20000 iterations then sleep 88, always spin 82;
    one core busy:  PASSIVE 54,                      spin-then-sleep 25,              always spin 29.
Decode runs hundreds of small ops per token, so a brief spin saves a futex sleep/wake between each; but a
spinning thread starves whatever else needs the core. So Ember spins briefly when the CPUs are idle as it
starts and sleeps at once otherwise. OMP_WAIT_POLICY / GOMP_SPINCOUNT set by the user always win.

libgomp reads these variables when torch loads it: choose() runs when the `ember` package is imported (a 50 ms
sample), before anything imports torch.
"""
from __future__ import annotations

import os
import time

SPIN_COUNT = "20000"  # iterations a waiting thread spins before sleeping (tens of microseconds)
IDLE_FRACTION = 0.9  # CPU time that must be idle over the sample for the machine to count as idle
SAMPLE_SECONDS = 0.05


def _cpu_times() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies of all CPUs, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)


def machine_idle(sample_seconds: float = SAMPLE_SECONDS) -> bool:
    """Whether the CPUs were (almost) all idle over a short sample."""
    a = _cpu_times()
    if a is None:
        return False
    time.sleep(sample_seconds)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return False
    return (b[0] - a[0]) / (b[1] - a[1]) >= IDLE_FRACTION


def choose() -> str:
    """Set the wait policy for this process unless the user did; returns "user", "spin" or "passive"."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return "user"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if machine_idle():
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT  # with PASSIVE: spin this long, then sleep
        return "spin"
    return "passive"
