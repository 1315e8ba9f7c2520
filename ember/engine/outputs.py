"""What the serving engine reports: one request's outputs and timings, and the engine's counters.

Plain data (no torch); ember.engine.engine produces them, the server and API read them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ember.engine.generator import Completion, Stats


@dataclass(frozen=True)
class RequestMetrics:
    """One request's timings (seconds, monotonic clock) and token counts."""

    arrival_time: float
    queued_seconds: float  # arrival -> first scheduled
    prefill_seconds: float  # first scheduled -> first token sampled (includes steps shared with others)
    first_token_seconds: float  # arrival -> first token (time to first token)
    decode_seconds: float  # first token -> finished
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the prefix cache at first admission
    generated_tokens: int
    num_preemptions: int

    def stats(self) -> Stats:
        """The single-sequence path's Stats (for Completion)."""
        return Stats(
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            prompt_seconds=self.prefill_seconds,
            generated_tokens=self.generated_tokens,
            generate_seconds=self.decode_seconds,
        )


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request.

    token: the new output token, or None when the step ended the request without one (an end-of-generation
    token, which is not part of the output, or an abort). text: the text delta (may be "" while a multi-byte
    character or a possible stop string is pending; on the last output it includes the released tail).
    completion/metrics: set on the last output (finished is True)."""

    request_id: int
    token: Optional[int]
    text: str
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    completion: Optional[Completion] = None
    metrics: Optional[RequestMetrics] = None
    error: Optional[BaseException] = None  # set with finish_reason "error": the step failed
    # With add_request(logprobs=n): the token's log-probability under the model's raw distribution (before
    # penalties, temperature and filters, as OpenAI reports it) and the n most likely (id, logprob) pairs.
    logprobs: Optional[tuple[float, list[tuple[int, float]]]] = None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_steps: int
    num_preemptions: int  # sequences preempted (by recompute) since the engine started
    num_free_blocks: int  # free or evictable, summed over KV groups (gemma3: global + sliding-window pool)
    num_blocks: int  # summed over KV groups
    prefix_hit_tokens: int
    prefix_query_tokens: int
    spec_drafted: int = 0  # speculative tokens proposed and verified since the engine started
    spec_accepted: int = 0  # of those, accepted
    spec_steps: int = 0  # verification passes
    spec_emitted: int = 0  # tokens those passes emitted (accepted + one each)
