"""Validated, memory-mapped GGUF reader.

Model files come from strangers, so the parser trusts nothing: every count and length is checked against the
bytes that remain before anything is read or allocated, sizes are computed with Python ints (no overflow), and
every failure is one GGUFError line (corrupt or crafted file) or UnsupportedError line (well-formed, but a
version or type Ember does not read). The work done is linear in the file's header size, so a crafted file is
rejected in bounded time and memory.

The whole file is mapped read-only; metadata is decoded into Python/numpy values at open, tensor data is never
copied: tensor_bytes/tensor_array return read-only numpy views on the map. A view keeps the map alive after
close() (close only drops the file's own reference), so views never dangle.

Invariants of an open GGUFFile:
  * data_offset is a multiple of alignment and, when there are tensors, <= file_size;
  * every tensor's bytes [offset, offset + nbytes) lie inside the file, offset is a multiple of alignment,
    no two tensors overlap, nbytes = n_elements / block_size * type_size > 0;
  * the keys of KNOWN_KEY_TYPES that are present have their documented types and lengths.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ember.errors import GGUFError, ModelNotFoundError, UnsupportedError
from ember.gguf.constants import (
    ALIGNMENT_KEY,
    ARCHITECTURE_KEY,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    HEADER_SIZE,
    INTEGER_VALUE_TYPES,
    KNOWN_KEY_TYPES,
    MAX_ARRAY_DEPTH,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_KEY_BYTES,
    MAX_NESTED_ARRAY_LEN,
    MAX_TENSOR_NAME_BYTES,
    MIN_ARRAY_BYTES,
    MIN_KV_BYTES,
    MIN_STRING_BYTES,
    MIN_TENSOR_INFO_BYTES,
    PER_TOKEN_KEYS,
    PLAIN_DTYPES,
    SCALAR_STRUCTS,
    SUPPORTED_VERSIONS,
    TENSOR_TYPES,
    TOKEN_ID_PREFIX,
    TOKEN_ID_SUFFIX,
    TOKENS_KEY,
    VALUE_TYPES,
)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY = GGUFValueType.ARRAY
_STRING = GGUFValueType.STRING
_BOOL = GGUFValueType.BOOL


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file. `shape` is in ggml order: shape[0] is the row length (fastest
    varying); numpy order is reversed(shape). `offset` is absolute in the file."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0]

    @property
    def row_bytes(self) -> int:
        block_size, type_size = TENSOR_TYPES[self.ggml_type]
        return self.shape[0] // block_size * type_size


def _show(text: str, limit: int = 80) -> str:
    """A crafted name may be huge or hold newlines; error messages stay one short line."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _type_name(types: tuple[int, ...]) -> str:
    names = [VALUE_TYPES[t].name if t in VALUE_TYPES else f"type {t}" for t in types]
    return " of ".join(names)


