"""OpenAI's API (/v1/*): chat completions, completions, embeddings and models, as the official client expects.

Request fields -> Ember:

| OpenAI field                         | Ember                                | notes                                         |
|--------------------------------------|--------------------------------------|-----------------------------------------------|
| max_completion_tokens / max_tokens   | GenerationOptions.max_tokens         | completions default 16, as OpenAI's           |
| stop                                 | GenerationOptions.stop               | string or up to 4 strings                     |
| temperature (0..2, default 1)        | SamplingParams.temperature           | top_k/repeat_penalty keep the model defaults  |
| top_p (default 1)                    | SamplingParams.top_p                 |                                               |
| presence_penalty, frequency_penalty  | SamplingParams (same names, -2..2)   | parsed in options.py                          |
| logit_bias {"token id": -100..100}   | SamplingParams.logit_bias            | added to the logits                           |
| seed                                 | SamplingParams.seed                  | choice i of n uses seed + i                   |
| logprobs, top_logprobs (0..20)       | Engine.add_request(logprobs=n)       | model's raw distribution                      |
| n                                    | n requests, one after another        | at most 16                                    |
| response_format json_object / schema | json_format.py: grammar-constrained  | schema subset: ember/grammar/json_schema.py   |
| tools, tool_choice                   | chat template `tools` + tool_calls   | "none" disables; others behave as "auto"      |
| stream, stream_options.include_usage | SSE chunks, usage chunk, [DONE]      |                                               |

A prompt longer than the context is a 400 with code context_length_exceeded (never truncated). `suffix` in
/v1/completions is fill-in-the-middle for models with FIM tokens (infill.py), else a 400.
"""
from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from dataclasses import replace
from typing import Any, AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.engine.generator import GenerationOptions
from ember.errors import ModelNotFoundError
from ember.server.embedding import embed_all
from ember.server.errors import APIError, as_api_error, error_body
from ember.server.generation import (
    Delta,
    Generation,
    chat_prompt_ids,
    check_prompt,
    deltas,
    logprob_entries,
    token_piece,
)
from ember.server.infill import infill_ids
from ember.server.json_format import valid_header
from ember.server.models import LoadedModel, installed_models
from ember.server.openai_messages import openai_messages, openai_tools
from ember.server.options import (
    build_options,
    openai_bool,
    openai_int,
    openai_stop,
    parse_include_usage,
    parse_openai_sampling,
    parse_response_format,
    read_json,
)
from ember.server.streaming import SSE, StreamResponse, sse, until_disconnect
from ember.server.tool_calls import ToolCall, ToolCallParser

FINGERPRINT = "fp_ember"
MAX_N = 16


# -- request fields -------------------------------------------------------------------------------------------
def _model(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "you must provide a model parameter", param="model")
    return name


