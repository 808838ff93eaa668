// Exact grouped int8 GEMM for x86-64 CPUs without AVX-512: AVX2 (Haswell / Zen 1 and
// later), and AVX-VNNI (256-bit VPDPBUSD, Alder Lake / Zen 5 client) when built with
// -mavxvnni -DSVDQ_AVXVNNI=1. Same contract and the same numbers as the AVX-512 kernel of
// grouped_gemm_avx512.cpp, bit for bit:
//
//   I_g[m, n] = sum_{k in group g} qa[m, k] * qw[n, k]          (int32, exact)
//   Y[m, n]   = fold over g ascending: acc = g == 0 ? float(I_0) * (sa * sw)
//                                                   : fma(float(I_g), sa * sw, acc)
//   then (u8 entry point) Y += h @ lora_up^T (fp32 FMAs, ascending rank, the same
//   all-zero-rank skipping per 64-column panel) and Y += bias.
//
// Any exact way of computing I_g gives the same int32, hence the same output. AVX2 has
// no u8 x s8 -> s32 dot product, so each weight gets the exact layout that suits its range
// (chosen when the weight is packed; recorded in the packed tensor's shape / dtype):
//
// - "U4" (every weight in [-8, 7]: int4 weights, W4A4 / W4A8): the weight is stored as
//   u = w + 8 in [0, 15] and VPMADDUBSW(u8 weight, s8 activation) adds two products into
//   one int16: |u0*a0 + u1*a1| <= 2 * 15 * 128 = 3840, so it never saturates, for any
//   int8 activation. The int16 lanes then accumulate F k-quads before one VPMADDWD by 1
//   widens them to int32, with F * 2 * 15 * max|a| <= 32767 (max|a| measured per call:
//   F = 136 k-quads for signed 4-bit activations, 72 for unsigned, 8 for 8-bit ones), so
//   no int16 sum can wrap either. The +8 is removed exactly per row: I = sum u*a - 8 *
//   sum_k a. About 2 instructions per 32 multiply-adds.
// - "W16" (any other int8 weight: W8A8, the per-token INT8 mode): both operands are
//   sign-extended to int16 (VPMOVSXBW) and VPMADDWD gives exact int32 pair sums (the
//   products of int8 values never saturate int16 x int16 -> int32). ~4 instructions per 32.
// - "VNNI" (AVX-VNNI builds): the AVX-512 kernel's arithmetic at 256 bits: activations
//   biased to u8 (a ^ 0x80 == a + 128), VPDPBUSD, and the exact correction -128 * sum_k w
//   per column. One instruction per 32.
//
// The panel width is the AVX-512 kernel's 64 columns (so the low-rank epilogue skips the
// same all-zero rank columns: a skipped fma(h, 0, acc) can differ from acc in the sign of
// a zero or for an infinite h); micro-tiles are 6 rows x 16 columns (12 accumulators of
// the 16 ymm registers).
//
// Large groups (the per-token mode runs G == K, K up to 12288): the K loop is blocked at
// 256 k inside a group too, so one weight block (64 columns x 256 k = 16 KiB) stays in L1
// while every row tile of the task uses it; the int32 partials of an unfinished group wait
// in a small per-task buffer. int32 cannot overflow: |I| <= 255 * 128 * K < 2^31 for
// K < 65793 (checked).
//
// This file holds the micro-kernels, the packing and the per-layout activation operands; the
// checks, epilogue operands and task loop are op_glue.h's. Built by
// svdq_compile/runtime/cpu_gemm.py as its own extension (own -m flags) so that a CPU without
// AVX-512 can build and load it; the ops appear as torch.ops.<SVDQ_NS>.*.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "op_glue.h"

#ifndef SVDQ_AVXVNNI
#define SVDQ_AVXVNNI 0
#endif

