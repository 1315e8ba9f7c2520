"""Many-row products over int4-packed weights: dequantize slabs of the packed weight to bfloat16 on the fly
and run torch's bfloat16 GEMM on them.

Why: torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) is a good GEMV but a poor GEMM. Measured on this
project's 2-core AVX-512 BF16 machine at M=512 rows, the int4 kernel took 3-5x the time of a bfloat16 GEMM of
the same shape, while dequantizing the weight costs a fraction of that GEMM (gemma3 gate/up 640 -> 4096 as two
planes: int4 31.9 ms, bf16 GEMM 6.2 ms). Prompt processing is such a product, so for batches of many rows we
dequantize a slab of rows at a time into a transient buffer (bounded size, nothing stays resident: weights are
still stored once, packed) and multiply by it.

The packed layout is torch's CPU int4 packing (`_convert_weight_to_int4pack_for_cpu(w, 1)`, uint8 [N, K/2]):
rows in blocks of 64, each block stored as [K, 32] bytes whose low nibble is row d and high nibble row 32 + d
of the block; a last block of fewer than 64 rows (a multiple of 16) is stored as [K, rows/2] with the low
nibble row 2j and the high nibble row 2j + 1. That layout is torch's internal choice, so `available()` checks
it once per process against torch's own packing and turns this path off if it ever differs (the int4 kernel
then serves every batch, as before).

Numerics: each weight is ((q - 8) * scale + zero) summed over planes in float32, then rounded once to
bfloat16. The int4 kernel instead keeps the weight in float32 inside its dot products, so results differ in the
last bits (like any change of GEMM); the reference tests against llama.cpp run through this path.
"""
from __future__ import annotations

import functools
import os

import torch

GROUP = 32
BLOCK_N = 64  # rows per block of torch's CPU int4 packing
SLAB_WEIGHTS = 1 << 21  # weights dequantized at once: bounds the float32 scratch at 8 MiB
# Fewest rows that take this path. Dequantizing costs about a quarter of an M=512 bfloat16 GEMM, so it pays
# well below 512 rows; the exact crossover was not measurable on the (loaded) development machine. 64 keeps
# decode and short speculative-verification batches on the int4 kernel. Invariant that follows: a token's
# result is independent of its batch only among batches on the same side of this threshold.
MIN_ROWS = 64


def unpack_rows(packed: torch.Tensor, n0: int, n1: int, k: int) -> torch.Tensor:
    """Codes (uint8 [n1 - n0, k], values 0..15) of rows [n0, n1) of a packed [N, k / 2] weight.

    n0 must be a multiple of 64; n1 a multiple of 64 or N (the last block may be shorter)."""
    flat = packed.view(-1)
    out = []
    full = (n1 - n0) // BLOCK_N * BLOCK_N
    if full:
        v = flat[n0 * k // 2 : (n0 + full) * k // 2].view(full // BLOCK_N, k, BLOCK_N // 2)
        out.append(torch.stack((v & 15, v >> 4), 1).transpose(2, 3).reshape(full, k))
    if n0 + full < n1:
        tail = n1 - n0 - full
        v = flat[(n0 + full) * k // 2 : n1 * k // 2].view(k, tail // 2)
        out.append(torch.stack((v & 15, v >> 4), 2).reshape(k, tail).t())
    return out[0] if len(out) == 1 else torch.cat(out)


def dequantize_rows(packed: torch.Tensor, scales_zeros: torch.Tensor, planes: int, n0: int, n1: int
                    ) -> torch.Tensor:
    """bfloat16 [n1 - n0, K] weight rows from the int4 kernel's operands (planes side by side along K)."""
    n = n1 - n0
    pk = packed.shape[1] * 2  # planes * K
    q = unpack_rows(packed, n0, n1, pk).view(n, pk // GROUP, GROUP).float()
    sz = scales_zeros[:, n0:n1].float()  # [planes * K / 32, n, 2]
    scale = sz[..., 0].t().unsqueeze(-1)
    zero = sz[..., 1].t().unsqueeze(-1)
    w = q.sub_(8).mul_(scale).add_(zero).view(n, planes, pk // planes)
    return (w[:, 0] if planes == 1 else w.sum(1)).to(torch.bfloat16)


def slab_rows(n: int, pk: int) -> int:
    """Rows per slab: a multiple of 64 with about SLAB_WEIGHTS weights, at least one block."""
    return max(BLOCK_N, SLAB_WEIGHTS // pk // BLOCK_N * BLOCK_N) if n > BLOCK_N else n


def matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, planes: int) -> torch.Tensor:
    """x bfloat16 [M, K] (not repeated per plane) times the packed weight -> float32 [M, N]."""
    n = packed.shape[0]
    step = slab_rows(n, packed.shape[1] * 2)
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        w = dequantize_rows(packed, scales_zeros, planes, n0, n1)
        out[:, n0:n1] = torch.nn.functional.linear(x, w)
    return out


def wanted() -> bool:
    """Whether many-row products should dequantize to bfloat16 and use a GEMM: the CPU has a fast bfloat16
    GEMM (AVX-512 BF16 or AMX). EMBER_BULK_BF16=0 turns it off, =1 forces it on a CPU without bfloat16
    instructions (for testing: it is correct there, only not faster). Also used by ember.kernels.qdot."""
    env = os.environ.get("EMBER_BULK_BF16")
    if env == "0":
        return False
    return env == "1" or _fast_bf16()


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether Int4Linear uses this path: wanted(), and torch's packing is the layout unpack_rows reads."""
    return wanted() and _layout_matches()


def _fast_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private probe that changed: treat as absent
            continue
    return False


def _layout_matches() -> bool:
    gen = torch.Generator().manual_seed(0)
    for n, k in ((144, 64), (48, 32)):  # full blocks and a short last block
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
                return False
            if not torch.equal(unpack_rows(packed, 0, n, k).to(torch.int32), q):
                return False
        except Exception:
            return False
    return True
