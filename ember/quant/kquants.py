"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), byte-identical to ggml's reference quantizers.

These are the algorithms of ggml-quants.c (quantize_row_q{2,3,4,5,6}_K_ref, make_qkx2_quants, make_q3_quants,
make_qx_quants; Kawrakow's k-quants, llama.cpp PR #1684) - what llama.cpp's quantizer runs when it is given no
importance matrix - rewritten as numpy code vectorized over sub-blocks.

How bit-exactness is kept (ggml builds ggml-quants.c as plain scalar SSE code: no FMA contraction - the
vendored libggml-base.so has no FMA instruction at all - no reassociation, every float op rounds to float32):
  * every expression is evaluated in float32 with the operand order of the C code: `w*l*x` is (w*l)*x,
    `scale*L + min - x` is ((scale*L) + min) - x, loop constants such as `rmin + rdelta*is + nmax` too;
  * the C loops sum a sub-block's elements in index order. Sub-blocks are laid out as columns ([n, M]: row i
    holds element i of all M sub-blocks, contiguous), and numpy reduces a C-contiguous array along axis 0 one
    row after another - the same order. (Its pairwise summation only applies along a contiguous axis.)
  * nearest_int is ggml's add-1.5*2**23 trick, i.e. round-half-to-even while |t| <= 2**22; in the hot loops
    it is np.rint after clamping t to the level range, equal to nearest_int-then-clamp under that bound, which
    holds by construction in make_qx/make_q3 and is checked in make_qkx2 whenever its state moves (t is
    monotonic in x, so the column extremes bound it), with the bit-level version as the fallback. Final codes
    always use the bit-level version;
  * fp16 scales are rounded with numpy's float32->float16 cast (round-to-nearest-even, as ggml's converter);
  * C integer conversions (int -> uint8_t / int8_t) wrap, so codes are masked the same way.

Block layouts written (offsets in bytes; fp16 = IEEE half, little-endian; element e of a super-block of 256):

| type | bytes | layout                                                                                   |
|------|-------|------------------------------------------------------------------------------------------|
| Q2_K |  84   | scales@0 [16] (lo nibble scale, hi nibble min), qs@16 [64] 2-bit, d@80, dmin@82          |
| Q3_K | 110   | hmask@0 [32] (bit e//32 of byte e%32 = code bit 2), qs@32 [64] 2-bit, scales@96 [12]     |
|      |       | (16 x 6-bit, biased by 32), d@108                                                        |
| Q4_K | 144   | d@0, dmin@2, scales@4 [12] (8 x 6-bit scale + 8 x 6-bit min), qs@16 [128] nibbles        |
| Q5_K | 176   | d@0, dmin@2, scales@4 [12], qh@16 [32] (code bit 4), qs@48 [128] nibbles                 |
| Q6_K | 210   | ql@0 [128] low nibbles, qh@128 [64] high 2 bits, scales@192 int8 [16], d@208             |

2-bit packing (Q2_K/Q3_K qs): byte 32h+l holds elements 128h+l, +32, +64, +96 at bit 0, 2, 4, 6. Nibble
packing (Q4_K/Q5_K qs): byte 32c+l holds elements 64c+l (low) and 64c+32+l (high). Q6_K ql: byte 64h+l holds
128h+l (low) and 128h+64+l (high), byte 64h+32+l holds 128h+32+l and 128h+96+l; qh byte 32h+l holds the top
2 bits of 128h+l, +32, +64, +96 at bit 0, 2, 4, 6.

Sub-blocks, scales and the search each type does (nmax: largest code; "rmin, rdelta, nstep": candidate inverse
scales (nmax + rmin + rdelta*is) / (max - min), is = 0..nstep):

| type | sub-block | sub-block fit                                        | weights          | super-block scales  |
|------|-----------|------------------------------------------------------|------------------|---------------------|
| Q2_K | 16        | make_qkx2 nmax 3, -0.5, 0.1, 15, abs error           | abs(x)           | 4-bit, d/dmin fp16  |
| Q3_K | 16        | make_q3 nmax 4, 5 rounds of coordinate descent       | x^2 (internal)   | 6-bit signed, d     |
| Q4_K | 32        | make_qkx2 nmax 15, -1.0, 0.1, 20, squared error      | rms(x) + abs(x)  | 6-bit, d/dmin fp16  |
| Q5_K | 32        | make_qkx2 nmax 31, -0.5, 0.1, 15, squared error      | rms(x) + abs(x)  | 6-bit, d/dmin fp16  |
| Q6_K | 16        | make_qx nmax 32, rmse_type 1: 18 scales around 32    | x^2 (internal)   | int8, d fp16        |

All functions take float32 super-blocks [nb, 256] and return uint8 [nb, type_size]. Any finite input gives
ggml's bytes, extremes included (subnormal weights, values near float32's limit whose fits overflow to inf/nan:
those go through the bit-level paths); NaN inputs are not supported (ember.quant.quantize refuses them).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

