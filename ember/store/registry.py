"""Registry: pull and push models over the OCI distribution API, the protocol Ollama's registry speaks.

A model `host/namespace/model:tag` is the repository `namespace/model` on `host`, reference `tag`. Names
without a host (`smollm2`, `alice/tiny`) go to the registry named by $EMBER_REGISTRY; catalogue names without
a host keep coming from the offline catalogue (`pull` dispatches).

| step           | request                                               | success | notes                            |
|----------------|-------------------------------------------------------|---------|----------------------------------|
| get manifest   | GET  /v2/<repo>/manifests/<tag>                       | 200     | Accept: Docker v2 / OCI manifest |
| blob exists    | HEAD /v2/<repo>/blobs/<digest>                        | 200     | Content-Length is the size       |
| get blob range | GET  /v2/<repo>/blobs/<digest>, Range: bytes=<a>-<b>  | 206     | may redirect to storage          |
| start upload   | POST /v2/<repo>/blobs/uploads/                        | 202     | Location: the upload URL         |
| upload a chunk | PATCH <location>, Content-Range: <a>-<b>              | 202     | new Location; Range: 0-<b>       |
| upload status  | GET <location>                                        | 204     | Range: 0-<b>: where to resume    |
| finish upload  | PUT <location>?digest=<digest>                        | 201     | the registry checks the digest   |
| put manifest   | PUT  /v2/<repo>/manifests/<tag>                       | 201     | Content-Type: the manifest type  |

Authentication answers the registry's 401 challenge (WWW-Authenticate), once per client:

| challenge                           | answer                                                                     |
|-------------------------------------|----------------------------------------------------------------------------|
| Bearer realm=..,service=..,scope=.. | GET realm?service=..&scope=repository:<repo>:<actions> (with the basic     |
|                                     | credentials, if any) -> {"token"} or {"access_token"}; then Bearer <token> |
| Basic realm=..                      | Authorization: Basic <credentials>                                         |

Credentials come from $EMBER_REGISTRY_USERNAME / $EMBER_REGISTRY_PASSWORD (or the `username`/`password`
arguments). Plain HTTP only with `insecure` (or an explicit http:// in $EMBER_REGISTRY).

Progress events are Ollama's status objects, in this order:

| status                       | extra fields                    | when                                          |
|------------------------------|---------------------------------|-----------------------------------------------|
| pulling manifest             |                                 | pull starts                                   |
| pulling <12 hex digits>      | digest, total, completed        | per blob (config and layers), bytes so far    |
| verifying sha256 digest      |                                 | every blob downloaded; hashing them           |
| writing manifest             |                                 |                                               |
| retrieving manifest          |                                 | push starts (reads the local manifest)        |
| pushing <12 hex digits>      | digest, total, completed        | per blob; completed == total if already there |
| pushing manifest             |                                 |                                               |
| success                      |                                 | last event of a pull or push                  |

Downloads: a blob is fetched as several byte ranges at once into blobs/.partial-sha256-<hex> (allocated to
full size, each range written at its offset) while blobs/.partial-sha256-<hex>.json records how much of each
range is on disk. An interrupted pull (network drop, Ctrl-C, kill) keeps both, and the next pull fetches
only what is missing. A finished download is hashed and published by rename only if its sha256 matches;
a mismatch, or a registry whose blob is shorter than its manifest says, removes the partial files, so a
failed pull leaves the store as it was.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ember import __version__
from ember.errors import EmberError, ModelNotFoundError
from ember.store.blobs import blob_path, check_digest, has_blob
from ember.store.home import PUBLISHED_MODE, atomic_write_bytes, ensure_dir, file_lock, fsync_dir, home
from ember.store.manifests import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, Layer, Manifest, manifest_path
from ember.store.names import DEFAULT_HOST, ModelName, parse_name

Event = dict[str, Any]
ProgressFn = Callable[[Event], None]

REGISTRY_ENV = "EMBER_REGISTRY"
USERNAME_ENV = "EMBER_REGISTRY_USERNAME"
PASSWORD_ENV = "EMBER_REGISTRY_PASSWORD"

OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPES = (MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE)
CONFIG_TYPES = (CONFIG_MEDIA_TYPE, OCI_CONFIG_MEDIA_TYPE)
# Ollama's layers are all application/vnd.ollama.image.<role>; newer roles are kept (not understood) as long
# as they are well-formed, so a manifest from a newer Ollama still pulls.
_LAYER_TYPE_RE = re.compile(r"application/vnd\.ollama\.image\.[a-z0-9][a-z0-9.+-]{0,63}")
# A model manifest is a few hundred bytes; anything near this is not one (and must not be read into memory).
MAX_MANIFEST_BYTES = 4 << 20

PARTIAL_PREFIX = ".partial-"
_READ = 1 << 20  # bytes per read from a response or a file
_SAVE_SECONDS = 0.5  # how often a running download records its progress (what a kill -9 can lose)
_PROGRESS_SECONDS = 0.1


@dataclass(frozen=True)
class TransferOptions:
    """Tuning knobs; the defaults suit multi-GB models on a good link."""

    parallel: int = 4  # ranges of one blob downloaded at once
    part_size: int | None = None  # bytes per range; None: size/16 within [1 MiB, 256 MiB]
    chunk_size: int = 16 << 20  # bytes per upload PATCH
    retries: int = 3  # per range / chunk, on network errors
    timeout: float = 60.0  # seconds without progress on one connection

    def parts_for(self, size: int) -> int:
        part = self.part_size or min(256 << 20, max(1 << 20, size // 16))
        return max(1, -(-size // max(1, part)))


@dataclass(frozen=True)
class PullResult:
    name: ModelName
    source: str  # "registry" or "catalog"
    digest: str | None = None  # the manifest's sha256 (registry pulls)
    downloaded: int = 0  # bytes fetched over the network by this call
    reused: int = 0  # bytes already in the store (published blobs or earlier partial downloads)


@dataclass(frozen=True)
class PushResult:
    name: ModelName
    digest: str  # the manifest's sha256
    uploaded: int = 0  # bytes sent
    skipped: int = 0  # bytes the registry already had


def _quiet(event: Event) -> None:
    pass


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


# ---- where a name lives ------------------------------------------------------------------------------------


def registry_url(name: ModelName, insecure: bool = False) -> str:
    """Base URL (scheme://host[:port]) of the registry holding `name`."""
    if name.host == DEFAULT_HOST:
        base = os.environ.get(REGISTRY_ENV, "").strip()
        if not base:
            raise ModelNotFoundError(
                f"model '{name}' names no registry: set {REGISTRY_ENV}=host[:port] or use host/namespace/model[:tag]"
            )
    else:
        base = name.host
    if "://" not in base:
        base = ("http://" if insecure else "https://") + base
    try:
        url = httpx.URL(base)
    except (httpx.InvalidURL, ValueError) as e:
        raise EmberError(f"invalid registry address {base!r}: {e}") from e
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query:
        raise EmberError(f"invalid registry address {base!r}: expected [http[s]://]host[:port]")
    return str(url.copy_with(path="")).rstrip("/")


def repository(name: ModelName) -> str:
    return f"{name.namespace}/{name.model}"


# ---- manifests -----------------------------------------------------------------------------------------------


def parse_remote_manifest(raw: bytes, content_type: str | None = None, digest: str | None = None) -> Manifest:
    """Validate a manifest from a registry (size, digest, JSON, media types, layer digests); raise EmberError."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise EmberError(f"manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    actual = "sha256:" + hashlib.sha256(raw).hexdigest()
    if digest and digest.startswith("sha256:") and digest != actual:
        raise EmberError(f"manifest digest mismatch: registry says {digest}, content is {actual}")
    kind = (content_type or "").split(";")[0].strip()
    if kind and kind not in MANIFEST_TYPES and kind not in ("application/json", "text/plain"):
        raise EmberError(f"registry sent a {kind}, not a model manifest")
    manifest = Manifest.from_bytes(raw)
    obj = json.loads(raw)
    if obj.get("mediaType") not in (None, *MANIFEST_TYPES):
        raise EmberError(f"unsupported manifest media type {obj.get('mediaType')!r}")
    if manifest.config.media_type not in CONFIG_TYPES:
        raise EmberError(f"unsupported config media type {manifest.config.media_type!r}")
    for layer in manifest.layers:
        if not _LAYER_TYPE_RE.fullmatch(layer.media_type):
            raise EmberError(f"unsupported layer media type {layer.media_type!r}")
    if manifest.layer("model") is None:
        raise EmberError("manifest has no model layer")
    return manifest


def _manifest_blobs(manifest: Manifest) -> list[Layer]:
    """Config first, then layers, each digest once."""
    seen: dict[str, Layer] = {}
    for layer in (manifest.config, *manifest.layers):
        if layer.digest in seen and seen[layer.digest].size != layer.size:
            raise EmberError(f"manifest lists {layer.digest} with two different sizes")
        seen.setdefault(layer.digest, layer)
    return list(seen.values())


# ---- HTTP with registry auth ---------------------------------------------------------------------------------


_CHALLENGE_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="..",service=".."` -> ("bearer", {"realm": .., "service": ..})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM_RE.finditer(rest)}
    return scheme.lower(), params


class RegistryError(EmberError):
    """The registry refused a request; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class RegistryClient:
    """One repository on one registry. Thread-safe: downloads share it across worker threads."""

    def __init__(
        self,
        base_url: str,
        repo: str,
        *,
        actions: str = "pull",
        username: str | None = None,
        password: str | None = None,
        options: TransferOptions | None = None,
    ) -> None:
        self.base_url = base_url
        self.repo = repo
        self.actions = actions
        self.options = options or TransferOptions()
        user = username if username is not None else os.environ.get(USERNAME_ENV)
        pw = password if password is not None else os.environ.get(PASSWORD_ENV)
        self._credentials = (user, pw or "") if user else None
        self._authorization: str | None = None
        self._auth_lock = threading.Lock()
        limits = httpx.Limits(max_connections=max(8, self.options.parallel * 2))
        self._http = httpx.Client(
            timeout=httpx.Timeout(self.options.timeout, connect=15.0),
            follow_redirects=True,  # blob GETs may redirect to storage; httpx drops Authorization cross-origin
            headers={"User-Agent": f"ember/{__version__}"},
            limits=limits,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/v2/{self.repo}/{path}"

    # -- requests --------------------------------------------------------------------------------------------
    def request(self, method: str, url: str | httpx.URL, *, headers: dict[str, str] | None = None,
                content: bytes | None = None, stream: bool = False) -> httpx.Response:
        """Send a request, answering one 401 challenge; network failures become RegistryError."""
        for attempt in range(2):
            sent_auth = self._authorization
            hdrs = dict(headers or {})
            if sent_auth:
                hdrs["Authorization"] = sent_auth
            try:
                req = self._http.build_request(method, url, headers=hdrs, content=content)
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as e:
                raise self._transport_error(e) from e
            if resp.status_code == 401 and attempt == 0 and self._answer(resp, sent_auth):
                resp.close()
                continue
            return resp
        raise AssertionError("unreachable")

    def _transport_error(self, e: httpx.TransportError) -> RegistryError:
        hint = ""
        text = str(e) or type(e).__name__
        if self.base_url.startswith("https://") and ("SSL" in text or "ssl" in text or "record" in text):
            hint = " (for a plain-HTTP registry use --insecure)"
        return RegistryError(f"cannot reach registry {self.base_url}: {text}{hint}")

    def _answer(self, resp: httpx.Response, sent_auth: str | None) -> bool:
        """Set credentials from a 401 challenge; False if there is nothing new to try."""
        with self._auth_lock:
            if self._authorization != sent_auth:
                return True  # another thread already answered this challenge
            scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if scheme == "bearer" and params.get("realm"):
                if sent_auth and sent_auth.startswith("Bearer "):
                    return False  # a fresh token was refused: retrying will not help
                self._authorization = "Bearer " + self._token(params)
                return True
            if scheme == "basic" and self._credentials and not sent_auth:
                user, pw = self._credentials
                self._authorization = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
                return True
            return False

    def _token(self, challenge: dict[str, str]) -> str:
        realm = challenge["realm"]
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry sent an unusable token realm {realm!r}")
        params = {"scope": f"repository:{self.repo}:{self.actions}"}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        try:
            resp = self._http.get(realm, params=params, auth=self._credentials)
        except httpx.TransportError as e:
            raise RegistryError(f"cannot reach the registry's token server {realm}: {e}") from e
        if resp.status_code in (401, 403):
            raise RegistryError(self._auth_message("the token server refused the credentials"), resp.status_code)
        if resp.status_code != 200:
            raise RegistryError(f"token server {realm} answered {resp.status_code}", resp.status_code)
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm} sent no token")
        return token

    def _auth_message(self, what: str) -> str:
        if self._credentials is None:
            return (f"registry {self.base_url} requires authentication: "
                    f"set {USERNAME_ENV} and {PASSWORD_ENV}")
        return f"registry {self.base_url}: authentication failed ({what}); check {USERNAME_ENV}/{PASSWORD_ENV}"

    def error(self, resp: httpx.Response, what: str) -> RegistryError:
        """A one-line error from a registry answer, with its OCI error code when it sent one."""
        if resp.status_code == 401:
            return RegistryError(self._auth_message(f"{what} was refused"), 401)
        if resp.status_code == 403:
            return RegistryError(f"{what}: access denied by registry {self.base_url}", 403)
        detail = ""
        with contextlib.suppress(Exception):
            if not resp.is_stream_consumed:
                resp.read()
            errors = resp.json().get("errors") or []
            detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors[:3])
        return RegistryError(f"{what}: registry answered {resp.status_code}" + (f" ({detail})" if detail else ""),
                             resp.status_code)

    # -- manifests -------------------------------------------------------------------------------------------
    def get_manifest(self, tag: str) -> tuple[bytes, Manifest]:
        resp = self.request("GET", self.url(f"manifests/{tag}"), headers={"Accept": ", ".join(MANIFEST_TYPES)},
                            stream=True)
        try:
            if resp.status_code == 404:
                raise ModelNotFoundError(f"model '{self.repo}:{tag}' not found on registry {self.base_url}")
            if resp.status_code != 200:
                raise self.error(resp, f"fetching manifest {self.repo}:{tag}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
                raise EmberError(f"manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise EmberError(f"manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        except httpx.TransportError as e:
            raise self._transport_error(e) from e
        finally:
            resp.close()
        raw = bytes(data)
        try:
            manifest = parse_remote_manifest(raw, resp.headers.get("Content-Type"),
                                             resp.headers.get("Docker-Content-Digest"))
        except EmberError as e:
            raise EmberError(f"registry {self.base_url} sent a bad manifest for {self.repo}:{tag}: {e}") from e
        return raw, manifest

    def put_manifest(self, tag: str, raw: bytes, media_type: str) -> str:
        resp = self.request("PUT", self.url(f"manifests/{tag}"), headers={"Content-Type": media_type}, content=raw)
        if resp.status_code not in (200, 201):
            raise self.error(resp, f"pushing manifest {self.repo}:{tag}")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        echoed = resp.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise EmberError(f"registry stored manifest {echoed}, expected {digest}")
        return digest

    # -- blobs -----------------------------------------------------------------------------------------------
    def blob_exists(self, layer: Layer) -> bool:
        resp = self.request("HEAD", self.url(f"blobs/{layer.digest}"))
        if resp.status_code == 404:
            return False
        if resp.status_code != 200:
            raise self.error(resp, f"checking blob {layer.digest}")
        size = resp.headers.get("Content-Length")
        return size is None or size == str(layer.size)

    def open_range(self, digest: str, start: int, end: int) -> httpx.Response:
        """A streaming response for bytes [start, end] (inclusive) of a blob; the caller closes it."""
        return self.request("GET", self.url(f"blobs/{digest}"), headers={"Range": f"bytes={start}-{end}"},
                            stream=True)

    def upload_blob(self, layer: Layer, path: Path, on_bytes: Callable[[int], None]) -> None:
        """Chunked upload (POST, PATCH..., PUT ?digest=); resumes a chunk from the registry's Range on errors."""
        resp = self.request("POST", self.url("blobs/uploads/"))
        if resp.status_code != 202:
            raise self.error(resp, f"starting upload of {layer.digest}")
        location = self._location(resp)
        offset = 0
        failures = 0
        with open(path, "rb") as f:
            while offset < layer.size:
                f.seek(offset)
                data = f.read(min(self.options.chunk_size, layer.size - offset))
                if not data:
                    raise EmberError(f"{path} shrank while being pushed")
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Range": f"{offset}-{offset + len(data) - 1}"}
                try:
                    resp = self.request("PATCH", location, headers=headers, content=data)
                except RegistryError:
                    failures += 1
                    if failures > self.options.retries:
                        raise
                    time.sleep(0.5 * failures)
                    offset, location = self._upload_status(location)
                    continue
                if resp.status_code != 202:
                    raise self.error(resp, f"uploading {layer.digest}")
                location = self._location(resp)
                end = _range_end(resp.headers.get("Range"))
                new_offset = end + 1 if end is not None else offset + len(data)
                on_bytes(new_offset - offset)
                offset = new_offset
        put_url = httpx.URL(location).copy_merge_params({"digest": layer.digest})
        resp = self.request("PUT", put_url, headers={"Content-Type": "application/octet-stream"}, content=b"")
        if resp.status_code not in (201, 204):
            raise self.error(resp, f"finishing upload of {layer.digest}")

    def _upload_status(self, location: str) -> tuple[int, str]:
        resp = self.request("GET", location)
        if resp.status_code not in (200, 204):
            raise self.error(resp, "resuming an upload")
        end = _range_end(resp.headers.get("Range"))
        return (end + 1 if end is not None else 0), self._location(resp, default=location)

    def _location(self, resp: httpx.Response, default: str | None = None) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            if default is not None:
                return default
            raise EmberError(f"registry {self.base_url} sent no upload Location")
        return str(resp.url.join(loc))


def _range_end(header: str | None) -> int | None:
    """`0-1023` (what registries send in Range on uploads) -> 1023."""
    m = re.fullmatch(r"(?:bytes=)?0-(\d+)", (header or "").strip())
    return int(m.group(1)) if m else None


_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


# ---- resumable, parallel blob download -----------------------------------------------------------------------


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
            raise self.client._transport_error(e) from e
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
        progress({"status": f"pulling {_short(d.layer.digest)}", "digest": d.layer.digest,
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
                        progress({"status": f"pulling {_short(d.layer.digest)}", "digest": d.layer.digest,
                                  "total": d.layer.size, "completed": reported})
            except BaseException:  # an error or Ctrl-C: stop the other ranges, keep what is on disk
                d.cancel.set()
                for f in pending:
                    f.cancel()
                raise


# ---- pull ---------------------------------------------------------------------------------------------------


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
    progress = progress or _quiet
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

    blobs = _manifest_blobs(manifest)
    missing = [layer for layer in blobs if not has_blob(layer.digest, layer.size)]
    present = sum(layer.size for layer in blobs if layer not in missing)
    for layer in blobs:
        if layer not in missing:
            progress({"status": f"pulling {_short(layer.digest)}", "digest": layer.digest, "total": layer.size,
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


# ---- push ---------------------------------------------------------------------------------------------------


def push(
    name: str,
    *,
    insecure: bool = False,
    progress: ProgressFn | None = None,
    username: str | None = None,
    password: str | None = None,
    options: TransferOptions | None = None,
) -> PushResult:
    """`ember push` / POST /api/push: upload a local model's blobs (skipping those the registry has) and its
    manifest, byte for byte, so the pulled copy has the same ID."""
    progress = progress or _quiet
    parsed = parse_name(name)
    path = manifest_path(parsed)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFoundError(f"model '{name}' not found") from None
    try:
        manifest = parse_remote_manifest(raw)
    except EmberError as e:
        raise EmberError(f"model '{parsed}' has a manifest a registry would reject: {e}") from e
    blobs = _manifest_blobs(manifest)
    for layer in blobs:
        if not has_blob(layer.digest, layer.size):
            raise EmberError(f"model '{parsed}' is incomplete: blob {layer.digest} is missing")
    progress({"status": "retrieving manifest"})
    media_type = json.loads(raw).get("mediaType") or MANIFEST_MEDIA_TYPE
    uploaded = skipped = 0
    with RegistryClient(registry_url(parsed, insecure), repository(parsed), actions="pull,push",
                        username=username, password=password, options=options) as client:
        for layer in blobs:
            status = {"status": f"pushing {_short(layer.digest)}", "digest": layer.digest, "total": layer.size}
            if client.blob_exists(layer):
                skipped += layer.size
                progress({**status, "completed": layer.size})
                continue
            progress({**status, "completed": 0})
            sent = 0

            def on_bytes(n: int, status: Event = status) -> None:
                nonlocal sent
                sent += n
                progress({**status, "completed": sent})

            client.upload_blob(layer, blob_path(layer.digest), on_bytes)
            uploaded += layer.size
            if sent != layer.size:  # the registry's Range may run ahead of or behind our count; end exact
                progress({**status, "completed": layer.size})
        progress({"status": "pushing manifest"})
        digest = client.put_manifest(parsed.tag, raw, media_type)
    progress({"status": "success"})
    return PushResult(name=parsed, digest=digest, uploaded=uploaded, skipped=skipped)


def stale_partials() -> Iterator[Path]:
    """Partial downloads in the store (what `prune` may clear when nothing is pulling)."""
    blobs = home().blobs
    if blobs.is_dir():
        yield from sorted(blobs.glob(PARTIAL_PREFIX + "*"))


__all__ = [
    "MAX_MANIFEST_BYTES",
    "PullResult",
    "PushResult",
    "RegistryClient",
    "RegistryError",
    "TransferOptions",
    "parse_challenge",
    "parse_remote_manifest",
    "partial_paths",
    "pull",
    "push",
    "registry_url",
]
