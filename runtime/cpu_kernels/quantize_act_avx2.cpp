// Fused dynamic per-token-group activation quantizer for AVX2 CPUs (no AVX-512): the
// same op as quantize_act.cpp, bit for bit (q, scale, x' and h), and so bit-identical to
// runtime/quantize.py::quantize_activation(runtime/reference.py::smooth_input(x, smooth)):
//
//   x' = float(x) / smooth;  v = x' + shift (if shift != 0);
//   amax = max |v| (signed) | max max(v, 0) (unsigned);  scale = amax / qmax (1 unless > 0);
//   q = clamp(floor(v / scale + 0.5), qmin, qmax)
//
// Every step is one correctly rounded IEEE fp32 operation in the torch order (compiled with
// -ffp-contract=off: no FMA contraction), so the lane width does not matter for q, scale
// and x'. The low-rank down projection h = X' L2^T is a sum, so its order matters: it
// reproduces the AVX-512 kernel's 16 lanes exactly (two ymm per accumulator: lane l sums
// k = l (mod 16) with FMAs in ascending k, zero-filled tail lanes, then GCC's
// _mm512_reduce_add_ps tree), hence bit-identical h on both ISAs. This file holds the AVX2
// passes over a row and the low-rank dot; the checks, row loop and registration are op_glue.h's.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "op_glue.h"

namespace {

// 8 lanes of x as fp32 (exact conversions); n < 8: lanes >= n read as 0.
inline __m256 cvt8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 cvt8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 cvt8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename T>
inline __m256 load8(const T* p, int64_t n) {
  if (n >= 8) return cvt8(p);
  T tmp[8];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));  // all-zero bits: 0.0 in every type
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
  return cvt8(tmp);
}
inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::memcpy(p, tmp, static_cast<size_t>(n) * sizeof(float));
  }
}

// The lane sum of a 16-lane accumulator held as lo (lanes 0-7) | hi (8-15), in the order of
// GCC's _mm512_reduce_add_ps: (hi + lo), then upper + lower 4, then [0]+[2] | [1]+[3], then
// their sum.
inline float reduce16(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}

// Low byte of each int32 lane (the AVX-512 kernel's _mm512_cvtepi32_epi8 truncation: the
// int32 0x80000000 of a NaN becomes 0, as torch's float -> int8 cast gives).
// In registers (a byte shuffle per 128-bit lane, then the two lanes' 4 bytes side by side):
// the scalar loop through memory it replaces cost ~1 cycle per element, a third of the
// quantizer on 128-wide layers.
inline void store_low_bytes(int8_t* dst, __m256i v, uint8_t bias, int64_t n) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(v, pick);
  __m128i lo8 = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  lo8 = _mm_xor_si128(lo8, _mm_set1_epi8(static_cast<char>(bias)));
  if (n >= 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), lo8);
  } else {
    alignas(16) int8_t tmp[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), lo8);
    std::memcpy(dst, tmp, static_cast<size_t>(n));
  }
}

SVDQ_F32_VEC(F32x8, __m256, 8, _mm256);

// The AVX2 passes of op_glue.h's quantize_rows (interface there).
class QuantKernel {
 public:
  QuantKernel(float shift, float qmin, float qmax, bool biased)
      : c_(shift, qmin, qmax), vabs_(_mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))), qbias_(biased ? 0x80 : 0) {}

  // pass 1: x' = float(x) / smooth
  template <typename T>
  void smooth_row(const T* __restrict x, const float* __restrict smooth, int64_t K, float* __restrict v) const {
    for (int64_t k = 0; k < K; k += 8) {
      const int64_t n = K - k;
      __m256 a = load8<T>(x + k, n);
      if (smooth) {
        // padded lanes divide 0 by 1 (no spurious 0/0); they are never stored
        __m256 d = n >= 8 ? _mm256_loadu_ps(smooth + k) : _mm256_set1_ps(1.0f);
        if (n < 8) {
          alignas(32) float tmp[8] = {1, 1, 1, 1, 1, 1, 1, 1};
          std::memcpy(tmp, smooth + k, n * sizeof(float));
          d = _mm256_load_ps(tmp);
        }
        a = _mm256_div_ps(a, d);
      }
      store8(v + k, a, n);
    }
  }

  // pass 2: group absmax (padded lanes are masked out of the max and NaN test)
  float group_amax(const float* __restrict vg, int64_t G, bool has_shift, bool is_unsigned, bool& nan) const {
    __m256 amax = c_.zero;
    for (int64_t j = 0; j < G; j += 8) {
      const int64_t n = G - j;
      __m256 a = load8<float>(vg + j, n);
      if (has_shift) a = _mm256_add_ps(a, c_.shift);
      if (n >= 8) {  // full vector: no lane mask (same max, same NaN test)
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0;
        a = is_unsigned ? _mm256_max_ps(a, c_.zero) : _mm256_and_ps(a, vabs_);
        amax = _mm256_max_ps(amax, a);
        continue;
      }
      __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
          _mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      nan |= _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), valid)) != 0;
      a = is_unsigned ? _mm256_max_ps(a, c_.zero) : _mm256_and_ps(a, vabs_);
      amax = _mm256_blendv_ps(amax, _mm256_max_ps(amax, a), valid);
    }
    const __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
    const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return std::max(_mm_cvtss_f32(m2), _mm_cvtss_f32(_mm_shuffle_ps(m2, m2, 1)));
  }

  // pass 3: q = clamp(floor(v / scale + 0.5))
  void quantize_group(const float* __restrict vg, int64_t G, float scale, bool has_shift, int8_t* __restrict q) const {
    const __m256 vs = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < G; j += 8) {
      const int64_t n = std::min<int64_t>(G - j, 8);
      __m256 a = load8<float>(vg + j, n);
      if (has_shift) a = _mm256_add_ps(a, c_.shift);
      a = _mm256_add_ps(_mm256_div_ps(a, vs), c_.half);
      a = _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      // operand order keeps NaN (max/min return the 2nd operand on NaN) like torch.clamp
      a = _mm256_min_ps(c_.qmax, _mm256_max_ps(c_.qmin, a));
      store_low_bytes(q + j, _mm256_cvtps_epi32(a), qbias_, n);
    }
  }

  static void lora_down_rows(const float* const* xr, int rb, const float* __restrict ld, int64_t R, int64_t K,
                             float* __restrict h);  // below

 private:
  const QuantConsts<F32x8> c_;
  const __m256 vabs_;
  const uint8_t qbias_;
};

