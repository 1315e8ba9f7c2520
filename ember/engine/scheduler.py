"""Continuous batching: which sequences run, and how many tokens each, in the next engine step.

Each step() plans one forward pass under two budgets: at most max_num_batched_tokens tokens and at most
max_num_seqs sequences holding KV blocks. The order of service is
  1. decodes of running sequences (one token each), so that every stream keeps flowing;
  2. the next chunk of running sequences still prefilling (chunked prefill: a long prompt is split across
     steps and never stalls the decodes);
  3. new or preempted sequences from the front of the waiting queue, first come first served: the head is
     never skipped for a smaller request behind it, so no request starves.
Within 1 and 2, sequences are served oldest arrival first.

KV memory is one or two groups of blocks (ember.engine.kv_groups): one pool for a model whose layers all
attend alike, a global and a windowed pool for one that mixes sliding-window layers in. A sequence is given
a chunk only if every group can hold it, and its windowed blocks that fell out of the window go back after
every update.

When a KV pool runs dry, the most recently arrived running sequence that this step has not yet scheduled is
preempted by recompute: its blocks are freed and it goes back to the FRONT of the waiting queue with its
generated tokens kept, so that on readmission prompt + generated is prefilled again (often mostly from the
prefix cache, since its full blocks were published) and generation continues where it stopped.

Protocol, strictly alternating: batch = step(); the runner executes it (applying batch.copies first);
update(batch, sampled_token_ids, stopped_seq_ids). abort() may be called at any time.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional, Sequence as SequenceT

from ember.engine.block_manager import BlockManager
from ember.engine.kv_groups import NO_MATCH, GroupCopy, GroupMatch, KVGroup, KVGroups
from ember.engine.sequence import FinishReason, Sequence, SequenceStatus
from ember.errors import ContextOverflowError, InvalidParameterError


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_model_len: Optional[int] = None  # prompt + max_tokens limit per request; None: only the pool bounds it
    # The KV groups: sliding_window None: one pool of num_blocks for all layers. sliding_window alone: all layers
    # are windowed, one pool whose blocks are freed as the window moves. sliding_window and window_num_blocks:
    # a global group of num_blocks and a windowed group of window_num_blocks (a model mixing both kinds).
    sliding_window: Optional[int] = None
    window_num_blocks: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "sliding_window", "window_num_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidParameterError(f"{name} must be a positive integer or None, got {value!r}")
        if self.window_num_blocks is not None and self.sliding_window is None:
            raise InvalidParameterError("window_num_blocks needs sliding_window")
        # Every running sequence may need a decode token in the same step; a budget below the sequence cap
        # would leave some streams stalled behind others.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidParameterError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )

    def kv_groups(self) -> list[KVGroup]:
        """The KV groups these fields describe (see sliding_window above), global group first."""
        if self.sliding_window is None:
            return [KVGroup(self.num_blocks)]
        if self.window_num_blocks is None:
            return [KVGroup(self.num_blocks, self.sliding_window)]
        return [KVGroup(self.num_blocks), KVGroup(self.window_num_blocks, self.sliding_window)]


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: the runner computes positions [start, start + num_tokens).

    samples: this chunk reaches the sequence's last token, so the runner samples from its last logits.
    is_prefill: more than the single last token (a prompt or recompute chunk) rather than a decode.
    draft: speculative tokens fed after the last token (a decode only): num_tokens == 1 + len(draft), and
    the runner returns logits for every one of those positions.
    All are fixed when planned; the sequence itself changes once update() appends tokens.
    """

    seq: Sequence
    num_tokens: int
    start: int
    samples: bool
    is_prefill: bool
    draft: tuple[int, ...] = ()


