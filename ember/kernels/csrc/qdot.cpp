// Integer dot-product matmul over quantized weights (AVX-512 VNNI), Ember's decode kernel.
//
// Weights: every GGUF type whose values are w = s * u + z per group of 32 or 16 (u an unsigned code of 2..8
// bits, s and z per group) - Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K; Q2_K, Q3_K, Q6_K with 16-wide groups - are
// stored as such codes, nibble-packed (4-bit types), nibbles plus a plane of fifth bits (5-bit types), or one
// byte each, with s and z as float16 when that is exact, else float32. The conversion
// from the GGUF blocks happens in Python (ember/kernels/qdot.py); this file only multiplies.
//
// Activations are quantized per group of 32 to int8 (d = amax / 127, as llama.cpp's Q8_0 activations), so a
// group's product is an exact integer dot product:
//     sum_i w_i x_i ~= s * d * sum_i u_i q_i  +  z * d * sum_i q_i
//
// Layout: output columns in blocks of 16. For a column block and a group, the codes are 8 chunks of 64 bytes;
// chunk j holds elements 4j..4j+3 of the group for each of the 16 columns (byte 4c + e: column c, element
// 4j + e). One vpdpbusd with the row's 4 activation bytes of chunk j broadcast then adds those 4 products
// into each column's int32 lane, and 8 of them give all 16 columns' exact group sums with no horizontal
// reduction. Nibble codes store chunk j in the low and chunk j + 4 in the high nibbles of 4 chunks (256
// bytes). 6-bit codes (Q6_K) add two such planes, the fifth and the sixth bits (384 bytes). Symmetric weights (offset o > 0: z = -o * s in every group, the types without a per-group bias) keep
// no mins: z is derived from s (exact, o is a power of two). 5-bit codes add, after those 256 bytes, each chunk's fifth bits as one 64-bit word (bit b: byte b of
// the chunk; 64 bytes): 320 bytes per group instead of 512, which decode reads from memory every token. Scales and mins: 16 per column block and group, or 2 x 16 (elements 0-15, then 16-31) for 16-wide
// groups.
//
// Invariant (batch invariance): the value computed for output (m, n) depends only on row m of x and column n
// of the weight. Rows are processed in tiles that share the weight loads, but every row goes through the same
// sequence of operations whatever the tile size, and the order over K is fixed (integer sums within a group
// are exact; groups are accumulated in order). So a token's result does not depend on which other rows share
// its batch - the engine's greedy outputs rely on that.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int GROUP = 32;
constexpr int COLS = 16;

template <typename S>
inline __m512 load16(const S* p);

template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }

template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Quantized activations: qx [M, K] int8, dx [M, G] scales, sx [M, G] = dx * sum(q) over the group and
// sxh [M, 2G] the same over each half (elements 0-15 and 16-31, for 16-wide weight groups).
struct Activations {
  std::vector<int8_t> qx;
  std::vector<float> dx, sx, sxh;
};

Activations quantize(const float* x, int64_t M, int64_t K) {
  const int64_t G = K / GROUP;
  Activations a;
  a.qx.resize(M * K);
  a.dx.resize(M * G);
  a.sx.resize(M * G);
  a.sxh.resize(M * 2 * G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * GROUP;
      __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      float d = amax / 127.0f;
      float id = d > 0.f ? 1.0f / d : 0.f;
      __m512 vid = _mm512_set1_ps(id);
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));  // round to nearest even
      __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
      const int32_t sum0 = _mm512_reduce_add_epi32(q0), sum1 = _mm512_reduce_add_epi32(q1);
      int8_t* dst = a.qx.data() + m * K + g * GROUP;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
      a.dx[m * G + g] = d;
      a.sx[m * G + g] = d * static_cast<float>(sum0 + sum1);
      a.sxh[(m * G + g) * 2] = d * static_cast<float>(sum0);
      a.sxh[(m * G + g) * 2 + 1] = d * static_cast<float>(sum1);
    }
  }
  return a;
}