namespace {

constexpr int NC = 64;     // output columns per packed weight panel (as the AVX-512 kernel)
constexpr int CS = 16;     // columns per micro-tile (2 ymm of 8 lanes)
constexpr int MR = 6;      // rows per micro-tile
constexpr int64_t MC = 96;  // rows per task (multiple of MR)
constexpr int64_t KBQ = 64;  // k-quads per K block (256 k: a 16 KiB weight block)

// kU4P: QServe-style progressive per-token weights e = (u - z) * s (u in [0, 15] stored as
// U4, integer group scale s and zero z): one activation group spans K, the weight groups
// only change the integer bookkeeping (see pack_weight_progressive).
enum Layout : int { kU4 = 0, kW16 = 1, kVNNI = 2, kU4P = 3 };

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One row of a dot step: broadcast 4 activation bytes at P, multiply by both weight vectors
// (MUL: vpmaddubsw u8 weights x s8 activations -> s16 pairs | vpmaddwd s16 x s16 -> s32
// pairs) and ADD into the row's two accumulators. Inline asm with two early-clobber
// temporaries: with intrinsics GCC hoists all six broadcasts and keeps a product per
// accumulator, runs out of the 16 ymm registers and spills accumulators in the inner loop
// (measured 4x slower); this way 12 accumulators + 2 weight vectors + 2 temporaries fit.
#define SVDQ_STEP(MUL, ADD, c0, c1, P, b0, b1)                                                 \
  {                                                                                            \
    __m256i t0_, t1_;                                                                          \
    asm("vpbroadcastd %[a], %[t0]\n\t" MUL " %[t0], %[w0], %[t1]\n\t" ADD " %[t1], %[x0], %[x0]\n\t" \
        MUL " %[t0], %[w1], %[t0]\n\t" ADD " %[t0], %[x1], %[x1]"                               \
        : [x0] "+x"(c0), [x1] "+x"(c1), [t0] "=&x"(t0_), [t1] "=&x"(t1_)                       \
        : [a] "m"(*reinterpret_cast<const int32_t*>(P)), [w0] "x"(b0), [w1] "x"(b1));          \
  }

#if SVDQ_AVXVNNI
// In-place c += dot4(u8 a, s8 b), VEX-encoded (the EVEX form would need AVX512-VNNI).
// (Intel order VPDPBUSD acc, u8, s8; AT&T reverses it.) Same register plan as SVDQ_STEP.
#define SVDQ_DPBUSD2(c0, c1, P, b0, b1)                                                          \
  {                                                                                            \
    __m256i t0_;                                                                               \
    asm("vpbroadcastd %[a], %[t0]\n\t%{vex%} vpdpbusd %[w0], %[t0], %[x0]\n\t"                    \
        "%{vex%} vpdpbusd %[w1], %[t0], %[x1]"                                                     \
        : [x0] "+x"(c0), [x1] "+x"(c1), [t0] "=&x"(t0_)                                        \
        : [a] "m"(*reinterpret_cast<const int32_t*>(P)), [w0] "x"(b0), [w1] "x"(b1));          \
  }
#endif

// Everything one micro-tile needs; pointers already offset to its first row / column.
struct Tile {
  const uint8_t* A;      // activations at row m: s8 (U4), int16 (W16, as bytes), u8 biased (VNNI)
  int64_t lda;           // bytes per activation row
  const float* sa;       // [.][ng] at row m
  int64_t ng;
  const int32_t* asum;   // U4: [.][ldas] per-row group sums of the activations at row m
  int64_t ldas;
  const int8_t* B;       // the panel, offset to this tile's 16 columns
  const int32_t* bias;   // VNNI: [ng][Np] at the tile's first column
  const float* swt;      // [ng][Np] at the tile's first column
  int64_t Np;
  float* C;              // output at (m, n), stride ldc
  int64_t ldc;
  int32_t* part;         // int32 partials of an unfinished group: [R][NC] at (m, tile column)
  int64_t G4;            // k-quads per group
  int64_t F;             // U4: k-quads per int16 chunk
  // kU4P: per weight group g and column: s ([ngw][Np] at the tile's first column), s * z,
  // the running exact int32 total over the weight groups ([R][NC] at (m, tile column)).
  const int32_t* ps;
  const int32_t* psz;
  int32_t* tot;
  int64_t ngw;
};

#define SVDQ_ROW(r, X) if constexpr (R > r) { X(r) }
#define SVDQ_ROWS(X) SVDQ_ROW(0, X) SVDQ_ROW(1, X) SVDQ_ROW(2, X) SVDQ_ROW(3, X) SVDQ_ROW(4, X) SVDQ_ROW(5, X)

// Fold one row's exact int32 partials x0 | x1 (columns 0-7 | 8-15) of group g into C.
// w0 | w1: the group's weight scales of the tile's 16 columns (loaded once per tile: the
// compiler cannot hoist them past the stores to C, which might alias).
inline void fold_row(const Tile& t, int r, int64_t g, __m256i x0, __m256i x1, __m256 w0, __m256 w1) {
  const __m256 s = _mm256_set1_ps(t.sa[r * t.ng + g]);
  const __m256 p0 = _mm256_mul_ps(s, w0);
  const __m256 p1 = _mm256_mul_ps(s, w1);
  const __m256 f0 = _mm256_cvtepi32_ps(x0), f1 = _mm256_cvtepi32_ps(x1);
  float* c = t.C + r * t.ldc;
  // g == 0 stores round(I * p) (== fma(I, p, 0)): C needs no zero fill.
  if (g == 0) {
    _mm256_storeu_ps(c, _mm256_mul_ps(f0, p0));
    _mm256_storeu_ps(c + 8, _mm256_mul_ps(f1, p1));
  } else {
    _mm256_storeu_ps(c, _mm256_fmadd_ps(f0, p0, _mm256_loadu_ps(c)));
    _mm256_storeu_ps(c + 8, _mm256_fmadd_ps(f1, p1, _mm256_loadu_ps(c + 8)));
  }
}

// The exact correction of a layout's operand bias, added to row r's int32 partials.
template <int L>
inline void correct(const Tile& t, int r, int64_t g, __m256i& x0, __m256i& x1) {
  if constexpr (L == kU4) {  // weights stored as w + 8: remove 8 * sum_k a
    const __m256i c = _mm256_set1_epi32(-8 * t.asum[r * t.ldas + g]);
    x0 = _mm256_add_epi32(x0, c);
    x1 = _mm256_add_epi32(x1, c);
  } else if constexpr (L == kVNNI) {  // activations stored as a + 128: remove 128 * sum_k w
    x0 = _mm256_add_epi32(x0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.bias + g * t.Np)));
    x1 = _mm256_add_epi32(x1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.bias + g * t.Np + 8)));
  }
}

