"""Ember's error types.

Every failure a user can cause (bad file, bad name, bad request, prompt too long) raises a subclass of
EmberError carrying one clear line of text; the CLI prints that line and exits non-zero, the server maps it to
an HTTP status. Anything else escaping is a bug in Ember.
"""


class EmberError(Exception):
    """Base class of all user-facing errors. str(err) is a complete one-line message."""


class GGUFError(EmberError):
    """A GGUF file is truncated, corrupt, crafted or otherwise not loadable."""


class UnsupportedError(EmberError):
    """A well-formed file uses something Ember does not implement (architecture, tensor type, tokenizer)."""


class ModelNotFoundError(EmberError):
    """A model name or path does not resolve to a model."""


class ContextOverflowError(EmberError):
    """A prompt (plus what must be generated) does not fit the model's context window."""


class TemplateError(EmberError):
    """A chat template failed to render, or tried to escape its sandbox."""


class InvalidParameterError(EmberError, ValueError):
    """A sampling or configuration parameter is out of range."""
