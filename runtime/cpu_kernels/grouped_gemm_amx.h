// AMX block of the grouped int8 GEMM (see grouped_gemm_amx.cpp); used by GemmKernel::run in
// grouped_gemm_avx512.cpp for full 32-row blocks when the CPU and OS allow AMX.
#pragma once

#include <cstdint>

namespace svdq_amx {

// True once the CPU reports AMX-TILE + AMX-INT8 and Linux granted the tile state.
bool request();
// Per thread, before the first block_32x32 / after the last one.
void configure();
void release();

// C[0:32, 0:32] (fp32, stride ldc) = grouped product of 32 biased-u8 activation rows
// (A, stride lda; sa [32][ldsa]) and 32 columns of a VNNI panel ([K/4][64][4] int8, already
// offset to the column half), all ng groups of size G (a multiple of 64). bias/swt point at
// the block's first column of the [ng][Np] tables.
void block_32x32(const uint8_t* A, int64_t lda, const float* sa, int64_t ldsa, const int8_t* panel,
                 const int32_t* bias, const float* swt, int64_t Np, float* C, int64_t ldc, int64_t ng, int64_t G);

}  // namespace svdq_amx
