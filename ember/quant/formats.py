"""The GGML tensor storage formats: one row per type, the facts every other module sizes buffers by.

A ggml tensor row of `n` weights is stored as `n / block_size` consecutive blocks of `type_size` bytes each;
a row length that is not a multiple of `block_size` cannot be stored. Type ids are ggml's (`enum ggml_type`,
mirrored by gguf-py's GGMLQuantizationType); ids 4, 5 (old Q4_2/Q4_3) and 31..33, 36..38 are retired.

| type    | id | block | bytes | bits/weight | what a block holds                                            |
|---------|----|-------|-------|-------------|---------------------------------------------------------------|
| F32     |  0 |     1 |     4 | 32          | IEEE float32                                                  |
| F16     |  1 |     1 |     2 | 16          | IEEE float16                                                  |
| Q4_0    |  2 |    32 |    18 | 4.5         | fp16 d, 32 x 4-bit q:            w = (q - 8) d                |
| Q4_1    |  3 |    32 |    20 | 5.0         | fp16 d, fp16 m, 32 x 4-bit q:    w = q d + m                  |
| Q5_0    |  6 |    32 |    22 | 5.5         | fp16 d, 32 high bits, 32 nibbles: w = (q - 16) d              |
| Q5_1    |  7 |    32 |    24 | 6.0         | fp16 d, fp16 m, high bits, nibbles: w = q d + m               |
| Q8_0    |  8 |    32 |    34 | 8.5         | fp16 d, 32 x int8 q:             w = q d                      |
| Q8_1    |  9 |    32 |    40 | 10.0        | f32 d, f32 sum, 32 x int8 (an activation format)              |
| Q2_K    | 10 |   256 |    84 | 2.625       | 16 sub-blocks of 16: 4-bit scale+min, 2-bit q                 |
| Q3_K    | 11 |   256 |   110 | 3.4375      | 16 sub-blocks of 16: 6-bit scale, 3-bit q                     |
| Q4_K    | 12 |   256 |   144 | 4.5         | 8 sub-blocks of 32: 6-bit scale+min, 4-bit q                  |
| Q5_K    | 13 |   256 |   176 | 5.5         | 8 sub-blocks of 32: 6-bit scale+min, 5-bit q                  |
| Q6_K    | 14 |   256 |   210 | 6.5625      | 16 sub-blocks of 16: int8 scale, 6-bit q                      |
| Q8_K    | 15 |   256 |   292 | 9.125       | f32 d, int8 q, int16 block sums (an activation format)        |
| IQ2_XXS | 16 |   256 |    66 | 2.0625      | lattice codebook (E8), 2-bit class                            |
| IQ2_XS  | 17 |   256 |    74 | 2.3125      |                                                               |
| IQ3_XXS | 18 |   256 |    98 | 3.0625      |                                                               |
| IQ1_S   | 19 |   256 |    50 | 1.5625      |                                                               |
| IQ4_NL  | 20 |    32 |    18 | 4.5         | fp16 d, 4-bit index into a non-linear 16-entry table          |
| IQ3_S   | 21 |   256 |   110 | 3.4375      |                                                               |
| IQ2_S   | 22 |   256 |    82 | 2.5625      |                                                               |
| IQ4_XS  | 23 |   256 |   136 | 4.25        | IQ4_NL with 6-bit sub-block scales                            |
| I8      | 24 |     1 |     1 | 8           | integer tensors (not weights)                                 |
| I16     | 25 |     1 |     2 | 16          |                                                               |
| I32     | 26 |     1 |     4 | 32          |                                                               |
| I64     | 27 |     1 |     8 | 64          |                                                               |
| F64     | 28 |     1 |     8 | 64          |                                                               |
| IQ1_M   | 29 |   256 |    56 | 1.75        |                                                               |
| BF16    | 30 |     1 |     2 | 16          | bfloat16 (top half of a float32)                              |
| TQ1_0   | 34 |   256 |    54 | 1.6875      | ternary, base-3 packed                                        |
| TQ2_0   | 35 |   256 |    66 | 2.0625      | ternary, 2 bits each                                          |
| MXFP4   | 39 |    32 |    17 | 4.25        | e8m0 shared exponent, 32 x fp4 (e2m1)                         |
| NVFP4   | 40 |    64 |    36 | 4.5         | 4 x ue4m3 scale, 64 x fp4                                     |
| Q1_0    | 41 |   128 |    18 | 1.125       | fp16 d, 128 sign bits                                         |

Sources: ggml/src/ggml-common.h (block structs) and gguf-py's GGML_QUANT_SIZES; tests/test_dequant.py checks
this table against the installed gguf-py so that a drift in either shows up.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ember.errors import UnsupportedError


@dataclass(frozen=True)
class QuantFormat:
    """Storage facts of one ggml type. Invariant: bits_per_weight == 8 * type_size / block_size."""

    name: str
    type_id: int
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType(self.type_id)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, row_len: int) -> int:
        """Bytes of one row of `row_len` weights; raises UnsupportedError if the row cannot be blocked."""
        if row_len <= 0 or row_len % self.block_size:
            raise UnsupportedError(
                f"a {self.name} row must be a positive multiple of {self.block_size} weights, got {row_len}")
        return row_len // self.block_size * self.type_size


# (name, ggml id, block size, bytes per block): the table above, as data.
_TABLE: tuple[tuple[str, int, int, int], ...] = (
    ("F32", 0, 1, 4),
    ("F16", 1, 1, 2),
    ("Q4_0", 2, 32, 18),
    ("Q4_1", 3, 32, 20),
    ("Q5_0", 6, 32, 22),
    ("Q5_1", 7, 32, 24),
    ("Q8_0", 8, 32, 34),
    ("Q8_1", 9, 32, 40),
    ("Q2_K", 10, 256, 84),
    ("Q3_K", 11, 256, 110),
    ("Q4_K", 12, 256, 144),
    ("Q5_K", 13, 256, 176),
    ("Q6_K", 14, 256, 210),
    ("Q8_K", 15, 256, 292),
    ("IQ2_XXS", 16, 256, 66),
    ("IQ2_XS", 17, 256, 74),
    ("IQ3_XXS", 18, 256, 98),
    ("IQ1_S", 19, 256, 50),
    ("IQ4_NL", 20, 32, 18),
    ("IQ3_S", 21, 256, 110),
    ("IQ2_S", 22, 256, 82),
    ("IQ4_XS", 23, 256, 136),
    ("I8", 24, 1, 1),
    ("I16", 25, 1, 2),
    ("I32", 26, 1, 4),
    ("I64", 27, 1, 8),
    ("F64", 28, 1, 8),
    ("IQ1_M", 29, 256, 56),
    ("BF16", 30, 1, 2),
    ("TQ1_0", 34, 256, 54),
    ("TQ2_0", 35, 256, 66),
    ("MXFP4", 39, 32, 17),
    ("NVFP4", 40, 64, 36),
    ("Q1_0", 41, 128, 18),
)

_KNOWN_IDS = {int(t) for t in GGMLQuantizationType}

# Keyed by gguf-py's enum. Types that the installed gguf-py predates are left out rather than invented, so
# every key is a real GGMLQuantizationType member.
FORMATS: dict[GGMLQuantizationType, QuantFormat] = {
    GGMLQuantizationType(tid): QuantFormat(name, tid, bs, ts)
    for name, tid, bs, ts in _TABLE
    if tid in _KNOWN_IDS
}


def format_of(qtype: GGMLQuantizationType | int) -> QuantFormat:
    """The format of a ggml type id; UnsupportedError (naming the id) for one this table does not know."""
    try:
        return FORMATS[GGMLQuantizationType(int(qtype))]
    except (ValueError, KeyError):
        name = getattr(qtype, "name", None) or f"ggml type id {int(qtype)}"
        raise UnsupportedError(f"unknown tensor type {name}") from None
