"""Ember's native kernels against the torch kernels they replace, on SmolLM2's shapes.

    python3 benchmarks/native_kernels.py              # 1 thread (the per-core comparison in BENCHMARKS.md)
    python3 benchmarks/native_kernels.py --threads 2

qdot (ember/kernels/csrc/qdot.cpp) vs torch's int4 kernel (Int4Linear, the path used without native kernels)
for the fused gate/up (3072 x 576) and down (576 x 1536) projections in Q4_1 and the 49152 x 576 Q8_0 output,
at 1, 4 and 16 rows; and decode attention through block tables (paged_attention.cpp) for 16 rows of different
sequences, 3 KV heads x 3 query heads, head size 64, at two context lengths. Random weights quantized with
gguf-py; times are the mean of repeated calls after a warm-up.
"""
from __future__ import annotations

import argparse
import time

import gguf
import torch
from gguf import GGMLQuantizationType as T

from ember.kernels import linear, native, qdot


def mean_us(fn, reps: int = 200) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def matmuls() -> None:
    print("| weight | rows | qdot us | torch int4 us | speed-up |")
    print("|---|---|---|---|---|")
    for qt, (n, k) in [(T.Q4_1, (3072, 576)), (T.Q4_1, (576, 1536)), (T.Q8_0, (49152, 576))]:
        raw = gguf.quants.quantize(torch.randn(n, k).numpy(), qt)
        fast = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qt, (k, n))])
        slow = linear.build_linear([linear.WeightParts(n, k, linear.split_int4_planes(raw, qt, (k, n)), None, None)])
        for m in (1, 4, 16):
            x = torch.randn(m, k)
            a, b = mean_us(lambda: fast(x)), mean_us(lambda: slow(x))
            print(f"| {qt.name} {n} x {k} | {m} | {a:.0f} | {b:.0f} | {b / a:.1f}x |")


def attention() -> None:
    ext = native.extension()
    rows, hkv, group, d, bs = 16, 3, 3, 64, 16
    print("\n| keys per row | paged_attention us (16 rows) | ns per key and kv head |")
    print("|---|---|---|")
    for n in (140, 1000):
        blocks = -(-n // bs)
        pool = rows * blocks + 8
        kp = torch.randn(pool * bs, hkv, d).half()
        vp = torch.randn(pool * bs, hkv, d).half()
        q = torch.randn(rows, hkv * group, d)
        tables = torch.randperm(pool)[: rows * blocks].view(rows, blocks).contiguous()
        lens = torch.full((rows,), n, dtype=torch.long)
        us = mean_us(lambda: ext.paged_attention(q, kp, vp, tables, lens, bs, 0, d ** -0.5), reps=50)
        print(f"| {n} | {us:.0f} | {us * 1e3 / (rows * hkv * n):.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not native.available():
        print("native kernels unavailable on this machine (AVX-512 VNNI and a C++ compiler are needed)")
        return 1
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}\n")
    matmuls()
    attention()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
