"""GGUF format facts as tables: header layout, metadata value types, tensor types, and the reader's limits.

The type ids come from gguf-py (the format's reference implementation) so that Ember and the files it reads
agree on them; everything the reader decides from (sizes, formats, caps) is spelled out here in one place.
All multi-byte fields in a GGUF v2/v3 file are little-endian.
"""
from __future__ import annotations

import struct
from typing import Final, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

# ---------------------------------------------------------------------------------------------------------
# Header
#
# | offset | size | field         | notes                                                 |
# |--------|------|---------------|-------------------------------------------------------|
# | 0      | 4    | magic         | the bytes b"GGUF" (same bytes in big-endian files)     |
# | 4      | 4    | version       | u32; 1 = legacy (32-bit counts), 2 and 3 = current    |
# | 8      | 8    | tensor_count  | u64                                                   |
# | 16     | 8    | kv_count      | u64                                                   |
# | 24     | ...  | kv pairs, then tensor infos, then padding to `alignment`, then tensor data   |
# ---------------------------------------------------------------------------------------------------------
GGUF_MAGIC: Final = b"GGUF"
HEADER_SIZE: Final = 24
SUPPORTED_VERSIONS: Final = frozenset({2, 3})  # v3 only added big-endian files; the layout equals v2
DEFAULT_ALIGNMENT: Final = 32
ALIGNMENT_KEY: Final = "general.alignment"
ARCHITECTURE_KEY: Final = "general.architecture"


class ValueType(NamedTuple):
    """How one metadata value type is stored. `size` is None for variable-length types (string, array)."""

    name: str
    size: int | None
    fmt: str | None  # struct format of one scalar, little-endian
    dtype: np.dtype | None  # numpy dtype of an array of this type


