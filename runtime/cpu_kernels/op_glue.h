// The ISA-independent half of the CPU ops, shared by the AVX-512 files (grouped_gemm_avx512.cpp,
// quantize_act.cpp, w4a16.cpp) and the AVX2 / AVX-VNNI ones (*_avx2.cpp): argument checks,
// output allocation, dtype dispatch, the loops over rows / groups / weight rows / GEMM tasks,
// the operands of the low-rank / bias epilogue with its per-panel lora_up gather, and the op
// registration. The math is in the ISA files, one struct of micro-kernels per op family
// (GemmKernel, QuantKernel, W4A16Kernel: their interfaces are described below), and each ISA
// file ends with a thin instantiation:
//
//   SVDQ_LIBRARY_FRAGMENT(SVDQ_NS, m) { def_quantize_act<QuantKernel>(m); }
//
// Everything here has internal linkage (anonymous namespace): each extension is compiled with
// its own -m flags, so no function compiled for AVX-512 may be shared with (or interposed
// into) the AVX2 library.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

// The torch.ops namespace of the extension being built (runtime/cpu_gemm.py's _EXTS passes
// -DSVDQ_NS=svdq_cpu_avx512 | svdq_cpu_avxvnni | svdq_cpu_avx2).
#ifndef SVDQ_NS
#error "compile with -DSVDQ_NS=<torch.ops namespace of the extension> (see runtime/cpu_gemm.py)"
#endif
// TORCH_LIBRARY / TORCH_LIBRARY_FRAGMENT stringify their argument: these expand SVDQ_NS first.
#define SVDQ_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define SVDQ_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

