// kernels/mma.cuh — warp-level bf16 tensor-core helpers for the v2 kernels.
//
// The only PTX here is `mma_bf16_16816` (mma.sync.aligned.m16n8k16.row.col
// .f32.bf16.bf16.f32). Under CUDA_EMU it has an emulated twin that produces
// the same per-lane fragment results from the PTX ISA fragment layouts,
// exchanging the warp's fragments through a per-warp scratch between two
// __syncwarp()s. Test: tests/mma_emu.rs (kernels/mma_selftest.cu).
//
// Fragment layouts (PTX ISA, m16n8k16 with .bf16; g = lane >> 2 ("groupID"),
// q = lane & 3 ("threadID_in_group"); each .b32 register holds two bf16, the
// lower-index element in the low 16 bits):
//   A 16x16 (row):  x[0] = A[g  ][2q, 2q+1]      x[1] = A[g+8][2q, 2q+1]
//                   x[2] = A[g  ][2q+8, 2q+9]    x[3] = A[g+8][2q+8, 2q+9]
//   B 16x8  (col):  x[0] = B[2q, 2q+1][g]        x[1] = B[2q+8, 2q+9][g]
//   C/D 16x8 f32:   x[0], x[1] = C[g][2q, 2q+1]  x[2], x[3] = C[g+8][2q, 2q+1]
//
// Consequence used everywhere ("C -> A reuse"): two adjacent C tiles
// (columns 16s..16s+7 and 16s+8..16s+15) of a 16-row matrix X, packed as
// (c0,c1), (c2,c3) of the first and then of the second tile, are exactly the
// A fragment of X's k-step s. No data moves between lanes.
//
// Precision: fp32 operands are split as x = hi + lo (hi = bf16(x),
// lo = bf16(x - hi)); `mma3` accumulates hi*hi + hi*lo + lo*hi, which keeps
// ~16 significant bits of every product (the dropped lo*lo term is ~2^-16
// relative) with fp32 accumulation.
#pragma once
#include "common.cuh"

struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  float x[4];
};

__device__ __forceinline__ int lane_id() { return (int)(threadIdx.x & 31); }

// ---- bf16 bit helpers (round to nearest even) -----------------------------
__device__ __forceinline__ uint32_t bf16_bits(float f) {
#ifdef CUDA_EMU
  return __float2bfloat16_rn(f).x;
#else
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#endif
}
__device__ __forceinline__ float bf16_bits_to_float(uint32_t b) {
#ifdef CUDA_EMU
  const uint32_t u = b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(b << 16);
#endif
}
// Splits x0, x1 into packed hi and lo bf16x2 registers (x0 in the low half).
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const uint32_t h0 = bf16_bits(x0), h1 = bf16_bits(x1);
  const uint32_t l0 = bf16_bits(x0 - bf16_bits_to_float(h0));
  const uint32_t l1 = bf16_bits(x1 - bf16_bits_to_float(h1));
  hi = h0 | (h1 << 16);
  lo = l0 | (l1 << 16);
}

