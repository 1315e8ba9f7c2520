#!/usr/bin/env python3
"""Perplexity with the serving engine's paged KV cache in each storage type (float16, bfloat16, q8_0).

    python3 benchmarks/kv_quality.py --models smollm2 gemma3 [--ctx 512]

llama-perplexity's method (ember/perplexity.py: non-overlapping chunks of --ctx tokens, BOS first, second half
of each chunk scored) on tests/fixtures/gpl3.txt, but every chunk runs through ember.engine.paged_cache in
prefill chunks of 128 tokens, so later chunks attend to keys read back from the quantized pool - what a
server with `kv_dtype="q8_0"` computes. Prints perplexity per type, its change against float16, and the KV
bytes per token.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import ember
from ember.engine.paged_cache import BatchLayout, PagedKVCache

ROOT = Path(__file__).resolve().parent.parent
STEP = 128  # prefill chunk: keys of earlier chunks come back from the pool in its storage type


def paged_perplexity(model: "ember.Model", text: str, n_ctx: int, kv_dtype: str) -> float:
    c = model.config
    bs = 16
    n_blocks = -(-n_ctx // bs)
    cache = PagedKVCache(c.n_layer, c.n_head_kv, c.head_dim, c.value_dim, n_blocks, bs, kv_dtype)
    table = list(range(n_blocks))
    tokens = model.tokenize(text, add_special=True)
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    first = n_ctx // 2
    total, count = 0.0, 0
    for ci in range(len(tokens) // n_ctx):
        chunk = tokens[ci * n_ctx : (ci + 1) * n_ctx]
        batch = ([bos] + chunk[1:]) if bos is not None else chunk
        rows = []
        for start in range(0, n_ctx, STEP):
            piece = batch[start : start + STEP]
            cache.set_batch(BatchLayout.build(bs, [(table, start, len(piece))]))
            want = [j - start for j in range(start, start + len(piece)) if first <= j < n_ctx - 1]
            out = model.model.forward(torch.tensor(piece), torch.arange(start, start + len(piece)), cache,
                                      logit_rows=torch.tensor(want, dtype=torch.long))
            if want:
                rows.append(out)
        logits = torch.cat(rows).double()
        targets = torch.tensor(chunk[first + 1 : n_ctx])
        total -= float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", nargs="+", default=["float16", "bfloat16", "q8_0"])
    args = ap.parse_args(argv)
    text = (ROOT / "tests" / "fixtures" / "gpl3.txt").read_text()
    print("| model | KV type | bytes/token | perplexity | change vs float16 |")
    print("|---|---|---|---|---|")
    for name in args.models:
        m = ember.load(name)
        c = m.config
        base = None
        for kv in args.types:
            ppl = paged_perplexity(m, text, args.ctx, kv)
            base = ppl if base is None else base
            per_token = PagedKVCache.bytes_per_block(c.n_layer, c.n_head_kv, c.head_dim, c.value_dim, 1, kv)
            print(f"| {name} | {kv} | {per_token} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)
        m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
