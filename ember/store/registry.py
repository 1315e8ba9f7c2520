"""Registry: pull and push models over the OCI distribution API, the protocol Ollama's registry speaks. This
module is the entry point; the work is split by concern:

    registry_client  addresses, the HTTP client with token/basic auth, manifests (validation), blob probes
    registry_pull    pull: parallel HTTP Range downloads into the store, resumed after an interruption
    registry_push    push: chunked uploads of the blobs a registry lacks, then the manifest

A model `host/namespace/model:tag` is the repository `namespace/model` on `host`, reference `tag`. Names
without a host (`smollm2`, `alice/tiny`) go to the registry named by $EMBER_REGISTRY; catalogue names without
a host keep coming from the offline catalogue (`pull` dispatches).

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
"""
from __future__ import annotations

from ember.store.registry_client import (
    MAX_MANIFEST_BYTES,
    Event,
    ProgressFn,
    RegistryClient,
    RegistryError,
    TransferOptions,
    parse_challenge,
    parse_remote_manifest,
    registry_url,
)
from ember.store.registry_pull import PARTIAL_PREFIX, PullResult, partial_paths, pull, stale_partials
from ember.store.registry_push import PushResult, push

__all__ = [
    "MAX_MANIFEST_BYTES",
    "PARTIAL_PREFIX",
    "Event",
    "ProgressFn",
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
    "stale_partials",
]