// ---- the one PTX instruction ----------------------------------------------
#ifdef CUDA_EMU
namespace emu_mma {
// Per-warp exchange area (one block is alive at a time under the emulator).
struct Scratch {
  float a[16][16];
  float b[16][8];
};
inline Scratch g_scratch[32];
inline int warp_index() {
  const int t = (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  return t >> 5;
}
}  // namespace emu_mma
#endif

// D = A * B + C, A 16x16 bf16 (row), B 16x8 bf16 (col), C/D 16x8 f32.
__device__ __forceinline__ void mma_bf16_16816(FragC& d, const FragA& a, const FragB& b) {
#ifdef CUDA_EMU
  const ::emu::MuteScope mute;  // counting build: scratch traffic is not a GPU access
  emu_mma::Scratch& s = emu_mma::g_scratch[emu_mma::warp_index()];
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
  // scatter this lane's fragments into the full matrices (PTX ISA layout)
  for (int r = 0; r < 4; ++r) {
    const int row = g + ((r & 1) ? 8 : 0), col = 2 * q + ((r & 2) ? 8 : 0);
    s.a[row][col] = bf16_bits_to_float(a.x[r] & 0xffffu);
    s.a[row][col + 1] = bf16_bits_to_float(a.x[r] >> 16);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * q + (r ? 8 : 0);
    s.b[k][g] = bf16_bits_to_float(b.x[r] & 0xffffu);
    s.b[k + 1][g] = bf16_bits_to_float(b.x[r] >> 16);
  }
  ::emu::mma_sync_point(1);  // emulator counters: 1 mma
  for (int e = 0; e < 4; ++e) {
    const int row = g + ((e & 2) ? 8 : 0), col = 2 * q + (e & 1);
    float acc = d.x[e];
    for (int k = 0; k < 16; ++k) acc += s.a[row][k] * s.b[k][col];
    d.x[e] = acc;
  }
  ::emu::mma_sync_point(0);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
#endif
}

// ---- fragment builders (plain loads, no PTX) ------------------------------
// f(i, j) returns the fp32 element of the 16x16 A tile / 16x8 B tile.
template <class F>
__device__ __forceinline__ void load_a_split(F f, FragA& hi, FragA& lo) {
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = g + ((r & 1) ? 8 : 0), col = 2 * q + ((r & 2) ? 8 : 0);
    split2(f(row, col), f(row, col + 1), hi.x[r], lo.x[r]);
  }
}
template <class F>
__device__ __forceinline__ void load_b_split(F f, FragB& hi, FragB& lo) {
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * q + (r ? 8 : 0);
    split2(f(k, g), f(k + 1, g), hi.x[r], lo.x[r]);
  }
}
// A fragment of k-step s from C tiles c0 (columns 16s..+7) and c1 (16s+8..+15).
__device__ __forceinline__ void c_to_a_split(const FragC& c0, const FragC& c1, FragA& hi,
                                             FragA& lo) {
  split2(c0.x[0], c0.x[1], hi.x[0], lo.x[0]);
  split2(c0.x[2], c0.x[3], hi.x[1], lo.x[1]);
  split2(c1.x[0], c1.x[1], hi.x[2], lo.x[2]);
  split2(c1.x[2], c1.x[3], hi.x[3], lo.x[3]);
}
// Visits the four elements of a C tile: f(e, row, col, value&).
template <class F>
__device__ __forceinline__ void c_foreach(FragC& c, F f) {
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int e = 0; e < 4; ++e) f(g + ((e & 2) ? 8 : 0), 2 * q + (e & 1), c.x[e]);
}
__device__ __forceinline__ void c_zero(FragC& c) { c.x[0] = c.x[1] = c.x[2] = c.x[3] = 0.f; }

// d += A * B with A = ah + al, B = bh + bl (three bf16 MMAs, small terms first).
// Emulated twin: the same three products in the same order, from one
// exchange of the four fragments (a third of the warp barriers of three
// separate emulated MMAs; tests/mma_emu.rs checks it against a matmul).
__device__ __forceinline__ void mma3(FragC& d, const FragA& ah, const FragA& al, const FragB& bh,
                                     const FragB& bl) {
#ifdef CUDA_EMU
  struct Pair {
    float a[2][16][16];  // hi, lo
    float b[2][16][8];
  };
  const ::emu::MuteScope mute;  // counting build: scratch traffic is not a GPU access
  static Pair g_pair[32];
  Pair& s = g_pair[emu_mma::warp_index()];
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
  const FragA* A[2] = {&ah, &al};
  const FragB* B[2] = {&bh, &bl};
  for (int h = 0; h < 2; ++h) {
    for (int r = 0; r < 4; ++r) {
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * q + ((r & 2) ? 8 : 0);
      s.a[h][row][col] = bf16_bits_to_float(A[h]->x[r] & 0xffffu);
      s.a[h][row][col + 1] = bf16_bits_to_float(A[h]->x[r] >> 16);
    }
    for (int r = 0; r < 2; ++r) {
      const int k = 2 * q + (r ? 8 : 0);
      s.b[h][k][g] = bf16_bits_to_float(B[h]->x[r] & 0xffffu);
      s.b[h][k + 1][g] = bf16_bits_to_float(B[h]->x[r] >> 16);
    }
  }
  ::emu::mma_sync_point(3);  // emulator counters: 3 mma
  const int order[3][2] = {{1, 0}, {0, 1}, {0, 0}};  // (A part, B part): lo*hi, hi*lo, hi*hi
  for (int e = 0; e < 4; ++e) {
    const int row = g + ((e & 2) ? 8 : 0), col = 2 * q + (e & 1);
    float acc = d.x[e];
    for (int m = 0; m < 3; ++m) {
      const int ia = order[m][0], ib = order[m][1];
      for (int k = 0; k < 16; ++k) acc += s.a[ia][row][k] * s.b[ib][k][col];
    }
    d.x[e] = acc;
  }
  ::emu::mma_sync_point(0);
#else
  mma_bf16_16816(d, al, bh);
  mma_bf16_16816(d, ah, bl);
  mma_bf16_16816(d, ah, bh);
#endif
}

