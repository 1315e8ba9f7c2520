"""Talking to a running `ember serve` from the CLI (`ember ps`, `ember stop`, and `ember run` when a server
answers on EMBER_HOST). Standard library only: the CLI must not need an HTTP package to find out there is no
server.

`RemoteModel` stands in for `ember.api.Model` in `ember run`'s Session: the same `chat(..., stream=True)`,
`n_ctx` and `info()`, answered by the server's /api/chat and /api/show (so a model the server has loaded is
shared, not loaded a second time in this process).
"""
from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

from ember.engine.generator import Chunk, Completion, Stats
from ember.errors import ContextOverflowError, EmberError, InvalidParameterError, ModelNotFoundError
from ember.server import base_url

PROBE_TIMEOUT = 0.5  # seconds to decide there is no server: `ember run` must not hang on a dead address
_ERRORS = {400: InvalidParameterError, 404: ModelNotFoundError}


class ServerClient:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        self.url = (url or base_url(os.environ.get("EMBER_HOST"))).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("EMBER_API_KEY")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise _error(e.code, e.read()) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            reason = getattr(e, "reason", e)
            raise EmberError(f"could not connect to the ember server at {self.url} ({reason}); "
                             f"is `ember serve` running?") from None

    def is_ember(self) -> bool:
        """True when an Ember server answers at this address (not Ollama or anything else on the port)."""
        try:
            with self._request("GET", "/", timeout=PROBE_TIMEOUT) as r:
                return r.read(64).startswith(b"Ember is running")
        except EmberError:
            return False

    def get(self, path: str) -> Any:
        with self._request("GET", path) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        with self._request("POST", path, body) as r:
            return json.loads(r.read())

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """NDJSON objects; closing the iterator closes the connection, which cancels the request server-side."""
        r = self._request("POST", path, body)
        try:
            for line in r:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if "error" in obj:
                    raise EmberError(str(obj["error"]))
                yield obj
        finally:
            r.close()


def _error(status: int, raw: bytes) -> EmberError:
    try:
        message = json.loads(raw).get("error", "")
        if isinstance(message, dict):
            message = message.get("message", "")
    except (ValueError, AttributeError):
        message = raw.decode("utf-8", "replace").strip()
    message = message or f"HTTP {status}"
    if "context window" in message:
        return ContextOverflowError(message)
    return _ERRORS.get(status, EmberError)(message)


# Session options (api.Model.chat keywords) -> Ollama options.
_OPTION_NAMES = {"max_tokens": "num_predict"}


class RemoteStream:
    """Chunks of one streamed chat answer; `.result` is set at the end, `close()` cancels it."""

    def __init__(self, objs: Iterator[dict[str, Any]]):
        self._objs = objs
        self._gen = self._chunks()
        self.result: Completion | None = None

    def _chunks(self) -> Iterator[Chunk]:
        text = []
        for obj in self._objs:
            piece = obj.get("message", {}).get("content", "")
            if piece:
                text.append(piece)
                yield Chunk(piece, -1)
            if obj.get("done"):
                ns = 1e-9
                stats = Stats(prompt_tokens=obj.get("prompt_eval_count", 0),
                              prompt_seconds=obj.get("prompt_eval_duration", 0) * ns,
                              generated_tokens=obj.get("eval_count", 0),
                              generate_seconds=obj.get("eval_duration", 0) * ns,
                              load_seconds=obj.get("load_duration", 0) * ns)
                self.result = Completion("".join(text), [], obj.get("done_reason", "stop"), stats)

    def __iter__(self) -> "RemoteStream":
        return self

    def __next__(self) -> Chunk:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        close = getattr(self._objs, "close", None)
        if close is not None:
            close()


@dataclass
class RemoteModel:
    client: ServerClient
    name: str
    n_ctx: int
    path: str = ""

    def chat(self, messages: list[dict[str, Any]], stream: bool = True, **options: Any) -> RemoteStream:
        opts = {_OPTION_NAMES.get(k, k): v for k, v in options.items()}
        opts["num_ctx"] = self.n_ctx
        objs = self.client.stream("/api/chat", {"model": self.name, "messages": messages, "options": opts})
        return RemoteStream(objs)

    def info(self) -> dict[str, Any]:
        show = self.client.post("/api/show", {"model": self.name})
        mi = show.get("model_info", {})
        arch = mi.get("general.architecture", show.get("details", {}).get("family", ""))
        return {
            "name": self.name,
            "path": self.path or f"{self.client.url} (ember serve)",
            "architecture": arch,
            "parameters": mi.get("general.parameter_count", 0),
            "context_length": mi.get(f"{arch}.context_length", 0),
            "n_ctx": self.n_ctx,
            "embedding_length": mi.get(f"{arch}.embedding_length", 0),
            "quantization": show.get("details", {}).get("quantization_level", ""),
            "chat_template": show.get("template", ""),
        }

    def close(self) -> None:
        pass


def connect_model(name: str, n_ctx: int | None, client: ServerClient | None = None) -> RemoteModel | None:
    """Load `name` on the server at EMBER_HOST and return a handle, or None if no Ember server answers."""
    client = client or ServerClient()
    if not client.is_ember():
        return None
    body: dict[str, Any] = {"model": name, "messages": []}  # empty messages: just load
    if n_ctx:
        body["options"] = {"num_ctx": n_ctx}
    client.post("/api/chat", body)
    key = name.lower() if ":" in name else f"{name.lower()}:latest"
    ctx = n_ctx or 0
    for m in client.get("/api/ps").get("models", []):
        if m.get("name") in (name, key) or m.get("name", "").endswith("/" + key):
            ctx = m.get("context_length") or ctx
    return RemoteModel(client, name, int(ctx or 4096))
