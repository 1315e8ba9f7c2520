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
from ember.model.weights import Weights


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
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), positions, cache))
        return x + self.post_ffn_norm(self.ffn(self.ffn_norm(x)))


def build(config: ModelConfig, w: Weights, n_ctx: int) -> Transformer:
    c = config
    ropes = {id(r): Rope(r, n_ctx) for r in {c.rope, c.rope_local} if r is not None}
    q_out, kv_out, v_out = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.value_dim
    blocks = []
    for i in range(c.n_layer):
        p = f"blk.{i}."
        attn = Attention(
            layer=i,
            wqkv=w.fused([
                (p + "attn_q.weight", c.n_embd, q_out, None),
                (p + "attn_k.weight", c.n_embd, kv_out, None),
                (p + "attn_v.weight", c.n_embd, v_out, None),
            ]),
            wo=w.linear(p + "attn_output.weight", q_out, c.n_embd),
            n_head=c.n_head,
            n_head_kv=c.n_head_kv,
            head_dim=c.head_dim,
            value_dim=c.value_dim,
            rope=ropes[id(c.rope_for(i))],
            scale=c.q_scale,
            window=c.sliding_window if c.is_swa(i) else 0,
            q_norm=RMSNorm(w.vector(p + "attn_q_norm.weight", c.head_dim), c.rms_eps),
            k_norm=RMSNorm(w.vector(p + "attn_k_norm.weight", c.head_dim), c.rms_eps),
        )
        ffn = FeedForward(
            w.fused([(p + "ffn_gate.weight", c.n_embd, c.n_ff, None), (p + "ffn_up.weight", c.n_embd, c.n_ff, None)]),
            w.linear(p + "ffn_down.weight", c.n_ff, c.n_embd),
            c.activation,
        )
        blocks.append(
            Gemma3Block(
                RMSNorm(w.vector(p + "attn_norm.weight", c.n_embd), c.rms_eps),
                attn,
                RMSNorm(w.vector(p + "post_attention_norm.weight", c.n_embd), c.rms_eps),
                RMSNorm(w.vector(p + "ffn_norm.weight", c.n_embd), c.rms_eps),
                ffn,
                RMSNorm(w.vector(p + "post_ffw_norm.weight", c.n_embd), c.rms_eps),
            )
        )
    embedding = w.embedding("token_embd.weight", c.n_embd, c.n_vocab)
    out_name = "output.weight" if w.has("output.weight") else "token_embd.weight"
    return Transformer(
        c,
        embedding,
        blocks,
        RMSNorm(w.vector("output_norm.weight", c.n_embd), c.rms_eps),
        w.linear(out_name, c.n_embd, c.n_vocab),
    )