// The fp32 vectors of one ISA for the generic code below, from the intrinsics' common names:
// SVDQ_F32_VEC(F32x16, __m512, 16, _mm512) in an AVX-512 file, SVDQ_F32_VEC(F32x8, __m256, 8,
// _mm256) in an AVX2 one. fmadd(a, b, c) = a * b + c with one rounding.
#define SVDQ_F32_VEC(Name, Type, lanes, pfx)                               \
  struct Name {                                                            \
    using T = Type;                                                        \
    static constexpr int kLanes = lanes;                                   \
    static T load(const float* p) { return pfx##_loadu_ps(p); }            \
    static void store(float* p, T v) { pfx##_storeu_ps(p, v); }           \
    static T set1(float x) { return pfx##_set1_ps(x); }                    \
    static T add(T a, T b) { return pfx##_add_ps(a, b); }                  \
    static T fmadd(T a, T b, T c) { return pfx##_fmadd_ps(a, b, c); }      \
  }

namespace {

// ============================================================================ quantize_act
//
// The fused activation quantizer: x [M, K] fp32/bf16/fp16, smooth [K] (any float dtype,
// converted to fp32 like smooth.float()), lora_down [R, K] -> [q, scale, x' (empty unless
// emit_xs), h] with
//   x' = float(x) / smooth;  v = x' + shift (only when shift != 0);
//   scale = amax(v) / qmax per group (1 unless > 0, NaN included);
//   q = clamp(floor(v / scale + 0.5), qmin, qmax) (u8 q ^ 0x80 when biased);
//   h = X' @ lora_down^T.
//
// QuantKernel (per ISA): the vector passes over one row, each step one correctly rounded fp32
// operation per element in torch's order (the ISA file says how it keeps the bits):
//   QuantKernel(float shift, float qmin, float qmax, bool biased);  // per-thread constants
//       (QuantConsts below holds the broadcast parameters)
//   template <typename T> void smooth_row(const T* x, const float* smooth, int64_t K, float* v) const;
//       v[k] = float(x[k]) / smooth[k] (smooth null: float(x[k]))
//   float group_amax(const float* v, int64_t G, bool has_shift, bool is_unsigned, bool& nan) const;
//       max_k |v + shift| (signed) | max_k max(v + shift, 0) (unsigned); nan |= any v + shift is NaN
//   void quantize_group(const float* v, int64_t G, float scale, bool has_shift, int8_t* q) const;
//       q[k] = clamp(floor((v + shift) / scale + 0.5), qmin, qmax) as int8 (^ 0x80 when biased)
//   static void lora_down_rows(const float* const* rows, int rb, const float* ld, int64_t R,
//                              int64_t K, float* h);
//       h[i][j] = sum_k rows[i][k] * ld[j][k] for rb <= 4 rows, summed as the AVX-512 kernel's
//       16 lanes (lane l: k = l mod 16 in ascending k, then GCC's _mm512_reduce_add_ps tree)

// The quantizer's parameters broadcast to the ISA's fp32 vectors V (see SVDQ_F32_VEC).
template <class V>
struct QuantConsts {
  QuantConsts(float shift_, float qmin_, float qmax_)
      : shift(V::set1(shift_)), half(V::set1(0.5f)), qmin(V::set1(qmin_)), qmax(V::set1(qmax_)), zero(V::set1(0.0f)) {}
  const typename V::T shift, half, qmin, qmax, zero;
};

template <class Kern, typename T>
void quantize_rows(const T* __restrict X, const float* __restrict smooth, int64_t M, int64_t K, int64_t G,
                   float qmin, float qmax, bool is_unsigned, float shift, bool has_shift, bool biased,
                   int8_t* __restrict Q, float* __restrict S, float* __restrict XS,
                   const float* __restrict LD, int64_t R, float* __restrict H) {
  const int64_t ng = K / G;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    constexpr int RB = 4;  // rows per block (the low-rank dot reuses each L2^T load 4x)
    std::vector<float> scratch(XS ? 0 : RB * K);
    const float* rows[RB];
    int rb = 0;
    const Kern kern(shift, qmin, qmax, biased);
    for (int64_t r = r0; r < r1; ++r) {
      float* v = XS ? XS + r * K : scratch.data() + rb * K;
      kern.smooth_row(X + r * K, smooth, K, v);  // pass 1: x' = float(x) / smooth
      int8_t* q = Q + r * K;
      float* s = S + r * ng;
      for (int64_t g = 0; g < ng; ++g) {
        bool nan = false;
        float sc = kern.group_amax(v + g * G, G, has_shift, is_unsigned, nan) / qmax;  // pass 2
        if (nan || !(sc > 0.0f)) sc = 1.0f;  // torch: amax propagates NaN, NaN > 0 is false
        s[g] = sc;
        kern.quantize_group(v + g * G, G, sc, has_shift, q + g * G);  // pass 3
      }
      rows[rb++] = v;
      if (LD && (rb == RB || r + 1 == r1)) {
        Kern::lora_down_rows(rows, rb, LD, R, K, H + (r + 1 - rb) * R);
        rb = 0;
      } else if (!LD) {
        rb = 0;
      }
    }
  });
}

template <class Kern>
std::vector<at::Tensor> quantize_act(const at::Tensor& x_in, const std::optional<at::Tensor>& smooth_in, int64_t G,
                                     int64_t qmin, int64_t qmax, bool is_unsigned, double shift, bool emit_xs,
                                     bool biased, const std::optional<at::Tensor>& lora_down_in) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x_in.device().is_cpu(), "x must be on the CPU");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "x must be float32, bfloat16 or float16");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(G > 0 && K % G == 0, "K must be a multiple of the group size");
  TORCH_CHECK(qmax > 0 && qmin < qmax && qmin >= -128 && qmax <= 127, "bad integer grid");
  const at::Tensor x = x_in.contiguous();
  at::Tensor smooth;
  if (smooth_in.has_value() && smooth_in->defined()) {
    smooth = smooth_in->to(at::kFloat).contiguous();
    TORCH_CHECK(smooth.numel() == K, "smooth must have K elements");
  }
  at::Tensor ld;
  if (lora_down_in.has_value() && lora_down_in->defined()) {
    ld = lora_down_in->to(at::kFloat).contiguous();
    TORCH_CHECK(ld.dim() == 2 && ld.size(1) == K && ld.size(0) > 0, "lora_down must be [R, K]");
  }
  const int64_t R = ld.defined() ? ld.size(0) : 0;
  at::Tensor h = at::empty({M, R}, x.options().dtype(at::kFloat));
  at::Tensor q = at::empty({M, K}, x.options().dtype(biased ? at::kByte : at::kChar));
  at::Tensor s = at::empty({M, K / G}, x.options().dtype(at::kFloat));
  at::Tensor xs = emit_xs ? at::empty({M, K}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (M == 0 || K == 0) return {q, s, emit_xs ? xs : at::empty({0}, s.options()), h.zero_()};
  const float* sm = smooth.defined() ? smooth.data_ptr<float>() : nullptr;
  int8_t* qp = reinterpret_cast<int8_t*>(q.data_ptr());
  float* sp = s.data_ptr<float>();
  float* xp = emit_xs ? xs.data_ptr<float>() : nullptr;
  const float* ldp = ld.defined() ? ld.data_ptr<float>() : nullptr;
  float* hp = h.data_ptr<float>();
  const auto rows = [&](const auto* xd) {
    quantize_rows<Kern>(xd, sm, M, K, G, static_cast<float>(qmin), static_cast<float>(qmax), is_unsigned,
                        static_cast<float>(shift), shift != 0.0, biased, qp, sp, xp, ldp, R, hp);
  };
  if (dt == at::kFloat) {
    rows(x.data_ptr<float>());
  } else if (dt == at::kBFloat16) {
    rows(x.data_ptr<at::BFloat16>());
  } else {
    rows(x.data_ptr<at::Half>());
  }
  return {q, s, emit_xs ? xs : at::empty({0}, s.options()), h};
}

template <class Kern>
void def_quantize_act(torch::Library& m) {
  m.def(
      "quantize_act(Tensor x, Tensor? smooth, int G, int qmin, int qmax, bool is_unsigned, float shift, "
      "bool emit_xs, bool biased, Tensor? lora_down=None) -> Tensor[]",
      &quantize_act<Kern>);
}

// ============================================================================ W4A16
//
// Weight-only INT4: qweight [N, K/2] packed int4 (low nibble = even k, two's complement),
// wscales [N, K/G] fp32.
//   w4a16_gemv(xe, xo, qweight, wscales, G) -> y [M, N]: xe / xo the even / odd columns of x
//       ([M, K/2] fp32 each); per row and group p = sum_k x[k] * q[k] (fp32), y += p * s.
//   w4a16_dequant(qweight, wscales, G) -> W [N, K] fp32 = float(q) * s (one rounding).
//
// W4A16Kernel (per ISA):
//   static constexpr int kRows;  // rows of x per pass over the weight
//   template <int MB> static void gemv_block(const float* xe, const float* xo, int64_t m0, int64_t Kh,
//       const int8_t* qw, const float* sw, int64_t G, int64_t n0, int64_t n1, float* y, int64_t N);
//       y[m0 + i, n] for i < MB (1 <= MB <= kRows) and n in [n0, n1), summed as the AVX-512
//       kernel's 16 lanes
//   W4A16Kernel();  // per-thread constants of the dequantizer
//   void dequant_group(const int8_t* p, int64_t bytes, float s, float* out) const;
//       out[0 : 2 * bytes] = float(w) * s in k order, from the packed bytes p[0 : bytes]

inline void w4a16_check(const at::Tensor& qweight, const at::Tensor& wscales, int64_t G) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "w4a16: qweight must be contiguous int8 [N, K/2]");
  TORCH_CHECK(wscales.scalar_type() == at::kFloat && wscales.dim() == 2 && wscales.is_contiguous(),
              "w4a16: wscales must be contiguous fp32 [N, K/G]");
  TORCH_CHECK(G % 32 == 0, "w4a16: group size must be a multiple of 32");
  TORCH_CHECK(wscales.size(0) == qweight.size(0) && wscales.size(1) * (G / 2) == qweight.size(1),
              "w4a16: qweight / wscales shapes disagree");
}

