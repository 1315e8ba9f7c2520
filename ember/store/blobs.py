"""Content-addressed blobs: blobs/sha256-<hex>, written through a hashing temp file and published only once
the digest (and size, when known) match what was expected.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from types import TracebackType

from ember.errors import EmberError
from ember.store.home import PUBLISHED_MODE, TEMP_PREFIX, ensure_dir, fsync_dir, home

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20


def check_digest(digest: str) -> str:
    """Return `digest` if it is `sha256:<64 lowercase hex>`; anything else could name a path outside blobs/."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise EmberError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


def blob_path(digest: str) -> Path:
    # Ollama's on-disk spelling: ':' is not portable in file names.
    return home().blobs / check_digest(digest).replace(":", "-")


def has_blob(digest: str, size: int | None = None) -> bool:
    """Cheap presence check (existence and size); full verification is `verify_blob`."""
    try:
        st = blob_path(digest).stat()
    except FileNotFoundError:
        return False
    return size is None or st.st_size == size


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def verify_blob(digest: str) -> bool:
    path = blob_path(digest)
    return path.is_file() and hash_file(path) == digest


class BlobWriter:
    """Stream bytes into a temp file in blobs/ while hashing them; `commit` verifies and publishes.

    Used as a context manager: leaving the block without a successful commit (an exception, a digest
    mismatch, Ctrl-C) removes the temp file, so a failed install leaves nothing behind.
    """

    def __init__(self) -> None:
        directory = ensure_dir(home().blobs)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
        os.fchmod(fd, PUBLISHED_MODE)  # mkstemp's 0600 would hide a shared store from other users
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, expected_digest: str | None = None, expected_size: int | None = None) -> str:
        """Publish the blob under its digest; raise EmberError (and keep nothing) if it is not what was expected."""
        digest = "sha256:" + self._hash.hexdigest()
        if expected_size is not None and self.size != expected_size:
            raise EmberError(f"size mismatch: expected {expected_size} bytes, got {self.size}")
        if expected_digest is not None and digest != check_digest(expected_digest):
            raise EmberError(f"digest mismatch: expected {expected_digest}, got {digest}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        target = blob_path(digest)
        os.replace(self._tmp, target)
        fsync_dir(target.parent)
        self.digest = digest
        return digest

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.digest is None:
            self.discard()


def write_blob(data: bytes) -> tuple[str, int]:
    """Store a small in-memory blob (config, license, template); return (digest, size)."""
    with BlobWriter() as w:
        w.write(data)
        return w.commit(), w.size