# | id | type    | bytes | struct | numpy |
# |----|---------|-------|--------|-------|
# | 0  | UINT8   | 1     | <B     | u1    |
# | 1  | INT8    | 1     | <b     | i1    |
# | 2  | UINT16  | 2     | <H     | <u2   |
# | 3  | INT16   | 2     | <h     | <i2   |
# | 4  | UINT32  | 4     | <I     | <u4   |
# | 5  | INT32   | 4     | <i     | <i4   |
# | 6  | FLOAT32 | 4     | <f     | <f4   |
# | 7  | BOOL    | 1     | <B (0 or 1 only) | bool |
# | 8  | STRING  | u64 length + UTF-8 bytes |  |  |
# | 9  | ARRAY   | u32 element type + u64 count + elements | | |
# | 10 | UINT64  | 8     | <Q     | <u8   |
# | 11 | INT64   | 8     | <q     | <i8   |
# | 12 | FLOAT64 | 8     | <d     | <f8   |
VALUE_TYPES: Final[dict[int, ValueType]] = {
    GGUFValueType.UINT8: ValueType("UINT8", 1, "<B", np.dtype("u1")),
    GGUFValueType.INT8: ValueType("INT8", 1, "<b", np.dtype("i1")),
    GGUFValueType.UINT16: ValueType("UINT16", 2, "<H", np.dtype("<u2")),
    GGUFValueType.INT16: ValueType("INT16", 2, "<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ValueType("UINT32", 4, "<I", np.dtype("<u4")),
    GGUFValueType.INT32: ValueType("INT32", 4, "<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ValueType("FLOAT32", 4, "<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ValueType("BOOL", 1, "<B", np.dtype("bool")),
    GGUFValueType.STRING: ValueType("STRING", None, None, None),
    GGUFValueType.ARRAY: ValueType("ARRAY", None, None, None),
    GGUFValueType.UINT64: ValueType("UINT64", 8, "<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ValueType("INT64", 8, "<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ValueType("FLOAT64", 8, "<d", np.dtype("<f8")),
}
# Precompiled scalar decoders, keyed like VALUE_TYPES.
SCALAR_STRUCTS: Final[dict[int, struct.Struct]] = {
    tid: struct.Struct(vt.fmt) for tid, vt in VALUE_TYPES.items() if vt.fmt is not None
}
INTEGER_VALUE_TYPES: Final = frozenset({
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
})

# Smallest encodings, used to bound counts by the bytes left before anything is allocated:
# | item            | minimum bytes                                                  |
# |-----------------|----------------------------------------------------------------|
# | kv pair         | 8 key length + 0 key bytes + 4 type + 1 (u8/i8/bool value) = 13 |
# | tensor info     | 8 name length + 4 n_dims + 8 one dim + 4 type + 8 offset = 32   |
# | string element  | 8 (length, empty string)                                       |
# | array element   | 4 type + 8 count (empty inner array) = 12                       |
MIN_KV_BYTES: Final = 13
MIN_TENSOR_INFO_BYTES: Final = 32
MIN_STRING_BYTES: Final = 8
MIN_ARRAY_BYTES: Final = 12

# ---------------------------------------------------------------------------------------------------------
# Reader limits (everything else is bounded by the file's own size)
#
# | limit                 | value     | why                                                              |
# |-----------------------|-----------|------------------------------------------------------------------|
# | MAX_KEY_BYTES         | 65536     | real keys are < 100 bytes; stops a crafted key hogging memory     |
# | MAX_TENSOR_NAME_BYTES | 63        | ggml's GGML_MAX_NAME is 64 including the NUL; llama.cpp rejects >= 64 |
# | MAX_DIMS              | 4         | GGML_MAX_DIMS                                                    |
# | MAX_ELEMENTS          | 2**63 - 1 | ggml counts elements in int64_t                                  |
# | MAX_ARRAY_DEPTH       | 3         | arrays nest at most this deep (llama.cpp accepts no nesting)      |
# | MAX_NESTED_ARRAY_LEN  | 65536     | elements of one array-of-arrays; each element costs a Python object |
# ---------------------------------------------------------------------------------------------------------
MAX_KEY_BYTES: Final = 64 * 1024
MAX_TENSOR_NAME_BYTES: Final = 63
MAX_DIMS: Final = 4
MAX_ELEMENTS: Final = 2**63 - 1
MAX_ARRAY_DEPTH: Final = 3
MAX_NESTED_ARRAY_LEN: Final = 65536


class TensorType(NamedTuple):
    """Storage of one ggml tensor type: `block_size` elements take `type_size` bytes."""

    block_size: int
    type_size: int


# All types gguf-py knows, e.g. F32 = (1, 4), F16 = (1, 2), Q4_0 = (32, 18), Q4_K = (256, 144),
# Q6_K = (256, 210). Ids missing here (4, 5, 31-33, 36-38: removed from ggml; anything newer) are not readable.
TENSOR_TYPES: Final[dict[GGMLQuantizationType, TensorType]] = {
    GGMLQuantizationType(t): TensorType(*sizes) for t, sizes in GGML_QUANT_SIZES.items()
}

# Unquantized types, viewed with these numpy dtypes by tensor_array. BF16 has no numpy dtype: its raw bits
# come back as uint16 (shift left 16 and view as float32 to widen).
PLAIN_DTYPES: Final[dict[GGMLQuantizationType, np.dtype]] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype("<u2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}

# ---------------------------------------------------------------------------------------------------------
# Known keys whose type other modules rely on. (ARRAY, X) means "array whose elements are X"; lengths marked
# "n_tokens" must equal len(tokenizer.ggml.tokens). Any key "tokenizer.ggml.*_token_id" must be an integer.
#
# | key                       | type              | length   |
# |---------------------------|-------------------|----------|
# | general.architecture      | STRING            |          |
# | general.alignment         | UINT32            |          |
# | tokenizer.ggml.model      | STRING            |          |
# | tokenizer.ggml.pre        | STRING            |          |
# | tokenizer.ggml.tokens     | (ARRAY, STRING)   |          |
# | tokenizer.ggml.scores     | (ARRAY, FLOAT32)  | n_tokens |
# | tokenizer.ggml.token_type | (ARRAY, INT32)    | n_tokens |
# | tokenizer.ggml.merges     | (ARRAY, STRING)   |          |
# | tokenizer.chat_template   | STRING            |          |
# ---------------------------------------------------------------------------------------------------------
TOKENS_KEY: Final = "tokenizer.ggml.tokens"
KNOWN_KEY_TYPES: Final[dict[str, tuple[int, ...]]] = {
    ARCHITECTURE_KEY: (GGUFValueType.STRING,),
    ALIGNMENT_KEY: (GGUFValueType.UINT32,),
    "tokenizer.ggml.model": (GGUFValueType.STRING,),
    "tokenizer.ggml.pre": (GGUFValueType.STRING,),
    TOKENS_KEY: (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.merges": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.chat_template": (GGUFValueType.STRING,),
}
PER_TOKEN_KEYS: Final = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
TOKEN_ID_PREFIX: Final = "tokenizer.ggml."
TOKEN_ID_SUFFIX: Final = "_token_id"