class _Parser:
    """A cursor over the mapped file. `pos` only moves forward and never past `end`."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf = buf
        self.end = size
        self.pos = 0
        self.path = path

    # -- primitives --------------------------------------------------------------------------------------
    def fail(self, what: str, *, at: bool = True) -> NoReturn:
        where = f" (at byte {self.pos})" if at else ""
        raise GGUFError(f"{self.path}: {what}{where}")

    def unsupported(self, what: str) -> NoReturn:
        raise UnsupportedError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        """Reserve the next n bytes; returns where they start. The only way `pos` advances."""
        left = self.end - self.pos
        if n > left:
            self.fail(f"truncated or corrupt: {what} needs {n} bytes but only {left} remain")
        start = self.pos
        self.pos = start + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, cap: int | None = None, strict: bool = False) -> str:
        """Keys and tensor names (strict=True) must be valid UTF-8. Other strings keep undecodable bytes as
        surrogate escapes, so s.encode('utf-8', 'surrogateescape') always gives back the file's bytes."""
        n = self.u64(f"length of {what}")
        if cap is not None and n > cap:
            self.fail(f"{what} is {n} bytes long; at most {cap} are allowed")
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8", "strict" if strict else "surrogateescape")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    # -- metadata ----------------------------------------------------------------------------------------
    def scalar(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        unpacker = SCALAR_STRUCTS.get(vtype)
        if unpacker is None:
            self.fail(f"{what} has unknown value type id {vtype}")
        value = unpacker.unpack_from(self.buf, self.take(unpacker.size, what))[0]
        if vtype == _BOOL:
            if value > 1:
                self.fail(f"{what} is a bool stored as {value}; only 0 and 1 are valid")
            return bool(value)
        return value

    def array(self, etype: int, n: int, what: str, depth: int) -> Any:
        """An array of n elements of type etype; `depth` counts the arrays enclosing this one plus one."""
        vt = VALUE_TYPES.get(etype)
        if vt is None:
            self.fail(f"{what} is an array of unknown value type id {etype}")
        if vt.size is not None:
            start = self.take(n * vt.size, f"{what} ({n} x {vt.name})")
            if n == 0:
                return _frozen(np.empty(0, dtype=vt.dtype))
            # A copy (not a view on the map) so that metadata outlives close() without pinning the mapping.
            raw = np.frombuffer(self.buf, dtype=np.uint8, count=n * vt.size, offset=start).copy()
            if etype == _BOOL and int(raw.max()) > 1:
                self.fail(f"{what} holds a bool other than 0 or 1")
            return _frozen(raw.view(vt.dtype))
        left = self.end - self.pos
        if etype == _STRING:
            if n * MIN_STRING_BYTES > left:
                self.fail(f"{what} claims {n} strings but only {left} bytes remain")
            return self.string_array(n, what)
        # etype is ARRAY: each element is itself (u32 type, u64 count, elements).
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
        if n > MAX_NESTED_ARRAY_LEN:
            self.fail(f"{what} is an array of {n} arrays; at most {MAX_NESTED_ARRAY_LEN} are allowed")
        if n * MIN_ARRAY_BYTES > left:
            self.fail(f"{what} claims {n} arrays but only {left} bytes remain")
        items = []
        for i in range(n):
            inner_type = self.u32(f"element type of {what}[{i}]")
            inner_n = self.u64(f"length of {what}[{i}]")
            items.append(self.array(inner_type, inner_n, f"{what}[{i}]", depth + 1))
        return items

    def string_array(self, n: int, what: str) -> list[str]:
        # The hot loop of the reader (a vocabulary is 10^5 strings): locals only, one bounds check per item.
        buf, end, pos = self.buf, self.end, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(n):
            if end - pos < 8:
                self.pos = pos
                self.fail(f"truncated or corrupt: length of {what}[{i}] runs past the end of the file")
            stop = pos + 8 + unpack(buf, pos)[0]
            if stop > end:
                self.pos = pos
                self.fail(f"truncated or corrupt: {what}[{i}] runs past the end of the file")
            append(buf[pos + 8 : stop].decode("utf-8", "surrogateescape"))
            pos = stop
        self.pos = pos
        return out

    def key_value(self, index: int) -> tuple[str, tuple[int, ...], Any]:
        key = self.string(f"metadata key #{index}", cap=MAX_KEY_BYTES, strict=True)
        what = f"metadata {_show(key)}"
        vtype = self.u32(f"value type of {what}")
        if vtype != _ARRAY:
            return key, (vtype,), self.scalar(vtype, what)
        etype = self.u32(f"element type of {what}")
        n = self.u64(f"length of {what}")
        return key, (vtype, etype), self.array(etype, n, what, depth=1)

    # -- tensor infos ------------------------------------------------------------------------------------
    def tensor_info(self, index: int, alignment: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
        """Returns (name, type, ggml shape, n_elements, offset relative to the data section)."""
        name = self.string(f"name of tensor #{index}", cap=MAX_TENSOR_NAME_BYTES, strict=True)
        what = f"tensor {_show(name)}"
        n_dims = self.u32(f"n_dims of {what}")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"{what} has {n_dims} dimensions; 1 to {MAX_DIMS} are allowed")
        shape = struct.unpack_from(f"<{n_dims}q", self.buf, self.take(8 * n_dims, f"shape of {what}"))
        # ggml's own loader accepts 0, but then divides by ne[1..3] and breaks; no real tensor is empty.
        if min(shape) < 1:
            self.fail(f"{what} has shape {list(shape)}; every dimension must be at least 1")
        n_elements = 1
        for dim in shape:
            n_elements *= dim  # Python int: exact, then capped like ggml's int64 element count
        if n_elements > MAX_ELEMENTS:
            self.fail(f"{what} has shape {list(shape)}, {n_elements} elements; at most 2**63-1 are allowed")
        type_id = self.u32(f"type of {what}")
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            ggml_type = None
        if ggml_type is None or ggml_type not in TENSOR_TYPES:
            self.unsupported(f"{what} has ggml tensor type id {type_id}, which Ember does not know")
        block_size = TENSOR_TYPES[ggml_type].block_size
        if shape[0] % block_size:
            self.fail(f"{what} of type {ggml_type.name} has rows of {shape[0]} elements, "
                      f"not a multiple of its block size {block_size}")
        offset = self.u64(f"data offset of {what}")
        if offset % alignment:
            self.fail(f"{what} has data offset {offset}, not a multiple of the alignment {alignment}")
        return name, ggml_type, tuple(shape), n_elements, offset


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


class GGUFFile:
    """An open, validated GGUF file. Use open_gguf(path); usable as a context manager."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple[GGUFValueType, ...]]  # e.g. (UINT32,) or (ARRAY, STRING)
    metadata_spans: dict[str, tuple[int, int]]  # key -> [start, end) of its whole key/value record in the file
    tensors: dict[str, TensorInfo]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._data: np.ndarray | None = None
        try:
            with open(self.path, "rb") as fh:
                self.file_size = os.fstat(fh.fileno()).st_size
                if self.file_size < HEADER_SIZE:
                    raise GGUFError(f"{self.path}: not a GGUF file: only {self.file_size} bytes, "
                                    f"less than the {HEADER_SIZE}-byte header")
                # The map holds its own duplicate of the descriptor; the file object can close right away.
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ModelNotFoundError(f"{self.path}: is a directory, not a GGUF file") from None
        except OSError as err:
            raise GGUFError(f"{self.path}: cannot read: {err.strerror or err}") from None
        try:
            self._parse(_Parser(self._map, self.file_size, self.path))
        except BaseException:
            self.close()
            raise
        self._data = np.frombuffer(self._map, dtype=np.uint8)  # read-only, since the map is ACCESS_READ

    # -- parsing -----------------------------------------------------------------------------------------
    def _parse(self, p: _Parser) -> None:
        magic = bytes(p.buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        p.pos = 4
        self.version = p.u32("version")
        self._check_version()
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata count")
        left = p.end - p.pos
        if n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > left:
            p.fail(f"header claims {n_tensors} tensors and {n_kv} metadata pairs, more than the "
                   f"remaining {left} bytes can hold")

        self.metadata = {}
        self.metadata_types = {}
        self.metadata_spans = {}
        for i in range(n_kv):
            start = p.pos
            key, types, value = p.key_value(i)
            self.metadata_spans[key] = (start, p.pos)
            if key in self.metadata:
                p.fail(f"duplicate metadata key {_show(key)}")
            self.metadata[key] = value
            self.metadata_types[key] = tuple(GGUFValueType(t) for t in types)
        self._check_known_keys()
        self.alignment = self.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if self.alignment == 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: {ALIGNMENT_KEY} is {self.alignment}, not a power of two")

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            info = p.tensor_info(i, self.alignment)
            if info[0] in names:
                p.fail(f"duplicate tensor name {_show(info[0])}")
            names.add(info[0])
            infos.append(info)

        self.data_offset = -(-p.pos // self.alignment) * self.alignment
        self.tensors = {}
        for name, ggml_type, shape, n_elements, rel_offset in infos:
            block_size, type_size = TENSOR_TYPES[ggml_type]
            self.tensors[name] = TensorInfo(name, ggml_type, shape, n_elements, self.data_offset + rel_offset,
                                            n_elements // block_size * type_size)
        self._check_tensor_placement()

    def _check_version(self) -> None:
        v = self.version
        swapped = int.from_bytes(v.to_bytes(4, "little"), "big")
        if v & 0xFFFF == 0 and swapped in (1, 2, 3):
            raise UnsupportedError(f"{self.path}: big-endian GGUF (version {swapped}) is not supported; "
                                   f"convert the model as little-endian")
        if v == 1:
            raise UnsupportedError(f"{self.path}: GGUF version 1 is not supported; re-convert the model with a "
                                   f"current llama.cpp")
        if v == 0:
            raise GGUFError(f"{self.path}: invalid GGUF version 0")
        if v not in SUPPORTED_VERSIONS:
            raise UnsupportedError(f"{self.path}: GGUF version {v} is not supported (Ember reads versions 2 and 3)")

    def _check_known_keys(self) -> None:
        """Keys other modules rely on get their documented types here, so users of `metadata` need not."""
        md, types = self.metadata, self.metadata_types
        for key, expected in KNOWN_KEY_TYPES.items():
            if key in types and types[key] != expected:
                raise GGUFError(f"{self.path}: metadata {key} must be {_type_name(expected)}, "
                                f"not {_type_name(types[key])}")
        for key, found in types.items():
            if (key.startswith(TOKEN_ID_PREFIX) and key.endswith(TOKEN_ID_SUFFIX)
                    and (len(found) != 1 or found[0] not in INTEGER_VALUE_TYPES)):
                raise GGUFError(f"{self.path}: metadata {_show(key)} must be an integer, not {_type_name(found)}")
        for key in PER_TOKEN_KEYS:
            if key not in md:
                continue
            if TOKENS_KEY not in md:
                raise GGUFError(f"{self.path}: metadata {key} is present but {TOKENS_KEY} is missing")
            if len(md[key]) != len(md[TOKENS_KEY]):
                raise GGUFError(f"{self.path}: metadata {key} has {len(md[key])} entries but there are "
                                f"{len(md[TOKENS_KEY])} tokens")
        if ARCHITECTURE_KEY not in md:
            raise GGUFError(f"{self.path}: metadata {ARCHITECTURE_KEY} is missing")
        if not md[ARCHITECTURE_KEY]:
            raise GGUFError(f"{self.path}: metadata {ARCHITECTURE_KEY} is empty")

    def _check_tensor_placement(self) -> None:
        if not self.tensors:
            return
        if self.data_offset > self.file_size:
            raise GGUFError(f"{self.path}: tensor data would start at byte {self.data_offset}, past the end of "
                            f"the file ({self.file_size} bytes)")
        prev: TensorInfo | None = None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            end = t.offset + t.nbytes
            if end > self.file_size:
                raise GGUFError(f"{self.path}: tensor {_show(t.name)} data [{t.offset}, {end}) runs past the end "
                                f"of the file ({self.file_size} bytes); the file is truncated or corrupt")
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise GGUFError(f"{self.path}: tensors {_show(prev.name)} and {_show(t.name)} overlap in the file")
            prev = t

    # -- public API --------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.metadata[ARCHITECTURE_KEY]

    def _info(self, name: str) -> TensorInfo:
        if self._data is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: has no tensor {_show(name)}")
        return info

    def metadata_record(self, key: str) -> bytes:
        """The raw bytes of one key/value record as stored (key string, value type, value), for copying a
        value into another GGUF file without decoding and re-encoding it."""
        start, end = self.metadata_spans[key]
        assert self._map is not None, "file is closed"
        return bytes(self._map[start:end])

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes: a read-only 1-D uint8 view on the map, exactly nbytes long."""
        info = self._info(name)
        return self._data[info.offset : info.offset + info.nbytes]

    def tensor_array(self, name: str) -> np.ndarray:
        """A read-only view shaped in numpy order (reversed ggml shape) for plain types (BF16 as uint16 bits);
        uint8 [n_rows, row_bytes] for block-quantized types."""
        info = self._info(name)
        raw = self._data[info.offset : info.offset + info.nbytes]
        dtype = PLAIN_DTYPES.get(info.ggml_type)
        if dtype is None:
            return raw.reshape(info.n_rows, info.row_bytes)
        return raw.view(dtype).reshape(info.shape[::-1])

    def close(self) -> None:
        """Drop this file's hold on the map. Views handed out keep it mapped until they are garbage."""
        self._data = None
        mapping, self._map = self._map, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # views still exist; the map is unmapped when the last one goes

    def drop_resident_pages(self) -> None:
        """Let the kernel drop this mapping's resident pages (MADV_DONTNEED on a read-only file map: the data
        stays in the page cache and is faulted back in on the next access). After loading, the weights live
        in repacked copies and only embedding rows are read from the map, so the file's pages need not count
        in the process's RSS."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    @property
    def closed(self) -> bool:
        return self._data is None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tensors)} tensors"
        return f"<GGUFFile {str(self.path)!r} v{getattr(self, 'version', '?')} {state}>"


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file. Raises ModelNotFoundError (no such file), GGUFError (corrupt, truncated
    or crafted), UnsupportedError (valid but unsupported: GGUF v1, big-endian, unknown tensor type)."""
    return GGUFFile(path)