// block(std::integral_constant<int, r>) for the row count r = rows in [1, MB].
template <int MB, class Block>
inline void dispatch_rows(int64_t rows, Block&& block) {
  if constexpr (MB >= 1) {
    if (rows == MB) {
      block(std::integral_constant<int, MB>{});
    } else {
      dispatch_rows<MB - 1>(rows, block);
    }
  }
}

template <class Kern>
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
  constexpr int MB = Kern::kRows;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    const auto block = [&](auto rows) {
      Kern::template gemv_block<decltype(rows)::value>(pe, po, m, Kh, pq, ps, G, n0, n1, py, N);
    };
    for (; m + MB <= M; m += MB) block(std::integral_constant<int, MB>{});
    dispatch_rows<MB - 1>(M - m, block);  // the last M % MB rows in one pass
  });
  return y;
}

template <class Kern>
at::Tensor w4a16_dequant(const at::Tensor& qweight, const at::Tensor& wscales, int64_t G) {
  w4a16_check(qweight, wscales, G);
  const int64_t N = qweight.size(0), Kh = qweight.size(1), gh = G / 2, groups = Kh / gh;
  at::Tensor w = at::empty({N, 2 * Kh}, wscales.options());
  const int8_t* pq = qweight.data_ptr<int8_t>();
  const float* ps = wscales.data_ptr<float>();
  float* pw = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const Kern kern;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        kern.dequant_group(pq + n * Kh + g * gh, gh, ps[n * groups + g], pw + n * 2 * Kh + 2 * g * gh);
      }
    }
  });
  return w;
}

