"""Ollama's store endpoints (/api/pull, push, create, copy, delete, blobs), routed to ember.store.

| route                        | request fields                                    | answer                          |
|------------------------------|---------------------------------------------------|---------------------------------|
| POST /api/pull               | model (or name), insecure, stream (default true)  | NDJSON progress, or {"status"}  |
| POST /api/push               | model (or name), insecure, stream (default true)  | NDJSON progress, or {"status"}  |
| POST /api/create             | model, from, files, template, system,             | NDJSON progress, or {"status"}  |
|                              | parameters, messages, license, quantize, stream;  |                                 |
|                              | or the legacy `modelfile` text                    |                                 |
| POST /api/copy               | source, destination                               | 200, empty body                 |
| DELETE /api/delete           | model (or name)                                   | 200, empty; 404 if not there    |
| HEAD /api/blobs/sha256:<hex> |                                                   | 200 if the store has it, or 404 |
| POST /api/blobs/sha256:<hex> | its bytes (not bound by the JSON body limit)      | 201 (200 if already there)      |

Progress objects are the store's own events ({"status", "digest", "total", "completed"}), forwarded as they
come. The store reports progress from the thread doing the work, so each operation runs in a worker thread and
its events cross to the event loop through a queue. An error before the first event answers with its HTTP
status (a missing model is a 404, not a 200 stream); an error after it is a final {"error"} line, as Ollama's.
When the client goes away mid-stream, the next progress call raises in the worker and the operation stops the
way an interrupted CLI command does (a pull keeps its partial data to resume, a create removes its blobs).

A model is built only from a store model or an uploaded blob: `from` and a legacy Modelfile's FROM may not
name a file on the server's disk (a remote client must not read the server's files), and `files` maps file
names to blob digests as Ollama's clients send them. Templates are Ember's Jinja chat templates.
"""
from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.errors import EmberError, ModelNotFoundError
from ember.server.errors import APIError, as_api_error
from ember.server.options import flag, model_field, read_json
from ember.server.streaming import ndjson_stream
from ember.store import create as store_create
from ember.store import registry
from ember.store.blobs import check_digest, has_blob
from ember.store.modelfile import Message, Modelfile, ModelfileError, add_parameter, parse_modelfile
from ember.store.names import ModelName, parse_name

Event = dict[str, Any]
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_DONE = object()  # end-of-stream marker on the progress queue


class _ClientLeft(Exception):
    """Raised inside the worker's progress callback once nobody reads the events: stops the operation."""


# -- request fields -------------------------------------------------------------------------------------------
def _name(value: Any, field: str = "model") -> ModelName:
    """A valid store name, or 400: parse_name's ModelNotFoundError (a 404) is wrong for a malformed name."""
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{field} is required")
    try:
        return parse_name(value.strip())
    except ModelNotFoundError as e:
        raise APIError(400, str(e)) from None


def _full(name: ModelName) -> str:
    # The fully qualified spelling: create's FROM would take a bare word that happens to be a file in the
    # server's working directory for a path.
    return f"{name.host}/{name.namespace}/{name.model}:{name.tag}"


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"'{key}' must be a string")
    return value


def _blob_from(value: str) -> str | None:
    m = _DIGEST.fullmatch(value.strip().lstrip("@"))
    return f"sha256:{m.group(1)}" if m else None


def _source(value: str) -> str:
    """A FROM value the server may use: a blob digest or a store model name (never a server-side path)."""
    digest = _blob_from(value)
    if digest is not None:
        return digest
    if value.lower().endswith(".gguf") or value.startswith(("/", ".", "~")) or "\\" in value:
        raise APIError(400, f"'from' must be a model name or a blob digest, not a file path ({value!r}): "
                            "upload the file with POST /api/blobs/<digest> and name it in 'files'")
    return _full(_name(value, "from"))


def _modelfile(body: dict[str, Any]) -> Modelfile:
    """Ollama's create request as a Modelfile (see the module doc for what `from` may be)."""
    legacy = _text(body, "modelfile")
    if legacy is not None and body.get("from") is None and body.get("files") is None:
        mf = parse_modelfile(legacy)
        return Modelfile(from_=_source(mf.from_), parameters=mf.parameters, template=mf.template,
                         system=mf.system, messages=mf.messages, licenses=mf.licenses)
    if body.get("adapters"):
        raise APIError(400, "adapters (LoRA) are not supported")
    base = _text(body, "from")
    files = body.get("files")
    if base:  # as Ollama: `from` wins over `files`
        from_ = _source(base)
    elif files:
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise APIError(400, "'files' must map file names to blob digests")
        ggufs = [d for f, d in files.items() if f.lower().endswith(".gguf")] or list(files.values())
        if len(ggufs) != 1:
            raise APIError(400, "'files' must hold exactly one GGUF file (safetensors are not supported)")
        digest = _blob_from(ggufs[0])
        if digest is None:
            raise APIError(400, f"invalid digest {ggufs[0]!r} in 'files'")
        from_ = digest
    else:
        raise APIError(400, "neither 'from' nor 'files' was specified")
    template = _text(body, "template")
    if template and ("{{ ." in template or "{{." in template):
        raise APIError(400, "Ember's templates are Jinja chat templates; Go templates are not supported")
    params: dict[str, Any] = {}
    raw_params = body.get("parameters") or {}
    if not isinstance(raw_params, dict):
        raise APIError(400, "'parameters' must be an object")
    for key, value in raw_params.items():
        if value is not None:
            add_parameter(params, key, value)  # ModelfileError on unknown names or bad values
    messages = []
    for i, m in enumerate(body.get("messages") or []):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
        messages.append(Message(m["role"], m["content"]))
    license_ = body.get("license")
    licenses = [license_] if isinstance(license_, str) else (license_ or [])
    if not isinstance(licenses, list) or not all(isinstance(t, str) for t in licenses):
        raise APIError(400, "'license' must be a string or a list of strings")
    return Modelfile(from_=from_, parameters=params, template=template or None, system=_text(body, "system"),
                     messages=tuple(messages), licenses=tuple(licenses))


