"""What both dialects share about running a request: prompts, one engine request, its deltas and logprobs.

- `chat_prompt_ids` renders messages with the model's template (default system prompt, tools, a JSON-format
  instruction) and tokenizes once; `check_prompt` rejects a prompt that does not fit (400, never truncated).
- `Generation` queues the request in the model's engine *before* any response byte is sent, so a bad request
  still gets its error status, then yields the engine's outputs and records TTFT, inter-token and token-count
  metrics. Closing it early aborts the engine request, which frees its KV blocks at once.
- `deltas` turns the outputs into what a dialect renders (text with tool calls cut out, logprobs, the end).
Sending them (NDJSON / SSE, disconnects) is streaming.py's; JSON output is json_format.py's.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

from ember.engine.engine import RequestOutput
from ember.engine.generator import GenerationOptions
from ember.errors import ContextOverflowError, InvalidParameterError
from ember.server.errors import APIError
from ember.server.metrics import Metrics
from ember.server.models import LoadedModel
from ember.server.tool_calls import ToolCall, ToolCallParser

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
    """What a dialect renders for one step: text (after tool-call extraction), calls found, logprobs of the
    step's token ((id, logprob, [(id, logprob)...]) or none), and on the last one the reason and the engine's
    final output."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = None


async def deltas(gen: Generation, parser: ToolCallParser | None = None) -> AsyncIterator[Delta]:
    """The generation's outputs as Deltas, tool calls cut out of the text by `parser`."""
    async for out in gen.outputs():
        d = Delta(output=out if out.finished else None)
        text = out.text
        if out.token is not None and out.logprobs is not None:
            d.logprobs.append((out.token, out.logprobs[0], out.logprobs[1]))
        if parser is not None:
            text, d.tool_calls = parser.push(text)
        d.text = text
        if out.finished:
            d.finished, d.finish_reason = True, out.finish_reason
            if parser is not None:
                tail, calls = parser.finish()
                d.text += tail
                d.tool_calls += calls
        yield d
        if d.finished:
            return


def token_piece(lm: LoadedModel, token: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes for logprobs (a partial character shows as U+FFFD in the text)."""
    raw = lm.model.tokenizer.token_to_bytes(token, special=True)
    return raw.decode("utf-8", "replace"), list(raw)


def logprob_entries(lm: LoadedModel, d: Delta) -> list[dict[str, Any]]:
    """The step's logprobs as Ollama's `logprobs` and OpenAI chat's `logprobs.content` both spell them."""
    out = []
    for token, logprob, top in d.logprobs:
        text, raw = token_piece(lm, token)
        alts = []
        for tid, lp in top:
            t, b = token_piece(lm, tid)
            alts.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alts})
    return out