template <int BITS>
inline void load_group(const uint8_t* p, __m512i w[8]) {
  if constexpr (BITS == 4 || BITS == 5 || BITS == 6) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i b = _mm512_loadu_si512(p + 64 * j);
      w[j] = _mm512_and_si512(b, m4);
      w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
    }
    if constexpr (BITS >= 5) {  // plane of fifth bits: chunk j's 64 bits at p + 256 + 8 j
      const __m512i bit4 = _mm512_set1_epi8(0x10);
      const uint64_t* hi = reinterpret_cast<const uint64_t*>(p + 256);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) w[j] = _mm512_or_si512(w[j], _mm512_maskz_mov_epi8(_cvtu64_mask64(hi[j]), bit4));
    }
    if constexpr (BITS == 6) {  // and of sixth bits, 64 bytes further
      const __m512i bit5 = _mm512_set1_epi8(0x20);
      const uint64_t* hi = reinterpret_cast<const uint64_t*>(p + 320);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) w[j] = _mm512_or_si512(w[j], _mm512_maskz_mov_epi8(_cvtu64_mask64(hi[j]), bit5));
    }
  } else {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(p + 64 * j);
  }
}

inline __m512i bcast4(const int8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// Columns [16 cb, 16 cb + 16) of rows [m0, m0 + R). Every row runs the same instruction sequence.
// prefetch: this tile is the block's first and fetches the weight stream PREFETCH_BYTES ahead.
// HALF: weight groups are 16 wide (two scales and mins per 32 elements: Q2_K, Q3_K, Q6_K) instead of 32.
// Bytes ahead in the weight stream that a tile prefetches while it computes: the hardware prefetcher alone left
// decode memory-bound at ~15 GB/s of weights and serialized fetch and arithmetic for multi-row tiles. Measured
// on SmolLM2's 30 layers + output, weights from DRAM (2 threads): none 5.4 / 10.3 ms for 1 / 9 rows, 512 B
// 4.7 / 10.2, 1 KiB 4.3 / 9.0, 2 KiB 3.7 / 9.1, 4 KiB 3.7 / 8.5, 8 KiB 5.2 / 10.8.
constexpr int64_t PREFETCH_BYTES = 4096;

// 16 int8 -> 16 floats
inline __m512 i8ps(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Params: per group s (and z unless SYM: z = -offset * s); TWO: s = ss * sc with ss per super-block of 256
// (8 groups of 32) and sc an int8 per group (and z = zs * zc), the K-quants' own two levels - 2 bytes per
// group instead of a float32 product each, the same values (the products are exact in float32).
struct Params {
  const void* scales;
  const void* mins;
  const int8_t* scodes;
  const int8_t* mcodes;
  float neg_offset;
};

template <int BITS, typename S, int R, bool HALF, bool SYM, bool TWO>
inline void tile(const Activations& a, int64_t m0, int64_t K, const uint8_t* codes, const Params& pp,
                 int64_t cb, float* y, int64_t N, bool prefetch) {
  constexpr int64_t GROUP_BYTES = BITS == 8 ? 512 : 256 + 64 * (BITS - 4);
  constexpr int64_t PARAMS = HALF ? 2 * COLS : COLS;  // scales (and mins) per column block and 32 elements
  const int64_t G = K / GROUP;
  const uint8_t* wc = codes + cb * G * GROUP_BYTES;
  const S* scales = static_cast<const S*>(pp.scales);
  const S* mins = static_cast<const S*>(pp.mins);
  const int64_t per = TWO ? COLS : PARAMS;  // values per column block in one step of `scales`
  const S* ws = scales + cb * (TWO ? G / 8 : G) * per;
  const S* wz = SYM ? nullptr : mins + cb * (TWO ? G / 8 : G) * per;
  const int8_t* wsc = TWO ? pp.scodes + cb * G * PARAMS : nullptr;
  const int8_t* wzc = TWO && !SYM ? pp.mcodes + cb * G * PARAMS : nullptr;
  const __m512 vneg = _mm512_set1_ps(pp.neg_offset);
  __m512 ss = _mm512_setzero_ps(), zs = _mm512_setzero_ps();
  __m512 acc[R], zacc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    zacc[r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512i w[8];
    if (prefetch) {  // may run past the weight's end: prefetches never fault
      const char* pf = reinterpret_cast<const char*>(wc + g * GROUP_BYTES) + PREFETCH_BYTES;
#pragma GCC unroll 8
      for (int64_t b = 0; b < GROUP_BYTES; b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
    }
    load_group<BITS>(wc + g * GROUP_BYTES, w);
    __m512 s0, z0, s1, z1;
    if constexpr (TWO) {
      if (g % 8 == 0) {
        ss = load16<S>(ws + (g / 8) * COLS);
        if constexpr (!SYM) zs = load16<S>(wz + (g / 8) * COLS);
      }
      s0 = _mm512_mul_ps(ss, i8ps(wsc + g * PARAMS));
      z0 = SYM ? _mm512_mul_ps(s0, vneg) : _mm512_mul_ps(zs, i8ps(wzc + g * PARAMS));
      s1 = s0, z1 = z0;
      if constexpr (HALF) {
        s1 = _mm512_mul_ps(ss, i8ps(wsc + g * PARAMS + COLS));
        z1 = SYM ? _mm512_mul_ps(s1, vneg) : _mm512_mul_ps(zs, i8ps(wzc + g * PARAMS + COLS));
      }
    } else {
      s0 = load16<S>(ws + g * PARAMS);
      z0 = SYM ? _mm512_mul_ps(s0, vneg) : load16<S>(wz + g * PARAMS);
      s1 = s0, z1 = z0;
      if constexpr (HALF) {
        s1 = load16<S>(ws + g * PARAMS + COLS);
        z1 = SYM ? _mm512_mul_ps(s1, vneg) : load16<S>(wz + g * PARAMS + COLS);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* q = a.qx.data() + (m0 + r) * K + g * GROUP;
      // elements 0-15 (chunks 0-3) and 16-31 (chunks 4-7) as two independent chains
      __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bcast4(q));
      __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], bcast4(q + 16));
      d0 = _mm512_dpbusd_epi32(d0, w[1], bcast4(q + 4));
      d1 = _mm512_dpbusd_epi32(d1, w[5], bcast4(q + 20));
      d0 = _mm512_dpbusd_epi32(d0, w[2], bcast4(q + 8));
      d1 = _mm512_dpbusd_epi32(d1, w[6], bcast4(q + 24));
      d0 = _mm512_dpbusd_epi32(d0, w[3], bcast4(q + 12));
      d1 = _mm512_dpbusd_epi32(d1, w[7], bcast4(q + 28));
      const int64_t ag = (m0 + r) * G + g;
      __m512 f;
      if constexpr (HALF) {
        const float* sxh = a.sxh.data() + 2 * ag;
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), s1, _mm512_mul_ps(_mm512_cvtepi32_ps(d0), s0));
        zacc[r] = _mm512_fmadd_ps(z0, _mm512_set1_ps(sxh[0]), zacc[r]);
        zacc[r] = _mm512_fmadd_ps(z1, _mm512_set1_ps(sxh[1]), zacc[r]);
      } else {
        f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), s0);  // exact integer sum first
        zacc[r] = _mm512_fmadd_ps(z0, _mm512_set1_ps(a.sx[ag]), zacc[r]);
      }
      acc[r] = _mm512_fmadd_ps(f, _mm512_set1_ps(a.dx[ag]), acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (m0 + r) * N + cb * COLS, _mm512_add_ps(acc[r], zacc[r]));
}

