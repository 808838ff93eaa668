// ARM64 NEON versions of the CPU kernels, same arithmetic as the x86 ones bit for bit
// (no torch dependency: tested by a standalone harness under qemu-aarch64, see
// harness_neon.cpp and tests/runtime/test_cpu_isa_neon.py; not yet a torch extension).
//
// - grouped GEMM: exact int32 partial per group (SDOT s8 x s8 -> s32 where the CPU has the
//   dot-product extension, else SMULL s8 x s8 -> s16 products, exact, + SADALP into s32),
//   then acc = g == 0 ? float(I_0) * (sa * sw) : fma(float(I_g), sa * sw, acc), groups
//   ascending; epilogue acc = fma(h[m, j], lora_up[n, j], acc) over the rank columns not all
//   zero in the output's 64-column panel (as the x86 kernels), then acc + bias.
// - fused quantizer: x' = x / smooth, + shift, group absmax, scale = amax / qmax (1 unless
//   > 0, NaN -> 1), q = clamp(floor(v / scale + 0.5)) with one IEEE fp32 op each (build with
//   -ffp-contract=off); NaN -> q = 0 as on x86 (FCVTZS gives 0 for NaN). h = X' L2^T with
//   the x86 kernels' 16-lane structure and GCC's _mm512_reduce_add_ps tree.
// - W4A16 GEMV: the same 16-lane structure per group.
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace svdq_neon {

// ---------------------------------------------------------------- grouped GEMM

constexpr int NC = 64;  // epilogue panel width (the rank-skipping granularity of the x86 kernels)

// Exact int32 dot products of 16 k of activations a (s8) with 4 columns of weights packed
// as [4 k-quads][4 columns][4 k] (b, 64 bytes): lane c of the result gains column c's sum.
inline int32x4_t dot16x4(int32x4_t acc, int8x16_t a, const int8_t* b) {
#if defined(__ARM_FEATURE_DOTPROD)
  acc = vdotq_laneq_s32(acc, vld1q_s8(b), a, 0);  // SDOT by element: a's k-quad q, all 4 columns
  acc = vdotq_laneq_s32(acc, vld1q_s8(b + 16), a, 1);
  acc = vdotq_laneq_s32(acc, vld1q_s8(b + 32), a, 2);
  acc = vdotq_laneq_s32(acc, vld1q_s8(b + 48), a, 3);
  return acc;
#else
  const int32x4_t a32 = vreinterpretq_s32_s8(a);
  for (int q = 0; q < 4; ++q) {
    const int8x16_t w = vld1q_s8(b + 16 * q);
    int8x16_t aq;
    switch (q) {  // the lane index must be a constant
      case 0: aq = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 0)); break;
      case 1: aq = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 1)); break;
      case 2: aq = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 2)); break;
      default: aq = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 3)); break;
    }
    const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(aq));  // columns 0, 1; exact
    const int16x8_t hi = vmull_s8(vget_high_s8(w), vget_high_s8(aq));  // columns 2, 3
    acc = vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
  }
  return acc;
#endif
}

