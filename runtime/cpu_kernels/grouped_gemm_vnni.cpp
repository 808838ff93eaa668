// Exact grouped int8 GEMM for x86-64 with AVX512-VNNI.
//
//   Y[m, n] = sum_g sa[m, g] * sw[n, g] * I_g[m, n],
//   I_g     = sum_{k in group g} qa[m, k] * qw[n, k]          (int32, exact)
//
// VPDPBUSD multiplies *unsigned* bytes by signed bytes, so activations are
// biased into u8 with a ^ 0x80 (== a + 128 for int8) and the bias is removed
// exactly by starting every group's int32 accumulator at -128 * sum_k qw[n, k].
// Each group's exact int32 partial is converted to fp32 and folded into an fp32
// accumulator with one FMA: acc = fma(float(I_g), sa[m,g] * sw[n,g], acc), in
// ascending group order (group 0 initialises acc = float(I_0) * (sa * sw), which is
// the same value as fma(., ., 0), so the output needs no zero fill).  |I_g| <= 64 * 128 * 128 < 2^24 for G = 64, so the
// int32 -> fp32 conversion is exact; for larger groups it is exact while
// G * 2^14 < 2^24 (G <= 1024), and correctly rounded beyond.
//
// Built lazily by svdq_compile/runtime/cpu_gemm.py (torch.utils.cpp_extension.load,
// is_python_module=False); the ops appear as torch.ops.svdq_cpu_gemm.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "grouped_gemm_amx.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "op_glue.h"

