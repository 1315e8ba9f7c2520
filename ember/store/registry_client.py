"""Registry client: one repository on one OCI distribution registry (the protocol Ollama's registry speaks) -
addresses, requests with authentication, manifests and blob probes. Pulling is ember.store.registry_pull,
pushing ember.store.registry_push; ember.store.registry is the entry point.

A model `host/namespace/model:tag` is the repository `namespace/model` on `host`, reference `tag`. Names
without a host (`smollm2`, `alice/tiny`) go to the registry named by $EMBER_REGISTRY.

| step           | request                                               | success | notes                            |
|----------------|-------------------------------------------------------|---------|----------------------------------|
| get manifest   | GET  /v2/<repo>/manifests/<tag>                       | 200     | Accept: Docker v2 / OCI manifest |
| blob exists    | HEAD /v2/<repo>/blobs/<digest>                        | 200     | Content-Length is the size       |
| get blob range | GET  /v2/<repo>/blobs/<digest>, Range: bytes=<a>-<b>  | 206     | may redirect to storage          |
| put manifest   | PUT  /v2/<repo>/manifests/<tag>                       | 201     | Content-Type: the manifest type  |

(Uploads - POST, PATCH, PUT ?digest= - are in ember.store.registry_push.)

Authentication answers the registry's 401 challenge (WWW-Authenticate), once per client:

| challenge                           | answer                                                                     |
|-------------------------------------|----------------------------------------------------------------------------|
| Bearer realm=..,service=..,scope=.. | GET realm?service=..&scope=repository:<repo>:<actions> (with the basic     |
|                                     | credentials, if any) -> {"token"} or {"access_token"}; then Bearer <token> |
| Basic realm=..                      | Authorization: Basic <credentials>                                         |

Credentials come from $EMBER_REGISTRY_USERNAME / $EMBER_REGISTRY_PASSWORD (or the `username`/`password`
arguments). Plain HTTP only with `insecure` (or an explicit http:// in $EMBER_REGISTRY).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ember import __version__
from ember.errors import EmberError, ModelNotFoundError
from ember.store.manifests import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, Layer, Manifest
from ember.store.names import DEFAULT_HOST, ModelName

Event = dict[str, Any]  # one of Ollama's progress status objects (table in ember.store.registry)
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


def quiet(event: Event) -> None:
    """A progress callback that shows nothing."""


def short_digest(digest: str) -> str:
    """The 12 hex digits Ollama's progress statuses name a blob by."""
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


def manifest_blobs(manifest: Manifest) -> list[Layer]:
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
                raise self.transport_error(e) from e
            if resp.status_code == 401 and attempt == 0 and self._answer(resp, sent_auth):
                resp.close()
                continue
            return resp
        raise AssertionError("unreachable")

    def transport_error(self, e: httpx.TransportError) -> RegistryError:
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
            raise self.transport_error(e) from e
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
