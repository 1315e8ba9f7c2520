"""API keys: `Authorization: Bearer <key>` on every route but liveness.

Keys come from EMBER_API_KEYS (comma-separated) and/or EMBER_API_KEY_FILE (one key per line, `#` comments).
With no key configured the server is open, as Ollama's is. Keys are compared in constant time.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Mapping

from ember.errors import EmberError
from ember.server.errors import APIError

# Liveness probes and version checks must work without a key (load balancers, `ember run`'s server check).
PUBLIC_PATHS = frozenset({"/", "/health", "/api/version"})


def load_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get("EMBER_API_KEYS", "").split(",") if k.strip()]
    path = env.get("EMBER_API_KEY_FILE", "").strip()
    if path:
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise EmberError(f"cannot read EMBER_API_KEY_FILE {path}: {e.strerror or e}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return tuple(dict.fromkeys(keys))


class KeyChecker:
    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def is_public(self, method: str, path: str) -> bool:
        return method == "OPTIONS" or (method in ("GET", "HEAD") and path in PUBLIC_PATHS)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 APIError unless the header carries a configured key."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        given = token.strip().encode()
        # Compare against every key (no early exit) so timing does not reveal which prefix matched.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "invalid API key", "invalid_api_key")
