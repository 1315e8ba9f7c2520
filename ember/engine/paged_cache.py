"""Paged KV cache: per-layer pools of fixed-size blocks, and attention over a flat batch of many sequences.

Layout: per layer, K [num_blocks, block_size, n_head_kv, head_dim] and V [..., value_dim]. A sequence's
position p lives at slot `block_table[p // block_size] * block_size + p % block_size` of the flattened pool;
the block tables come from ember.engine.block_manager, this module only follows them.

KV groups (ember.engine.kv_groups): each layer belongs to one group, and a group's layers share its block ids,
its pool size and the sequences' tables of that group (gemma3: global layers in group 0, sliding-window layers
in group 1 with fewer blocks). A batch has one BatchLayout per group, built from that group's tables; a layer
attends through its group's layout.

Protocol: before each forward pass the runner calls `set_batches([BatchLayout.build(...) per group])`
(`set_batch` for one group); the model then calls
`attend(layer, q, k, v, positions, scale, window)` once per layer with the FLAT batch of tokens (every
scheduled sequence's tokens, concatenated in schedule order). attend writes the new K/V into their slots, then
  - with the native kernels (float16/bfloat16 storage): every decode row and every row of a chunk shorter
    than native.row_chunk() (every chunk, with exact prefill) in one call of ember/kernels/csrc/
    paged_attention.cpp, which reads the pool through the block tables and computes each row independently
    (batch-invariant); longer chunks as below;
  - otherwise, prefill chunks (> 1 token): one SDPA per sequence over its gathered keys with a causal
    (+ window) mask; single-token entries (decodes): batched SDPA, each row's keys gathered through its block
    table; rows are grouped by key count (exact mode, the default) or padded to the longest row and masked.
The layout (slots, gather indices, masks) is built once per step and shared by all layers; per-window pieces
are built lazily on first use, since gemma3 mixes windowed and global layers.

Precision: every key attended is read back from storage, the pass's own keys included, so the result does not
depend on which pass computed a key. (ember.model.kv_cache's ring buffers - windowed layers when the window is
shorter than n_ctx - attend to the current chunk's keys before rounding, so there the two caches differ by
storage rounding.)

Sliding window: a query at p sees keys in (p - window, p], and attend reads only those keys. A windowed
group's tables hold NULL_BLOCK for blocks wholly before the window (released to that group's pool); those
positions are never read (they are outside every window by the block manager's invariant), and packing
substitutes block 0 for them so that indexing stays in range.

Storage dtypes: float16 (default, as llama.cpp), bfloat16, or q8_0 (int8 with one float16 scale per 32 values,
llama.cpp's Q8_0 block, about half the bytes of float16). Attention math runs in float32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ember.engine import kv_budget
from ember.engine.block_manager import NULL_BLOCK
from ember.kernels import native as native_kernels
from ember.errors import InvalidParameterError

KV_DTYPES = ("float16", "bfloat16", "q8_0")
Q8_GROUP = 32


class _Pool:
    """One layer's K (or V) storage: [num_blocks, block_size, n_head, dim] in the chosen format."""

    def __init__(self, num_blocks: int, block_size: int, n_head: int, dim: int, kind: str):
        self.kind = kind
        shape = (num_blocks, block_size, n_head, dim)
        if kind == "q8_0":
            if dim % Q8_GROUP:
                raise InvalidParameterError(f"q8_0 KV cache needs head sizes divisible by {Q8_GROUP}, got {dim}")
            self.data = torch.zeros(shape, dtype=torch.int8)
            self.scale: torch.Tensor | None = torch.zeros((*shape[:3], dim // Q8_GROUP), dtype=torch.float16)
        else:
            self.data = torch.zeros(shape, dtype=getattr(torch, kind))
            self.scale = None
        # Flat views (no copy): slot-indexed [num_blocks * block_size, n_head, ...].
        self.flat = self.data.view(-1, n_head, dim)
        self.flat_scale = None if self.scale is None else self.scale.view(-1, n_head, dim // Q8_GROUP)

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (0 if self.scale is None else self.scale.numel() * self.scale.element_size())

    def write(self, slots: torch.Tensor, x: torch.Tensor, run: slice | None = None) -> None:
        """x [T, n_head, dim] float -> slots [T]; `run`: the same slots as one consecutive range, when they
        are (one converting copy into a view instead of a conversion plus an indexed store: ~2 vs 5 us per
        decode token and layer, same values)."""
        if self.flat_scale is None:
            if run is not None:
                self.flat[run].copy_(x)
            else:
                self.flat[slots] = x.to(self.flat.dtype)
            return
        g = x.float().unflatten(-1, (-1, Q8_GROUP))  # [T, H, dim/32, 32]
        # llama.cpp quantize_row_q8_0: d = amax / 127, q = round(x / d); d is stored as float16, and q is
        # computed from the float32 d (its rounding error is below the int8 step).
        d = g.abs().amax(-1) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(g * inv[..., None]).clamp_(-127, 127).to(torch.int8)
        self.flat[slots] = q.flatten(-2)
        self.flat_scale[slots] = d.to(torch.float16)

    def read(self, index: torch.Tensor | tuple[slice, ...]) -> torch.Tensor:
        """Slots `index` (any shape S; or runs of consecutive slots, read without a gather) -> float32
        [*S, n_head, dim] ([sum of run lengths, n_head, dim] for runs)."""
        if isinstance(index, tuple):
            if self.flat_scale is None:
                if len(index) == 1:
                    return self.flat[index[0]].float()
                out = torch.empty((sum(r.stop - r.start for r in index), *self.flat.shape[1:]), dtype=torch.float32)
                at = 0
                for r in index:
                    out[at : at + r.stop - r.start].copy_(self.flat[r])
                    at += r.stop - r.start
                return out
            index = torch.cat([torch.arange(r.start, r.stop) for r in index])
        if self.flat_scale is None:
            return self.flat[index].float()
        q = self.flat[index].float().unflatten(-1, (-1, Q8_GROUP))
        return (q * self.flat_scale[index].float()[..., None]).flatten(-2)

    def read_heads(self, index: torch.Tensor | tuple[slice, ...]) -> torch.Tensor:
        """What read() returns, head-major and contiguous: 1-D slots or runs -> [n_head, L, dim], slots
        [b, L] -> [b, n_head, L, dim], float32. The layout attention wants: CPU SDPA over keys contiguous per
        head is ~30% faster than over the [L, n_head, dim] order the pool stores (1024 keys: 137 vs 191 us
        per layer, conversion included), with bit-identical results (SDPA does not depend on the strides)."""
        if self.flat_scale is not None:
            return self.read(index).movedim(-2, -3).contiguous()
        if isinstance(index, tuple):
            if len(index) == 1:
                return self.flat[index[0]].transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
            n_head, dim = self.flat.shape[1:]
            out = torch.empty((n_head, sum(r.stop - r.start for r in index), dim), dtype=torch.float32)
            at = 0
            for r in index:
                out[:, at : at + r.stop - r.start].copy_(self.flat[r].transpose(0, 1))
                at += r.stop - r.start
            return out
        return self.flat[index].movedim(-2, -3).to(torch.float32, memory_format=torch.contiguous_format)

    def copy_block(self, src: int, dst: int) -> None:
        self.data[dst].copy_(self.data[src])
        if self.scale is not None:
            self.scale[dst].copy_(self.scale[src])


MAX_RUNS = 8  # a key list of more consecutive runs than this is gathered instead


def _as_range(slots: torch.Tensor) -> tuple[slice, ...] | None:
    """slots (1-D) as the few runs of consecutive slots they consist of (blocks handed out in order, plus a
    prefix-cache hit's own run, make this the common case): the pool then copies views instead of gathering."""
    n = slots.shape[0]
    if n == 0:
        return None
    breaks = (torch.diff(slots) != 1).nonzero().flatten().tolist()
    if len(breaks) >= MAX_RUNS:
        return None
    edges = [0] + [b + 1 for b in breaks] + [n]
    return tuple(slice(int(slots[a]), int(slots[a]) + (b - a)) for a, b in zip(edges, edges[1:]))


@dataclass
class _Prefill:
    """One multi-token entry: flat token rows [row0, row1) are positions [start, end) of one sequence."""

    row0: int
    row1: int
    start: int
    table: torch.Tensor  # [n_blocks] long, NULL entries replaced by 0
    # window -> (slots, mask, slots as runs of consecutive slots, or None)
    views: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[slice, ...] | None]] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.row1 - self.row0


# (flat rows [b], key slots [b, L], mask or None, one row's runs or None, (offset, length) within group 0)
DecodeGroup = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "tuple[slice, ...] | None",
                    "tuple[int, int] | None"]


