"""The OpenMP wait policy Ember picks at import: the user's setting wins; otherwise passive, plus a brief spin
only when the CPUs were idle over the sample."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ember import wait_policy


def _env_after_import(env: dict[str, str]) -> tuple[str, str]:
    code = "import ember, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    policy, spin = out.stdout.split()
    return policy, spin


@pytest.fixture
def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def test_user_settings_win(clean_env):
    assert _env_after_import({**clean_env, "OMP_WAIT_POLICY": "ACTIVE"}) == ("ACTIVE", "None")
    assert _env_after_import({**clean_env, "GOMP_SPINCOUNT": "7"}) == ("None", "7")


def test_busy_machine_sleeps_idle_machine_spins(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wait_policy, "machine_idle", lambda *a: False)
    assert wait_policy.choose() == "passive"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(wait_policy, "machine_idle", lambda *a: True)
    assert wait_policy.choose() == "spin"
    assert os.environ["GOMP_SPINCOUNT"] == wait_policy.SPIN_COUNT
    assert wait_policy.choose() == "user"  # already decided: never changed again


def test_machine_idle_reads_a_busy_cpu_as_busy():
    """A busy process on every CPU: not idle (processes, since threads would share one GIL)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        import time

        time.sleep(0.3)
        assert not wait_policy.machine_idle(0.2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