// qa [M, K] s8, sa [M, K/G], qw [N, K] s8 (row-major), sw [N, K/G]; h [M, R], lu [N, R],
// bias [N] optional -> y [M, N].
inline void grouped_gemm(int64_t M, int64_t N, int64_t K, int64_t G, const int8_t* qa, const float* sa,
                         const int8_t* qw, const float* sw, const float* h, const float* lu, int64_t R,
                         const float* bias, float* y) {
  const int64_t ng = K / G;
  // Packed weight: 4-column groups [N/4][K/4 quads][4 columns][4 k] (zero padding columns).
  const int64_t N4 = (N + 3) / 4;
  std::vector<int8_t> Bp(N4 * 4 * K, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) Bp[(n / 4) * 4 * K + (k / 4) * 16 + (n % 4) * 4 + k % 4] = qw[n * K + k];
  std::vector<float> acc(4);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c4 = 0; c4 < N4; ++c4) {
      float32x4_t yv = vdupq_n_f32(0.0f);
      float swv[4];
      for (int64_t g = 0; g < ng; ++g) {
        int32x4_t I = vdupq_n_s32(0);
        int64_t k = g * G;
        const int8_t* panel = Bp.data() + c4 * 4 * K;
        for (; k + 16 <= (g + 1) * G; k += 16) I = dot16x4(I, vld1q_s8(qa + m * K + k), panel + 4 * k);
        if (k < (g + 1) * G) {  // group tail (G % 16 != 0, G % 4 == 0): zero-padded quads, exact
          int8_t at[16] = {0};
          int8_t bt[64] = {0};
          const int64_t rem = (g + 1) * G - k;
          std::memcpy(at, qa + m * K + k, rem);
          std::memcpy(bt, panel + 4 * k, 4 * rem);
          I = dot16x4(I, vld1q_s8(at), bt);
        }
        for (int c = 0; c < 4; ++c) {
          const int64_t n = c4 * 4 + c;
          swv[c] = n < N ? sw[n * ng + g] : 0.0f;
        }
        const float32x4_t p = vmulq_f32(vdupq_n_f32(sa[m * ng + g]), vld1q_f32(swv));
        const float32x4_t f = vcvtq_f32_s32(I);  // round to nearest even
        yv = g == 0 ? vmulq_f32(f, p) : vfmaq_f32(yv, f, p);
      }
      float out[4];
      vst1q_f32(out, yv);
      for (int c = 0; c < 4 && c4 * 4 + c < N; ++c) y[m * N + c4 * 4 + c] = out[c];
    }
  }
  if (h || bias) {
    for (int64_t n0 = 0; n0 < N; n0 += NC) {
      std::vector<int64_t> js;
      if (h) {
        for (int64_t j = 0; j < R; ++j) {
          bool any = false;
          for (int64_t n = n0; n < std::min(N, n0 + NC); ++n) any |= lu[n * R + j] != 0.0f;
          if (any) js.push_back(j);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = n0; n < std::min(N, n0 + NC); n += 4) {
          const int64_t nn = std::min<int64_t>(4, N - n);
          float a[4] = {0, 0, 0, 0}, l[4], b[4];
          std::memcpy(a, y + m * N + n, nn * sizeof(float));
          float32x4_t v = vld1q_f32(a);
          for (int64_t j : js) {
            for (int c = 0; c < 4; ++c) l[c] = c < nn ? lu[(n + c) * R + j] : 0.0f;
            v = vfmaq_f32(v, vdupq_n_f32(h[m * R + j]), vld1q_f32(l));
          }
          if (bias) {
            for (int c = 0; c < 4; ++c) b[c] = c < nn ? bias[n + c] : 0.0f;
            v = vaddq_f32(v, vld1q_f32(b));
          }
          vst1q_f32(a, v);
          std::memcpy(y + m * N + n, a, nn * sizeof(float));
        }
      }
    }
  }
}

// ---------------------------------------------------------------- 16-lane sums

struct Acc16 {
  float32x4_t q[4];
};
inline Acc16 zero16() { return {{vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)}}; }
// GCC's _mm512_reduce_add_ps: (lanes 8-15 + 0-7), then upper + lower 4, [0]+[2] | [1]+[3], sum.
inline float reduce16(const Acc16& a) {
  const float32x4_t t3lo = vaddq_f32(a.q[2], a.q[0]), t3hi = vaddq_f32(a.q[3], a.q[1]);
  const float32x4_t t6 = vaddq_f32(t3hi, t3lo);
  const float t80 = vgetq_lane_f32(t6, 0) + vgetq_lane_f32(t6, 2);
  const float t81 = vgetq_lane_f32(t6, 1) + vgetq_lane_f32(t6, 3);
  return t80 + t81;
}

// ---------------------------------------------------------------- fused quantizer