// Row r's exact int32 partials x0 | x1 of (U4: activation) group g are complete: fold them.
// kU4P: g is a weight group; the exact total T = sum_g s * (sum_k u * a - z * sum_k a)
// (= sum_k e * a) waits in t.tot until the last weight group, then one fold (the
// activation group is all of K: sa [M, 1], the per-channel scale in swt row 0).
template <int L>
inline void finish(const Tile& t, int r, int64_t g, __m256i x0, __m256i x1, __m256 sw0, __m256 sw1) {
  if constexpr (L == kU4P) {
    const __m256i as = _mm256_set1_epi32(t.asum[r * t.ldas + g]);
    const int32_t* s = t.ps + g * t.Np;
    const int32_t* sz = t.psz + g * t.Np;
    __m256i* T = reinterpret_cast<__m256i*>(t.tot + r * NC);
    x0 = _mm256_sub_epi32(_mm256_mullo_epi32(x0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))),
                          _mm256_mullo_epi32(as, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz))));
    x1 = _mm256_sub_epi32(_mm256_mullo_epi32(x1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8))),
                          _mm256_mullo_epi32(as, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + 8))));
    if (g > 0) {
      x0 = _mm256_add_epi32(x0, _mm256_load_si256(T));
      x1 = _mm256_add_epi32(x1, _mm256_load_si256(T + 1));
    }
    if (g + 1 == t.ngw) {
      fold_row(t, r, 0, x0, x1, sw0, sw1);
    } else {
      _mm256_store_si256(T, x0);
      _mm256_store_si256(T + 1, x1);
    }
  } else {
    correct<L>(t, r, g, x0, x1);
    fold_row(t, r, g, x0, x1, sw0, sw1);
  }
}

