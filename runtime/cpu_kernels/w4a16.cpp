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
//       rounding, bit-identical to runtime/cpu.py::dequantize_weight (large M: the
//       caller runs one fp32 GEMM on it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
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

// y[m0 + i, n] for i < MB and n in [n0, n1).
template <int MB>
void gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh, const int8_t* qw, const float* sw,
                int64_t G, int64_t n0, int64_t n1, float* y, int64_t N) {
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
    // 4 rows per pass over the weight (8 measured slower: the accumulators spill).
    for (; m + 4 <= M; m += 4) gemv_block<4>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N);
    switch (M - m) {
      case 3: gemv_block<3>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N); break;
      case 2: gemv_block<2>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N); break;
      case 1: gemv_block<1>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N); break;
      default: break;
    }
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
  // Interleave even (lo) and odd (hi) weights back into k order.
  const __m512i idx_a = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i idx_b = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m128i tbl = nibble_table();
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 s = _mm512_set1_ps(ps[n * groups + g]);
        for (int64_t j = g * gh; j < (g + 1) * gh; j += 16) {
          __m512 lo, hi;
          unpack16(pq + n * Kh + j, tbl, low4, &lo, &hi);
          float* out = pw + n * 2 * Kh + 2 * j;
          _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutex2var_ps(lo, idx_a, hi), s));
          _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, idx_b, hi), s));
        }
      }
    }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svdq_cpu_gemm, m) {
  m.def("w4a16_gemv(Tensor xe, Tensor xo, Tensor qweight, Tensor wscales, int G) -> Tensor", &w4a16_gemv);
  m.def("w4a16_dequant(Tensor qweight, Tensor wscales, int G) -> Tensor", &w4a16_dequant);
}