// x [M, K] fp32 -> q [M, K] s8, s [M, K/G], h [M, R] (if ld [R, K]).
inline void quantize_act(int64_t M, int64_t K, int64_t G, const float* x, const float* smooth, float qmin, float qmax,
                         bool is_unsigned, float shift, const float* ld, int64_t R, int8_t* q, float* s, float* h) {
  const int64_t ng = K / G;
  std::vector<float> v(K + 16);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t k = 0; k < K; ++k) v[k] = smooth ? x[r * K + k] / smooth[k] : x[r * K + k];
    for (int64_t g = 0; g < ng; ++g) {
      float amax = 0.0f;
      bool nan = false;
      for (int64_t j = g * G; j < (g + 1) * G; ++j) {
        float a = v[j];
        if (shift != 0.0f) a = a + shift;
        nan |= std::isnan(a);
        a = is_unsigned ? std::max(a, 0.0f) : std::fabs(a);
        amax = std::max(amax, a);
      }
      float sc = amax / qmax;
      if (nan || !(sc > 0.0f)) sc = 1.0f;
      s[r * ng + g] = sc;
      const float32x4_t vs = vdupq_n_f32(sc), half = vdupq_n_f32(0.5f);
      for (int64_t j = g * G; j < (g + 1) * G; j += 4) {
        float t[4] = {0, 0, 0, 0};
        const int64_t n = std::min<int64_t>(4, (g + 1) * G - j);
        std::memcpy(t, v.data() + j, n * sizeof(float));
        float32x4_t a = vld1q_f32(t);
        if (shift != 0.0f) a = vaddq_f32(a, vdupq_n_f32(shift));
        a = vrndmq_f32(vaddq_f32(vdivq_f32(a, vs), half));  // floor(v / scale + 0.5)
        a = vminq_f32(vdupq_n_f32(qmax), vmaxq_f32(vdupq_n_f32(qmin), a));  // NaN stays NaN
        int32_t o[4];
        vst1q_s32(o, vcvtq_s32_f32(a));  // NaN -> 0 (x86: 0x80000000, whose low byte is 0)
        for (int64_t i = 0; i < n; ++i) q[r * K + j + i] = static_cast<int8_t>(o[i]);
      }
    }
    if (ld) {
      const int64_t kmain = K - K % 16;
      for (int64_t jr = 0; jr < R; ++jr) {
        const float* w = ld + jr * K;
        Acc16 a = zero16();
        for (int64_t k = 0; k < K; k += 16) {
          float xt[16] = {0}, wt[16] = {0};  // the tail's zero-filled lanes (x86: masked loads)
          const int64_t n = k < kmain ? 16 : K - kmain;
          std::memcpy(xt, v.data() + k, n * sizeof(float));
          std::memcpy(wt, w + k, n * sizeof(float));
          for (int i = 0; i < 4; ++i) a.q[i] = vfmaq_f32(a.q[i], vld1q_f32(xt + 4 * i), vld1q_f32(wt + 4 * i));
        }
        h[r * R + jr] = reduce16(a);
      }
    }
  }
}

// ---------------------------------------------------------------- W4A16 GEMV

// x [M, K] fp32, qw [N, K/2] packed int4 (low nibble = even k), s [N, K/G] -> y [M, N].
inline void w4a16_gemv(int64_t M, int64_t N, int64_t K, int64_t G, const float* x, const int8_t* qw, const float* s,
                       float* y) {
  const int64_t Kh = K / 2, gh = G / 2, ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    std::vector<float> xe(Kh), xo(Kh);
    for (int64_t j = 0; j < Kh; ++j) {
      xe[j] = x[m * K + 2 * j];
      xo[j] = x[m * K + 2 * j + 1];
    }
    for (int64_t n = 0; n < N; ++n) {
      Acc16 acc = zero16();
      for (int64_t g = 0; g < ng; ++g) {
        Acc16 part = zero16();
        for (int64_t j = g * gh; j < (g + 1) * gh; j += 16) {
          float lo[16], hi[16];
          for (int i = 0; i < 16; ++i) {
            const uint8_t b = static_cast<uint8_t>(qw[n * Kh + j + i]);
            lo[i] = static_cast<float>(((b & 15) ^ 8) - 8);
            hi[i] = static_cast<float>((((b >> 4) & 15) ^ 8) - 8);
          }
          for (int i = 0; i < 4; ++i) {
            part.q[i] = vfmaq_f32(part.q[i], vld1q_f32(lo + 4 * i), vld1q_f32(xe.data() + j + 4 * i));
            part.q[i] = vfmaq_f32(part.q[i], vld1q_f32(hi + 4 * i), vld1q_f32(xo.data() + j + 4 * i));
          }
        }
        const float32x4_t sv = vdupq_n_f32(s[n * ng + g]);
        for (int i = 0; i < 4; ++i) acc.q[i] = vfmaq_f32(acc.q[i], part.q[i], sv);
      }
      y[m * N + n] = reduce16(acc);
    }
  }
}

}  // namespace svdq_neon
