"""Sending answers while watching the client: NDJSON and SSE framing, streamed responses, disconnects.

- `StreamResponse` sends an async iterator's chunks as they come while watching for the client to go away: a
  disconnect cancels the body (closing it, which aborts whatever generation or store work feeds it), and its
  `on_close` runs exactly once however the response ends.
- `ndjson_stream` is Ollama's streaming shape, shared by generation and the store's progress: one JSON object
  per line, and an error after the 200 went out as a final {"error": ...} line.
- `until_disconnect` runs a non-streamed answer's work unless the client leaves first (ClientGone).
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

import anyio
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def ndjson(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def sse(obj: Mapping[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class StreamResponse:
    """An ASGI response sending `body`'s chunks as they come; stops (closing `body`) when the client leaves.
    `on_close` runs exactly once at the end, however the response ends (even if it never started)."""

    def __init__(self, body: AsyncIterator[bytes], media_type: str, on_close: Callable[[], None] | None = None,
                 headers: Mapping[str, str] | None = None):
        self.body = body
        self.media_type = media_type
        self.on_close = on_close
        self.headers = dict(headers or {})
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", self.media_type.encode()), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
                async for chunk in self.body:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the connection broke under a send: same as a disconnect
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self.on_close is not None:
                    callback, self.on_close = self.on_close, None
                    callback()


def ndjson_stream(objs: AsyncIterator[Mapping[str, Any]], error_message: Callable[[BaseException], str],
                  on_close: Callable[[], None] | None = None) -> StreamResponse:
    """Ollama's stream: each object a line; an exception from `objs` becomes a last {"error": message} line."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for obj in objs:
                yield ndjson(obj)
        except Exception as e:  # after the 200 went out: Ollama's in-stream error line
            yield ndjson({"error": error_message(e)})
        finally:
            aclose = getattr(objs, "aclose", None)
            if aclose is not None:
                await aclose()

    return StreamResponse(body(), NDJSON, on_close=on_close)


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` unless the client disconnects first (then it is cancelled, and so is its generation)."""
    result: list[T] = []

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await work())
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(run)
        tg.start_soon(watch)
    if not result:
        raise ClientGone()
    return result[0]


class ClientGone(Exception):
    """The client disconnected before the answer was ready; there is nobody to answer."""


__all__ = ["NDJSON", "SSE", "ndjson", "sse", "StreamResponse", "ndjson_stream", "until_disconnect", "ClientGone"]