// h[i][j] = sum_k xr[i][k] * ld[j][k] for up to 4 rows, with the AVX-512 kernel's lane
// structure (see the file comment). 2 ranks x 2 rows per pass keep 8 accumulators in
// registers; the order inside each accumulator lane is unchanged by that blocking.
void QuantKernel::lora_down_rows(const float* const* xr, int rb, const float* __restrict ld, int64_t R, int64_t K,
                                 float* __restrict h) {
  const int64_t kmain = K - K % 16;
  const int64_t tail = K - kmain;
  // zero-padded copies of the tail (the AVX-512 kernel's masked loads read 0 there)
  alignas(32) float xt[4][16], wt[2][16];
  for (int i0 = 0; i0 < rb; i0 += 2) {
    const int ib = std::min(2, rb - i0);
    const float* x0 = xr[i0];
    const float* x1 = xr[i0 + ib - 1];
    for (int64_t j0 = 0; j0 < R; j0 += 2) {
      const float* w0 = ld + j0 * K;
      const float* w1 = ld + std::min<int64_t>(j0 + 1, R - 1) * K;
      __m256 a00l = _mm256_setzero_ps(), a00h = a00l, a01l = a00l, a01h = a00l;
      __m256 a10l = a00l, a10h = a00l, a11l = a00l, a11h = a00l;
#define SVDQ_STEP(X0, X1, W0, W1)                                                                  \
      {                                                                                          \
        const __m256 w0l = _mm256_loadu_ps(W0), w0h = _mm256_loadu_ps((W0) + 8);                 \
        const __m256 w1l = _mm256_loadu_ps(W1), w1h = _mm256_loadu_ps((W1) + 8);                 \
        __m256 xl = _mm256_loadu_ps(X0), xh = _mm256_loadu_ps((X0) + 8);                         \
        a00l = _mm256_fmadd_ps(xl, w0l, a00l); a00h = _mm256_fmadd_ps(xh, w0h, a00h);             \
        a01l = _mm256_fmadd_ps(xl, w1l, a01l); a01h = _mm256_fmadd_ps(xh, w1h, a01h);             \
        xl = _mm256_loadu_ps(X1); xh = _mm256_loadu_ps((X1) + 8);                                \
        a10l = _mm256_fmadd_ps(xl, w0l, a10l); a10h = _mm256_fmadd_ps(xh, w0h, a10h);             \
        a11l = _mm256_fmadd_ps(xl, w1l, a11l); a11h = _mm256_fmadd_ps(xh, w1h, a11h);             \
      }
      for (int64_t k = 0; k < kmain; k += 16) SVDQ_STEP(x0 + k, x1 + k, w0 + k, w1 + k)
      if (tail) {
        std::memset(xt, 0, sizeof(xt));
        std::memset(wt, 0, sizeof(wt));
        std::memcpy(xt[0], x0 + kmain, tail * sizeof(float));
        std::memcpy(xt[1], x1 + kmain, tail * sizeof(float));
        std::memcpy(wt[0], w0 + kmain, tail * sizeof(float));
        std::memcpy(wt[1], w1 + kmain, tail * sizeof(float));
        SVDQ_STEP(xt[0], xt[1], wt[0], wt[1])
      }
#undef SVDQ_STEP
      h[i0 * R + j0] = reduce16(a00l, a00h);
      if (j0 + 1 < R) h[i0 * R + j0 + 1] = reduce16(a01l, a01h);
      if (ib > 1) {
        h[(i0 + 1) * R + j0] = reduce16(a10l, a10h);
        if (j0 + 1 < R) h[(i0 + 1) * R + j0 + 1] = reduce16(a11l, a11h);
      }
    }
  }
}

}  // namespace

SVDQ_LIBRARY_FRAGMENT(SVDQ_NS, m) { def_quantize_act<QuantKernel>(m); }
