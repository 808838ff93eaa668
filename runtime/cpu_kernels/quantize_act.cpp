// Fused dynamic per-token-group activation quantizer (AVX512), bit-identical to
// svdq_compile/runtime/quantize.py::quantize_activation applied to
// runtime/reference.py::smooth_input(x, smooth):
//
//   x'    = float(x) / smooth                          (fp32 true division; no smooth: float(x))
//   v     = x' + shift                                 (fp32 add, only when shift != 0)
//   amax  = max_k |v|            (signed)  |  max_k max(v, 0)   (unsigned)
//   scale = amax / qmax  (fp32 true division); scale = 1 where !(scale > 0)
//   q     = clamp(floor(v / scale + 0.5), qmin, qmax)  (fp32 true division, then fp32 add)
//
// Every step is one correctly rounded IEEE fp32 operation in the same order as the
// torch code (no FMA contraction, no reciprocal multiply), so q and scale are equal
// bit for bit, inf/NaN included (a NaN in a group gives scale 1 and q = 0 for the NaN).
//
// Outputs: q [M, K] (int8, or u8 = q ^ 0x80 when `biased`, the operand layout of the
// VNNI GEMM), scale [M, K/G] fp32, and optionally x' [M, K] fp32 (for the low-rank
// branch) -- all in one pass over x. This file holds the AVX-512 passes over a row and the
// low-rank dot; the checks, row loop and registration are op_glue.h's.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "op_glue.h"

namespace {

template <typename T>
inline __m512 load16(const T* p, __mmask16 m);

template <>
inline __m512 load16<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // exact
}
template <>
inline __m512 load16<at::Half>(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));  // exact
}

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

SVDQ_F32_VEC(F32x16, __m512, 16, _mm512);

// The AVX-512 passes of op_glue.h's quantize_rows (interface there).
class QuantKernel {
 public:
  QuantKernel(float shift, float qmin, float qmax, bool biased)
      : c_(shift, qmin, qmax), vbias_(_mm_set1_epi8(static_cast<char>(biased ? 0x80 : 0))) {}

  // pass 1: x' = float(x) / smooth
  template <typename T>
  void smooth_row(const T* __restrict x, const float* __restrict smooth, int64_t K, float* __restrict v) const {
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      __m512 a = load16<T>(x + k, m);
      if (smooth) a = _mm512_div_ps(a, _mm512_maskz_loadu_ps(m, smooth + k));
      _mm512_mask_storeu_ps(v + k, m, a);
    }
  }

  // pass 2: group absmax
  float group_amax(const float* __restrict vg, int64_t G, bool has_shift, bool is_unsigned, bool& nan) const {
    __m512 amax = c_.zero;
    __mmask16 nans = 0;
    for (int64_t j = 0; j < G; j += 16) {
      const __mmask16 m = tail_mask(G - j);
      __m512 a = _mm512_maskz_loadu_ps(m, vg + j);
      if (has_shift) a = _mm512_add_ps(a, c_.shift);
      nans |= _mm512_mask_cmp_ps_mask(m, a, a, _CMP_UNORD_Q);
      a = is_unsigned ? _mm512_max_ps(a, c_.zero) : _mm512_abs_ps(a);
      amax = _mm512_mask_max_ps(amax, m, amax, a);
    }
    nan |= nans != 0;
    return _mm512_reduce_max_ps(amax);
  }

  // pass 3: q = clamp(floor(v / scale + 0.5))
  void quantize_group(const float* __restrict vg, int64_t G, float scale, bool has_shift, int8_t* __restrict q) const {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < G; j += 16) {
      const __mmask16 m = tail_mask(G - j);
      __m512 a = _mm512_maskz_loadu_ps(m, vg + j);
      if (has_shift) a = _mm512_add_ps(a, c_.shift);
      a = _mm512_add_ps(_mm512_div_ps(a, vs), c_.half);
      a = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      // operand order keeps NaN (max/min return the 2nd operand on NaN) like torch.clamp;
      // NaN then converts to 0x80000000 -> int8 0, as torch's float -> int8 cast does
      a = _mm512_min_ps(c_.qmax, _mm512_max_ps(c_.qmin, a));
      const __m128i b = _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)), vbias_);
      _mm_mask_storeu_epi8(q + j, m, b);
    }
  }

  static void lora_down_rows(const float* const* xr, int rb, const float* __restrict ld, int64_t R, int64_t K,
                             float* __restrict h);  // below

 private:
  const QuantConsts<F32x16> c_;
  const __m128i vbias_;
};

