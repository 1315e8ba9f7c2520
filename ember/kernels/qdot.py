"""QDotLinear: quantized weights multiplied with integer dot products (AVX-512 VNNI), Ember's own C++ kernel.

Why a kernel of our own: torch's int4 kernel reads weights at ~11 GB/s per thread and re-reads them for
every block of 4 rows, and it has no 8-bit form (Q8_0/Q5 ran as two int4 planes). ember/kernels/csrc/qdot.cpp
quantizes the activations to int8 per group of 32 (as llama.cpp does for its CPU dot products) and multiplies
with `vpdpbusd`, reading each weight once per call for every row of the batch. Each output depends only on
its own input row and weight row (see the C++ file's invariant), so decode results are batch-invariant.

Storage: w = s * u + z per group of 32 (16 for Q2_K, Q3_K, Q6_K), u an unsigned code in as few bits as hold
it (CODE_BITS): nibbles for the 2- to 4-bit types (Q2_K, Q3_K, Q4_0, Q4_1, Q4_K), nibbles plus one or two
planes of high bits for 5 and 6 bits (Q5_0, Q5_1, Q5_K; Q6_K), one byte for Q8_0. Decode reads every weight
byte once a token, so this is its speed: gemma3-270m's layers, mostly Q5_0, went from 71 to 44 MB a token
when they stopped being bytes. Symmetric weights (no per-group bias: Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) keep no
mins, z = -offset * s being derived in the kernel; s and z as float16 when every value is exactly a
float16 (plain Q4_0/Q4_1/Q8_0 files), float32 otherwise. Float tensors stay on the dense bfloat16 path.

Every row takes the kernel by default (exact prefill, see ember.kernels.native.EXACT: a row's result never
depends on its batch). With EMBER_EXACT_PREFILL=0, batches of >= int4_dense.MIN_ROWS non-decode rows (prompt
processing) dequantize slabs of rows to bfloat16 and use torch's GEMM instead, as the int4 path does: faster
there (bfloat16 GEMM with AMX/AVX-512 BF16), not batch-invariant.

The kernel is built by ember.kernels.native (CPUs with AVX-512 VNNI; EMBER_NATIVE=0 turns it off); without
it, Int4Linear serves these types as before.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.kernels import int4_dense, native
from ember.kernels.linear import Linear, decode_rows
from ember.quant.dequant import as_byte_tensor
from ember.quant.formats import format_of
from ember.quant.repack import codes_and_params

GROUP = 32
COLS = 16  # output columns per block of the packed layout
# Bits a type's codes are stored in: nibbles (4), nibbles plus one or two planes of high bits (5, 6), bytes (8).
CODE_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q2_K: 4, T.Q3_K: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q5_K: 5, T.Q6_K: 6,
             T.Q8_0: 8}
QDOT_TYPES = frozenset(CODE_BITS)
SLAB_WEIGHTS = 1 << 21  # weights dequantized at once for prompt processing (4 MiB of bfloat16)


def extension():
    return native.extension()


def available() -> bool:
    return native.available()


def supports(qtype: int, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF weight (ggml shape (in, out)) can be stored for this kernel."""
    return T(qtype) in QDOT_TYPES and len(shape) == 2 and shape[0] % GROUP == 0 and shape[1] % COLS == 0


class QDotParts:
    """One weight's codes and group parameters before packing: u uint8 [N, K], s, z float32 [N, K / group]
    (group 32, or 16 for Q2_K / Q3_K / Q6_K). offset: o > 0 where z == -o * s in every group (the types
    without a per-group bias: Q4_0, Q5_0, Q8_0, Q3_K, Q6_K), else None. K-quants also carry their super-block
    factors [N, K / 256]: s_super (d: s = d * sc, sc a small integer per group) and z_super (-dmin, or
    -offset * d for the symmetric ones: z = z_super * m)."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, offset: int | None = None,
                 s_super: torch.Tensor | None = None, z_super: torch.Tensor | None = None):
        self.u, self.s, self.z, self.bits, self.offset = u, s, z, bits, offset
        self.s_super, self.z_super = s_super, z_super

    @property
    def group(self) -> int:
        return self.u.shape[1] // self.s.shape[1]

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) per 16-wide half group (a 32-wide group's parameters repeated: exact)."""
        if self.group == 16:
            return self.s, self.z
        return self.s.repeat_interleave(2, 1), self.z.repeat_interleave(2, 1)


