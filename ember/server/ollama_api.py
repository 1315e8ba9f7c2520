"""Ollama's REST API (/api/*), wire-compatible with Ollama's docs/api.md and its official clients.

Request options (the `options` object) map onto the sampler as options.py tabulates; `format` ("json" or
a JSON schema) constrains the output to JSON (json_format.py); `suffix` asks for fill-in-the-middle (infill.py);
/api/show's answer is ollama_show.py's.

Differences from Ollama, on purpose: a prompt longer than the context is a 400 (Ollama truncates silently);
`/api/embed` truncates only when the request says `"truncate": true`; a per-request `template` is a Jinja chat
template (Ember's template language), not a Go template; `format` is grammar-constrained for the schema subset
that ember/grammar/json_schema.py lists (Ollama's own grammar covers a similar subset).
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember import __version__
from ember.server.embedding import embed_all
from ember.server.errors import APIError, as_api_error
from ember.server.generation import (
    Generation,
    chat_prompt_ids,
    deltas,
    logprob_entries,
)
from ember.server.infill import infill_ids
from ember.server.json_format import JSONFormat, valid_header
from ember.server.models import LoadedModel, installed_models, parse_keep_alive, rfc3339
from ember.server.ollama_show import show
from ember.server.options import (
    build_options,
    flag,
    model_field,
    parse_ollama_format,
    parse_ollama_logprobs,
    parse_ollama_options,
    read_json,
)
from ember.server.streaming import ClientGone, ndjson_stream, until_disconnect
from ember.server.tool_calls import ToolCall, ToolCallParser

_FOREVER = 292 * 365 * 86400.0  # what Ollama shows for keep_alive < 0: Go's longest duration from now


# -- request fields -------------------------------------------------------------------------------------------
def _template_override(body: dict[str, Any]) -> str | None:
    template = body.get("template")
    if template in (None, ""):
        return None
    if not isinstance(template, str):
        raise APIError(400, "'template' must be a string")
    if "{{ ." in template or "{{." in template:
        raise APIError(400, "Ember's templates are Jinja chat templates; Go templates are not supported")
    return template


def _unsupported(body: dict[str, Any], name: str) -> None:
    if body.get("images"):
        raise APIError(400, f"model '{name}' does not support images")
    if body.get("think"):
        raise APIError(400, f"model '{name}' does not support thinking")


# -- responses --------------------------------------------------------------------------------------------------
def _now() -> str:
    return rfc3339(time.time())


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _final_stats(gen: Generation, started: float, load_seconds: float) -> dict[str, Any]:
    s = gen.stats()
    return {
        "total_duration": _ns(time.monotonic() - started),
        "load_duration": _ns(load_seconds),
        "prompt_eval_count": int(s["prompt_tokens"]),
        "prompt_eval_duration": _ns(s["prompt_seconds"]),
        "eval_count": int(s["generated_tokens"]),
        "eval_duration": _ns(s["generate_seconds"]),
    }


def _tool_calls(calls: list[ToolCall], start: int) -> list[dict[str, Any]]:
    return [{"function": {"index": start + i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


def _done_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class _Run:
    """One admitted generation: the lease on its model, the engine request, and the clean-up of both."""

    def __init__(self, request: Request, lm: LoadedModel, gen: Generation, started: float, load_seconds: float):
        self.request = request
        self.lm = lm
        self.gen = gen
        self.started = started
        self.load_seconds = load_seconds
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.gen.cancel()
            self.request.app.state.manager.release(self.lm)


async def _respond(run: _Run, stream: bool, chunks: AsyncIterator[dict[str, Any]],
                   fmt: JSONFormat | None = None) -> Response:
    """Stream NDJSON, or gather the chunks into one object (`merge` them as Ollama's non-streamed answer).
    With `format`, a non-streamed answer says in X-Ember-JSON-Valid whether its text parses as JSON."""
    if stream:
        return ndjson_stream(chunks, lambda e: as_api_error(e).message, on_close=run.close)
    try:
        async def gather() -> list[dict[str, Any]]:
            return [obj async for obj in chunks]

        objs = await until_disconnect(run.request, gather)
    finally:
        run.close()
    merged = _merge(objs)
    headers = None
    if fmt is not None:
        headers = valid_header([merged["response"] if "response" in merged else merged["message"]["content"]])
    return JSONResponse(merged, headers=headers)


def _merge(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ollama's non-streamed answer: the final object with the text (and calls, logprobs) of all of them."""
    final = dict(objs[-1])
    if "response" in final:
        final["response"] = "".join(o.get("response", "") for o in objs)
    if "message" in final:
        message = dict(final["message"])
        message["content"] = "".join(o["message"].get("content", "") for o in objs)
        calls = [c for o in objs for c in o["message"].get("tool_calls", [])]
        if calls:
            message["tool_calls"] = calls
        final["message"] = message
    logprobs = [lp for o in objs for lp in o.get("logprobs", [])]
    if logprobs:
        final["logprobs"] = logprobs
    return final


async def _acquire(request: Request, name: str, keep_alive: Any, num_ctx: int | None) -> tuple[LoadedModel, float]:
    t0 = time.monotonic()
    lm = await request.app.state.manager.acquire(name, keep_alive, num_ctx)
    return lm, time.monotonic() - t0


async def _load_or_unload(request: Request, lm: LoadedModel, keep_alive: Any, body: dict[str, Any]) -> dict:
    """An empty prompt/messages: the model is now loaded; with keep_alive 0, unloaded."""
    manager = request.app.state.manager
    manager.release(lm)
    unload = keep_alive is not None and parse_keep_alive(keep_alive) == 0
    if unload:
        await manager.unload_if_idle(lm)
    body["done_reason"] = "unload" if unload else "load"
    return body


# -- endpoints --------------------------------------------------------------------------------------------------
async def generate(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    _unsupported(body, name)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string")
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise APIError(400, "'suffix' must be a string")
    stream = flag(body, "stream", True)
    raw = flag(body, "raw", False)
    sampling, max_tokens, stop, num_ctx = parse_ollama_options(body.get("options"))
    fmt = parse_ollama_format(body.get("format"))
    logprobs = parse_ollama_logprobs(body)
    template = _template_override(body)
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise APIError(400, "'system' must be a string")
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise APIError(400, "'context' must be a list of token ids")

    started = time.monotonic()
    lm, load_seconds = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    if not prompt and not suffix:
        return JSONResponse(await _load_or_unload(request, lm, body.get("keep_alive"), {
            "model": name, "created_at": _now(), "response": "", "done": True}))
    try:
        m = lm.model
        if suffix:  # fill-in-the-middle: the model's FIM tokens, no template (infill.py)
            ids = infill_ids(lm, name, prompt, suffix)
        elif raw:
            ids = m.prompt_ids(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = chat_prompt_ids(lm, messages, instruction=fmt.instruction() if fmt else None, template=template)
        if context and not suffix:
            if ids and ids[0] == m.tokenizer.bos_id:
                ids = ids[1:]  # the context already starts the sequence
            ids = list(context) + ids
        options = build_options(lm, sampling, max_tokens, stop, await fmt.constraint(lm) if fmt else None)
        gen = Generation(lm, ids, options, state.metrics, logprobs)
    except BaseException:
        state.manager.release(lm)
        raise
    run = _Run(request, lm, gen, started, load_seconds)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async for d in deltas(gen):
            if d.text or d.logprobs:
                obj: dict[str, Any] = {"model": name, "created_at": _now(), "response": d.text, "done": False}
                if d.logprobs:
                    obj["logprobs"] = logprob_entries(lm, d)
                yield obj
            if d.finished:  # as Ollama: the last object carries no text, only the outcome and the stats
                final: dict[str, Any] = {"model": name, "created_at": _now(), "response": "", "done": True,
                                         "done_reason": _done_reason(d.finish_reason)}
                if not raw:
                    final["context"] = ids + gen.output_ids
                final.update(_final_stats(gen, started, load_seconds))
                yield final

    return await _respond(run, stream, chunks(), fmt)


def _messages(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise APIError(400, "'messages' must be a list")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'")
        content = msg.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string")
        if msg.get("images"):
            raise APIError(400, "this model does not support images")
        m: dict[str, Any] = {"role": msg["role"], "content": content}
        if msg.get("tool_calls"):
            m["tool_calls"] = msg["tool_calls"]
        if msg.get("tool_name"):
            m["tool_name"] = m["name"] = msg["tool_name"]
        out.append(m)
    return out


async def chat(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    _unsupported(body, name)
    messages = _messages(body.get("messages"))
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list")
    stream = flag(body, "stream", True)
    sampling, max_tokens, stop, num_ctx = parse_ollama_options(body.get("options"))
    fmt = parse_ollama_format(body.get("format"))
    logprobs = parse_ollama_logprobs(body)
    template = _template_override(body)

    started = time.monotonic()
    lm, load_seconds = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    if not messages:
        return JSONResponse(await _load_or_unload(request, lm, body.get("keep_alive"), {
            "model": name, "created_at": _now(), "message": {"role": "assistant", "content": ""}, "done": True}))
    try:
        ids = chat_prompt_ids(lm, messages, tools, fmt.instruction() if fmt else None, template)
        options = build_options(lm, sampling, max_tokens, stop, await fmt.constraint(lm) if fmt else None)
        gen = Generation(lm, ids, options, state.metrics, logprobs)
    except BaseException:
        state.manager.release(lm)
        raise
    run = _Run(request, lm, gen, started, load_seconds)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        parser = ToolCallParser(tools) if tools else None
        ncalls = 0
        async for d in deltas(gen, parser):
            if d.text or d.tool_calls or d.logprobs:
                message: dict[str, Any] = {"role": "assistant", "content": d.text}
                if d.tool_calls:
                    message["tool_calls"] = _tool_calls(d.tool_calls, ncalls)
                    ncalls += len(d.tool_calls)
                obj: dict[str, Any] = {"model": name, "created_at": _now(), "message": message, "done": False}
                if d.logprobs:
                    obj["logprobs"] = logprob_entries(lm, d)
                yield obj
            if d.finished:
                final: dict[str, Any] = {"model": name, "created_at": _now(),
                                         "message": {"role": "assistant", "content": ""}, "done": True,
                                         "done_reason": _done_reason(d.finish_reason)}
                final.update(_final_stats(gen, started, load_seconds))
                yield final

    return await _respond(run, stream, chunks(), fmt)


async def embed(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    inputs = body.get("input", [])
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise APIError(400, "'input' must be a string or a list of strings")
    truncate = flag(body, "truncate", False)  # Ollama defaults to true; Ember never truncates unasked
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise APIError(400, "'dimensions' must be a positive integer")
    _, _, _, num_ctx = parse_ollama_options(body.get("options"))
    started = time.monotonic()
    lm, load_seconds = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    try:
        vectors, count = await until_disconnect(request, lambda: embed_all(lm, inputs, truncate, dims))
    finally:
        state.manager.release(lm)
    return JSONResponse({"model": name, "embeddings": vectors, "total_duration": _ns(time.monotonic() - started),
                         "load_duration": _ns(load_seconds), "prompt_eval_count": count})


async def embeddings(request: Request) -> Response:
    """The older single-prompt endpoint: {"embedding": [...]} (empty for an empty prompt, as Ollama)."""
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string")
    _, _, _, num_ctx = parse_ollama_options(body.get("options"))
    lm, _ = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    try:
        if not prompt:
            return JSONResponse({"embedding": []})
        vec, _ = await until_disconnect(request, lambda: anyio.to_thread.run_sync(lm.embed, prompt, False))
    finally:
        state.manager.release(lm)
    return JSONResponse({"embedding": vec})


async def tags(request: Request) -> Response:
    models = await anyio.to_thread.run_sync(installed_models, request.app.state.manager)
    return JSONResponse({"models": [
        {"name": m["name"], "model": m["name"], "modified_at": rfc3339(m["modified"]), "size": m["size"],
         "digest": m["digest"], "details": m["details"]} for m in models]})


async def ps(request: Request) -> Response:
    out = []
    for lm in request.app.state.manager.running():
        if lm.expires_at is not None:
            expires = lm.expires_at
        elif lm.keep_alive is None:
            expires = time.time() + _FOREVER
        else:  # busy: its keep_alive counts from the end of its last request
            expires = time.time() + lm.keep_alive
        out.append({"name": lm.name, "model": lm.name, "size": lm.size, "digest": lm.digest,
                    "details": lm.details, "expires_at": rfc3339(expires), "size_vram": 0,
                    "context_length": lm.n_ctx})
    return JSONResponse({"models": out})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


ROUTES = [
    ("/api/generate", ["POST"], generate),
    ("/api/chat", ["POST"], chat),
    ("/api/embed", ["POST"], embed),
    ("/api/embeddings", ["POST"], embeddings),
    ("/api/tags", ["GET"], tags),
    ("/api/ps", ["GET"], ps),
    ("/api/show", ["POST"], show),
    ("/api/version", ["GET"], version),
]

__all__ = ["ROUTES", "ClientGone", "model_field"]
