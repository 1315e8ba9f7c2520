"""KV layer groups: one block pool and one block table per group of layers that keep the same positions.

A model whose layers all attend to every earlier position has one group. Gemma3 mixes full-attention
("global") layers with sliding-window ("local") layers that only see the last `window` positions; keeping the
local layers' KV for the whole context would waste most of the cache (gemma3-270m: 15 of its 18 layers are
local). So such a model has two groups:
  group 0, global:   every position, as a single-group model (a block per block_size positions, all kept);
  group 1, windowed: only blocks that some future query's window still reaches. Blocks wholly before the
                     window are given back after every step (their table entries become NULL_BLOCK), so a
                     sequence holds at most ceil((window - 1 + chunk) / block_size) + 1 of them.
Each group is an ember.engine.block_manager.BlockManager over its own pool of blocks, keeping the sequence's
table `seq.block_tables[group]`; a windowed block released by the window goes back to the windowed pool (a
hashed one as evictable cache). Block ids are per group: block 3 of group 0 and block 3 of group 1 are
different memory, so copy-on-write orders say their group.

KVGroups offers the scheduler the one manager's interface, across groups: an allocation happens only if every
group can serve it (all or nothing), so the scheduler preempts when any pool runs dry.

Prefix caching over groups: the chain hash of a block depends only on tokens, so both groups hash a block
alike and each keeps its own hash -> block map (a block of one chain may be cached in one group and evicted in
the other). A match of k blocks credits m = min(k * block_size, num_tokens - 1) computed tokens; it is valid
only if the global group has all k blocks and the windowed group has every block the next query's window
needs, those covering positions (m - window, m] (the last one, when m falls inside block k - 1, is copied on
write like any matched block). Windowed entries before that are NULL_BLOCK in the adopted table. The longest
valid k is taken, which may be shorter than the global group's chain. Pure Python, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as SequenceT

from ember.engine import block_manager as bm
from ember.engine.block_manager import NULL_BLOCK, BlockManager, BlockStats, OutOfBlocksError, PrefixMatch
from ember.engine.sequence import Sequence

GroupCopy = tuple[int, int, int]  # (group, src block, dst block): copy src's slots to dst in that group's layers


@dataclass(frozen=True)
class KVGroup:
    """One group's pool size and attention span; window None: the layers attend to every earlier position."""

    num_blocks: int
    window: Optional[int] = None


@dataclass(frozen=True)
class GroupMatch:
    """A prefix-cache match across groups: per group the blocks to adopt (NULL_BLOCK where a windowed group
    need not keep one), and the tokens credited as computed (the same in every group)."""

    matches: tuple[PrefixMatch, ...]
    num_computed_tokens: int


NO_MATCH = GroupMatch((), 0)


