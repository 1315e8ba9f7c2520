"""ember.quant against gguf-py (the reference: a numpy transcription of ggml-quants.c).

Comparisons of dequantize() with gguf-py are bit-exact (float32 bit patterns, so even the sign of zero must
agree): every format's product (q - offset) * scale is exact in float32 (or, for Q6_K, rounds once on the same
operands in both) and the only other rounding is one final add on identical operands, so no tolerance is
needed - see ember/quant/dequant.py. Reconstructions from the int4/int8 decompositions are compared by value
(torch.equal): (q - 8) * d + 0 gives +0.0 where ggml's (q - 8) * d gives -0.0 for a negative d, and the
kernels consuming them do not care.
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as T

import ember.quant.dequant as dq
from ember.errors import GGUFError, UnsupportedError
from ember.quant import (FAST_TYPES, FORMATS, dequantize, dequantize_rows, format_of, int4_groups, int8_groups,
                         split_int4_planes)

QUANTIZABLE = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]

# Byte offsets of the fp16 fields in each block (ggml-common.h's block_* structs), restated here rather than
# taken from ember so that the random blocks below get finite, modest scales where the format has them.
FP16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,),
}


def bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_bit_exact(got: torch.Tensor, ref: np.ndarray) -> None:
    ref = np.asarray(ref, dtype=np.float32).reshape(tuple(got.shape))
    assert got.dtype == torch.float32
    bad = np.flatnonzero(bits(got) != bits(ref))
    if bad.size:
        i = bad[0]
        pytest.fail(f"{bad.size} mismatches, first at {i}: {got.reshape(-1)[i].item()} vs {ref.reshape(-1)[i]}")


def weights(rng: np.random.Generator, rows: int, cols: int, outlier: bool = True) -> np.ndarray:
    """Awkward data: rows with scales 1e-4..1e2, an all-zero and a constant block, blocks that are all
    positive or all negative (Q4_1/Q5_1 mins of both signs), and optionally one 1e3 outlier among tiny
    weights. Needs rows >= 5 and cols >= 64."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= np.logspace(-4, 2, rows, dtype=np.float32)[:, None]
    x[0, :32] = 0.0
    x[1, :32] = 0.75
    x[2, 32:64] = np.abs(x[2, 32:64]) + 3.0
    x[3, 32:64] = -np.abs(x[3, 32:64]) - 3.0
    if outlier:
        x[4, 5] = 1e3
    return x


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int, related: bool = False) -> np.ndarray:
    """Uniformly random block bytes (every code and sub-scale pattern occurs) with sane fp16 scale fields:
    finite, both signs, magnitudes 1e-4..1e-1, drawn independently - or, with `related`, the second fp16
    field within a factor 4 of the first, as a quantizer's d and min/dmin of one block are."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    first = 10.0 ** rng.uniform(-4, -1, n_blocks)
    for off in FP16_FIELDS[qtype]:
        size = first * 2.0 ** rng.uniform(-2, 2, n_blocks) if related and off != FP16_FIELDS[qtype][0] else \
            10.0 ** rng.uniform(-4, -1, n_blocks)
        val = rng.choice([-1.0, 1.0], n_blocks) * size
        raw[:, off:off + 2] = val.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        first = first if off != FP16_FIELDS[qtype][0] else np.abs(val)
    return raw


# -- the format table -------------------------------------------------------------------------------------

def test_format_table_matches_gguf_py() -> None:
    assert set(FORMATS) == set(GGML_QUANT_SIZES), "a ggml type is missing from (or extra in) FORMATS"
    for qtype, fmt in FORMATS.items():
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype], qtype.name
        assert fmt.name == qtype.name and fmt.type_id == int(qtype) and fmt.qtype is qtype
        assert fmt.bits_per_weight == 8 * fmt.type_size / fmt.block_size
    assert FORMATS[T.Q4_0].bits_per_weight == 4.5 and FORMATS[T.Q6_K].bits_per_weight == 6.5625


def test_format_docstring_table_agrees_with_data() -> None:
    import ember.quant.formats as formats_module

    rows = re.findall(r"^\| (\w+)\s*\|\s*(\d+) \|\s*(\d+) \|\s*(\d+) \|\s*([\d.]+)\s*\|", formats_module.__doc__, re.M)
    documented = {name: (int(tid), int(bs), int(ts), float(bpw)) for name, tid, bs, ts, bpw in rows}
    assert len(documented) >= len(FORMATS)
    for fmt in FORMATS.values():
        assert documented[fmt.name] == (fmt.type_id, fmt.block_size, fmt.type_size, fmt.bits_per_weight)


def test_format_of_unknown_types() -> None:
    assert format_of(8) is FORMATS[T.Q8_0]
    for bad in (4, 99):  # 4 was Q4_2, retired; 99 never existed
        with pytest.raises(UnsupportedError, match=f"ggml type id {bad}"):
            format_of(bad)


# -- dequantize vs gguf-py ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_quantized_data_bit_exact(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    x = weights(rng, 24, 256)
    raw = quants.quantize(x, qtype)
    got = dequantize(raw.view(np.uint8), qtype, (256, 24))
    assert got.shape == (24, 256)
    assert_bit_exact(got, quants.dequantize(raw, qtype))
    # and the decode is a real one: close to the source data (loose: the 1e-4 row has fp16-subnormal scales)
    err = np.abs(got.numpy() - x).max(axis=1) / np.abs(x).max(axis=1)
    assert err.max() < (0.02 if qtype in (T.F16, T.BF16, T.Q8_0) else 0.2)


@pytest.mark.parametrize("qtype", list(FP16_FIELDS), ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(qtype: T) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(100 + int(qtype))
    rows, cols = 6, 4 * 256
    raw = random_blocks(rng, qtype, rows * cols // block_size)
    got = dequantize(raw, qtype, (cols, rows))
    assert_bit_exact(got, quants.dequantize(raw.reshape(rows, -1), qtype))
    if qtype in FAST_TYPES:
        assert torch.isfinite(got).all() and got.abs().max() > 0


def test_q8_0_extreme_codes() -> None:
    raw = np.zeros((2, 34), np.uint8)
    raw[:, 0:2] = np.array([0.5, -2.0], np.float16).view(np.uint8).reshape(2, 2)
    raw[:, 2:] = np.arange(-128, 128, 8, dtype=np.int8).view(np.uint8)
    got = dequantize(raw, T.Q8_0, (64,))
    assert got[0].item() == -64.0 and got[32].item() == 256.0 and got[63].item() == -2.0 * 120


def test_plain_types_and_other_dtypes() -> None:
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    got = dequantize(x, T.F32, (40, 3))  # a float32 array (as GGUFReader hands out F32 tensors)
    assert torch.equal(got, torch.from_numpy(x)) and got.data_ptr() != x.ctypes.data
    h = x.astype(np.float16)
    assert_bit_exact(dequantize(h, T.F16, (40, 3)), h.astype(np.float32))
    assert_bit_exact(dequantize(torch.from_numpy(h), T.F16, (40, 3)), h.astype(np.float32))


def test_fallback_type_goes_through_gguf_py() -> None:
    assert T.IQ4_NL not in FAST_TYPES
    rng = np.random.default_rng(7)
    raw = random_blocks(rng, T.IQ4_NL, 3 * 8)
    assert_bit_exact(dequantize(raw, T.IQ4_NL, (256, 3)), quants.dequantize(raw.reshape(3, -1), T.IQ4_NL))


def test_unsupported_and_malformed() -> None:
    with pytest.raises(UnsupportedError, match="I8"):
        dequantize(np.zeros(32, np.uint8), T.I8, (32,))
    with pytest.raises(UnsupportedError, match="ggml type id 5"):
        dequantize(np.zeros(32, np.uint8), 5, (32,))
    with pytest.raises(GGUFError, match="needs 36 bytes"):
        dequantize(np.zeros(35, np.uint8), T.Q4_0, (64,))
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        dequantize(np.zeros(18, np.uint8), T.Q4_0, (48,))


# -- row chunks, chunk boundaries, read-only input ------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q8_0, T.Q3_K, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_chunked_decoding_matches_whole(qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(3)
    rows, cols = 37, 512
    raw = (random_blocks(rng, qtype, rows * cols // block_size) if qtype in FP16_FIELDS
           else rng.standard_normal(rows * cols).astype(np.float16).view(np.uint8))
    ref = quants.dequantize(raw.reshape(rows, -1), qtype)
    # Tiny chunks (and super-chunks of 3 of them) with ragged tails exercise every loop boundary.
    monkeypatch.setattr(dq, "CHUNK_WEIGHTS", 3 * 256)
    monkeypatch.setattr(dq, "PARAM_CHUNKS", 3)
    assert_bit_exact(dequantize(raw, qtype, (cols, rows)), ref)
    out = torch.full((rows, cols), float("nan"))
    for start in range(0, rows, 10):
        stop = min(start + 10, rows)
        dequantize_rows(raw.reshape(rows, -1), qtype, cols, start, stop, out=out[start:stop])
    assert_bit_exact(out, ref)
    assert dequantize_rows(raw, qtype, cols, 5, 5).shape == (0, cols)
    with pytest.raises(ValueError):
        dequantize_rows(raw, qtype, cols, 30, rows + 1)


def test_read_only_memmap_input_is_not_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    raw = random_blocks(rng, T.Q5_0, 64)
    path = tmp_path / "t.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        got = dequantize(mm, T.Q5_0, (256, 8))
        q, s, z = split_int4_planes(mm, T.Q5_0, (256, 8))[1]
    assert_bit_exact(got, quants.dequantize(raw.reshape(8, -1), T.Q5_0))
    assert np.array_equal(np.fromfile(path, np.uint8), raw.reshape(-1))


# -- integer-group decompositions -----------------------------------------------------------------------

def expand(t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(32, dim=1)


def int4_value(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - 8) * expand(scale) + expand(zero)


def q4_raw(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """Blocks as a quantizer makes them: gguf-py's quantizer where it has one, else random codes with a
    related d / dmin pair (see random_blocks)."""
    rng = np.random.default_rng(seed)
    if qtype == T.Q4_K:
        return random_blocks(rng, qtype, rows * cols // 256, related=True)
    return quants.quantize(weights(rng, rows, cols, outlier=False), qtype)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_int4_groups_reconstruct_exactly(qtype: T) -> None:
    rows, cols = 16, 512
    raw = q4_raw(qtype, rows, cols, 21)
    q, scale, zero = int4_groups(raw, qtype, (cols, rows))
    assert q.dtype == torch.uint8 and q.shape == (rows, cols) and int(q.max()) <= 15
    assert scale.shape == zero.shape == (rows, cols // 32) and scale.dtype == zero.dtype == torch.float32
    assert len(torch.unique(q)) == 16
    assert torch.equal(int4_value(q, scale, zero), dequantize(raw, qtype, (cols, rows)))
    if qtype == T.Q4_0:
        assert not zero.any()


def test_int4_groups_exact_exactly_when_zero_is_representable() -> None:
    """Q4_1's zero = m + 8d must round for a block whose d dwarfs m (the 1e3 outlier among 1e-4 weights).
    Then, and only then, the int4 form may differ from ggml - by at most one rounding of zero."""
    rows, cols = 16, 256
    raw = quants.quantize(weights(np.random.default_rng(21), rows, cols, outlier=True), T.Q4_1)
    q, scale, zero = int4_groups(raw, T.Q4_1, (cols, rows))
    fields = raw.reshape(rows, cols // 32, 20)[:, :, 0:4].copy().view(np.float16).astype(np.float64)
    exact_zero = 8 * fields[..., 0] + fields[..., 1]  # exact in float64
    representable = torch.from_numpy(exact_zero.astype(np.float32).astype(np.float64) == exact_zero)
    assert not representable.all() and representable.sum() >= representable.numel() - 2
    got, ref = int4_value(q, scale, zero), dequantize(raw, T.Q4_1, (cols, rows))
    same = (got == ref).view(rows, -1, 32).all(dim=-1)
    assert same[representable].all()
    ulp = torch.from_numpy(np.spacing(np.abs(zero.numpy()))).repeat_interleave(32, dim=1)
    assert ((got - ref).abs() <= ulp).all()


def test_int8_groups_reconstruct_exactly() -> None:
    rows, cols = 8, 256
    raw = random_blocks(np.random.default_rng(5), T.Q8_0, rows * cols // 32)
    q, d = int8_groups(raw, T.Q8_0, (cols, rows))
    assert q.dtype == torch.int8 and q.shape == (rows, cols) and d.shape == (rows, cols // 32)
    assert np.array_equal(q.numpy().reshape(-1, 32), raw[:, 2:].view(np.int8))
    assert torch.equal(q.float() * expand(d), dequantize(raw, T.Q8_0, (cols, rows)))


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "random_blocks"])
def test_split_int4_planes_exact(qtype: T, source: str) -> None:
    rows, cols = 12, 256
    rng = np.random.default_rng(31)
    raw = (quants.quantize(weights(rng, rows, cols, outlier=False), qtype) if source == "quantized"
           else random_blocks(rng, qtype, rows * cols // 32, related=True))
    planes = split_int4_planes(raw, qtype, (cols, rows))
    assert len(planes) == 2
    for q, scale, zero in planes:
        assert q.dtype == torch.uint8 and q.shape == (rows, cols) and int(q.max()) <= 15
    total = int4_value(*planes[0]) + int4_value(*planes[1])
    assert torch.equal(total, dequantize(raw, qtype, (cols, rows)))
    assert len(split_int4_planes(q4_raw(T.Q4_1, 8, 64, 1), T.Q4_1, (64, 8))) == 1


def test_decompositions_reject_other_types() -> None:
    raw = np.zeros(34, np.uint8)
    with pytest.raises(UnsupportedError, match="Q8_0"):
        int4_groups(raw, T.Q8_0, (32,))
    with pytest.raises(UnsupportedError, match="Q4_0"):
        int8_groups(np.zeros(18, np.uint8), T.Q4_0, (32,))
    with pytest.raises(UnsupportedError, match="Q6_K"):
        split_int4_planes(np.zeros(210, np.uint8), T.Q6_K, (256,))


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4 kernel in this torch")
def test_int4_groups_drive_torchs_int4_kernel() -> None:
    """The convention matches the consumer: torch's kernel on (q, scale, zero) computes x @ W.T."""
    rows, cols = 64, 256  # N output features, K inputs
    raw = q4_raw(T.Q4_K, rows, cols, 9)
    q, scale, zero = int4_groups(raw, T.Q4_K, (cols, rows))
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).contiguous()  # [K/32, N, 2]
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0))
    y = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros)
    ref = x.double() @ dequantize(raw, T.Q4_K, (cols, rows)).double().t()
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


