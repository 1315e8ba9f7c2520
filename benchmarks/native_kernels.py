"""Ember's native kernels against the torch kernels they replace, on SmolLM2's shapes.

    python3 benchmarks/native_kernels.py              # 1 thread (the per-core comparison in BENCHMARKS.md)
    python3 benchmarks/native_kernels.py --threads 2  # also the engine's view: verification rows, model step

qdot (ember/kernels/csrc/qdot.cpp) vs torch's int4 kernel (Int4Linear, the path used without native kernels)
for the fused gate/up (3072 x 576) and down (576 x 1536) projections in Q4_1 and the 49152 x 576 Q8_0 output,
at 1, 4 and 16 rows; and decode attention through block tables (paged_attention.cpp) for 16 rows of different
sequences, 3 KV heads x 3 query heads, head size 64, at two context lengths. Random weights quantized with
gguf-py; times are the mean of repeated calls after a warm-up.

Then two views closer to a decode step: attention for one sequence's 1, 4 and 9 rows at consecutive lengths
from 1037 keys (a speculative verification; 1 row is a plain decode), caches warm; and every qdot product of
a whole model (--model, default smollm2: its 30 layers' projections and the output) for 1, 9 and 16 rows with
its weights coming from memory, as in a decode step (best of 5 passes of 10 steps).
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


def verification() -> None:
    ext = native.extension()
    hkv, group, d, bs, n = 3, 3, 64, 16, 1037
    blocks = -(-(n + 8) // bs) + 1
    kp = torch.randn((blocks + 4) * bs, hkv, d).half()
    vp = torch.randn((blocks + 4) * bs, hkv, d).half()
    table = torch.randperm(blocks + 4)[:blocks]
    print("\n| rows of one sequence (1037+ keys) | paged_attention us | us per extra row |")
    print("|---|---|---|")
    base = None
    for r in (1, 4, 9):
        q = torch.randn(r, hkv * group, d)
        tables = table.repeat(r, 1).contiguous()
        lens = torch.arange(n, n + r, dtype=torch.long)
        us = min(mean_us(lambda: ext.paged_attention(q, kp, vp, tables, lens, bs, 0, d ** -0.5), reps=200)
                 for _ in range(3))
        base = us if base is None else base
        print(f"| {r} | {us:.1f} | {'-' if r == 1 else f'{(us - base) / (r - 1):.1f}'} |")


def model_step(name: str) -> None:
    import ember
    from ember.model.transformer import linear_layers

    m = ember.load(name)
    lins = [lin for lin in linear_layers(m.engine.model) if isinstance(lin, qdot.QDotLinear)]
    print(f"\n| {name}: every qdot product of a decode step ({len(lins)} weights) | ms |")
    print("|---|---|")
    for rows in (1, 9, 16):
        xs = {lin.in_features: torch.randn(rows, lin.in_features) for lin in lins}

        def step() -> None:
            for lin in lins:
                lin(xs[lin.in_features])

        best = min(mean_us(step, reps=10) for _ in range(5))
        print(f"| {rows} row{'s' if rows > 1 else ''} | {best / 1000:.2f} |")
    m.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2", help="model for the decode-step view ('none' skips it)")
    args = ap.parse_args()
    if not native.available():
        print("native kernels unavailable on this machine (AVX-512 VNNI and a C++ compiler are needed)")
        return 1
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}\n")
    matmuls()
    attention()
    verification()
    if args.model != "none":
        model_step(args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
