// kernels/mma_selftest.cu — one-warp kernel that checks the tensor-core
// helpers of kernels/mma.cuh (fragment layouts of mma.m16n8k16 bf16, the
// hi/lo split, C -> A reuse, ldmatrix with and without .trans) against a
// plain matmul. Test: tests/mma_emu.rs.
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
  } else if (p.mode == 3 || p.mode == 4) {
    // fragments by ldmatrix from shared tiles (rows of 16 bf16 + 8 padding,
    // 48 bytes: 16-byte aligned rows). mode 3: A row-major (ldmatrix), B
    // stored as B[k][n] (ldmatrix.trans); mode 4: A stored transposed
    // (ldmatrix.trans), B stored as B^T[n][k] (ldmatrix). B is 16 x 16 here
    // (b: 256 floats); the product uses its columns 0..7.
    struct alignas(16) Tile24 {
      bf16 e[16 * 24];
    };
    __shared__ Tile24 sa, sb;
    bf16* ta = sa.e;
    bf16* tb = sb.e;
    const int l = lane_id();
    for (int e = l; e < 256; e += 32) {
      const int i = e / 16, j = e % 16;
      ta[(p.mode == 3 ? i * 24 + j : j * 24 + i)] = __float2bfloat16_rn(A[e]);
      tb[(p.mode == 3 ? i * 24 + j : j * 24 + i)] = __float2bfloat16_rn(B[e]);  // B[k = i][n = j]
    }
    __syncwarp();
    FragA a;
    uint32_t r[4];
    if (p.mode == 3) {
      ldsm_x4<false>(a.x, &ta[(l & 15) * 24 + ((l >> 4) << 3)]);
      ldsm_x4<true>(r, &tb[((l & 7) + (((l >> 3) & 1) << 3)) * 24 + ((l >> 4) << 3)]);
    } else {
      ldsm_x4<true>(a.x, &ta[((l & 7) + ((l >> 4) << 3)) * 24 + (((l >> 3) & 1) << 3)]);
      ldsm_x4<false>(r, &tb[((l & 7) + ((l >> 4) << 3)) * 24 + (((l >> 3) & 1) << 3)]);
    }
    FragB b;  // n-tile 0 (registers 2, 3: n-tile 1)
    b.x[0] = r[0];
    b.x[1] = r[1];
    mma1(d, a, b);
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
