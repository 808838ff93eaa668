// AMX (Intel Advanced Matrix Extensions) block of the grouped int8 GEMM.
//
// Same contract and the same arithmetic as the VNNI micro-tiles of grouped_gemm_avx512.cpp,
// so the output is bit-identical: per group g the exact int32 partial
//   I_g[m, n] = bias_g[n] + sum_{k in g} (qa[m, k] ^ 0x80) * qw[n, k]
// (u8 x s8 dot products, the bias row removes the ^0x80 exactly), then
//   acc = g == 0 ? float(I_0) * (sa * sw) : fma(float(I_g), sa * sw, acc).
// One TDPBUSD is a 16 x 16 x 64 int8 product, i.e. one K=64 group of a 16x16 block (13 ns
// on the dev VM: ~4.6x the MAC rate of AVX512-VNNI's peak there); the fp32 fold (one FMA per
// output and group) is then what bounds the speed, as on the GPU.
//
// Tiles: 2 A tiles (32 rows x 64 bytes) x 2 B tiles (16 k-quads x 16 columns x 4 bytes)
// -> 4 C tiles (32 x 32 int32): all 8 tile registers. The C tiles start at zero and the
// bias row is added in the fold (a stride-0 tile load of it cost as much as the 4
// TDPBUSDs). B tiles are read straight from the VNNI panel layout [K/4][64][4] (row stride
// 256 bytes), so both kernels share one packing.
//
// The functions carry target attributes instead of global -mamx-* flags, so the rest of
// the extension still builds (and runs) on compilers/CPUs without AMX.
#include "grouped_gemm_amx.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

// AMX intrinsics need GCC >= 11 or clang >= 12; older compilers build stubs (request()
// returns false) so the VNNI kernels still build with them.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define SVDQ_HAVE_AMX 1
#else
#define SVDQ_HAVE_AMX 0
#endif

namespace svdq_amx {

#if SVDQ_HAVE_AMX
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: request an XSAVE feature
constexpr long kXfeatureXtiledata = 18;     // AMX tile data

struct TileConfig {  // the 64-byte layout LDTILECFG reads (palette 1)
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool cpu_has_amx_int8() {
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;  // CPUID.(7,0):EDX AMX-TILE, AMX-INT8
  return tile && int8;
}

}  // namespace

bool request() {
  // Linux keeps the 8 KiB tile state off until the process asks (once; process-wide).
  static const bool ok = cpu_has_amx_int8() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

__attribute__((target("amx-tile"))) void configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // every tile: 16 rows x 64 bytes
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // Inline asm with the whole struct as a memory operand: GCC 12 at -O3 drops the colsb/rows
  // stores before the _tile_loadconfig builtin (it does not see that it reads them).
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

// C tiles 0..3 = (rows 0-15 | 16-31) x (cols 0-15 | 16-31); A tiles 4, 5; B tiles 6, 7.
// part: [32][32] int32 destination of the four C tiles.
__attribute__((target("amx-tile,amx-int8"))) inline void group_tiles(const uint8_t* __restrict A, int64_t lda,
                                                                      const int8_t* __restrict panel, int64_t k0,
                                                                      int64_t steps, int32_t* part) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k = k0 + 64 * s;            // first k of this step
    const int8_t* b = panel + (k / 4) * 256;  // k-quad row k/4 of the [K/4][64][4] panel
    _tile_loadd(4, A + k, lda);
    _tile_loadd(5, A + 16 * lda + k, lda);
    _tile_loadd(6, b, 256);
    _tile_loadd(7, b + 64, 256);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, part, 128);
  _tile_stored(1, part + 16, 128);
  _tile_stored(2, part + 16 * 32, 128);
  _tile_stored(3, part + 16 * 32 + 16, 128);
}

// acc (fp32 [32][32]) folds group g's partials: I = part + bias_g (exact), then
// acc = g == 0 ? I * p : fma(I, p, acc) with p = sa[m, g] * sw[n, g], as the VNNI tiles do.
__attribute__((target("avx512f"))) inline void fold(const int32_t* __restrict part, const int32_t* __restrict bias,
                                                    const float* __restrict swt, const float* __restrict sa,
                                                    int64_t ldsa, int64_t g, float* __restrict acc) {
  const __m512i b0 = _mm512_loadu_si512(bias), b1 = _mm512_loadu_si512(bias + 16);
  const __m512 w0 = _mm512_loadu_ps(swt), w1 = _mm512_loadu_ps(swt + 16);
  for (int r = 0; r < 32; ++r) {
    const __m512 s = _mm512_set1_ps(sa[r * ldsa + g]);
    const __m512 p0 = _mm512_mul_ps(s, w0), p1 = _mm512_mul_ps(s, w1);
    const __m512 i0 = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_load_si512(part + r * 32), b0));
    const __m512 i1 = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_load_si512(part + r * 32 + 16), b1));
    float* c = acc + r * 32;
    if (g == 0) {
      _mm512_store_ps(c, _mm512_mul_ps(i0, p0));
      _mm512_store_ps(c + 16, _mm512_mul_ps(i1, p1));
    } else {
      _mm512_store_ps(c, _mm512_fmadd_ps(i0, p0, _mm512_load_ps(c)));
      _mm512_store_ps(c + 16, _mm512_fmadd_ps(i1, p1, _mm512_load_ps(c + 16)));
    }
  }
}

// Why the buffers: the fold reads AMX tile stores, and reading them right after the
// TILESTORED stalls, so group g's tiles are issued before group g-1 is folded (two
// part buffers). The accumulator is a contiguous 4 KiB block: C's rows are Np floats
// apart (12 KiB for N=3072), which maps all 32 rows onto one L1 set (measured: the fold
// into C directly took 2.6x as long).
__attribute__((target("amx-tile,amx-int8,avx512f"))) void block_32x32(
    const uint8_t* __restrict A, int64_t lda, const float* __restrict sa, int64_t ldsa,
    const int8_t* __restrict panel, const int32_t* __restrict bias, const float* __restrict swt, int64_t Np,
    float* __restrict C, int64_t ldc, int64_t ng, int64_t G) {
  alignas(64) int32_t part[2][32 * 32];
  alignas(64) float acc[32 * 32];
  const int64_t steps = G / 64;  // TDPBUSDs per group
  for (int64_t g = 0; g < ng; ++g) {
    group_tiles(A, lda, panel, g * G, steps, part[g & 1]);
    if (g > 0) fold(part[(g - 1) & 1], bias + (g - 1) * Np, swt + (g - 1) * Np, sa, ldsa, g - 1, acc);
  }
  fold(part[(ng - 1) & 1], bias + (ng - 1) * Np, swt + (ng - 1) * Np, sa, ldsa, ng - 1, acc);
  for (int r = 0; r < 32; ++r) {
    _mm512_storeu_ps(C + r * ldc, _mm512_load_ps(acc + r * 32));
    _mm512_storeu_ps(C + r * ldc + 16, _mm512_load_ps(acc + r * 32 + 16));
  }
}

#else  // no AMX support in this compiler

bool request() { return false; }
void configure() {}
void release() {}
void block_32x32(const uint8_t*, int64_t, const float*, int64_t, const int8_t*, const int32_t*, const float*, int64_t,
                 float*, int64_t, int64_t, int64_t) {}

#endif  // SVDQ_HAVE_AMX

}  // namespace svdq_amx