# -- running n choices ------------------------------------------------------------------------------------------
class _Choices:
    """The n generations of one request, one after another, on one lease. `close()` cancels what is running
    and returns the lease (exactly once)."""

    def __init__(self, request: Request, lm: LoadedModel, prompts: list[list[int]], options: GenerationOptions,
                 n: int, logprobs: int | None):
        self.request = request
        self.lm = lm
        self.prompts = prompts
        self.options = options
        self.n = n
        self.logprobs = logprobs
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self._closed = False
        for ids in prompts:
            check_prompt(lm, ids)
        # The first engine request now: anything it rejects (e.g. a logit_bias id outside the vocabulary) is
        # still an error status, not an error inside a 200 stream.
        self.current: Generation | None = self._start(0)

    def _start(self, index: int) -> Generation:
        options = self.options
        seed = options.sampling.seed
        if seed is not None and index % self.n:
            options = replace(options, sampling=replace(options.sampling, seed=(seed + index % self.n) % (1 << 64)))
        return Generation(self.lm, self.prompts[index // self.n], options, self.request.app.state.metrics,
                          self.logprobs)

    async def run(self, tools: list | None) -> AsyncIterator[tuple[int, Delta, Generation]]:
        for index in range(len(self.prompts) * self.n):
            gen = self.current if index == 0 and self.current is not None else self._start(index)
            self.current = gen
            async for d in deltas(gen, ToolCallParser(tools) if tools else None):
                if d.finished:
                    self.completion_tokens += int(gen.stats()["generated_tokens"])
                yield index, d, gen

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.current is not None:
                self.current.cancel()
            self.request.app.state.manager.release(self.lm)


def _finish_reason(d: Delta, had_calls: bool) -> str:
    if had_calls:
        return "tool_calls"
    return "length" if d.finish_reason == "length" else "stop"


def _call_objects(calls: list[ToolCall], start: int, stream: bool) -> list[dict[str, Any]]:
    out = []
    for k, c in enumerate(calls):
        obj: dict[str, Any] = {"id": "call_" + secrets.token_hex(12), "type": "function",
                               "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        if stream:
            obj = {"index": start + k, **obj}
        out.append(obj)
    return out


async def _acquire(request: Request, name: str) -> LoadedModel:
    return await request.app.state.manager.acquire(name)


def _error_event(exc: BaseException) -> bytes:
    return sse(error_body("/v1", as_api_error(exc)))


# -- chat completions -------------------------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = _model(body)
    messages = openai_messages(body.get("messages"))
    stream = openai_bool(body, "stream")
    include_usage = parse_include_usage(body, stream)
    n = openai_int(body, "n", 1, MAX_N) or 1
    max_tokens = openai_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = openai_int(body, "max_tokens", 1)
    want_logprobs = openai_bool(body, "logprobs")
    top = openai_int(body, "top_logprobs", 0, 20)
    if top is not None and not want_logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    fmt = parse_response_format(body)
    tools = openai_tools(body)
    sampling = parse_openai_sampling(body)
    stop = openai_stop(body)

    lm = await _acquire(request, name)
    try:
        ids = chat_prompt_ids(lm, messages, tools, fmt.instruction() if fmt else None)
        options = build_options(lm, sampling, max_tokens, stop, await fmt.constraint(lm) if fmt else None)
        choices = _Choices(request, lm, [ids], options, n, logprobs)
    except BaseException:
        state.manager.release(lm)
        raise
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "system_fingerprint": FINGERPRINT}

    if stream:
        async def events() -> AsyncIterator[bytes]:
            def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> bytes:
                obj: dict[str, Any] = {**head, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                                            "finish_reason": finish}]}
                if include_usage:
                    obj["usage"] = None
                return sse(obj)

            try:
                announced: set[int] = set()
                ncalls: dict[int, int] = {}
                async for index, d, gen in choices.run(tools):
                    if index not in announced:
                        announced.add(index)
                        yield chunk(index, {"role": "assistant", "content": ""})
                    lp = {"content": logprob_entries(lm, d), "refusal": None} if d.logprobs else None
                    if d.text or lp:
                        yield chunk(index, {"content": d.text}, None, lp)
                    if d.tool_calls:
                        start = ncalls.get(index, 0)
                        ncalls[index] = start + len(d.tool_calls)
                        yield chunk(index, {"tool_calls": _call_objects(d.tool_calls, start, True)})
                    if d.finished:
                        yield chunk(index, {}, _finish_reason(d, bool(ncalls.get(index))))
                if include_usage:
                    yield sse({**head, "choices": [], "usage": choices.usage()})
            except Exception as e:  # after the 200 went out: an error event, then [DONE]
                yield _error_event(e)
            yield sse("[DONE]")

        return StreamResponse(events(), SSE, on_close=choices.close)

    async def collect() -> list[dict[str, Any]]:
        results: dict[int, dict[str, Any]] = {}
        async for index, d, gen in choices.run(tools):
            r = results.setdefault(index, {"text": [], "calls": [], "logprobs": []})
            r["text"].append(d.text)
            r["calls"] += d.tool_calls
            if d.logprobs:
                r["logprobs"] += logprob_entries(lm, d)
            if d.finished:
                r["finish"] = _finish_reason(d, bool(r["calls"]))
        out = []
        for index in sorted(results):
            r = results[index]
            text = "".join(r["text"])
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not r["calls"] else None,
                                       "refusal": None}
            if r["calls"]:
                message["tool_calls"] = _call_objects(r["calls"], 0, False)
            out.append({"index": index, "message": message,
                        "logprobs": {"content": r["logprobs"], "refusal": None} if logprobs is not None else None,
                        "finish_reason": r["finish"]})
        return out

    try:
        result = await until_disconnect(request, collect)
    finally:
        choices.close()
    headers = valid_header([c["message"]["content"] or "" for c in result]) if fmt else None
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                         "system_fingerprint": FINGERPRINT, "choices": result, "usage": choices.usage()},
                        headers=headers)


# -- completions ------------------------------------------------------------------------------------------------
def _prompts(raw: Any) -> list[Any]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(p, str) for p in raw):
            return list(raw)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            return [list(raw)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in raw):
            return [list(p) for p in raw]
    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")


