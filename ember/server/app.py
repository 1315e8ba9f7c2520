"""The app factory: configuration, the routes table, middleware, error mapping and the uvicorn runner.

Configuration (environment, read by ServerConfig.from_env):

| variable                  | default              | meaning                                                  |
|---------------------------|----------------------|----------------------------------------------------------|
| EMBER_HOST                | 127.0.0.1:11434      | where to listen (host, host:port, :port)                 |
| EMBER_ORIGINS             | loopback origins     | extra CORS origins, comma-separated ("*" for any)        |
| EMBER_API_KEYS            | none (open)          | comma-separated bearer keys                              |
| EMBER_API_KEY_FILE        | none                 | file with one key per line                               |
| EMBER_KEEP_ALIVE          | 5m                   | default keep_alive                                       |
| EMBER_MAX_LOADED_MODELS   | 3                    | models in memory at once (LRU eviction)                  |
| EMBER_MAX_MEMORY          | 80% of RAM           | memory budget for loaded models, bytes (K/M/G suffixes)  |
| EMBER_MAX_QUEUE           | 512                  | requests in flight before 503                            |
| EMBER_NUM_THREADS         | Ember's default      | torch threads                                            |
| EMBER_CONTEXT_LENGTH      | model's (<= 4096)    | default num_ctx                                          |
| EMBER_MAX_REQUEST_BYTES   | 32M                  | request body limit (413 above; not for blob uploads)     |
| EMBER_SPECULATIVE         | draft if DRAFT, else none | speculative decoding: none, ngram (prompt lookup), draft |

Middleware, outermost first: access log + request metrics (sees every answer, 401s included), CORS (answers
preflights before auth), then auth and the body-size limit. All are plain ASGI, so streamed responses and
client disconnects pass through untouched.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.errors import EmberError, InvalidParameterError
from ember.server import ollama_api, openai_api, parse_host, store_api
from ember.server.auth import KeyChecker, load_keys
from ember.server.errors import APIError, error_response
from ember.server.streaming import ClientGone
from ember.server.metrics import CONTENT_TYPE, Gauge, Metrics
from ember.server.models import DEFAULT_KEEP_ALIVE, ManagerConfig, ModelManager, parse_keep_alive, rfc3339

access_log = logging.getLogger("ember.access")

# Ollama's default: browsers may call from pages served on this machine (and desktop app schemes).
_LOOPBACK_ORIGINS = (r"(https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?"
                     r"|(app|file|tauri|vscode-webview)://.*)")
_BLOB_PATH = "/api/blobs/"
_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)i?b?", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise InvalidParameterError(f"not a size: {text!r} (use bytes, or K/M/G/T suffixes)")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 11434
    origins: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    keep_alive: float | None = DEFAULT_KEEP_ALIVE
    max_loaded: int = 3
    max_memory: int = 0
    max_queue: int = 512
    threads: int | None = None
    n_ctx: int | None = None
    speculative: str | None = None  # None: "draft" for models with a DRAFT, else none
    max_request_bytes: int = 32 << 20
    access_log: bool = True
    models: dict[str, Any] = field(default_factory=dict)  # alias -> ModelSpec, registered at startup

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServerConfig":
        env = os.environ if environ is None else environ
        host, port = parse_host(env.get("EMBER_HOST"))

        def num(name: str, default: int | None) -> int | None:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise InvalidParameterError(f"{name} must be an integer, got {raw!r}") from None

        cfg = cls(
            host=host, port=port,
            origins=tuple(o.strip() for o in env.get("EMBER_ORIGINS", "").split(",") if o.strip()),
            api_keys=load_keys(env),
            keep_alive=parse_keep_alive(env["EMBER_KEEP_ALIVE"]) if env.get("EMBER_KEEP_ALIVE") else DEFAULT_KEEP_ALIVE,
            max_loaded=num("EMBER_MAX_LOADED_MODELS", 3) or 3,
            max_memory=parse_bytes(env["EMBER_MAX_MEMORY"]) if env.get("EMBER_MAX_MEMORY") else 0,
            max_queue=num("EMBER_MAX_QUEUE", 512) or 512,
            threads=num("EMBER_NUM_THREADS", None),
            n_ctx=num("EMBER_CONTEXT_LENGTH", None),
            max_request_bytes=parse_bytes(env.get("EMBER_MAX_REQUEST_BYTES", "32M")),
            speculative=env.get("EMBER_SPECULATIVE", "").strip() or None,
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    def manager_config(self) -> ManagerConfig:
        return ManagerConfig(keep_alive=self.keep_alive, max_loaded=self.max_loaded, max_memory=self.max_memory,
                             max_queue=self.max_queue, threads=self.threads, n_ctx=self.n_ctx,
                             speculative=self.speculative)


# -- liveness ---------------------------------------------------------------------------------------------------
async def root(request: Request) -> Response:
    return PlainTextResponse("Ember is running")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "loaded_models": len(request.app.state.manager.loaded)})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


# The routes table: path, methods, handler. GET routes answer HEAD too (Starlette adds it).
ROUTES: list[tuple[str, list[str], Any]] = [
    ("/", ["GET"], root),
    ("/health", ["GET"], health),
    ("/metrics", ["GET"], metrics),
    *ollama_api.ROUTES,
    *store_api.ROUTES,
    *openai_api.ROUTES,
]


# -- middleware -------------------------------------------------------------------------------------------------
class GuardMiddleware:
    """API keys and the request-size limit (Content-Length; chunked bodies are counted in read_json)."""

    def __init__(self, app: ASGIApp, keys: KeyChecker, max_bytes: int):
        self.app, self.keys, self.max_bytes = app, keys, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if self.keys.enabled and not self.keys.is_public(method, path):
                self.keys.check(headers.get("authorization"))
            length = headers.get("content-length", "")
            # Blob uploads are model weights (gigabytes), streamed to disk: the JSON body limit is not for them.
            if not path.startswith(_BLOB_PATH) and length.isdigit() and int(length) > self.max_bytes:
                raise APIError(413, f"request body is larger than {self.max_bytes} bytes", "request_too_large")
        except APIError as e:
            extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return await error_response(path, e, extra)(scope, receive, send)
        await self.app(scope, receive, send)


class AccessMiddleware:
    """One JSON access-log line and the request metrics per request, written when the response ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[Route], enabled: bool):
        self.app, self.metrics, self.routes, self.enabled = app, metrics, routes, enabled

    def endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"  # unknown paths share one label: a scanner must not blow up the series count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500
        sent = 0

        async def watch(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            seconds = time.monotonic() - started
            endpoint = self.endpoint(scope)
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            self.metrics.request_seconds.observe(seconds, endpoint=endpoint)
            if self.enabled and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(json.dumps({
                    "time": rfc3339(time.time()), "method": scope["method"], "path": scope["path"],
                    "status": status, "duration_ms": round(seconds * 1000, 3), "bytes": sent,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "user_agent": next((v.decode("latin-1") for k, v in scope["headers"] if k == b"user-agent"), None),
                }))


# -- errors -----------------------------------------------------------------------------------------------------
async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": only the log and metrics see it
    if isinstance(exc, HTTPException):
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail)), exc.headers)
    if not isinstance(exc, (APIError, EmberError)):
        logging.getLogger("ember.server").exception("unhandled error on %s", request.url.path)
    return error_response(request.url.path, exc)


