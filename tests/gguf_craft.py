"""Write valid and deliberately broken GGUF bytes for the reader's tests.

Written independently of ember.gguf (it only shares the spec), so a misreading of the format on one side shows
up as a failing test rather than cancelling out; test_gguf_reader also checks these files against gguf-py.
Every field can be overridden with any raw value, which is how the crafted files are made.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V

_SCALAR_FMT = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; `length` overrides the stored length (to lie about it)."""
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw) if length is None else length) + raw


def value_bytes(vtype: int, value: Any) -> bytes:
    """Encoding of one value (no type tag). Arrays: value = (element_type, items)."""
    if vtype == V.STRING:
        return gstr(value)
    if vtype == V.ARRAY:
        etype, items = value
        return u32(etype) + u64(len(items)) + b"".join(value_bytes(etype, x) for x in items)
    return struct.pack(_SCALAR_FMT[V(vtype)], value)


def kv(key: str | bytes, vtype: int, value: Any) -> bytes:
    return gstr(key) + u32(vtype) + value_bytes(vtype, value)


def kv_array(key: str | bytes, etype: int, items: list[Any]) -> bytes:
    return kv(key, V.ARRAY, (etype, items))


def tensor_info(name: str | bytes, shape: list[int], ttype: int, offset: int) -> bytes:
    """Shape in ggml order; dims are written as signed 64-bit like ggml's int64_t ne[]."""
    return gstr(name) + u32(len(shape)) + b"".join(struct.pack("<q", d) for d in shape) + u32(ttype) + u64(offset)


def nbytes_of(ttype: int, shape: list[int]) -> int:
    block, size = GGML_QUANT_SIZES[T(ttype)]
    return int(np.prod(shape)) // block * size


@dataclass
class Tensor:
    name: str | bytes
    ttype: int
    shape: list[int]
    data: bytes | None = None  # default: deterministic bytes of the right length
    offset: int | None = None  # default: packed in order, each aligned


@dataclass
class Craft:
    """A GGUF file under construction. kvs are raw encoded pairs, so any of them can be malformed."""

    kvs: list[bytes] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    alignment: int = 32  # used for layout; write general.alignment yourself to change the file's value
    magic: bytes = b"GGUF"
    n_tensors: int | None = None  # override the header counts
    n_kv: int | None = None

    def add(self, key: str | bytes, vtype: int, value: Any) -> Craft:
        self.kvs.append(kv(key, vtype, value))
        return self

    def add_array(self, key: str | bytes, etype: int, items: list[Any]) -> Craft:
        self.kvs.append(kv_array(key, etype, items))
        return self

    def add_tensor(self, name: str | bytes, ttype: int, shape: list[int], **kw: Any) -> Craft:
        self.tensors.append(Tensor(name, ttype, shape, **kw))
        return self

    def layout(self) -> tuple[bytes, bytes]:
        """(header: magic through the last tensor info, data section without the padding before it)."""
        infos, blobs, pos = [], [], 0
        for i, t in enumerate(self.tensors):
            data = t.data
            if data is None:
                n = nbytes_of(t.ttype, t.shape)
                data = bytes((i * 31 + j) % 251 for j in range(n))
            off = pos if t.offset is None else t.offset
            infos.append(tensor_info(t.name, t.shape, t.ttype, off))
            if data:  # a crafted tensor may have no bytes at all (its offset may even be absurd)
                blobs.append((off, data))
                pos = _pad(max(pos, off + len(data)), self.alignment)
        head = (self.magic + u32(self.version)
                + u64(len(self.tensors) if self.n_tensors is None else self.n_tensors)
                + u64(len(self.kvs) if self.n_kv is None else self.n_kv)
                + b"".join(self.kvs) + b"".join(infos))
        section = bytearray(max((o + len(d) for o, d in blobs), default=0))
        for off, data in blobs:
            section[off : off + len(data)] = data
        return head, bytes(section)

    def build(self) -> bytes:
        head, section = self.layout()
        return head + bytes(_pad(len(head), self.alignment) - len(head)) + section


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "ab", "\u00e9t\u00e9", "\u2581hi"]
MERGES = ["a b", "\u00e9 t"]


def small_model(**kw: Any) -> Craft:
    """A small valid file exercising every value type and the plain and quantized tensor layouts."""
    c = Craft(**kw)
    c.add("general.architecture", V.STRING, "llama")
    c.add("general.name", V.STRING, "tiny \u2603")
    c.add("llama.block_count", V.UINT32, 2)
    c.add("llama.rope.freq_base", V.FLOAT32, 10000.0)
    c.add("test.u8", V.UINT8, 200).add("test.i8", V.INT8, -5).add("test.u16", V.UINT16, 60000)
    c.add("test.i16", V.INT16, -30000).add("test.i32", V.INT32, -7).add("test.u64", V.UINT64, 2**63 + 5)
    c.add("test.i64", V.INT64, -(2**40)).add("test.f64", V.FLOAT64, 0.1).add("test.bool", V.BOOL, 1)
    c.add_array("test.bools", V.BOOL, [1, 0, 1])
    c.add_array("test.f64s", V.FLOAT64, [1.5, -2.25])
    c.add_array("test.empty", V.UINT16, [])
    c.add_array("test.nested", V.ARRAY, [(V.INT32, [1, 2]), (V.STRING, ["x"])])
    c.add("tokenizer.ggml.model", V.STRING, "gpt2")
    c.add_array("tokenizer.ggml.tokens", V.STRING, TOKENS)
    c.add_array("tokenizer.ggml.scores", V.FLOAT32, [float(-i) for i in range(len(TOKENS))])
    c.add_array("tokenizer.ggml.token_type", V.INT32, [2, 3, 3, 1, 1, 1, 1, 1])
    c.add_array("tokenizer.ggml.merges", V.STRING, MERGES)
    c.add("tokenizer.ggml.bos_token_id", V.UINT32, 1)
    c.add("tokenizer.ggml.eos_token_id", V.UINT32, 2)
    c.add_tensor("token_embd.weight", T.Q4_0, [64, 8])
    c.add_tensor("norm.weight", T.F32, [64], data=np.arange(64, dtype="<f4").tobytes())
    c.add_tensor("w.f16", T.F16, [4, 3, 2], data=np.arange(24, dtype="<f2").tobytes())
    c.add_tensor("w.bf16", T.BF16, [8, 2])
    c.add_tensor("w.i32", T.I32, [3, 5], data=np.arange(15, dtype="<i4").tobytes())
    c.add_tensor("w.q4k", T.Q4_K, [256, 2])
    return c