try:  # the ufunc behind np.clip (numpy >= 2 moved it)
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.umath import clip as _clip_ufunc

QK_K = 256
F32 = np.float32


def _quiet(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Extreme weights (near float32's limits) make inf/nan intermediates in the C code too, where they are
    part of the result; numpy would warn about each."""
    @functools.wraps(fn)
    def wrapper(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)
    return wrapper
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round-to-nearest-even(t) in the low mantissa bits
_EXACT_LIMIT = F32(4194303.0)  # |t| up to 2**22 - 1: where the magic trick is an honest rounding (ggml's assert)
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: a sub-block whose max |x| is below this is all zero
_TINY_SPAN = F32(1e-30)
FORCE_EXACT_ROUNDING = False  # tests: take the bit-level nearest_int path everywhere in make_qkx2_quants


# -- ggml's scalar helpers, vectorized ------------------------------------------------------------------------

def nearest_int(t: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit (int32), including what it returns beyond |t| > 2**22."""
    v = np.add(t, _MAGIC, dtype=F32).view(np.int32)
    return (v & 0x007FFFFF) - 0x00400000


def _clamp(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """In-place clamp of a float32 array with the clip ufunc itself: np.clip's Python wrapper costs more than
    the work on short rows, and np.maximum/np.minimum against a scalar are several times slower than clip."""
    return _clip_ufunc(a, F32(lo), F32(hi), out=a)


def _levels_into(t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """t <- float(clamp(nearest_int(t), lo, hi)) in place. nearest_int rounds half to even, as np.rint does,
    whenever |t| <= 2**22 (callers ensure it); clamping first to the integer bounds gives the same result."""
    _clamp(t, lo, hi)
    return np.rint(t, out=t)


def _levels_exact(t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """float(clamp(nearest_int(t), lo, hi)) for any t: the bit-level path."""
    return np.clip(nearest_int(t), lo, hi).astype(F32)


def _sum(a: np.ndarray) -> np.ndarray:
    """Column sums [n, M] -> [M], adding rows in index order (the C loop's order; see the module docstring)."""
    return np.add.reduce(a, axis=0)


def _columns(x: np.ndarray, n: int) -> np.ndarray:
    """[nb, 256] super-blocks -> [n, nb*256/n]: column k is sub-block k (of n elements), rows contiguous."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _elements(cols: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of _columns: [n, M] -> [nb, 256]."""
    return np.ascontiguousarray(cols.T).reshape(nb, QK_K)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 then GGML_FP16_TO_FP32: (uint16 bits, float32 value)."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


def _i8(v: np.ndarray) -> np.ndarray:
    """C's int -> int8_t conversion (two's complement wrap), as int32."""
    return ((v + 128) & 0xFF) - 128


def _first_absmax(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(|max|, max): the value of largest magnitude, the first one on ties (`if (ax > amax)` in the C loops)."""
    if axis == 0:
        # Columns [n, M]: the larger of max and -min decides; only where they tie (+a and -a both occur, or an
        # all-zero column) does the first one matter. There the rows are scanned backwards so that the first
        # hit is written last (argmax along a strided axis is several times slower).
        hi, lo = x.max(axis=0), x.min(axis=0)
        neg = -lo
        amax = np.maximum(hi, neg)
        mx = np.where(hi > neg, hi, lo)
        tie = np.flatnonzero(hi == neg)
        if tie.size:
            sub = np.take(x, tie, axis=1)
            ax = np.abs(sub)
            m = np.zeros(tie.size, dtype=x.dtype)
            for i in range(x.shape[0] - 1, -1, -1):
                np.copyto(m, sub[i], where=ax[i] == amax[tie])
            mx[tie] = m
        return amax, mx
    # Super-block scales [nb, k] may hold nan (after float overflow), which never compares greater in C.
    ax = np.abs(x)
    ax = np.where(np.isnan(ax), F32(-1), ax)
    idx = np.argmax(ax, axis=axis)
    mx = np.take_along_axis(x, np.expand_dims(idx, axis), axis=axis).squeeze(axis)
    mx = np.where(np.abs(mx) > 0, mx, F32(0))  # C starts from max = 0 and keeps it unless |s| is larger
    return np.abs(mx), mx


def _positive_max(a: np.ndarray) -> np.ndarray:
    """max over axis 1 starting from +0.0 and keeping only strictly larger values (`if (s > max) max = s`;
    nan never is)."""
    m = np.fmax.reduce(a, axis=1)
    return np.where(m > 0, m, F32(0))


# -- sub-block fits ---------------------------------------------------------------------------------------------

def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants on columns x, w [n, M]: fit x ~ scale*L - the_min with L in [0, nmax],
    minimizing the w-weighted squared (or absolute, use_mad) error over nstep+1 candidate scales, each refined
    by weighted least squares. Returns (scale [M], the_min [M], L [n, M] uint8).

    The candidates are sequential in C: an accepted one moves `min`, which the next candidate's levels use.
    Vectorized over columns that is one pass per candidate, keeping each column's state. The accepted
    levels are not stored per candidate; the (iscale, min) that produced them are, and L is rebuilt once."""
    n, M = x.shape
    x_lo = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = _sum(w)
    buf = np.empty_like(x)
    np.multiply(w, x, out=buf)
    sum_x = _sum(buf)
    mn = np.where(x_lo > 0, F32(0), x_lo)
    flat = mx == mn
    mn0 = mn
    lev = np.empty_like(x)
    wl = np.empty_like(x)
    # The levels are t = iscale*(x - m) with iscale = c/(mx - m), c <= c_max. t is monotonic in x, so its
    # extremes are at x = mx (t ~ c) and x = x_lo (t ~ -c*(m - x_lo)/(mx - m), only negative once an accepted
    # fit moved m above x_lo). While that stays far inside 2**22 the fast rounding is exact; it is re-checked
    # (with 1% slack) whenever m moves, and the bit-level path takes over if it ever is not.
    c_max = max(abs(nmax), abs(rmin + nmax), abs(rmin + rdelta * nstep + nmax)) * 1.01 + 1
    live = ~flat

    def exact_needed(m: np.ndarray) -> bool:
        if FORCE_EXACT_ROUNDING:
            return True
        span = mx - m  # also below ~1e-30 (subnormal weights): iscale = c/span may overflow to inf
        return bool(np.any(((span < _TINY_SPAN) | ((m - x_lo) * F32(c_max) > _EXACT_LIMIT * span)) & live))

    exact = False

    def levels(iscale: np.ndarray, m: np.ndarray) -> None:
        # lev = clamp(nearest_int(iscale * (x - m)), 0, nmax)
        np.subtract(x, m, out=lev)
        np.multiply(lev, iscale, out=lev)
        if exact:
            lev[...] = _levels_exact(lev, 0, nmax)
        else:
            _levels_into(lev, 0, nmax)

    def error(scale: np.ndarray, m: np.ndarray) -> np.ndarray:
        np.multiply(lev, scale, out=buf)  # C: scale*L + min - x, then w*|diff| or w*diff*diff
        np.add(buf, m, out=buf)
        np.subtract(buf, x, out=buf)
        if use_mad:
            np.abs(buf, out=buf)
        else:
            np.multiply(buf, buf, out=buf)
        np.multiply(buf, w, out=buf)
        return _sum(buf)

    with np.errstate(all="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        exact = exact_needed(mn)
        levels(iscale, mn)
        best_err = error(scale, mn)
        best_is, best_mn = iscale, mn
        for step in range(nstep + 1):
            iscale = F32(F32(F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / (mx - mn)
            levels(iscale, mn)
            np.multiply(w, lev, out=wl)
            sum_l = _sum(wl)
            np.multiply(wl, lev, out=buf)
            sum_l2 = _sum(buf)
            np.multiply(wl, x, out=buf)
            sum_xl = _sum(buf)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min)
            better = (D > 0) & (cur < best_err)
            if not better.any():
                continue
            best_err = np.where(better, cur, best_err)
            scale = np.where(better, this_scale, scale)
            best_is = np.where(better, iscale, best_is)
            best_mn = np.where(better, mn, best_mn)
            mn = np.where(better, this_min, mn)
            exact = exact or exact_needed(mn)
        levels(best_is, best_mn)
    lev[:, flat] = 0  # flat columns hold inf/nan from the division by max - min == 0
    L = lev.astype(np.uint8)
    scale = np.where(flat, F32(0), scale)
    the_min = -np.where(flat, mn0, mn)
    return scale, the_min, L


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 and no quant weights (Q6_K's sub-block fit) on columns [n, M]:
    L in [0, 2*nmax), x ~ scale*(L - nmax). Tries inverse scales -(nmax + 0.1*is)/max, is = -9..9, each with
    its x^2-weighted least-squares scale. Returns (scale [M], L [n, M] uint8)."""
    amax, mx = _first_absmax(x, axis=0)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x  # C: w*x[i]*l is (w*x)*l
    lev = np.empty_like(x)
    buf = np.empty_like(x)
    lo, hi = -nmax, nmax - 1

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # |iscale*x| <= nmax + 1 here (|x| <= |max|), well inside the exact range.
        np.multiply(x, iscale, out=lev)
        _levels_into(lev, lo, hi)
        np.multiply(wx, lev, out=buf)
        sumlx = _sum(buf)
        np.multiply(w, lev, out=buf)
        np.multiply(buf, lev, out=buf)
        return sumlx, _sum(buf)

    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / mx
        sumlx, suml2 = sums(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        best_is = iscale
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if not better.any():
                continue
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
            best_is = np.where(better, iscale, best_is)
        np.multiply(x, best_is, out=lev)
        _levels_into(lev, lo, hi)
    lev += F32(nmax)
    lev[:, zero] = 0  # all-zero columns hold nan from 0 * inf
    L = lev.astype(np.uint8)
    return np.where(zero, F32(0), scale), L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants with do_rmse (Q3_K's sub-block fit) on columns [n, M]: start from the max-based
    levels, then up to 5 rounds of coordinate descent, each visiting the elements in index order and moving a
    level when that raises the x^2-weighted fit (sumlx^2/suml2). An element's move depends on the moves before
    it, so the loop runs over elements with the sub-blocks as the vector. Returns (scale [M], L [n, M] uint8
    in [0, 2*nmax))."""
    n, M = x.shape
    amax, mx = _first_absmax(x, axis=0)
    zero = amax < GROUP_MAX_EPS
    lo, hi = -nmax, nmax - 1
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / mx
        L = _levels_into(x * iscale, lo, hi)  # |x*iscale| <= nmax + 1: exact range
        w = x * x
        wx = w * x  # C: w*x[i]*L[i] is (w*x)*L
        buf = wx * L
        sumlx = _sum(buf)
        np.multiply(w, L, out=buf)
        buf *= L
        suml2 = _sum(buf)
        del buf
        # C stops a sub-block after a round without changes; a further round would change nothing either, so
        # each round only revisits the sub-blocks that changed in the previous one (about a fifth, then less).
        active = np.flatnonzero(~zero)
        for _ in range(5):
            if active.size == 0:
                break
            every = active.size == M
            xa, wa, wxa, La = (x, w, wx, L) if every else (np.take(a, active, axis=1) for a in (x, w, wx, L))
            sx, s2 = (sumlx, suml2) if every else (sumlx[active], suml2[active])
            changed = _descent_round(xa, wa, wxa, La, sx, s2, lo, hi)
            if not every:
                L[:, active] = La
                sumlx[active] = sx
                suml2[active] = s2
            active = active[changed]
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L += F32(nmax)
    L[:, zero] = 0  # all-zero columns hold nan from 0 * inf
    return np.where(zero, F32(0), scale), L.astype(np.uint8)


def _descent_round(x: np.ndarray, w: np.ndarray, wx: np.ndarray, L: np.ndarray, sx: np.ndarray, s2: np.ndarray,
                   lo: int, hi: int) -> np.ndarray:
    """One round of make_q3_quants' coordinate descent on columns [n, P], updating L, sx (sumlx) and s2 (suml2)
    in place; returns which columns changed. An element's move depends on the moves before it, so the loop
    runs over elements with the sub-blocks as the vector. Every operation writes into a buffer made once per
    round: the vectors are large (a fresh temporary of that size costs page faults, more than the arithmetic).
    """
    n, P = x.shape
    with np.errstate(all="ignore"):
        wl = w * L  # C: w*L[i]*L[i] is (w*L)*L; an element's own L does not change before its visit
        wl *= L
        wxl = wx * L  # C: w*x[i]*L[i] is (w*x)*L
    slx0, sl2, t, slx, g = (np.empty(P, dtype=F32) for _ in range(5))
    new_l = np.empty(P, dtype=F32)
    take, cond = np.empty(P, dtype=bool), np.empty(P, dtype=bool)
    changed = np.zeros(P, dtype=bool)
    bits = t.view(np.int32)
    for i in range(n):
        wi, xi, li, wxi = w[i], x[i], L[i], wx[i]
        np.subtract(sx, wxl[i], out=slx0)
        np.subtract(s2, wl[i], out=sl2)
        # nearest_int(x*sl2/slx) bit for bit (the ratio can be huge where slx is tiny), then clamped
        np.multiply(xi, sl2, out=t)
        t /= slx0
        t += _MAGIC
        bits &= 0x007FFFFF
        bits -= 0x00400000
        np.copyto(new_l, bits, casting="unsafe")
        _clamp(new_l, lo, hi)
        np.multiply(wxi, new_l, out=slx)  # slx = slx0 + w*x*new_l
        slx += slx0
        np.multiply(wi, new_l, out=g)  # sl2 += w*new_l*new_l
        g *= new_l
        sl2 += g
        np.greater(slx0, 0, out=take)
        np.not_equal(new_l, li, out=cond)
        take &= cond
        np.greater(sl2, 0, out=cond)
        take &= cond
        np.multiply(slx, slx, out=g)  # C: slx*slx*suml2 > sumlx*sumlx*sl2
        g *= s2
        np.multiply(sx, sx, out=t)
        t *= sl2
        np.greater(g, t, out=cond)
        take &= cond
        if take.any():  # a few percent of the sub-blocks: masked copies beat np.where here
            changed |= take
            np.copyto(li, new_l, where=take)
            np.copyto(sx, slx, where=take)
            np.copyto(s2, sl2, where=take)
    return changed


# -- super-block quantizers -------------------------------------------------------------------------------------

def _final_levels(xt: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int, offset: int,
                  fallback: np.ndarray) -> np.ndarray:
    """Codes from the stored (rounded) scales: nearest_int((x + dm)/d) (or x/d) clamped, + offset; sub-blocks
    whose d is 0 keep the fit's levels (`if (!d) continue;` in C). xt [n, M]; d, dm [M]."""
    with np.errstate(all="ignore"):
        v = xt + dm if dm is not None else xt
        q = (np.clip(nearest_int(v / d), lo, hi) + offset).astype(np.uint8)
    dead = d == 0
    if dead.any():
        q[:, dead] = fallback[:, dead]
    return q


def _pack2(L: np.ndarray) -> np.ndarray:
    """[nb, 256] 2-bit codes -> [nb, 64]: byte 32h+l = L[128h+l] | L[128h+32+l]<<2 | L[+64]<<4 | L[+96]<<6."""
    r = L.reshape(-1, 2, 4, 32)
    return (r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)).reshape(-1, 64)


def _k4_scales(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K super-block scales: 6-bit ls/lm per sub-block against d = max_scale/63, dmin = max_min/63.
    Returns (packed [nb, 12], d bits, dmin bits, d*ls [nb, 8], dmin*lm [nb, 8])."""
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d_bits, d = _fp16(max_scale / F32(63))
    m_bits, dmin = _fp16(max_min / F32(63))
    packed = np.empty((scales.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return packed, d_bits, m_bits, d[:, None] * ls.astype(F32), dmin[:, None] * lm.astype(F32)


def _k4_fit(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """The Q4_K/Q5_K sub-block fits and codes: weights av_x + |x| with av_x = sqrt(mean(x^2)) per 32."""
    nb = x.shape[0]
    xt = _columns(x, 32)
    av_x = np.sqrt(_sum(xt * xt) / F32(32))
    w = av_x + np.abs(xt)
    scales, mins, Lfit = make_qkx2_quants(xt, w, nmax, rmin, 0.1, nstep, False)
    packed, d_bits, m_bits, d, dm = _k4_scales(scales.reshape(nb, 8), mins.reshape(nb, 8))
    L = _final_levels(xt, d.reshape(-1), dm.reshape(-1), 0, nmax, 0, Lfit)
    return packed, d_bits, m_bits, _elements(L, nb)


@_quiet
def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: [nb, 256] float32 -> [nb, 144] uint8."""
    packed, d_bits, m_bits, L = _k4_fit(x, 15, -1.0, 20)
    out = np.empty((x.shape[0], 144), dtype=np.uint8)
    out[:, 0:2] = d_bits.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = m_bits.view(np.uint8).reshape(-1, 2)
    out[:, 4:16] = packed
    r = L.reshape(-1, 4, 2, 32)
    out[:, 16:] = (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(-1, 128)
    return out


@_quiet
def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: [nb, 256] float32 -> [nb, 176] uint8."""
    packed, d_bits, m_bits, L = _k4_fit(x, 31, -0.5, 15)
    out = np.empty((x.shape[0], 176), dtype=np.uint8)
    out[:, 0:2] = d_bits.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = m_bits.view(np.uint8).reshape(-1, 2)
    out[:, 4:16] = packed
    r = L.reshape(-1, 4, 2, 32)  # pair c: elements 64c+l (bit 2c of qh[l]) and 64c+32+l (bit 2c+1)
    hi = r >> 4
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for c in range(4):
        qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
    out[:, 16:48] = qh
    out[:, 48:] = ((r[:, :, 0] & 0xF) | ((r[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    return out


@_quiet
def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: [nb, 256] float32 -> [nb, 210] uint8."""
    nb = x.shape[0]
    xt = _columns(x, 16)
    scales, Lfit = make_qx_quants(xt, 32)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = _first_absmax(scales, axis=1)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d_bits, d = _fp16(F32(1) / iscale)
        sc = _i8(np.minimum(nearest_int(iscale[:, None] * scales), 127))
    dq = (d[:, None] * sc.astype(F32)).reshape(-1)
    L = _elements(_final_levels(xt, dq, None, -32, 31, 32, Lfit), nb)
    out = np.empty((nb, 210), dtype=np.uint8)
    r = L.reshape(nb, 2, 4, 32)
    lo = r & 0xF
    out[:, :128] = np.stack((lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)),
                            axis=2).reshape(nb, 128)
    hi = r >> 4
    out[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d_bits.view(np.uint8).reshape(-1, 2)
    out[zero] = 0  # C: memset(&y[i], 0, sizeof(block_q6_K))
    return out


@_quiet
def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref: [nb, 256] float32 -> [nb, 110] uint8."""
    nb = x.shape[0]
    xt = _columns(x, 16)
    scales, Lfit = make_q3_quants(xt, 4)
    scales = scales.reshape(nb, 16)
    _, max_scale = _first_absmax(scales, axis=1)
    live = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = F32(-32) / max_scale
        l = np.clip(_i8(nearest_int(iscale[:, None] * scales)), -32, 31) + 32
        d_bits, d = _fp16(np.where(live, F32(1) / iscale, F32(0)))
    l = np.where(live[:, None], l, 0)  # scales stay memset to 0 when max_scale is 0
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(nb, 4, 4)  # sub-block 4q+m -> bits 2q of byte 8+m
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    dq = (d[:, None] * (l - 32).astype(F32)).reshape(-1)
    L = _elements(_final_levels(xt, dq, None, -4, 3, 4, Lfit), nb)
    out = np.empty((nb, 110), dtype=np.uint8)
    h = (L > 3).astype(np.uint8).reshape(nb, 8, 32)
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for b in range(8):
        hmask |= h[:, b] << b
    out[:, :32] = hmask
    out[:, 32:96] = _pack2(L & 3)
    out[:, 96:108] = packed
    out[:, 108:110] = d_bits.view(np.uint8).reshape(-1, 2)
    return out


@_quiet
def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_ref: [nb, 256] float32 -> [nb, 84] uint8."""
    nb = x.shape[0]
    xt = _columns(x, 16)
    scales, mins, Lfit = make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    with np.errstate(all="ignore"):
        ls = np.where((max_scale > 0)[:, None], nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
        lm = nearest_int((F32(15) / max_min)[:, None] * mins)
    sc = ls & 0xFF
    sc = np.where((max_min > 0)[:, None], (sc | (lm << 4)) & 0xFF, sc)
    d_bits, d = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    m_bits, dmin = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    dq = (d[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    dm = (dmin[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    L = _elements(_final_levels(xt, dq, dm, 0, 3, 0, Lfit), nb)
    out = np.empty((nb, 84), dtype=np.uint8)
    out[:, :16] = sc
    out[:, 16:80] = _pack2(L)
    out[:, 80:82] = d_bits.view(np.uint8).reshape(-1, 2)
    out[:, 82:84] = m_bits.view(np.uint8).reshape(-1, 2)
    return out


# ggml type name -> quantizer of [nb, 256] float32 super-blocks.
KQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}