template <class Kern>
void def_w4a16(torch::Library& m) {
  m.def("w4a16_gemv(Tensor xe, Tensor xo, Tensor qweight, Tensor wscales, int G) -> Tensor", &w4a16_gemv<Kern>);
  m.def("w4a16_dequant(Tensor qweight, Tensor wscales, int G) -> Tensor", &w4a16_dequant<Kern>);
}

// ============================================================================ grouped GEMM
//
//   Y[m, n] = fold over groups g ascending of I_g[m, n] = sum_{k in g} qa[m, k] * qw[n, k]
//             (exact int32): acc = g == 0 ? float(I_0) * (sa * sw) : fma(float(I_g), sa * sw, acc)
//   then (u8 entry point) Y += h @ lora_up^T (fp32 FMAs in ascending rank, skipping the rank
//   columns that are all zero in the output's 64-column panel) and Y += ybias.
//
// Ops: pack_weight(qw, sw, G, int4) -> the ISA's packed weight [Bp, bias, swt];
// gemm_packed(qa int8, sa, Bp, bias, swt, N, G); gemm_packed_u8(qa ^ 0x80, ..., h, lora_up, ybias);
// set_amx / amx_enabled.
//
// GemmKernel (per ISA):
//   static constexpr int NC;  // columns per packed weight panel (64 on every ISA: the
//                             // epilogue then skips the same all-zero rank columns)
//   static constexpr int64_t MC;         // rows per task (a multiple of the micro-tile's rows)
//   static constexpr Schedule kSchedule;  // how tasks go to threads (below)
//   static std::vector<at::Tensor> pack_weight(const at::Tensor& qw, const at::Tensor& sw, int64_t G, bool int4);
//   struct Packed;  // what run() needs of the packed weight
//   static Packed check_packed(const GemmArgs& a, const at::Tensor& Bp, const at::Tensor& bias,
//                              const at::Tensor& swt);  // shape checks of the ISA's layout
//   static void run(const GemmArgs& a, const Packed& p, float* C);  // C [M][Np], every element written
//   static bool set_amx(bool on); static bool amx_enabled();

// The checked operands of one GEMM call.
struct GemmArgs {
  at::Tensor qa;  // [M, K] int8, or u8 = qa ^ 0x80 when biased; contiguous
  at::Tensor sa;  // [M, K/G] fp32, contiguous
  bool biased = false;
  int64_t M = 0, K = 0, N = 0, G = 0;
  int64_t ng = 0;  // K / G
  int64_t NB = 0;  // weight panels
  int64_t Np = 0;  // NB * NC (the output's padded width)
  // Epilogue Y += H @ LU^T (H [M, R], LU = lora_up [N, R]), then Y += YB.
  at::Tensor h, lu, yb;
  const float* H = nullptr;  // null: no low-rank term (none given, or rank 0)
  int64_t R = 0;
  const float* LU = nullptr;
  const float* YB = nullptr;  // ybias padded with zeros to Np, or null
};

