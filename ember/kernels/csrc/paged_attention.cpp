// Decode attention straight from the paged KV pool: one query row per sequence position, keys and values read
// through the row's block table, no gather into a contiguous copy.
//
// For row b and query head h (kv head h / (H / Hkv)), keys at positions [lo_b, len_b) with
// lo_b = max(0, len_b - window) on windowed layers (window 0: lo_b = 0):
//     s_p = scale * q . k_p,  w_p = exp(s_p - max s) / sum exp(...),  out = sum_p w_p v_p      (float32)
//
// Invariant (batch invariance): a row's output depends only on its query, its positions and the pool's
// contents - never on the other rows of the call or on how the work is split across threads (one thread
// computes a whole (row, kv head) pair, in a fixed order over positions). So a speculative verification row
// and a plain decode of the same position give bit-identical results, and so do a stream alone and in a batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline __m512 load16(const T* p);

template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

constexpr int MAX_GROUP = 16;
constexpr int64_t PREFETCH = 8;  // keys ahead

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// Keys slots[0..nk) (nk <= 16) of one kv head, converted to float32 and transposed: kt[dim][key], zero for
// keys past nk. 16 x 16 blocks through registers (unpack / shuffle / permute), one per 16 dimensions.
template <typename T, int DC>
inline void transpose_tile(const T* kpool, const int64_t* slots, int64_t nk, int64_t kstride,
                           float (*kt)[16]) {
  for (int c = 0; c < DC; ++c) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < nk ? load16<T>(kpool + slots[j] * kstride + 16 * c) : _mm512_setzero_ps();
    // 16 x 16 transpose of 32-bit elements
    __m512 t[16];
    for (int j = 0; j < 16; j += 2) {
      t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
      t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) {
      r[j] = _mm512_shuffle_ps(t[j], t[j + 2], 0x44);
      r[j + 1] = _mm512_shuffle_ps(t[j], t[j + 2], 0xEE);
      r[j + 2] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0x44);
      r[j + 3] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
      t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xDD);
      t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
      t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xDD);
    }
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
      r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    }
    // r[j] now holds dimension 16 c + j of keys 0..15 (the network is the standard 4-stage 16 x 16 transpose)
    for (int j = 0; j < 16; ++j) _mm512_store_ps(kt[16 * c + j], r[j]);
  }
}

struct Scratch {
  std::vector<float> scores, acc, vt;
  std::vector<int64_t> slots, offsets;
  std::vector<const float*> pq;  // score phase: each active (row, head) pair's query ...
  std::vector<float*> ps;        // ... where its scores for the tile go ...
  std::vector<__mmask16> pm;     // ... and which of the tile's lanes are its keys
};

constexpr int SCORE_CHAINS = 8;

// N (row, head) pairs' scores for one tile of 16 keys (kt[dim][key], float32): pair i's lane j is
// scale * sum_dim q_i[dim] * key_j[dim], one FMA chain over the dimensions in order per pair - N independent
// chains hide the FMA latency, and a pair's result does not depend on N or on its place in the block.
template <int N, int DC>
inline void score_block(const float (*kt)[16], const float* const* pq, float* const* ps, const __mmask16* pm,
                        float scale) {
  constexpr int d = 16 * DC;
  const float* q[N];
  __m512 acc[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    q[i] = pq[i];
    acc[i] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int dd = 0; dd < d; ++dd) {
    const __m512 kd = _mm512_load_ps(kt[dd]);
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][dd]), kd, acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) _mm512_mask_storeu_ps(ps[i], pm[i], _mm512_mul_ps(acc[i], _mm512_set1_ps(scale)));
}

constexpr int64_t TILE = 64;  // keys per value tile (its values stay in L1 while every row of the group reads them)

