"""Draft-model proposer: a smaller model with the same vocabulary drafts tokens for the main model to verify.

The draft model has its own paged KV cache and its own block manager (no prefix caching) inside the same
engine; each main sequence that speculates owns a `_DraftState` there. A proposal round for a batch of
sequences runs k passes of the draft model:
  pass 1 feeds every token the draft has not seen yet (the whole prompt on the first round, usually just the
         last token or two afterwards) and drafts d1 greedily from its last row;
  pass j feeds d_{j-1} and drafts d_j.
Drafting greedily makes the proposal deterministic (a point mass), which ember.engine.speculative.accept's
rejection rule assumes. The draft's argmax is taken after the request's logit bias and repetition penalties
(over its history plus the drafts so far), the stages of the sampling chain that can move the argmax, so a
draft of the same model proposes exactly what greedy decoding with penalties would pick. After the main model verifies, `rollback` keeps the draft's KV only for positions
whose tokens were accepted.
"""
from __future__ import annotations

import time
from typing import Sequence as SequenceT

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.paged_cache import PagedKVCache
from ember.engine.runner import Runner
from ember.engine.sampler import BatchParams, SamplingParams, greedy, greedy_picks, penalty_windows
from ember.engine.scheduler import ScheduledBatch, ScheduledSeq
from ember.engine.sequence import Sequence
from ember.errors import InvalidParameterError
from ember.model.transformer import Transformer, weight_bytes_per_token

CATCH_UP_CHUNK = 512  # most tokens one catch-up pass feeds per sequence (bounds activations, as prefill chunks)
# A pass feeding more tokens than this for some sequence is a catch-up prefill (a new request's prompt), not a
# drafting pass: it is left out of the passes' timing (a 237-token prompt cost a 135M draft ~0.25 s, which
# read as a pass 20 times a step's length made the cost check stop drafting for good).
TIMED_PASS_TOKENS = 4
# A decode pass costs about its weight bytes over the memory bandwidth plus per-layer work that does not scale
# with the weights (norms, rope, attention calls, dispatch): ~0.15 ms a layer on the development machine, the
# time ~3 MiB of weights take to stream at its ~20 GB/s.
LAYER_BYTES = 3 << 20


