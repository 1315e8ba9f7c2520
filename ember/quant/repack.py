"""Exact decompositions of GGML block formats into the integer-group layouts that fast kernels consume.

torch's CPU int4 kernel (torch._convert_weight_to_int4pack_for_cpu / _weight_int4pack_mm_for_cpu, group
size 32) computes each weight as

    w = (q - 8) * scale + zero        q in 0..15, one (scale, zero) per 32 consecutive weights of a row

so a GGML format maps onto it when its codes are 4-bit and its groups are 32 wide:

| type | ggml formula            | q      | scale      | zero                 | exact in float32 when            |
|------|-------------------------|--------|------------|----------------------|----------------------------------|
| Q4_0 | (q - 8) d               | q      | d          | 0                    | always                           |
| Q4_1 | q d + m                 | q      | d          | m + 8 d              | m + 8 d is a float32             |
| Q4_K | q (d sc) - dmin mn      | q      | d sc       | 8 d sc - dmin mn     | 8 d sc - dmin mn is a float32    |
| Q8_0 | q d  (int8 q)           | int8 q | d          | (int8 path)          | always                           |

Why the "exact when": (q - 8) * scale is exact (<= 21 significant bits), so the sum rounds only once and
equals ggml's single rounding whenever `zero` itself did not round. fp16 operands of similar magnitude -
what a quantizer produces - always satisfy it; tests/test_dequant.py checks it on real model tensors.

Wider codes split into two int4 planes, W = sum over planes of ((q_p - 8) * scale_p + zero_p), with u the
code made unsigned (Q8_0: u = q + 128), u = 16 hi + lo, and w = (u - off) * s + bias:

| plane | q                         | scale | zero                                  |
|-------|---------------------------|-------|---------------------------------------|
| hi    | u >> 4 (+ 8 for Q5 types) | 16 s  | 0                                     |
| lo    | u & 15                    | s     | (8 - off) s + bias; Q8_0: (136-off) s |

(zeros are kept small because the kernel stores them in bfloat16; see split_int4_planes)

For Q8_0 (off 128) and Q5_0 (off 16, hi is 0 or 1) both plane values are exact float32 and so is their sum.
Q5_1 (off 0, bias m) is exact when m + 8 d and m + lo d are float32s (the lo plane then rounds nothing), which,
as for Q4_1, holds whenever d and m are of comparable size. This lets an int4 kernel run 5- and 8-bit types at ~1 byte/weight.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.errors import UnsupportedError
from ember.quant.dequant import CODECS, blocks_of, check_shape, chunk_blocks
from ember.quant.formats import format_of

INT4_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})
INT8_TYPES = frozenset({T.Q8_0})
SPLIT_TYPES = frozenset({T.Q5_0, T.Q5_1, T.Q8_0}) | INT4_TYPES

GROUP = 32  # weights per (scale, zero) group in every layout here

Int4Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _require(qtype: T, allowed: frozenset[T], what: str) -> T:
    qt = format_of(qtype).qtype
    if qt not in allowed:
        names = ", ".join(sorted(t.name for t in allowed))
        raise UnsupportedError(f"{what} is defined for {names}, not {qt.name}")
    return qt


def codes_and_params(raw: np.ndarray | torch.Tensor, qt: T, shape: tuple[int, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Unsigned codes [rows, cols] (uint8; Q8_0: its int8 bytes), and group scale / bias [rows, cols // group]
    (group 32, or 16 for the K-quants with 16-wide sub-blocks) with w = (q - offset) * scale + bias.
    Returns (q, scale, bias, offset, cols)."""
    fmt = format_of(qt)
    rows, cols = check_shape(fmt, shape)
    blocks = blocks_of(raw, fmt, rows * cols)
    codec = CODECS[qt]
    n = blocks.shape[0]
    q = torch.empty(n, fmt.block_size, dtype=torch.uint8)
    scale = torch.empty(n, codec.groups, dtype=torch.float32)
    bias = torch.zeros(n, codec.groups, dtype=torch.float32)
    step = chunk_blocks(fmt)
    for s in range(0, n, step):
        b = blocks[s:s + step]
        codes = codec.codes(b, q[s:s + step])
        if codes.dtype != torch.uint8:  # Q8_0 hands back a view of the raw bytes: copy them out
            q[s:s + step].view(torch.int8).view(codes.shape).copy_(codes)
        sc, bi = codec.params(b)
        scale[s:s + step] = sc
        if bi is not None:
            bias[s:s + step] = bi
    group = fmt.block_size // codec.groups  # 32, or 16 for Q2_K / Q3_K / Q6_K
    return q.view(rows, cols), scale.view(rows, cols // group), bias.view(rows, cols // group), \
        codec.offset, cols


def int4_groups(raw: np.ndarray | torch.Tensor, qtype: T, shape: tuple[int, ...]) -> Int4Groups:
    """Q4_0 / Q4_1 / Q4_K -> (q uint8 [rows, cols] in 0..15, scale, zero float32 [rows, cols // 32]) with
    (q - 8) * scale + zero == dequantize(raw, qtype, shape) (see the module table for exactness)."""
    qt = _require(qtype, INT4_TYPES, "int4_groups")
    q, scale, bias, offset, _ = codes_and_params(raw, qt, tuple(shape))
    zero = bias if offset == 8 else torch.add(bias, scale, alpha=8 - offset)  # bias + (8 - off) * scale
    return q, scale, zero


def int8_groups(raw: np.ndarray | torch.Tensor, qtype: T, shape: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 -> (q int8 [rows, cols], d float32 [rows, cols // 32]) with q * d == dequantize(...) exactly."""
    qt = _require(qtype, INT8_TYPES, "int8_groups")
    q, scale, _, _, _ = codes_and_params(raw, qt, tuple(shape))
    return q.view(torch.int8), scale


def split_int4_planes(raw: np.ndarray | torch.Tensor, qtype: T, shape: tuple[int, ...]
                      ) -> list[Int4Groups]:
    """Int4 planes (q, scale, zero) whose sum of (q - 8) * scale + zero is the dequantized tensor.

    One plane for Q4_0/Q4_1/Q4_K (int4_groups), two (hi, lo) for Q5_0/Q5_1/Q8_0; see the module docstring."""
    qt = _require(qtype, SPLIT_TYPES, "split_int4_planes")
    if qt in INT4_TYPES:
        return [int4_groups(raw, qt, shape)]
    u, s, bias, offset, _ = codes_and_params(raw, qt, tuple(shape))
    if qt == T.Q8_0:
        u.bitwise_xor_(0x80)  # int8 q -> u = q + 128 in 0..255
        offset = 128
    hi = u >> 4
    lo = u.bitwise_and_(15)  # u is ours (a fresh copy), reuse it
    # The kernel stores each group's (scale, zero) in bfloat16, so a zero of large magnitude loses
    # |zero| * 2^-9 for every weight of its group. Keep zeros small: the hi plane gets zero 0 and the lo
    # plane the whole constant. With hi codes re-centred on 8 (possible for Q5 types, whose hi bit is 0 or 1)
    # that constant is (8 - off) s + bias; for Q8_0 (hi spans 0..15) it is (136 - off) s = 8 s.
    #   sum = (hi' - 8) 16 s + (lo - 8) s + zero_lo = (u - off) s + bias
    if qt == T.Q8_0:
        lo_zero = torch.add(bias, s, alpha=136 - offset)
        hi_plane = (hi, s * 16, torch.zeros_like(s))
    else:
        lo_zero = torch.add(bias, s, alpha=8 - offset)
        hi_plane = (hi.add_(8), s * 16, torch.zeros_like(s))
    return [hi_plane, (lo, s, lo_zero)]