# -- progress streams -----------------------------------------------------------------------------------------
def _store_error(exc: BaseException) -> APIError:
    """Store errors with Ollama's statuses: a bad Modelfile is the client's fault, a registry's 4xx is passed on."""
    if isinstance(exc, ModelfileError):
        return APIError(400, str(exc))
    if isinstance(exc, registry.RegistryError) and exc.status in (401, 403, 404):
        return APIError(exc.status, str(exc))
    return as_api_error(exc)


async def _progress(request: Request, stream: bool, work: Callable[[Callable[[Event], None]], Any],
                    after: Callable[[], Any] | None = None) -> Response:
    """Run `work(progress)` in a worker thread; answer with its events (NDJSON) or one final status object.
    `after` runs on the event loop once the work succeeded (unloading a replaced model, say)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    gone = threading.Event()

    def progress(event: Event) -> None:
        if gone.is_set():
            raise _ClientLeft()
        if stream:
            loop.call_soon_threadsafe(queue.put_nowait, dict(event))

    def run() -> None:
        try:
            work(progress)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, which answers with it
            loop.call_soon_threadsafe(queue.put_nowait, e)

    threading.Thread(target=run, name="ember-store", daemon=True).start()
    first = await queue.get()
    if isinstance(first, BaseException):
        raise _store_error(first)  # nothing sent yet: a proper HTTP status
    if first is _DONE and after is not None:
        await after()
    if not stream:
        return JSONResponse({"status": "success"})

    async def events() -> AsyncIterator[Event]:
        item = first
        try:
            while item is not _DONE:
                if isinstance(item, BaseException):
                    raise item  # ndjson_stream's final {"error"} line
                yield item
                item = await queue.get()
                if item is _DONE and after is not None:
                    await after()
        finally:
            gone.set()  # a client that left mid-stream stops the worker at its next progress event

    return ndjson_stream(events(), lambda e: _store_error(e).message, on_close=gone.set)


async def _forget(request: Request, name: ModelName) -> None:
    """A model whose store entry changed or went away must not keep serving from memory."""
    manager = request.app.state.manager
    lm = manager.loaded.get(name.display)  # the manager keys store models by their display name
    if lm is not None:
        await manager.unload_if_idle(lm)


# -- handlers ---------------------------------------------------------------------------------------------------
async def _transfer(request: Request, op: Callable[..., Any]) -> Response:
    body = await read_json(request, request.app.state.config.max_request_bytes)
    name = _name(model_field(body))
    insecure = flag(body, "insecure", False)
    stream = flag(body, "stream", True)
    after = (lambda: _forget(request, name)) if op is registry.pull else None
    return await _progress(request, stream, lambda progress: op(name.display, insecure=insecure, progress=progress),
                           after)


async def pull(request: Request) -> Response:
    return await _transfer(request, registry.pull)


async def push(request: Request) -> Response:
    return await _transfer(request, registry.push)


async def create(request: Request) -> Response:
    body = await read_json(request, request.app.state.config.max_request_bytes)
    name = _name(model_field(body))
    try:
        mf = _modelfile(body)
    except ModelfileError as e:  # a bad Modelfile or parameter is the client's fault, not a 500
        raise APIError(400, str(e)) from None
    quantize = _text(body, "quantize") or None
    stream = flag(body, "stream", True)
    return await _progress(
        request, stream,
        lambda progress: store_create.create(name.display, mf, quantize=quantize, progress=progress),
        lambda: _forget(request, name))


async def copy(request: Request) -> Response:
    body = await read_json(request, request.app.state.config.max_request_bytes)
    source = _name(body.get("source"), "source")
    destination = _name(body.get("destination"), "destination")
    await anyio.to_thread.run_sync(store_create.copy, source.display, destination.display)
    await _forget(request, destination)
    return Response(status_code=200)


async def delete(request: Request) -> Response:
    body = await read_json(request, request.app.state.config.max_request_bytes)
    name = _name(model_field(body))
    await anyio.to_thread.run_sync(store_create.delete, name.display)  # ModelNotFoundError: 404
    await _forget(request, name)
    return Response(status_code=200)


def _path_digest(request: Request) -> str:
    digest = request.path_params["digest"]
    try:
        return check_digest(digest)
    except EmberError as e:
        raise APIError(400, str(e)) from None


async def head_blob(request: Request) -> Response:
    return Response(status_code=200 if has_blob(_path_digest(request)) else 404)


async def upload_blob(request: Request) -> Response:
    digest = _path_digest(request)
    chunks = request.stream().__aiter__()

    def body() -> Iterator[bytes]:
        # receive_blob reads in a worker thread; each chunk is awaited on the event loop.
        while True:
            try:
                yield anyio.from_thread.run(chunks.__anext__)
            except StopAsyncIteration:
                return

    try:
        created = await anyio.to_thread.run_sync(store_create.receive_blob, digest, body())
    except EmberError as e:
        raise APIError(400, str(e)) from None  # the bytes were not what the digest names: nothing kept
    return Response(status_code=201 if created else 200)


ROUTES = [
    ("/api/pull", ["POST"], pull),
    ("/api/push", ["POST"], push),
    ("/api/create", ["POST"], create),
    ("/api/copy", ["POST"], copy),
    ("/api/delete", ["DELETE"], delete),
    ("/api/blobs/{digest}", ["HEAD"], head_blob),
    ("/api/blobs/{digest}", ["POST"], upload_blob),
]

__all__ = ["ROUTES"]
