// Weight-only INT4 (W4A16) on CPU without materialising the fp32 weight per call.
//
// Packed weights: qweight [N, K/2] int8, low nibble = even k, high nibble = odd k (two's
// complement 4-bit), scales [N, K/G] fp32. Two ops:
//
//   w4a16_gemv(xe, xo, qweight, wscales, G) -> y [M, N] fp32, for small M (AdaLN
//       modulation runs on one vector per sample). xe / xo are the even / odd columns
//       of x ([M, K/2] fp32 each), so the nibbles need no interleaving. Per row and
//       group: p = sum_k x[k] * q[k] in fp32 (q exact), then y += p * s. Equal to
//       x @ (q * s)^T up to fp32 summation order.
//   w4a16_dequant(qweight, wscales, G) -> W [N, K] fp32 with W = float(q) * s: one
//       rounding, bit-identical to runtime/torch_path.py::dequantize_weight (large M: the
//       caller runs one fp32 GEMM on it).
//
// This file holds the AVX-512 GEMV block and dequantizer steps; the checks, loops and
// registration are op_glue.h's.
#include <immintrin.h>

#include <cstdint>

#include "op_glue.h"

namespace {

// Nibble value -> signed int8 (0..7 -> 0..7, 8..15 -> -8..-1) for _mm_shuffle_epi8.
inline __m128i nibble_table() {
  return _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

// 16 packed bytes -> the 16 even-k and 16 odd-k weights as fp32 (exact).
inline void unpack16(const int8_t* p, __m128i tbl, __m128i low4, __m512* lo, __m512* hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i il = _mm_and_si128(b, low4);
  const __m128i ih = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(tbl, il)));
  *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(tbl, ih)));
}

// The AVX-512 steps of op_glue.h's W4A16 ops (interface there).
class W4A16Kernel {
 public:
  // 4 rows per pass over the weight (8 measured slower: the accumulators spill).
  static constexpr int kRows = 4;
  template <int MB>
  static void gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh, const int8_t* qw, const float* sw,
                         int64_t G, int64_t n0, int64_t n1, float* y, int64_t N);  // below

  W4A16Kernel()
      : tbl_(nibble_table()),
        low4_(_mm_set1_epi8(0x0F)),
        // Interleave even (lo) and odd (hi) weights back into k order.
        idx_a_(_mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)),
        idx_b_(_mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)) {}

  void dequant_group(const int8_t* p, int64_t bytes, float scale, float* out) const {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < bytes; j += 16) {
      __m512 lo, hi;
      unpack16(p + j, tbl_, low4_, &lo, &hi);
      _mm512_storeu_ps(out + 2 * j, _mm512_mul_ps(_mm512_permutex2var_ps(lo, idx_a_, hi), s));
      _mm512_storeu_ps(out + 2 * j + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, idx_b_, hi), s));
    }
  }

 private:
  const __m128i tbl_, low4_;
  const __m512i idx_a_, idx_b_;
};

// y[m0 + i, n] for i < MB and n in [n0, n1).
template <int MB>
void W4A16Kernel::gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh, const int8_t* qw,
                             const float* sw, int64_t G, int64_t n0, int64_t n1, float* y, int64_t N) {
  const __m128i tbl = nibble_table();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t gh = G / 2;  // bytes per group
  const int64_t groups = Kh / gh;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = qw + n * Kh;
    const float* srow = sw + n * groups;
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[MB];
      for (int i = 0; i < MB; ++i) part[i] = _mm512_setzero_ps();
      for (int64_t j = g * gh; j < (g + 1) * gh; j += 16) {
        __m512 lo, hi;
        unpack16(row + j, tbl, low4, &lo, &hi);
        for (int i = 0; i < MB; ++i) {
          const float* e = xe + (m0 + i) * Kh + j;
          const float* o = xo + (m0 + i) * Kh + j;
          part[i] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(e), part[i]);
          part[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(o), part[i]);
        }
      }
      const __m512 s = _mm512_set1_ps(srow[g]);
      for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(part[i], s, acc[i]);
    }
    for (int i = 0; i < MB; ++i) y[(m0 + i) * N + n] = _mm512_reduce_add_ps(acc[i]);
  }
}

}  // namespace

SVDQ_LIBRARY_FRAGMENT(SVDQ_NS, m) { def_w4a16<W4A16Kernel>(m); }
