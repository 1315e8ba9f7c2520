"""`ember quantize`: convert a GGUF model to another file type, with llama.cpp's tensor data bit for bit.

    quantize_file(src, dst, "Q4_K_M", allow_requantize=False, threads=None, progress=None) -> QuantizeResult
    quantize_array(values, qtype, threads=1) -> bytes of the tensor in ggml layout

What happens, as in llama.cpp's llama_model_quantize (llama-quant.cpp):
  1. read the model with ember.gguf (validated, memory-mapped);
  2. order the tensors as llama.cpp does and choose each one's type (ember.quant.mix);
  3. refuse up front, unless allow_requantize, if a tensor that is already quantized would change type
     (llama.cpp: "requantizing from type X is disabled") - F16/BF16/F32 sources are never "requantized";
  4. write the output with gguf.GGUFWriter: every metadata pair of the input in its order and with its value
     types, then general.quantization_version = 2 and general.file_type = the new llama_ftype (moved to the
     end, as llama.cpp's output has them); split.* keys dropped. Tensors keep their names and shapes; a tensor
     whose type does not change is copied byte for byte, the others are converted in work items of rows run
     on a thread pool (numpy and torch release the GIL inside their loops): each item reads its rows as
     float32 (F32/F16/BF16 exactly with numpy; quantized types with ember.quant.dequant, bit-exact as ggml's
     to_float), checks them, and quantizes them with ember.quant.simple / ember.quant.kquants straight into
     the tensor's output buffer. Reading inside the items keeps the pool busy (no serial slab step) and the
     float32 copy of an item in cache.
The file is written to DST.tmp-<pid> and renamed when complete, so a failure never leaves a half-written DST.

Tensors with NaN/inf values are refused rather than converted (llama.cpp's output validation rejects many of
them too, e.g. every F16 one; quantizing such weights is never what a user wants).
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, GGUFWriter
from gguf.gguf_writer import WriterState

from ember.errors import GGUFError, InvalidParameterError, UnsupportedError
from ember.gguf import open_gguf
from ember.quant.formats import format_of
from ember.quant.kquants import KQUANTIZERS, QK_K
from ember.quant.mix import UNQUANTIZED, FileType, ModelInfo, TensorPlan, choose_types, file_type
from ember.quant.simple import SIMPLE_QUANTIZERS

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
FILE_TYPE_KEY = "general.file_type"
QUANTIZATION_VERSION_KEY = "general.quantization_version"
ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# Weights per quantizer call: big enough that numpy's per-call overhead is small (the K-quant searches make
# ~20 calls per candidate scale, Q3_K's ~30 per element on per-sub-block vectors), small enough that a
# chunk's float32 temporaries (a handful of chunk-sized arrays) stay in cache. Measured best on x86 (Q3_K's
# later descent rounds run on a fifth of the sub-blocks and less, so it wants the larger vectors).
CHUNK_WEIGHTS = 1 << 16
CHUNK_WEIGHTS_K = 1 << 18
CHUNK_WEIGHTS_BY_TYPE = {T.Q3_K: 1 << 20}
# Weights per work item of quantize_file (read, check, quantize), at most: bounds the float32 working set
# per thread; tensors are split into at least ITEMS_PER_THREAD items per thread where they are big enough,
# so that threads finishing at different times still share the work.
ITEM_WEIGHTS = 1 << 20
ITEMS_PER_THREAD = 4
MIN_ITEM_WEIGHTS = 1 << 16
# Tensors at least this big are split into items across the threads; smaller ones are converted whole, several
# tensors at a time.
BIG_TENSOR_WEIGHTS = 1 << 22

Quantizer = Callable[[np.ndarray], np.ndarray]


def _f32_blocks(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(x.shape[0], -1)


# ggml type -> (block size, quantizer of float32 blocks [nb, block] -> bytes [nb, type_size]).
QUANTIZERS: dict[T, tuple[int, Quantizer]] = {
    T.F32: (1, _f32_blocks),
    **{T[name]: entry for name, entry in SIMPLE_QUANTIZERS.items()},
    **{T[name]: (QK_K, fn) for name, fn in KQUANTIZERS.items()},
}


@dataclass(frozen=True)
class TensorProgress:
    """Reported to the progress callback after each tensor is written."""

    index: int  # 1-based
    count: int
    name: str
    shape: tuple[int, ...]  # ggml order
    src_type: str
    dst_type: str
    src_bytes: int
    dst_bytes: int
    seconds: float


@dataclass(frozen=True)
class QuantizeResult:
    file_type: str
    n_tensors: int
    src_bytes: int  # tensor data only
    dst_bytes: int
    seconds: float
    fallbacks: tuple[str, ...]  # tensors whose rows did not fit the chosen type (llama.cpp warns about them)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def quantize_array(values: np.ndarray, qtype: T, threads: int = 1, pool: ThreadPoolExecutor | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Float32 values [rows, row_len] (any shape whose last axis is the row) -> the tensor's bytes (uint8,
    1-D) in `qtype`, exactly as ggml_quantize_chunk writes them without an importance matrix. `out`, if
    given, is a contiguous 1-D uint8 buffer of exactly that many bytes to fill (and is returned)."""
    qt = T(int(qtype))
    if qt not in QUANTIZERS:
        raise UnsupportedError(f"Ember cannot quantize to {qt.name}")
    block, fn = QUANTIZERS[qt]
    fmt = format_of(qt)
    row_len = values.shape[-1]
    fmt.row_bytes(row_len)  # raises if the rows cannot be blocked
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, block)
    if out is None:
        out = np.empty(blocks.shape[0] * fmt.type_size, dtype=np.uint8)
    if out.size != blocks.shape[0] * fmt.type_size:
        raise ValueError(f"out holds {out.size} bytes; {blocks.shape[0] * fmt.type_size} are needed")
    result = out
    out = out.reshape(blocks.shape[0], fmt.type_size)
    step = max(1, CHUNK_WEIGHTS_BY_TYPE.get(qt, CHUNK_WEIGHTS_K if block == QK_K else CHUNK_WEIGHTS) // block)
    starts = range(0, blocks.shape[0], step)

    def work(s: int) -> None:
        out[s:s + step] = fn(blocks[s:s + step])

    if pool is None and threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=threads) as own:
            list(own.map(work, starts))
    elif pool is not None and len(starts) > 1:
        list(pool.map(work, starts))
    else:
        for s in starts:
            work(s)
    return result