// k-quads [s0, s1) of group g for R rows: s0 == group start -> the partials start at 0,
// else they come from t.part; s1 == group end -> folded into C, else stored to t.part.
// The accumulators are named scalars (GCC spills arrays of vectors in a tile this tight).
template <int R, int L>
void segment(const Tile& t, int64_t g, int64_t s0, int64_t s1) {
  const bool first = s0 == g * t.G4, last = s1 == (g + 1) * t.G4;
  __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  const uint8_t* A = t.A;
  const int64_t lda = t.lda;
#define SVDQ_PART(r, v) reinterpret_cast<__m256i*>(t.part + (r) * NC + 8 * (v))
  if constexpr (L == kU4 || L == kU4P) {
    const __m256i ones = _mm256_set1_epi16(1);
    bool in_part = !first;  // t.part holds the partials so far
    for (int64_t c0 = s0; c0 < s1; c0 += t.F) {
      const int64_t c1 = std::min(s1, c0 + t.F);
#define SVDQ_Z(r) c##r##0 = _mm256_setzero_si256(); c##r##1 = c##r##0;
      SVDQ_ROWS(SVDQ_Z)
#undef SVDQ_Z
      for (int64_t q = c0; q < c1; ++q) {
        const int8_t* bq = t.B + q * (NC * 4);
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq + 32));
#define SVDQ_DOT(r) SVDQ_STEP("vpmaddubsw", "vpaddw", c##r##0, c##r##1, A + (r) * lda + 4 * q, b0, b1)
        SVDQ_ROWS(SVDQ_DOT)
#undef SVDQ_DOT
      }
      const bool done = c1 == s1 && last;
      const int64_t gs = L == kU4P ? 0 : g;  // kU4P: the per-channel scale row
      const __m256 sw0 = done ? _mm256_loadu_ps(t.swt + gs * t.Np) : _mm256_setzero_ps();
      const __m256 sw1 = done ? _mm256_loadu_ps(t.swt + gs * t.Np + 8) : _mm256_setzero_ps();
      if (done && !in_part) {  // the common case (whole group in one chunk): fold directly
#define SVDQ_F(r)                                                                    \
        {                                                                            \
          __m256i x0 = _mm256_madd_epi16(c##r##0, ones), x1 = _mm256_madd_epi16(c##r##1, ones); \
          finish<L>(t, r, g, x0, x1, sw0, sw1);                                      \
        }
        SVDQ_ROWS(SVDQ_F)
#undef SVDQ_F
      } else {
#define SVDQ_P(r)                                                                    \
        {                                                                            \
          __m256i x0 = _mm256_madd_epi16(c##r##0, ones), x1 = _mm256_madd_epi16(c##r##1, ones); \
          if (in_part) {                                                             \
            x0 = _mm256_add_epi32(x0, _mm256_load_si256(SVDQ_PART(r, 0)));          \
            x1 = _mm256_add_epi32(x1, _mm256_load_si256(SVDQ_PART(r, 1)));          \
          }                                                                          \
          if (done) {                                                                \
            finish<L>(t, r, g, x0, x1, sw0, sw1);                                    \
          } else {                                                                   \
            _mm256_store_si256(SVDQ_PART(r, 0), x0);                                 \
            _mm256_store_si256(SVDQ_PART(r, 1), x1);                                 \
          }                                                                          \
        }
        SVDQ_ROWS(SVDQ_P)
#undef SVDQ_P
        in_part = true;
      }
    }
  } else {
    if (first) {
#define SVDQ_Z(r) c##r##0 = _mm256_setzero_si256(); c##r##1 = c##r##0;
      SVDQ_ROWS(SVDQ_Z)
#undef SVDQ_Z
    } else {
#define SVDQ_L(r) c##r##0 = _mm256_load_si256(SVDQ_PART(r, 0)); c##r##1 = _mm256_load_si256(SVDQ_PART(r, 1));
      SVDQ_ROWS(SVDQ_L)
#undef SVDQ_L
    }
    if constexpr (L == kW16) {
      // [k-pairs][64][2] int8: 16 columns x 2 k = 32 bytes, sign-extended to 2 x 16 int16.
      for (int64_t p = 2 * s0; p < 2 * s1; ++p) {
        const int8_t* bp = t.B + p * (NC * 2);
        const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp)));
        const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 16)));
#define SVDQ_DOT(r) SVDQ_STEP("vpmaddwd", "vpaddd", c##r##0, c##r##1, A + (r) * lda + 4 * p, b0, b1)
        SVDQ_ROWS(SVDQ_DOT)
#undef SVDQ_DOT
      }
    } else {
#if SVDQ_AVXVNNI
      for (int64_t q = s0; q < s1; ++q) {
        const int8_t* bq = t.B + q * (NC * 4);
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq + 32));
#define SVDQ_DOT(r) SVDQ_DPBUSD2(c##r##0, c##r##1, A + (r) * lda + 4 * q, b0, b1)
        SVDQ_ROWS(SVDQ_DOT)
#undef SVDQ_DOT
      }
#endif
    }
    if (last) {
      const __m256 sw0 = _mm256_loadu_ps(t.swt + g * t.Np), sw1 = _mm256_loadu_ps(t.swt + g * t.Np + 8);
#define SVDQ_F(r) { correct<L>(t, r, g, c##r##0, c##r##1); fold_row(t, r, g, c##r##0, c##r##1, sw0, sw1); }
      SVDQ_ROWS(SVDQ_F)
#undef SVDQ_F
    } else {
#define SVDQ_S(r) _mm256_store_si256(SVDQ_PART(r, 0), c##r##0); _mm256_store_si256(SVDQ_PART(r, 1), c##r##1);
      SVDQ_ROWS(SVDQ_S)
#undef SVDQ_S
    }
  }
#undef SVDQ_PART
  (void)c00; (void)c01;
}
#undef SVDQ_ROW
#undef SVDQ_ROWS

// k-quads [q0, q1): whole groups, or a part of one group (G > 256).
template <int R, int L>
void micro(const Tile& t, int64_t q0, int64_t q1) {
  for (int64_t s0 = q0; s0 < q1;) {
    const int64_t g = s0 / t.G4;
    const int64_t s1 = std::min(q1, (g + 1) * t.G4);
    segment<R, L>(t, g, s0, s1);
    s0 = s1;
  }
}

