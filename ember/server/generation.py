"""What both dialects share about running a request: prompts, one engine request, streaming, disconnects.

- `chat_prompt_ids` renders messages with the model's template (default system prompt, tools, a JSON-format
  instruction) and tokenizes once; `check_prompt` rejects a prompt that does not fit (400, never truncated).
- `Generation` queues the request in the model's engine *before* any response byte is sent, so a bad request
  still gets its error status, then yields the engine's outputs and records TTFT, inter-token and token-count
  metrics. Closing it early aborts the engine request, which frees its KV blocks at once.
- `StreamResponse` sends NDJSON or SSE while watching for the client to go away: a disconnect cancels the
  body, which aborts the generation. `until_disconnect` does the same for non-streamed answers.
- `JSONScanner` implements `format: "json"` / `response_format: json_object` as far as an unconstrained
  sampler can: the model is told to answer in JSON, the text before the first `{`/`[` is dropped and
  generation stops once that value is complete; the caller then validates it.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

import anyio
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ember.engine.engine import RequestOutput
from ember.engine.generator import GenerationOptions
from ember.engine.sampler import SamplingParams
from ember.errors import ContextOverflowError, InvalidParameterError
from ember.server.errors import APIError
from ember.server.metrics import Metrics
from ember.server.models import LoadedModel
from ember.server.tool_calls import ToolCall, ToolCallParser

T = TypeVar("T")

JSON_INSTRUCTION = "Respond only with a single valid JSON object, and nothing else."
JSON_VALID_HEADER = "X-Ember-JSON-Valid"  # on non-streamed JSON-mode answers: does the text parse?


def json_instruction(schema: Any = None) -> str:
    if isinstance(schema, dict):
        return f"{JSON_INSTRUCTION} It must match this JSON schema: {json.dumps(schema)}"
    return JSON_INSTRUCTION


def chat_prompt_ids(lm: LoadedModel, messages: Sequence[Mapping[str, Any]], tools: list | None = None,
                    instruction: str | None = None, template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered for generation. `instruction` is appended to the system prompt
    (the model's default one when the conversation has none); `template` overrides the model's (Jinja)."""
    m = lm.model
    tmpl = m.template
    if template:
        from ember.tokenizer.chat_template import ChatTemplate

        tmpl = ChatTemplate(template, tmpl.bos_token, tmpl.eos_token)
    if tools and not tmpl.supports_tools:
        raise APIError(400, f"model '{lm.name}' does not support tools (its chat template has no tools)")
    msgs = [dict(msg) for msg in messages]
    has_system = bool(msgs) and msgs[0].get("role") == "system"
    if not has_system and m.system:
        msgs.insert(0, {"role": "system", "content": m.system})
        has_system = True
    if instruction:
        if has_system:
            msgs[0]["content"] = f"{msgs[0].get('content') or ''}\n\n{instruction}".strip()
        else:
            msgs.insert(0, {"role": "system", "content": instruction})
    text = tmpl.render(msgs, add_generation_prompt=True, tools=tools or None)
    return m.prompt_ids(text)


def check_prompt(lm: LoadedModel, ids: Sequence[int]) -> None:
    """Reject what the engine would reject, before a streamed response has started (its status is sent)."""
    m = lm.model
    if not ids:
        raise InvalidParameterError("the prompt is empty")
    n_vocab = m.config.n_vocab
    bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidParameterError(f"token id {bad!r} is outside the vocabulary (0..{n_vocab - 1})")
    limit = m.engine.max_model_len
    if len(ids) >= limit:
        raise ContextOverflowError(
            f"prompt of {len(ids)} tokens does not fit the context window of {limit} tokens"
        )


def build_options(lm: LoadedModel, sampling: Mapping[str, Any], max_tokens: int | None = None,
                  stop: Sequence[str] | None = None) -> GenerationOptions:
    """The request's settings over the model's defaults (its manifest parameters)."""
    merged: dict[str, Any] = dict(lm.model.defaults)
    merged.update(sampling)
    if max_tokens is not None:
        merged["max_tokens"] = max_tokens
    if stop is not None:
        merged["stop"] = list(stop)
    limit = merged.pop("max_tokens", None)
    stops = merged.pop("stop", None) or ()
    if isinstance(stops, str):
        stops = (stops,)
    unknown = set(merged) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise InvalidParameterError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return GenerationOptions(max_tokens=limit, stop=tuple(stops), sampling=SamplingParams(**merged))


