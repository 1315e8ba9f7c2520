"""Vectorized, bit-exact dequantization of GGML tensors to float32.

Every block format Ember decodes itself is described by a `Codec`: integer codes `q` in element order plus
per-group float32 `scale` and optional `bias`, such that

    w = (q - offset) * scale + bias          q: [blocks, groups, group_size], scale/bias: [blocks, groups]

Why this is bit-exact against ggml (ggml-quants.c, dequantize_row_*) and gguf-py: in every format the product
(q - offset) * scale is exact in float32 (an fp16 mantissa has 11 bits; a 4/6/8-bit sub-scale makes at most
19 bits; the code adds at most 6 more) except Q6_K, where 19 + 6 = 25 bits may round - and there ggml rounds
that same product (d*sc)*q once, as we do. ggml's scale products d*sc and dmin*m are exact too. So the only
other rounding anywhere is the final `+ bias`, which ggml and gguf-py perform once on the same operands;
operation order and FMA contraction therefore cannot change a single bit.

The same codecs feed ember.quant.repack (int4 / int8 group decompositions), so one unpacking per format.

Block layouts (byte offsets within a block; all multi-byte fields little-endian; fp16 = IEEE half):

| type | bytes | layout                                                      | element e of the block               |
|------|-------|-------------------------------------------------------------|--------------------------------------|
| Q4_0 |  18   | d@0 fp16, qs@2 [16]                                         | e<16: qs[e]&15, else qs[e-16]>>4     |
| Q4_1 |  20   | d@0, m@2 fp16, qs@4 [16]                                    | as Q4_0                              |
| Q5_0 |  22   | d@0, qh@2 u32, qs@6 [16]                                    | Q4_0 nibble + 16 * bit e of qh       |
| Q5_1 |  24   | d@0, m@2, qh@4 u32, qs@8 [16]                               | as Q5_0                              |
| Q8_0 |  34   | d@0, qs@2 int8 [32]                                         | qs[e]                                |
| Q2_K |  84   | sc@0 [16] (lo nibble scale, hi min), qs@16 [64], d@80,      | e=128h+32j+l: qs[32h+l]>>2j & 3;     |
|      |       | dmin@82                                                     | sub-block e//16                      |
| Q3_K | 110   | hmask@0 [32], qs@32 [64], sc@96 [12] (6-bit, biased 32),    | low 2 bits as Q2_K, bit 2 =          |
|      |       | d@108                                                       | hmask[l]>>(4h+j) & 1; code - 4       |
| Q4_K | 144   | d@0, dmin@2, sc@4 [12] (8 x 6-bit scale, 8 x 6-bit min),    | e=64c+32k+l: qs[32c+l] nibble k;     |
|      |       | qs@16 [128]                                                 | sub-block e//32 = 2c+k               |
| Q5_K | 176   | d@0, dmin@2, sc@4 [12], qh@16 [32], qs@48 [128]             | Q4_K nibble + 16 * (qh[l]>>(e//32)&1)|
| Q6_K | 210   | ql@0 [128], qh@128 [64], sc@192 int8 [16], d@208            | e=128h+32j+l: nibble j//2 of         |
|      |       |                                                             | ql[64h+32(j%2)+l], high 2 bits       |
|      |       |                                                             | qh[32h+l]>>2j & 3; code - 32; e//16  |

Sources: the block structs of ggml/src/ggml-common.h, dequantize_row_* in ggml/src/ggml-quants.c, and gguf-py's
gguf/quants.py (the reference the tests compare against); the vectorized code here is Ember's own.

Memory: a tensor is decoded in chunks of ~256K weights (1 MiB of float32, about L2-sized) straight into the
output, so a tensor never costs more than its one float32 copy plus a small scratch.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.errors import GGUFError, UnsupportedError
from ember.quant.formats import QuantFormat, format_of

# Weights decoded per chunk: big enough that per-op Python/dispatch overhead is small, small enough that the
# chunk's scratch and output stay in a 1-2 MiB L2.
CHUNK_WEIGHTS = 1 << 18
# Chunks per scale-unpacking pass: scales cost 4-8 bytes per 16-32 weights, so this stays a few MiB.
PARAM_CHUNKS = 16


class Codec(NamedTuple):
    """How to decode one block format: w = (codes - offset) * scale + bias, group-wise.

    `codes(blocks, scratch)` returns the integer codes of a chunk of blocks in element order as
    [m, groups, group_size] (uint8 written into `scratch`, or for Q8_0 an int8 view of the blocks - never
    written). `params(blocks)` returns float32 (scale, bias) of shape [m, groups]; bias None means 0.
    """

    groups: int
    offset: int
    codes: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


# Speed note: torch runs an elementwise op fast only when it can fuse it into one long contiguous loop; on
# the interleaved block layouts (runs of 16 or 32 bytes) or with broadcast shifts it is 5-10x slower. So the
# codes are built as whole-chunk planes (one shift/mask per plane over contiguous bytes) and interleaved into
# element order with a single torch.stack, which copies whole runs.

_U8 = torch.uint8


def _half(b: torch.Tensor, off: int) -> torch.Tensor:
    """fp16 field at byte `off` of each block -> float32 [m, 1]. Block sizes are all even, so it is aligned."""
    return b[:, off:off + 2].view(torch.float16).float()


def _planes(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[m, ..., n] bytes -> [m, ..., len(shifts), n]: plane k holds (x >> shifts[k]) & mask."""
    x = x.contiguous()
    out = torch.stack([x if s == 0 else x >> s for s in shifts], dim=-2)
    return out.bitwise_and_(mask)


