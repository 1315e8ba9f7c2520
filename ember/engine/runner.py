"""The model runner: one ScheduledBatch -> one forward pass over a flat batch -> logits of the sampling rows.

The scheduler decides what runs; the runner turns that into tensors. Every scheduled entry contributes its
tokens at positions [start, start + num_tokens) to one flat run of tokens (prefill chunks and decode tokens
mixed, in schedule order); the paged cache is told where each token's K/V goes and what it may attend to; and
the vocabulary projection is computed only for the last token of each entry that samples - or, for a
speculative decode (last token + k drafts), for all k+1 of its tokens, in position order.

A speculative entry goes to the cache as k+1 single-token entries at consecutive positions: each row then takes
the decode attention path with its own key length, exactly the computation a plain decode of that position
does (the K/V of the whole pass are written before any row reads, so row i sees rows < i). That keeps greedy
speculative output identical to plain decoding, which a causal-masked multi-token chunk would not guarantee
bit for bit.

With several KV groups (a global and a sliding-window group, see ember.engine.kv_groups) every group gets its
own layout of the same flat tokens, built from the sequences' tables of that group.
"""
from __future__ import annotations

import torch

from ember.engine.paged_cache import BatchLayout, PagedKVCache
from ember.engine.scheduler import ScheduledBatch
from ember.kernels import native
from ember.kernels.linear import int4_kernel_rows
from ember.model.transformer import Transformer


class Runner:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model = model
        self.cache = cache

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run `batch`; returns float32 logits, one row per sampling entry in batch.sampling order (1 + len(draft)
        consecutive rows for a speculative entry).

        Reads token ids and block tables from the sequences as they are now, so it must run between the
        scheduler's step() and update() (which is when they describe exactly this batch)."""
        # Copy-on-write first: an entry may write into the destination block in this very pass.
        self.cache.apply_copies(batch.copies)
        if batch.is_empty:
            return torch.empty(0, self.model.config.n_vocab)
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        decode_rows: list[int] = []  # rows computed as alone: the small-batch matmul kernel (int4_kernel_rows)
        groups = range(self.cache.num_groups)
        # Per group, per layout entry: (that group's block table, start position, number of tokens).
        entries: list[list] = [[] for _ in groups]
        for e in batch.scheduled:
            tables = e.seq.block_tables
            end = e.start + e.num_tokens
            if e.draft:
                decode_rows.extend(range(len(tokens), len(tokens) + e.num_tokens))
                row0 = len(tokens)
                tokens.append(e.seq.token_ids[e.start])
                tokens.extend(e.draft)
                positions.extend(range(e.start, end))
                for g in groups:
                    entries[g].extend((tables[g], p, 1) for p in range(e.start, end))
                rows.extend(range(row0, len(tokens)))
                continue
            # Where the cache attends row by row (PagedKVCache.row_invariant), rows are computed as they would
            # be alone - the small-batch matmul kernel and one attention row each: every prompt row with exact
            # prefill (ember.kernels.native.EXACT, the default), else chunks shorter than 64 tokens; and
            # generated tokens recomputed after a preemption (they were decode rows the first time). Long
            # chunks without exact prefill take the faster bfloat16 GEMM + SDPA path.
            exact = self.cache.row_invariant
            split = max(e.start, min(end, e.seq.num_prompt_tokens)) if exact else end
            if split > e.start:
                n = split - e.start
                if n == 1 or (exact and n < native.row_chunk()):
                    decode_rows.extend(range(len(tokens), len(tokens) + n))
                for g in groups:
                    entries[g].append((tables[g], e.start, n))
            if end > split:
                decode_rows.extend(range(len(tokens) + split - e.start, len(tokens) + e.num_tokens))
                for g in groups:
                    entries[g].extend((tables[g], p, 1) for p in range(split, end))
            tokens.extend(e.seq.token_ids[e.start : end])
            positions.extend(range(e.start, end))
            if e.samples:
                rows.append(len(tokens) - 1)
        self.cache.set_batches([BatchLayout.build(self.cache.block_size, entries[g], self.cache.exact) for g in groups])
        with int4_kernel_rows(torch.tensor(decode_rows, dtype=torch.long) if decode_rows else None):
            return self.model.forward(
                torch.tensor(tokens, dtype=torch.long),
                torch.tensor(positions, dtype=torch.long),
                self.cache,  # type: ignore[arg-type]  # duck-typed: PagedKVCache has KVCache's attend()
                logit_rows=torch.tensor(rows, dtype=torch.long),
            )