// ---- v3 additions: single-pass products, ldmatrix, cp.async ----------------
// Each wrapper has an emulated twin (CUDA_EMU) producing the same per-lane
// registers from the PTX ISA layouts; tests/mma_emu.rs and the v3 tests run
// them.

// d += A * B, one bf16 MMA (operands already bf16: "single" precision).
__device__ __forceinline__ void mma1(FragC& d, const FragA& a, const FragB& b) {
  mma_bf16_16816(d, a, b);
}
// d += (ah + al) * b: the B operand is exactly bf16 (or kept single).
__device__ __forceinline__ void mma2a(FragC& d, const FragA& ah, const FragA& al, const FragB& b) {
  mma_bf16_16816(d, al, b);
  mma_bf16_16816(d, ah, b);
}
// d += a * (bh + bl): the A operand is exactly bf16 (or kept single).
__device__ __forceinline__ void mma2b(FragC& d, const FragA& a, const FragB& bh, const FragB& bl) {
  mma_bf16_16816(d, a, bl);
  mma_bf16_16816(d, a, bh);
}
#ifdef CUDA_EMU
namespace emu_mma {
// Per-warp rows of an emulated ldmatrix: row i (16 bytes) from lane i.
struct Rows {
  uint16_t h[32][8];
};
inline Rows g_rows[32];
}  // namespace emu_mma
#endif

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives the address
// of row (l & 7) of 8x8 matrix (l >> 3); register m of every lane receives
// matrix m's elements (row lane/4, columns 2(lane%4), +1) — or, with .trans,
// (rows 2(lane%4), +1; column lane/4). Rows are 16 bytes, 16-byte aligned.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* row) {
#ifdef CUDA_EMU
  // one 16-byte shared load per lane (the counting build sees the real
  // access pattern: 4 phases of 8 rows), then a muted exchange
  const unsigned __int128 bits = *(const unsigned __int128*)row;
  const ::emu::MuteScope mute;
  emu_mma::Rows& s = emu_mma::g_rows[emu_mma::warp_index()];
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
  std::memcpy(s.h[lane], &bits, 16);
  ::emu::mma_sync_point(0);
  for (int m = 0; m < 4; ++m) {
    uint32_t lo, hi;
    if (TRANS) {
      lo = s.h[8 * m + 2 * q][g];
      hi = s.h[8 * m + 2 * q + 1][g];
    } else {
      lo = s.h[8 * m + g][2 * q];
      hi = s.h[8 * m + g][2 * q + 1];
    }
    r[m] = lo | (hi << 16);
  }
  ::emu::mma_sync_point(0);
#else
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// cp.async.cg.shared.global (16 bytes) and its group commit / wait. The
// emulated twin copies at once (the wait is then a no-op).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef CUDA_EMU
  // host buffers need not be 16-byte aligned: an unaligned 16-byte access
  typedef unsigned __int128 u128 __attribute__((aligned(1)));
  *(u128*)smem = *(const u128*)gmem;
#else
  const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem));
#endif
}
// A 16-byte copy (one vector load and one vector store) and a 16-byte zero.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#ifdef CUDA_EMU
  typedef unsigned __int128 u128 __attribute__((aligned(1)));
  *(u128*)dst = *(const u128*)src;
#else
  *(uint4*)dst = *(const uint4*)src;
#endif
}
__device__ __forceinline__ void zero16(void* dst) {
#ifdef CUDA_EMU
  typedef unsigned __int128 u128 __attribute__((aligned(1)));
  *(u128*)dst = 0;
#else
  *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef CUDA_EMU
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#ifndef CUDA_EMU
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}