def _completion_logprobs(lm: LoadedModel, d: Delta, offset: int) -> tuple[dict[str, list], int]:
    """The legacy logprobs object for one delta's tokens; returns it and the next text offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in d.logprobs:
        text, _ = token_piece(lm, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({token_piece(lm, tid)[0]: lp for tid, lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


async def completions(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = _model(body)
    if "prompt" not in body:
        raise APIError(400, "you must provide a prompt", param="prompt")
    prompts = _prompts(body.get("prompt"))
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise APIError(400, "'suffix' must be a string", param="suffix")
    stream = openai_bool(body, "stream")
    include_usage = parse_include_usage(body, stream)
    n = openai_int(body, "n", 1, MAX_N) or 1
    best_of = openai_int(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of")
    max_tokens = openai_int(body, "max_tokens", 0)
    max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default for this endpoint
    logprobs = openai_int(body, "logprobs", 0, 5)
    echo = openai_bool(body, "echo")
    if echo and logprobs is not None:
        raise APIError(400, "'echo' with 'logprobs' is not supported (prompt logprobs)", param="echo")
    sampling = parse_openai_sampling(body)
    stop = openai_stop(body)

    lm = await _acquire(request, name)
    try:
        m = lm.model
        if suffix:  # fill-in-the-middle between each prompt and the suffix (infill.py)
            ids_list = [infill_ids(lm, name, p, suffix) for p in prompts]
        else:  # raw continuation, no template: special-token text is parsed, BOS added as the model wants
            ids_list = [m.prompt_ids(p) if isinstance(p, str) else p for p in prompts]
        choices = _Choices(request, lm, ids_list, build_options(lm, sampling, max_tokens, stop), n, logprobs)
    except BaseException:
        state.manager.release(lm)
        raise
    texts = [p if isinstance(p, str) else m.detokenize(p) for p in prompts]
    cid = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": name,
            "system_fingerprint": FINGERPRINT}

    if stream:
        async def events() -> AsyncIterator[bytes]:
            def chunk(index: int, text: str, finish: str | None = None, lp: Any = None) -> bytes:
                obj: dict[str, Any] = {**head, "choices": [{"text": text, "index": index, "logprobs": lp,
                                                            "finish_reason": finish}]}
                if include_usage:
                    obj["usage"] = None
                return sse(obj)

            try:
                offsets: dict[int, int] = {}
                async for index, d, gen in choices.run(None):
                    text = d.text
                    if index not in offsets:
                        offsets[index] = 0
                        if echo:
                            text = texts[index // n] + text
                    lp = None
                    if logprobs is not None:
                        lp, offsets[index] = _completion_logprobs(lm, d, offsets[index])
                    if text or lp and lp["tokens"]:
                        yield chunk(index, text, None, lp)
                    if d.finished:
                        yield chunk(index, "", _finish_reason(d, False))
                if include_usage:
                    yield sse({**head, "choices": [], "usage": choices.usage()})
            except Exception as e:  # after the 200 went out: an error event, then [DONE]
                yield _error_event(e)
            yield sse("[DONE]")

        return StreamResponse(events(), SSE, on_close=choices.close)

    async def collect() -> list[dict[str, Any]]:
        results: dict[int, dict[str, Any]] = {}
        async for index, d, gen in choices.run(None):
            r = results.setdefault(index, {"text": [texts[index // n]] if echo else [], "offset": 0,
                                           "lp": {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                  "text_offset": []}})
            r["text"].append(d.text)
            if logprobs is not None:
                lp, r["offset"] = _completion_logprobs(lm, d, r["offset"])
                for key, values in lp.items():
                    r["lp"][key] += values
            if d.finished:
                r["finish"] = _finish_reason(d, False)
        return [{"text": "".join(results[i]["text"]), "index": i,
                 "logprobs": results[i]["lp"] if logprobs is not None else None,
                 "finish_reason": results[i]["finish"]} for i in sorted(results)]

    try:
        result = await until_disconnect(request, collect)
    finally:
        choices.close()
    return JSONResponse({**head, "choices": result, "usage": choices.usage()})


# -- embeddings -------------------------------------------------------------------------------------------------
async def embeddings(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = _model(body)
    raw = body.get("input")
    if raw is None or raw == "" or raw == []:
        raise APIError(400, "'input' must be a non-empty string, list of strings, or token ids", param="input")
    inputs = _prompts(raw)
    if any(isinstance(x, str) and not x for x in inputs):
        raise APIError(400, "'input' must not contain empty strings", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dims = openai_int(body, "dimensions", 1)
    lm = await _acquire(request, name)
    try:
        vectors, total = await until_disconnect(request, lambda: embed_all(lm, inputs, False, dims))
    finally:
        state.manager.release(lm)
    data = []
    for i, vec in enumerate(vectors):
        value: Any = vec
        if fmt == "base64":  # little-endian float32, as OpenAI's client decodes it
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": total, "total_tokens": total}})


# -- models -----------------------------------------------------------------------------------------------------
def _model_object(entry: dict[str, Any]) -> dict[str, Any]:
    name = entry["name"]
    owner = name.split("/")[-2] if name.count("/") >= 1 else "library"
    return {"id": name, "object": "model", "created": int(entry["modified"]), "owned_by": owner}


async def list_models(request: Request) -> Response:
    models = await anyio.to_thread.run_sync(installed_models, request.app.state.manager)
    return JSONResponse({"object": "list", "data": [_model_object(m) for m in models]})


async def get_model(request: Request) -> Response:
    manager = request.app.state.manager
    wanted = request.path_params["model"]
    key = manager.canonical(wanted)
    models = await anyio.to_thread.run_sync(installed_models, manager)
    for m in models:
        if m["name"] == key:
            return JSONResponse({**_model_object(m), "id": wanted})
    raise ModelNotFoundError(f"The model '{wanted}' does not exist")


ROUTES = [
    ("/v1/chat/completions", ["POST"], chat_completions),
    ("/v1/completions", ["POST"], completions),
    ("/v1/embeddings", ["POST"], embeddings),
    ("/v1/models", ["GET"], list_models),
    ("/v1/models/{model:path}", ["GET"], get_model),
]
