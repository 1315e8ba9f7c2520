"""Tiny random GGUF models written by the tests themselves, plus an independent numpy reference forward.

The reference dequantizes with gguf-py (not Ember's code) and implements each architecture plainly in float64
numpy, so a test comparing Ember's logits against it checks Ember's loading, repacking and model math.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 256, 4, 2, 64, 512
# K-quants need rows of 256; every projection's in-dimension here is 256 or 512.

GGUF_PY_QUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
K_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def _random_kquant(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose fp16 super-block scales are finite and modest (gguf-py cannot quantize
    to K types, and random bytes would give inf/nan scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    data = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = lambda: rng.uniform(0.0005, 0.003, size=n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == T.Q6_K:  # ... ql[128] qh[64] scales[16] d
        data[:, 208:210] = scale()
    elif qtype == T.Q3_K:  # hmask[32] qs[64] scales[12] d
        data[:, 108:110] = scale()
    elif qtype == T.Q2_K:  # scales[16] qs[64] d dmin
        data[:, 80:82] = scale()
        data[:, 82:84] = scale()
    else:  # Q4_K / Q5_K: d dmin scales[12] ...
        data[:, 0:2] = scale()
        data[:, 2:4] = scale()
    return data.reshape(rows, -1)


def encode_tensor(values: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (array for GGUFWriter, float reference values as stored) for a 2-D float32 matrix [rows, cols]."""
    if qtype in K_TYPES:
        raw = _random_kquant(qtype, values.shape[0], values.shape[1], rng)
    elif qtype == T.F32:
        return values.astype(np.float32), values.astype(np.float64)
    else:
        raw = gguf.quants.quantize(values.astype(np.float32), qtype)
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(values.shape)
    return raw, ref


def spm_vocab(extra_words: list[str]) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, w in enumerate(extra_words):
        tokens.append(w)
        types.append(1)
        scores.append(-float(i + 1))
    while len(tokens) % 16:  # keep the vocabulary (output rows) a multiple of 16 for the int4 kernel
        tokens.append(f"<pad{len(tokens)}>")
        types.append(5)
        scores.append(-1e4)
    return tokens, scores, types


WORDS = ["▁the", "▁a", "▁cat", "▁dog", "▁sat", "▁on", "▁mat", "▁and", "▁ran", "▁", "e", "t", "a", "o", "s", "n"]