// The epilogue operands of gemm_packed_u8 (h and lora_up come together), into a.
inline void epilogue_operands(GemmArgs& a, const std::optional<at::Tensor>& h_in,
                              const std::optional<at::Tensor>& lora_up_in, const std::optional<at::Tensor>& ybias_in) {
  if (h_in.has_value() && h_in->defined()) {
    TORCH_CHECK(lora_up_in.has_value() && lora_up_in->defined(), "low-rank h needs lora_up");
    a.h = h_in->to(at::kFloat).contiguous();
    a.lu = lora_up_in->to(at::kFloat).contiguous();
    TORCH_CHECK(a.h.dim() == 2 && a.h.size(0) == a.M && a.lu.dim() == 2 && a.lu.size(0) == a.N &&
                    a.lu.size(1) == a.h.size(1),
                "low-rank operands must be h [M, R], lora_up [N, R]");
  }
  if (ybias_in.has_value() && ybias_in->defined()) {
    const at::Tensor b = ybias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == a.N, "bias must have N elements");
    a.yb = at::zeros({a.Np}, b.options());  // padding columns (>= N) are computed and dropped
    a.yb.narrow(0, 0, a.N).copy_(b.view({a.N}));
  }
  a.H = a.h.defined() && a.h.size(1) > 0 ? a.h.data_ptr<float>() : nullptr;
  a.R = a.h.defined() ? a.h.size(1) : 0;
  a.LU = a.H ? a.lu.data_ptr<float>() : nullptr;
  a.YB = a.yb.defined() ? a.yb.data_ptr<float>() : nullptr;
}

// The activations as u8 a ^ 0x80 (a + 128: the unsigned operand of VPDPBUSD); qa itself when
// the caller passed them biased already (gemm_packed_u8).
inline at::Tensor biased_activations(const GemmArgs& a) {
  if (a.biased) return a.qa;
  at::Tensor au = at::empty({a.M, a.K}, a.qa.options().dtype(at::kByte));
  const uint8_t* src = reinterpret_cast<const uint8_t*>(a.qa.data_ptr());
  uint8_t* dst = au.data_ptr<uint8_t>();
  at::parallel_for(0, a.M * a.K, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = src[i] ^ 0x80;
  });
  return au;
}

// The GEMM panel's slice of lora_up^T: L[jj][c] = lora_up[n0 + c][js[jj]] (0 past N) for the
// rank indices js whose column slice is not all zero; returns their count. Built per panel
// (R x NC floats) instead of transposing the whole [N, R] matrix on every call (that copy cost
// 50-300 us per linear of a width-768 FLUX block, ~10% of the block). Skipping all-zero
// slices matters for fused siblings: their lora_up is block-diagonal ([3N, 3R] for Q/K/V),
// so a panel inside one sibling has R nonzero rank columns out of 3R (a third of the FMAs;
// and the unfused layers never multiplied the other siblings' h by those zeros either).
// Every ISA uses the same NC (64), so they skip the same ranks.
template <int NC>
inline int64_t panel_lora_up(const float* __restrict LU, int64_t N, int64_t R, int64_t n0, float* __restrict L,
                             int32_t* __restrict js) {
  int64_t nact = 0;
  for (int64_t j = 0; j < R; ++j) {
    float* row = L + nact * NC;
    bool any = false;
    for (int64_t c = 0; c < NC; ++c) {
      const int64_t n = n0 + c;
      row[c] = n < N ? LU[n * R + j] : 0.0f;
      any |= row[c] != 0.0f;
    }
    if (any) js[nact++] = static_cast<int32_t>(j);
  }
  return nact;
}

// One task of a GEMM: panel nb's NC columns x rows [m_lo, m_hi).
struct GemmTask {
  int64_t nb;    // panel
  int64_t n0;    // its first column (nb * NC)
  int64_t m_lo;  // rows [m_lo, m_hi)
  int64_t m_hi;
};