def window_blocks_to_progress(window: int, block_size: int) -> int:
    """The fewest windowed blocks that let a sequence alone compute one more token: its window's earlier
    positions (window - 1 of them, ceil((window - 1) / block_size) blocks when the next position starts a
    block) plus the block being written."""
    return -(-(window - 1) // block_size) + 1


class KVGroups:
    """Block managers of a model's KV groups behind the interface the scheduler uses."""

    def __init__(self, groups: SequenceT[KVGroup], block_size: int, enable_prefix_caching: bool = True) -> None:
        if not groups:
            raise ValueError("at least one KV group is needed")
        for g in groups:
            if g.window is not None and g.window < 1:
                raise ValueError(f"a group's window must be positive, got {g.window!r}")
        self.groups = tuple(groups)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.managers = [BlockManager(g.num_blocks, block_size, enable_prefix_caching, group=i)
                         for i, g in enumerate(groups)]

    # --- queries -----------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocations can take now, summed over groups."""
        return sum(m.num_free_blocks for m in self.managers)

    def group_stats(self) -> list[BlockStats]:
        return [m.stats() for m in self.managers]

    def stats(self) -> BlockStats:
        """Block counts summed over groups; prefix-cache counters of group 0 (every group credits the same
        tokens, so they agree)."""
        per = self.group_stats()
        return BlockStats(
            num_blocks=sum(s.num_blocks for s in per),
            num_used=sum(s.num_used for s in per),
            num_cached=sum(s.num_cached for s in per),
            num_free=sum(s.num_free for s in per),
            prefix_query_tokens=per[0].prefix_query_tokens,
            prefix_hit_tokens=per[0].prefix_hit_tokens,
        )

    def kv_waste(self) -> float:
        """Fraction of allocated token slots, over all groups, that hold no computed token."""
        filled = allocated = 0
        for m in self.managers:
            f, a = m.slot_usage()
            filled, allocated = filled + f, allocated + a
        return 1.0 - filled / allocated if allocated else 0.0

    def min_blocks(self, num_positions: int) -> list[int]:
        """Per group, how many blocks its pool must have for a sequence of num_positions positions with KV to
        run to the end alone: all of them in a global group, at most one window's worth in a windowed one."""
        need = -(-num_positions // self.block_size)
        return [need if g.window is None else min(need, window_blocks_to_progress(g.window, self.block_size))
                for g in self.groups]

    # --- prefix cache ------------------------------------------------------------------------------------

    def prefix_match(self, seq: Sequence) -> GroupMatch:
        """The longest prefix every group can serve (see the module docstring). No side effects."""
        if not self.enable_prefix_caching or any(m.table(seq) for m in self.managers):
            return NO_MATCH
        found = [m.lookup(seq) for m in self.managers]  # the same chain hashes, looked up per group
        n = len(found[0])
        # last_missing[g][k]: the highest block index < k that group g lacks, -1 if none.
        last_missing = []
        for blocks in found:
            lm = [-1] * (n + 1)
            for i, bid in enumerate(blocks):
                lm[i + 1] = i if bid is None else lm[i]
            last_missing.append(lm)
        bs = self.block_size
        for k in range(n, 0, -1):
            computed = min(k * bs, seq.num_tokens - 1)
            lows = [0 if g.window is None else max(0, computed - g.window + 1) // bs for g in self.groups]
            if all(lm[k] < lo for lm, lo in zip(last_missing, lows)):
                matches = tuple(
                    PrefixMatch(tuple([NULL_BLOCK] * lo + blocks[lo:k]), computed)  # type: ignore[arg-type]
                    for blocks, lo in zip(found, lows)
                )
                return GroupMatch(matches, computed)
        return NO_MATCH

    def _per_group(self, match: Optional[GroupMatch]) -> list[Optional[PrefixMatch]]:
        if match is None:
            return [None] * len(self.managers)
        if not match.matches:  # looked up, nothing found: still counts as a prefix-cache query
            return [bm.NO_MATCH] * len(self.managers)
        return list(match.matches)

    # --- allocation --------------------------------------------------------------------------------------

    def max_allocatable(self, seq: Sequence, num_tokens: int, match: Optional[GroupMatch] = None) -> int:
        """Largest n <= num_tokens that every group can give seq now (0 if none)."""
        return min(m.max_allocatable(seq, num_tokens, g) for m, g in zip(self.managers, self._per_group(match)))

    def can_allocate(self, seq: Sequence, num_tokens: int, match: Optional[GroupMatch] = None) -> bool:
        return self.max_allocatable(seq, num_tokens, match) >= num_tokens

    def can_append_slot(self, seq: Sequence) -> bool:
        return self.can_allocate(seq, 1)

    def allocate(self, seq: Sequence, num_tokens: int, match: Optional[GroupMatch] = None) -> list[GroupCopy]:
        """Slots for seq's next num_tokens positions in every group, or OutOfBlocksError with nothing changed.
        A windowed group holds blocks for positions (start - window, start + num_tokens) of this chunk only:
        earlier ones were released by release_out_of_window, or are NULL_BLOCK in an adopted match."""
        if num_tokens < 1:
            raise ValueError("allocate needs at least one token")
        per = self._per_group(match)
        if not self.can_allocate(seq, num_tokens, match):
            raise OutOfBlocksError(f"not enough free KV blocks for {num_tokens} tokens of sequence {seq.seq_id}")
        copies: list[GroupCopy] = []
        for i, (m, g) in enumerate(zip(self.managers, per)):
            copies.extend((i, src, dst) for src, dst in m.allocate(seq, num_tokens, g))
        return copies

    def commit(self, seq: Sequence) -> None:
        for m in self.managers:
            m.commit(seq)

    def trim(self, seq: Sequence) -> int:
        """Speculative rollback in every group; returns how many blocks were released in all."""
        return sum(m.trim(seq) for m in self.managers)

    def free(self, seq: Sequence) -> None:
        for m in self.managers:
            m.free(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for m in self.managers:
            m.fork(parent, child)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Give back seq's windowed blocks that no future query reaches (after each update); returns how many."""
        return sum(m.free_out_of_window(seq, g.window) for m, g in zip(self.managers, self.groups)
                   if g.window is not None)