# -- the reference models ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def model_tensors(path: Path) -> list[tuple[str, T, tuple[int, ...], np.ndarray]]:
    """(name, qtype, ggml shape, raw bytes) per tensor, through ember's reader when it is there (gguf-py's
    GGUFReader otherwise: correct but it takes ~15 s to parse gemma3's vocabulary)."""
    try:
        from ember.gguf.reader import open_gguf
    except ImportError:
        reader = GGUFReader(path)
        return [(t.name, T(t.tensor_type), tuple(int(s) for s in t.shape), t.data) for t in reader.tensors]
    f = open_gguf(path)
    return [(name, info.ggml_type, tuple(info.shape), f.tensor_bytes(name)) for name, info in f.tensors.items()]


def check_model(path: Path, expected_types: set[T]) -> set[T]:
    """Every tensor of the expected types: the first and last rows (about 16K weights each, so the test stays
    fast) bit-exact against gguf-py, and the int4/int8 decompositions exact on those rows."""
    seen = set()
    for name, qtype, shape, raw in model_tensors(path):
        if qtype not in expected_types:
            continue
        seen.add(qtype)
        fmt = FORMATS[qtype]
        row_len, row_bytes = shape[0], fmt.row_bytes(shape[0])
        raw = np.asarray(raw).reshape(-1).view(np.uint8).reshape(-1, row_bytes)
        n_rows = raw.shape[0]
        k = min(n_rows, max(1, 16384 // row_len))
        for start in sorted({0, n_rows - k}):
            part = raw[start:start + k]
            got = dequantize_rows(raw, qtype, row_len, start, start + k)
            assert_bit_exact(got, quants.dequantize(part, qtype))
            if qtype in (T.Q4_0, T.Q4_1, T.Q4_K):
                assert torch.equal(int4_value(*int4_groups(part, qtype, (row_len, k))), got), name
            if qtype == T.Q8_0:
                q, d = int8_groups(part, qtype, (row_len, k))
                assert torch.equal(q.float() * expand(d), got), name
            if qtype in (T.Q5_0, T.Q5_1, T.Q8_0):
                total = sum(int4_value(*p) for p in split_int4_planes(part, qtype, (row_len, k)))
                assert torch.equal(total, got), name
    return seen


@pytest.mark.model
def test_smollm2_tensors(smollm2_path: Path) -> None:
    expected = {T.Q4_1, T.Q8_0}
    assert check_model(smollm2_path, expected) == expected


@pytest.mark.model
def test_gemma3_tensors(gemma3_path: Path) -> None:
    expected = {T.Q5_0, T.Q4_K, T.Q6_K, T.Q8_0}
    assert check_model(gemma3_path, expected) == expected


@pytest.mark.model
def test_whole_tensor_shape_from_model(gemma3_path: Path) -> None:
    for name, qtype, shape, raw in model_tensors(gemma3_path):
        if name == "blk.0.ffn_down.weight":
            got = dequantize(raw, qtype, shape)
            assert got.shape == tuple(reversed(shape)) and qtype == T.Q6_K
            assert_bit_exact(got, quants.dequantize(np.asarray(raw).reshape(shape[1], -1), qtype))
            return
    pytest.fail("blk.0.ffn_down.weight not found")
