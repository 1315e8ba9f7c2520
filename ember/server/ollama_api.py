"""Ollama's REST API (/api/*), wire-compatible with Ollama's docs/api.md and its official clients.

Request options (the `options` object) -> Ember:

| Ollama option                 | Ember                                  | notes                                        |
|-------------------------------|----------------------------------------|----------------------------------------------|
| num_predict                   | GenerationOptions.max_tokens           | < 0: no limit (until EOS or context full)    |
| stop                          | GenerationOptions.stop                 | string or list of strings                    |
| temperature, top_k, top_p,    | SamplingParams (same names)            | validated there (400 on bad values)          |
| min_p, typical_p,             |                                        |                                              |
| repeat_penalty, repeat_last_n,|                                        | repeat_last_n -1: whole history              |
| presence/frequency_penalty    |                                        |                                              |
| seed                          | SamplingParams.seed                    | < 0: random                                  |
| num_ctx                       | the loaded model's context length      | reloads the model when idle                  |
| num_keep, mirostat*, tfs_z,   | accepted and ignored                   | llama.cpp runner knobs Ember has no use for  |
| penalize_newline, num_batch,  |                                        |                                              |
| num_gpu, main_gpu, low_vram,  |                                        |                                              |
| use_mmap, use_mlock, numa,    |                                        |                                              |
| num_thread, f16_kv, ...       |                                        |                                              |

Differences from Ollama, on purpose: a prompt longer than the context is a 400 (Ollama truncates silently);
`/api/embed` truncates only when the request says `"truncate": true`; a per-request `template` is a Jinja chat
template (Ember's template language), not a Go template; `format` is instructed and cut to the first complete
JSON value, not grammar-constrained (see generation.JSONScanner).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember import __version__
from ember.errors import EmberError, InvalidParameterError, ModelNotFoundError
from ember.server.errors import APIError, as_api_error
from ember.server.generation import (
    JSON_VALID_HEADER,
    ClientGone,
    Delta,
    Generation,
    JSONScanner,
    StreamResponse,
    build_options,
    chat_prompt_ids,
    deltas,
    json_instruction,
    ndjson,
    read_json,
    token_piece,
    until_disconnect,
)
from ember.server.models import LoadedModel, installed_models, parse_keep_alive, rfc3339
from ember.server.tool_calls import ToolCall, ToolCallParser

NDJSON = "application/x-ndjson"

# Ollama option name -> (Ember name, type); see the module table.
_SAMPLING_OPTIONS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "min_p": ("min_p", float), "typical_p": ("typical_p", float), "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("repeat_last_n", int), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "seed": ("seed", int),
}
_IGNORED_OPTIONS = frozenset({
    "num_keep", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "tfs_z", "numa", "num_batch",
    "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
    "embedding_only", "num_thread",
})
_FOREVER = 292 * 365 * 86400.0  # what Ollama shows for keep_alive < 0: Go's longest duration from now


# -- request fields -------------------------------------------------------------------------------------------
def model_field(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")  # "name" is Ollama's older spelling
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "model is required")
    return name


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false")
    return value


def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"option '{name}' must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidParameterError(f"option '{name}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


def parse_options(raw: Any) -> tuple[dict[str, Any], int | None, list[str] | None, int | None]:
    """(sampling params, max_tokens, stop, num_ctx) from an Ollama `options` object."""
    if raw is None:
        return {}, None, None, None
    if not isinstance(raw, dict):
        raise APIError(400, "'options' must be an object")
    sampling: dict[str, Any] = {}
    max_tokens = num_ctx = None
    stop = None
    for key, value in raw.items():
        if value is None or key in _IGNORED_OPTIONS:
            continue
        if key in _SAMPLING_OPTIONS:
            name, kind = _SAMPLING_OPTIONS[key]
            number = _number(key, value, kind)
            if key == "seed" and number < 0:
                continue  # Ollama's -1: a random seed
            sampling[name] = number
        elif key == "num_predict":
            n = int(_number(key, value, int))
            max_tokens = n if n >= 0 else None
        elif key == "num_ctx":
            num_ctx = int(_number(key, value, int))
        elif key == "stop":
            stop = [value] if isinstance(value, str) else value
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
                raise InvalidParameterError("option 'stop' must be a string or a list of non-empty strings")
        else:
            raise InvalidParameterError(f"unknown option '{key}'")
    return sampling, max_tokens, stop, num_ctx


def parse_format(raw: Any) -> tuple[bool, Any]:
    """(JSON wanted, schema or None). Ollama's `format`: "" (none), "json", or a JSON schema object."""
    if raw in (None, ""):
        return False, None
    if raw == "json":
        return True, None
    if isinstance(raw, dict):
        return True, raw
    raise APIError(400, f"invalid format {raw!r}: use \"json\" or a JSON schema object")


def parse_logprobs(body: dict[str, Any]) -> int | None:
    if not _flag(body, "logprobs", False):
        if body.get("top_logprobs"):
            raise APIError(400, "top_logprobs needs logprobs: true")
        return None
    n = body.get("top_logprobs", 0) or 0
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
        raise APIError(400, "top_logprobs must be an integer between 0 and 20")
    return n


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


