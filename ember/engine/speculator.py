"""The engine's speculative-decoding half: per-request policy, proposals before a step, verification and cost
accounting after it. ember.engine.speculative holds the pure pieces (n-gram index, policy, acceptance rule);
this module wires them to sequences, samplers and the draft model for the Engine.

Per step: propose() sets `seq.draft_token_ids` on running sequences about to decode (the scheduler then gives
them 1 + k slots if budget and blocks allow); after the forward pass verify() turns each speculative entry's
k+1 logits rows into the tokens to emit; account() feeds the cost check; settle() rolls the draft model's KV
back to what was accepted.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence as SequenceT

import torch

from ember.engine.draft import DraftProposer
from ember.engine.sampler import BatchParams, Sampler, greedy, greedy_picks, penalty_windows, target_distribution
from ember.engine.scheduler import ScheduledBatch, ScheduledSeq
from ember.engine.sequence import Sequence
from ember.engine.speculative import (MatchAcceptance, NgramIndex, Speculation, SpeculativeConfig, accept,
                                     accept_greedy)

ROW_COST_PRIOR = 0.1  # a verification row's cost as a fraction of a plain step, until measured (SmolLM2, 1k ctx)


class RequestSpeculation:
    """One request's speculation state: its policy and, for prompt lookup, its n-gram index, how often its
    copies are accepted, and the match length behind the draft being verified."""

    def __init__(self, policy: Speculation, ngram: Optional[NgramIndex]) -> None:
        self.policy = policy
        self.ngram = ngram
        self.acceptance = MatchAcceptance() if ngram is not None else None
        self.match_length = 0


class Speculator:
    def __init__(self, config: SpeculativeConfig, n_vocab: int, draft: Optional[DraftProposer],
                 draft_cost_prior: Optional[float] = None) -> None:
        self.config = config
        self.n_vocab = n_vocab
        self.draft = draft
        self.drafted = self.accepted = self.steps = self.emitted = 0
        # The cost check's reference: EMA of a plain (draft-free) all-decode step's seconds, by batch size.
        self._plain_step: dict[int, float] = {}
        self._row_cost = ROW_COST_PRIOR  # EMA: one verification row's seconds / a plain step's
        # EMA: one draft-model pass's seconds / a plain step's; before any is timed, the draft's estimate from
        # weight bytes and layers (DraftProposer.cost_prior), so a draft that cannot pay is never run at all
        self._draft_cost: Optional[float] = draft_cost_prior
        self._propose_seconds = 0.0
        self._draft_seconds = 0.0
        self._draft_passes = 0

    def for_request(self, draft_num_predict: Optional[int], constrained: bool) -> Optional[RequestSpeculation]:
        """The state of a new request, or None when it does not speculate (engine setting, draft_num_predict 0,
        or a token constraint, whose masks would have to be replayed over the drafts)."""
        cfg = self.config
        n = cfg.num_tokens if draft_num_predict is None else draft_num_predict
        if not cfg.enabled or n < 1 or constrained:
            return None
        ngram = NgramIndex(cfg.ngram_min, cfg.ngram_max) if cfg.method == "ngram" else None
        return RequestSpeculation(Speculation(n, cfg.adaptive, gated=ngram is not None and cfg.adaptive), ngram)

    @property
    def threshold(self) -> float:
        """The least probability of acceptance for which a draft token is worth a verification row.

        A row costs `row_cost` plain steps and yields its token with probability p; speculation runs at some
        rate g > 1 tokens per plain-step time, so the row pays when p / row_cost > g. g = 2 is the rate this
        aims at (and roughly what copied text gives); the row cost is measured (see account)."""
        return min(0.9, max(0.02, 2.0 * self._row_cost))

    def propose(self, running: SequenceT[Sequence], states: dict[int, tuple[RequestSpeculation, Sampler]]) -> None:
        """Set draft tokens on the sequences of `running` that speculate (`states`: seq id -> its state and
        sampler) and are about to decode."""
        t0 = time.perf_counter()
        wants = []
        for seq in running:
            entry = states.get(seq.seq_id)
            if entry is None or seq.num_uncomputed_tokens != 1:
                continue
            spec, sampler = entry
            # Drafts past max_tokens would be cut anyway: the last token always comes from verification.
            costs = (self._row_cost, self._draft_cost) if spec.ngram is None else (None, None)
            k = min(spec.policy.next_length(*costs), seq.max_tokens - seq.num_output_tokens - 1)
            if k < 1:
                continue
            if spec.ngram is not None:
                spec.ngram.sync(seq.token_ids)
                tokens, spec.match_length = spec.ngram.match(k)
                if spec.policy.adaptive and spec.acceptance is not None:
                    tokens = tokens[: spec.acceptance.keep(spec.match_length, len(tokens), self.threshold)]
                seq.draft_token_ids = tokens
            else:
                wants.append((seq, k, sampler.params))
        self._draft_seconds, self._draft_passes = 0.0, 0
        prefill = 0.0
        if wants and self.draft is not None:
            drafts = self.draft.propose(wants)
            # the drafting passes only: a new request's prompt catch-up is a one-time prefill, not a pass
            self._draft_seconds, self._draft_passes = self.draft.timed_seconds, self.draft.timed_passes
            prefill = self.draft.prefill_seconds
            for seq, _, _ in wants:
                seq.draft_token_ids = drafts.get(seq.seq_id, [])
        self._propose_seconds = time.perf_counter() - t0 - prefill

    def verify(self, e: ScheduledSeq, rows: torch.Tensor, spec: RequestSpeculation, sampler: Sampler) -> list[int]:
        """Verify e.draft against the main model's rows [k+1, V]: the tokens to emit. Greedy rows compare the
        drafts with the greedy picks (accept_greedy: no probabilities needed); sampling rows go through the
        rejection rule over the sampling chain's distributions (speculative.accept)."""
        drafts = list(e.draft)
        p = sampler.params
        bp = window = None
        if p.penalizes or p.logit_bias or not p.greedy:
            k = len(drafts)
            bp = BatchParams.from_params([p] * (k + 1), self.n_vocab)
            if bp.any_penalty:  # row i's history holds the drafts before it; the window needs only the tail
                n = max(bp.repeat_last_n)
                history = e.seq.token_ids if n < 0 else e.seq.token_ids[max(0, e.seq.num_tokens - n):]
                window = penalty_windows([history + drafts[:i] for i in range(k + 1)], bp.repeat_last_n)
        tokens: list[int]
        if p.greedy:
            picks = greedy(rows) if bp is None else greedy_picks(rows, bp, window)
            tokens = accept_greedy(picks.tolist(), drafts)
        else:
            assert bp is not None
            tokens = accept(target_distribution(rows, bp, window), drafts, sampler.generator)
        spec.policy.record(len(drafts), len(tokens) - 1)
        if spec.acceptance is not None:
            spec.acceptance.record(spec.match_length, len(drafts), len(tokens) - 1)
        self.drafted += len(drafts)
        self.accepted += len(tokens) - 1
        self.steps += 1
        self.emitted += len(tokens)
        return tokens

    def account(self, batch: ScheduledBatch, seconds: float, states: dict[int, RequestSpeculation]) -> None:
        """Feed the cost model: how long verification rows and draft passes take relative to a plain decode
        step of the same number of sequences (only all-decode batches compare; prefill chunks would skew
        both). Before any plain step of that size was timed, the verification step itself stands in for one
        (its rows discounted at the current row cost), so a draft model's cost is known from its first step."""
        if any(e.is_prefill for e in batch.scheduled):
            return
        n = len(batch.scheduled)
        drafted = [e for e in batch.scheduled if e.draft]
        if not drafted:
            old = self._plain_step.get(n)
            self._plain_step[n] = seconds if old is None else 0.8 * old + 0.2 * seconds
            return
        rows = sum(len(e.draft) for e in drafted)
        plain = self._plain_step.get(n)
        if plain:
            self._row_cost = 0.9 * self._row_cost + 0.1 * min(1.0, max(0.0, (seconds / plain - 1.0) / rows))
        reference = plain or seconds / (1.0 + rows * self._row_cost)
        if self._draft_passes:
            draft_cost = self._draft_seconds / reference / self._draft_passes
            old_cost = self._draft_cost
            self._draft_cost = draft_cost if old_cost is None else 0.7 * old_cost + 0.3 * draft_cost
        if plain:
            relative = (seconds + self._propose_seconds) / plain
            for e in drafted:
                spec = states.get(e.seq.seq_id)
                if spec is not None:
                    spec.policy.record_cost(relative)

    def settle(self, seq: Sequence, finished: bool) -> None:
        """After the scheduler's update: the draft model keeps KV only for accepted positions."""
        if self.draft is None:
            return
        if finished:
            self.draft.release(seq.seq_id)
        else:
            self.draft.rollback(seq.seq_id, seq.num_tokens - 1)

    def release(self, seq_id: int) -> None:
        if self.draft is not None:
            self.draft.release(seq_id)
