"""Key/value cache of one sequence, stored contiguously per layer, and the attention that reads it.

Layout: per layer K [n_head_kv, n_ctx, head_dim] and V [n_head_kv, n_ctx, value_dim]. Sliding-window
layers keep only `window` slots used as a ring (slot = position % window), so a gemma3 local layer costs
512 positions whatever the context length. Invariant: positions are written in increasing order with no gaps,
and a query at position p sees exactly the keys at positions <= p (and > p - window on windowed layers).

Storage is float16 by default as in llama.cpp; attention math runs in float32. A single-token step over a
non-ring layer runs the native decode kernel (ember/kernels/csrc/paged_attention.cpp) when it is available,
as the engine's paged cache does, so both caches give bit-identical decode results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.errors import ContextOverflowError
from ember.kernels import native


class KVCache:
    def __init__(
        self,
        n_layer: int,
        n_head_kv: int,
        head_dim: int,
        value_dim: int,
        n_ctx: int,
        windows: list[int] | None = None,
        dtype: torch.dtype = torch.float16,
    ):
        self.n_ctx = n_ctx
        self.windows = windows or [0] * n_layer
        self.dtype = dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for w in self.windows:
            # A windowed layer needs its window of past keys plus room for the chunk being written; the
            # ring holds window + max chunk so keys of the current chunk never overwrite ones it still needs.
            slots = n_ctx if not w or w >= n_ctx else w
            self.k.append(torch.zeros(n_head_kv, slots, head_dim, dtype=dtype))
            self.v.append(torch.zeros(n_head_kv, slots, value_dim, dtype=dtype))
        self.length = 0  # positions [0, length) are filled
        ext = native.extension()
        usable = ext is not None and dtype in (torch.float16, torch.bfloat16) and ext.paged_attention_supports(
            head_dim, value_dim)
        self._native = ext if usable else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self, length: int = 0) -> None:
        """Forget everything at positions >= length (kept entries stay valid)."""
        self.length = min(self.length, length)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        """Store k/v [T, Hkv, d] at `positions` and return attention output [T, H, value_dim] (float32)."""
        t = q.shape[0]
        start = int(positions[0])
        end = start + t
        if end > self.n_ctx:
            raise ContextOverflowError(f"context window of {self.n_ctx} tokens is full")
        kc, vc = self.k[layer], self.v[layer]
        slots = kc.shape[1]
        ring = slots < self.n_ctx
        if not ring:
            kc[:, start:end] = k.transpose(0, 1).to(self.dtype)
            vc[:, start:end] = v.transpose(0, 1).to(self.dtype)
            keys, values = kc[:, :end].float(), vc[:, :end].float()
            key_pos = torch.arange(end)
        else:
            # Ring buffer: gather the previous window's keys before the chunk overwrites any slot, then
            # attend over [old window keys, chunk keys].
            lo = max(0, start - window + 1)
            old_pos = torch.arange(lo, start)
            old_slots = old_pos % slots
            # the chunk's own keys are rounded to the storage dtype first, as every later reader sees them
            keys = torch.cat((kc[:, old_slots].float(), k.transpose(0, 1).to(self.dtype).float()), dim=1)
            values = torch.cat((vc[:, old_slots].float(), v.transpose(0, 1).to(self.dtype).float()), dim=1)
            key_pos = torch.cat((old_pos, positions))
            keep = positions[-slots:] if t > slots else positions
            kc[:, keep % slots] = k[-keep.shape[0] :].transpose(0, 1).to(self.dtype)
            vc[:, keep % slots] = v[-keep.shape[0] :].transpose(0, 1).to(self.dtype)
        self.length = max(self.length, end)

        if t < native.row_chunk() and not ring and self._native is not None:
            # Decode steps and short chunks: the engine's decode kernel, one row per token, over this buffer as
            # one block - bit-identical to the paged cache's rows for the same keys (a row's result depends on
            # its query and key values only, not on where they live or what else is in the call).
            return self._native.paged_attention(
                q.float().contiguous(), kc.transpose(0, 1), vc.transpose(0, 1),
                torch.zeros(t, 1, dtype=torch.long),  # every row's table: the whole buffer is block 0
                torch.arange(start + 1, end + 1), self.n_ctx, window, scale)
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, d]
        mask = key_pos[None, :] <= positions[:, None]
        if window:
            mask &= key_pos[None, :] > positions[:, None] - window
        if t == 1 and bool(mask.all()):
            mask = None  # decode step with every key visible: skip building a mask
        out = F.scaled_dot_product_attention(
            qh, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out[0].transpose(0, 1)  # [T, H, value_dim]
