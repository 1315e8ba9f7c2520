"""BlockManager: paged allocation, reference counts, prefix caching, LRU eviction, copy-on-write, windows.

A FakeKV plays the runner's KV memory: it applies copy orders and writes, for each computed position, a value
that depends on the whole token prefix. Reading a sequence back through its block table and comparing with
the values it should have catches any wrong sharing, missed copy or overwritten block.
"""
from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from ember.engine.block_manager import NO_MATCH, NULL_BLOCK, BlockManager, OutOfBlocksError, hash_block
from ember.engine.sequence import Sequence


def expected_kv(tokens: list[int]) -> list[int]:
    """KV 'value' of each position: a function of the token prefix up to and including it."""
    out, prev = [], 0
    for p, t in enumerate(tokens):
        prev = hash((prev, t, p))
        out.append(prev)
    return out


class FakeKV:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: list[list] = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def run(self, seq: Sequence, n: int, copies) -> None:
        """Apply copies, compute positions [num_computed, num_computed + n) and commit, like a runner step."""
        bs = self.bm.block_size
        for src, dst in copies:
            self.kv[dst] = list(self.kv[src])
        values = expected_kv(seq.token_ids[: seq.num_computed_tokens + n])
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            bid = seq.block_table[p // bs]
            # The safety property of copy-on-write: nobody else sees, or can match, a block being written.
            assert self.bm.ref_count(bid) == 1 and self.bm.block_hash(bid) is None, (seq.seq_id, p, bid)
            self.kv[bid][p % bs] = values[p]
        seq.num_computed_tokens += n
        self.bm.commit(seq)

    def check(self, seq: Sequence, window: int | None = None) -> None:
        bs = self.bm.block_size
        want = expected_kv(seq.token_ids[: seq.num_computed_tokens])
        lo = 0 if window is None else max(0, seq.num_computed_tokens - window + 1)
        for p in range(lo, seq.num_computed_tokens):
            assert self.kv[seq.block_table[p // bs]][p % bs] == want[p], (seq.seq_id, p)


def prefill(bm: BlockManager, kv: FakeKV, seq: Sequence):
    """Admit seq with prefix matching and compute its whole prompt; returns the copies ordered."""
    match = bm.prefix_match(seq)
    n = seq.num_tokens - match.num_computed_tokens
    copies = bm.allocate(seq, n, match)
    kv.run(seq, n, copies)
    return copies


def decode(bm: BlockManager, kv: FakeKV, seq: Sequence, token: int):
    """Append a sampled token and compute it (as the next step would)."""
    seq.append_token(token)
    copies = bm.append_slot(seq)
    kv.run(seq, 1, copies)
    return copies


def test_modules_are_pure_python():
    code = (
        "import sys; import ember.engine.sequence, ember.engine.block_manager, ember.engine.scheduler; "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_allocate_free_and_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4)
    kv = FakeKV(bm)
    seq = Sequence(1, list(range(10)), max_tokens=5)
    assert bm.can_allocate(seq, 10)
    prefill(bm, kv, seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    st = bm.stats()
    assert (st.num_used, st.num_cached, st.num_free) == (3, 0, 5)
    assert st.utilization == pytest.approx(3 / 8)
    full, partial = seq.block_table[:2], seq.block_table[2]
    assert all(bm.block_hash(b) is not None for b in full) and bm.block_hash(partial) is None
    kv.check(seq)

    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert all(bm.ref_count(b) == 0 for b in full + [partial])
    # Full blocks stay cached for reuse; the partial one has no identity and is simply free.
    assert all(bm.is_cached(b) for b in full) and not bm.is_cached(partial)
    st = bm.stats()
    assert (st.num_used, st.num_cached, st.num_free) == (0, 2, 6)


def test_decode_takes_a_new_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=8, block_size=4)
    kv = FakeKV(bm)
    seq = Sequence(1, list(range(7)), max_tokens=10)
    prefill(bm, kv, seq)
    assert len(seq.block_table) == 2
    seq.append_token(100)  # position 7: last slot of block 1
    assert bm.append_slot(seq) == [] and len(seq.block_table) == 2
    kv.run(seq, 1, [])
    seq.append_token(101)  # position 8: needs block 2
    bm.append_slot(seq)
    assert len(seq.block_table) == 3
    kv.run(seq, 1, [])
    kv.check(seq)


def test_identical_prefix_shares_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=16)
    kv = FakeKV(bm)
    a = Sequence(1, list(range(40)), max_tokens=4)
    prefill(bm, kv, a)
    b = Sequence(2, list(range(32)) + list(range(1000, 1010)), max_tokens=4)
    match = bm.prefix_match(b)
    assert match.block_ids == tuple(a.block_table[:2]) and match.num_computed_tokens == 32
    copies = bm.allocate(b, b.num_tokens - 32, match)
    assert copies == []
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 1]
    assert b.num_cached_tokens == b.num_computed_tokens == 32
    kv.run(b, b.num_tokens - 32, copies)
    kv.check(a)
    kv.check(b)
    assert bm.stats().prefix_hit_tokens == 32


def test_a_different_earlier_block_breaks_the_chain():
    bm = BlockManager(num_blocks=16, block_size=4)
    kv = FakeKV(bm)
    a = Sequence(1, list(range(12)), max_tokens=4)
    prefill(bm, kv, a)
    # Block 1 (tokens 4..7) is identical, but block 0 differs: its KV was computed under another prefix.
    c = Sequence(2, [99, 1, 2, 3] + list(range(4, 12)), max_tokens=4)
    assert bm.prefix_match(c) is NO_MATCH
    # Differing only in block 1 keeps block 0.
    d = Sequence(3, [0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11], max_tokens=4)
    assert bm.prefix_match(d).block_ids == (a.block_table[0],)
    # The hash is a chain: same tokens, different parent, different hash.
    assert hash_block(None, [4, 5, 6, 7]) != hash_block(hash_block(None, [0, 1, 2, 3]), [4, 5, 6, 7])


def test_prefix_match_stops_at_the_first_missing_block():
    bm = BlockManager(num_blocks=3, block_size=4)
    kv = FakeKV(bm)
    s = Sequence(1, list(range(12)), max_tokens=4)
    prefill(bm, kv, s)
    blocks = list(s.block_table)
    assert bm.free_out_of_window(s, window=4) == 2  # blocks 0 and 1 released (1 first), block 2 kept
    bm.free(s)
    other = Sequence(2, [77, 78], max_tokens=1)
    prefill(bm, kv, other)
    assert other.block_table == [blocks[1]]  # the middle block was the least recently used
    # Blocks 0 and 2 are still cached, but block 2's KV is only usable after block 1: the match ends at 0.
    assert bm.is_cached(blocks[2]) and bm.block_hash(blocks[2]) is not None
    assert bm.prefix_match(Sequence(3, list(range(12)), max_tokens=4)).block_ids == (blocks[0],)


def test_full_prompt_hit_leaves_the_last_token_and_copies_a_shared_block():
    bm = BlockManager(num_blocks=16, block_size=16)
    kv = FakeKV(bm)
    a = Sequence(1, list(range(32)), max_tokens=4)
    prefill(bm, kv, a)
    b = Sequence(2, list(range(32)), max_tokens=4)
    match = bm.prefix_match(b)
    assert len(match.block_ids) == 2 and match.num_computed_tokens == 31  # logits need the last token run
    copies = bm.allocate(b, 1, match)
    # a still holds block 1, so b must not write into it: it gets a copy.
    assert copies == [(a.block_table[1], b.block_table[1])]
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert bm.ref_count(a.block_table[1]) == 1
    kv.run(b, 1, copies)
    kv.check(a)
    kv.check(b)

    # Alone with a cached block: no copy needed; the block is unpublished while rewritten, then re-published.
    bm.free(a)
    c = Sequence(3, list(range(32)), max_tokens=4)
    match = bm.prefix_match(c)
    assert match.num_computed_tokens == 31
    old_last = match.block_ids[1]
    assert bm.is_cached(old_last)
    copies = bm.allocate(c, 1, match)
    assert copies == [] and c.block_table[1] == old_last and bm.block_hash(old_last) is None
    kv.run(c, 1, copies)
    assert bm.block_hash(old_last) is not None
    kv.check(c)


def test_cached_blocks_are_evicted_lru_and_only_when_needed():
    bm = BlockManager(num_blocks=6, block_size=4)
    kv = FakeKV(bm)
    a = Sequence(1, list(range(8)), max_tokens=4)
    b = Sequence(2, list(range(100, 108)), max_tokens=4)
    prefill(bm, kv, a)
    prefill(bm, kv, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.stats().num_cached == 4 and bm.stats().num_free == 2

    # Two free blocks: taken before any cached block is touched.
    c = Sequence(3, list(range(200, 208)), max_tokens=4)
    prefill(bm, kv, c)
    assert bm.stats().num_cached == 4
    assert len(bm.prefix_match(Sequence(9, list(range(8)), 1)).block_ids) == 2

    # Reviving a's blocks (a prefix hit) takes them out of the LRU; the new third block evicts the least
    # recently used cached block: b's tail, released before b's head.
    a2 = Sequence(4, list(range(8)) + [7], max_tokens=4)
    prefill(bm, kv, a2)
    assert a2.block_table[:2] == a_blocks and a2.num_cached_tokens == 8
    assert a2.block_table[2] == b_blocks[1] and bm.block_hash(b_blocks[1]) is None
    assert bm.prefix_match(Sequence(10, list(range(100, 108)), 1)).block_ids == (b_blocks[0],)
    bm.free(a2)  # a's blocks are now the most recently used; a2's partial block is plain free
    d = Sequence(5, list(range(300, 304)), max_tokens=4)
    prefill(bm, kv, d)
    assert d.block_table == [b_blocks[1]]  # the plain free block (a2's former partial) goes before any eviction
    e = Sequence(6, list(range(400, 404)), max_tokens=4)
    prefill(bm, kv, e)
    assert e.block_table == [b_blocks[0]]  # older than a's revived blocks
    f = Sequence(7, list(range(500, 504)), max_tokens=4)
    prefill(bm, kv, f)
    assert f.block_table == [a_blocks[1]]  # a's tail before a's head
    assert bm.prefix_match(Sequence(8, list(range(8)), 1)).block_ids == (a_blocks[0],)
    for s in (c, d, e, f):
        kv.check(s)


def test_copy_on_write_after_fork():
    bm = BlockManager(num_blocks=8, block_size=4)
    kv = FakeKV(bm)
    parent = Sequence(1, list(range(6)), max_tokens=8)
    prefill(bm, kv, parent)
    parent.append_token(50)  # sampled token, not yet computed
    child = parent.fork(2)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.ref_count(b) == 2 for b in parent.block_table)
    shared_partial = parent.block_table[1]

    # The child's first token differs (another sample); writing position 6 must not touch the parent's block.
    child.token_ids[-1] = 60
    copies = bm.append_slot(child)
    assert copies == [(shared_partial, child.block_table[1])]
    kv.run(child, 1, copies)
    assert bm.ref_count(shared_partial) == 1
    assert bm.append_slot(parent) == []  # now exclusive: written in place
    kv.run(parent, 1, [])
    kv.check(parent)
    kv.check(child)
    assert parent.block_table[0] == child.block_table[0] and bm.ref_count(parent.block_table[0]) == 2


def test_can_allocate_false_changes_nothing_and_max_allocatable_uses_slack():
    bm = BlockManager(num_blocks=2, block_size=4)
    kv = FakeKV(bm)
    seq = Sequence(1, list(range(5)), max_tokens=8)
    prefill(bm, kv, seq)
    before = (list(seq.block_table), bm.stats())
    assert not bm.can_allocate(seq, 4)
    assert bm.max_allocatable(seq, 10) == 3  # the partial block's three empty slots
    with pytest.raises(OutOfBlocksError):
        bm.allocate(seq, 4)
    assert (seq.block_table, bm.stats()) == before
    other = Sequence(2, [1], max_tokens=1)
    assert not bm.can_allocate(other, 1, bm.prefix_match(other))


def test_stats_and_kv_waste():
    bm = BlockManager(num_blocks=10, block_size=16)
    kv = FakeKV(bm)
    assert bm.kv_waste() == 0.0
    seq = Sequence(1, list(range(20)), max_tokens=8)
    prefill(bm, kv, seq)
    assert bm.kv_waste() == pytest.approx(12 / 32)
    # A fork shares the blocks: still 32 allocated slots holding 20 tokens.
    child = seq.fork(2)
    bm.fork(seq, child)
    assert bm.kv_waste() == pytest.approx(12 / 32)
    assert bm.stats().num_used == 2
    other = Sequence(3, list(range(100, 116)), max_tokens=8)
    prefill(bm, kv, other)
    assert bm.kv_waste() == pytest.approx(12 / 48)
    assert bm.stats().utilization == pytest.approx(3 / 10)


def test_sliding_window_releases_blocks_before_the_window():
    bm = BlockManager(num_blocks=16, block_size=4)
    kv = FakeKV(bm)
    seq = Sequence(1, list(range(20)), max_tokens=8)
    prefill(bm, kv, seq)
    blocks = list(seq.block_table)
    assert len(blocks) == 5
    # Next query at position 20 attends keys 15..20: position 15 (block 3) is needed, blocks 0-2 are not.
    assert bm.free_out_of_window(seq, window=6) == 3
    assert seq.block_table == [NULL_BLOCK] * 3 + blocks[3:]
    assert all(bm.ref_count(b) == 0 and bm.is_cached(b) for b in blocks[:3])  # full blocks stay cached
    assert bm.free_out_of_window(seq, window=6) == 0
    kv.check(seq, window=6)

    decode(bm, kv, seq, 7)  # computed 21: the next query (21) needs 16..21, block 3 (12..15) dies
    assert bm.free_out_of_window(seq, window=6) == 1
    assert seq.block_table[:4] == [NULL_BLOCK] * 4 and len(seq.block_table) == 6
    for t in range(8):  # indices stay stable as the sequence grows
        decode(bm, kv, seq, t)
        bm.free_out_of_window(seq, window=6)
        kv.check(seq, window=6)
        assert sum(b != NULL_BLOCK for b in seq.block_table) <= 3
    assert bm.kv_waste() < 1.0
    bm.free(seq)
    assert bm.stats().num_used == 0


def test_random_operations_keep_invariants_and_kv_content():
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=48, block_size=4)
    kv = FakeKV(bm)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    live: list[Sequence] = []
    family: dict[int, int] = {}
    next_id = 0
    hits = forks = cows = 0
    for _ in range(1500):
        op = rng.random()
        if op < 0.25 or not live:
            tokens = list(rng.choice(stems)) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            seq = Sequence(next_id, tokens, max_tokens=50)
            match = bm.prefix_match(seq)
            n = seq.num_tokens - match.num_computed_tokens
            if bm.can_allocate(seq, n, match):
                copies = bm.allocate(seq, n, match)
                hits += match.num_computed_tokens > 0
                cows += bool(copies)
                kv.run(seq, n, copies)
                live.append(seq)
                family[seq.seq_id] = seq.seq_id
            next_id += 1
        elif op < 0.75:
            seq = rng.choice(live)
            seq.append_token(rng.randrange(50))
            if bm.can_append_slot(seq):
                copies = bm.append_slot(seq)
                cows += bool(copies)
                kv.run(seq, 1, copies)
            else:
                bm.free(seq)
                live.remove(seq)
        elif op < 0.85:
            parent = rng.choice(live)
            child = parent.fork(next_id)
            next_id += 1
            bm.fork(parent, child)
            live.append(child)
            family[child.seq_id] = family[parent.seq_id]
            forks += 1
            child.append_token(rng.randrange(50))  # the child's own sample, written into shared blocks
            if bm.can_append_slot(child):
                copies = bm.append_slot(child)
                cows += bool(copies)
                kv.run(child, 1, copies)
        else:
            seq = rng.choice(live)
            bm.free(seq)
            live.remove(seq)

        holders = Counter(b for s in live for b in s.block_table)
        for bid in range(bm.num_blocks):
            assert bm.ref_count(bid) == holders[bid]
        st = bm.stats()
        assert st.num_free + st.num_used + st.num_cached == bm.num_blocks
        assert st.num_used == len(holders)
        for bid, n in holders.items():
            if n > 1 and bm.block_hash(bid) is None:
                # Only forks share unpublished blocks, and only until one of them writes.
                assert len({family[s.seq_id] for s in live if bid in s.block_table}) == 1
        for bid in range(bm.num_blocks):
            if bm.ref_count(bid) == 0:
                assert bm.is_cached(bid) == (bm.block_hash(bid) is not None)
        for s in live:
            assert len(set(s.block_table)) == len(s.block_table)
            kv.check(s)
    assert hits > 10 and forks > 10 and cows > 10  # the walk really exercised sharing and copying