// The epilogue of a finished output block, rows [m_lo, m_hi) x panel columns [n0, n0 + NC):
//   C += H @ L (low-rank up projection, fp32 FMAs in ascending rank), then C += yb.
// C points at the block's element (m_lo, n0), row stride ldc. H: [M, R] fp32 (absolute rows)
// or null; L: the panel's nonzero rank rows of lora_up^T ([nact][NC], row jj = rank js[jj],
// from panel_lora_up); yb: the bias padded with zeros to Np, or null. Columns >= N (panel
// padding) are computed on zeros and dropped by the caller.
// V: the ISA's fp32 vectors (see SVDQ_F32_VEC).
// Two rows per pass, 4 vectors each: the 4 loads of lora_up^T feed 8 independent FMA chains.
// One row's 4 chains (FMA latency 4-5 cycles) ran at a quarter of the FMA throughput on AVX2:
// the epilogue of a 128-wide rank-32 layer took twice its int8 GEMM (M = 3400, demo model).
// Every output element gets the same FMAs in the same order whatever the vector width, so
// every ISA gives the same bits.
template <class V, int NC>
inline void lowrank_bias_rows(float* __restrict C, int64_t ldc, int64_t m_lo, int64_t m_hi, int64_t n0,
                              const float* __restrict H, int64_t R, const float* __restrict L,
                              const int32_t* __restrict js, int64_t nact, const float* __restrict yb) {
  using T = typename V::T;
  constexpr int W = 4 * V::kLanes;  // columns per pass
  static_assert(NC % W == 0, "panel width");
  const float* ybp = yb ? yb + n0 : nullptr;
  for (int64_t m = m_lo; m < m_hi; m += 2) {
    // Odd tail: the second row is row m again: both loads happen before both stores and
    // compute the same values, so the row is written twice, unchanged.
    const int64_t m1 = std::min(m + 1, m_hi - 1);
    for (int part = 0; part < NC / W; ++part) {
      float* c = C + (m - m_lo) * ldc + W * part;
      float* d = C + (m1 - m_lo) * ldc + W * part;
      constexpr int k1 = V::kLanes, k2 = 2 * V::kLanes, k3 = 3 * V::kLanes;
      T a0 = V::load(c), a1 = V::load(c + k1), a2 = V::load(c + k2), a3 = V::load(c + k3);
      T b0 = V::load(d), b1 = V::load(d + k1), b2 = V::load(d + k2), b3 = V::load(d + k3);
      if (H) {
        const float* h0 = H + m * R;
        const float* h1 = H + m1 * R;
        for (int64_t jj = 0; jj < nact; ++jj) {
          const float* l = L + jj * NC + W * part;
          const T l0 = V::load(l), l1 = V::load(l + k1), l2 = V::load(l + k2), l3 = V::load(l + k3);
          const int32_t j = js[jj];
          const T x = V::set1(h0[j]), y = V::set1(h1[j]);
          a0 = V::fmadd(x, l0, a0);
          a1 = V::fmadd(x, l1, a1);
          a2 = V::fmadd(x, l2, a2);
          a3 = V::fmadd(x, l3, a3);
          b0 = V::fmadd(y, l0, b0);
          b1 = V::fmadd(y, l1, b1);
          b2 = V::fmadd(y, l2, b2);
          b3 = V::fmadd(y, l3, b3);
        }
      }
      if (ybp) {
        const float* yv = ybp + W * part;
        const T y0 = V::load(yv), y1 = V::load(yv + k1), y2 = V::load(yv + k2), y3 = V::load(yv + k3);
        a0 = V::add(a0, y0); a1 = V::add(a1, y1); a2 = V::add(a2, y2); a3 = V::add(a3, y3);
        b0 = V::add(b0, y0); b1 = V::add(b1, y1); b2 = V::add(b2, y2); b3 = V::add(b3, y3);
      }
      V::store(c, a0); V::store(c + k1, a1); V::store(c + k2, a2); V::store(c + k3, a3);
      V::store(d, b0); V::store(d + k1, b1); V::store(d + k2, b2); V::store(d + k3, b3);
    }
  }
}

// One thread's epilogue state: the lora_up^T slice of the panel it last worked on.
template <int NC>
class Epilogue {
 public:
  explicit Epilogue(const GemmArgs& a) : a_(a), L_(a.H ? a.R * NC : 0), js_(a.H ? a.R : 0) {}

