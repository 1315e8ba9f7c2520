"""Llama-family architecture (llama, mistral, qwen2): pre-norm blocks, GQA attention with rope, SwiGLU.

Qwen2-style files add biases to the q/k/v projections; they are picked up when present.
"""
from __future__ import annotations

import torch

from ember.model.config import ModelConfig
from ember.model.kv_cache import KVCache
from ember.model.layers import Attention, FeedForward, RMSNorm, Rope
from ember.model.transformer import Transformer
from ember.model.weights import Weights, build_ffn, build_norm, build_qkv, build_transformer


class LlamaBlock:
    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: FeedForward):
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x, h = self.ffn_norm.residual(x, self.attn(self.attn_norm(x), positions, cache))
        return x + self.ffn(h)


def build(config: ModelConfig, w: Weights, n_ctx: int) -> Transformer:
    c = config
    freq_factors = w.optional_vector("rope_freqs.weight", c.rope.dim // 2)
    rope = Rope(c.rope, n_ctx, freq_factors)
    q_out = c.n_head * c.head_dim
    blocks = []
    for i in range(c.n_layer):
        p = f"blk.{i}."
        attn = Attention(
            layer=i,
            wqkv=build_qkv(w, p, c, biases=True),
            wo=w.linear(p + "attn_output.weight", q_out, c.n_embd, bias=p + "attn_output.bias"),
            n_head=c.n_head,
            n_head_kv=c.n_head_kv,
            head_dim=c.head_dim,
            value_dim=c.value_dim,
            rope=rope,
            scale=c.q_scale,
            window=c.sliding_window if c.is_swa(i) else 0,
        )
        ffn = build_ffn(w, p, c)
        blocks.append(
            LlamaBlock(
                build_norm(w, p + "attn_norm.weight", c.n_embd, c.rms_eps),
                attn,
                build_norm(w, p + "ffn_norm.weight", c.n_embd, c.rms_eps),
                ffn,
            )
        )
    return build_transformer(w, c, blocks)