def _logprob_entries(lm: LoadedModel, d: Delta) -> list[dict[str, Any]]:
    out = []
    for token, logprob, top in d.logprobs:
        text, raw = token_piece(lm, token)
        alts = []
        for tid, lp in top:
            t, b = token_piece(lm, tid)
            alts.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alts})
    return out


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
                   scanner: JSONScanner | None = None) -> Response:
    """Stream NDJSON, or gather the chunks into one object (`merge` them as Ollama's non-streamed answer).
    With `format`, a non-streamed answer says in X-Ember-JSON-Valid whether its text parses as JSON."""
    if stream:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for obj in chunks:
                    yield ndjson(obj)
            except Exception as e:  # after the 200 went out: Ollama's in-stream error line
                yield ndjson({"error": as_api_error(e).message})
        return StreamResponse(body(), NDJSON, on_close=run.close)
    try:
        async def gather() -> list[dict[str, Any]]:
            return [obj async for obj in chunks]

        objs = await until_disconnect(run.request, gather)
    finally:
        run.close()
    headers = {JSON_VALID_HEADER: str(scanner.valid()).lower()} if scanner is not None else None
    return JSONResponse(_merge(objs), headers=headers)


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
    if body.get("suffix"):
        raise APIError(400, f"model '{name}' does not support insert")
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string")
    stream = _flag(body, "stream", True)
    raw = _flag(body, "raw", False)
    sampling, max_tokens, stop, num_ctx = parse_options(body.get("options"))
    want_json, schema = parse_format(body.get("format"))
    logprobs = parse_logprobs(body)
    template = _template_override(body)
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise APIError(400, "'system' must be a string")
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise APIError(400, "'context' must be a list of token ids")

    started = time.monotonic()
    lm, load_seconds = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    if not prompt:
        return JSONResponse(await _load_or_unload(request, lm, body.get("keep_alive"), {
            "model": name, "created_at": _now(), "response": "", "done": True}))
    try:
        m = lm.model
        if raw:
            ids = m.prompt_ids(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = chat_prompt_ids(lm, messages, instruction=json_instruction(schema) if want_json else None,
                                  template=template)
        if context:
            if ids and ids[0] == m.tokenizer.bos_id:
                ids = ids[1:]  # the context already starts the sequence
            ids = list(context) + ids
        options = build_options(lm, sampling, max_tokens, stop)
        gen = Generation(lm, ids, options, state.metrics, logprobs)
    except BaseException:
        state.manager.release(lm)
        raise
    run = _Run(request, lm, gen, started, load_seconds)

    scanner = JSONScanner() if want_json else None

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async for d in deltas(gen, scanner):
            if d.text or d.logprobs:
                obj: dict[str, Any] = {"model": name, "created_at": _now(), "response": d.text, "done": False}
                if d.logprobs:
                    obj["logprobs"] = _logprob_entries(lm, d)
                yield obj
            if d.finished:  # as Ollama: the last object carries no text, only the outcome and the stats
                final: dict[str, Any] = {"model": name, "created_at": _now(), "response": "", "done": True,
                                         "done_reason": _done_reason(d.finish_reason)}
                if not raw:
                    final["context"] = ids + gen.output_ids
                final.update(_final_stats(gen, started, load_seconds))
                yield final

    return await _respond(run, stream, chunks(), scanner)


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
    stream = _flag(body, "stream", True)
    sampling, max_tokens, stop, num_ctx = parse_options(body.get("options"))
    want_json, schema = parse_format(body.get("format"))
    logprobs = parse_logprobs(body)
    template = _template_override(body)

    started = time.monotonic()
    lm, load_seconds = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    if not messages:
        return JSONResponse(await _load_or_unload(request, lm, body.get("keep_alive"), {
            "model": name, "created_at": _now(), "message": {"role": "assistant", "content": ""}, "done": True}))
    try:
        ids = chat_prompt_ids(lm, messages, tools, json_instruction(schema) if want_json else None, template)
        gen = Generation(lm, ids, build_options(lm, sampling, max_tokens, stop), state.metrics, logprobs)
    except BaseException:
        state.manager.release(lm)
        raise
    run = _Run(request, lm, gen, started, load_seconds)

    scanner = JSONScanner() if want_json else None

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        parser = ToolCallParser(tools) if tools else None
        ncalls = 0
        async for d in deltas(gen, scanner, parser):
            if d.text or d.tool_calls or d.logprobs:
                message: dict[str, Any] = {"role": "assistant", "content": d.text}
                if d.tool_calls:
                    message["tool_calls"] = _tool_calls(d.tool_calls, ncalls)
                    ncalls += len(d.tool_calls)
                obj: dict[str, Any] = {"model": name, "created_at": _now(), "message": message, "done": False}
                if d.logprobs:
                    obj["logprobs"] = _logprob_entries(lm, d)
                yield obj
            if d.finished:
                final: dict[str, Any] = {"model": name, "created_at": _now(),
                                         "message": {"role": "assistant", "content": ""}, "done": True,
                                         "done_reason": _done_reason(d.finish_reason)}
                final.update(_final_stats(gen, started, load_seconds))
                yield final

    return await _respond(run, stream, chunks(), scanner)


async def embed(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    inputs = body.get("input", [])
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise APIError(400, "'input' must be a string or a list of strings")
    truncate = _flag(body, "truncate", False)  # Ollama defaults to true; Ember never truncates unasked
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise APIError(400, "'dimensions' must be a positive integer")
    _, _, _, num_ctx = parse_options(body.get("options"))
    started = time.monotonic()
    lm, load_seconds = await _acquire(request, name, body.get("keep_alive"), num_ctx)
    try:
        vectors, count = await until_disconnect(request, lambda: _embed_all(lm, inputs, truncate, dims))
    finally:
        state.manager.release(lm)
    return JSONResponse({"model": name, "embeddings": vectors, "total_duration": _ns(time.monotonic() - started),
                         "load_duration": _ns(load_seconds), "prompt_eval_count": count})


async def _embed_all(lm: LoadedModel, inputs: list[Any], truncate: bool, dims: int | None
                     ) -> tuple[list[list[float]], int]:
    vectors, total = [], 0
    for item in inputs:
        vec, n = await anyio.to_thread.run_sync(lm.embed, item, truncate)
        if dims is not None:
            vec = _shorten(vec, dims)
        vectors.append(vec)
        total += n
    return vectors, total


def _shorten(vec: list[float], dims: int) -> list[float]:
    """First `dims` components, renormalized (Matryoshka-style, as Ollama and OpenAI's `dimensions`)."""
    head = vec[:dims]
    norm = sum(x * x for x in head) ** 0.5 or 1.0
    return [x / norm for x in head]


async def embeddings(request: Request) -> Response:
    """The older single-prompt endpoint: {"embedding": [...]} (empty for an empty prompt, as Ollama)."""
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string")
    _, _, _, num_ctx = parse_options(body.get("options"))
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


async def show(request: Request) -> Response:
    state = request.app.state
    body = await read_json(request, state.config.max_request_bytes)
    name = model_field(body)
    verbose = _flag(body, "verbose", False)
    key = state.manager.canonical(name)
    return JSONResponse(await anyio.to_thread.run_sync(_show, state.manager, key, verbose))


def _show(manager: Any, key: str, verbose: bool) -> dict[str, Any]:
    from ember.gguf import open_gguf
    from ember.store import _looks_like_path, resolve_model
    from ember.store.manifests import read_manifest
    from ember.store.names import parse_name
    from ember.tokenizer.chat_template import select_template

    spec = manager.specs.get(key)
    source = spec.source if spec else key
    if not _looks_like_path(source) and read_manifest(parse_name(source)) is None:
        raise ModelNotFoundError(f"model '{key}' not found")  # show never pulls
    r = resolve_model(source)
    with open_gguf(r.path) as f:
        md = f.metadata
        arch = f.architecture
        template = spec.template if spec and spec.template else r.template
        if not template:
            template = select_template(md, arch).source
        info: dict[str, Any] = {}
        for k, v in md.items():
            if isinstance(v, (bytes, bytearray)):
                continue
            if hasattr(v, "tolist"):  # numpy arrays and scalars
                v = v.tolist()
            if isinstance(v, (list, tuple)):
                v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v] if verbose else []
            info[k] = v  # token tables are large: listed only with verbose, as Ollama does
        n_params = sum(t.n_elements for t in f.tensors.values())
        info.setdefault("general.parameter_count", n_params)
        types: dict[str, int] = {}
        for t in f.tensors.values():
            types[t.type_name] = types.get(t.type_name, 0) + t.n_elements
    from ember.api import _file_type_name
    from ember.server.models import human_count
    from ember.tokenizer.chat_template import ChatTemplate

    system = spec.system if spec and spec.system is not None else r.system
    params = {**r.params, **(dict(spec.parameters) if spec else {})}
    capabilities = ["completion"]
    try:
        if ChatTemplate(template).supports_tools:
            capabilities.append("tools")
    except EmberError:
        pass
    modelfile = ["# Modelfile generated by \"ember show\"", f"FROM {r.path}", f'TEMPLATE """{template}"""']
    if system:
        modelfile.append(f'SYSTEM """{system}"""')
    modelfile += [f"PARAMETER {k} {v}" for k, v in params.items()]
    out: dict[str, Any] = {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": "\n".join(f"{k:<30} {v}" for k, v in params.items()),
        "template": template,
        "details": {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                    "parameter_size": human_count(n_params),
                    "quantization_level": _file_type_name(md.get("general.file_type"), types)},
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": rfc3339(Path(r.path).stat().st_mtime),
    }
    if system:
        out["system"] = system
    if r.license_path is not None:
        out["license"] = r.license_path.read_text(encoding="utf-8", errors="replace")
    return out


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

__all__ = ["ROUTES", "ClientGone", "model_field", "parse_options"]
