"""Sampling: the last position's logits -> the next token id.

The chain and its semantics follow llama.cpp's default sampler (common/sampling.cpp, common_sampler_init:
logit_bias first, then the `samplers` list whose default order common/common.h defines, then `dist`; each
stage's code is in src/llama-sampling.cpp). DRY, top-n-sigma and XTC are in that list too but disabled by
default there, and are not implemented here.

| # | stage       | llama.cpp function            | what it does                                 | off when           |
|---|-------------|-------------------------------|----------------------------------------------|--------------------|
| 1 | logit bias  | llama_sampler_logit_bias      | logit[t] += bias[t]                          | no bias            |
| 2 | penalties   | llama_sampler_penalties_apply | t seen c > 0 times in the last repeat_last_n | repeat_last_n == 0 |
|   |             |                               | ids: logit*r if logit <= 0 else logit/r,     |                    |
|   |             |                               | then -= c*frequency + presence (OpenAI)      |                    |
| 3 | top_k       | llama_sampler_top_k_impl      | keep the k largest logits                    | top_k <= 0         |
| 4 | typical_p   | llama_sampler_typical_apply   | order by |-log p - H|, keep up to and        | typical_p >= 1     |
|   |             |                               | with the 1st whose cumulative p > typical_p  |                    |
| 5 | top_p       | llama_sampler_top_p_apply     | by p descending, keep up to and with the 1st | top_p >= 1         |
|   |             |                               | whose cumulative p >= top_p                  |                    |
| 6 | min_p       | llama_sampler_min_p_apply     | keep logit >= max + log(min_p),              | min_p <= 0         |
|   |             |                               | i.e. p >= min_p * p_max                      |                    |
| 7 | temperature | llama_sampler_temp_ext_apply  | logit /= T; T == 0: argmax after 1-2         |                    |
| 8 | draw        | llama_sampler_dist_apply      | one sample from softmax of what is left      |                    |

Probabilities in stages 4-5 are the softmax over the survivors of the stages before.
Note the order: the filters see the distribution *before* temperature, so temperature only reshapes what
survives them (unlike transformers, which applies temperature first).

Everything works on a batch: logits [B, V] float32 with one row of parameters per sequence (`BatchParams`),
so a serving engine samples all its sequences in one call. `Sampler` is the single-sequence convenience on
top. The hot path never sorts the vocabulary when every row has top_k > 0 (the default 40): top_k takes
the k best first and the other filters run on those k survivors, exactly as in llama.cpp's chain.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from ember.errors import InvalidParameterError

__all__ = [
    "BatchParams",
    "Sampler",
    "SamplingParams",
    "apply_logit_bias",
    "penalized",
    "greedy_picks",
    "apply_repetition_penalties",
    "apply_temperature",
    "filter_min_p",
    "filter_top_p",
    "filter_typical",
    "greedy",
    "penalty_windows",
    "sample_batch",
    "sample_from_probs",
    "target_distribution",
    "top_k_candidates",
    "top_logprobs",
]

_NEG_INF = float("-inf")
# Below this many pairwise comparisons (B * W * W) penalties count repeats among the window ids themselves;
# above it (e.g. repeat_last_n = -1 over a long context) a dense [B, V] count is cheaper.
_PAIRWISE_LIMIT = 1 << 22


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, Ollama's defaults. Validated on construction."""

    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # <= 0: disabled
    top_p: float = 0.9  # 1.0: disabled
    min_p: float = 0.0  # 0.0: disabled
    typical_p: float = 1.0  # 1.0: disabled
    repeat_penalty: float = 1.1  # 1.0: disabled
    repeat_last_n: int = 64  # window of history ids the penalties look at; 0: disabled, -1: all history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit; -inf bans the token
    seed: int | None = None  # None: a random seed (Sampler.seed tells which)

    def __post_init__(self) -> None:
        def fail(name: str, requirement: str) -> None:
            raise InvalidParameterError(f"{name} must be {requirement}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                fail(name, "a finite number")
        for name in ("top_k", "repeat_last_n"):
            if not _is_int(getattr(self, name)):
                fail(name, "an integer")
        if self.temperature < 0:
            fail("temperature", ">= 0")
        for name in ("top_p", "min_p", "typical_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "between 0 and 1")
        if self.repeat_penalty <= 0:
            fail("repeat_penalty", "> 0")
        if self.repeat_last_n < -1:
            fail("repeat_last_n", ">= -1 (-1: whole history, 0: disabled)")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            fail("seed", "an integer in [0, 2**64) or None")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                fail("logit_bias", "a mapping of token id to bias")
            bias: dict[int, float] = {}
            for token, value in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise InvalidParameterError(f"logit_bias keys must be token ids >= 0, got {token!r}")
                if not _is_real(value) or math.isnan(value) or value == math.inf:
                    raise InvalidParameterError(
                        f"logit_bias[{token}] must be a finite number or -inf, got {value!r}")
                bias[token] = float(value)
            # A private read-only copy: the caller's dict may change, these params must not.
            object.__setattr__(self, "logit_bias", MappingProxyType(bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


@dataclass(frozen=True, eq=False)  # tensors do not compare to a bool
class BatchParams:
    """One row of sampling parameters per sequence, as [B] tensors, plus host-side flags so the hot path
    decides which stages to run without reading tensors back from the device."""

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    typical_p: torch.Tensor  # [B] float32
    repeat_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    bias_ids: torch.Tensor  # [B, M] int64, padded with 0
    bias_values: torch.Tensor  # [B, M] float32, padded with 0.0 (adding 0 is harmless)
    greedy_rows: torch.Tensor  # [B] bool
    open_rows: torch.Tensor  # [B] bool: sampling rows without top_k
    repeat_last_n: tuple[int, ...] = field(default=())
    all_greedy: bool = False
    any_greedy: bool = False
    k_max: int | None = None  # largest top_k when every row has one; None when some row has none
    k_bound: int = 0  # largest top_k of the rows that have one
    nucleus_only: bool = False  # every row without top_k has top_p < 1 (and no typical_p): see sample_batch
    any_top_k: bool = False
    any_typical: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    any_penalty: bool = False
    any_bias: bool = False

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], vocab_size: int,
                    device: torch.device | str | None = None) -> BatchParams:
        if not params:
            raise InvalidParameterError("a batch needs at least one row of sampling parameters")
        for p in params:
            for token in p.logit_bias or {}:
                if token >= vocab_size:
                    raise InvalidParameterError(
                        f"logit_bias token {token} is outside the vocabulary ({vocab_size} tokens)")

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        width = max((len(p.logit_bias or {}) for p in params), default=0)
        bias_ids = torch.zeros((len(params), width), dtype=torch.long)
        bias_values = torch.zeros((len(params), width), dtype=torch.float32)
        for row, p in enumerate(params):
            items = sorted((p.logit_bias or {}).items())
            if items:
                bias_ids[row, : len(items)] = torch.tensor([t for t, _ in items], dtype=torch.long)
                bias_values[row, : len(items)] = torch.tensor([v for _, v in items], dtype=torch.float32)
        sampling = [p for p in params if not p.greedy]  # filters only matter for rows that sample
        return cls(
            temperature=column("temperature", torch.float32),
            # <= 0 and >= V both mean "no limit"; clamping keeps any Python int inside int64.
            top_k=torch.tensor([min(max(p.top_k, 0), vocab_size) for p in params], dtype=torch.long, device=device),
            top_p=column("top_p", torch.float32),
            min_p=column("min_p", torch.float32),
            typical_p=column("typical_p", torch.float32),
            repeat_penalty=column("repeat_penalty", torch.float32),
            presence_penalty=column("presence_penalty", torch.float32),
            frequency_penalty=column("frequency_penalty", torch.float32),
            bias_ids=bias_ids.to(device),
            bias_values=bias_values.to(device),
            greedy_rows=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            open_rows=torch.tensor([not p.greedy and p.top_k <= 0 for p in params], dtype=torch.bool,
                                   device=device),
            repeat_last_n=tuple(p.repeat_last_n for p in params),
            all_greedy=not sampling,
            any_greedy=len(sampling) < len(params),
            k_max=(min(max(p.top_k for p in sampling), vocab_size)
                   if sampling and all(p.top_k > 0 for p in sampling) else None),
            k_bound=min(max((p.top_k for p in sampling), default=0), vocab_size),
            nucleus_only=bool(sampling) and all(p.top_k > 0 or (p.top_p < 1.0 and p.typical_p >= 1.0)
                                                for p in sampling),
            any_top_k=any(p.top_k > 0 for p in sampling),
            any_typical=any(p.typical_p < 1.0 for p in sampling),
            any_top_p=any(p.top_p < 1.0 for p in sampling),
            any_min_p=any(p.min_p > 0.0 for p in sampling),
            any_penalty=any(p.penalizes for p in params),
            any_bias=width > 0,
        )


# ------------------------------------------------------------------------------------------------------------
# Composable stages. Each takes and returns [B, N] float32 logits (N = V, or K candidates) and never modifies
# its input; per-row parameters are [B] tensors.
# ------------------------------------------------------------------------------------------------------------
def apply_logit_bias(logits: torch.Tensor, bias_ids: torch.Tensor, bias_values: torch.Tensor) -> torch.Tensor:
    """logits[b, bias_ids[b, j]] += bias_values[b, j]. Ids within a row are distinct (they come from a dict)."""
    if bias_ids.numel() == 0:
        return logits
    return logits.scatter_add(1, bias_ids, bias_values.to(logits.dtype))


def penalty_windows(histories: Sequence[Sequence[int]], repeat_last_n: Sequence[int],
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The ids each row's penalties look at: the last repeat_last_n of its history (-1: all, 0: none), as a
    [B, W] int64 tensor padded with -1."""
    rows: list[Sequence[int]] = []
    for history, n in zip(histories, repeat_last_n):
        rows.append(history[-n:] if n > 0 else (history if n < 0 else ()))
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out.to(device)


def apply_repetition_penalties(logits: torch.Tensor, window_ids: torch.Tensor, repeat_penalty: torch.Tensor,
                               presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor) -> torch.Tensor:
    """llama.cpp's penalties for the ids in each row's window ([B, W], -1 = padding); see the module table.

    A row whose parameters are neutral (1, 0, 0) comes back unchanged bit for bit."""
    B, W = window_ids.shape
    if W == 0:
        return logits
    valid = window_ids >= 0
    ids = torch.where(valid, window_ids, torch.zeros_like(window_ids))
    rp = repeat_penalty[:, None].to(logits.dtype)
    presence = presence_penalty[:, None].to(logits.dtype)
    frequency = frequency_penalty[:, None].to(logits.dtype)

    def penalize(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        scaled = torch.where(values <= 0, values * rp, values / rp)
        penalized = scaled - counts * frequency - (counts > 0).to(values.dtype) * presence
        return torch.where(counts > 0, penalized, values)

    if B * W * W <= _PAIRWISE_LIMIT:
        # Count each window id's occurrences among the valid ids of its row. Padding was mapped to id 0, so a
        # padded slot computes exactly what a real occurrence of token 0 computes (or leaves it unchanged when
        # token 0 is absent): the duplicate writes of scatter below all carry the same value.
        counts = ((ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]).sum(-1).to(logits.dtype)
        return logits.scatter(1, ids, penalize(logits.gather(1, ids), counts))
    counts = torch.zeros_like(logits).scatter_add_(1, ids, valid.to(logits.dtype))
    return penalize(logits, counts)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's largest logit (the first, on ties). max(dim) returns the same index as argmax
    but is ~4x faster on CPU (argmax: 5 ms for 16 rows of gemma3's 262144 logits, max: 1.2 ms)."""
    return logits.max(dim=-1).indices


def top_k_candidates(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_max largest logits of each row, sorted descending, with their token ids ([B, k_max] each).
    Positions at or past a row's own top_k are set to -inf; top_k <= 0 means no limit for that row.
    k_max == V is a full sort, which only rows without top_k (or a mixed batch) need."""
    V = logits.shape[-1]
    k_max = max(1, min(k_max, V))
    if k_max == V:
        values, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        values, ids = torch.topk(logits, k_max, dim=-1, largest=True, sorted=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    beyond = torch.arange(k_max, device=logits.device)[None, :] >= k[:, None]
    return values.masked_fill(beyond, _NEG_INF), ids


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    # Mass strictly before each position: what llama.cpp's running sum holds when it reaches that token.
    return torch.cat([torch.zeros_like(x[..., :1]), x.cumsum(-1)[..., :-1]], dim=-1)


def filter_typical(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling over each row's finite logits (any order). Rows with typical_p >= 1 pass.

    Keeps the tokens closest to the distribution's entropy, up to and including the first whose cumulative
    probability exceeds typical_p. (llama.cpp's loop never stops when min_keep is 0, its default, because
    `min_keep - 1` wraps around as size_t; we implement the intended behaviour, that of min_keep = 1.)"""
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num(nan=0.0).sum(-1, keepdim=True)  # 0 * -inf -> 0 for removed tokens
    order = (-logp - entropy).abs().argsort(dim=-1, stable=True)  # removed tokens (inf) sort last
    mass_before = _exclusive_cumsum(probs.gather(-1, order))
    keep_sorted = mass_before <= typical_p[:, None]
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep |= (typical_p >= 1.0)[:, None]
    return logits.masked_fill(~keep, _NEG_INF)


def filter_top_p(sorted_logits: torch.Tensor, top_p: torch.Tensor,
                 log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Nucleus filter. Each row must be sorted descending (removed tokens, -inf, may sit anywhere).
    Keeps tokens up to and including the first whose cumulative probability reaches top_p.

    Probabilities are the softmax of the row, or exp(logit - log_norm) when the row is only the head of a
    larger distribution whose log-normalizer ([B, 1]) is given."""
    if log_norm is None:
        probs = torch.softmax(sorted_logits, dim=-1)
    else:
        probs = torch.exp(sorted_logits - log_norm)
    keep = _exclusive_cumsum(probs) < top_p[:, None]
    keep[..., 0] = True
    keep |= (top_p >= 1.0)[:, None]
    return sorted_logits.masked_fill(~keep, _NEG_INF)


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max, compared on logits as llama.cpp does. min_p == 0 keeps all."""
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p.to(logits.dtype))[:, None]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row. Rows with T == 0 (greedy) are returned unchanged: take `greedy` for them."""
    t = temperature.to(logits.dtype)
    return logits / torch.where(t > 0, t, torch.ones_like(t))[:, None]


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One draw per row by inverse CDF, each row with its own CPU generator (None: no draw, the row gets the
    first position with p > 0; greedy rows use this). Exactly one float64 uniform is consumed per drawing row
    per call, so a request's stream of draws depends neither on what else is in the batch nor on the device.
    """
    if len(generators) != probs.shape[0]:
        raise InvalidParameterError(f"{probs.shape[0]} rows need {probs.shape[0]} generators, got {len(generators)}")
    u = torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() if g is not None else 0.0
                      for g in generators], dtype=torch.float64)
    exact = probs.device.type != "mps"  # MPS has no float64
    cdf = probs.to(torch.float64 if exact else torch.float32).cumsum(dim=-1)
    total = cdf[:, -1:]
    # Target in [0, total): the first position whose cdf exceeds it has p > 0, so removed tokens are never hit.
    target = torch.minimum(u.to(cdf.device, cdf.dtype)[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


_NUCLEUS_HEAD = 256  # first guess at how many tokens hold a nucleus; llama.cpp's top_p tries 256 first too


def _nucleus_head(logits: torch.Tensor, params: BatchParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates for a batch where some rows have no top_k but all of those have top_p < 1: the smallest
    head (256, 2048, ... tokens) that holds every such row's whole nucleus, instead of sorting the vocabulary.
    Returns candidates, their ids, and each row's log-normalizer for top_p: the whole vocabulary's for rows
    without top_k (their head is truncated), the head's own for rows with top_k (it holds all k survivors)."""
    V = logits.shape[-1]
    open_rows = params.open_rows[:, None]
    lse_all = torch.logsumexp(logits, dim=-1, keepdim=True)
    k = max(_NUCLEUS_HEAD, params.k_bound)
    while True:
        candidates, ids = top_k_candidates(logits, params.top_k, min(k, V))
        head_mass = torch.exp(torch.logsumexp(candidates, dim=-1, keepdim=True) - lse_all)
        if k >= V or bool(((head_mass >= params.top_p[:, None]) | ~open_rows).all()):
            break
        k *= 8
    log_norm = torch.where(open_rows, lse_all, torch.logsumexp(candidates, dim=-1, keepdim=True))
    return candidates, ids, log_norm


def _survivors(logits: torch.Tensor, params: BatchParams, window_ids: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Stages 1-7 for B rows: (probabilities over the survivors [B, N] in vocabulary order, their ids [B, N] or
    None when N is the whole vocabulary, argmax [B] of the penalized logits or None when no row is greedy).
    Greedy rows' probabilities are meaningless (they take the argmax); with params.all_greedy probs is None."""
    logits = penalized(logits, params, window_ids)
    argmax = greedy(logits) if params.any_greedy else None
    if params.all_greedy:
        return None, None, argmax  # type: ignore[return-value]

    V = logits.shape[-1]
    ids: torch.Tensor | None
    log_norm = None
    if params.k_max is not None:  # every sampling row has a top_k: only its k_max best matter
        candidates, ids = top_k_candidates(logits, params.top_k, params.k_max)
    elif params.nucleus_only:  # rows without top_k have top_p: their nucleus is usually a small head
        candidates, ids, log_norm = _nucleus_head(logits, params)
    elif params.any_top_k or params.any_top_p or params.any_typical:
        candidates, ids = top_k_candidates(logits, params.top_k, V)  # full sort
    else:  # no filter needs an order: sample over the whole vocabulary as it is
        candidates, ids = logits, None
    if params.any_typical:
        candidates = filter_typical(candidates, params.typical_p)
    if params.any_top_p:
        candidates = filter_top_p(candidates, params.top_p, log_norm)
    if params.any_min_p:
        candidates = filter_min_p(candidates, params.min_p)
    probs = torch.softmax(apply_temperature(candidates, params.temperature), dim=-1)
    if ids is not None:
        # Draw over the survivors in vocabulary order: which token a uniform picks then depends only on the
        # surviving distribution, not on which path (head, top-k, full sort) this batch's mix of rows took.
        if ids.shape[-1] == V:
            probs, ids = torch.zeros_like(probs).scatter_(1, ids, probs), None
        else:
            order = ids.argsort(dim=-1)
            probs, ids = probs.gather(1, order), ids.gather(1, order)
    return probs, ids, argmax


def sample_batch(logits: torch.Tensor, params: BatchParams, window_ids: torch.Tensor | None,
                 generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The whole chain for B rows: logits [B, V], window_ids [B, W] (see penalty_windows; None: no
    penalties), one generator per row (None allowed for greedy rows). Returns [B] int64 token ids."""
    probs, ids, argmax = _survivors(logits, params, window_ids)
    if probs is None:
        assert argmax is not None
        return argmax
    positions = sample_from_probs(probs, generators)
    tokens = positions if ids is None else ids.gather(1, positions[:, None]).squeeze(1)
    if argmax is not None:
        tokens = torch.where(params.greedy_rows, argmax, tokens)
    return tokens


def penalized(logits: torch.Tensor, params: BatchParams, window_ids: torch.Tensor | None) -> torch.Tensor:
    """Stages 1-2 of the chain: float32 logits after the logit bias and the repetition penalties (over
    window_ids; None: no penalties) - all that moves a greedy row's argmax."""
    x = logits.float()
    if params.any_bias:
        x = apply_logit_bias(x, params.bias_ids, params.bias_values)
    if params.any_penalty and window_ids is not None:
        x = apply_repetition_penalties(x, window_ids, params.repeat_penalty, params.presence_penalty,
                                       params.frequency_penalty)
    return x


def greedy_picks(logits: torch.Tensor, params: BatchParams, window_ids: torch.Tensor | None) -> torch.Tensor:
    """[B] the token greedy rows take: the argmax after logit bias and penalties, the same stages and the same
    pick as sample_batch (so a speculative verification of greedy rows needs no probabilities)."""
    return greedy(penalized(logits, params, window_ids))


def target_distribution(logits: torch.Tensor, params: BatchParams, window_ids: torch.Tensor | None) -> torch.Tensor:
    """The distribution the chain draws from, as dense [B, V] float32 probabilities: a point mass on the
    argmax for greedy rows. Speculative decoding's acceptance test compares draft tokens against it."""
    probs, ids, argmax = _survivors(logits, params, window_ids)
    B, V = logits.shape
    if probs is None:
        dense = torch.zeros((B, V), dtype=torch.float32)
    elif ids is None:
        dense = probs.float().clone()
    else:
        dense = torch.zeros((B, V), dtype=torch.float32).scatter_(1, ids, probs.float())
    if argmax is not None:
        rows = params.greedy_rows.nonzero().flatten()
        dense[rows] = 0.0
        dense[rows, argmax[rows]] = 1.0
    return dense


class Sampler:
    """Samples one sequence's tokens. Owns its generator, seeded from params.seed (or a random seed kept in
    `self.seed`), so a request reproduces whatever else runs in the process."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        if not _is_int(vocab_size) or vocab_size <= 0:
            raise InvalidParameterError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.params = params
        self.vocab_size = vocab_size
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(64)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._batch = BatchParams.from_params([params], vocab_size)
        self._device = torch.device("cpu")

    def sample(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: [V] of the last position; history: every token id so far (prompt + generated)."""
        if logits.dim() != 1 or logits.shape[0] != self.vocab_size:
            raise InvalidParameterError(
                f"expected logits of shape [{self.vocab_size}], got {list(logits.shape)}")
        if self._device != logits.device:  # move the parameter rows once, not per token
            self._batch = BatchParams.from_params([self.params], self.vocab_size, logits.device)
            self._device = logits.device
        window = None
        if self._batch.any_penalty:
            n = self.params.repeat_last_n
            ids = history[-n:] if n > 0 else history
            window = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
            if window.numel() and (int(window.min()) < 0 or int(window.max()) >= self.vocab_size):
                raise InvalidParameterError(f"history holds token ids outside [0, {self.vocab_size})")
            window = window.to(logits.device)
        generators = [None if self.params.greedy else self.generator]
        return int(sample_batch(logits[None, :], self._batch, window, generators)[0])


def top_logprobs(logits: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of a [V] logits row and their log-probabilities, most likely first."""
    if not _is_int(n) or n < 0:
        raise InvalidParameterError(f"the number of top logprobs must be a non-negative integer, got {n!r}")
    if logits.dim() != 1:
        raise InvalidParameterError(f"expected logits of shape [V], got {list(logits.shape)}")
    n = min(n, logits.shape[0])
    if n == 0:
        return []
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), n)
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
