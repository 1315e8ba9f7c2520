"""Manifests: manifests/<host>/<namespace>/<model>/<tag>, JSON in the Docker v2 format Ollama uses.

A manifest names a config blob and an ordered list of layers (the GGUF weights, and optionally a license,
chat template, system prompt or default parameters); everything it points to lives in blobs/.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import EmberError, ModelNotFoundError
from ember.store.blobs import check_digest
from ember.store.home import TEMP_PREFIX, atomic_write_bytes, home
from ember.store.names import ModelName, parse_name

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"

# Layer roles and their media types, as Ollama spells them, so manifests stay interchangeable.
MEDIA_TYPES: dict[str, str] = {
    "model": "application/vnd.ollama.image.model",
    "adapter": "application/vnd.ollama.image.adapter",
    "projector": "application/vnd.ollama.image.projector",
    "template": "application/vnd.ollama.image.template",
    "system": "application/vnd.ollama.image.system",
    "params": "application/vnd.ollama.image.params",
    "messages": "application/vnd.ollama.image.messages",
    "license": "application/vnd.ollama.image.license",
    "draft": "application/vnd.ollama.image.draft",  # DRAFT: the draft model's GGUF, for speculative decoding
}


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if not isinstance(self.size, int) or self.size < 0:
            raise EmberError(f"invalid layer size {self.size!r}")

    def to_json(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @classmethod
    def from_json(cls, obj: dict) -> Layer:
        if not isinstance(obj, dict):
            raise EmberError("invalid manifest layer")
        return cls(media_type=str(obj.get("mediaType", "")), digest=obj.get("digest"), size=obj.get("size"))


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    def layer(self, role: str) -> Layer | None:
        """First layer of a role ("model", "license", ...), or None."""
        media_type = MEDIA_TYPES[role]
        return next((layer for layer in self.layers if layer.media_type == media_type), None)

    @property
    def size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)

    def to_bytes(self) -> bytes:
        obj = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        return json.dumps(obj, indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise EmberError(f"manifest is not valid JSON: {e}") from e
        if not isinstance(obj, dict) or obj.get("schemaVersion") != 2:
            raise EmberError("unsupported manifest (expected schemaVersion 2)")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise EmberError("invalid manifest: 'layers' is not a list")
        return cls(config=Layer.from_json(obj.get("config")), layers=tuple(Layer.from_json(x) for x in layers))


def manifest_path(name: ModelName) -> Path:
    # parse_name already guarantees each part is a single safe path component.
    return home().manifests.joinpath(*name.parts)


def local_manifest_bytes(name: str) -> tuple[ModelName, Path, bytes]:
    """The stored manifest of model `name`, byte for byte, with its parsed name and path; a clear
    "model 'x' not found" when there is none."""
    parsed = parse_name(name)
    path = manifest_path(parsed)
    try:
        return parsed, path, path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFoundError(f"model '{name}' not found") from None


def read_manifest(name: ModelName) -> Manifest | None:
    path = manifest_path(name)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return Manifest.from_bytes(data)
    except EmberError as e:
        raise EmberError(f"model '{name}' has a corrupt manifest ({path}): {e}") from e


def write_manifest(name: ModelName, manifest: Manifest) -> Path:
    path = manifest_path(name)
    atomic_write_bytes(path, manifest.to_bytes())
    return path


def manifest_id(name: ModelName) -> str:
    """Digest of the manifest file itself; `ember list` shows its first 12 hex digits, as Ollama does."""
    return "sha256:" + hashlib.sha256(manifest_path(name).read_bytes()).hexdigest()


@dataclass(frozen=True)
class InstalledModel:
    name: ModelName
    manifest: Manifest
    path: Path  # the manifest file; its mtime is "modified"


def list_manifests() -> Iterator[InstalledModel]:
    """All readable manifests in the store; unparseable paths and corrupt files are skipped, not fatal."""
    root = home().manifests
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/*/*/*")):
        if not path.is_file() or path.name.startswith(TEMP_PREFIX):
            continue
        rel = path.relative_to(root).parts
        try:
            name = parse_name(f"{rel[0]}/{rel[1]}/{rel[2]}:{rel[3]}")
            if name.parts != rel:
                continue  # a hand-made directory with upper-case letters etc.; not ours
            manifest = Manifest.from_bytes(path.read_bytes())
        except (EmberError, OSError):
            continue
        yield InstalledModel(name=name, manifest=manifest, path=path)
