"""Ember's home folder and the safety rules for writing into it.

Layout (mirrors Ollama's so the store can grow into registry pull/push without a migration):

    $EMBER_HOME                 default ~/.ember
    $EMBER_MODELS               default $EMBER_HOME/models
        blobs/sha256-<hex>      content-addressed files (model weights, config, license, ...)
        manifests/<host>/<namespace>/<model>/<tag>   Docker-v2-style JSON manifests pointing at blobs
        locks/<key>.lock        fcntl locks serialising installs across processes

Every file is published by rename from a temp file in the same directory, so a reader never sees a partial
file and a crash leaves, at worst, a `.tmp-*` file that the next write in that directory ignores.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

TEMP_PREFIX = ".tmp-"
PUBLISHED_MODE = 0o644
_LOCK_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Home:
    """Resolved locations; read from the environment on every call so tests and users can redirect them."""

    root: Path
    models: Path

    @property
    def blobs(self) -> Path:
        return self.models / "blobs"

    @property
    def manifests(self) -> Path:
        return self.models / "manifests"

    @property
    def locks(self) -> Path:
        return self.models / "locks"


def home() -> Home:
    root_env = os.environ.get("EMBER_HOME")
    root = Path(root_env).expanduser() if root_env else Path.home() / ".ember"
    models_env = os.environ.get("EMBER_MODELS")
    models = Path(models_env).expanduser() if models_env else root / "models"
    return Home(root=root.absolute(), models=models.absolute())


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EmberError(f"cannot create {path}: {e.strerror or e}") from e
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; some filesystems refuse directory fsync, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    directory = ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
    try:
        os.fchmod(fd, PUBLISHED_MODE)  # mkstemp's 0600 would hide a shared store from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def file_lock(key: str) -> Iterator[None]:
    """Hold an exclusive cross-process lock named `key` (e.g. "pull-smollm2") for the duration of the block.

    flock is released by the kernel when the process dies, so a killed install never wedges the next one.
    """
    if not _LOCK_KEY_RE.fullmatch(key):
        raise ValueError(f"bad lock key {key!r}")  # internal misuse, not a user error
    lock_dir = ensure_dir(home().locks)
    with open(lock_dir / f"{key}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