  // Applies the epilogue (if any) to the finished block of task t; C points at its element
  // (t.m_lo, t.n0), row stride ldc.
  template <class V>
  void apply(const GemmTask& t, float* C, int64_t ldc) {
    if (!a_.H && !a_.YB) return;
    if (a_.H && nb_ != t.nb) {
      nact_ = panel_lora_up<NC>(a_.LU, a_.N, a_.R, t.n0, L_.data(), js_.data());
      nb_ = t.nb;
    }
    lowrank_bias_rows<V, NC>(C, ldc, t.m_lo, t.m_hi, t.n0, a_.H, a_.R, L_.data(), js_.data(), nact_, a_.YB);
  }

 private:
  const GemmArgs& a_;
  std::vector<float> L_;
  std::vector<int32_t> js_;
  int64_t nb_ = -1, nact_ = 0;
};

// How a GEMM's tasks (panel-major: NC columns x MC rows) go to the threads. Which thread
// computes a task does not change its bits.
enum class Schedule {
  // Contiguous runs of tasks per thread (one at.parallel_for range): a thread's consecutive
  // tasks share a panel, so per-panel work of the thread (the AVX-512 int4 expansion) is reused.
  kStatic,
  // One task at a time from a shared counter: on a machine shared with other work a
  // descheduled thread then delays its own task only, not half of the GEMM.
  kDynamic,
};

// For every task: body(state, task, epilogue), with state = make_state() and an Epilogue made
// once per thread (a state's destructor runs when its thread is done).
template <int NC, int64_t MC, Schedule S, class MakeState, class Body>
void for_each_task(const GemmArgs& a, MakeState&& make_state, Body&& body) {
  const int64_t nm = (a.M + MC - 1) / MC;
  const int64_t ntasks = a.NB * nm;
  const auto task = [&](int64_t t) {
    const int64_t nb = t / nm, m_lo = (t % nm) * MC;
    return GemmTask{nb, nb * NC, m_lo, std::min(a.M, m_lo + MC)};
  };
  if constexpr (S == Schedule::kStatic) {
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      auto state = make_state();
      Epilogue<NC> epi(a);
      for (int64_t t = t0; t < t1; ++t) body(state, task(t), epi);
    });
  } else {
    std::atomic<int64_t> next_task{0};
    at::parallel_for(0, std::min<int64_t>(ntasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      auto state = make_state();
      Epilogue<NC> epi(a);
      for (int64_t t; (t = next_task.fetch_add(1, std::memory_order_relaxed)) < ntasks;) body(state, task(t), epi);
    });
  }
}

// The checked weight operands of pack_weight: qw [N, K] int8 or [N, K/2] packed int4 (int4),
// sw [N, K/G].
struct PackArgs {
  at::Tensor qw, sw;  // contiguous; sw fp32
  int64_t N = 0, K = 0;
  int64_t row_bytes = 0;  // qw.size(1)
  int64_t ng = 0, NB = 0, Np = 0;
};

template <int NC>
inline PackArgs pack_args(const at::Tensor& qw_in, const at::Tensor& sw_in, int64_t G, bool int4) {
  TORCH_CHECK(qw_in.dim() == 2 && qw_in.scalar_type() == at::kChar, "qw must be [N, K] int8 or [N, K/2] packed int4");
  TORCH_CHECK(G > 0 && G % 4 == 0, "group size must be a positive multiple of 4");
  PackArgs p;
  p.qw = qw_in.contiguous();
  p.sw = sw_in.to(at::kFloat).contiguous();
  p.N = p.qw.size(0);
  p.row_bytes = p.qw.size(1);
  p.K = int4 ? 2 * p.row_bytes : p.row_bytes;
  TORCH_CHECK(!int4 || p.K >= 8, "packed int4 weights need K >= 8");
  TORCH_CHECK(p.K % G == 0, "K must be a multiple of the group size");
  p.ng = p.K / G;
  p.NB = (p.N + NC - 1) / NC;
  p.Np = p.NB * NC;
  TORCH_CHECK(p.sw.dim() == 2 && p.sw.size(0) == p.N && p.sw.size(1) == p.ng, "sw must be [N, K/G]");
  return p;
}