def write_tiny_model(
    path: Path,
    arch: str = "llama",
    qtype: T = T.Q4_0,
    n_layer: int = 2,
    seed: int = 0,
    biases: bool = False,
    window: int = 4,
    n_ctx: int = 256,
) -> dict:
    """Write a tiny random model; return its float reference weights and hyper-parameters."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = spm_vocab(WORDS)
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(n_ctx)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    w.add_rope_freq_base(1e6 if arch == "gemma3" else 10000.0)
    if arch == "gemma3":
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_sliding_window(window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)

    ref: dict = {"arch": arch, "n_layer": n_layer, "n_vocab": n_vocab, "window": window, "layers": []}

    def mat(name: str, rows: int, cols: int, std: float, t: T = qtype) -> np.ndarray:
        raw, val = encode_tensor(rng.normal(0, std, size=(rows, cols)).astype(np.float32), t, rng)
        w.add_tensor(name, raw, raw_dtype=None if t == T.F32 else t)
        return val

    def vec(name: str, n: int, center: float) -> np.ndarray:
        v = (center + rng.normal(0, 0.1, size=n)).astype(np.float32)
        w.add_tensor(name, v)
        return v.astype(np.float64)

    # Embedding stays Q8_0 (as in both reference models); output tied to it for gemma3, separate for llama.
    ref["embd"] = mat("token_embd.weight", n_vocab, N_EMBD, 0.5, T.Q8_0)
    q_out, kv_out = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(n_layer):
        p = f"blk.{i}."
        L = {
            "attn_norm": vec(p + "attn_norm.weight", N_EMBD, 1.0),
            "wq": mat(p + "attn_q.weight", q_out, N_EMBD, 0.08),
            "wk": mat(p + "attn_k.weight", kv_out, N_EMBD, 0.08),
            "wv": mat(p + "attn_v.weight", kv_out, N_EMBD, 0.08),
            "wo": mat(p + "attn_output.weight", N_EMBD, q_out, 0.08),
            "ffn_norm": vec(p + "ffn_norm.weight", N_EMBD, 1.0),
            "gate": mat(p + "ffn_gate.weight", N_FF, N_EMBD, 0.08),
            "up": mat(p + "ffn_up.weight", N_FF, N_EMBD, 0.08),
            "down": mat(p + "ffn_down.weight", N_EMBD, N_FF, 0.06),
        }
        if biases:
            for b, n in (("bq", q_out), ("bk", kv_out), ("bv", kv_out)):
                L[b] = vec(p + {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}[b], n, 0.0)
        if arch == "gemma3":
            L["q_norm"] = vec(p + "attn_q_norm.weight", HEAD_DIM, 1.0)
            L["k_norm"] = vec(p + "attn_k_norm.weight", HEAD_DIM, 1.0)
            L["post_attn_norm"] = vec(p + "post_attention_norm.weight", N_EMBD, 1.0)
            L["post_ffn_norm"] = vec(p + "post_ffw_norm.weight", N_EMBD, 1.0)
        ref["layers"].append(L)
    ref["out_norm"] = vec("output_norm.weight", N_EMBD, 1.0)
    ref["output"] = ref["embd"] if arch == "gemma3" else mat("output.weight", n_vocab, N_EMBD, 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


# ---------------------------------------------------------------------------------------------------------
# Independent reference forward (float64 numpy), written from the architectures' papers/model cards.

def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool) -> np.ndarray:
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]  # [T, d/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def reference_logits(ref: dict, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] for ids from an empty context."""
    gemma = ref["arch"] == "gemma3"
    eps = 1e-6 if gemma else 1e-5
    T_ = len(ids)
    pos = np.arange(T_, dtype=np.float64)
    x = ref["embd"][ids].copy()
    if gemma:
        x *= math.sqrt(N_EMBD)
    group = N_HEAD // N_HEAD_KV
    for i, L in enumerate(ref["layers"]):
        swa = gemma and (i + 1) % 6 != 0
        h = _rms(x, L["attn_norm"], eps)
        q = (h @ L["wq"].T + L.get("bq", 0)).reshape(T_, N_HEAD, HEAD_DIM)
        k = (h @ L["wk"].T + L.get("bk", 0)).reshape(T_, N_HEAD_KV, HEAD_DIM)
        v = (h @ L["wv"].T + L.get("bv", 0)).reshape(T_, N_HEAD_KV, HEAD_DIM)
        if gemma:
            q, k = _rms(q, L["q_norm"], eps), _rms(k, L["k_norm"], eps)
        base = (10000.0 if swa else 1e6) if gemma else 10000.0
        q, k = _rope(q, pos, base, neox=gemma), _rope(k, pos, base, neox=gemma)
        out = np.zeros((T_, N_HEAD, HEAD_DIM))
        for hh in range(N_HEAD):
            kv = hh // group
            s = q[:, hh] @ k[:, kv].T / math.sqrt(HEAD_DIM)
            allowed = pos[None, :] <= pos[:, None]
            if swa:
                allowed &= pos[None, :] > pos[:, None] - ref["window"]
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, hh] = p @ v[:, kv]
        a = out.reshape(T_, -1) @ L["wo"].T
        x = x + (_rms(a, L["post_attn_norm"], eps) if gemma else a)
        h = _rms(x, L["ffn_norm"], eps)
        g = h @ L["gate"].T
        if gemma:
            act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        else:
            act = g / (1 + np.exp(-g))
        f = (act * (h @ L["up"].T)) @ L["down"].T
        x = x + (_rms(f, L["post_ffn_norm"], eps) if gemma else f)
    return _rms(x, ref["out_norm"], eps) @ ref["output"].T
