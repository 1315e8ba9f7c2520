"""Ember's model store: home folder, content-addressed blobs, manifests, names and the offline catalogue.

`resolve_model` is the one entry point the rest of Ember needs: it turns what a user typed (a file path or a
model name) into a GGUF file on disk plus any overrides its manifest carries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError, ModelNotFoundError
from ember.store.blobs import blob_path, has_blob
from ember.store.catalog import CATALOG, ensure_model, lookup, not_found, pull
from ember.store.home import home
from ember.store.manifests import Layer, Manifest, read_manifest
from ember.store.names import ModelName, parse_name

# Template/system/params layers are small text; refuse to slurp anything that is clearly not.
_MAX_TEXT_LAYER = 1 << 20


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the GGUF file
    name: str  # display name: "smollm2:latest", or the file name for a path
    template: str | None = None  # chat template overriding the GGUF's own
    system: str | None = None  # default system prompt
    params: dict[str, Any] = field(default_factory=dict)  # default sampling/runtime parameters
    license_path: Path | None = None
    draft_path: Path | None = None  # DRAFT: the draft model's GGUF for speculative decoding


def _looks_like_path(text: str) -> bool:
    # A model name never starts with these or ends in .gguf; "library/smollm2" style names contain '/', so a
    # bare '/' only means a path when such a file exists.
    return text.lower().endswith(".gguf") or text.startswith(("/", ".", "~")) or ("/" in text and Path(text).is_file())


def _read_text_layer(layer: Layer | None) -> str | None:
    if layer is None or layer.size > _MAX_TEXT_LAYER or not has_blob(layer.digest, layer.size):
        return None
    return blob_path(layer.digest).read_text(encoding="utf-8", errors="replace")


def _from_manifest(name: ModelName, manifest: Manifest, model_path: Path) -> ResolvedModel:
    params: dict[str, Any] = {}
    raw = _read_text_layer(manifest.layer("params"))
    if raw:
        try:
            loaded = json.loads(raw)
        except ValueError as e:
            raise EmberError(f"model '{name}' has invalid default parameters: {e}") from e
        if isinstance(loaded, dict):
            params = loaded
    lic = manifest.layer("license")
    draft = manifest.layer("draft")
    return ResolvedModel(
        path=model_path,
        name=name.display,
        template=_read_text_layer(manifest.layer("template")),
        system=_read_text_layer(manifest.layer("system")),
        params=params,
        license_path=blob_path(lic.digest) if lic and has_blob(lic.digest, lic.size) else None,
        draft_path=blob_path(draft.digest) if draft and has_blob(draft.digest, draft.size) else None,
    )


def resolve_model(name_or_path: str | Path) -> ResolvedModel:
    """Resolve a GGUF path or a model name (fetching catalogue models on first use).

    Raises ModelNotFoundError for a missing file, an invalid name or an unknown model.
    """
    text = str(name_or_path).strip()
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        path = Path(text).expanduser()
        if path.is_file():
            return ResolvedModel(path=path.resolve(), name=path.name)
        if path.exists():
            raise ModelNotFoundError(f"'{text}' is not a file")
        raise ModelNotFoundError(f"model file '{text}' not found")
    parsed = parse_name(text)
    model_path = ensure_model(text)  # fetches a catalogue model or raises ModelNotFoundError
    manifest = read_manifest(parsed)
    if manifest is None:  # removed between the two calls; report it rather than guess
        raise not_found(text)
    return _from_manifest(parsed, manifest, model_path)


__all__ = [
    "CATALOG",
    "ModelName",
    "ResolvedModel",
    "ensure_model",
    "home",
    "lookup",
    "parse_name",
    "pull",
    "resolve_model",
]
