"""KV layer groups (global + sliding-window pools) and the pool sizing rule, with fake sequences: no model, no
torch. The scheduler-level runs reuse test_scheduler's Driver, whose fake runner reads every group's KV through
its own tables and samples from each group's visible window, so a windowed block released too early, shared
wrongly or not copied changes the output."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from ember.engine.block_manager import NULL_BLOCK, OutOfBlocksError
from ember.engine.kv_budget import bytes_per_block, plan_kv_pools, window_pool_blocks
from ember.engine.kv_groups import NO_MATCH, KVGroup, KVGroups, window_blocks_to_progress
from ember.engine.scheduler import SchedulerConfig
from ember.engine.sequence import Sequence
from ember.errors import ContextOverflowError, InvalidParameterError
from test_scheduler import Driver, tokens

BS, WINDOW = 4, 8


def groups(global_blocks: int = 64, window_blocks: int = 16) -> KVGroups:
    return KVGroups([KVGroup(global_blocks), KVGroup(window_blocks, WINDOW)], BS)


def run(kv: KVGroups, seq: Sequence, n: int, match=None) -> list:
    """One step of seq: allocate n positions (after match), compute them, commit, release the window's tail."""
    copies = kv.allocate(seq, n, match)
    seq.num_computed_tokens += n
    kv.commit(seq)
    kv.release_out_of_window(seq)
    return copies


def held(seq: Sequence, group: int) -> int:
    return sum(b != NULL_BLOCK for b in seq.block_tables[group])