class Generation:
    """One engine request. Construct inside the event loop; iterate `outputs()`; `cancel()` is idempotent."""

    def __init__(self, lm: LoadedModel, ids: list[int], options: GenerationOptions, metrics: Metrics,
                 logprobs: int | None = None):
        check_prompt(lm, ids)
        self.lm = lm
        self.metrics = metrics
        self.prompt_tokens = len(ids)
        self.started = time.monotonic()
        self.finished = False
        self.last: RequestOutput | None = None  # the engine's final output (absent when cancelled early)
        self.output_ids: list[int] = []
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        engine = lm.model.engine
        self.request_id = engine.add_request(
            ids, options, sink=lambda out: loop.call_soon_threadsafe(self._queue.put_nowait, out),
            logprobs=logprobs,
        )

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        label = self.lm.name
        previous: float | None = None
        try:
            while not self.finished:
                out = await self._queue.get()
                now = time.monotonic()
                if out.token is not None:
                    self.output_ids.append(out.token)
                    if previous is None:
                        self.first_token_at = now
                        self.metrics.ttft.observe(now - self.started, model=label)
                    else:
                        self.metrics.itl.observe(now - previous, model=label)
                    previous = now
                if out.finished:
                    self.finished = True
                    self.last = out
                    self.ended_at = now
                    if out.metrics is not None:
                        self.metrics.prompt_tokens.inc(out.metrics.prompt_tokens, model=label)
                        self.metrics.generated_tokens.inc(out.metrics.generated_tokens, model=label)
                    if out.error is not None:
                        raise out.error
                yield out
        finally:
            self.cancel()

    def stats(self) -> dict[str, float]:
        """Counts and durations (seconds): the engine's when it finished, else measured here."""
        m = self.last.metrics if self.last is not None else None
        if m is not None:
            return {"prompt_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens,
                    "prompt_seconds": m.queued_seconds + m.prefill_seconds,
                    "generated_tokens": m.generated_tokens, "generate_seconds": m.decode_seconds}
        end = self.ended_at or time.monotonic()
        first = self.first_token_at or end
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": 0, "prompt_seconds": first - self.started,
                "generated_tokens": len(self.output_ids), "generate_seconds": end - first}

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.ended_at = time.monotonic()
            self.metrics.prompt_tokens.inc(self.prompt_tokens, model=self.lm.name)
            self.metrics.generated_tokens.inc(len(self.output_ids), model=self.lm.name)
            self.lm.model.engine.abort(self.request_id)  # frees its KV blocks now or at the end of the step


@dataclass
class Delta:
    """What a dialect renders for one step: text (after JSON cutting and tool-call extraction), calls found,
    logprobs of the step's token ((id, logprob, [(id, logprob)...]) or none), and on the last one the reason
    and the engine's final output."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = None


async def deltas(gen: Generation, scanner: "JSONScanner | None" = None,
                 parser: ToolCallParser | None = None) -> AsyncIterator[Delta]:
    """The generation's outputs as Deltas; with a scanner, ends as soon as the JSON value is complete."""
    async for out in gen.outputs():
        d = Delta(output=out if out.finished else None)
        text = out.text
        if out.token is not None and out.logprobs is not None:
            d.logprobs.append((out.token, out.logprobs[0], out.logprobs[1]))
        if scanner is not None:
            text = scanner.push(text)
        if parser is not None:
            text, d.tool_calls = parser.push(text)
        d.text = text
        if scanner is not None and scanner.done and not out.finished:
            gen.cancel()  # the value is complete: the rest would be chatter
            d.finished, d.finish_reason = True, "stop"
        elif out.finished:
            d.finished, d.finish_reason = True, out.finish_reason
        if d.finished and parser is not None:
            tail, calls = parser.finish()
            d.text += tail
            d.tool_calls += calls
        yield d
        if d.finished:
            return


class JSONScanner:
    """Cuts streamed text down to its first complete JSON object or array (see module doc)."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.done = False
        self.in_string = False
        self.escaped = False
        self.text: list[str] = []

    def push(self, text: str) -> str:
        out = []
        for ch in text:
            if self.done:
                break
            if not self.started:
                if ch not in "{[":
                    continue  # prose or a code fence before the value
                self.started = True
            out.append(ch)
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
        piece = "".join(out)
        self.text.append(piece)
        return piece

    def valid(self) -> bool:
        try:
            json.loads("".join(self.text))
        except ValueError:
            return False
        return True


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


def ndjson(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def sse(obj: Mapping[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def token_piece(lm: LoadedModel, token: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes for logprobs (a partial character shows as U+FFFD in the text)."""
    raw = lm.model.tokenizer.token_to_bytes(token, special=True)
    return raw.decode("utf-8", "replace"), list(raw)


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object: 400 if it is not one, 413 past `max_bytes`."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is larger than {max_bytes} bytes", "request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body
