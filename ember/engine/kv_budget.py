"""How the engine's KV memory is split into pools: which layers form which KV group, and each group's blocks.

Groups (see ember.engine.kv_groups): a model with no sliding-window layers, or with only such layers, has one
group of all layers, sized as before: num_blocks if given, else as many blocks as kv_cache_bytes holds (an
all-windowed model keeps every block in it, as the engine always did). A model mixing both kinds (gemma3: 5
local layers per global one) has a global group 0 and a windowed group 1. A block of a group costs its layers'
bytes only (gemma3-270m: 3 global layers vs 15 windowed, so a windowed block costs 5x a global one).

Sizing rule for a mixed model. The windowed group gets enough blocks that max_num_seqs sequences can run at
once without the windowed pool running dry:
    window_blocks = max_num_seqs * (ceil((window - 1) / block_size) + 1)      each one's window, plus the
                  + ceil(max_num_batched_tokens / block_size) + max_num_seqs   step's new tokens (a block of
                                                                               rounding per sequence)
(a sequence computing positions [q, q + n) holds blocks for (q - window, q + n): at most
ceil((window - 1) / block_size) + 1 + ceil(n / block_size), and the n of one step add up to at most
max_num_batched_tokens), capped at max_num_seqs sequences of max_model_len. It never gets more blocks than
the global group: every position it holds is held by the global group too. The global group gets the rest of
kv_cache_bytes; if that would leave it fewer blocks than the windowed one, both get the same count (all of
the budget, split evenly by block count, as one group would). With num_blocks given, it is the global group's
count (its meaning for a one-group model) and the windowed group is sized by the rule, capped at num_blocks.
window_num_blocks, if given, overrides the rule (tests use it to put the windowed pool under pressure).

Pure arithmetic, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ember.engine.kv_groups import window_blocks_to_progress

# Bytes per stored value: float16/bfloat16 2; q8_0 one int8 plus a float16 scale per 32 values.
BYTES_PER_VALUE = {"float16": 2.0, "bfloat16": 2.0, "q8_0": 1.0 + 2.0 / 32}


def bytes_per_block(n_layer: int, n_head_kv: int, head_dim: int, value_dim: int, block_size: int,
                    dtype: str = "float16") -> int:
    """Bytes one block costs across n_layer layers (K and V)."""
    return int(n_layer * block_size * n_head_kv * (head_dim + value_dim) * BYTES_PER_VALUE[dtype])


@dataclass(frozen=True)
class KVPools:
    """The engine's KV groups: each layer's group, each group's block count, and the windowed group's window
    (None when there is one group)."""

    layer_groups: tuple[int, ...]
    num_blocks: tuple[int, ...]
    window: Optional[int] = None

    @property
    def window_num_blocks(self) -> Optional[int]:
        return self.num_blocks[1] if len(self.num_blocks) > 1 else None


def window_pool_blocks(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                       max_model_len: int) -> int:
    """The sizing rule's windowed block count (module docstring), before the cap at the global group."""
    per_seq = window_blocks_to_progress(window, block_size)
    chunk = -(-max_num_batched_tokens // block_size) + max_num_seqs
    return min(max_num_seqs * per_seq + chunk, max_num_seqs * -(-max_model_len // block_size))


def plan_kv_pools(
    layer_windows: Sequence[int],
    n_head_kv: int,
    head_dim: int,
    value_dim: int,
    *,
    block_size: int,
    dtype: str,
    kv_cache_bytes: int,
    num_blocks: Optional[int],
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    window_num_blocks: Optional[int] = None,
    window_group: bool = True,
) -> KVPools:
    """Groups and pool sizes for a model whose layer i attends to the last layer_windows[i] positions (0: all).
    window_group False: one group even for a mixed model (windowed layers keep every block and mask)."""
    n_layer = len(layer_windows)
    windows = {w for w in layer_windows if w}
    if len(windows) > 1:
        raise ValueError(f"layers with different sliding windows ({sorted(windows)}) are not supported")

    def per_block(layers: int) -> int:
        return max(1, bytes_per_block(layers, n_head_kv, head_dim, value_dim, block_size, dtype))

    n_windowed = sum(1 for w in layer_windows if w)
    if n_windowed in (0, n_layer) or not window_group:
        blocks = num_blocks if num_blocks is not None else max(1, kv_cache_bytes // per_block(n_layer))
        return KVPools((0,) * n_layer, (blocks,))
    window = windows.pop()
    global_bytes, window_bytes = per_block(n_layer - n_windowed), per_block(n_windowed)
    want = window_num_blocks
    if want is None:
        want = window_pool_blocks(window, block_size, max_num_seqs, max_num_batched_tokens, max_model_len)
    if num_blocks is not None:
        n_global = num_blocks
        n_window = want if window_num_blocks is not None else min(want, num_blocks)
    else:
        n_global = (kv_cache_bytes - want * window_bytes) // global_bytes
        n_window = want
        if n_global < want and window_num_blocks is None:
            n_global = n_window = kv_cache_bytes // (global_bytes + window_bytes)
    layer_groups = tuple(1 if w else 0 for w in layer_windows)
    return KVPools(layer_groups, (max(1, n_global), max(1, n_window)), window)