@dataclass
class BatchLayout:
    """Where each token of a flat batch goes and what it attends to; built by the runner once per step."""

    block_size: int
    slots: torch.Tensor  # [T] long: cache slot each token's K/V is written to
    slot_run: slice | None  # the same slots as one consecutive range, when they are
    prefills: list[_Prefill]
    decode_rows: torch.Tensor  # [B] long: flat rows of single-token entries
    decode_lens: torch.Tensor  # [B] long: context length (keys [0, len)) of each, i.e. its position + 1
    decode_tables: torch.Tensor  # [B, max_blocks] long, NULL entries and padding replaced by 0
    exact: bool = True  # decode groups without padding (see PagedKVCache)
    _decode_views: dict[int, list[DecodeGroup]] = field(default_factory=dict)
    _rows: "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None" = None  # see row_attention

    @classmethod
    def build(
        cls, block_size: int, entries: Sequence[tuple[Sequence[int], int, int]], exact: bool = True
    ) -> "BatchLayout":
        """entries: per scheduled sequence, in flat order, (block_table, start position, number of tokens).
        Its tokens occupy the next num_tokens flat rows at positions [start, start + num_tokens)."""
        bs = block_size
        slots: list[int] = []
        prefills: list[_Prefill] = []
        dec_rows: list[int] = []
        dec_lens: list[int] = []
        dec_tables: list[list[int]] = []
        row = 0
        for table, start, n in entries:
            end = start + n
            if n < 1 or len(table) * bs < end:
                raise ValueError(f"entry of {n} tokens at {start} does not fit its {len(table)} blocks")
            clean = [b if b != NULL_BLOCK else 0 for b in table]
            for p in range(start, end):
                b = table[p // bs]
                if b == NULL_BLOCK:
                    raise ValueError(f"position {p} is to be written into a released block")
                slots.append(b * bs + p % bs)
            if n == 1:
                dec_rows.append(row)
                dec_lens.append(end)
                dec_tables.append(clean)
            else:
                prefills.append(_Prefill(row, row + n, start, torch.tensor(clean, dtype=torch.long)))
            row += n
        width = max((len(t) for t in dec_tables), default=0)
        tables = torch.zeros((len(dec_tables), width), dtype=torch.long)
        for i, t in enumerate(dec_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        consecutive = bool(slots) and slots[-1] - slots[0] == len(slots) - 1 and all(
            b == a + 1 for a, b in zip(slots, slots[1:]))
        return cls(
            block_size=bs,
            slots=torch.tensor(slots, dtype=torch.long),
            slot_run=slice(slots[0], slots[-1] + 1) if consecutive else None,
            prefills=prefills,
            decode_rows=torch.tensor(dec_rows, dtype=torch.long),
            decode_lens=torch.tensor(dec_lens, dtype=torch.long),
            decode_tables=tables,
            exact=exact,
        )

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]

    def decode_groups(self, window: int) -> list[DecodeGroup]:
        """Decode rows in attention groups, longest key span first: (flat rows [b], key slots [b, L], key mask
        [b, 1, 1, L] or None, the slots as runs of consecutive slots when the group is one row, else None,
        and `within`: (offset, length) when this one-row group's slots are slots[offset:offset + length] of
        the first group, itself one unmasked row, else None).

        `within` is what a speculative verification produces: one sequence's consecutive positions, each its
        own group. attend() then reads the longest row's keys once and slices them for the others (same
        values, so the same SDPA result); finding the slices here costs once per step instead of per layer.

        Row i attends to positions [lo_i, len_i), lo_i = len_i - window on windowed layers (a query at p sees
        (p - window, p]), else 0. Padded mode: one group, rows padded to the longest span and masked. Exact
        mode: one group per distinct span, no padding (see PagedKVCache for why)."""
        groups = self._decode_views.get(window)
        if groups is None:
            lens = self.decode_lens
            lo = (lens - window).clamp(min=0) if window else torch.zeros_like(lens)
            spans = lens - lo
            if not lens.numel():
                members = []
            elif self.exact:
                members = [(spans == s).nonzero().flatten() for s in torch.unique(spans).tolist()]
            else:
                members = [torch.arange(lens.shape[0])]
            groups = []
            bs = self.block_size
            for idx in members:
                g_lens, g_lo = lens[idx], lo[idx]
                span = int(spans[idx].max())
                pos = g_lo[:, None] + torch.arange(span)[None, :]  # [b, L]
                valid = pos < g_lens[:, None]
                pos = torch.minimum(pos, g_lens[:, None] - 1)  # padding reads a real slot of its row, masked
                slots = self.decode_tables[idx].gather(1, pos // bs) * bs + pos % bs
                mask = None if bool(valid.all()) else valid[:, None, None, :]
                span = _as_range(slots[0]) if slots.shape[0] == 1 and mask is None else None
                groups.append((self.decode_rows[idx], slots, mask, span, None))
            groups.sort(key=lambda g: -g[1].shape[1])
            if len(groups) > 1 and groups[0][1].shape[0] == 1 and groups[0][2] is None:
                big = groups[0][1][0].tolist()
                where = {slot: i for i, slot in enumerate(big)}
                for i, (rows, slots, mask, span, _) in enumerate(groups[1:], 1):
                    if slots.shape[0] != 1 or mask is not None:
                        continue
                    mine = slots[0].tolist()
                    off = where.get(mine[0])
                    if off is not None and big[off : off + len(mine)] == mine:
                        groups[i] = (rows, slots, mask, span, (off, len(mine)))
            self._decode_views[window] = groups
        return groups

    def row_attention(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat rows, block tables [R, width], key lengths [R]) of the rows the native kernel attends: every
        decode row, then every row of a chunk shorter than native.row_chunk() (row at position p: keys [.., p]).
        Built once per step."""
        if self._rows is None:
            short = [p for p in self.prefills if p.row1 - p.row0 < native_kernels.row_chunk()]
            rows = [self.decode_rows] + [torch.arange(p.row0, p.row1) for p in short]
            lens = [self.decode_lens] + [torch.arange(p.start + 1, p.end + 1) for p in short]
            width = max([self.decode_tables.shape[1]] + [p.table.shape[0] for p in short])
            tables = torch.zeros(sum(r.numel() for r in rows), width, dtype=torch.long)
            tables[: self.decode_tables.shape[0], : self.decode_tables.shape[1]] = self.decode_tables
            at = self.decode_tables.shape[0]
            for p in short:
                tables[at : at + p.row1 - p.row0, : p.table.shape[0]] = p.table
                at += p.row1 - p.row0
            self._rows = (torch.cat(rows), tables, torch.cat(lens))
        return self._rows

    def prefill_view(self, p: _Prefill, window: int) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, ...] | None]:
        """(slots [L], mask [n, L]) of one chunk: keys at positions [lo, end) where lo skips what no query of
        the chunk can see on a windowed layer."""
        view = p.views.get(window)
        if view is None:
            lo = max(0, p.start - window + 1) if window else 0
            key_pos = torch.arange(lo, p.end)
            q_pos = torch.arange(p.start, p.end)
            bs = self.block_size
            slots = p.table[key_pos // bs] * bs + key_pos % bs
            mask = key_pos[None, :] <= q_pos[:, None]
            if window:
                mask &= key_pos[None, :] > q_pos[:, None] - window
            view = p.views[window] = (slots, mask, _as_range(slots))
        return view


class PagedKVCache:
    """Block pools of every layer plus the layouts (one per KV group) of the batch being run.

    exact (default True): decode rows are grouped by key span and never padded. CPU SDPA sums in an order that
    depends on the key length, so padding a row to its neighbours' length (even fully masked) changes its
    output in the last bits; the model's bfloat16 logits then tie-break differently often enough that greedy
    text would depend on which requests share the batch. Unpadded groups make each row's attention bit-identical
    to running it alone (and to ember.model.kv_cache.KVCache). False: one padded SDPA for all decode rows
    (fewer calls when many sequences with different lengths decode together).
    """

    def __init__(
        self,
        n_layer: int,
        n_head_kv: int,
        head_dim: int,
        value_dim: int,
        num_blocks: int | Sequence[int],
        block_size: int,
        dtype: str = "float16",
        exact: bool = True,
        layer_groups: Sequence[int] | None = None,
    ):
        """num_blocks: one count, or one per KV group; layer_groups: each layer's group (default: all 0)."""
        if dtype not in KV_DTYPES:
            raise InvalidParameterError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        group_blocks = [num_blocks] if isinstance(num_blocks, int) else list(num_blocks)
        groups = [0] * n_layer if layer_groups is None else list(layer_groups)
        if len(groups) != n_layer or any(not 0 <= g < len(group_blocks) for g in groups):
            raise InvalidParameterError("every layer needs a KV group among the pools given")
        if min(group_blocks) < 1 or block_size < 1:
            raise InvalidParameterError("num_blocks and block_size must be positive")
        self.group_blocks = group_blocks
        self.num_blocks, self.block_size, self.dtype = group_blocks[0], block_size, dtype
        self.layer_groups = groups
        self.exact = exact
        self.k = [_Pool(group_blocks[g], block_size, n_head_kv, head_dim, dtype) for g in groups]
        self.v = [_Pool(group_blocks[g], block_size, n_head_kv, value_dim, dtype) for g in groups]
        self.layouts: list[BatchLayout | None] = [None] * len(group_blocks)

    @functools.cached_property
    def row_invariant(self) -> bool:
        """Whether decode rows are attended by the native kernel, whose result for a row depends on nothing but
        that row's query and keys (then a chunk split into decode rows computes what its tokens would compute
        in any other split)."""
        return all(_native_usable(kp, vp) for kp, vp in zip(self.k, self.v))

    @staticmethod
    def bytes_per_block(n_layer: int, n_head_kv: int, head_dim: int, value_dim: int, block_size: int,
                        dtype: str = "float16") -> int:
        """Bytes one block costs across n_layer layers (K and V), to size a pool from a memory budget."""
        return kv_budget.bytes_per_block(n_layer, n_head_kv, head_dim, value_dim, block_size, dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.k + self.v)

    @property
    def num_groups(self) -> int:
        return len(self.group_blocks)

    @property
    def layout(self) -> BatchLayout | None:
        """Group 0's layout of the batch being run."""
        return self.layouts[0]

    def set_batch(self, layout: BatchLayout) -> None:
        """Describe the flat batch of the next forward pass of a one-group cache (stays until replaced)."""
        self.set_batches([layout])

    def set_batches(self, layouts: Sequence[BatchLayout]) -> None:
        """The next pass's layout in every group: the same flat tokens, each group's block tables."""
        if len(layouts) != self.num_groups:
            raise ValueError(f"{len(layouts)} layouts for {self.num_groups} KV groups")
        if any(lay.block_size != self.block_size for lay in layouts):
            raise ValueError("layout built for another block size")
        if len({lay.num_tokens for lay in layouts}) != 1:
            raise ValueError("the groups' layouts describe different batches")
        self.layouts = list(layouts)

    def apply_copies(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Copy-on-write orders from the block managers: (group, src, dst), whole blocks src -> dst in every
        layer of that group, in order."""
        for group, src, dst in copies:
            for layer, g in enumerate(self.layer_groups):
                if g == group:
                    self.k[layer].copy_block(src, dst)
                    self.v[layer].copy_block(src, dst)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        """Store k/v [T, Hkv, d] of the flat batch and return attention output [T, H, value_dim] (float32).

        `positions` is implied by the layout (the runner built both from the same entries) and not reread."""
        lay = self.layouts[self.layer_groups[layer]]
        if lay is None or lay.num_tokens != q.shape[0]:
            raise RuntimeError("attend() without a batch layout matching the tokens (call set_batch first)")
        kp, vp = self.k[layer], self.v[layer]
        # Write first, then read everything back from the pool: a chunk's own keys then go through the same
        # storage rounding as the earlier ones, so splitting a prompt into chunks does not change the result.
        kp.write(lay.slots, k, lay.slot_run)
        vp.write(lay.slots, v, lay.slot_run)
        if self.row_invariant:  # decided once: every layer's pools have the same storage and head sizes
            return _attend_native(q, kp, vp, lay, scale, window)
        groups = lay.decode_groups(window)
        if not lay.prefills and len(groups) == 1:
            # every token is a decode of the same key span (single-stream decode): rows are 0..T-1 in order,
            # so skip the gather of q and the scatter into `out` (same SDPA call, same result)
            _, slots, mask, span, _ = groups[0]
            if span is not None:
                keys, values = kp.read_heads(span)[None], vp.read_heads(span)[None]
            else:
                keys, values = kp.read_heads(slots), vp.read_heads(slots)
            o = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
            return o[:, :, 0]
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32)

        # A speculative verification brings one sequence's consecutive positions as one-row groups whose key
        # slots are pieces of the longest one's (`within`, see decode_groups): read those keys once, slice.
        big: tuple[torch.Tensor, torch.Tensor] | None = None
        for i, (rows, slots, mask, span, within) in enumerate(groups):
            if within is not None and big is not None:
                off, n = within
                keys, values = big[0][:, :, off : off + n], big[1][:, :, off : off + n]
            elif span is not None:
                keys, values = kp.read_heads(span)[None], vp.read_heads(span)[None]
            else:
                keys, values = kp.read_heads(slots), vp.read_heads(slots)  # [b, Hkv, L, d]
            if i == 0 and len(groups) > 1:
                big = (keys, values)
            qd = q[rows].float().unsqueeze(2)  # [b, H, 1, d]
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
            out[rows] = o[:, :, 0]

        self._attend_prefills(out, q, kp, vp, lay, scale, window)
        return out

    @staticmethod
    def _attend_prefills(out: torch.Tensor, q: torch.Tensor, kp: _Pool, vp: _Pool, lay: BatchLayout, scale: float,
                         window: int, chunks: "Sequence[_Prefill] | None" = None) -> None:
        """Multi-token entries (all, or `chunks`): one causal (+ window) masked SDPA per chunk over its keys read
        back from the pool."""
        for p in lay.prefills if chunks is None else chunks:
            slots, mask, span = lay.prefill_view(p, window)
            index = span if span is not None else slots
            keys, values = kp.read_heads(index)[None], vp.read_heads(index)[None]  # [1, Hkv, L, d]
            qp = q[p.row0 : p.row1].float().transpose(0, 1)[None]  # [1, H, n, d]
            o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
            out[p.row0 : p.row1] = o[0].transpose(0, 1)


def _native_usable(kp: _Pool, vp: _Pool) -> bool:
    """Whether the native attention kernel serves these pools (not for q8_0 storage, head sizes it was not
    compiled for, or without native kernels)."""
    ext = native_kernels.extension()
    return kp.flat_scale is None and ext is not None and ext.paged_attention_supports(kp.flat.shape[-1],
                                                                                       vp.flat.shape[-1])


def _attend_native(q: torch.Tensor, kp: _Pool, vp: _Pool, lay: BatchLayout, scale: float, window: int
                   ) -> torch.Tensor:
    """Decode rows through ember/kernels/csrc/paged_attention.cpp (reads the pool through the block tables: no
    gather, one call for every decode row of the step; each row's result is independent of the others, so the
    exact mode's grouping is unnecessary), prefill chunks through SDPA as before."""
    ext = native_kernels.extension()
    if not lay.prefills:
        return ext.paged_attention(q.float().contiguous(), kp.flat, vp.flat, lay.decode_tables, lay.decode_lens,
                                   lay.block_size, window, scale)
    out = q.new_empty(q.shape[0], q.shape[1], vp.flat.shape[-1], dtype=torch.float32)
    rows, tables, lens = lay.row_attention()
    if rows.numel():
        out[rows] = ext.paged_attention(q[rows].float().contiguous(), kp.flat, vp.flat, tables, lens,
                                        lay.block_size, window, scale)
    long = [p for p in lay.prefills if p.row1 - p.row0 >= native_kernels.row_chunk()]
    if long:
        PagedKVCache._attend_prefills(out, q, kp, vp, lay, scale, window, long)
    return out
