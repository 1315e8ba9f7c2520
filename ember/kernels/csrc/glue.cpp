// The element-wise work between a block's matmuls, one call where torch takes several ops: RMS norm (with the
// residual add before it), and the gated activation of the feed-forward. At decode each of these is a few
// hundred floats, so torch's per-op dispatch and thread wake-ups, not arithmetic, were their cost (an RMS norm of
// one 576-float row took 13-40 us; here well under 1 us).
//
// Invariant (batch invariance): every output row depends only on its own input row - rows are computed
// independently, in the same order of operations whatever the number of rows or threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "simd.h"

namespace {

constexpr int64_t ROW_GRAIN = 32;  // rows per thread task (small calls stay on the calling thread)

inline __mmask16 tail_mask(int64_t i, int64_t n) {
  return i + 16 <= n ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

// y = x * (1 / sqrt(mean(x^2) + eps)) * w over one row of n floats (the sum of squares in 16 lanes, then
// reduced): the formula of torch's rms_norm, in float32.
inline void norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(i, n), x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float scale = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + eps);
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(i, n);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
  }
}

// sigmoid(z) with e = e^-|z| (never overflows): 1 / (1 + e) for z >= 0, e / (1 + e) below.
inline __m512 sigmoid16(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = ember_simd::exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
}

inline __m512 silu16(__m512 x) { return _mm512_mul_ps(x, sigmoid16(x)); }

// 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x sigmoid(2u) (the same function:
// 1 + tanh(u) = 2 sigmoid(2u)) so that no 1 + tanh cancellation loses the small values for negative x.
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u2 = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                                  _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  return _mm512_mul_ps(x, sigmoid16(u2));
}

void check_rows(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && (x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1, what,
              ": expected float32 [T, n] or [T, H, n] with the last dimension contiguous");
}

// Pointer to row r of a 2-D [T, n] or 3-D [T, H, n] view (rows in (t, h) order).
inline const float* row_ptr(const torch::Tensor& x, const float* base, int64_t r) {
  if (x.dim() == 2) return base + r * x.stride(0);
  return base + (r / x.size(1)) * x.stride(0) + (r % x.size(1)) * x.stride(1);
}

}  // namespace

// RMS norm of every row of x ([T, n] or [T, H, n], any outer strides) with weight w [n]: a new contiguous tensor.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "rms_norm");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.numel() == n, "rms_norm: bad weight");
  auto y = torch::empty(x.sizes(), x.options());
  const int64_t rows = n ? x.numel() / n : 0;
  const float* xb = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(row_ptr(x, xb, r), wp, yp + r * n, n, static_cast<float>(eps));
  });
  return y;
}

// The residual step of a pre-norm block: s = x + delta (both [T, n]) and rms_norm(s, w). Returns (s, norm).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w,
                                                      double eps) {
  check_rows(x, "add_rms_norm");
  TORCH_CHECK(x.dim() == 2 && x.sizes() == delta.sizes() && delta.dtype() == torch::kFloat32 &&
              delta.stride(-1) == 1, "add_rms_norm: x and delta must be float32 [T, n] alike");
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.numel() == n, "add_rms_norm: bad weight");
  auto s = torch::empty({T, n}, x.options());
  auto y = torch::empty({T, n}, x.options());
  const float *xp = x.data_ptr<float>(), *dp = delta.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *sp = s.data_ptr<float>(), *yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), ds = delta.stride(0);
  at::parallel_for(0, T, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* sr = sp + r * n;
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(i, n);
        _mm512_mask_storeu_ps(sr + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, xp + r * xs + i),
                                                       _mm512_maskz_loadu_ps(m, dp + r * ds + i)));
      }
      norm_row(sr, wp, yp + r * n, n, static_cast<float>(eps));
    }
  });
  return {s, y};
}

// act(h[:, :n_ff]) * h[:, n_ff : 2 n_ff] for the fused gate/up projection h [T, >= 2 n_ff]; act: 0 SiLU,
// 1 GELU (tanh approximation).
torch::Tensor gated_act(torch::Tensor h, int64_t n_ff, int64_t act) {
  check_rows(h, "gated_act");
  TORCH_CHECK(h.dim() == 2 && h.size(1) >= 2 * n_ff && (act == 0 || act == 1), "gated_act: bad arguments");
  const int64_t T = h.size(0), hs = h.stride(0);
  auto y = torch::empty({T, n_ff}, h.options());
  const float* hp = h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = hp + r * hs;
      for (int64_t i = 0; i < n_ff; i += 16) {
        const __mmask16 m = tail_mask(i, n_ff);
        const __m512 a = _mm512_maskz_loadu_ps(m, g + i);
        const __m512 u = _mm512_maskz_loadu_ps(m, g + n_ff + i);
        _mm512_mask_storeu_ps(yp + r * n_ff + i, m, _mm512_mul_ps(act ? gelu_tanh16(a) : silu16(a), u));
      }
    }
  });
  return y;
}

// Rotary embedding of every head of x [T, H, d] (last dimension contiguous) with per-token tables cos, sin
// [T, rot] at full rotary width (each angle's cos twice, sin signed by its slot: ember.model.layers.Rope):
// out = x * cos + partner(x) * sin over the first `rot` dimensions, where an element's partner is the other
// one of its pair - the adjacent element ("norm" style) or the one half a rotary width away (neox) - and the
// other d - rot dimensions copied. x * cos is rounded, then partner * sin added in one FMA: what torch's
// addcmul(x * cos, partner, sin) computes, bit for bit (tests/test_glue.py). rot % 16 == 0 (norm) / rot % 32 == 0
// (neox). A new contiguous tensor; one call for all heads (torch took five ops: ~25 us a layer at decode).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, bool neox) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1, "rope: x must be float32 [T, H, d]");
  const int64_t T = x.size(0), H = x.size(1), d = x.size(2), rot = cos.size(1);
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.dim() == 2 &&
              cos.sizes() == sin.sizes() && cos.size(0) == T && cos.stride(1) == 1 && sin.stride(1) == 1,
              "rope: tables must be float32 [T, rot]");
  TORCH_CHECK(rot <= d && rot % (neox ? 32 : 16) == 0, "rope: rotary width ", rot, " not supported");
  auto y = torch::empty({T, H, d}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), cs = cos.stride(0), ss = sin.stride(0), half = rot / 2;
  at::parallel_for(0, T * H, 4 * ROW_GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H;
      const float* xr = xp + t * xs0 + (r % H) * xs1;
      const float *c = cp + t * cs, *s = sp + t * ss;
      float* yr = yp + r * d;
      for (int64_t i = 0; i < rot; i += 16) {
        const __m512 v = _mm512_loadu_ps(xr + i);
        // partner: pairs (2j, 2j + 1) swap inside each 128-bit lane; neox pairs i with i +- half
        const __m512 p = neox ? _mm512_loadu_ps(xr + (i < half ? i + half : i - half)) : _mm512_permute_ps(v, 0xB1);
        _mm512_storeu_ps(yr + i, _mm512_fmadd_ps(p, _mm512_loadu_ps(s + i), _mm512_mul_ps(v, _mm512_loadu_ps(c + i))));
      }
      for (int64_t i = rot; i < d; i += 16) {
        const __mmask16 m = tail_mask(i, d);
        _mm512_mask_storeu_ps(yr + i, m, _mm512_maskz_loadu_ps(m, xr + i));
      }
    }
  });
  return y;
}
