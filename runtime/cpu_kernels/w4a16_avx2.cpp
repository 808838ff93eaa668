// Weight-only INT4 (W4A16) for AVX2 CPUs: the ops of w4a16.cpp with the same results bit
// for bit. w4a16_dequant is one fp32 multiply per weight (bit-identical to
// runtime/torch_path.py::dequantize_weight on any ISA). w4a16_gemv sums in fp32, so its order
// matters: it keeps the AVX-512 kernel's 16 lanes (two ymm per accumulator; per group
// part = fma(lo, x_even, part) then fma(hi, x_odd, part) per 16 packed bytes, then
// acc = fma(part, s, acc), then GCC's _mm512_reduce_add_ps tree), so both ISAs agree.
// This file holds the AVX2 GEMV block and dequantizer steps; the checks, loops and
// registration are op_glue.h's.
#include <immintrin.h>

#include <cstdint>

#include "op_glue.h"

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

// The AVX2 steps of op_glue.h's W4A16 ops (interface there).
class W4A16Kernel {
 public:
  static constexpr int kRows = 2;  // 8 accumulators + 4 weight vectors fit the 16 ymm
  template <int MB>
  static void gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh, const int8_t* qw, const float* sw,
                         int64_t G, int64_t n0, int64_t n1, float* y, int64_t N);  // below

  W4A16Kernel() : tbl_(nibble_table()), low4_(_mm_set1_epi8(0x0F)) {}

  void dequant_group(const int8_t* p, int64_t bytes, float scale, float* out) const {
    const __m256 s = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < bytes; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
      // interleave even (low nibble) and odd (high nibble) weights back into k order
      const __m128i il = _mm_shuffle_epi8(tbl_, _mm_and_si128(b, low4_));
      const __m128i ih = _mm_shuffle_epi8(tbl_, _mm_and_si128(_mm_srli_epi16(b, 4), low4_));
      const __m128i k0 = _mm_unpacklo_epi8(il, ih), k1 = _mm_unpackhi_epi8(il, ih);
      float* o = out + 2 * j;
      _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(k0)), s));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(k0, 8))), s));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(k1)), s));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(k1, 8))), s));
    }
  }

 private:
  const __m128i tbl_, low4_;
};

// y[m0 + i, n] for i < MB (<= 2: 8 accumulators + 4 weight vectors fit the 16 ymm).
template <int MB>
void W4A16Kernel::gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh, const int8_t* qw,
                             const float* sw, int64_t G, int64_t n0, int64_t n1, float* y, int64_t N) {
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

}  // namespace

SVDQ_LIBRARY_FRAGMENT(SVDQ_NS, m) { def_w4a16<W4A16Kernel>(m); }
