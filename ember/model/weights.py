"""Typed access to a GGUF file's tensors for the architecture builders.

Builders ask for tensors by GGUF name; this class checks presence and shape against the config, so a file
with a missing or misshapen tensor fails with the tensor's name instead of a broadcasting error later.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.errors import GGUFError, UnsupportedError
from ember.kernels.embedding import Embedding
from ember.kernels.linear import Linear, WeightParts, build_linear, weight_parts
from ember.model.config import ModelConfig
from ember.model.layers import FeedForward, RMSNorm
from ember.model.pack_cache import PackCache
from ember.model.transformer import Transformer
from ember.quant import FORMATS, dequantize


class Weights:
    def __init__(self, gguf_file, pack_cache: PackCache | None = None):
        self.file = gguf_file
        self.used: set[str] = set()
        self.pack_cache = pack_cache  # serves and records repacked Linears (ember.model.pack_cache)

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.file.tensors.get(name)
        if info is None:
            raise GGUFError(f"tensor {name!r} is missing")
        if tuple(info.shape) != tuple(shape):
            raise GGUFError(f"tensor {name!r} has shape {tuple(info.shape)}, expected {tuple(shape)}")
        if info.ggml_type not in FORMATS:
            raise UnsupportedError(f"tensor {name!r} has unsupported type {info.type_name}")
        self.used.add(name)
        return info

    def raw(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, T]:
        info = self._info(name, shape)
        return self.file.tensor_bytes(name), T(info.ggml_type)

    def vector(self, name: str, size: int) -> torch.Tensor:
        raw, qtype = self.raw(name, (size,))
        return dequantize(raw, qtype, (size,)).reshape(size).clone()

    def optional_vector(self, name: str, size: int) -> torch.Tensor | None:
        return self.vector(name, size) if self.has(name) else None

    def parts(self, name: str, n_in: int, n_out: int, bias: str | None = None) -> WeightParts:
        raw, qtype = self.raw(name, (n_in, n_out))
        b = self.optional_vector(bias, n_out) if bias else None
        return weight_parts(raw, qtype, (n_in, n_out), b)

    def linear(self, name: str, n_in: int, n_out: int, bias: str | None = None) -> Linear:
        return self.fused([(name, n_in, n_out, bias)])

    def fused(self, specs: list[tuple[str, int, int, str | None]]) -> Linear:
        """One Linear for several weights that read the same input: outputs concatenated in order."""
        cache = self.pack_cache
        if cache is None:
            return build_linear([self.parts(*spec) for spec in specs])
        # The checks of _info run either way, so a file with a missing or misshapen tensor still fails.
        present = [(name, n_in, n_out, b if b and self.has(b) else None) for name, n_in, n_out, b in specs]
        for name, n_in, n_out, b in present:
            self._info(name, (n_in, n_out))
            if b:
                self._info(b, (n_out,))
        key = "+".join(f"{name}:{b or ''}" for name, _, _, b in present)
        lin = cache.lookup(key, specs[0][1], sum(n_out for _, _, n_out, _ in specs))
        if lin is None:
            lin = build_linear([self.parts(*spec) for spec in specs])
            cache.add(key, lin)
        return lin

    def embedding(self, name: str, dim: int, n_vocab: int) -> Embedding:
        raw, qtype = self.raw(name, (dim, n_vocab))
        return Embedding(raw.reshape(n_vocab, -1), qtype, dim)


# Builders shared by the architecture files: the GGUF tensor names of the parts every family has alike.

def build_norm(w: Weights, name: str, size: int, eps: float) -> RMSNorm:
    return RMSNorm(w.vector(name, size), eps)


def build_ffn(w: Weights, prefix: str, config: ModelConfig) -> FeedForward:
    """Gated FFN of block `prefix` ("blk.N."), gate and up fused."""
    c = config
    gate_up = w.fused([(prefix + "ffn_gate.weight", c.n_embd, c.n_ff, None),
                       (prefix + "ffn_up.weight", c.n_embd, c.n_ff, None)])
    return FeedForward(gate_up, w.linear(prefix + "ffn_down.weight", c.n_ff, c.n_embd), c.activation)


def build_qkv(w: Weights, prefix: str, config: ModelConfig, biases: bool) -> Linear:
    c = config
    b = (lambda n: prefix + n) if biases else (lambda n: None)
    return w.fused([
        (prefix + "attn_q.weight", c.n_embd, c.n_head * c.head_dim, b("attn_q.bias")),
        (prefix + "attn_k.weight", c.n_embd, c.n_head_kv * c.head_dim, b("attn_k.bias")),
        (prefix + "attn_v.weight", c.n_embd, c.n_head_kv * c.value_dim, b("attn_v.bias")),
    ])


def build_transformer(w: Weights, config: ModelConfig, blocks: list) -> Transformer:
    """Embedding, final norm and output projection around `blocks` (output tied to the embedding when the
    file has no output.weight)."""
    c = config
    out_name = "output.weight" if w.has("output.weight") else "token_embd.weight"
    return Transformer(c, w.embedding("token_embd.weight", c.n_embd, c.n_vocab), blocks,
                       build_norm(w, "output_norm.weight", c.n_embd, c.rms_eps),
                       w.linear(out_name, c.n_embd, c.n_vocab))
