"""The decoder-only transformer that every architecture file assembles.

An architecture file (llama.py, gemma3.py) builds the blocks from GGUF tensors; this module owns the pass
over them: embed, run blocks, final norm, project the needed positions to logits.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch

from ember.kernels.embedding import Embedding
from ember.kernels.linear import Linear
from ember.model.config import ModelConfig
from ember.model.kv_cache import KVCache
from ember.model.layers import RMSNorm


class Block(Protocol):
    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor: ...


class Transformer:
    def __init__(
        self,
        config: ModelConfig,
        embedding: Embedding,
        blocks: list[Block],
        norm: RMSNorm,
        output: Linear,
    ):
        self.config = config
        self.embedding = embedding
        self.blocks = blocks
        self.norm = norm
        self.output = output
        self.weights_source = "repacked"  # or "pack cache": how the loader got the Linears (set by it)

    def new_cache(self, n_ctx: int, dtype: torch.dtype = torch.float16) -> KVCache:
        c = self.config
        windows = [c.sliding_window if c.is_swa(i) else 0 for i in range(c.n_layer)]
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, c.value_dim, n_ctx, windows, dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens/positions [T] -> float32 logits [T, vocab] if all_logits else [1, vocab] (last position).

        logit_rows [R] (long) overrides both: logits [R, vocab] of those rows, e.g. the last token of each
        sequence of a batch that samples this step. `cache` may be any object with KVCache's attend()."""
        x = self.embedding(tokens)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        for block in self.blocks:
            x = block(x, positions, cache)
        if logit_rows is not None:
            x = x[logit_rows]
        elif not all_logits:
            x = x[-1:]  # only the last position feeds sampling: skip the vocab projection of the rest
        return self.output(self.norm(x))


ArchBuilder = Callable[..., Transformer]


def linear_layers(model: Transformer) -> list[Linear]:
    """Every distinct Linear reachable from the model (blocks, attention, FFN, output), each once."""
    found: dict[int, Linear] = {}
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, Linear):
            found[id(obj)] = obj
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, np.ndarray, type)):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(model.blocks, 0)
    walk(model.output, 0)
    return list(found.values())


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: all Linear weights plus one embedding row (the embedding
    table itself stays in the file and only the looked-up row is touched)."""
    linear = sum(layer.nbytes for layer in linear_layers(model))
    rows = getattr(model.embedding, "rows", None)
    row_bytes = int(rows.shape[1] * rows.itemsize) if rows is not None and rows.ndim == 2 else 0
    return linear + row_bytes
