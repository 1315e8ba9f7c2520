#!/usr/bin/env python3
"""Serving-engine latency under two workloads of the serving-engine issue (issue 4).

    python3 benchmarks/engine_latency.py [--model smollm2]

shared-prefix  16 requests with the same ~1000-token system prompt and different questions. The first runs
               alone; the other 15 arrive together once it has its first token. Reports the first request's
               time to first token (TTFT), the later ones' (median and worst), their ratio, and how many
               prompt tokens the prefix cache served. Target: later TTFT <= 1/5 of the first.
shared-prefix-staggered  the same 16 requests, but each later one arrives when the one before it has its
               first token (users trickling in while earlier answers still stream), so each newcomer's own
               suffix is prefilled next to the running decodes rather than 15 suffixes in one step.
long-prefill   4 streams decoding, then a ~4000-token prompt arrives. Reports the streams' median gap between
               two tokens before it arrived and the worst gap while it was being prefilled (chunked prefill
               keeps each step's token budget, so running streams keep getting tokens every step).
Runs the engine in-process through its background loop, as the server does; greedy, 2 threads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import ember
from ember.engine.engine import Engine, EngineConfig
from ember.engine.generator import GenerationOptions
from ember.engine.sampler import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0)


def text_tokens(m: "ember.Model", n: int, offset: int = 0) -> str:
    ids = m.tokenizer.encode((ROOT / "tests" / "fixtures" / "gpl3.txt").read_text(), add_special=False)
    ids = (ids * (1 + (offset + n) // len(ids)))[offset : offset + n]
    return m.tokenizer.decode(ids)


def chat_ids(m: "ember.Model", system: str, user: str) -> list[int]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return m.prompt_ids(m.template.render(msgs, add_generation_prompt=True))


class Timed:
    """Collects one request's token arrival times from the engine's thread."""

    def __init__(self, engine: Engine, ids: list[int], max_tokens: int) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.done = threading.Event()
        self.cached = 0

        def sink(out) -> None:
            if out.token is not None:
                self.times.append(time.perf_counter())
            if out.finished:
                if out.metrics is not None:
                    self.cached = out.metrics.cached_tokens
                self.done.set()

        engine.add_request(ids, GenerationOptions(max_tokens=max_tokens, sampling=GREEDY), sink=sink)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.start

    def gaps(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:]) if since <= b <= until]


def _wait_first_token(r: Timed) -> None:
    while not r.times:
        time.sleep(0.001)


def shared_prefix(m: "ember.Model", staggered: bool = False) -> dict:
    engine = Engine(m.model, m.tokenizer, EngineConfig(max_model_len=4096, kv_cache_bytes=512 << 20))
    engine.start_background()
    system = "You answer questions about this license.\n\n" + text_tokens(m, 1000)
    questions = [f"Question {i}: what does section {i} say?" for i in range(16)]
    first = Timed(engine, chat_ids(m, system, questions[0]), 8)
    _wait_first_token(first)
    later = []
    for q in questions[1:]:
        later.append(Timed(engine, chat_ids(m, system, q), 8))
        if staggered:
            _wait_first_token(later[-1])
    for r in [first] + later:
        r.done.wait()
    engine.stop_background()
    ttfts = [r.ttft for r in later]
    return {"prompt_tokens": len(chat_ids(m, system, questions[0])), "first_ttft": first.ttft,
            "later_ttft_p50": statistics.median(ttfts), "later_ttft_max": max(ttfts),
            "ratio": statistics.median(ttfts) / first.ttft, "cached_p50": statistics.median(r.cached for r in later)}


def long_prefill(m: "ember.Model") -> dict:
    engine = Engine(m.model, m.tokenizer, EngineConfig(max_model_len=8192, kv_cache_bytes=512 << 20))
    engine.start_background()
    streams = [Timed(engine, chat_ids(m, "Be verbose.", f"Tell story number {i}."), 400) for i in range(4)]
    time.sleep(4.0)  # steady decoding first
    arrive = time.perf_counter()
    long = Timed(engine, chat_ids(m, "Summarize.", text_tokens(m, 4000, 3000)), 4)
    while not long.times:
        time.sleep(0.001)
    prefilled = long.times[0]
    long.done.wait()
    for s in streams:
        s.done.wait()
    engine.stop_background()
    before = [g for s in streams for g in s.gaps(until=arrive)]
    during = [g for s in streams for g in s.gaps(since=arrive, until=prefilled)]
    return {"prompt_tokens": len(chat_ids(m, "Summarize.", text_tokens(m, 4000, 3000))),
            "prefill_seconds": prefilled - arrive, "gap_before_p50": statistics.median(before),
            "gap_during_p50": statistics.median(during) if during else float("nan"),
            "gap_during_max": max(during) if during else float("nan"),
            "stream_tokens_during": len(during)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workloads", nargs="+", default=["shared-prefix", "shared-prefix-staggered", "long-prefill"])
    args = ap.parse_args(argv)
    m = ember.load(args.model, n_ctx=8192)
    for name in ("shared-prefix", "shared-prefix-staggered"):
        if name not in args.workloads:
            continue
        r = shared_prefix(m, staggered=name.endswith("staggered"))
        print(f"{name} ({r['prompt_tokens']} prompt tokens, 16 requests): first TTFT "
              f"{1000 * r['first_ttft']:.0f} ms; later TTFT p50 {1000 * r['later_ttft_p50']:.0f} ms, max "
              f"{1000 * r['later_ttft_max']:.0f} ms; ratio {r['ratio']:.3f} (target <= 0.2); "
              f"cached prompt tokens p50 {r['cached_p50']:.0f}")
    if "long-prefill" in args.workloads:
        r = long_prefill(m)
        print(f"long-prefill ({r['prompt_tokens']} prompt tokens, 4 streams): prefill took "
              f"{r['prefill_seconds']:.1f} s; stream inter-token gap p50 before {1000 * r['gap_before_p50']:.0f} ms,"
              f" during p50 {1000 * r['gap_during_p50']:.0f} ms, worst {1000 * r['gap_during_max']:.0f} ms; "
              f"{r['stream_tokens_during']} stream tokens delivered during the prefill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
