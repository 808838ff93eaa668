// Weight-only INT4 (W4A16) for AVX2 CPUs: the ops of w4a16.cpp with the same results bit
// for bit. w4a16_dequant is one fp32 multiply per weight (bit-identical to
// runtime/cpu.py::dequantize_weight on any ISA). w4a16_gemv sums in fp32, so its order
// matters: it keeps the AVX-512 kernel's 16 lanes (two ymm per accumulator; per group
// part = fma(lo, x_even, part) then fma(hi, x_odd, part) per 16 packed bytes, then
// acc = fma(part, s, acc), then GCC's _mm512_reduce_add_ps tree), so both ISAs agree.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>

#include "op_glue.h"

#ifndef SVDQ_NS
#define SVDQ_NS svdq_cpu_avx2
#endif

namespace {

inline __m128i nibble_table() { return _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1); }

// 16 packed bytes -> even-k weights (lo0: 0-7, lo1: 8-15) and odd-k weights as fp32 (exact).
inline void unpack16(const int8_t* p, __m128i tbl, __m128i low4, __m256* lo0, __m256* lo1, __m256* hi0,
                     __m256* hi1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i il = _mm_shuffle_epi8(tbl, _mm_and_si128(b, low4));
  const __m128i ih = _mm_shuffle_epi8(tbl, _mm_and_si128(_mm_srli_epi16(b, 4), low4));
  *lo0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(il));
  *lo1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(il, 8)));
  *hi0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ih));
  *hi1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(ih, 8)));
}

// GCC's _mm512_reduce_add_ps order for the 16 lanes lo | hi (see quantize_act_avx2.cpp).
inline float reduce16(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}

// y[m0 + i, n] for i < MB (<= 2: 8 accumulators + 4 weight vectors fit the 16 ymm).
template <int MB>
void gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh, const int8_t* qw, const float* sw,
                int64_t G, int64_t n0, int64_t n1, float* y, int64_t N) {
  static_assert(MB == 1 || MB == 2, "rows per pass");
  const __m128i tbl = nibble_table();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t gh = G / 2;  // bytes per group
  const int64_t groups = Kh / gh;
  const float* e0 = xe + m0 * Kh;
  const float* o0 = xo + m0 * Kh;
  const float* e1 = xe + (m0 + MB - 1) * Kh;
  const float* o1 = xo + (m0 + MB - 1) * Kh;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = qw + n * Kh;
    const float* srow = sw + n * groups;
    __m256 acc0l = _mm256_setzero_ps(), acc0h = acc0l, acc1l = acc0l, acc1h = acc0l;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 p0l = _mm256_setzero_ps(), p0h = p0l, p1l = p0l, p1h = p0l;
      for (int64_t j = g * gh; j < (g + 1) * gh; j += 16) {
        __m256 lo0, lo1, hi0, hi1;
        unpack16(row + j, tbl, low4, &lo0, &lo1, &hi0, &hi1);
        p0l = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(e0 + j), p0l);
        p0h = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(e0 + j + 8), p0h);
        p0l = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(o0 + j), p0l);
        p0h = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(o0 + j + 8), p0h);
        if (MB > 1) {
          p1l = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(e1 + j), p1l);
          p1h = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(e1 + j + 8), p1h);
          p1l = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(o1 + j), p1l);
          p1h = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(o1 + j + 8), p1h);
        }
      }
      const __m256 s = _mm256_set1_ps(srow[g]);
      acc0l = _mm256_fmadd_ps(p0l, s, acc0l);
      acc0h = _mm256_fmadd_ps(p0h, s, acc0h);
      if (MB > 1) {
        acc1l = _mm256_fmadd_ps(p1l, s, acc1l);
        acc1h = _mm256_fmadd_ps(p1h, s, acc1h);
      }
    }
    y[m0 * N + n] = reduce16(acc0l, acc0h);
    if (MB > 1) y[(m0 + 1) * N + n] = reduce16(acc1l, acc1h);
  }
}

at::Tensor w4a16_gemv(const at::Tensor& xe, const at::Tensor& xo, const at::Tensor& qweight,
                      const at::Tensor& wscales, int64_t G) {
  w4a16_check(qweight, wscales, G);
  TORCH_CHECK(xe.scalar_type() == at::kFloat && xo.scalar_type() == at::kFloat && xe.is_contiguous() &&
                  xo.is_contiguous() && xe.sizes() == xo.sizes() && xe.dim() == 2 && xe.size(1) == qweight.size(1),
              "w4a16_gemv: xe / xo must be contiguous fp32 [M, K/2]");
  const int64_t M = xe.size(0), Kh = xe.size(1), N = qweight.size(0);
  at::Tensor y = at::empty({M, N}, xe.options());
  const float* pe = xe.data_ptr<float>();
  const float* po = xo.data_ptr<float>();
  const int8_t* pq = qweight.data_ptr<int8_t>();
  const float* ps = wscales.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) gemv_block<2>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N);
    if (m < M) gemv_block<1>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N);
  });
  return y;
}

at::Tensor w4a16_dequant(const at::Tensor& qweight, const at::Tensor& wscales, int64_t G) {
  w4a16_check(qweight, wscales, G);
  const int64_t N = qweight.size(0), Kh = qweight.size(1), gh = G / 2, groups = Kh / gh;
  at::Tensor w = at::empty({N, 2 * Kh}, wscales.options());
  const int8_t* pq = qweight.data_ptr<int8_t>();
  const float* ps = wscales.data_ptr<float>();
  float* pw = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m128i tbl = nibble_table();
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 s = _mm256_set1_ps(ps[n * groups + g]);
        for (int64_t j = g * gh; j < (g + 1) * gh; j += 16) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pq + n * Kh + j));
          // interleave even (low nibble) and odd (high nibble) weights back into k order
          const __m128i il = _mm_shuffle_epi8(tbl, _mm_and_si128(b, low4));
          const __m128i ih = _mm_shuffle_epi8(tbl, _mm_and_si128(_mm_srli_epi16(b, 4), low4));
          const __m128i k0 = _mm_unpacklo_epi8(il, ih), k1 = _mm_unpackhi_epi8(il, ih);
          float* out = pw + n * 2 * Kh + 2 * j;
          _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(k0)), s));
          _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(k0, 8))), s));
          _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(k1)), s));
          _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(k1, 8))), s));
        }
      }
    }
  });
  return w;
}

}  // namespace

#define SVDQ_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
SVDQ_LIBRARY_FRAGMENT(SVDQ_NS, m) {
  m.def("w4a16_gemv(Tensor xe, Tensor xo, Tensor qweight, Tensor wscales, int G) -> Tensor", &w4a16_gemv);
  m.def("w4a16_dequant(Tensor qweight, Tensor wscales, int G) -> Tensor", &w4a16_dequant);
}