// swt: [ng, Np] fp32, sw^T with zeros past N.
inline at::Tensor transposed_scales(const PackArgs& p) {
  at::Tensor swt = at::zeros({p.ng, p.Np}, p.qw.options().dtype(at::kFloat));
  swt.narrow(1, 0, p.N).copy_(p.sw.t());
  return swt;
}

// qa: [M, K] int8 (biased = false) or u8 = qa ^ 0x80 (biased = true, e.g. straight from
// quantize_act), sa: [M, K/G] fp32, the packed weight of Kern::pack_weight -> [M, N] fp32.
template <class Kern>
at::Tensor gemm_core(const at::Tensor& qa_in, const at::Tensor& sa_in, const at::Tensor& Bp, const at::Tensor& bias,
                     const at::Tensor& swt, int64_t N, int64_t G, bool biased,
                     const std::optional<at::Tensor>& h_in = std::nullopt,
                     const std::optional<at::Tensor>& lora_up_in = std::nullopt,
                     const std::optional<at::Tensor>& ybias_in = std::nullopt) {
  TORCH_CHECK(qa_in.dim() == 2 && qa_in.scalar_type() == (biased ? at::kByte : at::kChar),
              biased ? "qa must be [M, K] uint8 (int8 ^ 0x80)" : "qa must be [M, K] int8");
  GemmArgs a;
  a.qa = qa_in.contiguous();
  a.sa = sa_in.to(at::kFloat).contiguous();
  a.biased = biased;
  a.M = a.qa.size(0);
  a.K = a.qa.size(1);
  a.N = N;
  a.G = G;
  TORCH_CHECK(G > 0 && G % 4 == 0 && a.K % G == 0, "bad group size");
  a.ng = a.K / G;
  a.NB = Bp.size(0);
  a.Np = a.NB * Kern::NC;
  const typename Kern::Packed packed = Kern::check_packed(a, Bp, bias, swt);
  TORCH_CHECK(a.sa.dim() == 2 && a.sa.size(0) == a.M && a.sa.size(1) == a.ng, "sa must be [M, K/G]");
  TORCH_CHECK(N <= a.Np && N > a.Np - Kern::NC, "N does not match the packed weight");
  if (a.M == 0 || N == 0 || a.K == 0) return at::zeros({a.M, N}, a.qa.options().dtype(at::kFloat));
  epilogue_operands(a, h_in, lora_up_in, ybias_in);
  at::Tensor C = at::empty({a.M, a.Np}, a.qa.options().dtype(at::kFloat));  // fully written (group 0 stores)
  Kern::run(a, packed, C.data_ptr<float>());
  if (a.Np == N) return C;
  return C.narrow(1, 0, N).contiguous();
}

template <class Kern>
at::Tensor gemm_packed(const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& Bp, const at::Tensor& bias,
                       const at::Tensor& swt, int64_t N, int64_t G) {
  return gemm_core<Kern>(qa, sa, Bp, bias, swt, N, G, false);
}

// Biased u8 activations, plus the fused epilogue Y += h @ lora_up^T (low-rank) + ybias.
template <class Kern>
at::Tensor gemm_packed_u8(const at::Tensor& qa_u8, const at::Tensor& sa, const at::Tensor& Bp, const at::Tensor& bias,
                          const at::Tensor& swt, int64_t N, int64_t G, const std::optional<at::Tensor>& h,
                          const std::optional<at::Tensor>& lora_up, const std::optional<at::Tensor>& ybias) {
  return gemm_core<Kern>(qa_u8, sa, Bp, bias, swt, N, G, true, h, lora_up, ybias);
}

// Plain operator registration (no pybind11): much faster to compile than torch/extension.h.
template <class Kern>
void def_gemm(torch::Library& m) {
  m.def("pack_weight", &Kern::pack_weight);
  m.def("set_amx", &Kern::set_amx);
  m.def("amx_enabled", &Kern::amx_enabled);
  m.def("gemm_packed", &gemm_packed<Kern>);
  m.def("gemm_packed_u8(Tensor qa_u8, Tensor sa, Tensor Bp, Tensor bias, Tensor swt, int N, int G, "
        "Tensor? h=None, Tensor? lora_up=None, Tensor? ybias=None) -> Tensor",
        &gemm_packed_u8<Kern>);
}

}  // namespace
