"""The paged KV cache's bookkeeping: which physical block holds which sequence's tokens.

The KV cache is a pool of `num_blocks` blocks of `block_size` token slots each. A sequence's block table maps
its logical block i (positions [i*block_size, (i+1)*block_size)) to a physical block. No tensor lives here; the
runner owns the memory and follows the tables and copy orders this module produces.

Every block is in exactly one of three states, so free + used + cached == num_blocks always:
  used    ref_count > 0: held by ref_count block-table entries (of distinct sequences).
  cached  ref_count == 0 but hashed: its KV is still valid for the prefix it was computed under; kept for
          prefix-cache hits, evicted in LRU order only when a block is needed and no free one is left.
  free    ref_count == 0, no hash: content meaningless.

Automatic prefix caching (the vLLM design): a FULL, fully computed block is identified by the chain hash
  h_i = H(h_{i-1}, tokens of block i)
so equal hashes mean equal tokens at equal positions after an equal prefix, hence equal KV. H is BLAKE2b-128
rather than Python's 64-bit hash() so that a collision (which would silently splice one prompt's KV into
another) is out of reach. A hashed block is immutable: a sequence about to write into a block that is shared
(ref_count > 1) gets a private copy (copy-on-write, reported as a (src, dst) pair the runner performs before the
step); one that writes into a hashed block it alone holds first removes the hash (nobody can then match it
mid-write), and the block is re-hashed once computed.

Sliding window: for layers that only attend to the last `window` positions, blocks wholly before the window
are given back with free_out_of_window(). The table keeps NULL_BLOCK in their place, so logical index i still
means positions [i*block_size, ...) and a runner computing slot = table[pos // block_size] stays correct; the
runner must never read a NULL_BLOCK entry (those positions are outside every future query's window) and may
substitute any valid block id when it packs tables into a tensor. This manager frees for all layers it serves;
a model mixing windowed and full-attention layers gets one manager per layer group (ember.engine.kv_groups),
each with its own pool and its own table in the sequence (`seq.block_tables[group]`).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Optional

from ember.engine.sequence import Sequence

NULL_BLOCK = -1
"""Block-table placeholder for a block released by the sliding window."""

BlockHash = bytes
CopyPair = tuple[int, int]  # (src block, dst block): copy all of src's slots to dst before running the step


def hash_block(parent: Optional[BlockHash], token_ids: Iterable[int]) -> BlockHash:
    """Chain hash of one full block: H(parent hash, token ids). parent is None for the first block."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else b"\x00" * 16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class OutOfBlocksError(RuntimeError):
    """allocate() was asked for more blocks than are available: a caller skipped can_allocate (a bug)."""


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks that a new sequence can start from, and how many of its tokens that credits.

    num_computed_tokens may be one less than the blocks cover: the last token of the prompt is always left to
    compute, because the runner needs its logits to sample the first output token.
    """

    block_ids: tuple[int, ...]
    num_computed_tokens: int


NO_MATCH = PrefixMatch((), 0)


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    num_used: int
    num_cached: int
    num_free: int
    prefix_query_tokens: int  # prompt tokens looked up in the prefix cache at admission
    prefix_hit_tokens: int    # of those, credited as already computed

    @property
    def utilization(self) -> float:
        """Fraction of the pool held by live sequences (cached blocks are reclaimable, so not counted)."""
        return self.num_used / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class _Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: Optional[BlockHash] = None


class BlockManager:
    """Allocates KV blocks to sequences, shares full blocks by prefix hash, and orders copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, group: int = 0) -> None:
        """group: which of a sequence's block tables (`seq.block_tables[group]`) this manager keeps; a model
        with one KV layer group uses group 0, which is also `seq.block_table`."""
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.group = group
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order is release order, so the first entry is the least recently used.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[BlockHash, int] = {}
        # Sequences that hold a block table, and how many leading table entries commit() has already examined
        # (those blocks are full and computed, so never written again).
        self._holders: dict[int, Sequence] = {}
        self._num_committed: dict[int, int] = {}
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0

    def table(self, seq: Sequence) -> list[int]:
        """seq's block table in this manager's group (created empty on first use), mutated in place."""
        tables = seq.block_tables
        while len(tables) <= self.group:
            tables.append([])
        return tables[self.group]

    # --- queries -----------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def block_hash(self, block_id: int) -> Optional[BlockHash]:
        return self._blocks[block_id].block_hash

    def is_cached(self, block_id: int) -> bool:
        """True for an evictable block (ref_count 0, still hashed)."""
        return block_id in self._evictable

    def stats(self) -> BlockStats:
        num_cached = len(self._evictable)
        num_free = len(self._free)
        return BlockStats(
            num_blocks=self.num_blocks,
            num_used=self.num_blocks - num_cached - num_free,
            num_cached=num_cached,
            num_free=num_free,
            prefix_query_tokens=self._prefix_query_tokens,
            prefix_hit_tokens=self._prefix_hit_tokens,
        )

    def kv_waste(self) -> float:
        """Fraction of allocated token slots (in used blocks) that hold no computed token.

        A shared block counts once, filled as far as its fullest holder has computed. Cached blocks are not
        allocated and do not count.
        """
        filled, allocated = self.slot_usage()
        return 1.0 - filled / allocated if allocated else 0.0

    def slot_usage(self) -> tuple[int, int]:
        """(token slots holding a computed token, token slots allocated) over the used blocks (see kv_waste)."""
        bs = self.block_size
        filled: dict[int, int] = {}
        for seq in self._holders.values():
            for i, bid in enumerate(self.table(seq)):
                if bid == NULL_BLOCK:
                    continue
                n = min(bs, max(0, seq.num_computed_tokens - i * bs))
                if n > filled.get(bid, -1):
                    filled[bid] = n
        return sum(filled.values()), len(filled) * bs

    # --- prefix cache ------------------------------------------------------------------------------------

    def _update_block_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Extend seq.block_hashes to cover all of its full blocks (tokens are append-only, so old hashes
        stay valid)."""
        hashes = seq.block_hashes
        bs = self.block_size
        tokens = seq.token_ids
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def lookup(self, seq: Sequence) -> list[Optional[int]]:
        """For each of seq's full blocks, the block holding that chain hash here (in use or cached), else
        None. No side effects; ember.engine.kv_groups combines these per group."""
        return [self._hash_to_block.get(h) for h in self._update_block_hashes(seq)]

    def prefix_match(self, seq: Sequence) -> PrefixMatch:
        """The longest run of cached full blocks matching seq's leading tokens. No side effects."""
        if not self.enable_prefix_caching or self.table(seq):
            return NO_MATCH
        block_ids = []
        for h in self._update_block_hashes(seq):
            bid = self._hash_to_block.get(h)
            if bid is None:
                break  # the chain is broken: later blocks have a different prefix even if their tokens match
            block_ids.append(bid)
        if not block_ids:
            return NO_MATCH
        return PrefixMatch(tuple(block_ids), min(len(block_ids) * self.block_size, seq.num_tokens - 1))

    # --- allocation --------------------------------------------------------------------------------------

    def _plan(self, seq: Sequence, match: Optional[PrefixMatch]) -> tuple[list[int], int, int, int]:
        """(table as it will be, first write position, whether the write block needs a copy, blocks that
        leave the allocatable pool just by claiming the match)."""
        if match is not None and match.block_ids:
            if self.table(seq):
                raise ValueError(f"prefix match given for sequence {seq.seq_id} that already holds blocks")
            # A windowed group's match has NULL_BLOCK for the blocks before the next query's window.
            table = list(match.block_ids)
            start = match.num_computed_tokens
            claimed = sum(1 for b in table if b != NULL_BLOCK and self._blocks[b].ref_count == 0)
            extra_ref = 1
        else:
            table = self.table(seq)
            start = seq.num_computed_tokens
            claimed = 0
            extra_ref = 0
        cow = 0
        w = start // self.block_size
        if w < len(table):
            bid = table[w]
            assert bid != NULL_BLOCK, "the block being written was released by the sliding window"
            if self._blocks[bid].ref_count + extra_ref > 1:
                cow = 1
        return table, start, cow, claimed

    def max_allocatable(self, seq: Sequence, num_tokens: int, match: Optional[PrefixMatch] = None) -> int:
        """Largest n <= num_tokens for which allocate(seq, n, match) would succeed (0 if none)."""
        table, start, cow, claimed = self._plan(seq, match)
        avail = self.num_free_blocks - claimed - cow
        if avail < 0:
            return 0
        capacity = (len(table) + avail) * self.block_size - start
        return max(0, min(num_tokens, capacity))

    def can_allocate(self, seq: Sequence, num_tokens: int, match: Optional[PrefixMatch] = None) -> bool:
        """Whether the next num_tokens positions of seq (after match, if given) can get slots now."""
        return self.max_allocatable(seq, num_tokens, match) >= num_tokens

    def allocate(self, seq: Sequence, num_tokens: int, match: Optional[PrefixMatch] = None) -> list[CopyPair]:
        """Give seq slots for its next num_tokens positions, starting at num_computed_tokens.

        With a match (only for a sequence holding no blocks), first adopt the matched cached blocks and credit
        their tokens as computed. Returns the copy-on-write pairs the runner must apply, in order, before the
        step's forward pass.
        """
        if num_tokens < 1:
            raise ValueError("allocate needs at least one token")
        if not self.can_allocate(seq, num_tokens, match):
            raise OutOfBlocksError(f"not enough free KV blocks for {num_tokens} tokens of sequence {seq.seq_id}")
        table = self.table(seq)
        if match is not None and match.block_ids:
            for bid in match.block_ids:
                if bid != NULL_BLOCK:
                    self._take(bid)
            table[:] = match.block_ids
            seq.num_computed_tokens = seq.num_cached_tokens = match.num_computed_tokens
            self._prefix_hit_tokens += match.num_computed_tokens
        if match is not None:
            self._prefix_query_tokens += seq.num_tokens
        self._holders[seq.seq_id] = seq
        self._num_committed.setdefault(seq.seq_id, 0)

        bs = self.block_size
        start = seq.num_computed_tokens
        copies: list[CopyPair] = []
        w = start // bs
        if w < len(table):
            block = self._blocks[table[w]]
            if block.ref_count > 1:
                # Shared (prefix hit or fork): writing would corrupt the other holders' KV.
                dst = self._allocate_block()
                copies.append((block.block_id, dst))
                table[w] = dst
                self._release(block.block_id)  # stays >= 1: another table still holds it
            elif block.block_hash is not None:
                # Ours alone but published: unpublish so no one matches it while it is rewritten.
                del self._hash_to_block[block.block_hash]
                block.block_hash = None
        for _ in range(len(table), -(-(start + num_tokens) // bs)):
            table.append(self._allocate_block())
        return copies

    def can_append_slot(self, seq: Sequence) -> bool:
        return self.can_allocate(seq, 1)

    def append_slot(self, seq: Sequence) -> list[CopyPair]:
        """Slot for one decode token (a new block only at a block boundary)."""
        return self.allocate(seq, 1)

    def commit(self, seq: Sequence) -> None:
        """After the runner computed a step: publish seq's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching or seq.seq_id not in self._holders:
            return
        full = seq.num_computed_tokens // self.block_size
        done = self._num_committed.get(seq.seq_id, 0)
        if full <= done:
            return
        hashes = self._update_block_hashes(seq)
        table = self.table(seq)
        for i in range(done, full):
            bid = table[i]
            if bid == NULL_BLOCK:
                continue
            block = self._blocks[bid]
            if block.block_hash is None and hashes[i] not in self._hash_to_block:
                # If another block already carries this hash (two sequences computed the same prefix at once),
                # this one stays unpublished and simply returns to the free list when released.
                block.block_hash = hashes[i]
                self._hash_to_block[hashes[i]] = bid
        self._num_committed[seq.seq_id] = full

    def trim(self, seq: Sequence) -> int:
        """Release the blocks past seq's computed positions (speculative decoding's rollback: a verification
        pass wrote rejected drafts there). Those blocks were never committed (not full and computed), so they
        hold no hash and go straight back to the free list. Returns how many were released."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        table = self.table(seq)
        released = 0
        while len(table) > keep:
            bid = table.pop()
            if bid != NULL_BLOCK:
                self._release(bid)
                released += 1
        return released

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks (finish, abort or preemption); its KV is gone, so nothing is computed."""
        # Release the tail first: it joins the LRU order earlier, so it is evicted before the head blocks,
        # which are the ones other prompts are most likely to share.
        table = self.table(seq)
        for bid in reversed(table):
            if bid != NULL_BLOCK:
                self._release(bid)
        table.clear()
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        self._holders.pop(seq.seq_id, None)
        self._num_committed.pop(seq.seq_id, None)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make child share all of parent's blocks (its first write into a shared one copies it)."""
        if self.table(child) or child.seq_id in self._holders:
            raise ValueError(f"fork target {child.seq_id} already holds blocks")
        for bid in self.table(parent):
            if bid != NULL_BLOCK:
                self._blocks[bid].ref_count += 1
        self.table(child)[:] = self.table(parent)
        child.num_computed_tokens = parent.num_computed_tokens
        self._holders[child.seq_id] = child
        self._num_committed[child.seq_id] = self._num_committed.get(parent.seq_id, 0)

    def free_out_of_window(self, seq: Sequence, window: int) -> int:
        """Release seq's blocks that no future query can attend to under a sliding window; returns how many.

        The next query is at position q = num_computed_tokens and attends to keys (q - window, q]; every later
        query sees a window starting later still. So a block is dead once its last position is < q - window + 1.
        Its table entry becomes NULL_BLOCK (indices stay stable).
        """
        if window < 1:
            raise ValueError("window must be positive")
        lowest_needed = seq.num_computed_tokens - window + 1
        if lowest_needed <= 0:
            return 0
        table = self.table(seq)
        released = 0
        # Dead blocks form a prefix of the table; walk back from its end until an already released one.
        for i in range(min(lowest_needed // self.block_size, len(table)) - 1, -1, -1):
            if table[i] == NULL_BLOCK:
                break
            self._release(table[i])
            table[i] = NULL_BLOCK
            released += 1
        return released

    # --- pool primitives ---------------------------------------------------------------------------------

    def _allocate_block(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            # Evict the least recently used cached block; its prefix can no longer be matched.
            bid, _ = self._evictable.popitem(last=False)
            block = self._blocks[bid]
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
        self._blocks[bid].ref_count = 1
        return bid

    def _take(self, bid: int) -> None:
        """Add a reference to a hashed block found by prefix match (reviving it if it was cached)."""
        block = self._blocks[bid]
        if block.ref_count == 0:
            del self._evictable[bid]
        block.ref_count += 1

    def _release(self, bid: int) -> None:
        block = self._blocks[bid]
        assert block.ref_count > 0, f"block {bid} released more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self._evictable[bid] = None
            else:
                self._free.append(bid)
