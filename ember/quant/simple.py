"""Float and 32-block quantizers (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), byte-identical to ggml's reference
quantizers (ggml-quants.c quantize_row_q*_ref, ggml.c ggml_fp32_to_fp16_row / ggml_fp32_to_bf16_row_ref).

Why not gguf.quants.quantize: it matches ggml on ordinary data but not on every block - Q4_0/Q5_0 take the
signed max from argmax(|x|) even for an all-zero block, where ggml keeps its initial +0.0 and so stores
d = -0.0 (0x8000); Q4_1/Q5_1 pick min with np.min, while ggml keeps the *first* of +0.0/-0.0, which is stored
as the fp16 m. It is also slower (groups of 16 rows). The code here follows the C expressions one by one:

| type | block | scale (float32, C order)          | code of x (C conversion)                       | bytes            |
|------|-------|-----------------------------------|------------------------------------------------|------------------|
| Q4_0 | 32    | d = max / -8 (max: signed absmax) | MIN(15, (int8_t)(x*id + 8.5f))                 | d, qs[16]        |
| Q4_1 | 32    | d = (max - min) / 15, m = min     | MIN(15, (int8_t)((x - min)*id + 0.5f))         | d, m, qs[16]     |
| Q5_0 | 32    | d = max / -16                     | MIN(31, (int8_t)(x*id + 16.5f))                | d, qh u32, qs[16]|
| Q5_1 | 32    | d = (max - min) / 31, m = min     | (uint8_t)((x - min)*id + 0.5f)                 | d, m, qh, qs[16] |
| Q8_0 | 32    | d = absmax / 127                  | roundf(x*id) (half away from zero)             | d, qs int8[32]   |

id = d ? 1/d : 0. Nibbles: byte j holds element j (low) and j+16 (high); qh bit e is bit 4 of element e's code.
For Q4_0/Q5_0 "max" is the first element of largest |x| (`if (amax < fabsf(v))`, from amax = 0, max = +0.0,
so an all-zero block stores d = -0.0); for Q4_1/Q5_1 min and max are the first smallest/largest
(`if (v < min)`), which only shows between +0.0 and -0.0, whose sign reaches the stored fp16 m and d.
C's float -> int8_t conversion truncates toward zero; in the extreme blocks where the value can leave int8's
range (d subnormal or infinite) its x86 wrap-around is emulated. F16 rounds to nearest even (numpy's cast is
the same conversion); BF16 rounds to nearest even and quiets NaNs as ggml_compute_fp32_to_bf16 does.

Blocks are processed transposed ([32, nb]): numpy reduces across rows with vector code, but over 32-long rows
one row at a time, several times slower than the transpose itself.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import numpy as np

try:  # the ufunc behind np.clip, without its Python wrapper (numpy >= 2 moved it)
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.umath import clip as _clip_ufunc

F32 = np.float32


def _quiet(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Extreme weights (near float32's limits) make inf/nan intermediates in the C code too, where they are
    part of the result; numpy would warn about each."""
    @functools.wraps(fn)
    def wrapper(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)
    return wrapper


def _d_bytes(d: np.ndarray) -> np.ndarray:
    """fp16 (GGML_FP32_TO_FP16) of [nb] float32 as [nb, 2] bytes."""
    with np.errstate(over="ignore"):
        return d.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0))


_MIN_NORMAL = F32(2.0 ** -126)