template <int L>
using MicroFn = void (*)(const Tile&, int64_t, int64_t);
template <int L>
constexpr MicroFn<L> kMicro[MR + 1] = {nullptr, micro<1, L>, micro<2, L>, micro<3, L>, micro<4, L>, micro<5, L>,
                                       micro<6, L>};

// 8-lane fp32 vectors for op_glue.h's lowrank_bias_rows (the epilogue, shared with the
// AVX-512 kernel: the same FMAs per output element, in the same order).
SVDQ_F32_VEC(F32x8, __m256, 8, _mm256);

// The micro-kernels of the AVX2 / AVX-VNNI extensions for op_glue.h's GEMM ops (interface there).
struct GemmKernel {
  static constexpr int NC = ::NC;  // the file's panel width (64)
  static constexpr int64_t MC = ::MC;
  // One task at a time from a shared counter (see op_glue.h's Schedule).
  static constexpr Schedule kSchedule = Schedule::kDynamic;

  struct Packed {
    at::Tensor Bp, bias, swt;
    int layout;
    int64_t ngw;  // weight groups (kU4P) / groups
  };

  static std::vector<at::Tensor> pack_weight(const at::Tensor& qw, const at::Tensor& sw, int64_t G, bool int4);

  static Packed check_packed(const GemmArgs& a, const at::Tensor& Bp, const at::Tensor& bias, const at::Tensor& swt) {
    const int64_t K = a.K, ng = a.ng, Np = a.Np;
    const bool prog = bias.dim() == 3;  // [2, ngw, Np] integer tables of pack_weight_progressive
    const int layout = prog ? kU4P : Bp.scalar_type() == at::kByte ? kU4 : Bp.size(3) == 2 ? kW16 : kVNNI;
    const int64_t ngw = prog ? bias.size(1) : ng;
    TORCH_CHECK(!prog || (a.G == K && bias.size(0) == 2 && bias.size(2) == Np && ngw > 0 && K % ngw == 0 &&
                          (K / ngw) % 4 == 0 && Bp.scalar_type() == at::kByte),
                "progressive weights need G == K (one activation group) and their [2, K/Gw, Np] tables");
    TORCH_CHECK(layout != kVNNI || SVDQ_AVXVNNI, "weight packed for AVX-VNNI, this build has no AVX-VNNI");
    TORCH_CHECK(Bp.dim() == 4 && Bp.size(1) * Bp.size(3) == K && Bp.size(2) == NC, "packed weight does not match K");
    TORCH_CHECK(swt.size(0) == ng && swt.size(1) == Np &&
                    (layout != kVNNI || (bias.size(0) == ng && bias.size(1) == Np)),
                "bad packing");
    return {Bp, bias, swt, layout, ngw};
  }

  static void run(const GemmArgs& a, const Packed& p, float* C);

  // No AMX in these builds (same op names as the AVX-512 extension).
  static bool set_amx(bool) { return false; }
  static bool amx_enabled() { return false; }
};

// w[n][k] of qw ([N, K] int8, or [N, K/2] packed int4: low nibble = even k).
inline int8_t weight_at(const int8_t* q, int64_t row_bytes, bool int4, int64_t n, int64_t k) {
  if (!int4) return q[n * row_bytes + k];
  const uint8_t b = static_cast<uint8_t>(q[n * row_bytes + k / 2]);
  const int v = (k & 1) ? (b >> 4) : (b & 15);
  return static_cast<int8_t>(v >= 8 ? v - 16 : v);
}