class _DraftState:
    """What the draft's block manager and runner read of a sequence (duck-typed like Sequence)."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.token_ids: list[int] = []
        self.num_prompt_tokens = 0
        self.params: SamplingParams | None = None  # the request's, for its penalties and bias
        self.block_tables: list[list[int]] = [[]]  # one KV group: the draft keeps every block
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_hashes: list[bytes] = []

    @property
    def block_table(self) -> list[int]:
        return self.block_tables[0]


class DraftProposer:
    def __init__(self, model: Transformer, main_vocab: int, num_blocks: int, block_size: int,
                 kv_dtype: str = "float16") -> None:
        c = model.config
        if c.n_vocab != main_vocab:
            raise InvalidParameterError(
                f"the draft model's vocabulary ({c.n_vocab} tokens) differs from the main model's ({main_vocab})")
        self.model = model
        self.cache = PagedKVCache(c.n_layer, c.n_head_kv, c.head_dim, c.value_dim, num_blocks, block_size, kv_dtype)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = Runner(model, self.cache)
        self.max_positions = c.n_ctx_train
        self._states: dict[int, _DraftState] = {}
        # the last propose()'s drafting passes: how many, and their seconds; and the seconds of its catch-up
        # prefills, which are neither
        self.timed_passes = 0
        self.timed_seconds = 0.0
        self.prefill_seconds = 0.0

    def cost_prior(self, main: Transformer) -> float:
        """A draft pass's expected cost as a fraction of a main-model decode step, before any was timed: weight
        bytes plus LAYER_BYTES per layer, draft over main (the speculator's first plan uses it; measurements
        replace it)."""
        def cost(m: Transformer) -> int:
            return weight_bytes_per_token(m) + LAYER_BYTES * m.config.n_layer
        return cost(self.model) / cost(main)

    def propose(self, wants: SequenceT[tuple[Sequence, int, SamplingParams]]) -> dict[int, list[int]]:
        """Greedy drafts of up to k tokens for each (sequence, k, its sampling params). A sequence the draft
        pool or context cannot hold gets no draft (and its state is dropped) rather than failing the step."""
        states: dict[int, tuple[_DraftState, int]] = {}
        for seq, k, params in wants:
            if k < 1 or seq.num_tokens + k > self.max_positions:
                continue
            st = self._states.get(seq.seq_id)
            if st is None:
                st = self._states[seq.seq_id] = _DraftState(seq.seq_id)
            st.token_ids = list(seq.token_ids)
            st.num_prompt_tokens = seq.num_prompt_tokens
            st.params = params
            st.num_computed_tokens = min(st.num_computed_tokens, seq.num_tokens - 1)
            self.blocks.trim(st)  # type: ignore[arg-type]
            states[seq.seq_id] = (st, k)
        drafts: dict[int, list[int]] = {sid: [] for sid in states}
        self.timed_passes, self.timed_seconds, self.prefill_seconds = 0, 0.0, 0.0
        # Catch up: feed what the draft has not seen, in chunks; the chunk reaching the last token samples d1.
        while True:
            batch = ScheduledBatch()
            for sid, (st, k) in list(states.items()):
                todo = len(st.token_ids) - st.num_computed_tokens
                if drafts[sid] or todo < 1:
                    continue
                # The prompt as prefill chunks, generated tokens as decode rows (the runner's form for a token
                # plus drafts): the computations the main model gave the same positions, so that a draft which
                # is the main model (or shares its layers' numerics) does not drift from it.
                start = st.num_computed_tokens
                in_prompt = start < st.num_prompt_tokens
                n = min(st.num_prompt_tokens - start if in_prompt else todo, CATCH_UP_CHUNK)
                if not self._allocate(st, n):
                    del states[sid], drafts[sid]
                    continue
                if in_prompt:
                    batch.scheduled.append(ScheduledSeq(st, n, start,  # type: ignore[arg-type]
                                                        samples=n == todo, is_prefill=n > 1))
                else:
                    rows = tuple(st.token_ids[start + 1 : start + n])
                    batch.scheduled.append(ScheduledSeq(st, n, start, samples=n == todo,  # type: ignore[arg-type]
                                                        is_prefill=False, draft=rows))
            if batch.is_empty:
                break
            self._run(batch, drafts)
        # Then one token per pass until every sequence has its k drafts.
        while True:
            batch = ScheduledBatch()
            for sid, (st, k) in list(states.items()):
                if len(drafts[sid]) >= k:
                    continue
                if not self._allocate(st, 1):
                    del states[sid]  # keep the drafts it has
                    continue
                batch.scheduled.append(ScheduledSeq(st, 1, st.num_computed_tokens,  # type: ignore[arg-type]
                                                    samples=True, is_prefill=False))
            if batch.is_empty:
                break
            self._run(batch, drafts)
        return {sid: d for sid, d in drafts.items() if d}

    def _allocate(self, st: _DraftState, n: int) -> bool:
        if not self.blocks.can_allocate(st, n):  # type: ignore[arg-type]
            self.release(st.seq_id)
            return False
        self.blocks.allocate(st, n)  # type: ignore[arg-type]
        return True

    def _run(self, batch: ScheduledBatch, drafts: dict[int, list[int]]) -> None:
        t0 = time.perf_counter()
        self._forward(batch, drafts)
        if all(e.num_tokens <= TIMED_PASS_TOKENS for e in batch.scheduled):
            self.timed_passes += 1
            self.timed_seconds += time.perf_counter() - t0
        else:
            self.prefill_seconds += time.perf_counter() - t0

    def _forward(self, batch: ScheduledBatch, drafts: dict[int, list[int]]) -> None:
        logits = self.runner.execute(batch)
        sampling = batch.sampling
        # the runner returns 1 + len(draft) rows for an entry with rows (sampling or not), one for another
        # sampling entry; the next token follows an entry's last row
        ends, at = [], 0
        for e in batch.scheduled:
            at += 1 + len(e.draft) if e.draft else int(e.samples)
            if e.samples:
                ends.append(at - 1)
        tokens = self._argmax(logits[ends], [e.seq for e in sampling]) if sampling else []
        for e in batch.scheduled:
            e.seq.num_computed_tokens += e.num_tokens
        for e, token in zip(sampling, tokens):
            drafts[e.seq.seq_id].append(token)
            e.seq.token_ids.append(token)

    @staticmethod
    def _argmax(logits: torch.Tensor, states: list) -> list[int]:
        params = [st.params or SamplingParams(temperature=0) for st in states]
        if not any(p.penalizes or p.logit_bias for p in params):
            return greedy(logits).tolist()
        bp = BatchParams.from_params(params, logits.shape[-1])
        window = penalty_windows([st.token_ids for st in states], bp.repeat_last_n) if bp.any_penalty else None
        return greedy_picks(logits, bp, window).tolist()

    def rollback(self, seq_id: int, valid: int) -> None:
        """The main sequence's tokens at positions < valid are final: keep the draft KV only up to there."""
        st = self._states.get(seq_id)
        if st is not None and st.num_computed_tokens > valid:
            st.num_computed_tokens = valid
            self.blocks.trim(st)  # type: ignore[arg-type]

    def release(self, seq_id: int) -> None:
        st = self._states.pop(seq_id, None)
        if st is not None:
            self.blocks.free(st)  # type: ignore[arg-type]