template <int BITS, typename S, bool HALF, bool SYM, bool TWO>
void run(const Activations& a, int64_t M, int64_t K, const uint8_t* codes, const Params& pp, int64_t N, float* y) {
  const int64_t NB = N / COLS;
  // Column blocks split across torch's own thread pool (one OpenMP runtime for the whole process).
  const int64_t grain = std::max<int64_t>(1, NB / (4 * std::max(1, at::get_num_threads())));
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t cb = b0; cb < b1; ++cb) {
      // Row tiles of up to 8 share each weight load (the block's codes stay in L1/L2 between tiles), sized
      // evenly (9 rows: 5 + 4, not 8 + 1). The first tile prefetches the weight stream ahead.
      const int64_t tiles = (M + 7) / 8;
      for (int64_t t = 0, m = 0; t < tiles; ++t) {
        const int64_t r = (M - m) / (tiles - t);
        switch (r) {
          case 8: tile<BITS, S, 8, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          case 7: tile<BITS, S, 7, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          case 6: tile<BITS, S, 6, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          case 5: tile<BITS, S, 5, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          case 4: tile<BITS, S, 4, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          case 3: tile<BITS, S, 3, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          case 2: tile<BITS, S, 2, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
          default: tile<BITS, S, 1, HALF, SYM, TWO>(a, m, K, codes, pp, cb, y, N, m == 0); break;
        }
        m += r;
      }
    }
  });
}

