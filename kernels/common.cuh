// kernels/common.cuh — what every kernel file includes: the CUDA or emulated
// execution model, the shared parameter structs, dtype load/store helpers.
#pragma once
#ifdef CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#define EMU_ENTRY(name, P)
#endif
#include "params.h"

typedef __nv_bfloat16 bf16;

// Load an I/O element as fp32 / store an fp32 value in the I/O dtype.
__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, long i, float v) { p[i] = __float2bfloat16_rn(v); }

// Column `col` of (I - M)^-1 for a strictly lower-triangular L x L matrix M
// (m(t, u) reads M[t][u]), by forward substitution in fp32:
// x_t = [t == col] + sum_{u<t} M[t][u] x_u. The chunked WKV-7 kernels (v2, v3)
// run it on one lane per column.
template <int L, class F>
__device__ __forceinline__ void tri_inverse_column(F m, int col, float (&x)[L]) {
#pragma unroll
  for (int t = 0; t < L; ++t) {
    float acc = (t == col) ? 1.f : 0.f;
#pragma unroll
    for (int u = 0; u < t; ++u) acc += m(t, u) * x[u];
    x[t] = acc;
  }
}