def test_modules_are_pure_python():
    code = ("import sys; import ember.engine.kv_groups, ember.engine.kv_budget; "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_windowed_blocks_are_released_as_the_sequence_advances():
    kv = groups()
    seq = Sequence(0, list(range(30)), max_tokens=100)
    chunk = 6
    while seq.num_computed_tokens < 30:
        n = min(chunk, 30 - seq.num_computed_tokens)
        start = seq.num_computed_tokens
        kv.allocate(seq, n)
        # During the chunk: positions (start - window, start + n) and nothing before.
        assert held(seq, 1) <= -(-(WINDOW - 1 + n) // BS) + 1
        seq.num_computed_tokens += n
        kv.commit(seq)
        kv.release_out_of_window(seq)
        assert seq.block_tables[1][: max(0, start + n - WINDOW + 1) // BS] == [NULL_BLOCK] * (
            max(0, start + n - WINDOW + 1) // BS)
    for _ in range(50):  # decode
        seq.append_token(7)
        run(kv, seq, 1)
        assert held(seq, 0) == -(-seq.num_computed_tokens // BS)  # the global group keeps everything
        assert held(seq, 1) <= window_blocks_to_progress(WINDOW, BS)
    # The released windowed blocks went back to the windowed pool (hashed ones as cache), not the global one.
    w = kv.group_stats()[1]
    assert w.num_used == held(seq, 1) and w.num_cached + w.num_free == 16 - held(seq, 1)
    assert kv.group_stats()[0].num_used == held(seq, 0) == 20
    assert kv.kv_waste() == 0.0  # 80 positions: every held block is full in both groups
    seq.append_token(7)
    run(kv, seq, 1)  # position 80 opens a block in each group: 3 empty slots in each
    assert kv.kv_waste() == pytest.approx(2 * 3 / ((held(seq, 0) + held(seq, 1)) * BS))
    kv.free(seq)
    assert kv.stats().num_used == 0 and seq.block_tables == [[], []]


def test_prefix_match_needs_only_the_window_in_the_windowed_group():
    kv = groups(global_blocks=64, window_blocks=12)
    prompt = list(range(100, 140))  # 10 full blocks
    a = Sequence(0, prompt, max_tokens=1)
    run(kv, a, 40)  # one chunk: 10 windowed blocks at once, then all but the window's two are released
    assert held(a, 1) == 2
    window_ids = kv.managers[1].lookup(a)
    kv.free(a)
    # B extends A's prompt: the global chain covers all 40 tokens and the windowed group still caches
    # the blocks of positions (32, 40], so the whole chain is credited; windowed entries before are NULL.
    b = Sequence(1, prompt + [5, 6, 7], max_tokens=1)
    match = kv.prefix_match(b)
    assert match.num_computed_tokens == 40
    g, w = match.matches
    assert len(g.block_ids) == 10 and NULL_BLOCK not in g.block_ids
    assert w.block_ids == (NULL_BLOCK,) * 8 + tuple(window_ids[8:10])
    run(kv, b, 3, match)  # computed 43: the window (35, 43] is in blocks 8 (adopted) .. 10 (new)
    assert held(b, 1) == kv.group_stats()[1].num_used == 2  # 8 went back once the window passed it
    kv.free(b)


def test_prefix_match_is_shortened_when_the_window_was_evicted():
    kv = groups(global_blocks=64, window_blocks=12)
    prompt = list(range(100, 140))
    a = Sequence(0, prompt, max_tokens=1)
    run(kv, a, 40)
    ids = kv.managers[1].lookup(a)
    kv.free(a)  # windowed LRU order: blocks 7..0 (released by the window), then 9, 8 (freed tail first)
    # C reuses A's first 24 tokens: its match adopts windowed blocks 4 and 5 (positions (16, 24]) and its
    # release makes them the most recently used.
    c = Sequence(1, prompt[:24] + [1], max_tokens=1)
    match = kv.prefix_match(c)
    assert match.num_computed_tokens == 24 and match.matches[1].block_ids[4:] == tuple(ids[4:6])
    run(kv, c, 1, match)
    kv.free(c)
    # A filler takes every free block plus 8 evictable ones: all of A's windowed blocks but 4 and 5 are gone.
    filler = Sequence(2, list(range(500, 540)), max_tokens=1)
    kv.allocate(filler, 40)
    assert [kv.managers[1].lookup(a)[i] is not None for i in range(10)] == [i in (4, 5) for i in range(10)]
    # B's global chain still has all 10 blocks, but only a 24-token match has its window (16, 24] cached.
    b = Sequence(3, prompt + [9], max_tokens=1)
    assert kv.managers[0].prefix_match(b).num_computed_tokens == 40
    match = kv.prefix_match(b)
    assert match.num_computed_tokens == 24
    assert match.matches[0].block_ids == tuple(kv.managers[0].lookup(b)[:6])
    assert match.matches[1].block_ids == (NULL_BLOCK,) * 4 + tuple(ids[4:6])
    # A prompt whose only windowed hit is outside every useful window gets no match at all.
    kv.free(filler)
    kv2 = groups(global_blocks=64, window_blocks=4)
    d = Sequence(4, list(range(16)), max_tokens=1)
    run(kv2, d, 16)
    kv2.free(d)
    kv2.allocate(Sequence(5, list(range(900, 912)), max_tokens=1), 12)  # evicts d's windowed blocks 2, 3
    assert kv2.prefix_match(Sequence(6, list(range(16)) + [1], max_tokens=1)) == NO_MATCH


def test_copy_on_write_and_fork_across_groups():
    kv = groups()
    parent = Sequence(0, list(range(10)), max_tokens=20)
    run(kv, parent, 10)
    child = parent.fork(1)
    kv.fork(parent, child)
    assert child.block_tables == parent.block_tables
    for g in range(2):
        assert all(kv.managers[g].ref_count(b) == 2 for b in parent.block_tables[g] if b != NULL_BLOCK)
    child.append_token(3)
    copies = kv.allocate(child, 1)  # position 10 lies in the shared block 2: copied in both groups
    assert [(g, src) for g, src, _ in copies] == [(0, parent.block_tables[0][2]), (1, parent.block_tables[1][2])]
    for g, src, dst in copies:
        assert child.block_tables[g][2] == dst != src and kv.managers[g].ref_count(src) == 1
    kv.free(child)
    kv.free(parent)
    assert kv.stats().num_used == 0


def test_full_prompt_hit_copies_the_last_block_in_both_groups():
    kv = groups()
    prompt = list(range(50, 62))  # 3 full blocks
    a = Sequence(0, prompt, max_tokens=5)
    run(kv, a, 12)
    b = Sequence(1, list(prompt), max_tokens=5)
    match = kv.prefix_match(b)
    assert match.num_computed_tokens == 11  # the last token runs again for its logits
    copies = kv.allocate(b, 1, match)
    assert sorted(g for g, _, _ in copies) == [0, 1]
    assert b.block_tables[1][:1] == [NULL_BLOCK]  # (11 - 8, 11]: blocks 0 is outside the window


def test_trim_releases_rejected_drafts_in_both_groups():
    kv = groups()
    seq = Sequence(0, list(range(7)), max_tokens=20)
    run(kv, seq, 6)
    kv.allocate(seq, 1 + 6)  # last token + 6 drafts: positions 6..12
    assert len(seq.block_tables[0]) == len(seq.block_tables[1]) == 4
    seq.num_computed_tokens += 2  # one draft accepted
    assert kv.trim(seq) == 4  # blocks 2 and 3 (positions 8..15) in each group
    assert len(seq.block_tables[0]) == len(seq.block_tables[1]) == 2


def test_allocation_is_all_or_nothing():
    kv = groups(global_blocks=64, window_blocks=3)
    seq = Sequence(0, list(range(20)), max_tokens=1)
    assert kv.max_allocatable(seq, 20) == 12  # the windowed pool bounds one chunk
    with pytest.raises(OutOfBlocksError):
        kv.allocate(seq, 13)
    assert seq.block_tables[0] == [] and kv.stats().num_used == 0


def test_preemption_when_only_the_windowed_pool_runs_dry():
    rng = random.Random(3)
    cfg = SchedulerConfig(num_blocks=200, block_size=BS, max_num_seqs=4, max_num_batched_tokens=16,
                          sliding_window=WINDOW, window_num_blocks=7)
    d = Driver(cfg)
    # Short prompts are all admitted (a block each); as they decode each comes to hold a window's 3 blocks.
    for _ in range(4):
        d.add(tokens(rng, 3), max_tokens=20)
    preempted_with_global_room = False
    while d.sched.has_unfinished():
        batch = d.step()
        if batch.preempted and d.sched.kv.managers[0].num_free_blocks > 16:
            preempted_with_global_room = True
    assert preempted_with_global_room
    d.assert_outputs_correct()
    assert d.sched.kv.stats().num_used == 0


@pytest.mark.parametrize("seed", range(4))
def test_memory_pressure_run_completes_every_request(seed):
    """Random prompts sharing prefixes, both pools small: preemptions, prefix hits across groups, window
    releases; every request completes with the output it has alone."""
    rng = random.Random(seed)
    cfg = SchedulerConfig(num_blocks=40, block_size=BS, max_num_seqs=5, max_num_batched_tokens=12,
                          sliding_window=WINDOW, window_num_blocks=10)
    d = Driver(cfg)
    shared = tokens(rng, 24)
    for _ in range(14):
        prompt = (shared[: rng.randrange(0, 25)] if rng.random() < 0.6 else []) + tokens(rng, rng.randrange(1, 30))
        d.add(prompt, max_tokens=rng.randrange(1, 40))
    peak = 0
    while d.sched.has_unfinished():
        d.step()
        for s in d.sched.running:
            peak = max(peak, held(s, 1))
    d.assert_outputs_correct()
    assert peak <= window_blocks_to_progress(WINDOW, BS) + -(-cfg.max_num_batched_tokens // BS)
    st = d.sched.kv.stats()
    assert st.num_used == 0 and st.prefix_hit_tokens > 0
    assert sum(s.num_preemptions for s in d.seqs.values()) > 0


def test_add_checks_both_pools():
    cfg = SchedulerConfig(num_blocks=10, block_size=BS, sliding_window=WINDOW, window_num_blocks=3)
    d = Driver(cfg)
    d.add(list(range(20)), max_tokens=21)  # 40 positions: all 10 global blocks, 3 windowed suffice
    with pytest.raises(ContextOverflowError, match="KV cache"):
        d.add(list(range(20)), max_tokens=22)
    tight = Driver(SchedulerConfig(num_blocks=10, block_size=BS, sliding_window=WINDOW, window_num_blocks=2))
    tight.add(list(range(4)), max_tokens=5)  # 8 positions: 2 blocks
    with pytest.raises(ContextOverflowError, match="sliding-window"):
        tight.add(list(range(4)), max_tokens=6)  # a window of 8 spans 3 blocks
    with pytest.raises(InvalidParameterError):
        SchedulerConfig(num_blocks=10, window_num_blocks=3)


def test_long_requests_beyond_the_windowed_pool_complete():
    cfg = SchedulerConfig(num_blocks=64, block_size=BS, max_num_seqs=2, max_num_batched_tokens=8,
                          sliding_window=WINDOW, window_num_blocks=window_blocks_to_progress(WINDOW, BS))
    d = Driver(cfg)
    rng = random.Random(1)
    d.add(tokens(rng, 40), max_tokens=60)  # 100 positions = 25 windowed blocks' worth, through a pool of 3
    d.add(tokens(rng, 10), max_tokens=30)
    d.run()
    d.assert_outputs_correct()


# --- pool sizing ------------------------------------------------------------------------------------------

GEMMA = [512 if (i + 1) % 6 else 0 for i in range(18)]  # gemma3-270m: 15 local layers of window 512, 3 global


def plan(**kw):
    args = dict(block_size=16, dtype="float16", kv_cache_bytes=256 << 20, num_blocks=None, max_num_seqs=16,
                max_num_batched_tokens=512, max_model_len=32768)
    args.update(kw)
    return plan_kv_pools(kw.pop("windows", GEMMA), 1, 256, 256, **{k: v for k, v in args.items() if k != "windows"})


def test_sizing_rule_for_a_mixed_model():
    p = plan()
    assert p.layer_groups == tuple(1 if w else 0 for w in GEMMA) and p.window == 512
    want = 16 * (-(-511 // 16) + 1) + 512 // 16 + 16
    assert p.num_blocks[1] == want == window_pool_blocks(512, 16, 16, 512, 32768) == 576
    g, w = bytes_per_block(3, 1, 256, 256, 16), bytes_per_block(15, 1, 256, 256, 16)
    assert p.num_blocks[0] == ((256 << 20) - want * w) // g
    assert p.num_blocks[0] * g + p.num_blocks[1] * w <= 256 << 20
    one = plan(windows=[0] * 18)
    assert one.layer_groups == (0,) * 18 and one.num_blocks == ((256 << 20) // bytes_per_block(18, 1, 256, 256, 16),)
    assert p.num_blocks[0] > 2.5 * one.num_blocks[0]  # the point: far more context in the same bytes
    # A budget too small for the rule: both groups get the same count (the one-group split).
    small = plan(kv_cache_bytes=32 << 20)
    assert small.num_blocks[0] == small.num_blocks[1] == (32 << 20) // (g + w)
    # num_blocks keeps its meaning for the global group; the windowed one follows the rule, capped by it.
    assert plan(num_blocks=1000).num_blocks == (1000, 576)
    assert plan(num_blocks=100).num_blocks == (100, 100)
    assert plan(num_blocks=100, window_num_blocks=7).num_blocks == (100, 7)
    # All layers windowed: one group, as before.
    assert plan(windows=[512] * 18).num_blocks == one.num_blocks and plan(windows=[512] * 18).window is None
    # Short contexts cap the rule: no sequence holds more than max_model_len's blocks.
    assert plan(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64).num_blocks[1] == 2 * 4