// codes [NB, G, 256 | 320 | 384 | 512] uint8, scales/mins [NB, G or 2G, 16] (mins empty for offset > 0); or, with
// scale codes (two levels): scales/mins float32 [NB, G / 8, 16] and scodes/mcodes int8 [NB, G or 2G, 16].
void check_weight(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& mins,
                  int64_t bits, int64_t offset, const torch::Tensor& scodes, const torch::Tensor& mcodes) {
  if (scodes.numel() > 0) {
    TORCH_CHECK(scodes.dtype() == torch::kInt8 && scodes.is_contiguous() && scodes.dim() == 3 &&
                scodes.size(0) == codes.size(0) && scodes.size(2) == COLS &&
                (scodes.size(1) == codes.size(1) || scodes.size(1) == 2 * codes.size(1)), "qdot: bad scale codes");
    TORCH_CHECK(offset > 0 ? mcodes.numel() == 0 : (mcodes.sizes() == scodes.sizes() &&
                mcodes.dtype() == torch::kInt8 && mcodes.is_contiguous()), "qdot: bad min codes");
    TORCH_CHECK(codes.size(1) % 8 == 0 && scales.dtype() == torch::kFloat32 && scales.is_contiguous() &&
                scales.dim() == 3 && scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1) / 8 &&
                scales.size(2) == COLS, "qdot: bad super-block scales");
    TORCH_CHECK(offset > 0 ? mins.numel() == 0 : (mins.sizes() == scales.sizes() &&
                mins.dtype() == torch::kFloat32 && mins.is_contiguous()), "qdot: bad super-block mins");
    TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "qdot: bits must be 4, 5, 6 or 8");
    TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 3, "qdot: bad codes");
    TORCH_CHECK(codes.size(2) == (bits == 8 ? 512 : 256 + 64 * (bits - 4)), "qdot: codes do not match bits");
    TORCH_CHECK(offset >= 0 && offset <= 128, "qdot: bad offset");
    return;
  }
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "qdot: bits must be 4, 5, 6 or 8");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 3, "qdot: bad codes");
  TORCH_CHECK(codes.size(2) == (bits == 8 ? 512 : 256 + 64 * (bits - 4)), "qdot: codes do not match bits");
  TORCH_CHECK(offset >= 0 && offset <= 128, "qdot: bad offset");
  TORCH_CHECK(offset > 0 ? mins.numel() == 0 : (scales.sizes() == mins.sizes() && scales.dtype() == mins.dtype()),
              "qdot: scales/mins differ");
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.dim() == 3, "qdot: bad scales");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kFloat16, "qdot: scale dtype");
  TORCH_CHECK(scales.size(0) == codes.size(0) && (scales.size(1) == codes.size(1) ||
              scales.size(1) == 2 * codes.size(1)) && scales.size(2) == COLS, "qdot: scales do not match codes");
}

}  // namespace

template <typename S, bool HALF, bool SYM, bool TWO>
void dispatch_bits(const Activations& a, int64_t M, int64_t K, const uint8_t* c, const Params& pp, int64_t bits,
                   int64_t N, float* out) {
  switch (bits) {
    case 4: run<4, S, HALF, SYM, TWO>(a, M, K, c, pp, N, out); break;
    case 5: run<5, S, HALF, SYM, TWO>(a, M, K, c, pp, N, out); break;
    case 6: run<6, S, HALF, SYM, TWO>(a, M, K, c, pp, N, out); break;
    default: run<8, S, HALF, SYM, TWO>(a, M, K, c, pp, N, out); break;
  }
}

template <typename S, bool TWO>
void dispatch(const Activations& a, int64_t M, int64_t K, const uint8_t* c, const Params& pp, int64_t bits,
              bool half, bool sym, int64_t N, float* out) {
  if (sym) {
    if (half) dispatch_bits<S, true, true, TWO>(a, M, K, c, pp, bits, N, out);
    else dispatch_bits<S, false, true, TWO>(a, M, K, c, pp, bits, N, out);
  } else {
    if (half) dispatch_bits<S, true, false, TWO>(a, M, K, c, pp, bits, N, out);
    else dispatch_bits<S, false, false, TWO>(a, M, K, c, pp, bits, N, out);
  }
}

