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
// This file holds the AVX-512 micro-kernels (packing, micro-tiles, the int4 panel expansion)
// and the task body that also hands 32-row blocks to the AMX kernel (grouped_gemm_amx.cpp);
// the checks, operands, task loop and low-rank / bias epilogue are op_glue.h's.
// Built lazily by svdq_compile/runtime/cpu_gemm.py (torch.utils.cpp_extension.load,
// is_python_module=False, -DSVDQ_NS=svdq_cpu_avx512); the ops appear as torch.ops.svdq_cpu_avx512.*.
#include <immintrin.h>

#include "grouped_gemm_amx.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
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

// 16-lane fp32 vectors for op_glue.h's lowrank_bias_rows.
SVDQ_F32_VEC(F32x16, __m512, 16, _mm512);

// The micro-kernels of the AVX-512 extension for op_glue.h's GEMM ops (interface there).
struct GemmKernel {
  static constexpr int NC = ::NC;  // the file's panel width (64)
  static constexpr int64_t MC = 96;  // rows per task (multiple of MR)
  // Contiguous task runs per thread: the 4-bit layout's panel expansion is reused by the
  // thread's following tasks of the same panel.
  static constexpr Schedule kSchedule = Schedule::kStatic;

  struct Packed {
    at::Tensor Bp, bias, swt;
    bool b4;  // the 4-bit layout of pack_weight (int4 weights, G % 8 == 0)
  };

  static std::vector<at::Tensor> pack_weight(const at::Tensor& qw, const at::Tensor& sw, int64_t G, bool int4);

  static Packed check_packed(const GemmArgs& a, const at::Tensor& Bp, const at::Tensor& bias, const at::Tensor& swt) {
    const bool b4 = Bp.scalar_type() == at::kByte;
    TORCH_CHECK(Bp.size(1) * (b4 ? 8 : 4) == a.K && Bp.size(2) == NC && Bp.size(3) == 4 && (!b4 || a.G % 8 == 0),
                "packed weight does not match K");
    TORCH_CHECK(bias.size(0) == a.ng && bias.size(1) == a.Np && swt.size(0) == a.ng && swt.size(1) == a.Np,
                "bad packing");
    return {Bp, bias, swt, b4};
  }

  static void run(const GemmArgs& a, const Packed& p, float* C);

  // Turn the AMX blocks on/off (benchmarks, bit-identity tests); returns whether they are on
  // (false whatever is asked when the CPU or the OS does not allow AMX).
  static bool set_amx(bool on) {
    g_amx = on && svdq_amx::request();
    return g_amx.load();
  }
  static bool amx_enabled() { return g_amx.load(); }
};

// qw: [N, K] int8, sw: [N, K/G] fp32 ->
//   Bp: [NB, K/4, NC, 4] int8 (zero-padded columns), bias: [ng, Np] int32, swt: [ng, Np] fp32.
// int4 = true: qw is [N, K/2] packed int4 bytes (low nibble = even k, signed nibbles); then,
// when G % 8 == 0, Bp keeps 4 bits per weight: [NB, K/8, NC, 4] uint8 whose byte holds
// k-quad 2j in its low nibble and k-quad 2j+1 in its high nibble (half the memory of the
// int8 layout; run() expands each panel once per call and thread into a K * 64-byte
// buffer: min-of-5 timings at K=N=3072 within 5% of the int8 layout, M=256 and 1024).
std::vector<at::Tensor> GemmKernel::pack_weight(const at::Tensor& qw_in, const at::Tensor& sw_in, int64_t G,
                                                bool int4) {
  const PackArgs pa = pack_args<NC>(qw_in, sw_in, G, int4);
  const at::Tensor& qw = pa.qw;
  const int64_t N = pa.N, K = pa.K, row_bytes = pa.row_bytes, ng = pa.ng, NB = pa.NB, Np = pa.Np, K4 = K / 4;
  const bool out4 = int4 && G % 8 == 0;
  at::Tensor Bp = out4 ? at::empty({NB, K4 / 2, NC, 4}, qw.options().dtype(at::kByte))  // every byte
                       : at::empty({NB, K4, NC, 4}, qw.options());                       // is written below
  at::Tensor bias = at::empty({ng, Np}, qw.options().dtype(at::kInt));
  at::Tensor swt = transposed_scales(pa);
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

// One thread's state in the task loop: the AMX tile configuration (per thread) and, for the
// 4-bit layout, the current panel expanded to int8 (K * NC bytes, L2-resident) and reused by
// the following tasks of the same panel (tasks are ordered panel-major). The buffer is
// 64-byte aligned like the int8 layout's tensor: unaligned zmm loads split cache lines.
class PanelWorker {
 public:
  PanelWorker(bool amx, size_t bytes)
      : amx_(amx), scratch_(bytes ? static_cast<int8_t*>(std::aligned_alloc(64, bytes)) : nullptr, &std::free) {
    TORCH_CHECK(!bytes || scratch_, "out of memory for the int4 expansion buffer");
    if (amx_) svdq_amx::configure();  // tile configuration is per thread
  }
  ~PanelWorker() {
    if (amx_) svdq_amx::release();
  }
  PanelWorker(const PanelWorker&) = delete;
  PanelWorker& operator=(const PanelWorker&) = delete;

  // Panel nb of the 4-bit layout (src: its [K/8][NC][4] bytes) as int8 [K/4][NC][4].
  const int8_t* expand(const int8_t* src, int64_t nb, int64_t K4) {
    if (expanded_ != nb) {
      // Pair j holds k-quads 2j (low nibbles) and 2j + 1 (high): sign-extend each nibble.
      const __m512i m0f = _mm512_set1_epi8(0x0F), c8 = _mm512_set1_epi8(8);
      for (int64_t j = 0; j < K4 / 2; ++j) {
        for (int v = 0; v < NV; ++v) {
          const __m512i b = _mm512_loadu_si512(src + j * (NC * 4) + 64 * v);
          const __m512i lo = _mm512_and_si512(b, m0f);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m0f);
          _mm512_storeu_si512(scratch_.get() + (2 * j) * (NC * 4) + 64 * v,
                              _mm512_sub_epi8(_mm512_xor_si512(lo, c8), c8));
          _mm512_storeu_si512(scratch_.get() + (2 * j + 1) * (NC * 4) + 64 * v,
                              _mm512_sub_epi8(_mm512_xor_si512(hi, c8), c8));
        }
      }
      expanded_ = nb;
    }
    return scratch_.get();
  }

 private:
  const bool amx_;
  std::unique_ptr<int8_t, decltype(&std::free)> scratch_;
  int64_t expanded_ = -1;
};