// The rows [r0, r1) of one sequence (same block table; row r attends to keys [lo_r, len_r)), one kv head: the
// rows and the head's `group` query heads share every key and value load - a speculative verification's rows
// read the sequence's KV once instead of once per row. DC / VC: head sizes in 16-float chunks, compile-time so
// that the chunk loops unroll and accumulators stay in registers.
//
// Each (row, head)'s arithmetic is the same whatever the other rows are: its scores in key order, its softmax
// over its own keys (vector chunks aligned to its own first key), its values accumulated in key order (the
// tiles only interrupt the sequence with an exact store and reload of the accumulators).
template <typename T, int DC, int VC>
void rows_head(const float* q, float* out, const int64_t* lo, const int64_t* len, int64_t R, int64_t H,
               const T* kpool, const T* vpool, const int64_t* table, int64_t bs, const int64_t* strides,
               int64_t kvh, int64_t group, float scale, Scratch& sc) {
  constexpr int64_t d = 16 * DC, dv = 16 * VC;
  int64_t lo_all = lo[0], hi_all = len[0];
  sc.offsets.resize(static_cast<size_t>(R + 1));
  sc.offsets[0] = 0;
  for (int64_t r = 0; r < R; ++r) {
    lo_all = std::min(lo_all, lo[r]);
    hi_all = std::max(hi_all, len[r]);
    sc.offsets[r + 1] = sc.offsets[r] + group * (len[r] - lo[r]);
  }
  const int64_t U = hi_all - lo_all;
  sc.scores.resize(static_cast<size_t>(sc.offsets[R]));
  sc.pq.resize(static_cast<size_t>(R * group));
  sc.ps.resize(static_cast<size_t>(R * group));
  sc.pm.resize(static_cast<size_t>(R * group));
  // strides: K slot, K head, V slot, V head (elements); pools may be slot-major (paged) or head-major (KVCache)
  const int64_t kstride = strides[0], vstride = strides[2];
  kpool += kvh * strides[1];
  vpool += kvh * strides[3];
  // Slot of every key position, once (a division per position per head would cost more than the math).
  sc.slots.resize(static_cast<size_t>(U));
  int64_t* slots = sc.slots.data();
  for (int64_t p = lo_all, i = 0; p < hi_all;) {
    const int64_t blk = p / bs, shift = (table[blk] - blk) * bs, end = std::min(hi_all, (blk + 1) * bs);
    for (; p < end; ++p) slots[i++] = p + shift;  // slot = table[blk] * bs + p % bs
  }
  // scores, 16 keys at a time: the tile's keys transposed to kt[dim][key] (float32), then for each row and
  // head one 16-lane accumulator per tile, summed over the dimensions in order - lane j is key j's dot
  // product, with the same arithmetic whichever lane or tile a key falls in and whichever rows share the call
  alignas(64) float kt[16 * DC][16];
  for (int64_t t = lo_all; t < hi_all; t += 16) {
    const int64_t nk = std::min<int64_t>(16, hi_all - t);
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t i = t - lo_all + j;
      if (i + PREFETCH < U) prefetch_row<T>(kpool + slots[i + PREFETCH] * kstride, d);
    }
    transpose_tile<T, DC>(kpool, slots + (t - lo_all), nk, kstride, kt);
    // The (row, head) pairs that have keys in this tile, in blocks of SCORE_CHAINS: that many independent
    // accumulator chains hide the FMA latency (one row's `group` heads alone are too few). Each pair's lane
    // arithmetic is its own chain over the dimensions in order, whatever block it lands in.
    int64_t np = 0;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t a = std::max(t, lo[r]), b = std::min(t + 16, len[r]);
      if (a >= b) continue;
      const __mmask16 m = static_cast<__mmask16>(((1u << (b - t)) - 1) & ~((1u << (a - t)) - 1));
      const int64_t L = len[r] - lo[r];
      for (int64_t g = 0; g < group; ++g) {
        sc.pq[np] = q + r * H * d + g * d;
        sc.ps[np] = sc.scores.data() + sc.offsets[r] + g * L + (t - lo[r]);  // lane j -> key t + j
        sc.pm[np] = m;
        ++np;
      }
    }
    for (int64_t p0 = 0; p0 < np; p0 += SCORE_CHAINS) {
      const float* const* pq = sc.pq.data() + p0;
      float* const* ps = sc.ps.data() + p0;
      const __mmask16* pm = sc.pm.data() + p0;
      switch (std::min<int64_t>(SCORE_CHAINS, np - p0)) {
        case 1: score_block<1, DC>(kt, pq, ps, pm, scale); break;
        case 2: score_block<2, DC>(kt, pq, ps, pm, scale); break;
        case 3: score_block<3, DC>(kt, pq, ps, pm, scale); break;
        case 4: score_block<4, DC>(kt, pq, ps, pm, scale); break;
        case 5: score_block<5, DC>(kt, pq, ps, pm, scale); break;
        case 6: score_block<6, DC>(kt, pq, ps, pm, scale); break;
        case 7: score_block<7, DC>(kt, pq, ps, pm, scale); break;
        default: score_block<8, DC>(kt, pq, ps, pm, scale); break;
      }
    }
  }
  // softmax weights (unnormalized), per row and head; 16 at a time from the row's first key, the tail masked
  std::vector<float> inv(static_cast<size_t>(R * group));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t L = len[r] - lo[r];
    for (int64_t g = 0; g < group; ++g) {
      float* s = sc.scores.data() + sc.offsets[r] + g * L;
      __m512 mxv = _mm512_set1_ps(-INFINITY);
      for (int64_t i = 0; i < L; i += 16) {
        const __mmask16 k = i + 16 <= L ? 0xFFFF : static_cast<__mmask16>((1u << (L - i)) - 1);
        mxv = _mm512_mask_max_ps(mxv, k, mxv, _mm512_maskz_loadu_ps(k, s + i));
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mxv));
      __m512 sumv = _mm512_setzero_ps();
      for (int64_t i = 0; i < L; i += 16) {
        const __mmask16 k = i + 16 <= L ? 0xFFFF : static_cast<__mmask16>((1u << (L - i)) - 1);
        const __m512 e = ember_simd::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), mx));
        _mm512_mask_storeu_ps(s + i, k, e);
        sumv = _mm512_mask_add_ps(sumv, k, sumv, e);
      }
      inv[r * group + g] = 1.0f / _mm512_reduce_add_ps(sumv);
    }
  }
  // weighted values, a tile of keys at a time: the tile's values converted to float32 once, then every row
  // and head accumulates from it in key order
  sc.acc.assign(static_cast<size_t>(R * group * dv), 0.f);
  sc.vt.resize(static_cast<size_t>(TILE * dv));
  float* vt = sc.vt.data();
  for (int64_t t0 = lo_all; t0 < hi_all; t0 += TILE) {
    const int64_t t1 = std::min(hi_all, t0 + TILE);
    for (int64_t p = t0; p < t1; ++p) {
      const int64_t i = p - lo_all;
      if (i + PREFETCH < U) prefetch_row<T>(vpool + slots[i + PREFETCH] * vstride, dv);
      const T* v = vpool + slots[i] * vstride;
#pragma GCC unroll 16
      for (int c = 0; c < VC; ++c) _mm512_storeu_ps(vt + (p - t0) * dv + 16 * c, load16<T>(v + 16 * c));
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t a = std::max(t0, lo[r]), b = std::min(t1, len[r]);
      if (a >= b) continue;
      const int64_t L = len[r] - lo[r];
      for (int64_t g = 0; g < group; ++g) {
        const float* s = sc.scores.data() + sc.offsets[r] + g * L - lo[r];  // s[p]: weight of key p
        float* ap = sc.acc.data() + (r * group + g) * dv;
        __m512 acc[VC];
#pragma GCC unroll 16
        for (int c = 0; c < VC; ++c) acc[c] = _mm512_loadu_ps(ap + 16 * c);
        for (int64_t p = a; p < b; ++p) {
          const float* v = vt + (p - t0) * dv;
          const __m512 w = _mm512_set1_ps(s[p]);
#pragma GCC unroll 16
          for (int c = 0; c < VC; ++c) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * c), acc[c]);
        }
#pragma GCC unroll 16
        for (int c = 0; c < VC; ++c) _mm512_storeu_ps(ap + 16 * c, acc[c]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < group; ++g) {
      const __m512 iv = _mm512_set1_ps(inv[r * group + g]);
      const float* ap = sc.acc.data() + (r * group + g) * dv;
#pragma GCC unroll 16
      for (int c = 0; c < VC; ++c) _mm512_storeu_ps(out + r * H * dv + g * dv + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(ap + 16 * c), iv));
    }
}

