"""Ember: a local LLM runtime."""

import os as _os

# OpenMP threads that spin while waiting collapse when another process holds a core. Measured on this
# 2-core machine, SmolLM2 decode (tg128): idle machine 81 t/s spinning vs 50 t/s passive; one core busy
# 25 vs 51; both cores busy as low as 4 vs 47. A local runtime shares the machine with the user's other
# programs, so by default waiting threads sleep; set OMP_WAIT_POLICY=ACTIVE for a dedicated machine. (Read
# by torch's OpenMP runtime when it loads, so it must be set before torch is imported.)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def load(*args, **kwargs):  # imported lazily so `import ember` stays cheap (no torch) for the CLI's --help
    from ember.api import load as _load

    return _load(*args, **kwargs)


load.__doc__ = "Load a model by name or GGUF path; see ember.api.load."