@dataclass
class ScheduledBatch:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[GroupCopy] = field(default_factory=list)  # copy-on-write, to apply in order before the pass
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def sampling(self) -> list[ScheduledSeq]:
        """Entries that produce a token, in the order update() expects sampled token ids."""
        return [s for s in self.scheduled if s.samples]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.kv = KVGroups(config.kv_groups(), config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        # Kept sorted by _rank (arrival order): the front has priority, the back is preempted first.
        self.running: list[Sequence] = []
        self._seqs: dict[int, Sequence] = {}
        self._rank: dict[int, tuple[float, int]] = {}
        self._counter = 0
        self._in_flight: Optional[ScheduledBatch] = None

    @property
    def block_manager(self) -> BlockManager:
        """Group 0's block manager (the only one unless the model mixes windowed and global layers)."""
        return self.kv.managers[0]

    # --- requests ----------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new request. Raises ContextOverflowError for one the KV pool could never hold."""
        cfg = self.config
        if seq.seq_id in self._seqs:
            raise InvalidParameterError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or any(seq.block_tables) or seq.num_output_tokens:
            raise InvalidParameterError(f"sequence {seq.seq_id} is not a fresh request")
        total = seq.num_prompt_tokens + seq.max_tokens
        if cfg.max_model_len is not None and total > cfg.max_model_len:
            raise ContextOverflowError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.max_tokens}) exceeds the context "
                f"length {cfg.max_model_len}"
            )
        self.check_fits(seq.num_prompt_tokens, seq.max_tokens)
        # Without chunking a (re)prefill must fit one step, and a recompute prefills prompt + generated.
        if not cfg.enable_chunked_prefill and total - 1 > cfg.max_num_batched_tokens:
            raise ContextOverflowError(
                f"prompt + max_tokens - 1 ({total - 1} tokens) exceeds the per-step token budget "
                f"({cfg.max_num_batched_tokens}) and chunked prefill is off"
            )
        seq.queued_time = self.clock()
        self._seqs[seq.seq_id] = seq
        self._rank[seq.seq_id] = (seq.arrival_time, self._counter)
        self._counter += 1
        self.waiting.append(seq)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ContextOverflowError unless a request of this size could run alone in the empty KV pools."""
        # The last sampled token never has its KV computed, so a sequence holds at most total - 1 positions.
        need = self.kv.min_blocks(num_prompt_tokens + max_tokens - 1)
        for group, n in zip(self.kv.groups, need):
            if n > group.num_blocks:
                what = (f"the KV cache ({group.num_blocks * self.config.block_size} tokens)" if group.window is None
                        else f"the sliding-window KV pool ({group.num_blocks} blocks, {n} needed)")
                raise ContextOverflowError(
                    f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds {what}")

    def get(self, seq_id: int) -> Optional[Sequence]:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq_id: int) -> bool:
        """Cancel a request in any state and free its blocks at once. False if it is unknown or finished.

        Safe while a batch is in flight, provided the runner took its inputs (token ids, block tables) from the
        batch when it started: the freed blocks are handed out again only by the next step(), after the runner
        is done, and update() skips the aborted sequence.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            return False
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, FinishReason.ABORT)
        return True

    def fork(self, parent_id: int, child_id: int) -> Sequence:
        """A running sibling of parent sharing its KV blocks (n > 1 sampling); writes copy on demand."""
        if self._in_flight is not None:
            raise RuntimeError("fork() while a batch is in flight; call update() first")
        parent = self._seqs.get(parent_id)
        if parent is None or parent.status is not SequenceStatus.RUNNING:
            raise InvalidParameterError(f"sequence {parent_id} is not running")
        if child_id in self._seqs:
            raise InvalidParameterError(f"sequence id {child_id} is already scheduled")
        if len(self.running) >= self.config.max_num_seqs:
            raise InvalidParameterError("fork would exceed max_num_seqs")
        child = parent.fork(child_id)
        self.kv.fork(parent, child)
        self._seqs[child_id] = child
        self._rank[child_id] = (parent.arrival_time, self._counter)
        self._counter += 1
        self._insert_running(child)
        return child

    # --- planning ----------------------------------------------------------------------------------------

    def step(self) -> ScheduledBatch:
        """Plan the next forward pass."""
        if self._in_flight is not None:
            raise RuntimeError("step() called again before update() of the previous batch")
        cfg = self.config
        bm = self.kv
        batch = ScheduledBatch()
        budget = cfg.max_num_batched_tokens
        scheduled: set[int] = set()
        now = self.clock()

        def schedule(seq: Sequence, n: int, match: Optional[GroupMatch] = None, draft: tuple[int, ...] = ()) -> None:
            nonlocal budget
            start = match.num_computed_tokens if match is not None else seq.num_computed_tokens
            batch.copies.extend(bm.allocate(seq, n + len(draft), match))
            batch.scheduled.append(
                ScheduledSeq(seq, n + len(draft), start, samples=start + n == seq.num_tokens,
                             is_prefill=start < seq.num_tokens - 1, draft=draft)
            )
            scheduled.add(seq.seq_id)
            budget -= n + len(draft)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now

        def preempt_victim(seq: Sequence, allow_self: bool) -> bool:
            """Preempt the latest-arrived running sequence not yet scheduled in this step. Returns whether one
            was preempted; the victim may be seq itself only if allow_self."""
            for victim in reversed(self.running):
                if victim.seq_id in scheduled:
                    continue
                if victim is seq and not allow_self:
                    return False
                self._preempt(victim)
                batch.preempted.append(victim)
                return True
            return False

        # 1. Decodes. The running list is sorted by arrival and budget >= max_num_seqs, so all fit.
        # Speculative drafts ride along only with budget and blocks to spare: they never cost another stream
        # its decode (each later decode keeps one token of budget) nor a preemption.
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        for i, seq in enumerate(decodes):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            while not bm.can_append_slot(seq):
                if not preempt_victim(seq, allow_self=True) or seq.status is not SequenceStatus.RUNNING:
                    break
            if seq.status is SequenceStatus.RUNNING and bm.can_append_slot(seq):
                room = budget - 1 - (len(decodes) - 1 - i)
                room = min(room, len(seq.draft_token_ids), bm.max_allocatable(seq, 1 + room) - 1)
                if cfg.max_model_len is not None:  # drafts never write past the context
                    room = min(room, cfg.max_model_len - seq.num_tokens)
                schedule(seq, 1, draft=tuple(seq.draft_token_ids[:max(0, room)]))

        # 2. Continue running prefills (chunked), oldest first.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.seq_id in scheduled:
                continue
            want = min(seq.num_uncomputed_tokens, budget)
            if not cfg.enable_chunked_prefill and want < seq.num_uncomputed_tokens:
                continue
            need = want if not cfg.enable_chunked_prefill else 1
            # Make room only by evicting later arrivals; with no room at all this one waits (keeping its
            # blocks) for scheduled sequences to finish.
            while bm.max_allocatable(seq, want) < need:
                if not preempt_victim(seq, allow_self=False):
                    break
            n = bm.max_allocatable(seq, want)
            if n >= need:
                schedule(seq, n)

        # 3. Admit from the waiting queue, strictly in order. Not in a step that had to preempt: memory is
        # tight, and readmitting a just-preempted sequence would only thrash.
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            match = bm.prefix_match(seq) if cfg.enable_prefix_caching and seq.use_prefix_cache else NO_MATCH
            remaining = seq.num_tokens - match.num_computed_tokens
            want = min(remaining, budget)
            if want < remaining and not cfg.enable_chunked_prefill:
                break
            n = bm.max_allocatable(seq, want, match)
            # A newcomer must get its whole first chunk, so it does not grab the last blocks that running
            # streams need. If nothing runs, nothing will free up: take what fits (add() guarantees the
            # sequence fits the empty pool, so chunk by chunk it completes).
            if n < want and not (not self.running and n > 0 and cfg.enable_chunked_prefill):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self._insert_running(seq)
            schedule(seq, n, match)

        self._in_flight = batch
        return batch

    # --- results -----------------------------------------------------------------------------------------

    def update(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: SequenceT[int | SequenceT[int]],
        stopped_seq_ids: Collection[int] = (),
    ) -> list[Sequence]:
        """Record a finished step: advance computed tokens, append sampled tokens, finish sequences.

        sampled_token_ids holds one token per entry of batch.sampling, in that order (aborted entries included;
        their token is dropped); for an entry with a draft it is the list of tokens verification emitted (the
        accepted drafts then one more; 1 to len(draft) + 1 tokens): the KV of the accepted ones is kept and the
        blocks holding only rejected positions go back to the pool. stopped_seq_ids names sequences whose last
        emitted token ended them (EOS or a stop sequence, which the caller detects). Returns the sequences that
        finished in this update.
        """
        if batch is not self._in_flight:
            raise RuntimeError("update() with a batch that is not the one in flight")
        sampling = batch.sampling
        if len(sampled_token_ids) != len(sampling):
            raise ValueError(f"expected {len(sampling)} sampled tokens, got {len(sampled_token_ids)}")
        self._in_flight = None
        bm = self.kv
        now = self.clock()
        tokens = iter(sampled_token_ids)
        finished: list[Sequence] = []
        for entry in batch.scheduled:
            seq = entry.seq
            token = next(tokens) if entry.samples else None
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.draft_token_ids = []
            if isinstance(token, (list, tuple)):
                emitted = list(token)
                if not 1 <= len(emitted) <= len(entry.draft) + 1 or emitted[:-1] != list(entry.draft[:len(emitted) - 1]):
                    raise ValueError(f"sequence {seq.seq_id}: emitted tokens do not extend its draft")
                # The last token fed plus the accepted drafts have valid KV; the rest of the pass is discarded.
                seq.num_computed_tokens += len(emitted)
                for t in emitted[:-1]:
                    seq.append_token(t)
                token = emitted[-1]
                bm.trim(seq)
            else:
                seq.num_computed_tokens += entry.num_tokens
            bm.commit(seq)
            if token is not None:
                seq.append_token(token)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                if seq.seq_id in stopped_seq_ids:
                    reason: Optional[FinishReason] = FinishReason.STOP
                elif seq.num_output_tokens >= seq.max_tokens:
                    reason = FinishReason.LENGTH
                else:
                    reason = None
                if reason is not None:
                    self.running.remove(seq)
                    self._finish(seq, reason)
                    finished.append(seq)
                    continue
            bm.release_out_of_window(seq)
        return finished

    # --- internals ---------------------------------------------------------------------------------------

    def _insert_running(self, seq: Sequence) -> None:
        keys = [self._rank[s.seq_id] for s in self.running]
        self.running.insert(bisect.bisect(keys, self._rank[seq.seq_id]), seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)  # also resets num_computed_tokens: all KV must be recomputed
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = self.clock()
        del self._seqs[seq.seq_id]
        del self._rank[seq.seq_id]