# -- metadata ---------------------------------------------------------------------------------------------------

class _CopyingWriter(GGUFWriter):
    """A GGUFWriter whose metadata records may be raw bytes copied from the source file: packing a 49k-token
    vocabulary value by value through gguf-py costs ~0.3 s, a copy nothing. Raw records are the bytes the
    packer would produce (GGUF has one encoding per value), so the output is the same."""

    raw_records: dict[str, bytes]

    def write_kv_data_to_file(self) -> None:
        raw = getattr(self, "raw_records", {})
        assert self.fout is not None and len(self.fout) == 1, "split output is not used here"
        kv_bytes = bytearray()
        for key, val in self.kv_data[0].items():
            if key in raw:
                kv_bytes += raw[key]
            else:
                kv_bytes += self._pack_val(key, GGUFValueType.STRING, add_vtype=False)
                kv_bytes += self._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type)
        self.fout[0].write(kv_bytes)
        self.flush()
        self.state = WriterState.KV_DATA


def _copy_metadata(w: _CopyingWriter, f: Any, ft: FileType) -> None:
    """Every key in file order (general.architecture is added first by GGUFWriter itself), then
    general.quantization_version and general.file_type at the end - llama.cpp's gguf_set_val re-appends a key
    it sets, so that is where they land in its output too. Empty arrays cannot be written by GGUFWriter: they
    are dropped. Values are copied as raw records from the source."""
    md, types = f.metadata, f.metadata_types
    w.raw_records = {}
    for key, value in md.items():
        t = types[key]
        if key in (ARCHITECTURE_KEY, FILE_TYPE_KEY, QUANTIZATION_VERSION_KEY, *SPLIT_KEYS):
            continue
        if t[0] == GGUFValueType.ARRAY and len(value) == 0:
            continue
        # A placeholder value keeps the key's place in GGUFWriter's ordered table; the record replaces it.
        w.add_key_value(key, 0, GGUFValueType.UINT8)
        w.raw_records[key] = f.metadata_record(key)
    w.add_uint32(QUANTIZATION_VERSION_KEY, QUANTIZATION_VERSION)
    w.add_uint32(FILE_TYPE_KEY, ft.ftype)
    if ALIGNMENT_KEY in md:
        w.data_alignment = int(md[ALIGNMENT_KEY])


# -- the driver -------------------------------------------------------------------------------------------------

def plan_file(f: Any, ft: FileType) -> list[TensorPlan]:
    """Types for every tensor of an open GGUFFile, in llama.cpp's order."""
    model = ModelInfo.from_metadata(f.metadata)
    return choose_types([(t.name, t.shape, t.ggml_type) for t in f.tensors.values()], ft, model)


def check_requantize(plans: list[TensorPlan], allow_requantize: bool) -> None:
    if allow_requantize:
        return
    for p in plans:
        if p.convert and p.src_type not in UNQUANTIZED:
            raise InvalidParameterError(
                f"the input is already quantized (tensor {p.name} is {p.src_type.name}); requantizing loses "
                f"quality and is disabled - pass --allow-requantize to do it anyway")


