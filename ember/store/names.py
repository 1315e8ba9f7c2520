"""Model names: `[host/][namespace/]model[:tag]`, parsed and validated before they touch the filesystem.

A name becomes a path under manifests/ (host/namespace/model/tag), so every part is checked against a strict
character set: nothing a user types can produce `..`, an absolute path or an extra path separator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ember.errors import ModelNotFoundError

# Ours, not Ollama's: names without a host never collide with models pulled from a real registry later.
DEFAULT_HOST = "registry.ember.local"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Same spirit as Ollama's rules. Parts start with an alphanumeric, so `.`/`..` and hidden files are impossible;
# a host may carry a port (`localhost:5000`), which is why the tag is only looked for in the last part.
_HOST_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,253}(:[0-9]{1,5})?")
_PART_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_TAG_RE = re.compile(r"[a-z0-9_][a-z0-9._-]{0,79}")


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def display(self) -> str:
        """Shortest spelling that parses back to this name, as `ember list` shows it (smollm2:latest)."""
        prefix = ""
        if self.host != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """Path components of the manifest, relative to manifests/."""
        return (self.host, self.namespace, self.model, self.tag)

    @property
    def is_default_library(self) -> bool:
        return self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE

    def __str__(self) -> str:
        return self.display


def _invalid(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"invalid model name '{name}': {why}")


def parse_name(name: str) -> ModelName:
    """Parse and validate a model name; raise ModelNotFoundError (one clear line) if it is not a valid name.

    Names are case-insensitive (lower-cased), like Ollama's, so `SmolLM2` and `smollm2` are one model and a
    case-insensitive filesystem cannot end up holding two manifests for it.
    """
    if not isinstance(name, str) or not name.strip():
        raise _invalid(str(name), "empty")
    text = name.strip().lower()
    if "\\" in text or "\0" in text:
        raise _invalid(name, "path separators are not allowed")
    if text.startswith("/") or text.endswith("/") or "//" in text:
        raise _invalid(name, "expected [host/][namespace/]model[:tag]")
    pieces = text.split("/")
    if len(pieces) > 3:
        raise _invalid(name, "expected [host/][namespace/]model[:tag]")
    last = pieces[-1]
    model, sep, tag = last.partition(":")
    if not sep:
        tag = DEFAULT_TAG
    elif not tag:
        raise _invalid(name, "empty tag after ':'")
    if len(pieces) == 3:
        host, namespace = pieces[0], pieces[1]
    elif len(pieces) == 2:
        host, namespace = DEFAULT_HOST, pieces[0]
    else:
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE

    if ".." in text:
        raise _invalid(name, "'..' is not allowed")
    if not _HOST_RE.fullmatch(host):
        raise _invalid(name, f"bad host '{host}'")
    for label, value in (("namespace", namespace), ("model", model)):
        if not _PART_RE.fullmatch(value):
            raise _invalid(name, f"bad {label} '{value}' (use letters, digits, '.', '_', '-')")
    if not _TAG_RE.fullmatch(tag):
        raise _invalid(name, f"bad tag '{tag}' (use letters, digits, '.', '_', '-')")
    return ModelName(host=host, namespace=namespace, model=model, tag=tag)


def is_valid_name(name: str) -> bool:
    try:
        parse_name(name)
    except ModelNotFoundError:
        return False
    return True
