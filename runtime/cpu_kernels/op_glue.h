// ISA-independent parts of the CPU ops, shared by the AVX-512 (quantize_act.cpp,
// grouped_gemm_vnni.cpp, w4a16.cpp) and AVX2 (*_avx2.cpp) files: argument checks, output
// allocation, dtype dispatch and the per-panel lora_up gather. The math stays in the ISA
// files. Everything here has internal linkage (anonymous namespace): each extension is
// compiled with its own -m flags, so no function compiled for AVX-512 may be shared with (or
// interposed into) the AVX2 library.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

// The quantize_act op (x: [M, K] fp32/bf16/fp16; smooth: [K] any float dtype, converted to
// fp32 like smooth.float(); lora_down: [R, K]) -> [q, scale, x' (empty unless emit_xs), h].
// ``rows`` is the ISA file's quantize_rows, called with the typed x pointer first (a generic
// lambda: ``[](const auto* x, auto... a) { quantize_rows(x, a...); }``).
template <typename Rows>
std::vector<at::Tensor> quantize_act_op(Rows rows, const at::Tensor& x_in, const std::optional<at::Tensor>& smooth_in,
                                        int64_t G, int64_t qmin, int64_t qmax, bool is_unsigned, double shift,
                                        bool emit_xs, bool biased, const std::optional<at::Tensor>& lora_down_in) {
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
  const float fshift = static_cast<float>(shift);
  int8_t* qp = reinterpret_cast<int8_t*>(q.data_ptr());
  float* sp = s.data_ptr<float>();
  float* xp = emit_xs ? xs.data_ptr<float>() : nullptr;
  const float fqmin = static_cast<float>(qmin), fqmax = static_cast<float>(qmax);
  const bool has_shift = shift != 0.0;
  const float* ldp = ld.defined() ? ld.data_ptr<float>() : nullptr;
  float* hp = h.data_ptr<float>();
  if (dt == at::kFloat) {
    rows(x.data_ptr<float>(), sm, M, K, G, fqmin, fqmax, is_unsigned, fshift, has_shift, biased, qp, sp, xp, ldp, R,
         hp);
  } else if (dt == at::kBFloat16) {
    rows(x.data_ptr<at::BFloat16>(), sm, M, K, G, fqmin, fqmax, is_unsigned, fshift, has_shift, biased, qp, sp, xp,
         ldp, R, hp);
  } else {
    rows(x.data_ptr<at::Half>(), sm, M, K, G, fqmin, fqmax, is_unsigned, fshift, has_shift, biased, qp, sp, xp, ldp,
         R, hp);
  }
  return {q, s, emit_xs ? xs : at::empty({0}, s.options()), h};
}

// The GEMM panel's slice of lora_up^T: L[jj][c] = lora_up[n0 + c][js[jj]] (0 past N) for the
// rank indices js whose column slice is not all zero; returns their count. Built per panel
// (R x NC floats) instead of transposing the whole [N, R] matrix on every call (that copy cost
// 50-300 us per linear of a width-768 FLUX block, ~10% of the block). Skipping all-zero
// slices matters for fused siblings: their lora_up is block-diagonal ([3N, 3R] for Q/K/V),
// so a panel inside one sibling has R nonzero rank columns out of 3R (a third of the FMAs;
// and the unfused layers never multiplied the other siblings' h by those zeros either).
// Both ISAs use the same NC (64), so they skip the same ranks.
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

// Arguments of the W4A16 ops: qweight [N, K/2] packed int4, wscales [N, K/G] fp32.
inline void w4a16_check(const at::Tensor& qweight, const at::Tensor& wscales, int64_t G) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "w4a16: qweight must be contiguous int8 [N, K/2]");
  TORCH_CHECK(wscales.scalar_type() == at::kFloat && wscales.dim() == 2 && wscales.is_contiguous(),
              "w4a16: wscales must be contiguous fp32 [N, K/G]");
  TORCH_CHECK(G % 32 == 0, "w4a16: group size must be a multiple of 32");
  TORCH_CHECK(wscales.size(0) == qweight.size(0) && wscales.size(1) * (G / 2) == qweight.size(1),
              "w4a16: qweight / wscales shapes disagree");
}

}  // namespace