// qw: [N, K] int8 (or [N, K/2] packed int4), sw: [N, K/G] ->
//   Bp: U4: [NB, K/4, NC, 4] uint8 (w + 8) | W16: [NB, K/2, NC, 2] int8 | VNNI: [NB, K/4, NC, 4] int8,
//   bias: VNNI: [ng, Np] int32 = -128 * sum_k w (others: [0]), swt: [ng, Np] fp32 (0 past N).
std::vector<at::Tensor> GemmKernel::pack_weight(const at::Tensor& qw_in, const at::Tensor& sw_in, int64_t G,
                                                bool int4) {
  const PackArgs pa = pack_args<NC>(qw_in, sw_in, G, int4);
  const at::Tensor& qw = pa.qw;
  const int64_t N = pa.N, K = pa.K, row_bytes = pa.row_bytes, ng = pa.ng, NB = pa.NB, Np = pa.Np, K4 = K / 4;
  TORCH_CHECK(K < 65793, "K too large: the int32 group sums could overflow");
  const int8_t* q = qw.data_ptr<int8_t>();
  int layout = kVNNI;
  if (!SVDQ_AVXVNNI) {
    bool small = int4;  // int4 weights are in [-8, 7] by construction
    if (!small) {
      const auto mm = at::aminmax(qw);
      small = std::get<0>(mm).item<int8_t>() >= -8 && std::get<1>(mm).item<int8_t>() <= 7;
    }
    layout = small ? kU4 : kW16;
  }
  at::Tensor Bp = layout == kU4 ? at::empty({NB, K4, NC, 4}, qw.options().dtype(at::kByte))
                  : layout == kW16 ? at::empty({NB, K / 2, NC, 2}, qw.options())
                                   : at::empty({NB, K4, NC, 4}, qw.options());
  at::Tensor bias = at::zeros({layout == kVNNI ? ng : 0, Np}, qw.options().dtype(at::kInt));
  at::Tensor swt = transposed_scales(pa);
  uint8_t* bp = reinterpret_cast<uint8_t*>(Bp.data_ptr());
  int32_t* bi = bias.data_ptr<int32_t>();
  const int kw = layout == kW16 ? 2 : 4;  // k per column entry
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> col(K);
    for (int64_t nb = b0; nb < b1; ++nb) {
      uint8_t* panel = bp + nb * K * NC;  // every layout: K bytes per column
      for (int64_t c = 0; c < NC; ++c) {
        const int64_t n = nb * NC + c;
        if (n < N) {
          for (int64_t k = 0; k < K; ++k) col[k] = weight_at(q, row_bytes, int4, n, k);
        } else {
          std::fill(col.begin(), col.end(), 0);  // padding columns: weight 0
        }
        for (int64_t k = 0; k < K; ++k) {
          const int8_t w = col[k];
          panel[(k / kw) * (NC * kw) + c * kw + k % kw] =
              layout == kU4 ? static_cast<uint8_t>(w + 8) : static_cast<uint8_t>(w);
        }
        if (layout == kVNNI) {
          for (int64_t g = 0; g < ng; ++g) {
            int32_t s = 0;
            for (int64_t k = g * G; k < (g + 1) * G; ++k) s += col[k];
            bi[g * Np + n] = -128 * s;
          }
        }
      }
    }
  });
  return {Bp, bias, swt};
}

// QServe-style progressive weights (runtime/per_token.py, w4a8-int8): e = (u - z) * s with
// qweight [N, K/2] the packed nibbles u - 8 (u in [0, 15]), wscales / wzeros [N, K/Gw] int8
// (s, z), wchannel [N] fp32. The GEMM runs with one activation group spanning K and gives
// exactly the output of the expanded int8 weight e with sw = wchannel (the same exact int32
// sum over K): sum_k e * a = sum_g s_g * (sum_{k in g} u * a - z_g * sum_{k in g} a), where
// the u * a products are the U4 layout's (u is the stored w + 8), so the int8 x int8 product
// runs at the 4-bit speed. Returns [Bp (U4), tables [2, K/Gw, Np] int32 (s, s * z), swt [1, Np]].
std::vector<at::Tensor> pack_weight_progressive(const at::Tensor& qweight, const at::Tensor& wscales,
                                                const at::Tensor& wzeros, const at::Tensor& wchannel, int64_t Gw) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "qweight must be [N, K/2] packed int4");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  TORCH_CHECK(Gw > 0 && Gw % 4 == 0 && K % Gw == 0, "bad weight group size");
  const int64_t ngw = K / Gw;
  TORCH_CHECK(wscales.sizes() == wzeros.sizes() && wscales.dim() == 2 && wscales.size(0) == N &&
                  wscales.size(1) == ngw && wchannel.numel() == N,
              "wscales / wzeros must be [N, K/Gw], wchannel [N]");
  std::vector<at::Tensor> u4 =
      GemmKernel::pack_weight(qweight, at::zeros({N, ngw}, wchannel.options().dtype(at::kFloat)), Gw, true);
  const int64_t Np = u4[0].size(0) * NC;
  const at::Tensor s = wscales.to(at::kInt).t().contiguous(), z = wzeros.to(at::kInt).t().contiguous();
  at::Tensor tables = at::zeros({2, ngw, Np}, s.options());
  tables.select(0, 0).narrow(1, 0, N).copy_(s);
  tables.select(0, 1).narrow(1, 0, N).copy_(s * z);
  at::Tensor swt = at::zeros({1, Np}, wchannel.options().dtype(at::kFloat));
  swt.narrow(1, 0, N).copy_(wchannel.to(at::kFloat).reshape({1, N}));
  return {u4[0], tables, swt};
}

// One thread's buffers in the task loop, 32-byte aligned [MC][NC] blocks: the int32 partials
// of unfinished groups (U4 chunks and split groups), kU4P's exact totals over the weight
// groups, and the task's output block. The block accumulates in the contiguous Cl and is
// copied out at the end: C's own rows are Np floats apart (12 KiB for N = 3072), which maps a
// column of all 96 rows onto one L1 set, and the per-group fold re-reads them 48 times
// (measured: the G = 64 GEMM ran at half the speed of G == K at M = 512).
template <typename T>
T* align32(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 31) & ~static_cast<uintptr_t>(31));
}

