// kernels/mma_selftest.cu — one-warp kernel that checks the tensor-core
// helpers of kernels/mma.cuh (fragment layouts of mma.m16n8k16 bf16, the
// hi/lo split, C -> A reuse) against a plain matmul. Test: tests/mma_emu.rs.
#include "mma.cuh"

extern "C" __global__ void __launch_bounds__(32) mma_selftest(const __grid_constant__ MmaTestParams p) {
  const float* A = p.a;
  const float* B = p.b;
  FragC d;
  c_foreach(d, [&](int i, int j, float& x) { x = p.c[i * 8 + j]; });
  if (p.mode == 0) {
    FragA ah, al;
    FragB bh, bl;
    load_a_split([&](int i, int j) { return A[i * 16 + j]; }, ah, al);
    load_b_split([&](int k, int n) { return B[k * 8 + n]; }, bh, bl);
    mma_bf16_16816(d, ah, bh);
  } else if (p.mode == 1) {
    FragA ah, al;
    FragB bh, bl;
    load_a_split([&](int i, int j) { return A[i * 16 + j]; }, ah, al);
    load_b_split([&](int k, int n) { return B[k * 8 + n]; }, bh, bl);
    mma3(d, ah, al, bh, bl);
  } else {
    FragA ah, al;
    load_a_split([&](int i, int j) { return A[i * 16 + j]; }, ah, al);
    FragC x[2];
    for (int nt = 0; nt < 2; ++nt) {
      FragB bh, bl;
      load_b_split([&](int k, int n) { return B[k * 16 + nt * 8 + n]; }, bh, bl);
      c_zero(x[nt]);
      mma3(x[nt], ah, al, bh, bl);
    }
    FragA xh, xl;
    c_to_a_split(x[0], x[1], xh, xl);
    FragB bh, bl;
    load_b_split([&](int k, int n) { return B[256 + k * 8 + n]; }, bh, bl);
    mma3(d, xh, xl, bh, bl);
  }
  c_foreach(d, [&](int i, int j, float& x) { p.out[i * 8 + j] = x; });
}

EMU_ENTRY(mma_selftest, MmaTestParams)
