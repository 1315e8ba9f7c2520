"""Generation request/result types, and a single-sequence reference decoder.

GenerationOptions, Stats, Completion, Chunk and TokenStream are what the engine (ember/engine/engine.py)
and the API exchange. `Generator` decodes one sequence over a contiguous KV cache (ember/model/kv_cache.py):
the API no longer uses it (every request runs on the paged Engine); it stays as the independent reference
that tests/test_engine.py compares the engine's batched output against, and as the simplest path for a
future compiled single-stream decode step.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch

from ember.engine.sampler import Sampler, SamplingParams
from ember.engine.stop import StopMatcher
from ember.errors import ContextOverflowError, InvalidParameterError
from ember.model.kv_cache import KVCache
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer

PREFILL_CHUNK = 512  # tokens per prefill forward pass: bounds the attention mask and activations


class Constraint(Protocol):
    """Per-request token constraint (e.g. a JSON grammar): which tokens may come next, told each accepted one.

    The engine calls allowed() before sampling each token of the request and advance() with the token it
    chose; allowed() returning None means no restriction for this token. An all-False mask means the constrained
    output is complete: the engine then allows only end-of-generation tokens."""

    def allowed(self) -> Optional[torch.Tensor]: ...  # bool [n_vocab] or None

    def advance(self, token: int) -> None: ...


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int | None = None  # None: until an end-of-generation token or the context is full
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Builds a fresh Constraint per request (options may be shared by many requests; a constraint has state).
    constraint: Optional[Callable[[], Constraint]] = None
    # Most tokens to draft per step when the engine speculates (Ollama's draft_num_predict); 0: never for
    # this request; None: the engine's setting.
    draft_num_predict: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise InvalidParameterError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameterError("stop strings must be non-empty strings")
        n = self.draft_num_predict
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 64):
            raise InvalidParameterError(f"draft_num_predict must be an integer in 0..64, got {n!r}")


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the previous call
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    load_seconds: float = 0.0
    draft_tokens: int = 0  # speculative decoding: tokens proposed and verified
    accepted_tokens: int = 0  # of those, accepted
    spec_steps: int = 0  # verification passes (each emits accepted + 1 tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prompt_rate(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generate_rate(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


@dataclass
class Completion:
    text: str
    ids: list[int]
    finish_reason: str  # "stop" (end-of-generation token or stop string) | "length"
    stats: Stats


@dataclass(frozen=True)
class Chunk:
    text: str  # may be "" while a multi-byte character or a possible stop string is pending
    token: int


class TokenStream:
    """Iterator of Chunks; after exhaustion `.result` holds the Completion. `close()` stops generation."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks
        self.result: Completion | None = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]


class Generator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, n_ctx: int):
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.cache: KVCache = model.new_cache(n_ctx)
        self.cached_ids: list[int] = []  # tokens whose KV is in self.cache, in order
        self.lock = threading.Lock()  # one sequence at a time uses this cache

    def check_ids(self, ids: Sequence[int]) -> None:
        n_vocab = self.model.config.n_vocab
        if not ids:
            raise InvalidParameterError("the prompt is empty")
        for t in ids:
            if not isinstance(t, int) or not 0 <= t < n_vocab:
                raise InvalidParameterError(f"token id {t!r} is outside the vocabulary (0..{n_vocab - 1})")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens does not fit the context window of {self.n_ctx} tokens"
            )

    def _prefill(self, ids: list[int], reuse_cache: bool = True) -> tuple[torch.Tensor, int]:
        """Compute KV for ids (reusing the cached prefix); return last-position logits and tokens reused."""
        reuse = 0
        for a, b in zip(self.cached_ids if reuse_cache else (), ids):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(ids) - 1)  # the last prompt token must run to produce logits
        has_ring = any(k.shape[1] < self.n_ctx for k in self.cache.k)
        if reuse < len(self.cached_ids) and has_ring:
            reuse = 0  # ring-buffer layers have overwritten positions a rollback would need
        self.cache.reset(reuse)
        self.cached_ids = list(ids[:reuse])
        logits = None
        for start in range(reuse, len(ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            logits = self._forward(chunk, start)
        return logits, reuse

    def _forward(self, chunk: list[int], start: int, all_logits: bool = False) -> torch.Tensor:
        tokens = torch.tensor(chunk, dtype=torch.long)
        positions = torch.arange(start, start + len(chunk))
        # cached_ids is updated before the pass: if it raises, reset() on the next call trims back.
        out = self.model.forward(tokens, positions, self.cache, all_logits)
        self.cached_ids.extend(chunk)
        return out

    def stream(self, ids: list[int], options: GenerationOptions) -> TokenStream:
        self.check_ids(ids)
        stream = TokenStream(iter(()))
        stream._chunks = self._run(ids, options, stream)
        return stream

    def _run(self, ids: list[int], options: GenerationOptions, stream: TokenStream) -> Iterator[Chunk]:
        with self.lock:
            stats = Stats(prompt_tokens=len(ids))
            sampler = Sampler(options.sampling, self.model.config.n_vocab)
            decoder = self.tokenizer.stream_decoder()
            stops = StopMatcher(options.stop)
            eog = self.tokenizer.eog_ids
            history = list(ids)
            out_ids: list[int] = []
            text_parts: list[str] = []
            finish = "length"
            limit = options.max_tokens if options.max_tokens is not None else self.n_ctx

            t0 = time.perf_counter()
            # A seeded request must reproduce exactly, and bfloat16 results depend on the batch shape that
            # computed them: so it computes its whole prompt as a fresh request would.
            logits, stats.cached_tokens = self._prefill(ids, reuse_cache=options.sampling.seed is None)
            t1 = time.perf_counter()
            stats.prompt_seconds = t1 - t0
            try:
                while len(out_ids) < limit:
                    token = sampler.sample(logits[-1], history)
                    if token in eog:
                        finish = "stop"
                        break
                    out_ids.append(token)
                    history.append(token)
                    emitted, hit = stops.push(decoder.push(token))
                    if emitted:
                        text_parts.append(emitted)
                    yield Chunk(emitted, token)
                    if hit:
                        finish = "stop"
                        break
                    if len(history) >= self.n_ctx or len(out_ids) >= limit:
                        break  # context full or budget spent: no need to compute another step
                    logits = self._forward([token], len(history) - 1)
                if not stops.hit:
                    tail, _ = stops.push(decoder.flush())
                    tail += stops.flush()
                    if tail:
                        text_parts.append(tail)
                        yield Chunk(tail, -1)
            finally:
                stats.generated_tokens = len(out_ids)
                stats.generate_seconds = time.perf_counter() - t1
                stream.result = Completion("".join(text_parts), out_ids, finish, stats)