namespace {

// AMX blocks on (set_amx): on by default where the CPU and OS allow it. Atomic: a
// benchmark may flip it while another thread is inside a GEMM (which reads it once).
std::atomic<bool> g_amx{svdq_amx::request()};

constexpr int NV = 4;         // zmm vectors per micro-tile row
constexpr int NC = 16 * NV;   // output columns per packed weight panel (64)
constexpr int MR = 6;         // output rows per micro-tile

// In-place c += dot4(u8 a, s8 b). Inline asm because GCC's intrinsic lowering of
// the destructive VPDPBUSD copies (and spills) accumulators in a register-tight tile.
#define SVDQ_DPBUSD(c, a, b) asm("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b))

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One micro-tile: R rows x NC columns, groups [g0, g1).
// A: u8 activations at row m0 (stride lda); sa at row m0 (stride ldsa);
// B: packed panel rows from group g0 on ([k-quads][NC][4] int8); bias/swt: [ng][Np] already
// offset by the panel's n0;
// C: fp32 output at (m0, n0), stride ldc.
// The accumulators are named scalars (not arrays): GCC spills __m512i arrays.
#define SVDQ_ROW(r, X) if constexpr (R > r) { X(r) }
#define SVDQ_ROWS(X) SVDQ_ROW(0, X) SVDQ_ROW(1, X) SVDQ_ROW(2, X) SVDQ_ROW(3, X) SVDQ_ROW(4, X) SVDQ_ROW(5, X)
template <int R>
inline void micro_tile(const uint8_t* __restrict A, int64_t lda, const float* __restrict sa, int64_t ldsa,
                       const int8_t* __restrict B, const int32_t* __restrict bias, const float* __restrict swt,
                       int64_t Np, float* __restrict C, int64_t ldc, int64_t g0, int64_t g1, int64_t G) {
  static_assert(R >= 1 && R <= 6 && NV == 4, "micro-tile shape");
  for (int64_t g = g0; g < g1; ++g) {
    const __m512i i0 = _mm512_loadu_si512(bias + g * Np);
    const __m512i i1 = _mm512_loadu_si512(bias + g * Np + 16);
    const __m512i i2 = _mm512_loadu_si512(bias + g * Np + 32);
    const __m512i i3 = _mm512_loadu_si512(bias + g * Np + 48);
    __m512i c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
    __m512i c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
#define SVDQ_INIT(r) c##r##0 = i0; c##r##1 = i1; c##r##2 = i2; c##r##3 = i3;
    SVDQ_ROWS(SVDQ_INIT)
    const int8_t* Bg = B + (g - g0) * G * NC;  // ((g - g0) * G / 4) k-quads * NC * 4 bytes
    const uint8_t* Ag = A + g * G;
    for (int64_t k4 = 0; k4 < G / 4; ++k4) {
      const int8_t* bk = Bg + k4 * (NC * 4);
      const __m512i b0 = _mm512_loadu_si512(bk);
      const __m512i b1 = _mm512_loadu_si512(bk + 64);
      const __m512i b2 = _mm512_loadu_si512(bk + 128);
      const __m512i b3 = _mm512_loadu_si512(bk + 192);
#define SVDQ_DOT(r)                                                          \
      {                                                                      \
        const __m512i a = _mm512_set1_epi32(load_i32(Ag + r * lda + 4 * k4)); \
        SVDQ_DPBUSD(c##r##0, a, b0);                 \
        SVDQ_DPBUSD(c##r##1, a, b1);                 \
        SVDQ_DPBUSD(c##r##2, a, b2);                 \
        SVDQ_DPBUSD(c##r##3, a, b3);                 \
      }
      SVDQ_ROWS(SVDQ_DOT)
    }
    const __m512 w0 = _mm512_loadu_ps(swt + g * Np);
    const __m512 w1 = _mm512_loadu_ps(swt + g * Np + 16);
    const __m512 w2 = _mm512_loadu_ps(swt + g * Np + 32);
    const __m512 w3 = _mm512_loadu_ps(swt + g * Np + 48);
#define SVDQ_FOLD1(r, v)                                                                          \
    {                                                                                             \
      float* c = C + r * ldc + 16 * v;                                                            \
      const __m512 p = _mm512_mul_ps(s, w##v);                                                    \
      /* g == 0 stores round(I * p) (== fma(I, p, 0)): C needs no zero fill */                    \
      _mm512_storeu_ps(c, g == 0 ? _mm512_mul_ps(_mm512_cvtepi32_ps(c##r##v), p)                  \
                                 : _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##v), p, _mm512_loadu_ps(c))); \
    }
#define SVDQ_FOLD(r)                                     \
    {                                                    \
      const __m512 s = _mm512_set1_ps(sa[r * ldsa + g]); \
      SVDQ_FOLD1(r, 0) SVDQ_FOLD1(r, 1) SVDQ_FOLD1(r, 2) SVDQ_FOLD1(r, 3) \
    }
    SVDQ_ROWS(SVDQ_FOLD)
#undef SVDQ_INIT
#undef SVDQ_DOT
#undef SVDQ_FOLD1
#undef SVDQ_FOLD
  }
}
#undef SVDQ_ROW
#undef SVDQ_ROWS

using TileFn = void (*)(const uint8_t*, int64_t, const float*, int64_t, const int8_t*, const int32_t*,
                        const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);
const TileFn kTiles[MR + 1] = {nullptr,        micro_tile<1>, micro_tile<2>, micro_tile<3>,
                               micro_tile<4>, micro_tile<5>, micro_tile<6>};

// Epilogue of one task's rows [m_lo, m_hi) x panel columns [n0, n0 + NC):
//   C += H @ L (low-rank up projection, fp32 FMAs in ascending j), then C += ybias.
// H: [M, R] fp32; L: the panel's nonzero rows of lora_up^T, [nact][NC] fp32, row jj being
// rank index js[jj] (built per panel by panel_lora_up, zero past N); ybias: [N] fp32 or null.
// Columns >= N (panel padding) are computed on zeros and dropped by the caller.
inline void lowrank_bias_rows(float* __restrict C, int64_t ldc, int64_t m_lo, int64_t m_hi, int64_t n0, int64_t N,
                              const float* __restrict H, int64_t R, const float* __restrict L,
                              const int32_t* __restrict js, int64_t nact, const float* __restrict yb) {
  __mmask16 mk[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t rem = N - (n0 + 16 * v);
    mk[v] = rem >= 16 ? static_cast<__mmask16>(0xFFFF) : rem <= 0 ? 0 : static_cast<__mmask16>((1u << rem) - 1u);
  }
  for (int64_t m = m_lo; m < m_hi; m += 2) {
    const int64_t m1 = std::min(m + 1, m_hi - 1);  // odd tail: recompute row m (same values)
    float* c0 = C + m * ldc + n0;
    float* c1 = C + m1 * ldc + n0;
    __m512 a0 = _mm512_loadu_ps(c0), a1 = _mm512_loadu_ps(c0 + 16), a2 = _mm512_loadu_ps(c0 + 32),
           a3 = _mm512_loadu_ps(c0 + 48);
    __m512 b0 = _mm512_loadu_ps(c1), b1 = _mm512_loadu_ps(c1 + 16), b2 = _mm512_loadu_ps(c1 + 32),
           b3 = _mm512_loadu_ps(c1 + 48);
    if (H) {
      const float* h0 = H + m * R;
      const float* h1 = H + m1 * R;
      for (int64_t jj = 0; jj < nact; ++jj) {
        const int64_t j = js[jj];
        const float* l = L + jj * NC;
        const __m512 l0 = _mm512_loadu_ps(l), l1 = _mm512_loadu_ps(l + 16), l2 = _mm512_loadu_ps(l + 32),
                     l3 = _mm512_loadu_ps(l + 48);
        const __m512 x0 = _mm512_set1_ps(h0[j]), x1 = _mm512_set1_ps(h1[j]);
        a0 = _mm512_fmadd_ps(x0, l0, a0); a1 = _mm512_fmadd_ps(x0, l1, a1);
        a2 = _mm512_fmadd_ps(x0, l2, a2); a3 = _mm512_fmadd_ps(x0, l3, a3);
        b0 = _mm512_fmadd_ps(x1, l0, b0); b1 = _mm512_fmadd_ps(x1, l1, b1);
        b2 = _mm512_fmadd_ps(x1, l2, b2); b3 = _mm512_fmadd_ps(x1, l3, b3);
      }
    }
    if (yb) {
      const __m512 y0 = _mm512_maskz_loadu_ps(mk[0], yb + n0), y1 = _mm512_maskz_loadu_ps(mk[1], yb + n0 + 16),
                   y2 = _mm512_maskz_loadu_ps(mk[2], yb + n0 + 32), y3 = _mm512_maskz_loadu_ps(mk[3], yb + n0 + 48);
      a0 = _mm512_add_ps(a0, y0); a1 = _mm512_add_ps(a1, y1); a2 = _mm512_add_ps(a2, y2); a3 = _mm512_add_ps(a3, y3);
      b0 = _mm512_add_ps(b0, y0); b1 = _mm512_add_ps(b1, y1); b2 = _mm512_add_ps(b2, y2); b3 = _mm512_add_ps(b3, y3);
    }
    _mm512_storeu_ps(c0, a0); _mm512_storeu_ps(c0 + 16, a1); _mm512_storeu_ps(c0 + 32, a2); _mm512_storeu_ps(c0 + 48, a3);
    _mm512_storeu_ps(c1, b0); _mm512_storeu_ps(c1 + 16, b1); _mm512_storeu_ps(c1 + 32, b2); _mm512_storeu_ps(c1 + 48, b3);
  }
}

// qw: [N, K] int8, sw: [N, K/G] fp32 ->
//   Bp: [NB, K/4, NC, 4] int8 (zero-padded columns), bias: [ng, Np] int32, swt: [ng, Np] fp32.
// int4 = true: qw is [N, K/2] packed int4 bytes (low nibble = even k, signed nibbles); then,
// when G % 8 == 0, Bp keeps 4 bits per weight: [NB, K/8, NC, 4] uint8 whose byte holds
// k-quad 2j in its low nibble and k-quad 2j+1 in its high nibble (half the memory of the
// int8 layout; gemm_core expands each panel once per call and thread into a K * 64-byte
// buffer: min-of-5 timings at K=N=3072 within 5% of the int8 layout, M=256 and 1024).
std::vector<at::Tensor> pack_weight(const at::Tensor& qw_in, const at::Tensor& sw_in, int64_t G, bool int4) {
  TORCH_CHECK(qw_in.dim() == 2 && qw_in.scalar_type() == at::kChar, "qw must be [N, K] int8 or [N, K/2] packed int4");
  TORCH_CHECK(G > 0 && G % 4 == 0, "group size must be a positive multiple of 4");
  const at::Tensor qw = qw_in.contiguous();
  const at::Tensor sw = sw_in.to(at::kFloat).contiguous();
  const int64_t N = qw.size(0), K = int4 ? 2 * qw.size(1) : qw.size(1);
  const int64_t row_bytes = qw.size(1);
  TORCH_CHECK(!int4 || K >= 8, "packed int4 weights need K >= 8");
  TORCH_CHECK(K % G == 0, "K must be a multiple of the group size");
  const int64_t ng = K / G, NB = (N + NC - 1) / NC, Np = NB * NC, K4 = K / 4;
  TORCH_CHECK(sw.dim() == 2 && sw.size(0) == N && sw.size(1) == ng, "sw must be [N, K/G]");
  const bool out4 = int4 && G % 8 == 0;
  at::Tensor Bp = out4 ? at::empty({NB, K4 / 2, NC, 4}, qw.options().dtype(at::kByte))  // every byte
                       : at::empty({NB, K4, NC, 4}, qw.options());                       // is written below
  at::Tensor bias = at::empty({ng, Np}, qw.options().dtype(at::kInt));
  at::Tensor swt = at::zeros({ng, Np}, qw.options().dtype(at::kFloat));
  swt.narrow(1, 0, N).copy_(sw.t());
  const int8_t* q = qw.data_ptr<int8_t>();
  int8_t* bp = out4 ? reinterpret_cast<int8_t*>(Bp.data_ptr<uint8_t>()) : Bp.data_ptr<int8_t>();
  int32_t* bi = bias.data_ptr<int32_t>();
  TORCH_CHECK(16 * K < (int64_t(1) << 31), "K too large for the packing gather");
  const __m512i row_off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  const __m512i c8 = _mm512_set1_epi8(8);
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i m128 = _mm512_set1_epi32(-128);
  at::parallel_for(0, NB * NV, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nb = t / NV, v = t % NV, n0 = nb * NC + 16 * v;
      int8_t* panel = bp + (out4 ? nb * (K4 / 2) : nb * K4) * NC * 4 + 64 * v;
      __m512i prev = _mm512_setzero_si512();  // out4: the even k-quad waiting for its pair
      const int64_t nvalid = std::max<int64_t>(0, std::min<int64_t>(16, N - n0));
      const __mmask16 mask = static_cast<__mmask16>((1u << nvalid) - 1u);
      const int8_t* base = q + std::min<int64_t>(n0, N - 1) * row_bytes;  // any valid row when fully masked
      for (int64_t g = 0; g < ng; ++g) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t k4 = g * (G / 4); k4 < (g + 1) * (G / 4); ++k4) {
          // 4 consecutive k of 16 weight rows -> one VNNI quad per column
          __m512i x;
          if (!int4) {
            x = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, row_off, base + 4 * k4, 1);
          } else {
            // 2 bytes = 4 nibbles per column; read the 4-byte word ending at them (no over-read)
            __m512i h = k4 == 0 ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, row_off, base, 1)
                                : _mm512_srli_epi32(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, row_off,
                                                                                base + 2 * k4 - 2, 1), 16);
            h = _mm512_and_si512(h, _mm512_set1_epi32(0xFFFF));
            x = _mm512_or_si512(
                _mm512_or_si512(_mm512_and_si512(h, _mm512_set1_epi32(0x0000000F)),
                                _mm512_and_si512(_mm512_slli_epi32(h, 4), _mm512_set1_epi32(0x00000F00))),
                _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi32(h, 8), _mm512_set1_epi32(0x000F0000)),
                                _mm512_and_si512(_mm512_slli_epi32(h, 12), _mm512_set1_epi32(0x0F000000))));
            x = _mm512_sub_epi8(_mm512_xor_si512(x, c8), c8);  // sign-extend each nibble
          }
          if (!out4) {
            _mm512_storeu_si512(panel + k4 * (NC * 4), x);
          } else if (k4 % 2 == 0) {
            prev = x;
          } else {  // low nibble: k-quad k4 - 1, high nibble: k-quad k4 (masked: no carry across bytes)
            const __m512i m0f = _mm512_set1_epi8(0x0F);
            _mm512_storeu_si512(panel + (k4 / 2) * (NC * 4),
                                _mm512_or_si512(_mm512_and_si512(prev, m0f),
                                                _mm512_slli_epi16(_mm512_and_si512(x, m0f), 4)));
          }
          acc = _mm512_dpbusd_epi32(acc, ones, x);  // per-column sum of the 4 weights
        }
        _mm512_storeu_si512(bi + g * Np + n0, _mm512_mullo_epi32(acc, m128));
      }
    }
  });
  return {Bp, bias, swt};
}