def _codes(t: np.ndarray, d: np.ndarray, hi: int, clamp: bool) -> np.ndarray:
    """The C code conversion of t = x*id + offset ([32, nb] columns): MIN(hi, (int8_t)t) (clamp) or
    (uint8_t)t, as uint8.

    Where d is 0 or a normal float, t lies in [0, hi + 1) (|x*id| is at most the scale's level count), and
    this is just a clamp and a truncating cast. A block whose d is subnormal or infinite (weights below ~1e-37
    or near float32's limit) can put t anywhere, inf and nan included; there the x86 conversion is emulated:
    truncate to int32 (0x80000000 when out of range), keep the low byte, MIN as int8 when clamping."""
    ok = (d == 0) | ((np.abs(d) >= _MIN_NORMAL) & (np.abs(d) < np.inf))
    if ok.all():
        return _clip_ufunc(t, F32(0), F32(hi), out=t).astype(np.uint8)
    q = np.empty(t.shape, dtype=np.uint8)
    q[:, ok] = _clip_ufunc(t[:, ok], F32(0), F32(hi)).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        i = t[:, ~ok].astype(np.int32)
    i = ((i + 128) & 0xFF) - 128
    if clamp:
        i = np.minimum(i, hi)
    q[:, ~ok] = i & 0xFF
    return q


def _columns(x: np.ndarray) -> np.ndarray:
    """[nb, 32] -> [32, nb]: per-block reductions over a 32-long row are slow in numpy; across rows they are
    vectorized, and the transpose costs less than one of them."""
    return np.ascontiguousarray(x.T)