// x [M, K] (K = 32 * groups) -> y [M, N] float32. offset > 0: symmetric weight, z = -offset * s (mins empty).
// scodes/mcodes non-empty: two-level parameters (see Params).
torch::Tensor qdot_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                          int64_t bits, int64_t offset, torch::Tensor scodes, torch::Tensor mcodes) {
  check_weight(codes, scales, mins, bits, offset, scodes, mcodes);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == codes.size(1) * GROUP, "qdot: x must be [M, K] matching the weight");
  x = x.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0) * COLS;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  Activations a = quantize(x.data_ptr<float>(), M, K);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  const bool two = scodes.numel() > 0;
  const bool half = (two ? scodes.size(1) : scales.size(1)) == 2 * codes.size(1);  // 16-wide groups
  Params pp{scales.data_ptr(), offset > 0 ? nullptr : mins.data_ptr(), two ? scodes.data_ptr<int8_t>() : nullptr,
            two && offset == 0 ? mcodes.data_ptr<int8_t>() : nullptr, -static_cast<float>(offset)};
  if (two) dispatch<float, true>(a, M, K, c, pp, bits, half, offset > 0, N, out);
  else if (scales.dtype() == torch::kFloat16) dispatch<at::Half, false>(a, M, K, c, pp, bits, half, offset > 0, N, out);
  else dispatch<float, false>(a, M, K, c, pp, bits, half, offset > 0, N, out);
  return y;
}

// Columns [n0, n1) of the weight (multiples of 16) as bfloat16 [n1 - n0, K], for prompt processing's GEMM.
torch::Tensor qdot_dequant(torch::Tensor codes, torch::Tensor scales, torch::Tensor mins, int64_t bits,
                           int64_t offset, torch::Tensor scodes, torch::Tensor mcodes, int64_t n0, int64_t n1) {
  check_weight(codes, scales, mins, bits, offset, scodes, mcodes);
  if (scodes.numel() > 0) {  // expand the two levels to per-group values: the flat form below
    const int64_t rep = scodes.size(1) / scales.size(1);
    scales = scales.repeat_interleave(rep, 1) * scodes.to(torch::kFloat32);
    mins = offset > 0 ? mins : mins.repeat_interleave(rep, 1) * mcodes.to(torch::kFloat32);
  }
  const int64_t G = codes.size(1), K = G * GROUP;
  TORCH_CHECK(n0 % COLS == 0 && n1 % COLS == 0 && 0 <= n0 && n0 <= n1 && n1 <= codes.size(0) * COLS,
              "qdot: bad column range");
  const int64_t group_bytes = codes.size(2);
  const bool half = scales.size(1) == 2 * codes.size(1);
  auto s32 = scales.to(torch::kFloat32).contiguous();
  auto z32 = offset > 0 ? s32 * static_cast<double>(-offset) : mins.to(torch::kFloat32);
  const float* s = s32.data_ptr<float>();
  const float* z = z32.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  auto out = torch::empty({n1 - n0, K}, torch::dtype(torch::kBFloat16));
  auto* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(n0 / COLS, n1 / COLS, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t cb = b0; cb < b1; ++cb) {
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* pc = c + (cb * G + g) * group_bytes;
        for (int col = 0; col < COLS; ++col) {
          at::BFloat16* row = o + (cb * COLS + col - n0) * K + g * GROUP;
          for (int e = 0; e < GROUP; ++e) {
            const int64_t pi = half ? ((cb * G + g) * 2 + e / 16) * COLS + col : (cb * G + g) * COLS + col;
            const float sc = s[pi], mn = z[pi];
            const int j = e / 4, k = e % 4;
            int u;
            if (bits < 8) {
              const uint8_t byte = pc[(j % 4) * 64 + col * 4 + k];
              u = j < 4 ? (byte & 15) : (byte >> 4);
              const int b = col * 4 + k;  // the element's byte within chunk j: bit b of each plane's word j
              for (int plane = 0; plane < bits - 4; ++plane)
                u |= ((pc[256 + 64 * plane + j * 8 + b / 8] >> (b % 8)) & 1) << (4 + plane);
            } else {
              u = pc[j * 64 + col * 4 + k];
            }
            row[e] = static_cast<at::BFloat16>(sc * static_cast<float>(u) + mn);
          }
        }
      }
    }
  });
  return out;
}