void GemmKernel::run(const GemmArgs& a, const Packed& p, float* Cp) {
  const at::Tensor Au = biased_activations(a);
  const int64_t K = a.K, G = a.G, ng = a.ng, Np = a.Np, K4 = K / 4;
  const bool b4 = p.b4;
  const uint8_t* A = Au.data_ptr<uint8_t>();
  const float* S = a.sa.data_ptr<float>();
  const int8_t* B = b4 ? reinterpret_cast<const int8_t*>(p.Bp.data_ptr<uint8_t>()) : p.Bp.data_ptr<int8_t>();
  const int32_t* BI = p.bias.data_ptr<int32_t>();
  const float* ST = p.swt.data_ptr<float>();
  const int64_t gpb = std::max<int64_t>(1, 256 / G);  // groups per k-block (B block ~16 KiB in L1)
  // AMX takes full 32-row blocks of groups that are whole TDPBUSD steps; the VNNI
  // micro-tiles take the rest (row tails, other group sizes). Same arithmetic: same bits.
  const bool amx = g_amx && G % 64 == 0 && a.M >= 32;
  const size_t bytes = b4 ? static_cast<size_t>(K4 * NC * 4) : 0;
  for_each_task<NC, MC, kSchedule>(
      a, [&] { return PanelWorker(amx, bytes); },
      [&](PanelWorker& w, const GemmTask& t, Epilogue<NC>& epi) {
        const int8_t* panel = b4 ? w.expand(B + t.nb * (K4 / 2) * NC * 4, t.nb, K4) : B + t.nb * K4 * NC * 4;
        int64_t m_vnni = t.m_lo;
        if (amx) {
          for (; m_vnni + 32 <= t.m_hi; m_vnni += 32) {
            for (int64_t h = 0; h < NC; h += 32) {
              svdq_amx::block_32x32(A + m_vnni * K, K, S + m_vnni * ng, ng, panel + 4 * h, BI + t.n0 + h,
                                    ST + t.n0 + h, Np, Cp + m_vnni * Np + t.n0 + h, Np, ng, G);
            }
          }
        }
        for (int64_t g0 = 0; g0 < ng && m_vnni < t.m_hi; g0 += gpb) {
          const int64_t g1 = std::min(ng, g0 + gpb);
          for (int64_t m = m_vnni; m < t.m_hi; m += MR) {
            const int r = static_cast<int>(std::min<int64_t>(MR, t.m_hi - m));
            kTiles[r](A + m * K, K, S + m * ng, ng, panel + g0 * G * NC, BI + t.n0, ST + t.n0, Np,
                      Cp + m * Np + t.n0, Np, g0, g1, G);
          }
        }
        epi.template apply<F32x16>(t, Cp + t.m_lo * Np + t.n0, Np);
      });
}

}  // namespace

SVDQ_LIBRARY(SVDQ_NS, m) { def_gemm<GemmKernel>(m); }