// h[i][j] = sum_k xr[i][k] * ld[j][k] for up to 4 rows (fp32 FMAs, 16 lanes, then a
// lane reduction): the low-rank down projection X' L2^T fused into the quantizer
// while the rows are in L1.  Unused row / rank slots alias the last valid one.
void QuantKernel::lora_down_rows(const float* const* xr, int rb, const float* __restrict ld, int64_t R, int64_t K,
                                 float* __restrict h) {
  const float* x0 = xr[0];
  const float* x1 = xr[std::min(1, rb - 1)];
  const float* x2 = xr[std::min(2, rb - 1)];
  const float* x3 = xr[std::min(3, rb - 1)];
  const int64_t kmain = K - K % 16;
  const __mmask16 mt = tail_mask(K - kmain);
  for (int64_t j0 = 0; j0 < R; j0 += 4) {
    const float* w[4];
    for (int t = 0; t < 4; ++t) w[t] = ld + std::min<int64_t>(j0 + t, R - 1) * K;
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define SVDQ_LD_STEP(LOADX, LOADW)                                                   \
    {                                                                                \
      const __m512 w0 = LOADW(w[0]), w1 = LOADW(w[1]), w2 = LOADW(w[2]), w3 = LOADW(w[3]); \
      __m512 x = LOADX(x0);                                                          \
      a00 = _mm512_fmadd_ps(x, w0, a00); a01 = _mm512_fmadd_ps(x, w1, a01);         \
      a02 = _mm512_fmadd_ps(x, w2, a02); a03 = _mm512_fmadd_ps(x, w3, a03);         \
      x = LOADX(x1);                                                                 \
      a10 = _mm512_fmadd_ps(x, w0, a10); a11 = _mm512_fmadd_ps(x, w1, a11);         \
      a12 = _mm512_fmadd_ps(x, w2, a12); a13 = _mm512_fmadd_ps(x, w3, a13);         \
      x = LOADX(x2);                                                                 \
      a20 = _mm512_fmadd_ps(x, w0, a20); a21 = _mm512_fmadd_ps(x, w1, a21);         \
      a22 = _mm512_fmadd_ps(x, w2, a22); a23 = _mm512_fmadd_ps(x, w3, a23);         \
      x = LOADX(x3);                                                                 \
      a30 = _mm512_fmadd_ps(x, w0, a30); a31 = _mm512_fmadd_ps(x, w1, a31);         \
      a32 = _mm512_fmadd_ps(x, w2, a32); a33 = _mm512_fmadd_ps(x, w3, a33);         \
    }
    for (int64_t k = 0; k < kmain; k += 16) {
#define SVDQ_LFULL(p) _mm512_loadu_ps((p) + k)
      SVDQ_LD_STEP(SVDQ_LFULL, SVDQ_LFULL)
#undef SVDQ_LFULL
    }
    if (kmain < K) {
      const int64_t k = kmain;
#define SVDQ_LTAIL(p) _mm512_maskz_loadu_ps(mt, (p) + k)
      SVDQ_LD_STEP(SVDQ_LTAIL, SVDQ_LTAIL)
#undef SVDQ_LTAIL
    }
#undef SVDQ_LD_STEP
    const __m512 acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
    for (int i = 0; i < rb; ++i)
      for (int t = 0; t < 4 && j0 + t < R; ++t) h[i * R + j0 + t] = _mm512_reduce_add_ps(acc[i][t]);
  }
}

}  // namespace

SVDQ_LIBRARY_FRAGMENT(SVDQ_NS, m) { def_quantize_act<QuantKernel>(m); }