def parts_from_gguf(raw: np.ndarray | torch.Tensor, qtype: int, shape: tuple[int, ...]) -> QDotParts:
    """Exact (u, s, z) of a GGUF weight: ggml's w = (q - offset) * scale + bias becomes s * u + z with
    z = bias - offset * scale (Q8_0's signed bytes made unsigned: u = q + 128)."""
    qt = T(qtype)
    q, scale, bias, offset, _ = codes_and_params(raw, qt, tuple(shape))
    if qt == T.Q8_0:
        q = q.bitwise_xor(0x80)
        offset = 128
    z = torch.add(bias, scale, alpha=-offset)
    symmetric = offset > 0 and not bool(bias.any())  # then z = -offset * s exactly (offsets are powers of 2)
    s_super = z_super = None
    if qt in K_SUPER_FIELDS:  # the fp16 d (and dmin) of every super-block of 256
        d_at, dmin_at = K_SUPER_FIELDS[qt]
        blocks = as_byte_tensor(raw).view(-1, format_of(qt).type_size)
        rows = q.shape[0]
        s_super = blocks[:, d_at:d_at + 2].contiguous().view(torch.float16).float().view(rows, -1)
        if dmin_at is None:
            z_super = s_super * -offset
        else:
            z_super = -blocks[:, dmin_at:dmin_at + 2].contiguous().view(torch.float16).float().view(rows, -1)
    return QDotParts(q, scale, z, CODE_BITS[qt], offset if symmetric else None, s_super, z_super)


def _two_level(x: torch.Tensor, sup: torch.Tensor) -> torch.Tensor | None:
    """x [N, P] as sup [N, P / r] (repeated) times int8 codes [N, P], or None where that is not exact."""
    rep = sup.repeat_interleave(x.shape[1] // sup.shape[1], 1)
    m = torch.where(rep != 0, x / torch.where(rep != 0, rep, torch.ones_like(rep)), torch.zeros_like(x))
    codes = m.round()
    if not torch.equal(codes, m) or bool(((codes < -128) | (codes > 127)).any()) or not torch.equal(rep * codes, x):
        return None
    return codes.to(torch.int8)


CODE_BYTES = {4: 256, 5: 320, 6: 384, 8: 512}  # per column block and group of 32
# K-quants: byte offsets of the fp16 super-block d and dmin in a block (ember/quant/dequant.py's table). Their
# group parameters are d * sc and -dmin * m with sc, m small integers: stored as d per 256 weights and an int8
# per group (1 byte where a float32 product took 4: Q4_K 6 -> 4.75 bits a weight, llama.cpp reads 4.5).
K_SUPER_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None)}
K_SUPER = 256


