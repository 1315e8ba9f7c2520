"""One generation request as the scheduler and the block manager see it.

A Sequence is the unit of scheduling: a prompt, the tokens generated so far, how much of that text already has
its KV computed, and the physical KV blocks holding it. It is pure bookkeeping (no tensors): the runner reads
`token_ids`, `num_computed_tokens` and `block_tables` to build its inputs, the scheduler moves it between states.

A model's layers form one or two KV groups (ember.engine.kv_groups): all layers, or full-attention layers and
sliding-window layers, each group with its own block pool. `block_tables[g]` is the sequence's table in group
g; `block_table` is group 0's (the only one for most models).

Token invariant: every token at a position < num_computed_tokens has its K/V in the cache, at slot
`block_tables[g][pos // block_size]`, offset `pos % block_size`, in every group g - except, in a windowed
group, positions outside the next query's window, whose entries may be NULL_BLOCK. The last token of a running sequence (the one just
sampled, or the last prompt token) is never computed while it waits to be fed, so after a step that samples,
num_computed_tokens == num_tokens - 1.
"""
from __future__ import annotations

import enum
import time
from typing import Optional, Sequence as SequenceT

from ember.errors import InvalidParameterError


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life. PREEMPTED sequences sit in the waiting queue like WAITING ones; the
    distinct state says their blocks were taken away and their KV must be recomputed (prompt + generated)."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    """Why a sequence finished, in the OpenAI/Ollama vocabulary the server reports."""

    STOP = "stop"      # EOS or a stop sequence, signalled by the caller
    LENGTH = "length"  # max_tokens generated
    ABORT = "abort"    # cancelled by the client


class Sequence:
    """A request's tokens and scheduling state. Mutated only by the scheduler and block manager."""

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: SequenceT[int],
        max_tokens: int,
        arrival_time: Optional[float] = None,
        use_prefix_cache: bool = True,
    ) -> None:
        if len(prompt_token_ids) == 0:
            raise InvalidParameterError("a prompt needs at least one token")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidParameterError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if any(not isinstance(t, int) or t < 0 for t in prompt_token_ids):
            raise InvalidParameterError("prompt token ids must be non-negative integers")
        self.seq_id = seq_id
        self.max_tokens = max_tokens
        # False: never start from cached prefix blocks (the sequence's own blocks are still published).
        # Used for seeded requests, whose tokens must not depend on what an earlier request left cached.
        self.use_prefix_cache = use_prefix_cache
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Prompt and output live in one list so that slicing a block's tokens never has to stitch two lists;
        # the split point is num_prompt_tokens. Tokens are append-only, which is what lets block hashes be
        # cached on the sequence (block_hashes below) and survive preemption.
        self._token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self._token_ids)

        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[FinishReason] = None
        self.num_computed_tokens = 0
        # Tokens credited from the prefix cache at the latest admission (a subset of num_computed_tokens).
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        # Physical block ids per KV group, one per block_size tokens. A window-released entry holds NULL_BLOCK
        # (see block_manager) so that index i always means positions [i*block_size, (i+1)*block_size). Block
        # managers add the tables of further groups on first use and mutate tables in place.
        self.block_tables: list[list[int]] = [[]]
        # Chain hashes of this sequence's FULL blocks of token ids, filled lazily by the block manager.
        # Derived only from token ids, so still valid after preemption.
        self.block_hashes: list[bytes] = []
        # Speculative decoding: tokens proposed for the next decode step (set by the engine before the
        # scheduler plans it, cleared by update()). They are NOT part of token_ids: only what verification
        # accepts is appended, so token_ids stays append-only and block hashes stay valid.
        self.draft_token_ids: list[int] = []

        # Timing (scheduler clock). queued: added to the scheduler; first_scheduled: first step it ran in;
        # first_token: its first output token was appended; finished: it left the scheduler.
        self.queued_time: Optional[float] = None
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None

    @property
    def block_table(self) -> list[int]:
        """Group 0's block table."""
        return self.block_tables[0]

    @block_table.setter
    def block_table(self, table: list[int]) -> None:
        self.block_tables[0] = table

    # --- token views -------------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by generated tokens. Do not mutate; use append_token."""
        return self._token_ids

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV the runner still has to compute before the next token can be sampled."""
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token awaits computation (first prefill or recompute)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self._token_ids.append(token_id)

    def fork(self, seq_id: int) -> "Sequence":
        """A sibling with the same tokens and progress but no blocks (the block manager shares those)."""
        child = Sequence(seq_id, self.prompt_token_ids, self.max_tokens, self.arrival_time)
        child._token_ids = list(self._token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        child.queued_time = self.queued_time
        child.first_scheduled_time = self.first_scheduled_time
        child.first_token_time = self.first_token_time
        return child

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_prompt_tokens}"
            f"+{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