template <typename T, int DC, int VC>
void run_rows(const float* qp, const T* kp, const T* vp, const int64_t* tp, const int64_t* lp, int64_t B, int64_t H,
              int64_t hkv, int64_t width, int64_t bs, int64_t window, float scale, float* op, const int64_t* strides) {
  const int64_t group = H / hkv;
  // Groups: runs of consecutive rows with the same block table (one sequence's verification rows, a short
  // chunk's rows), which share their key and value reads.
  std::vector<int64_t> starts{0};
  for (int64_t b = 1; b < B; ++b)
    if (std::memcmp(tp + b * width, tp + (b - 1) * width, static_cast<size_t>(width) * sizeof(int64_t)) != 0)
      starts.push_back(b);
  starts.push_back(B);
  const int64_t G = static_cast<int64_t>(starts.size()) - 1;
  std::vector<int64_t> lo(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) lo[b] = window > 0 ? std::max<int64_t>(0, lp[b] - window) : 0;
  // Work items: (group, kv head, slice of the group's rows). A verification's rows are sliced so that both
  // threads get work when there are fewer (group, kv head) pairs than threads can balance; a slice re-reads
  // the keys, so slices stay as large as the balance allows. Slicing never changes a row's arithmetic.
  const int64_t threads = at::get_num_threads();
  const int64_t want = G * hkv >= 2 * threads ? 1 : (2 * threads + G * hkv - 1) / (G * hkv);
  std::vector<std::tuple<int64_t, int64_t, int64_t>> items;  // (kv head, first row, end row)
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t b0 = starts[gi], b1 = starts[gi + 1], n = b1 - b0;
    const int64_t slices = std::min(n, want), per = (n + slices - 1) / slices;
    for (int64_t kvh = 0; kvh < hkv; ++kvh)
      for (int64_t r = b0; r < b1; r += per) items.emplace_back(kvh, r, std::min(b1, r + per));
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t w0, int64_t w1) {
    Scratch sc;
    for (int64_t w = w0; w < w1; ++w) {
      const auto [kvh, b, e] = items[static_cast<size_t>(w)];
      rows_head<T, DC, VC>(qp + (b * H + kvh * group) * 16 * DC, op + (b * H + kvh * group) * 16 * VC,
                           lo.data() + b, lp + b, e - b, H, kp, vp, tp + b * width, bs, strides, kvh,
                           group, scale, sc);
    }
  });
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& kpool, const torch::Tensor& vpool, const torch::Tensor& tables,
         const torch::Tensor& lens, int64_t bs, int64_t window, float scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), hkv = kpool.size(1), dv = vpool.size(2);
  const int64_t strides[4] = {kpool.stride(0), kpool.stride(1), vpool.stride(0), vpool.stride(1)};
  auto args = std::make_tuple(q.data_ptr<float>(), reinterpret_cast<const T*>(kpool.data_ptr()),
                              reinterpret_cast<const T*>(vpool.data_ptr()), tables.data_ptr<int64_t>(),
                              lens.data_ptr<int64_t>(), B, H, hkv, tables.size(1), bs, window, scale,
                              out.data_ptr<float>(), strides);
  if (d == 64 && dv == 64) std::apply(run_rows<T, 4, 4>, args);
  else if (d == 128 && dv == 128) std::apply(run_rows<T, 8, 8>, args);
  else if (d == 256 && dv == 256) std::apply(run_rows<T, 16, 16>, args);
  else if (d == 32 && dv == 32) std::apply(run_rows<T, 2, 2>, args);
  else if (d == 96 && dv == 96) std::apply(run_rows<T, 6, 6>, args);
  else TORCH_CHECK(false, "paged_attention: head sizes ", d, "/", dv, " not compiled in");
}

}  // namespace