def _float_rows(f: Any, p: TensorPlan, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor as float32 [n, row_len] (a read-only view for F32 sources). F16 and
    BF16 widen exactly with numpy; only quantized sources need ember.quant.dequant (and so torch)."""
    row_len = p.shape[0]
    if p.src_type == T.F32:
        return f.tensor_array(p.name).reshape(-1, row_len)[start:stop]
    raw = f.tensor_bytes(p.name)
    if p.src_type == T.F16:
        return raw.view(np.float16).reshape(-1, row_len)[start:stop].astype(np.float32)
    if p.src_type == T.BF16:  # the top half of a float32
        bits = raw.view(np.uint16).reshape(-1, row_len)[start:stop].astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    from ember.quant.dequant import dequantize_rows

    return dequantize_rows(raw, p.src_type, row_len, start, stop).numpy()


def _convert(f: Any, p: TensorPlan, pool: ThreadPoolExecutor | None, n_threads: int) -> np.ndarray:
    row_len = p.shape[0]
    n_rows = int(np.prod(p.shape[1:], dtype=np.int64)) if len(p.shape) > 1 else 1
    dst_row = format_of(p.dst_type).row_bytes(row_len)
    out = np.empty(n_rows * dst_row, dtype=np.uint8)
    share = -(-n_rows * row_len // (n_threads * ITEMS_PER_THREAD))
    step = max(1, min(ITEM_WEIGHTS, max(MIN_ITEM_WEIGHTS, share)) // row_len)

    def work(start: int) -> None:
        stop = min(n_rows, start + step)
        x = _float_rows(f, p, start, stop)
        if not np.isfinite(x).all():
            raise GGUFError(f"{f.path}: tensor {p.name} holds NaN or infinite values; cannot quantize it")
        quantize_array(x, p.dst_type, out=out[start * dst_row:stop * dst_row])

    starts = range(0, n_rows, step)
    if pool is not None and len(starts) > 1:
        list(pool.map(work, starts))  # re-raises the first failure
    else:
        for s in starts:
            work(s)
    return out


def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str | FileType, *,
                  allow_requantize: bool = False, threads: int | None = None,
                  progress: Callable[[TensorProgress], None] | None = None) -> QuantizeResult:
    """Quantize the GGUF model `src` to file type `ftype` (a llama.cpp name such as "Q4_K_M") into `dst`."""
    ft = ftype if isinstance(ftype, FileType) else file_type(ftype)
    src, dst = Path(src), Path(dst)
    t_start = time.perf_counter()
    with open_gguf(src) as f:
        if dst.exists() and dst.resolve() == src.resolve():
            raise InvalidParameterError(f"{dst}: the output must not be the input file")
        plans = plan_file(f, ft)
        check_requantize(plans, allow_requantize)
        n_threads = threads or default_threads()
        tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
        w = _CopyingWriter(tmp, f.architecture)
        src_total = dst_total = 0
        try:
            _copy_metadata(w, f, ft)
            for p in plans:
                numpy_shape = tuple(reversed(p.shape))
                nbytes = format_of(p.dst_type).row_bytes(p.shape[0]) * (int(np.prod(p.shape)) // p.shape[0])
                w.add_tensor_info(p.name, numpy_shape, np.dtype(np.float32), nbytes, raw_dtype=p.dst_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            pool = ThreadPoolExecutor(max_workers=n_threads) if n_threads > 1 else None
            # Small tensors are converted whole, several at once (a per-tensor barrier would leave threads idle
            # on models made of many small matrices); big ones are split into items across the pool. One
            # writer thread writes tensor i while later ones are converted; tensors reach the file in order,
            # and at most `ahead` converted tensors wait in memory.
            writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-quantize-write")
            tensors = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="ember-quantize-tensor")
            ahead = 2 * n_threads
            written = None

            def start(p: TensorPlan) -> Any:
                if not p.convert:
                    return f.tensor_bytes(p.name)
                if pool is not None and int(np.prod(p.shape)) >= BIG_TENSOR_WEIGHTS:
                    return _convert(f, p, pool, n_threads)  # in this thread, items on the pool
                return tensors.submit(_convert, f, p, None, 1)

            try:
                pending: deque[tuple[TensorPlan, Any, float]] = deque()
                queue_at = 0
                for i in range(1, len(plans) + 1):
                    while queue_at < len(plans) and len(pending) < ahead:
                        p = plans[queue_at]
                        pending.append((p, start(p), time.perf_counter()))
                        queue_at += 1
                    p, job, t0 = pending.popleft()
                    data = job.result() if hasattr(job, "result") else job
                    if written is not None:
                        written.result()  # re-raises a failed write
                    written = writer.submit(w.write_tensor_data, data)
                    src_bytes = f.tensors[p.name].nbytes
                    src_total += src_bytes
                    dst_total += data.nbytes
                    if progress is not None:
                        progress(TensorProgress(i, len(plans), p.name, p.shape, p.src_type.name, p.dst_type.name,
                                                src_bytes, data.nbytes, time.perf_counter() - t0))
                if written is not None:
                    written.result()
            finally:
                tensors.shutdown(cancel_futures=True)
                writer.shutdown()  # waits: the file is not closed or removed under a running write
                if pool is not None:
                    pool.shutdown()
            w.close()
            os.replace(tmp, dst)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
    fallbacks = tuple(p.name for p in plans if p.fell_back)
    return QuantizeResult(ft.name, len(plans), src_total, dst_total, time.perf_counter() - t_start, fallbacks)
