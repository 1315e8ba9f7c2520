"""Pulling a model from a registry: the manifest, then every blob it names as parallel HTTP Range downloads
that resume after an interruption. The requests themselves are ember.store.registry_client's.

Downloads: a blob is fetched as several byte ranges at once into blobs/.partial-sha256-<hex> (allocated to
full size, each range written at its offset) while blobs/.partial-sha256-<hex>.json records how much of each
range is on disk. An interrupted pull (network drop, Ctrl-C, kill) keeps both, and the next pull fetches
only what is missing. A finished download is hashed and published by rename only if its sha256 matches;
a mismatch, or a registry whose blob is shorter than its manifest says, removes the partial files, so a
failed pull leaves the store as it was.

Progress events (Ollama's status objects), in this order: "pulling manifest"; "pulling <12 hex digits>" with
digest, total and completed, per blob (config and layers) as bytes arrive; "verifying sha256 digest" once
every blob is downloaded; "writing manifest"; "success".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ember.errors import EmberError
from ember.store.blobs import blob_path, check_digest, has_blob
from ember.store.home import PUBLISHED_MODE, atomic_write_bytes, ensure_dir, file_lock, fsync_dir, home
from ember.store.manifests import Layer, Manifest, manifest_path
from ember.store.names import DEFAULT_HOST, ModelName, parse_name
from ember.store.registry_client import (
    REGISTRY_ENV,
    Event,
    ProgressFn,
    RegistryClient,
    RegistryError,
    TransferOptions,
    manifest_blobs,
    quiet,
    registry_url,
    repository,
    short_digest,
)

PARTIAL_PREFIX = ".partial-"
_READ = 1 << 20  # bytes per read from a response or a file
_SAVE_SECONDS = 0.5  # how often a running download records its progress (what a kill -9 can lose)
_PROGRESS_SECONDS = 0.1
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class PullResult:
    name: ModelName
    source: str  # "registry" or "catalog"
    digest: str | None = None  # the manifest's sha256 (registry pulls)
    downloaded: int = 0  # bytes fetched over the network by this call
    reused: int = 0  # bytes already in the store (published blobs or earlier partial downloads)


def partial_paths(digest: str) -> tuple[Path, Path]:
    """(data, state) files of an unfinished download of `digest`."""
    base = home().blobs / (PARTIAL_PREFIX + check_digest(digest).replace(":", "-"))
    return base, base.with_name(base.name + ".json")


@dataclass
class _Part:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def remaining(self) -> int:
        return self.end - self.start - self.done


class _Fatal(EmberError):
    """A failure retrying cannot fix (the registry's blob is shorter or different): partial data is dropped."""


class _Cancelled(Exception):
    pass


@dataclass
class _Download:
    """One blob: its partial file, the ranges still to fetch, and counters the progress loop reads."""

    client: RegistryClient
    layer: Layer
    parts: list[_Part] = field(default_factory=list)
    fd: int = -1
    reused: int = 0
    downloaded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    last_save: float = 0.0

    @property
    def paths(self) -> tuple[Path, Path]:
        return partial_paths(self.layer.digest)

    @property
    def completed(self) -> int:
        return sum(p.done for p in self.parts)

    def open(self) -> None:
        data, state = self.paths
        size = self.layer.size
        ensure_dir(data.parent)
        self.parts = self._load_state(data, state) or []
        if not self.parts:
            with contextlib.suppress(FileNotFoundError):
                state.unlink()
            n = self.client.options.parts_for(size)
            step = -(-size // n) if size else 0
            self.parts = [_Part(s, min(size, s + step)) for s in range(0, size, step)] if size else []
            self.fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC, PUBLISHED_MODE)
            os.ftruncate(self.fd, size)  # sparse: ranges are written at their offsets
        else:
            self.fd = os.open(data, os.O_RDWR)
        self.reused = self.completed

    def _load_state(self, data: Path, state: Path) -> list[_Part] | None:
        try:
            obj = json.loads(state.read_bytes())
            if data.stat().st_size != self.layer.size:
                return None
            if obj.get("digest") != self.layer.digest or obj.get("size") != self.layer.size:
                return None
            parts = [_Part(int(a), int(b), int(d)) for a, b, d in obj["parts"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        pos = 0
        for p in parts:  # must tile [0, size) exactly, or it is not ours to trust
            if p.start != pos or p.end <= p.start or not 0 <= p.done <= p.end - p.start:
                return None
            pos = p.end
        return parts if pos == self.layer.size else None

    def save(self, force: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            if not force and now - self.last_save < _SAVE_SECONDS:
                return
            self.last_save = now
            os.fsync(self.fd)  # the state must never claim bytes that are not on disk
            state = {"digest": self.layer.digest, "size": self.layer.size,
                     "parts": [[p.start, p.end, p.done] for p in self.parts]}
            atomic_write_bytes(self.paths[1], json.dumps(state).encode())

    def fetch_part(self, part: _Part) -> None:
        failures = 0
        while part.remaining > 0:
            if self.cancel.is_set():
                raise _Cancelled
            try:
                self._stream(part)
            except RegistryError as e:  # network trouble or a 5xx: retry from where the part got to
                if e.status and e.status < 500 and e.status != 429:
                    raise
                failures += 1
                if failures > self.client.options.retries:
                    raise
                time.sleep(min(4.0, 0.5 * 2 ** (failures - 1)))

    def _stream(self, part: _Part) -> None:
        start = part.start + part.done
        digest = self.layer.digest
        resp = self.client.open_range(digest, start, part.end - 1)
        try:
            if resp.status_code == 416:
                raise _Fatal(f"blob {digest} on the registry is shorter than the {self.layer.size} bytes "
                             "its manifest says (truncated)")
            if resp.status_code == 404:
                raise _Fatal(f"blob {digest} is missing from the registry")
            if resp.status_code == 200 and not (start == 0 and part.end == self.layer.size):
                raise _Fatal(f"registry {self.client.base_url} ignores byte ranges; cannot download in parts")
            if resp.status_code not in (200, 206):
                raise self.client.error(resp, f"downloading {digest}")
            if resp.status_code == 206:
                m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    raise _Fatal(f"registry sent the wrong byte range for {digest}")
                if m.group(3) != "*" and int(m.group(3)) != self.layer.size:
                    raise _Fatal(f"size mismatch: the registry has {m.group(3)} bytes of blob {digest}, its "
                                 f"manifest says {self.layer.size}")
            for chunk in resp.iter_bytes():  # as they arrive: a fixed size would hold bytes back
                if self.cancel.is_set():
                    raise _Cancelled
                if len(chunk) > part.remaining:
                    raise _Fatal(f"registry sent more bytes than blob {digest} has")
                os.pwrite(self.fd, chunk, part.start + part.done)
                with self.lock:
                    part.done += len(chunk)
                    self.downloaded += len(chunk)
                self.save()
        except httpx.TransportError as e:
            raise self.client.transport_error(e) from e
        finally:
            resp.close()
        if part.remaining > 0 and resp.status_code in (200, 206):
            if resp.status_code == 200 or resp.headers.get("Content-Length") not in (None, str(part.end - start)):
                raise _Fatal(f"blob {digest} on the registry is shorter than its manifest says (truncated)")
            raise RegistryError(f"connection to {self.client.base_url} closed early")  # retried

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.save(force=True)
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def verify(self) -> None:
        """Hash the finished partial file; raise _Fatal if it is not the blob the manifest names."""
        h = hashlib.sha256()
        data = self.paths[0]
        with open(data, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
        actual = "sha256:" + h.hexdigest()
        if actual != self.layer.digest:
            raise _Fatal(f"digest mismatch for blob {self.layer.digest}: downloaded data hashes to {actual}")

    def publish(self) -> None:
        data, state = self.paths
        target = blob_path(self.layer.digest)
        os.replace(data, target)
        fsync_dir(target.parent)
        with contextlib.suppress(FileNotFoundError):
            state.unlink()


def _run_downloads(downloads: list[_Download], parallel: int, progress: ProgressFn) -> None:
    """Fetch every missing range, one blob after another with `parallel` ranges of it at once (one progress
    bar at a time, as a terminal can show), reporting from this thread."""
    for d in downloads:
        progress({"status": f"pulling {short_digest(d.layer.digest)}", "digest": d.layer.digest,
                  "total": d.layer.size, "completed": d.completed})
        todo = [part for part in d.parts if part.remaining > 0]
        if not todo:
            continue
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(todo))),
                                thread_name_prefix="ember-pull") as pool:
            pending = {pool.submit(d.fetch_part, part) for part in todo}
            reported = d.completed
            try:
                while pending:
                    finished, pending = wait(pending, timeout=_PROGRESS_SECONDS, return_when=FIRST_EXCEPTION)
                    for f in finished:
                        if f.exception() is not None:
                            raise f.exception()  # type: ignore[misc]
                    if d.completed != reported:
                        reported = d.completed
                        progress({"status": f"pulling {short_digest(d.layer.digest)}", "digest": d.layer.digest,
                                  "total": d.layer.size, "completed": reported})
            except BaseException:  # an error or Ctrl-C: stop the other ranges, keep what is on disk
                d.cancel.set()
                for f in pending:
                    f.cancel()
                raise


def pull(
    name: str,
    *,
    insecure: bool = False,
    progress: ProgressFn | None = None,
    username: str | None = None,
    password: str | None = None,
    options: TransferOptions | None = None,
) -> PullResult:
    """`ember pull` / POST /api/pull: install `name` from the catalogue (catalogue names without a host) or
    from its registry. Idempotent; an interrupted registry pull resumes where it stopped."""
    progress = progress or quiet
    parsed = parse_name(name)
    if parsed.host == DEFAULT_HOST:
        from ember.store import catalog

        if catalog.lookup(parsed) is not None:
            def relay(status: str, completed: int, total: int) -> None:
                event: Event = {"status": status}
                if total > 0:
                    event.update(total=total, completed=completed)
                progress(event)

            catalog.pull(name, progress=relay)
            return PullResult(name=parsed, source="catalog")
        if not os.environ.get(REGISTRY_ENV, "").strip():
            raise catalog.not_found(name)  # no registry configured: the catalogue is all there is
    opts = options or TransferOptions()
    with RegistryClient(registry_url(parsed, insecure), repository(parsed), username=username, password=password,
                        options=opts) as client:
        progress({"status": "pulling manifest"})
        raw, manifest = client.get_manifest(parsed.tag)
        try:
            return _pull_blobs(client, parsed, raw, manifest, opts, progress)
        except OSError as e:  # disk full, permissions: the user's to fix, not a crash
            raise EmberError(f"could not pull {parsed} into {home().models}: {e.strerror or e}") from e


def _pull_blobs(client: RegistryClient, name: ModelName, raw: bytes, manifest: Manifest, opts: TransferOptions,
                progress: ProgressFn) -> PullResult:
    from ember.store.create import store_lock  # publishing vs pruning; create.py owns that rule

    blobs = manifest_blobs(manifest)
    missing = [layer for layer in blobs if not has_blob(layer.digest, layer.size)]
    present = sum(layer.size for layer in blobs if layer not in missing)
    for layer in blobs:
        if layer not in missing:
            progress({"status": f"pulling {short_digest(layer.digest)}", "digest": layer.digest, "total": layer.size,
                      "completed": layer.size})
    with contextlib.ExitStack() as stack:
        # One process per blob at a time (sorted: two pulls sharing blobs cannot deadlock).
        for layer in sorted(missing, key=lambda x: x.digest):
            stack.enter_context(file_lock("blob-" + layer.digest.removeprefix("sha256:")))
        missing = [layer for layer in missing if not has_blob(layer.digest, layer.size)]  # another process?
        downloads = [_Download(client, layer) for layer in missing]
        try:
            for d in downloads:
                d.open()
            _run_downloads(downloads, opts.parallel, progress)
            if downloads:
                progress({"status": "verifying sha256 digest"})
            for d in downloads:
                d.close()
                d.verify()
            with store_lock(shared=True):
                for d in downloads:
                    d.publish()
                gone = [layer.digest for layer in blobs if not has_blob(layer.digest, layer.size)]
                if gone:  # pruned by another process between our check and now; a retry fetches them
                    raise EmberError(f"blobs {', '.join(gone)} disappeared during the pull; pull again")
                progress({"status": "writing manifest"})
                atomic_write_bytes(manifest_path(name), raw)
        except _Fatal:
            for d in downloads:
                d.discard()
            raise
        except BaseException:
            for d in downloads:
                d.close()  # keep the partial data: the next pull resumes it
            raise
    progress({"status": "success"})
    return PullResult(
        name=name, source="registry", digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        downloaded=sum(d.downloaded for d in downloads), reused=present + sum(d.reused for d in downloads),
    )


def stale_partials() -> Iterator[Path]:
    """Partial downloads in the store (what `prune` may clear when nothing is pulling)."""
    blobs = home().blobs
    if blobs.is_dir():
        yield from sorted(blobs.glob(PARTIAL_PREFIX + "*"))