bool supports_head_sizes(int64_t d, int64_t dv) {
  return d == dv && (d == 32 || d == 64 || d == 96 || d == 128 || d == 256);
}

// q [B, H, d] float32; kpool [slots, Hkv, d], vpool [slots, Hkv, dv] float16 or bfloat16, any strides with
// the last dimension contiguous; tables [B, width]
// int64 block ids (every entry a query can reach must be valid); lens [B] int64 (keys [lo, len)).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor kpool, torch::Tensor vpool, torch::Tensor tables,
                              torch::Tensor lens, int64_t block_size, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.dtype() == torch::kFloat32 && q.is_contiguous(), "paged_attention: bad q");
  TORCH_CHECK(kpool.dim() == 3 && vpool.dim() == 3 && kpool.stride(2) == 1 && vpool.stride(2) == 1 &&
              kpool.sizes().slice(0, 2) == vpool.sizes().slice(0, 2), "paged_attention: bad pools");
  TORCH_CHECK(kpool.dtype() == vpool.dtype() &&
              (kpool.dtype() == torch::kFloat16 || kpool.dtype() == torch::kBFloat16), "paged_attention: pool dtype");
  TORCH_CHECK(kpool.size(2) == q.size(2) && supports_head_sizes(q.size(2), vpool.size(2)), "paged_attention: head sizes");
  TORCH_CHECK(q.size(1) % kpool.size(1) == 0 && q.size(1) / kpool.size(1) <= MAX_GROUP, "paged_attention: heads");
  TORCH_CHECK(tables.dtype() == torch::kInt64 && tables.is_contiguous() && tables.dim() == 2 &&
              tables.size(0) == q.size(0), "paged_attention: bad tables");
  TORCH_CHECK(lens.dtype() == torch::kInt64 && lens.is_contiguous() && lens.numel() == q.size(0),
              "paged_attention: bad lens");
  const int64_t slots = kpool.size(0);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && (lp[b] - 1) / block_size < tables.size(1), "paged_attention: length past the table");
    const int64_t lo = window > 0 ? std::max<int64_t>(0, lp[b] - window) : 0;
    for (int64_t i = lo / block_size; i <= (lp[b] - 1) / block_size; ++i) {
      const int64_t blk = tp[b * tables.size(1) + i];
      TORCH_CHECK(blk >= 0 && (blk + 1) * block_size <= slots, "paged_attention: block id out of range");
    }
  }
  auto out = torch::empty({q.size(0), q.size(1), vpool.size(2)}, q.options());
  if (kpool.dtype() == torch::kFloat16)
    run<at::Half>(q, kpool, vpool, tables, lens, block_size, window, static_cast<float>(scale), out);
  else
    run<at::BFloat16>(q, kpool, vpool, tables, lens, block_size, window, static_cast<float>(scale), out);
  return out;
}
