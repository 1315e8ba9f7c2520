"""Gemma 3: sandwich norms (pre and post attention / feed-forward), q/k RMS norms, GELU-tanh gated FFN,
embeddings scaled by sqrt(n_embd), tied output, and five sliding-window layers per global layer with their own
rope base (the window and rope choice per layer come from ModelConfig).

GGUF converters store Gemma's norm weights with the +1 already added, so plain RMSNorm applies.
"""
from __future__ import annotations

import torch

from ember.model.config import ModelConfig
from ember.model.kv_cache import KVCache
from ember.model.layers import Attention, FeedForward, RMSNorm, Rope
from ember.model.transformer import Transformer
from ember.model.weights import Weights, build_ffn, build_norm, build_qkv, build_transformer


class Gemma3Block:
    def __init__(
        self,
        attn_norm: RMSNorm,
        attn: Attention,
        post_attn_norm: RMSNorm,
        ffn_norm: RMSNorm,
        ffn: FeedForward,
        post_ffn_norm: RMSNorm,
    ):
        self.attn_norm, self.attn, self.post_attn_norm = attn_norm, attn, post_attn_norm
        self.ffn_norm, self.ffn, self.post_ffn_norm = ffn_norm, ffn, post_ffn_norm

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x, h = self.ffn_norm.residual(x, self.post_attn_norm(self.attn(self.attn_norm(x), positions, cache)))
        return x + self.post_ffn_norm(self.ffn(h))


def build(config: ModelConfig, w: Weights, n_ctx: int) -> Transformer:
    c = config
    ropes = {id(r): Rope(r, n_ctx) for r in {c.rope, c.rope_local} if r is not None}
    q_out = c.n_head * c.head_dim
    blocks = []
    for i in range(c.n_layer):
        p = f"blk.{i}."
        attn = Attention(
            layer=i,
            wqkv=build_qkv(w, p, c, biases=False),
            wo=w.linear(p + "attn_output.weight", q_out, c.n_embd),
            n_head=c.n_head,
            n_head_kv=c.n_head_kv,
            head_dim=c.head_dim,
            value_dim=c.value_dim,
            rope=ropes[id(c.rope_for(i))],
            scale=c.q_scale,
            window=c.sliding_window if c.is_swa(i) else 0,
            q_norm=build_norm(w, p + "attn_q_norm.weight", c.head_dim, c.rms_eps),
            k_norm=build_norm(w, p + "attn_k_norm.weight", c.head_dim, c.rms_eps),
        )
        ffn = build_ffn(w, p, c)
        blocks.append(
            Gemma3Block(
                build_norm(w, p + "attn_norm.weight", c.n_embd, c.rms_eps),
                attn,
                build_norm(w, p + "post_attention_norm.weight", c.n_embd, c.rms_eps),
                build_norm(w, p + "ffn_norm.weight", c.n_embd, c.rms_eps),
                ffn,
                build_norm(w, p + "post_ffw_norm.weight", c.n_embd, c.rms_eps),
            )
        )
    return build_transformer(w, c, blocks)
