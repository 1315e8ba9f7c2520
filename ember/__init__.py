"""Ember: a local LLM runtime."""

import os as _os

# OpenMP threads that spin while waiting collapse when another process holds a core: decode measured 4 t/s
# instead of 47-58 t/s on this 2-core machine with one core busy. A local runtime shares the machine with
# the user's other programs, so waiting threads sleep unless the user chose otherwise. (Read by torch's
# OpenMP runtime when it loads, so it must be set before torch is imported.)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def load(*args, **kwargs):  # imported lazily so `import ember` stays cheap (no torch) for the CLI's --help
    from ember.api import load as _load

    return _load(*args, **kwargs)


load.__doc__ = "Load a model by name or GGUF path; see ember.api.load."
