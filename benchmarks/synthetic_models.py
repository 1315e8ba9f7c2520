#!/usr/bin/env python3
"""Random-weight llama-architecture GGUFs at real model shapes, for speed benchmarks only.

Speed depends on shapes and tensor types, not on weight values, so a 1B or 3B model need not be downloaded:
we write the quantized blocks directly with random bytes and sane fp16 scale fields (gguf-py cannot
quantize to K types, and random scale bytes would give inf/nan). Outputs are meaningless text, but
llama.cpp and Ember both load the files and run them at the real cost.

    python benchmarks/synthetic_models.py --size 1b --quant q4_k_m     # prints the path (cached)

Shapes (llama architecture, head_dim = n_embd / n_head, vocab 32000):
    1b: 16 layers, n_embd 2048, FFN 5632, 32 heads, 4 KV heads
    3b: 26 layers, n_embd 3072, FFN 8192, 24 heads, 8 KV heads

Quantization mixes:
    q8_0:   every matrix Q8_0 (embedding and output included), norms F32 — as llama.cpp's Q8_0 ftype.
    q4_k_m: an approximation of llama.cpp's Q4_K_M: Q4_K for every matrix (embedding included) except
            - output.weight: Q6_K
            - attn_v.weight and ffn_down.weight: Q6_K in the layers that get "more bits" (the first and last
              eighth of the layers, and every third layer in between), Q4_K elsewhere.
            llama.cpp adds further per-model exceptions (e.g. for some GQA/MoE models); those are left out.

Files go to $EMBER_SYNTHETIC_DIR or ~/.cache/ember/synthetic, never into the repository.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

WEIGHT_STD = 0.02  # typical std of trained LLM weights; keeps activations in a normal float range


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 32000
    n_ctx_train: int = 4096

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES: dict[str, Shape] = {
    "1b": Shape(n_layer=16, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4),
    "3b": Shape(n_layer=26, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8),
}
QUANTS = {"q4_k_m": 15, "q8_0": 7}  # name -> llama.cpp's general.file_type number


# -- random quantized blocks -------------------------------------------------------------------------------

def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of valid random blocks whose dequantized values have std ~ WEIGHT_STD.

    Scale targets (from each format's formula, with uniformly random quant bytes):
      Q8_0  w = d * q,                    q int8 (std ~74)             -> d ~ std / 74
      Q4_K  w = d * sc * q - dmin * m,    sc, m 6-bit, q 4-bit         -> d ~ std / 145, dmin = 7.5 d (centres
                                                                           the average block on zero)
      Q6_K  w = d * s * (q - 32),         s int8 (kept in [-16, 16]), q 6-bit -> d ~ std / 175
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    n = rows * cols // block
    data = np.frombuffer(rng.bytes(n * size), dtype=np.uint8).reshape(n, size).copy()
    jitter = rng.uniform(0.8, 1.25, size=n)
    if qtype == T.Q8_0:  # d[2] qs[32]
        data[:, 0:2] = _fp16_bytes(WEIGHT_STD / 74 * jitter)
    elif qtype == T.Q4_K:  # d[2] dmin[2] scales[12] qs[128]
        d = WEIGHT_STD / 145 * jitter
        data[:, 0:2] = _fp16_bytes(d)
        data[:, 2:4] = _fp16_bytes(7.5 * d)
    elif qtype == T.Q6_K:  # ql[128] qh[64] scales[16] (int8) d[2]
        data[:, 192:208] = rng.integers(-16, 17, size=(n, 16), dtype=np.int8).view(np.uint8)
        data[:, 208:210] = _fp16_bytes(WEIGHT_STD / 175 * jitter)
    else:
        raise ValueError(f"no random-block writer for {qtype.name}")
    return data.reshape(rows, -1)


# -- the tensor plan ---------------------------------------------------------------------------------------

def more_bits(i: int, n: int) -> bool:
    """Layers that llama.cpp's K_M mixes give more bits: first/last eighth, every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(shape: Shape, quant: str) -> list[tuple[str, tuple[int, int] | tuple[int], T]]:
    """(name, numpy shape [rows, cols] or [n], type) for every tensor, in file order."""
    s = shape
    base = T.Q8_0 if quant == "q8_0" else T.Q4_K
    big = T.Q8_0 if quant == "q8_0" else T.Q6_K
    q_out, kv_out = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    plan: list[tuple[str, tuple[int, int] | tuple[int], T]] = [("token_embd.weight", (s.n_vocab, s.n_embd), base)]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        extra = big if more_bits(i, s.n_layer) else base
        plan += [
            (p + "attn_norm.weight", (s.n_embd,), T.F32),
            (p + "attn_q.weight", (q_out, s.n_embd), base),
            (p + "attn_k.weight", (kv_out, s.n_embd), base),
            (p + "attn_v.weight", (kv_out, s.n_embd), extra),
            (p + "attn_output.weight", (s.n_embd, q_out), base),
            (p + "ffn_norm.weight", (s.n_embd,), T.F32),
            (p + "ffn_gate.weight", (s.n_ff, s.n_embd), base),
            (p + "ffn_up.weight", (s.n_ff, s.n_embd), base),
            (p + "ffn_down.weight", (s.n_embd, s.n_ff), extra),
        ]
    plan += [("output_norm.weight", (s.n_embd,), T.F32), ("output.weight", (s.n_vocab, s.n_embd), big)]
    return plan


# -- tokenizer ---------------------------------------------------------------------------------------------

def spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of exactly n_vocab pieces: <unk> <s> </s>, the 256 byte tokens, then
    characters and letter pairs/triples (with and without the ▁ word marker) in decreasing score, so any text
    tokenizes (byte fallback) and common-looking pieces merge."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    if n_vocab < len(tokens):
        raise ValueError(f"an SPM vocabulary needs at least {len(tokens)} tokens")
    chars = [chr(c) for c in range(33, 127)]
    lower = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["▁"] + chars + ["▁" + c for c in chars]
    pieces += [a + b for a in lower for b in lower] + ["▁" + a + b for a in lower for b in lower]
    pieces += ["▁" + a + b + c for a in lower for b in lower for c in lower]
    pieces += [a + b + c for a in lower for b in lower for c in lower]
    need = n_vocab - len(tokens)
    if need > len(pieces):
        raise ValueError(f"vocabulary of {n_vocab} is larger than this generator supports")
    tokens += pieces[:need]
    types += [1] * need
    scores = [0.0] * 259 + [-float(i) for i in range(need)]
    return tokens, scores, types


# -- writing -----------------------------------------------------------------------------------------------

def write_synthetic(path: Path, shape: Shape, quant: str, seed: int = 0, name: str | None = None) -> Path:
    """Write a random-weight llama GGUF; tensors are generated one at a time so memory stays small."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {sorted(QUANTS)}")
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    s = shape
    w.add_name(name or f"synthetic-llama-{quant}")
    w.add_file_type(QUANTS[quant])
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.n_vocab)
    tokens, scores, types = spm_vocab(s.n_vocab)
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

    plan = tensor_plan(shape, quant)
    for tname, tshape, qtype in plan:
        if qtype == T.F32:
            w.add_tensor_info(tname, tshape, np.dtype(np.float32), tshape[0] * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = tshape
            row_bytes = cols // block * size
            w.add_tensor_info(tname, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for tname, tshape, qtype in plan:
        if qtype == T.F32:  # norm weights near 1, as trained models have
            w.write_tensor_data((1.0 + rng.normal(0, 0.05, size=tshape)).astype(np.float32))
        else:
            w.write_tensor_data(random_blocks(qtype, tshape[0], tshape[1], rng))
    w.close()
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a file that looks complete
    return path


# -- a deepened real model ----------------------------------------------------------------------------------

# Quantized types whose blocks start with one float16 scale (and, for Q4_1, a float16 min right after it):
# scaling those fields scales every weight of the block exactly as a float would.
SCALED_FIELDS = {T.Q4_0: 1, T.Q4_1: 2, T.Q5_0: 1, T.Q5_1: 2, T.Q8_0: 1}
DAMPED = ("attn_output.weight", "ffn_down.weight")  # what a layer adds to the residual stream


def _damped(data: np.ndarray, qtype: T, eps: float) -> np.ndarray:
    if qtype == T.F32:
        return (data * eps).astype(np.float32)
    if qtype not in SCALED_FIELDS:
        raise ValueError(f"cannot scale {qtype.name} blocks")
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.array(data, dtype=np.uint8).reshape(-1, size)
    fields = blocks[:, : 2 * SCALED_FIELDS[qtype]].copy().view(np.float16)
    blocks[:, : 2 * SCALED_FIELDS[qtype]] = (fields.astype(np.float32) * eps).astype(np.float16).view(np.uint8)
    return blocks.reshape(data.shape)


def write_deepened(src: Path, dst: Path, n_layer: int, eps: float) -> Path:
    """src's model (llama architecture) with its layers repeated up to n_layer: layer i >= n_src is a copy of
    layer i % n_src whose attention output and FFN down projections are scaled by eps (in the quantized
    blocks' scale fields), so each copy adds only a small perturbation to the residual stream. The result
    computes nearly src's function with the same vocabulary at n_layer / n_src times the weight bytes per
    token: a stand-in for a larger model of the family that src, its small sibling, drafts for. How often
    the two agree follows from eps (measured, not assumed: benchmarks/speculative.py reports acceptance)."""
    r = gguf.GGUFReader(str(src))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        raise ValueError(f"deepening is written for llama files, not {arch}")
    n_src = int(r.fields[f"{arch}.block_count"].contents())
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    w = gguf.GGUFWriter(str(tmp), arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == f"{arch}.block_count":
            w.add_block_count(n_layer)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    by_name = {t.name: t for t in r.tensors}
    names = [t.name for t in r.tensors if not t.name.startswith("blk.")]
    names += [f"blk.{i}.{t.name.split('.', 2)[2]}" for i in range(n_layer) for t in r.tensors
              if t.name.startswith(f"blk.{i % n_src}.")]
    for name in names:
        parts = name.split(".", 2)
        source = name if not name.startswith("blk.") else f"blk.{int(parts[1]) % n_src}.{parts[2]}"
        t = by_name[source]
        data = t.data
        if name != source and parts[2] in DAMPED:
            data = _damped(data, t.tensor_type, eps)
        w.add_tensor(name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    return dst


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_SYNTHETIC_DIR", Path.home() / ".cache" / "ember" / "synthetic"))


def synthetic_model(size: str, quant: str, seed: int = 0, force: bool = False) -> Path:
    """Path of the cached synthetic model `size` ("1b"/"3b") in `quant`, written on first use."""
    if size not in SHAPES:
        raise ValueError(f"size must be one of {sorted(SHAPES)}")
    path = cache_dir() / f"synthetic-llama-{size}-{quant}.gguf"
    if force or not path.exists():
        write_synthetic(path, SHAPES[size], quant, seed, name=f"synthetic-llama-{size}-{quant}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write random-weight llama GGUFs at 1B/3B shapes (cached).")
    ap.add_argument("--size", choices=sorted(SHAPES), nargs="+", default=["1b"])
    ap.add_argument("--quant", choices=sorted(QUANTS), nargs="+", default=["q4_k_m"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even when cached")
    args = ap.parse_args(argv)
    for size in args.size:
        for quant in args.quant:
            print(synthetic_model(size, quant, args.seed, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
