"""Llama-family architecture (llama, mistral, qwen2): pre-norm blocks, GQA attention with rope, SwiGLU.

Qwen2-style files add biases to the q/k/v projections; they are picked up when present.
"""
from __future__ import annotations

import torch

from ember.model.config import ModelConfig
from ember.model.kv_cache import KVCache
from ember.model.layers import Attention, FeedForward, RMSNorm, Rope
from ember.model.transformer import Transformer
from ember.model.weights import Weights


class LlamaBlock:
    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: FeedForward):
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.ffn(self.ffn_norm(x))


def build(config: ModelConfig, w: Weights, n_ctx: int) -> Transformer:
    c = config
    freq_factors = w.optional_vector("rope_freqs.weight", c.rope.dim // 2)
    rope = Rope(c.rope, n_ctx, freq_factors)
    q_out, kv_out, v_out = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.value_dim
    blocks = []
    for i in range(c.n_layer):
        p = f"blk.{i}."
        attn = Attention(
            layer=i,
            wqkv=w.fused([
                (p + "attn_q.weight", c.n_embd, q_out, p + "attn_q.bias"),
                (p + "attn_k.weight", c.n_embd, kv_out, p + "attn_k.bias"),
                (p + "attn_v.weight", c.n_embd, v_out, p + "attn_v.bias"),
            ]),
            wo=w.linear(p + "attn_output.weight", q_out, c.n_embd, bias=p + "attn_output.bias"),
            n_head=c.n_head,
            n_head_kv=c.n_head_kv,
            head_dim=c.head_dim,
            value_dim=c.value_dim,
            rope=rope,
            scale=c.q_scale,
            window=c.sliding_window if c.is_swa(i) else 0,
        )
        ffn = FeedForward(
            w.fused([(p + "ffn_gate.weight", c.n_embd, c.n_ff, None), (p + "ffn_up.weight", c.n_embd, c.n_ff, None)]),
            w.linear(p + "ffn_down.weight", c.n_ff, c.n_embd),
            c.activation,
        )
        blocks.append(
            LlamaBlock(
                RMSNorm(w.vector(p + "attn_norm.weight", c.n_embd), c.rms_eps),
                attn,
                RMSNorm(w.vector(p + "ffn_norm.weight", c.n_embd), c.rms_eps),
                ffn,
            )
        )
    embedding = w.embedding("token_embd.weight", c.n_embd, c.n_vocab)
    out_name = "output.weight" if w.has("output.weight") else "token_embd.weight"  # tied when absent
    return Transformer(
        c,
        embedding,
        blocks,
        RMSNorm(w.vector("output_norm.weight", c.n_embd), c.rms_eps),
        w.linear(out_name, c.n_embd, c.n_vocab),
    )