# -- the app ----------------------------------------------------------------------------------------------------
def _guarded(handler: Any) -> Any:
    """Errors become dialect-shaped responses inside the route, so the outer middleware sees a normal answer
    (Starlette's catch-all handler would re-raise past it)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - every error gets an answer; _on_error logs the unexpected
            return await _on_error(request, exc)

    endpoint.__name__ = handler.__name__
    return endpoint


def _gauges(manager: ModelManager) -> list[Gauge]:
    def per_model(pick: Any) -> Any:
        def collect() -> list[tuple[dict[str, str], float]]:
            rows = []
            for lm in list(manager.loaded.values()):
                s = lm.model.engine.stats()
                rows.append(({"model": lm.name}, pick(s)))
            return rows
        return collect

    return [
        Gauge("ember_queue_depth", "Sequences waiting in the engine's scheduler.", per_model(lambda s: s.num_waiting)),
        Gauge("ember_running_sequences", "Sequences in the running batch.", per_model(lambda s: s.num_running)),
        Gauge("ember_kv_cache_usage_ratio", "KV cache blocks in use over all blocks.",
              per_model(lambda s: (s.num_blocks - s.num_free_blocks) / s.num_blocks if s.num_blocks else 0.0)),
        Gauge("ember_in_flight_requests", "Requests admitted and not finished.", lambda: [({}, manager.in_flight)]),
        Gauge("ember_loaded_models", "Models in memory.", lambda: [({}, len(manager.loaded))]),
        Gauge("ember_speculative_draft_tokens", "Draft tokens proposed and verified (speculative decoding).",
              per_model(lambda s: s.spec_drafted)),
        Gauge("ember_speculative_accepted_tokens", "Draft tokens the model accepted.",
              per_model(lambda s: s.spec_accepted)),
        Gauge("ember_speculative_acceptance_ratio", "Accepted over proposed draft tokens.",
              per_model(lambda s: s.spec_accepted / s.spec_drafted if s.spec_drafted else 0.0)),
        Gauge("ember_speculative_tokens_per_step", "Tokens emitted per verification pass.",
              per_model(lambda s: s.spec_emitted / s.spec_steps if s.spec_steps else 0.0)),
    ]


def create_app(config: ServerConfig | None = None, manager: ModelManager | None = None) -> Starlette:
    config = config or ServerConfig.from_env()
    manager = manager or ModelManager(config.manager_config())
    for alias, spec in config.models.items():
        manager.register(alias, spec)
    metrics_ = Metrics()
    metrics_.gauges = _gauges(manager)
    routes = [Route(path, _guarded(handler), methods=methods) for path, methods, handler in ROUTES]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            await manager.stop()

    origins = list(config.origins)
    middleware = [
        Middleware(AccessMiddleware, metrics=metrics_, routes=routes, enabled=config.access_log),
        Middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=None if "*" in origins
                   else _LOOPBACK_ORIGINS, allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                   allow_headers=["*"]),
        Middleware(GuardMiddleware, keys=KeyChecker(config.api_keys), max_bytes=config.max_request_bytes),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _on_error})
    app.state.config = config
    app.state.manager = manager
    app.state.metrics = metrics_
    return app


# -- running ----------------------------------------------------------------------------------------------------
def _uvicorn_server(app: Starlette, host: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         lifespan="on", timeout_graceful_shutdown=5))


def run_server(config: ServerConfig, sockets: list[Any] | None = None) -> None:
    """Serve until interrupted (the `ember serve` command); `sockets`: already bound listening sockets."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    server = _uvicorn_server(create_app(config), config.host, config.port)
    server.run(sockets=sockets)


class ServerThread:
    """A server on a background thread (tests, benchmarks): `.url`, `.app`, `.stop()`."""

    def __init__(self, app: Starlette, host: str, port: int):
        self.app = app
        self.server = _uvicorn_server(app, host, port)
        self.thread = threading.Thread(target=self.server.run, name="ember-server", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_in_thread(config: ServerConfig | None = None, manager: ModelManager | None = None,
                    host: str = "127.0.0.1", port: int = 0) -> ServerThread:
    """Start a server on `host:port` (0: a free port) in this process; returns once it accepts connections."""
    return ServerThread(create_app(config, manager), host, port).start()
