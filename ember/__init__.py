"""Ember: a local LLM runtime."""

import os as _os

# How OpenMP threads wait between torch ops: sleep at once when the machine is busy (spinning threads collapse
# when another process holds a core), spin briefly when it is idle as Ember starts (decode ~1.8x faster). See
# ember/wait_policy.py for the measurements. libgomp reads this when torch loads it, hence here, first.
# Set OMP_WAIT_POLICY or GOMP_SPINCOUNT to decide yourself.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    from ember.wait_policy import choose as _choose

    _choose()

__version__ = "0.1.0"


def load(*args, **kwargs):  # imported lazily so `import ember` stays cheap (no torch) for the CLI's --help
    from ember.api import load as _load

    return _load(*args, **kwargs)


load.__doc__ = "Load a model by name or GGUF path; see ember.api.load."