def _nibbles_into(b: torch.Tensor, off: int, n: int, run: int, q: torch.Tensor) -> torch.Tensor:
    """Bytes [off, off+n) of each block, in runs of `run` bytes: run r's low nibbles, then its high nibbles
    -> q viewed [m, n/run, 2, run]. The nibble ops run over whole blocks (a little waste, but contiguous)."""
    lo, hi = b & 15, b >> 4
    m = b.shape[0]
    shape = (m, n // run, run)
    qv = q.view(m, n // run, 2, run)
    torch.stack((lo[:, off:off + n].view(shape), hi[:, off:off + n].view(shape)), dim=2, out=qv)
    return qv


def _no_bias_d(b: torch.Tensor) -> tuple[torch.Tensor, None]:
    return _half(b, 0), None


def _d_and_m(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _half(b, 0), _half(b, 2)


def _q4_codes(off: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return _nibbles_into(b, off, 16, 16, q).view(-1, 1, 32)
    return codes


def _q5_codes(qh_off: int, qs_off: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        _nibbles_into(b, qs_off, 16, 16, q)
        # qh is a little-endian u32 whose bit k is element k's bit 4: byte k//8, bit k%8, which is exactly
        # numpy's little-bit-order unpacking (one call; torch has no such op).
        bits = np.unpackbits(b[:, qh_off:qh_off + 4].numpy(), axis=1, bitorder="little")
        qv = q.view(-1, 32)
        qv.bitwise_or_(torch.from_numpy(bits).bitwise_left_shift_(4))
        return qv.view(-1, 1, 32)
    return codes


def _q8_0_codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].view(torch.int8).view(-1, 1, 32)


def _two_bit_codes(b: torch.Tensor, off: int, q: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: 64 bytes at `off` -> q [m, 2, 4, 32]; element 128h + 32j + l is
    (qs[32h + l] >> 2j) & 3."""
    qv = q.view(-1, 2, 4, 32)
    qv.copy_(_planes(b[:, off:off + 64].reshape(-1, 2, 32), (0, 2, 4, 6), 3))
    return qv


def _q2_k_codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _two_bit_codes(b, 16, q).view(-1, 16, 16)


def _q2_k_params(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc = b[:, 0:16]
    return _half(b, 80) * (sc & 15), -(_half(b, 82) * (sc >> 4))


def _q3_k_codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    ql = _two_bit_codes(b, 32, q).view(-1, 8, 32)
    # hmask bit (4h + j) of byte l is bit 2 of element 32 * (4h + j) + l; ggml's "subtract 4 unless the
    # bit is set" is then code - 4 with code = low | bit << 2.
    ql.bitwise_or_(_planes(b[:, 0:32], tuple(range(8)), 1).bitwise_left_shift_(2))
    return q.view(-1, 16, 16)


def _q3_k_params(b: torch.Tensor) -> tuple[torch.Tensor, None]:
    # 16 6-bit scales biased by 32. Scale k: low 4 bits from byte k % 8 (low nibble for k < 8, else high);
    # high 2 bits are bits 2i, 2i+1 of byte 8 + k % 4 where i = k // 4.
    s = b[:, 96:108]
    lo = torch.cat((s[:, 0:8] & 15, s[:, 0:8] >> 4), dim=1)
    hi = _planes(s[:, 8:12], (0, 2, 4, 6), 3).reshape(-1, 16)
    sc = (lo | (hi << 4)).view(torch.int8) - 32
    return _half(b, 108) * sc, None


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte field -> (scale, min), 8 x 6 bits each (ggml's get_scale_min_k4):
    j < 4: scale = s[j] & 63, min = s[j+4] & 63;
    j >= 4: scale = s[j+4] & 15 | (s[j-4] >> 6) << 4, min = s[j+4] >> 4 | (s[j] >> 6) << 4."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((s0 & 63, (s2 & 15) | ((s0 >> 6) << 4)), dim=1)
    mn = torch.cat((s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)), dim=1)
    return sc, mn


def _k4_params(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc, mn = _k4_scale_min(b[:, 4:16])
    return _half(b, 0) * sc, -(_half(b, 2) * mn)


def _q4_k_codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # 64-weight chunk c: 32 bytes; low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
    return _nibbles_into(b, 16, 128, 32, q).view(-1, 8, 32)


def _q5_k_codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    qv = _nibbles_into(b, 48, 128, 32, q).view(-1, 8, 32)
    # bit i of qh[l] is bit 4 of element 32i + l.
    qv.bitwise_or_(_planes(b[:, 16:48], tuple(range(8)), 1).bitwise_left_shift_(4))
    return qv


def _q6_k_codes(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # element 128h + 64k + i: nibble k of ql[64h + i]; its bits 4-5: (qh[32h + l] >> 2j) & 3 where
    # 128h + 32j + l is the same element.
    _nibbles_into(b, 0, 128, 64, q)
    q.view(-1, 2, 4, 32).bitwise_or_(
        _planes(b[:, 128:192].reshape(-1, 2, 32), (0, 2, 4, 6), 3).bitwise_left_shift_(4))
    return q.view(-1, 16, 16)


def _q6_k_params(b: torch.Tensor) -> tuple[torch.Tensor, None]:
    return _half(b, 208) * b[:, 192:208].view(torch.int8), None


CODECS: dict[T, Codec] = {
    T.Q4_0: Codec(1, 8, _q4_codes(2), _no_bias_d),
    T.Q4_1: Codec(1, 0, _q4_codes(4), _d_and_m),
    T.Q5_0: Codec(1, 16, _q5_codes(2, 6), _no_bias_d),
    T.Q5_1: Codec(1, 0, _q5_codes(4, 8), _d_and_m),
    T.Q8_0: Codec(1, 0, _q8_0_codes, _no_bias_d),
    T.Q2_K: Codec(16, 0, _q2_k_codes, _q2_k_params),
    T.Q3_K: Codec(16, 4, _q3_k_codes, _q3_k_params),
    T.Q4_K: Codec(8, 0, _q4_k_codes, _k4_params),
    T.Q5_K: Codec(8, 0, _q5_k_codes, _k4_params),
    T.Q6_K: Codec(16, 32, _q6_k_codes, _q6_k_params),
}

# Plain element types: the bytes reinterpreted, then widened (exactly) to float32.
_PLAIN: dict[T, torch.dtype] = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}

FAST_TYPES: frozenset[T] = frozenset(CODECS) | frozenset(_PLAIN)


# -- raw bytes -> blocks ------------------------------------------------------------------------------------

def as_byte_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over `raw`'s bytes, sharing memory. Read-only arrays (np.memmap of a model file)
    are wrapped without copying; Ember only ever reads through the result - callers must too."""
    if isinstance(raw, torch.Tensor):
        return raw.contiguous().view(-1).view(_U8)
    arr = np.asarray(raw)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    arr = arr.reshape(-1).view(np.uint8)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    # torch warns that writing would be undefined; we never write. (catch_warnings is process-global state, so
    # two threads wrapping read-only arrays at the same instant could drop an unrelated warning - harmless.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def blocks_of(raw: np.ndarray | torch.Tensor, fmt: QuantFormat, n_weights: int) -> torch.Tensor:
    """raw bytes -> uint8 [n_blocks, type_size], checking that the byte count matches the weight count."""
    data = as_byte_tensor(raw)
    n_blocks = n_weights // fmt.block_size
    if data.numel() != n_blocks * fmt.type_size:
        raise GGUFError(f"{fmt.name} tensor of {n_weights} weights needs {n_blocks * fmt.type_size} bytes, "
                        f"got {data.numel()}")
    return data.view(n_blocks, fmt.type_size)


def check_shape(fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, int]:
    """ggml shape -> (rows, row_len); the row length must be whole blocks."""
    if not shape or any(int(s) <= 0 for s in shape):
        raise GGUFError(f"bad tensor shape {tuple(shape)}")
    row_len = int(shape[0])
    fmt.row_bytes(row_len)  # raises if rows cannot be blocked
    return math.prod(int(s) for s in shape) // row_len, row_len


def chunk_blocks(fmt: QuantFormat) -> int:
    return max(1, CHUNK_WEIGHTS // fmt.block_size)


# -- public API ---------------------------------------------------------------------------------------------

def dequantize_rows(raw: np.ndarray | torch.Tensor, qtype: T, row_len: int, start: int, stop: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of a tensor whose rows are `row_len` weights, as float32 [stop - start, row_len].

    `raw` holds the bytes of the whole tensor (or of any whole number of rows, counted from row 0 of
    `raw`), 1-D or [rows, row_bytes]; it is only read. `out`, if given, must be a contiguous float32 tensor
    of stop - start rows and receives the result (lets a loader fill a preallocated buffer)."""
    fmt = format_of(qtype)
    row_bytes = fmt.row_bytes(row_len)
    data = as_byte_tensor(raw)
    if data.numel() % row_bytes:
        raise GGUFError(f"{fmt.name} tensor bytes ({data.numel()}) are not whole rows of {row_bytes}")
    n_rows = data.numel() // row_bytes
    if not 0 <= start <= stop <= n_rows:
        raise ValueError(f"rows [{start}, {stop}) out of range for a tensor of {n_rows} rows")
    rows = data[start * row_bytes:stop * row_bytes]
    if out is None:
        out = torch.empty(stop - start, row_len, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != (stop - start) * row_len:
        raise ValueError("out must be a contiguous float32 tensor of (stop - start) * row_len elements")
    out = out.view(stop - start, row_len)
    if start == stop:
        return out
    qt = fmt.qtype
    if qt in _PLAIN:
        out.view(-1).copy_(rows.view(_PLAIN[qt]))
    elif qt in CODECS:
        _decode_into(rows.view(-1, fmt.type_size), CODECS[qt], fmt, out.view(-1, fmt.block_size))
    else:
        _fallback_into(rows.view(stop - start, row_bytes), qt, fmt, out)
    return out


def _decode_into(blocks: torch.Tensor, codec: Codec, fmt: QuantFormat, out: torch.Tensor) -> None:
    """out [n_blocks, block_size] <- blocks [n_blocks, type_size]. Scales are unpacked for a whole super-chunk
    at once (they are many tiny ops; per small chunk their fixed cost would dominate), codes per chunk."""
    n = blocks.shape[0]
    step = chunk_blocks(fmt)
    super_step = step * PARAM_CHUNKS
    scratch = torch.empty(min(step, n), fmt.block_size, dtype=_U8)
    for S in range(0, n, super_step):
        sb = blocks[S:S + super_step]
        scale, bias = codec.params(sb)
        scale = scale.unsqueeze(-1)
        bias = None if bias is None else bias.unsqueeze(-1)
        for s in range(0, sb.shape[0], step):
            e = min(s + step, sb.shape[0])
            q = codec.codes(sb[s:e], scratch[:e - s])
            if codec.offset:
                q = q.view(torch.int8).sub_(codec.offset)  # codes < 128: the signed view is the same number
            o = out[S + s:S + e].view(q.shape)
            torch.mul(q, scale[s:e], out=o)  # exact: see the module docstring
            if bias is not None:
                o.add_(bias[s:e])  # the single rounding, on the same operands as ggml


def _fallback_into(rows: torch.Tensor, qt: T, fmt: QuantFormat, out: torch.Tensor) -> None:
    """Types without a codec here (IQ*, TQ*, MXFP4, ...) go through gguf-py's numpy code, a chunk of rows
    at a time so its float temporaries stay small."""
    from gguf import quants

    step = max(1, CHUNK_WEIGHTS // out.shape[1])
    for s in range(0, rows.shape[0], step):
        chunk = rows[s:s + step].numpy()
        try:
            vals = quants.dequantize(chunk, qt)
        except NotImplementedError:
            raise UnsupportedError(f"tensor type {fmt.name} cannot be dequantized") from None
        out[s:s + step].copy_(torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32)))


def dequantize(raw: np.ndarray | torch.Tensor, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """A whole tensor as float32, shaped in numpy/torch order (reversed ggml `shape`; shape[0] is the row
    length). Bit-exact against ggml / gguf-py. UnsupportedError for a type that cannot be decoded."""
    fmt = format_of(qtype)
    rows, row_len = check_shape(fmt, tuple(shape))
    blocks_of(raw, fmt, rows * row_len)  # validates the byte count against the shape
    return dequantize_rows(raw, fmt.qtype, row_len, 0, rows).view(tuple(int(s) for s in reversed(shape)))
