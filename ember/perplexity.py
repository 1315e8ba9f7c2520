"""Perplexity as llama.cpp's llama-perplexity computes it, so the two numbers are comparable.

Method (llama.cpp tools/perplexity): tokenize the whole text once (BOS added as the model's metadata says),
cut it into non-overlapping chunks of n_ctx tokens (a trailing partial chunk is dropped), put BOS in place
of each chunk's first token when the model adds BOS, evaluate each chunk from an empty context, and score
only the second half of each chunk: the negative log-likelihood of token j+1 given logits at j for
j in [n_ctx/2, n_ctx - 1). Scoring the second half gives every scored token at least n_ctx/2 of context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ember.errors import InvalidParameterError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    chunks: int
    tokens: int


def perplexity(model, text: str, n_ctx: int = 512) -> PerplexityResult:
    """`model` is an ember.api.Model."""
    if n_ctx < 4:
        raise InvalidParameterError(f"perplexity context {n_ctx} is too small")
    tokens = model.tokenize(text, add_special=True)
    n_chunks = len(tokens) // n_ctx
    if n_chunks == 0:
        raise InvalidParameterError(f"text has {len(tokens)} tokens; at least {n_ctx} are needed")
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    first = n_ctx // 2
    total, count = 0.0, 0
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        batch = ([bos] + chunk[1:]) if bos is not None else chunk
        logits = torch.from_numpy(model.logits(batch, rows=range(first, n_ctx - 1))).double()
        targets = torch.tensor(chunk[first + 1 : n_ctx])
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])
        total -= float(logp.sum())
        count += len(targets)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, n_chunks, len(tokens))
