#!/usr/bin/env python3
"""How much context gemma3's KV cache holds with its sliding-window layers in their own KV group (issue 4).

    python3 benchmarks/kv_window_groups.py [--model gemma3] [--contexts 2048 4096 8192 16384 30000]
                                           [--decode-context 1500 --decode-repeats 2]

Builds the engine with the default EngineConfig (kv_cache_bytes 256 MiB, 16 sequences, 512 tokens per step,
block size 16) twice over the real model: the one-group layout (window_group=False: windowed layers keep
every block and mask, as before KV groups) and the two-group layout. For each it reports the pools (blocks,
allocated bytes), the longest request the cache accepts, and, through the engine's own scheduler with a
stand-in "model" (token = last + 1; KV accounting depends only on lengths), for requests of each context
length: how many hold KV at once when 16 arrive together (each generates enough tokens to still be running
when the last one could be admitted, so the peak is set by memory, or by the 16-sequence cap), with the
preemptions that cost, and the KV bytes the first sequence holds per token of context at its end (global
blocks x their bytes + windowed blocks x theirs, over its length). No forward pass runs for those.

--decode-context N (0: skip) then times real decode steps of 4 streams at ~N tokens of context each (greedy,
48 tokens, prefill excluded), one layout after the other in one process, --decode-repeats times.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import ember
from ember.engine.engine import Engine, EngineConfig
from ember.engine.generator import GenerationOptions
from ember.engine.kv_budget import bytes_per_block
from ember.engine.scheduler import Scheduler, SchedulerConfig
from ember.engine.sequence import Sequence
from ember.engine.sampler import SamplingParams
from ember.errors import ContextOverflowError

DECODE = 16  # tokens generated per request in longest_request


def group_bytes(engine: Engine) -> list[int]:
    """Bytes of one block in each KV group (its layers' K and V)."""
    c, cfg = engine.model.config, engine.config
    layers = [engine.cache.layer_groups.count(g) for g in range(engine.cache.num_groups)]
    return [bytes_per_block(n, c.n_head_kv, c.head_dim, c.value_dim, cfg.block_size, cfg.kv_dtype) for n in layers]


def longest_request(cfg: SchedulerConfig) -> int:
    """Most positions (prompt + generated - 1) one request may have: the scheduler's own admission check."""
    lo, hi = 1, cfg.max_model_len or 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            Scheduler(cfg).check_fits(mid - DECODE + 1, DECODE)
            lo = mid
        except ContextOverflowError:
            hi = mid - 1
    return lo


def run(cfg: SchedulerConfig, per_block: list[int], context: int, n: int) -> tuple[int, int, float] | None:
    """n requests of `context` positions arriving together: (peak holding KV, preemptions, KV bytes per token
    of the first one at its last step), or None if such a request never fits."""
    rng = random.Random(context)
    sched = Scheduler(cfg)
    seqs = []
    # Long enough a life that every request could be admitted before the first one ends.
    decode = -(-n * context // (cfg.max_num_batched_tokens - n)) + 16
    for i in range(n):
        seq = Sequence(i, [rng.randrange(32000) for _ in range(context - decode + 1)], decode)
        try:
            sched.add(seq)
        except ContextOverflowError:
            return None
        seqs.append(seq)
    peak = preempted = 0
    per_token = 0.0
    first = seqs[0]
    while sched.has_unfinished():
        batch = sched.step()
        preempted += len(batch.preempted)
        peak = max(peak, len(sched.running))
        if first.status.value == "running" and first.num_computed_tokens + 1 >= first.num_tokens:
            held = [sum(b != -1 for b in t) for t in first.block_tables]
            per_token = sum(h * b for h, b in zip(held, per_block)) / max(1, first.num_computed_tokens)
        sched.update(batch, [(e.seq.token_ids[-1] + 1) % 32000 for e in batch.sampling], set())
    return peak, preempted, per_token


def decode_ms(m: "ember.Model", window_group: bool, context: int, streams: int = 4) -> float:
    """Mean milliseconds per engine step while `streams` greedy requests of ~context tokens decode."""
    doc = m.tokenizer.encode((Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gpl3.txt")
                             .read_text(), add_special=False)
    doc = doc * (1 + (context + 50 * streams) // len(doc))
    engine = Engine(m.model, m.tokenizer, EngineConfig(max_model_len=m.n_ctx, window_group=window_group))
    opts = GenerationOptions(max_tokens=48, sampling=SamplingParams(temperature=0))
    for i in range(streams):
        engine.add_request(doc[i * 50 : i * 50 + context], opts)
    sched = engine.scheduler
    while sched.waiting or any(s.is_prefill for s in sched.running):
        engine.step()
    t0, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    return (time.perf_counter() - t0) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 30000])
    ap.add_argument("--decode-context", type=int, default=1500)
    ap.add_argument("--decode-repeats", type=int, default=2)
    args = ap.parse_args(argv)
    m = ember.load(args.model, n_ctx=32768)
    print(f"{args.model}: {m.config.n_layer} layers, {sum(m.config.swa_layers)} windowed "
          f"(window {m.config.sliding_window}), default EngineConfig, max_model_len {m.n_ctx}\n")
    rows = []
    for window_group in (False, True):
        engine = Engine(m.model, m.tokenizer, EngineConfig(max_model_len=m.n_ctx, window_group=window_group))
        cfg = engine.scheduler.config
        per_block = group_bytes(engine)
        pools = " + ".join(f"{nb} x {b // 1024} KiB" for nb, b in zip(engine.cache.group_blocks, per_block))
        name = "two groups" if window_group else "one group (before)"
        print(f"{name}: pools {pools} = {engine.cache.nbytes / 2**20:.1f} MiB allocated; "
              f"longest request {longest_request(cfg)} tokens")
        for ctx in args.contexts:
            r = run(cfg, per_block, ctx, cfg.max_num_seqs)
            rows.append((ctx, name, r))
        del engine
    print("\n| context | layout | concurrent (of 16) | preemptions | KV bytes/token of one sequence |")
    print("|---|---|---|---|---|")
    for ctx, name, r in sorted(rows, key=lambda x: x[0]):
        if r is None:
            print(f"| {ctx} | {name} | does not fit | - | - |")
        else:
            print(f"| {ctx} | {name} | {r[0]} | {r[1]} | {r[2]:.0f} |")
    if args.decode_context:
        print(f"\ndecode step, 4 streams at ~{args.decode_context} tokens of context (ms/step):")
        for _ in range(args.decode_repeats):
            one, two = (decode_ms(m, wg, args.decode_context) for wg in (False, True))
            print(f"  one group {one:.1f}, two groups {two:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
