"""What a request asks for, in either dialect: its JSON body, field checks, and the sampling settings.

Ollama's `options` object -> Ember (`parse_ollama_options`):

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

OpenAI's sampling fields (`parse_openai_sampling`): temperature (0..2, default 1) and top_p (default 1) as
OpenAI defines them, presence/frequency_penalty (-2..2), seed (any int64, taken mod 2^64), logit_bias
({"token id": -100..100}, added to the logits); top_k and repeat_penalty keep the model's defaults.

Both end in `build_options`: the request's settings over the model's own defaults (its Modelfile parameters).
JSON output (Ollama `format`, OpenAI `response_format`) is parsed here into a JSONFormat (json_format.py).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, Sequence

from starlette.requests import Request

from ember.engine.generator import Constraint, GenerationOptions
from ember.engine.sampler import SamplingParams
from ember.errors import InvalidParameterError
from ember.server.errors import APIError
from ember.server.json_format import JSONFormat
from ember.server.models import LoadedModel

# -- the body ---------------------------------------------------------------------------------------------------
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


def model_field(body: dict[str, Any]) -> str:
    """Ollama's model name field."""
    name = body.get("model") or body.get("name")  # "name" is Ollama's older spelling
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "model is required")
    return name


def flag(body: dict[str, Any], key: str, default: bool, param: bool = False) -> bool:
    """A boolean field; `param` names it in OpenAI's error object."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false", param=key if param else None)
    return value


def build_options(lm: LoadedModel, sampling: dict[str, Any], max_tokens: int | None = None,
                  stop: Sequence[str] | None = None,
                  constraint: Optional[Callable[[], Constraint]] = None) -> GenerationOptions:
    """The request's settings over the model's defaults (its manifest parameters)."""
    merged: dict[str, Any] = dict(lm.model.defaults)
    merged.update(sampling)
    if max_tokens is not None:
        merged["max_tokens"] = max_tokens
    if stop is not None:
        merged["stop"] = list(stop)
    limit = merged.pop("max_tokens", None)
    draft_num_predict = merged.pop("draft_num_predict", None)
    stops = merged.pop("stop", None) or ()
    if isinstance(stops, str):
        stops = (stops,)
    unknown = set(merged) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise InvalidParameterError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return GenerationOptions(max_tokens=limit, stop=tuple(stops), sampling=SamplingParams(**merged),
                             constraint=constraint, draft_num_predict=draft_num_predict)


# -- Ollama -----------------------------------------------------------------------------------------------------
# Ollama option name -> (Ember name, type); see the module table.
_OLLAMA_SAMPLING: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "min_p": ("min_p", float), "typical_p": ("typical_p", float), "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("repeat_last_n", int), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "seed": ("seed", int),
    "draft_num_predict": ("draft_num_predict", int),  # speculative decoding: most tokens drafted per step
}
_OLLAMA_IGNORED = frozenset({
    "num_keep", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "tfs_z", "numa", "num_batch",
    "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
    "embedding_only", "num_thread",
})


def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"option '{name}' must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidParameterError(f"option '{name}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


def parse_ollama_options(raw: Any) -> tuple[dict[str, Any], int | None, list[str] | None, int | None]:
    """(sampling params, max_tokens, stop, num_ctx) from an Ollama `options` object."""
    if raw is None:
        return {}, None, None, None
    if not isinstance(raw, dict):
        raise APIError(400, "'options' must be an object")
    sampling: dict[str, Any] = {}
    max_tokens = num_ctx = None
    stop = None
    for key, value in raw.items():
        if value is None or key in _OLLAMA_IGNORED:
            continue
        if key in _OLLAMA_SAMPLING:
            name, kind = _OLLAMA_SAMPLING[key]
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


def parse_ollama_format(raw: Any) -> JSONFormat | None:
    """Ollama's `format`: "" (none), "json" (any JSON object), or a JSON schema object."""
    if raw in (None, ""):
        return None
    if raw == "json":
        return JSONFormat()
    if isinstance(raw, dict):
        return JSONFormat(raw)
    raise APIError(400, f"invalid format {raw!r}: use \"json\" or a JSON schema object")


def parse_ollama_logprobs(body: dict[str, Any]) -> int | None:
    if not flag(body, "logprobs", False):
        if body.get("top_logprobs"):
            raise APIError(400, "top_logprobs needs logprobs: true")
        return None
    n = body.get("top_logprobs", 0) or 0
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
        raise APIError(400, "top_logprobs must be an integer between 0 and 20")
    return n


# -- OpenAI -----------------------------------------------------------------------------------------------------
def openai_int(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{key}' must be an integer {bounds}, got {value!r}", param=key)
    return value


def _real(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be a number between {lo:g} and {hi:g}, got {value!r}", param=key)
    return float(value)


def openai_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be a boolean", param=key)
    return value


def openai_stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    return [s for s in stops if s]


def parse_openai_sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "temperature": _real(body, "temperature", 0.0, 2.0),
        "top_p": _real(body, "top_p", 0.0, 1.0),
        "presence_penalty": _real(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _real(body, "frequency_penalty", -2.0, 2.0),
        "seed": body.get("seed"),
    }
    # Not OpenAI's: Ember's speculative-decoding knob, sent as an extra body field (extra_body in the client).
    if body.get("draft_num_predict") is not None:
        n = body["draft_num_predict"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 64:
            raise APIError(400, "'draft_num_predict' must be an integer in 0..64", param="draft_num_predict")
        out["draft_num_predict"] = n
    # OpenAI's defaults for what it defines (Ollama's OpenAI layer does the same).
    out["temperature"] = 1.0 if out["temperature"] is None else out["temperature"]
    out["top_p"] = 1.0 if out["top_p"] is None else out["top_p"]
    seed = out["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", param="seed")
    if seed is not None:
        out["seed"] = seed % (1 << 64)  # OpenAI accepts any int64
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise APIError(400, "'logit_bias' must map token ids to numbers", param="logit_bias")
        parsed = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias[{key}] must be a number between -100 and 100",
                               param="logit_bias")
            parsed[token] = float(value)
        out["logit_bias"] = parsed
    return {k: v for k, v in out.items() if v is not None}


def parse_response_format(body: dict[str, Any]) -> JSONFormat | None:
    """OpenAI's `response_format`: text, json_object (any JSON object), or json_schema (its `schema`)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSONFormat()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                           param="response_format")
        return JSONFormat(spec.get("schema") or None)
    raise APIError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                   param="response_format")


def parse_include_usage(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage"))


__all__ = ["read_json", "model_field", "flag", "build_options", "parse_ollama_options", "parse_ollama_format",
           "parse_ollama_logprobs", "openai_int", "openai_bool", "openai_stop", "parse_openai_sampling",
           "parse_response_format", "parse_include_usage"]
