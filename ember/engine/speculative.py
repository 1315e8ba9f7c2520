"""Speculative decoding: propose k tokens cheaply, verify them with one forward pass of the main model.

A speculating sequence's decode step feeds [last token, d1..dk] at positions [n-1, n+k-1] and gets k+1 logits
rows; row i is the main model's distribution for the token after d1..di. `accept` walks the rows: greedy rows
accept d_{i+1} while it equals the argmax and then emit the argmax (so the output is exactly what plain greedy
decoding gives); sampling rows apply the rejection rule of Leviathan et al. 2023 / Chen et al. 2023 - accept d
with probability min(1, p(d)/q(d)), on rejection draw from the normalized residual max(0, p - q) - which makes
every emitted token follow the main model's distribution p whatever the proposer did. Both proposers here
propose deterministically (prompt lookup copies text; the draft model drafts greedily), i.e. q is a point mass
on d: acceptance is then p(d) and the residual is p with d removed. If all k drafts are accepted, row k gives
one bonus token, so a step emits between 1 and k+1 tokens.

`Speculation` holds the per-request policy: how many tokens to draft next (adaptive from the recent acceptance
rate) and when to stop speculating because it does not pay (see `next_length`). Prompt lookup adds
`MatchAcceptance`: how likely a copied token is accepted, learnt per request by the length of the match it
continues, which decides how much of a lookup proposal is worth verifying (see `MatchAcceptance.keep`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as SequenceT

import torch

from ember.engine.sampler import greedy
from ember.errors import InvalidParameterError

METHODS = ("none", "ngram", "draft")
# Most tokens drafted per step unless a request or Modelfile says otherwise (llama.cpp's --draft-max default).
# Long drafts only happen where they pay: prompt lookup's gate keeps a copied token only while its chance of
# acceptance covers its verification row, a draft model's plan picks the length with the best expected yield.
# On the six summaries of benchmarks/speculative.py, 16 against 8: 2.15x against 2.04x (the text quoted or
# repeated at length gains, the rest is unchanged).
DEFAULT_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """How an engine speculates. method "ngram": prompt lookup; "draft": a draft model (the engine must have
    one); "none": never. num_tokens: most tokens drafted per step (Ollama's draft_num_predict)."""

    method: str = "none"
    num_tokens: int = DEFAULT_DRAFT_TOKENS
    # Suffix n-grams prompt lookup tries, longest first. Short matches are allowed because MatchAcceptance
    # drafts from them only while they are accepted often enough to pay; long ones tell a copy apart.
    ngram_max: int = 12
    ngram_min: int = 1
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidParameterError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or not 0 <= self.num_tokens <= 64:
            raise InvalidParameterError(f"draft_num_predict must be an integer in 0..64, got {self.num_tokens!r}")
        if not (isinstance(self.ngram_min, int) and isinstance(self.ngram_max, int)
                and 1 <= self.ngram_min <= self.ngram_max <= 16):
            raise InvalidParameterError("ngram sizes must satisfy 1 <= ngram_min <= ngram_max <= 16")

    @property
    def enabled(self) -> bool:
        return self.method != "none" and self.num_tokens > 0


class NgramIndex:
    """Prompt lookup (Saxena 2023, llama.cpp's lookup decoding): find the latest earlier occurrence of the
    text's last n tokens (the longest n in [ngram_min, ngram_max] that occurred before) and propose the tokens
    that followed it.

    Keeps each token's positions; a proposal walks the earlier positions of the last token, latest first,
    comparing backwards, and stops at the first full-length match. Appending a token is one list append (the
    earlier form, a table per n-gram length, took 152 ms to index a 1037-token prompt on a busy machine,
    before the first proposal; this takes 0.3 ms, and a proposal tens of microseconds)."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._tokens: list[int] = []
        self._positions: dict[int, list[int]] = {}  # token -> its positions, ascending

    def extend(self, tokens: SequenceT[int]) -> None:
        toks, where = self._tokens, self._positions
        for t in tokens:
            t = int(t)
            where.setdefault(t, []).append(len(toks))
            toks.append(t)

    def sync(self, tokens: SequenceT[int]) -> None:
        """Catch up with a sequence's token list (which only grows)."""
        if len(tokens) > len(self._tokens):
            self.extend(tokens[len(self._tokens):])

    def match(self, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram,
        and that n (0 and [] when no suffix of ngram_min or more tokens occurred before)."""
        toks = self._tokens
        last = len(toks) - 1
        if last < 0:
            return [], 0
        best, best_end = 0, -1
        positions = self._positions[toks[last]]
        for i in range(len(positions) - 2, -1, -1):  # earlier occurrences of the last token, latest first
            j = positions[i]
            n = 1
            while n < self.ngram_max and j - n >= 0 and toks[j - n] == toks[last - n]:
                n += 1
            if n > best:  # strictly longer: among equal lengths the latest wins
                best, best_end = n, j + 1
                if n == self.ngram_max:
                    break
        if best < self.ngram_min:
            return [], 0
        return toks[best_end:best_end + k], best

    def propose(self, k: int) -> list[int]:
        return self.match(k)[0]


# Prior probability that a prompt-lookup token is accepted, by the length of the suffix match it continues
# (a token j places into a draft continues a match of n + j). From SmolLM2's greedy summaries of six
# ~1000-token documents (`benchmarks/speculative.py --analyze --repeat-penalty 1.0`): ~0.2 after a one-token
# match, ~0.5 after two, 0.6-0.8 for 3-7, 0.9+ from 8; rounded. Each request's own outcomes take over after a
# few observations.
MATCH_PRIOR = (0.25, 0.45, 0.65, 0.75, 0.75, 0.75, 0.75, 0.9)  # lengths 1..8; 8 stands for 8 and longer
PRIOR_WEIGHT = 4.0  # the prior counts as this many observations per length


class MatchAcceptance:
    """One request's estimate of P(a prompt-lookup token is accepted | the length of the match it continues),
    and the draft length that estimate makes worth verifying.

    A copied token is right far more often after a long match (the text is being quoted) than after a short
    one (a common word that happened to occur before), so the lengths are tracked separately - Beta estimates
    per length from MATCH_PRIOR, updated with every verified token: the accepted ones, and the first rejected
    one (tokens after it say nothing, their context was already wrong)."""

    def __init__(self) -> None:
        n = len(MATCH_PRIOR)
        self._seen = [0] * n
        self._accepted = [0] * n

    @staticmethod
    def _bucket(length: int) -> int:
        return min(max(length, 1), len(MATCH_PRIOR)) - 1

    def probability(self, length: int) -> float:
        b = self._bucket(length)
        return (self._accepted[b] + PRIOR_WEIGHT * MATCH_PRIOR[b]) / (self._seen[b] + PRIOR_WEIGHT)

    def keep(self, length: int, available: int, threshold: float) -> int:
        """How many of `available` copied tokens (continuing a match of `length`) to draft: the longest prefix
        whose last token is accepted with probability >= threshold, i.e. the tokens whose expected yield is
        worth their verification cost (the caller's threshold, see Speculator.threshold)."""
        p, n = 1.0, 0
        while n < available:
            p *= self.probability(length + n)
            if p < threshold:
                break
            n += 1
        return n

    def record(self, length: int, drafted: int, accepted: int) -> None:
        for j in range(min(drafted, accepted + 1)):
            b = self._bucket(length + j)
            self._seen[b] += 1
            self._accepted[b] += j < accepted


ALPHA_PRIOR, ALPHA_PRIOR_WEIGHT = 0.6, 2.0  # draft acceptance before evidence, worth 2 observations
ALPHA_DECAY = 0.9  # per verification step: acceptance_estimate follows the last ~10 steps
PROBE_ALPHA = 0.9  # the acceptance a probe after a pause assumes: no probe where even that would not pay


class Speculation:
    """One request's speculation policy and counters.

    Draft length adapts to the acceptance of the last steps: a step whose drafts were all accepted grows it
    by 2 (up to the maximum), one that accepted less than half shrinks it to what was accepted plus one.
    (Gated policies skip all of this: their proposer cuts each draft to the part whose expected yield pays.
    Given costs, next_length plans the length instead - a draft model's case, see plan.)
    Speculation pauses (for a cool-down that doubles each time, then tries again) when it does not pay:
      - `patience` consecutive steps accepted nothing (not gated), or
      - measured cost says so: the engine reports each verification step's duration relative to a plain
        decode step of the same batch (`record_cost`); if the tokens emitted per plain-step-equivalent,
        averaged over recent steps, fall below 1, plain decoding is faster.
    """

    def __init__(self, max_tokens: int, adaptive: bool = True, patience: int = 4, gated: bool = False) -> None:
        self.max_tokens = max_tokens
        self.adaptive = adaptive
        self.patience = patience
        # gated: the proposer trims each draft to the tokens whose estimated acceptance pays for their measured
        # cost (prompt lookup's MatchAcceptance with Speculator.threshold), so the length stays at the maximum
        # and neither misses nor the cost check pause it: the gate itself stops drafting when copies stop
        # being accepted.
        self.gated = gated
        self.length = min(max_tokens, 3) if adaptive and not gated else max_tokens
        self.drafted = 0
        self.accepted = 0
        self.steps = 0  # verification steps
        self.emitted = 0  # tokens emitted by verification steps
        self._misses = 0
        self._pause = 0
        self._cooldown = 8
        self._gain: float | None = None  # EMA of tokens emitted per plain-step-equivalent of time
        self._costed = 0
        self._last_emitted = 0
        self._probe = False
        # decayed counts of accepted drafts and of steps that rejected one (acceptance_estimate)
        self._acc_recent = 0.0
        self._rej_recent = 0.0

    def next_length(self, row_cost: float | None = None, draft_cost: float | None = None) -> int:
        """Tokens to draft for the next step (0: decode plainly this step).

        With costs (a draft model's: both relative to a plain decode step, see plan; the draft's estimated
        before it is first timed) the length is the one with the best expected yield per time, and
        speculation pauses when no length beats plain decoding. The first step after a pause probes again
        (with the adaptive length) only if drafts accepted with PROBE_ALPHA could pay at these costs."""
        if self._pause > 0:
            self._pause -= 1
            self._probe = self._pause == 0
            return 0
        if not self.adaptive or self.gated or row_cost is None or draft_cost is None:
            return self.length
        k = self.plan(row_cost, draft_cost)
        if k == 0 and self._probe:
            # After a pause: measure again, if drafts that were mostly accepted could pay at these costs.
            k = min(self.length, self.plan(row_cost, draft_cost, PROBE_ALPHA))
        self._probe = False
        if k == 0:
            self._back_off()
        return k

    def acceptance_estimate(self) -> float:
        """alpha: the chance that a draft is accepted once the ones before it were (recent steps weigh more)."""
        return (self._acc_recent + ALPHA_PRIOR_WEIGHT * ALPHA_PRIOR) / (
            self._acc_recent + self._rej_recent + ALPHA_PRIOR_WEIGHT)

    def plan(self, row_cost: float, draft_cost: float, alpha: float | None = None) -> int:
        """The draft length k maximizing expected tokens per unit of time, 0 when none beats plain decoding.

        A step drafting k tokens costs 1 + k * (row_cost + draft_cost) plain steps (a verification row each, a
        draft pass each) and emits 1 + alpha + ... + alpha^k tokens on average (Leviathan et al. 2023's
        expected yield, alpha from acceptance_estimate unless given); plain decoding yields 1 token per 1."""
        alpha = self.acceptance_estimate() if alpha is None else alpha
        best_k, best = 0, 1.0
        emitted = 1.0
        for k in range(1, self.max_tokens + 1):
            emitted += alpha ** k
            rate = emitted / (1.0 + k * (row_cost + draft_cost))
            if rate > best:
                best_k, best = k, rate
        return best_k

    def _back_off(self) -> None:
        self._pause, self._cooldown, self._misses = self._cooldown, min(self._cooldown * 2, 256), 0
        self._gain, self._costed = None, 0

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        self.emitted += accepted + 1
        self._last_emitted = accepted + 1
        self._acc_recent = ALPHA_DECAY * self._acc_recent + accepted
        self._rej_recent = ALPHA_DECAY * self._rej_recent + (accepted < drafted)
        if not self.adaptive or self.gated:
            return
        if accepted == drafted:
            self.length = min(self.max_tokens, self.length + 2)
        elif accepted < drafted // 2:
            self.length = max(1, accepted + 1)
        if accepted == 0:
            self._misses += 1
            if self._misses >= self.patience:
                self._back_off()
        else:
            self._misses = 0

    def record_cost(self, relative_cost: float) -> None:
        """The last verification step took `relative_cost` times a plain decode step (after record())."""
        if not self.adaptive or self.gated or relative_cost <= 0:
            return
        gain = self._last_emitted / relative_cost
        self._gain = gain if self._gain is None else 0.7 * self._gain + 0.3 * gain
        self._costed += 1
        if self._costed >= 4 and self._gain < 1.0:
            self._back_off()

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def accept_greedy(picks: SequenceT[int], drafts: SequenceT[int]) -> list[int]:
    """Greedy verification: picks[i] is the main model's greedy token after the first i drafts (k + 1 of them).
    Drafts are accepted while they equal the pick; the first pick that differs (or the bonus pick after all k)
    ends the step - exactly the tokens plain greedy decoding emits."""
    if len(picks) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} picks, got {len(picks)}")
    out: list[int] = []
    for pick, d in zip(picks, drafts):
        out.append(pick)
        if pick != d:
            return out
    out.append(picks[-1])
    return out


def accept(probs: torch.Tensor, drafts: SequenceT[int], generator: Optional[torch.Generator]) -> list[int]:
    """Tokens to emit after verifying `drafts` (k ids) against the main model's distributions `probs` [k+1, V]
    (row i: after the i first drafts; see sampler.target_distribution). generator None: greedy rows (point
    masses), compared without drawing. Deterministic drafts (q a point mass) are assumed.

    Returns the accepted drafts followed by one more token (the correction, or the bonus token after all k
    were accepted): 1 to k+1 tokens. Exactly one uniform is drawn per examined draft and one per
    correction/bonus draw, from the request's own generator."""
    k = len(drafts)
    if probs.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} rows of probabilities, got {probs.shape[0]}")
    if generator is None:
        return accept_greedy(greedy(probs).tolist(), drafts)
    out: list[int] = []
    for i, d in enumerate(drafts):
        row = probs[i]
        p = float(row[d])
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if u < p:  # min(1, p/q) with q(d) = 1
            out.append(d)
            continue
        residual = row.clone()
        residual[d] = 0.0  # max(0, p - q): q is 1 on d, 0 elsewhere
        out.append(_draw(residual, generator))
        return out
    out.append(_draw(probs[k], generator))
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token from unnormalized non-negative weights [V] by inverse CDF in float64."""
    cdf = weights.to(torch.float64).cumsum(0)
    total = float(cdf[-1])
    if total <= 0.0:  # p was a point mass on the rejected draft: cannot happen for a rejected u < p test
        return int(weights.argmax())
    u = torch.rand((), generator=generator, dtype=torch.float64).item() * total
    return min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)), weights.shape[0] - 1)
