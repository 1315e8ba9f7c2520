"""Fill-in-the-middle (`suffix` in /api/generate and /v1/completions) for models that declare FIM tokens.

The prompt is llama.cpp's infill layout, prefix-suffix-middle, from the GGUF's own FIM token ids
(tokenizer.ggml.fim_pre/suf/mid_token_id, the older prefix/suffix/middle_token_id keys, or the texts
ember.tokenizer.vocab recognises, such as <|fim_prefix|>):

    [BOS if the model adds one] FIM_PRE prefix-tokens FIM_SUF suffix-tokens FIM_MID

with prefix and suffix tokenized as plain text (no special tokens parsed, no BOS), and no chat template or
system prompt. Unlike llama.cpp's server, nothing is cut to fit a batch: a prompt longer than the context is an
error as everywhere else. A model without the three tokens answers 400 "model X does not support insert", as
Ollama does.
"""
from __future__ import annotations

from typing import Sequence

from ember.server.errors import APIError
from ember.server.models import LoadedModel


def infill_ids(lm: LoadedModel, name: str, prefix: str | Sequence[int], suffix: str) -> list[int]:
    """The FIM prompt for text (or token ids) `prefix` before the hole and text `suffix` after it."""
    tok = lm.model.tokenizer
    ids = tok.vocab.ids
    pre, suf, mid = ids.get("fim_pre"), ids.get("fim_suf"), ids.get("fim_mid")
    if pre is None or suf is None or mid is None:
        raise APIError(400, f"model '{name}' does not support insert", param="suffix")
    head = tok.encode(prefix, add_special=False) if isinstance(prefix, str) else list(prefix)
    tail = tok.encode(suffix, add_special=False)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    return bos + [pre] + head + [suf] + tail + [mid]


__all__ = ["infill_ids"]