struct TaskBuffers {
  TaskBuffers(bool need_part, bool need_tot)
      : part_buf(need_part ? MC * NC + 8 : 0), tot_buf(need_tot ? MC * NC + 8 : 0), cl_buf(MC * NC + 8),
        part(need_part ? align32(part_buf.data()) : nullptr),
        tot(need_tot ? align32(tot_buf.data()) : nullptr),
        Cl(align32(cl_buf.data())) {}
  TaskBuffers(const TaskBuffers&) = delete;
  TaskBuffers& operator=(const TaskBuffers&) = delete;

  std::vector<int32_t> part_buf, tot_buf;
  std::vector<float> cl_buf;
  int32_t* const part;  // null unless need_part
  int32_t* const tot;   // null unless need_tot (kU4P)
  float* const Cl;
};

void GemmKernel::run(const GemmArgs& a, const Packed& p, float* Cp) {
  const at::Tensor& qa = a.qa;
  const bool biased = a.biased;
  const int64_t M = a.M, K = a.K, ng = a.ng, Np = a.Np, K4 = K / 4;
  const int layout = p.layout;
  const bool prog = layout == kU4P;
  const int64_t ngw = p.ngw;
  const int64_t Gs = K / ngw;  // the group size of the activation sums (U4: G; kU4P: the weight group)

  // The activation operand of the layout, one pass over qa (M * K bytes; parallel).
  const uint8_t* src = reinterpret_cast<const uint8_t*>(qa.data_ptr());
  const uint8_t flip = biased ? 0x80 : 0x00;  // u8 -> s8 (U4, W16)
  at::Tensor Aop, asum;
  int64_t F = 1;
  if (layout == kU4 || layout == kU4P) {
    // s8 activations, per-(row, group) sums for the +8 correction, and max |a| for the
    // int16 chunk length F.
    Aop = biased ? at::empty({M, K}, qa.options().dtype(at::kByte)) : qa;
    asum = at::empty({M, ngw}, qa.options().dtype(at::kInt));
    uint8_t* dst = reinterpret_cast<uint8_t*>(Aop.data_ptr());
    int32_t* as = asum.data_ptr<int32_t>();
    std::atomic<int> amax_all{0};
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t r0, int64_t r1) {
      const __m256i vflip = _mm256_set1_epi8(static_cast<char>(flip));
      const __m256i bias8 = _mm256_set1_epi8(static_cast<char>(0x80));
      __m256i vmin = _mm256_setzero_si256(), vmax = vmin;
      int smin = 0, smax = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* s = src + r * K;
        uint8_t* d = dst + r * K;
        for (int64_t g = 0; g < ngw; ++g) {
          int64_t k = g * Gs;
          const int64_t ke = k + Gs;
          __m256i sad = _mm256_setzero_si256();
          for (; k + 32 <= ke; k += 32) {
            const __m256i a = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)), vflip);
            if (biased) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k), a);
            vmin = _mm256_min_epi8(vmin, a);
            vmax = _mm256_max_epi8(vmax, a);
            // sum of (a + 128) as u8 via SAD against 0; the 128s are removed below
            sad = _mm256_add_epi64(sad, _mm256_sad_epu8(_mm256_xor_si256(a, bias8), _mm256_setzero_si256()));
          }
          int64_t tot = _mm256_extract_epi64(sad, 0) + _mm256_extract_epi64(sad, 1) + _mm256_extract_epi64(sad, 2) +
                        _mm256_extract_epi64(sad, 3);
          tot -= 128 * (k - g * Gs);
          for (; k < ke; ++k) {
            const int8_t a = static_cast<int8_t>(s[k] ^ flip);
            if (biased) d[k] = static_cast<uint8_t>(a);
            smin = std::min<int>(smin, a);
            smax = std::max<int>(smax, a);
            tot += a;
          }
          as[r * ngw + g] = static_cast<int32_t>(tot);
        }
      }
      alignas(32) int8_t lo[32], hi[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lo), vmin);
      _mm256_store_si256(reinterpret_cast<__m256i*>(hi), vmax);
      for (int i = 0; i < 32; ++i) {
        smin = std::min<int>(smin, lo[i]);
        smax = std::max<int>(smax, hi[i]);
      }
      const int m = std::max(-smin, smax);
      int cur = amax_all.load();
      while (m > cur && !amax_all.compare_exchange_weak(cur, m)) {
      }
    });
    const int amax = std::max(1, amax_all.load());
    F = std::max<int64_t>(1, 32767 / (2 * 15 * amax));  // int16 lanes: F * 2 * 15 * max|a| <= 32767
  } else if (layout == kW16) {
    Aop = at::empty({M, K}, qa.options().dtype(at::kShort));
    int16_t* dst = Aop.data_ptr<int16_t>();
    at::parallel_for(0, M * K4, std::max<int64_t>(1, 16384), [&](int64_t i0, int64_t i1) {
      const __m128i vflip = _mm_set1_epi8(static_cast<char>(flip));
      int64_t i = 4 * i0;
      const int64_t e = 4 * i1;
      for (; i + 16 <= e; i += 16) {
        const __m128i a = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), vflip);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_cvtepi8_epi16(a));
      }
      for (; i < e; ++i) dst[i] = static_cast<int8_t>(src[i] ^ flip);
    });
  } else {  // VNNI: u8 = a ^ 0x80
    Aop = biased_activations(a);
  }

  const uint8_t* A = reinterpret_cast<const uint8_t*>(Aop.data_ptr());
  const int64_t lda = layout == kW16 ? 2 * K : K;
  const float* S = a.sa.data_ptr<float>();
  const int32_t* AS = asum.defined() ? asum.data_ptr<int32_t>() : nullptr;
  const int8_t* B = reinterpret_cast<const int8_t*>(p.Bp.data_ptr());
  const int32_t* BI = p.bias.numel() && !prog ? p.bias.data_ptr<int32_t>() : nullptr;
  const int32_t* PT = prog ? p.bias.data_ptr<int32_t>() : nullptr;
  const float* ST = p.swt.data_ptr<float>();
  const int64_t G4 = Gs / 4;  // k-quads per (U4P: weight) group
  // K blocks: whole groups when a group fits in one, else KBQ-sized parts of a group.
  const int64_t kbq = G4 >= KBQ ? KBQ : G4 * std::max<int64_t>(1, KBQ / G4);
  const bool split = G4 > KBQ;  // groups span several K blocks: partials wait in `part`
  const bool need_part = split || ((layout == kU4 || layout == kU4P) && F < G4);

  for_each_task<NC, MC, kSchedule>(
      a, [&] { return TaskBuffers(need_part, prog); },
      [&](TaskBuffers& w, const GemmTask& t, Epilogue<NC>& epi) {
        const int64_t n0 = t.n0, m_lo = t.m_lo, m_hi = t.m_hi;
        const int8_t* panel = B + t.nb * K * NC;
        for (int64_t q0 = 0; q0 < K4; q0 += kbq) {
          const int64_t q1 = std::min(K4, q0 + kbq);
          for (int64_t m = m_lo; m < m_hi; m += MR) {
            const int r = static_cast<int>(std::min<int64_t>(MR, m_hi - m));
            for (int j = 0; j < NC / CS; ++j) {
              Tile tl;
              tl.A = A + m * lda;
              tl.lda = lda;
              tl.sa = S + m * ng;
              tl.ng = ng;
              tl.asum = AS ? AS + m * ngw : nullptr;
              tl.ldas = ngw;
              tl.ps = prog ? PT + n0 + CS * j : nullptr;
              tl.psz = prog ? PT + ngw * Np + n0 + CS * j : nullptr;
              tl.tot = w.tot ? w.tot + (m - m_lo) * NC + CS * j : nullptr;
              tl.ngw = ngw;
              tl.B = panel + (layout == kW16 ? 2 : 4) * CS * j;
              tl.bias = BI ? BI + n0 + CS * j : nullptr;
              tl.swt = ST + n0 + CS * j;
              tl.Np = Np;
              tl.C = w.Cl + (m - m_lo) * NC + CS * j;
              tl.ldc = NC;
              tl.part = w.part ? w.part + (m - m_lo) * NC + CS * j : nullptr;
              tl.G4 = G4;
              tl.F = F;
              if (layout == kU4P) {
                kMicro<kU4P>[r](tl, q0, q1);
              } else if (layout == kU4) {
                kMicro<kU4>[r](tl, q0, q1);
              } else if (layout == kW16) {
                kMicro<kW16>[r](tl, q0, q1);
              } else {
                kMicro<kVNNI>[r](tl, q0, q1);
              }
            }
          }
        }
        epi.template apply<F32x8>(t, w.Cl, NC);
        for (int64_t m = m_lo; m < m_hi; ++m) std::memcpy(Cp + m * Np + n0, w.Cl + (m - m_lo) * NC, NC * sizeof(float));
      });
}

}  // namespace

SVDQ_LIBRARY(SVDQ_NS, m) {
  def_gemm<GemmKernel>(m);
  m.def("pack_weight_progressive", &pack_weight_progressive);
}
