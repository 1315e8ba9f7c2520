"""Pushing a model to a registry: each blob the registry lacks as a chunked upload, then the manifest byte for
byte (so the pulled copy has the same ID). The other requests are ember.store.registry_client's.

| step           | request                                               | success | notes                            |
|----------------|-------------------------------------------------------|---------|----------------------------------|
| start upload   | POST /v2/<repo>/blobs/uploads/                        | 202     | Location: the upload URL         |
| upload a chunk | PATCH <location>, Content-Range: <a>-<b>              | 202     | new Location; Range: 0-<b>       |
| upload status  | GET <location>                                        | 204     | Range: 0-<b>: where to resume    |
| finish upload  | PUT <location>?digest=<digest>                        | 201     | the registry checks the digest   |

Progress events (Ollama's status objects), in this order: "retrieving manifest" (the local one is read);
"pushing <12 hex digits>" with digest, total and completed, per blob (completed == total at once when the
registry already has it); "pushing manifest"; "success".
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from ember.errors import EmberError
from ember.store.blobs import blob_path, has_blob
from ember.store.manifests import MANIFEST_MEDIA_TYPE, Layer, local_manifest_bytes
from ember.store.names import ModelName
from ember.store.registry_client import (
    Event,
    ProgressFn,
    RegistryClient,
    RegistryError,
    TransferOptions,
    manifest_blobs,
    parse_remote_manifest,
    quiet,
    registry_url,
    repository,
    short_digest,
)


@dataclass(frozen=True)
class PushResult:
    name: ModelName
    digest: str  # the manifest's sha256
    uploaded: int = 0  # bytes sent
    skipped: int = 0  # bytes the registry already had


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
    progress = progress or quiet
    parsed, _, raw = local_manifest_bytes(name)
    try:
        manifest = parse_remote_manifest(raw)
    except EmberError as e:
        raise EmberError(f"model '{parsed}' has a manifest a registry would reject: {e}") from e
    blobs = manifest_blobs(manifest)
    for layer in blobs:
        if not has_blob(layer.digest, layer.size):
            raise EmberError(f"model '{parsed}' is incomplete: blob {layer.digest} is missing")
    progress({"status": "retrieving manifest"})
    media_type = json.loads(raw).get("mediaType") or MANIFEST_MEDIA_TYPE
    uploaded = skipped = 0
    with RegistryClient(registry_url(parsed, insecure), repository(parsed), actions="pull,push",
                        username=username, password=password, options=options) as client:
        for layer in blobs:
            status = {"status": f"pushing {short_digest(layer.digest)}", "digest": layer.digest, "total": layer.size}
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

            upload_blob(client, layer, blob_path(layer.digest), on_bytes)
            uploaded += layer.size
            if sent != layer.size:  # the registry's Range may run ahead of or behind our count; end exact
                progress({**status, "completed": layer.size})
        progress({"status": "pushing manifest"})
        digest = client.put_manifest(parsed.tag, raw, media_type)
    progress({"status": "success"})
    return PushResult(name=parsed, digest=digest, uploaded=uploaded, skipped=skipped)


def upload_blob(client: RegistryClient, layer: Layer, path: Path, on_bytes: Callable[[int], None]) -> None:
    """Chunked upload (POST, PATCH..., PUT ?digest=); resumes a chunk from the registry's Range on errors."""
    resp = client.request("POST", client.url("blobs/uploads/"))
    if resp.status_code != 202:
        raise client.error(resp, f"starting upload of {layer.digest}")
    location = _location(client, resp)
    offset = 0
    failures = 0
    with open(path, "rb") as f:
        while offset < layer.size:
            f.seek(offset)
            data = f.read(min(client.options.chunk_size, layer.size - offset))
            if not data:
                raise EmberError(f"{path} shrank while being pushed")
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{offset}-{offset + len(data) - 1}"}
            try:
                resp = client.request("PATCH", location, headers=headers, content=data)
            except RegistryError:
                failures += 1
                if failures > client.options.retries:
                    raise
                time.sleep(0.5 * failures)
                offset, location = _upload_status(client, location)
                continue
            if resp.status_code != 202:
                raise client.error(resp, f"uploading {layer.digest}")
            location = _location(client, resp)
            end = _range_end(resp.headers.get("Range"))
            new_offset = end + 1 if end is not None else offset + len(data)
            on_bytes(new_offset - offset)
            offset = new_offset
    put_url = httpx.URL(location).copy_merge_params({"digest": layer.digest})
    resp = client.request("PUT", put_url, headers={"Content-Type": "application/octet-stream"}, content=b"")
    if resp.status_code not in (201, 204):
        raise client.error(resp, f"finishing upload of {layer.digest}")


def _upload_status(client: RegistryClient, location: str) -> tuple[int, str]:
    resp = client.request("GET", location)
    if resp.status_code not in (200, 204):
        raise client.error(resp, "resuming an upload")
    end = _range_end(resp.headers.get("Range"))
    return (end + 1 if end is not None else 0), _location(client, resp, default=location)


def _location(client: RegistryClient, resp: httpx.Response, default: str | None = None) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        if default is not None:
            return default
        raise EmberError(f"registry {client.base_url} sent no upload Location")
    return str(resp.url.join(loc))


def _range_end(header: str | None) -> int | None:
    """`0-1023` (what registries send in Range on uploads) -> 1023."""
    m = re.fullmatch(r"(?:bytes=)?0-(\d+)", (header or "").strip())
    return int(m.group(1)) if m else None
