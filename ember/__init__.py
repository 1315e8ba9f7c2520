"""Ember: a local LLM runtime."""

__version__ = "0.1.0"


def load(*args, **kwargs):  # imported lazily so `import ember` stays cheap (no torch) for the CLI's --help
    from ember.api import load as _load

    return _load(*args, **kwargs)


load.__doc__ = "Load a model by name or GGUF path; see ember.api.load."
