"""Gemma3-270m through the engine with its sliding-window layers in their own KV group (window 512): greedy
tokens equal those of the one-group layout (EngineConfig(window_group=False): windowed layers keep every
block and mask, the engine's layout before KV groups, which never touches the windowed pool, its release or
its prefix rule), for a prompt + generation longer than the window, in a mixed batch, with a shared prefix
longer than the window, and under a small windowed pool; and a long sequence holds only its window's blocks
in the windowed group while the global group holds all of its positions."""
from __future__ import annotations

import pytest

import ember
from ember.engine.block_manager import NULL_BLOCK
from ember.engine.engine import Engine, EngineConfig
from ember.engine.generator import GenerationOptions
from ember.engine.sampler import SamplingParams
from engine_helpers import run_all

pytestmark = pytest.mark.model

BUDGET = 256  # per-step tokens: the ~700-token prompt is prefilled in three chunks
CFG = dict(max_model_len=1024, max_num_batched_tokens=BUDGET)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    m = ember.load(gemma3_path, n_ctx=1024)
    assert m.config.sliding_window == 512 and 0 < sum(m.config.swa_layers) < m.config.n_layer
    return m


@pytest.fixture(scope="module")
def prompts(gemma):
    """A ~700-token document prompt, a second one sharing its first 600 tokens, and two short ones."""
    from pathlib import Path

    tok = gemma.tokenizer
    doc = tok.encode((Path(__file__).parent / "fixtures" / "gpl3.txt").read_text(), add_special=False)
    long = [tok.bos_id] + doc[:700]
    other = long[:600] + doc[2000:2040]
    return {"long": long, "other": other, "short1": doc[3000:3030], "short2": doc[4000:4100]}


OPTS = {"long": 64, "other": 32, "short1": 32, "short2": 32}


def options(name):
    return GenerationOptions(max_tokens=OPTS[name], sampling=GREEDY)


def one_group(gemma, **kw) -> Engine:
    engine = Engine(gemma.model, gemma.tokenizer, EngineConfig(**CFG, window_group=False, **kw))
    assert engine.cache.num_groups == 1
    return engine


MIXED = ["long", "short1", "short2"]


def test_long_sequence_in_a_mixed_batch_keeps_only_its_window(gemma, prompts):
    # Reference: the same workload through the one-group layout (the same batches; a request's greedy tokens in
    # a batch can differ from its tokens alone by bfloat16 GEMM-vs-GEMV effects, in either layout).
    ref = [o.completion.ids for o in run_all(one_group(gemma), [prompts[n] for n in MIXED],
                                              [options(n) for n in MIXED])]
    engine = Engine(gemma.model, gemma.tokenizer, EngineConfig(**CFG))
    assert engine.cache.num_groups == 2
    window, bs = 512, engine.config.block_size
    peak = 0
    execute = engine.runner.execute

    def spy(batch):
        nonlocal peak
        for e in batch.scheduled:
            glob, win = e.seq.block_tables
            end = e.start + e.num_tokens
            assert NULL_BLOCK not in glob and len(glob) == -(-end // bs)  # the global group keeps every block
            held = sum(b != NULL_BLOCK for b in win)
            # This chunk's positions and the window before it: (start - window, end), nothing earlier.
            assert held <= -(-(window - 1 + e.num_tokens) // bs) + 1, (e.start, e.num_tokens, held)
            assert all(b == NULL_BLOCK for b in win[: max(0, e.start - window + 1) // bs])
            peak = max(peak, held)
        return execute(batch)

    engine.runner.execute = spy
    outs = run_all(engine, [prompts[n] for n in MIXED], [options(n) for n in MIXED])
    assert [o.completion.ids for o in outs] == ref
    assert len(prompts["long"]) + 64 > 700 and peak < -(-(len(prompts["long"]) + 64) // bs)
    stats = engine.scheduler.kv.group_stats()
    assert stats[0].num_used == stats[1].num_used == 0


def test_shared_prefix_longer_than_the_window(gemma, prompts):
    runs = []
    for engine in (one_group(gemma), Engine(gemma.model, gemma.tokenizer, EngineConfig(**CFG))):
        (first,) = run_all(engine, [prompts["long"]], [options("long")])
        (second,) = run_all(engine, [prompts["other"]], [options("other")])
        # 37 full blocks (592 tokens) of the 600 shared: the global chain and, in the windowed group, the
        # blocks of the window (80, 592] were still cached.
        assert second.metrics.cached_tokens == 592
        runs.append((first.completion.ids, second.completion.ids))
    assert runs[1] == runs[0]
    # And alone, without any cache, the second request gives the same tokens in both layouts.
    alone = [run_all(e, [prompts["other"]], [options("other")])[0].completion.ids
             for e in (one_group(gemma, enable_prefix_caching=False),
                       Engine(gemma.model, gemma.tokenizer, EngineConfig(**CFG, enable_prefix_caching=False)))]
    assert alone[0] == alone[1]


def test_small_windowed_pool_limits_and_completes(gemma, prompts):
    """The windowed pool (52 blocks: one ~700-token prompt's last chunk and window take 45-49) is the limit
    while the global pool has room: a second long request's prefill chunks are cut to what the windowed pool
    can hold, and every request completes. (Token equality with another layout is not asserted here: cut
    chunks change which rows share a bfloat16 GEMM; tests/test_engine.py checks exactness under windowed-pool
    pressure, with preemptions, on the tiny gemma3.)"""
    engine = Engine(gemma.model, gemma.tokenizer, EngineConfig(**CFG, window_num_blocks=52))
    assert engine.scheduler.config.num_blocks > 3 * (701 + 64) // 16
    names = ["long", "distinct", "short2"]
    reqs = dict(prompts, distinct=prompts["long"][:1] + prompts["long"][-300:] + prompts["other"][-40:] * 9)
    cut = 0
    execute = engine.runner.execute

    def spy(batch):
        nonlocal cut
        kv = engine.scheduler.kv
        assert kv.group_stats()[1].num_used <= 52
        for e in batch.scheduled:
            if e.is_prefill and e.num_tokens < e.seq.num_tokens - e.start and batch.num_batched_tokens < BUDGET:
                cut += kv.managers[0].num_free_blocks > 0  # the global pool had room: the windowed one cut it
        return execute(batch)

    engine.runner.execute = spy
    outs = run_all(engine, [reqs[n] for n in names], [options("other" if n == "distinct" else n) for n in names])
    for name, out in zip(names, outs):
        assert out.finish_reason in ("length", "stop") and out.completion.ids, name
        if out.finish_reason == "length":
            assert len(out.completion.ids) == OPTS["other" if name == "distinct" else name]
    assert cut > 0, cut
    st = engine.scheduler.kv.group_stats()
    assert st[1].num_blocks == 52 and st[0].num_used == st[1].num_used == 0
