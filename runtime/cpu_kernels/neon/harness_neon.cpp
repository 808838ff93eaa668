// Standalone correctness harness for the NEON kernels (kernels_neon.h): reads test cases
// written by tests/runtime/test_cpu_isa_neon.py, runs the kernels, writes their outputs for
// a bit-for-bit comparison with the torch oracle. Built with the aarch64 cross compiler and
// run under qemu-aarch64 on x86 hosts (or natively on ARM64).
//
// Usage: harness_neon CASES.bin OUT.bin
// A case: int64 header[16] = {kind, p1, ...}, then its arrays (little-endian):
//   kind 1 GEMM:  M N K G R has_h has_bias | qa i8[M*K] sa f32[M*K/G] qw i8[N*K] sw f32[N*K/G]
//                 [h f32[M*R] lora_up f32[N*R]] [bias f32[N]]            -> y f32[M*N]
//   kind 2 QUANT: M K G qmin qmax unsigned has_smooth R shift_bits | x f32[M*K] [smooth f32[K]]
//                 [lora_down f32[R*K]]                  -> q i8[M*K] s f32[M*K/G] [h f32[M*R]]
//   kind 3 GEMV:  M N K G | x f32[M*K] qw i8[N*K/2] s f32[N*K/G]           -> y f32[M*N]
#include "kernels_neon.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

template <typename T>
std::vector<T> read(FILE* f, int64_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, f) != static_cast<size_t>(n)) {
    std::fprintf(stderr, "truncated case file\n");
    std::exit(2);
  }
  return v;
}

template <typename T>
void write(FILE* f, const std::vector<T>& v) {
  if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASES.bin OUT.bin\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int cases = 0;
  int64_t hd[16];
  while (std::fread(hd, sizeof(int64_t), 16, in) == 16) {
    ++cases;
    if (hd[0] == 1) {
      const int64_t M = hd[1], N = hd[2], K = hd[3], G = hd[4], R = hd[5], ng = K / G;
      const bool has_h = hd[6], has_bias = hd[7];
      auto qa = read<int8_t>(in, M * K);
      auto sa = read<float>(in, M * ng);
      auto qw = read<int8_t>(in, N * K);
      auto sw = read<float>(in, N * ng);
      auto h = read<float>(in, has_h ? M * R : 0);
      auto lu = read<float>(in, has_h ? N * R : 0);
      auto bias = read<float>(in, has_bias ? N : 0);
      std::vector<float> y(M * N);
      svdq_neon::grouped_gemm(M, N, K, G, qa.data(), sa.data(), qw.data(), sw.data(), has_h ? h.data() : nullptr,
                              has_h ? lu.data() : nullptr, R, has_bias ? bias.data() : nullptr, y.data());
      write(out, y);
    } else if (hd[0] == 2) {
      const int64_t M = hd[1], K = hd[2], G = hd[3], R = hd[8], ng = K / G;
      const float qmin = static_cast<float>(hd[4]), qmax = static_cast<float>(hd[5]);
      const bool is_unsigned = hd[6], has_smooth = hd[7];
      float shift;
      const int32_t bits = static_cast<int32_t>(hd[9]);
      std::memcpy(&shift, &bits, 4);
      auto x = read<float>(in, M * K);
      auto sm = read<float>(in, has_smooth ? K : 0);
      auto ld = read<float>(in, R * K);
      std::vector<int8_t> q(M * K);
      std::vector<float> s(M * ng), h(M * R);
      svdq_neon::quantize_act(M, K, G, x.data(), has_smooth ? sm.data() : nullptr, qmin, qmax, is_unsigned, shift,
                              R ? ld.data() : nullptr, R, q.data(), s.data(), h.data());
      write(out, q);
      write(out, s);
      write(out, h);
    } else if (hd[0] == 3) {
      const int64_t M = hd[1], N = hd[2], K = hd[3], G = hd[4];
      auto x = read<float>(in, M * K);
      auto qw = read<int8_t>(in, N * K / 2);
      auto s = read<float>(in, N * (K / G));
      std::vector<float> y(M * N);
      svdq_neon::w4a16_gemv(M, N, K, G, x.data(), qw.data(), s.data(), y.data());
      write(out, y);
    } else {
      std::fprintf(stderr, "unknown case kind %lld\n", static_cast<long long>(hd[0]));
      return 2;
    }
  }
  std::fclose(out);
  std::printf("%d cases, dotprod=%d\n", cases,
#if defined(__ARM_FEATURE_DOTPROD)
              1
#else
              0
#endif
  );
  return 0;
}