// qa: [M, K] int8 (biased = false) or u8 = qa ^ 0x80 (biased = true, e.g. straight from
// quantize_act), sa: [M, K/G] fp32, packed weight from pack_weight -> [M, N] fp32.
at::Tensor gemm_core(const at::Tensor& qa_in, const at::Tensor& sa_in, const at::Tensor& Bp,
                     const at::Tensor& bias, const at::Tensor& swt, int64_t N, int64_t G, bool biased,
                     const std::optional<at::Tensor>& h_in = std::nullopt,
                     const std::optional<at::Tensor>& lora_up_in = std::nullopt,
                     const std::optional<at::Tensor>& ybias_in = std::nullopt) {
  TORCH_CHECK(qa_in.dim() == 2 && qa_in.scalar_type() == (biased ? at::kByte : at::kChar),
              biased ? "qa must be [M, K] uint8 (int8 ^ 0x80)" : "qa must be [M, K] int8");
  const at::Tensor qa = qa_in.contiguous();
  const at::Tensor sa = sa_in.to(at::kFloat).contiguous();
  const int64_t M = qa.size(0), K = qa.size(1);
  TORCH_CHECK(G > 0 && G % 4 == 0 && K % G == 0, "bad group size");
  const int64_t ng = K / G, NB = Bp.size(0), Np = NB * NC;
  const bool b4 = Bp.scalar_type() == at::kByte;  // 4-bit layout of pack_weight
  TORCH_CHECK(Bp.size(1) * (b4 ? 8 : 4) == K && Bp.size(2) == NC && Bp.size(3) == 4 && (!b4 || G % 8 == 0),
              "packed weight does not match K");
  TORCH_CHECK(bias.size(0) == ng && bias.size(1) == Np && swt.size(0) == ng && swt.size(1) == Np, "bad packing");
  TORCH_CHECK(sa.dim() == 2 && sa.size(0) == M && sa.size(1) == ng, "sa must be [M, K/G]");
  TORCH_CHECK(N <= Np && N > Np - NC, "N does not match the packed weight");

  at::Tensor C = at::empty({M, Np}, qa.options().dtype(at::kFloat));  // fully written (group 0 stores)
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, qa.options().dtype(at::kFloat));
  at::Tensor Au = biased ? qa : at::empty({M, K}, qa.options().dtype(at::kByte));
  if (!biased) {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(qa.data_ptr<int8_t>());
    uint8_t* dst = Au.data_ptr<uint8_t>();
    at::parallel_for(0, M * K, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = src[i] ^ 0x80;
    });
  }
  at::Tensor h, lu, yb;
  if (h_in.has_value() && h_in->defined()) {
    TORCH_CHECK(lora_up_in.has_value() && lora_up_in->defined(), "low-rank h needs lora_up");
    h = h_in->to(at::kFloat).contiguous();
    lu = lora_up_in->to(at::kFloat).contiguous();
    TORCH_CHECK(h.dim() == 2 && h.size(0) == M && lu.dim() == 2 && lu.size(0) == N && lu.size(1) == h.size(1),
                "low-rank operands must be h [M, R], lora_up [N, R]");
  }
  if (ybias_in.has_value() && ybias_in->defined()) {
    yb = ybias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(yb.numel() == N, "bias must have N elements");
  }
  const float* HP = h.defined() && h.size(1) > 0 ? h.data_ptr<float>() : nullptr;
  const int64_t R = h.defined() ? h.size(1) : 0;
  const float* LUP = HP ? lu.data_ptr<float>() : nullptr;
  const float* YB = yb.defined() ? yb.data_ptr<float>() : nullptr;
  const uint8_t* A = Au.data_ptr<uint8_t>();
  const float* S = sa.data_ptr<float>();
  const int8_t* B = b4 ? reinterpret_cast<const int8_t*>(Bp.data_ptr<uint8_t>()) : Bp.data_ptr<int8_t>();
  const int32_t* BI = bias.data_ptr<int32_t>();
  const float* ST = swt.data_ptr<float>();
  float* Cp = C.data_ptr<float>();
  const int64_t K4 = K / 4;

  const int64_t MC = 96;                                  // rows per task (multiple of MR)
  const int64_t nm = (M + MC - 1) / MC;
  const int64_t gpb = std::max<int64_t>(1, 256 / G);      // groups per k-block (B block ~16 KiB in L1)
  // AMX takes full 32-row blocks of groups that are whole TDPBUSD steps; the VNNI
  // micro-tiles take the rest (row tails, other group sizes). Same arithmetic: same bits.
  const bool amx = g_amx && G % 64 == 0 && M >= 32;
  at::parallel_for(0, NB * nm, 1, [&](int64_t t0, int64_t t1) {
    if (amx) svdq_amx::configure();  // tile configuration is per thread
    // 4-bit layout: the task's panel expanded to int8 once (K * NC bytes, L2-resident) and
    // reused by the following tasks of the same panel (tasks are ordered panel-major).
    // 64-byte aligned like the int8 layout's tensor: unaligned zmm loads split cache lines.
    const size_t bytes = b4 ? static_cast<size_t>(K4 * NC * 4) : 0;
    std::unique_ptr<int8_t, decltype(&std::free)> scratch(
        bytes ? static_cast<int8_t*>(std::aligned_alloc(64, bytes)) : nullptr, &std::free);
    TORCH_CHECK(!bytes || scratch, "out of memory for the int4 expansion buffer");
    int64_t expanded = -1;
    std::vector<float> lpanel(HP ? R * NC : 0);  // the current panel's lora_up^T slice
    std::vector<int32_t> ljs(HP ? R : 0);         // its nonzero rank indices
    int64_t lpanel_nb = -1, lnact = 0;
    const __m512i m0f = _mm512_set1_epi8(0x0F), c8 = _mm512_set1_epi8(8);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nb = t / nm, mc = t % nm;
      const int64_t n0 = nb * NC, m_lo = mc * MC, m_hi = std::min(M, m_lo + MC);
      const int8_t* panel = B + nb * K4 * NC * 4;
      if (b4) {
        if (expanded != nb) {
          // Pair j holds k-quads 2j (low nibbles) and 2j + 1 (high): sign-extend each nibble.
          const int8_t* src = B + nb * (K4 / 2) * NC * 4;
          for (int64_t j = 0; j < K4 / 2; ++j) {
            for (int v = 0; v < NV; ++v) {
              const __m512i b = _mm512_loadu_si512(src + j * (NC * 4) + 64 * v);
              const __m512i lo = _mm512_and_si512(b, m0f);
              const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m0f);
              _mm512_storeu_si512(scratch.get() + (2 * j) * (NC * 4) + 64 * v,
                                  _mm512_sub_epi8(_mm512_xor_si512(lo, c8), c8));
              _mm512_storeu_si512(scratch.get() + (2 * j + 1) * (NC * 4) + 64 * v,
                                  _mm512_sub_epi8(_mm512_xor_si512(hi, c8), c8));
            }
          }
          expanded = nb;
        }
        panel = scratch.get();
      }
      int64_t m_vnni = m_lo;
      if (amx) {
        for (; m_vnni + 32 <= m_hi; m_vnni += 32) {
          for (int64_t h = 0; h < NC; h += 32) {
            svdq_amx::block_32x32(A + m_vnni * K, K, S + m_vnni * ng, ng, panel + 4 * h, BI + n0 + h, ST + n0 + h,
                                  Np, Cp + m_vnni * Np + n0 + h, Np, ng, G);
          }
        }
      }
      for (int64_t g0 = 0; g0 < ng && m_vnni < m_hi; g0 += gpb) {
        const int64_t g1 = std::min(ng, g0 + gpb);
        for (int64_t m = m_vnni; m < m_hi; m += MR) {
          const int r = static_cast<int>(std::min<int64_t>(MR, m_hi - m));
          kTiles[r](A + m * K, K, S + m * ng, ng, panel + g0 * G * NC, BI + n0, ST + n0, Np,
                    Cp + m * Np + n0, Np, g0, g1, G);
        }
      }
      if (HP && lpanel_nb != nb) {
        lnact = panel_lora_up<NC>(LUP, N, R, n0, lpanel.data(), ljs.data());
        lpanel_nb = nb;
      }
      if (HP || YB) lowrank_bias_rows(Cp, Np, m_lo, m_hi, n0, N, HP, R, lpanel.data(), ljs.data(), lnact, YB);
    }
    if (amx) svdq_amx::release();
  });
  if (Np == N) return C;
  return C.narrow(1, 0, N).contiguous();
}