def _blocked_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] -> [N / 16, G, CODE_BYTES[bits]] in the kernel's layout (see qdot.cpp): per column block
    and group, chunk j holds elements 4j..4j+3 of each of the 16 columns (byte 4c + e), as bytes, or as
    nibbles (chunks j and j + 4 share bytes), followed for 5 and 6 bits by planes of the fifth (and sixth)
    bits: a 64-bit little-endian word per chunk (bit b: byte b)."""
    n, k = u.shape
    g = k // GROUP
    v = u.view(n // COLS, COLS, g, 8, 4).permute(0, 2, 3, 1, 4)  # [block, group, chunk, column, element]
    if bits == 8:
        return v.reshape(n // COLS, g, 512).contiguous()
    low = v & 15
    nibbles = (low[:, :, :4] | (low[:, :, 4:] << 4)).reshape(n // COLS, g, 256)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    planes = [nibbles]
    for bit in range(4, bits):
        plane = ((v >> bit) & 1).reshape(n // COLS, g, 8, 8, 8)  # [block, group, chunk, byte of word, bit]
        planes.append((plane * weights).sum(-1, dtype=torch.uint8).reshape(n // COLS, g, 64))
    return torch.cat(planes, dim=2).contiguous()


def _blocked_params(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Group parameters [N, G] -> [N / 16, G, 16] (G: one per 32 elements, or two per 32 for 16-wide groups)."""
    n, g = x.shape
    return x.view(n // COLS, COLS, g).transpose(1, 2).to(dtype).contiguous()


class QDotLinear(Linear):
    """A Linear over weights packed for the qdot kernel."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, in_features: int,
                 bias: torch.Tensor | None = None, offset: int | None = None,
                 scale_codes: torch.Tensor | None = None, min_codes: torch.Tensor | None = None):
        """offset: the weight is symmetric, z = -offset * s in every group; mins is then empty and the kernel
        derives z from s (what a decode step reads shrinks by the mins: 10 MB a token for gemma3's output).
        scale_codes (and min_codes unless symmetric): two-level parameters, scales/mins then hold one float32
        per super-block of 256 and the codes an int8 factor per group (see K_SUPER_FIELDS)."""
        empty = torch.empty(0, dtype=torch.int8)
        scale_codes = empty if scale_codes is None else scale_codes
        min_codes = empty if min_codes is None else min_codes
        if codes.dim() != 3 or codes.shape[2] != CODE_BYTES.get(bits):
            raise ValueError("qdot tensors do not match their sizes")
        if (mins.numel() != 0 or not offset or offset < 0) if offset is not None else scales.shape != mins.shape:
            raise ValueError("qdot mins do not match the scales (or the offset)")
        groups = scale_codes if scale_codes.numel() else scales  # what holds one entry per group
        if codes.shape[1] * GROUP != in_features or groups.shape[0::2] != (codes.shape[0], COLS) or \
                groups.shape[1] not in (codes.shape[1], 2 * codes.shape[1]):
            raise ValueError("qdot codes do not match in_features")
        if scale_codes.numel() and (scales.shape != (codes.shape[0], codes.shape[1] * GROUP // K_SUPER, COLS) or
                                    (offset is None and min_codes.shape != scale_codes.shape)):
            raise ValueError("qdot two-level parameters do not match")
        self.codes, self.scales, self.mins, self.bits = codes, scales, mins, bits
        self.scale_codes, self.min_codes = scale_codes, min_codes
        self.offset = offset
        self.in_features, self.out_features = in_features, codes.shape[0] * COLS
        self.bias = bias

    @classmethod
    def from_parts(cls, parts: list[QDotParts], bias: torch.Tensor | None = None) -> "QDotLinear":
        """Fuse parts along N (q/k/v, gate/up). The fewest bits that hold every part's codes; float16
        parameters only if every value converts exactly."""
        half = any(p.group == 16 for p in parts)
        bits = max(p.bits for p in parts)
        u = torch.cat([p.u for p in parts])
        s = torch.cat([p.halves()[0] if half else p.s for p in parts])
        z = torch.cat([p.halves()[1] if half else p.z for p in parts])
        exact16 = all(torch.equal(t.half().float(), t) for t in (s, z))
        dtype = torch.float16 if exact16 else torch.float32
        offsets = {p.offset for p in parts}
        offset = offsets.pop() if len(offsets) == 1 else None  # one offset shared by every part, or mins
        codes = _blocked_codes(u, bits)
        if all(p.s_super is not None for p in parts):  # K-quants: their two levels, where exact
            s_sup = torch.cat([p.s_super for p in parts])
            z_sup = torch.cat([p.z_super for p in parts])
            sc = _two_level(s, s_sup)
            mc = None if offset is not None else _two_level(z, z_sup)
            if sc is not None and (offset is not None or mc is not None):
                f32 = torch.float32
                no_mins = torch.empty(0, dtype=f32)
                return cls(codes, _blocked_params(s_sup, f32), no_mins if offset is not None else
                           _blocked_params(z_sup, f32), bits, u.shape[1], bias, offset,
                           _blocked_params(sc, torch.int8), None if mc is None else _blocked_params(mc, torch.int8))
        mins = torch.empty(0, dtype=dtype) if offset is not None else _blocked_params(z, dtype)
        return cls(codes, _blocked_params(s, dtype), mins, bits, u.shape[1], bias, offset)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = decode_rows()
        n_exact = 0 if rows is None else rows.numel()
        if not native.EXACT and x.shape[0] - n_exact >= int4_dense.MIN_ROWS and int4_dense.wanted():
            xb = x.to(torch.bfloat16)
            if n_exact:
                keep = torch.ones(x.shape[0], dtype=torch.bool)
                keep[rows] = False
                y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
                y[keep] = self._dense(xb[keep])
                y[rows] = self._kernel(x[rows])
            else:
                y = self._dense(xb)
        else:
            y = self._kernel(x)
        return y if self.bias is None else y + self.bias

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return extension().qdot_matmul(x.float(), self.codes, self.scales, self.mins, self.bits, self._offset,
                                       self.scale_codes, self.min_codes)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        step = max(COLS, SLAB_WEIGHTS // k // COLS * COLS)
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        ext = extension()
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            w = ext.qdot_dequant(self.codes, self.scales, self.mins, self.bits, self._offset, self.scale_codes,
                                 self.min_codes, n0, n1)
            out[:, n0:n1] = torch.nn.functional.linear(x, w)
        return out

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [N, K] (tests, tooling)."""
        return extension().qdot_dequant(self.codes, self.scales, self.mins, self.bits, self._offset,
                                        self.scale_codes, self.min_codes, 0, self.out_features).float()

    @property
    def _offset(self) -> int:
        return 0 if self.offset is None else self.offset  # the kernel's form: 0 = read the mins

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.codes, self.scales, self.mins, self.scale_codes, self.min_codes))

    def state(self) -> dict:
        return {"kind": "qdot", "codes": self.codes, "scales": self.scales, "mins": self.mins, "bits": self.bits,
                "offset": self.offset, "scale_codes": self.scale_codes, "min_codes": self.min_codes,
                "in_features": self.in_features, "bias": self.bias}