def _signed_absmax(x: np.ndarray, xt: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude; +0.0 for an all-zero block (C starts from max = 0.0f and only
    replaces it on a strictly larger |v|)."""
    hi, lo = xt.max(axis=0), xt.min(axis=0)
    mx = np.where(hi > -lo, hi, lo)
    tie = hi == -lo  # both +a and -a occur (or all zero): the first one decides
    if tie.any():
        rows = x[tie]
        idx = np.argmax(np.abs(rows), axis=1)
        mx[tie] = rows[np.arange(idx.size), idx]
    return np.where(mx == 0, F32(0), mx)


def _first_zero_sign(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """v [nb] is each block's min or max. The C loops keep the first element reaching it (`if (v < min)`),
    which only matters between +0.0 and -0.0: where v is zero, return the block's first zero."""
    zero = v == 0
    if zero.any():
        blocks = x[zero]
        first = np.argmax(blocks == 0, axis=1)
        v = v.copy()
        v[zero] = blocks[np.arange(first.size), first]
    return v


def _nibbles(q: np.ndarray, mask: bool = True) -> np.ndarray:
    """Codes [32, nb] -> bytes [nb, 16]: byte j = code j | code j+16 << 4 (uint8 arithmetic drops what shifts
    out, as C's store does). Q5_0/Q5_1 mask the low code to 4 bits; Q4_0/Q4_1 do not (C: xi0 | xi1 << 4),
    which only shows for a wrapped code."""
    lo = q[:16] & np.uint8(0xF) if mask else q[:16]
    return (lo | (q[16:] << np.uint8(4))).T


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Codes [32, nb] -> uint32 qh (bit e = bit 4 of code e) as [nb, 4] little-endian bytes: byte k gathers
    codes 8k..8k+7 (np.packbits along axis 0 does the same, three times slower)."""
    b = ((q >> np.uint8(4)) & np.uint8(1)).reshape(4, 8, -1)
    out = b[:, 0].copy()
    for j in range(1, 8):
        out |= b[:, j] << np.uint8(j)
    return out.T


@_quiet
def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """[nb, 32] float32 -> [nb, 18] uint8."""
    xt = _columns(x)
    d = _signed_absmax(x, xt) / F32(-8)
    xt *= _inverse(d)
    xt += F32(8.5)
    return np.concatenate([_d_bytes(d), _nibbles(_codes(xt, d, 15, True), mask=False)], axis=1)


@_quiet
def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """[nb, 32] float32 -> [nb, 20] uint8."""
    xt = _columns(x)
    mn = _first_zero_sign(x, xt.min(axis=0))
    d = (_first_zero_sign(x, xt.max(axis=0)) - mn) / F32(15)
    xt -= mn
    xt *= _inverse(d)
    xt += F32(0.5)
    return np.concatenate([_d_bytes(d), _d_bytes(mn), _nibbles(_codes(xt, d, 15, True), mask=False)], axis=1)


@_quiet
def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """[nb, 32] float32 -> [nb, 22] uint8."""
    xt = _columns(x)
    d = _signed_absmax(x, xt) / F32(-16)
    xt *= _inverse(d)
    xt += F32(16.5)
    q = _codes(xt, d, 31, True)
    return np.concatenate([_d_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


@_quiet
def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """[nb, 32] float32 -> [nb, 24] uint8."""
    xt = _columns(x)
    mn = _first_zero_sign(x, xt.min(axis=0))
    d = (_first_zero_sign(x, xt.max(axis=0)) - mn) / F32(31)
    xt -= mn
    xt *= _inverse(d)
    xt += F32(0.5)
    q = _codes(xt, d, 31, False)  # (uint8_t), no MIN: t < 32 whenever d is normal
    return np.concatenate([_d_bytes(d), _d_bytes(mn), _high_bits(q), _nibbles(q)], axis=1)


@_quiet
def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """[nb, 32] float32 -> [nb, 34] uint8."""
    xt = _columns(x)
    d = np.maximum(np.abs(xt.max(axis=0)), np.abs(xt.min(axis=0))) / F32(127)  # max |x|, never -0.0
    xt *= _inverse(d)
    a = np.abs(xt)
    whole = np.floor(a)
    a -= whole
    a *= F32(2)
    np.floor(a, out=a)
    a += whole
    r = np.copysign(a, xt, out=a)  # roundf: halves away from zero, exactly
    ok = (d == 0) | ((d >= _MIN_NORMAL) & (d < np.inf))
    if ok.all():  # |r| <= 127: a plain cast
        q = r.astype(np.int8).view(np.uint8)
    else:
        with np.errstate(invalid="ignore"):
            q = (r.astype(np.int32) & 0xFF).astype(np.uint8)
    return np.concatenate([_d_bytes(d), q.T], axis=1)


def _torch_view(x: np.ndarray) -> Any:
    """x as a float32 torch tensor sharing its memory (copied only if read-only, which torch cannot wrap)."""
    import torch  # only the float outputs use it: `ember quantize` to block types never imports torch

    x = np.ascontiguousarray(x, dtype=F32)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _torch_loaded() -> bool:
    """torch converts several times faster than numpy, but importing it costs ~1.5 s: use it only when the
    process has it already (the CLI quantizing to a float type does not)."""
    return "torch" in sys.modules


@_quiet
def quantize_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bytes (round to nearest even; overflow to inf as ggml). torch's conversion is the
    same IEEE rounding at several times numpy's speed; numpy's is kept for NaN (its payload handling)."""
    if np.isnan(x).any() or not _torch_loaded():
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1)
    import torch

    return _torch_view(x).to(torch.float16).numpy().view(np.uint8).reshape(x.shape[0], -1)


@_quiet
def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bytes: round to nearest even (torch's conversion, the same formula as ggml's);
    NaN -> top half | 0x40 (quiet), as ggml_compute_fp32_to_bf16 (torch writes a canonical NaN instead)."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    if _torch_loaded():
        import torch

        h = _torch_view(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:  # ggml_compute_fp32_to_bf16: u + 0x7fff + (lsb of the kept half), top half
        h = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        h = h.copy()
        h[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    return h.view(np.uint8).reshape(x.shape[0], -1)


# ggml type name -> (block size, quantizer of [nb, block] float32 -> [nb, type_size] uint8).
SIMPLE_QUANTIZERS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "F16": (1, quantize_f16),
    "BF16": (1, quantize_bf16),
    "Q4_0": (32, quantize_q4_0),
    "Q4_1": (32, quantize_q4_1),
    "Q5_0": (32, quantize_q5_0),
    "Q5_1": (32, quantize_q5_1),
    "Q8_0": (32, quantize_q8_0),
}