at::Tensor gemm_packed(const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& Bp, const at::Tensor& bias,
                       const at::Tensor& swt, int64_t N, int64_t G) {
  return gemm_core(qa, sa, Bp, bias, swt, N, G, false);
}

// Biased u8 activations, plus the fused epilogue Y += h @ lora_up^T (low-rank) + ybias.
at::Tensor gemm_packed_u8(const at::Tensor& qa_u8, const at::Tensor& sa, const at::Tensor& Bp, const at::Tensor& bias,
                          const at::Tensor& swt, int64_t N, int64_t G, const std::optional<at::Tensor>& h,
                          const std::optional<at::Tensor>& lora_up, const std::optional<at::Tensor>& ybias) {
  return gemm_core(qa_u8, sa, Bp, bias, swt, N, G, true, h, lora_up, ybias);
}

// Turn the AMX blocks on/off (benchmarks, bit-identity tests); returns whether they are on
// (false whatever is asked when the CPU or the OS does not allow AMX).
bool set_amx(bool on) {
  g_amx = on && svdq_amx::request();
  return g_amx.load();
}

bool amx_enabled() { return g_amx.load(); }

}  // namespace

// Plain operator registration (no pybind11): much faster to compile than torch/extension.h.
TORCH_LIBRARY(svdq_cpu_gemm, m) {
  m.def("pack_weight", &pack_weight);
  m.def("set_amx", &set_amx);
  m.def("amx_enabled", &amx_enabled);
  m.def("gemm_packed", &gemm_packed);
  m.def("gemm_packed_u8(Tensor qa_u8, Tensor sa, Tensor Bp, Tensor bias, Tensor swt, int N, int G, "
        "Tensor? h=None, Tensor? lora_up=None, Tensor? ybias=None) -> Tensor", &gemm_packed_u8);
}
