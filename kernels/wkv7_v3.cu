// kernels/wkv7_v3.cu — WKV-7 forward and backward, version 3: v2's chunked
// closed form (16-token chunks, bf16 mma.sync, fp32 accumulation and state)
// rebuilt around its measured costs (docs/kernels-v3.md):
//   * every operand is built ONCE per chunk, by a column pass, as a bf16 tile
//     (hi, and lo where the split is kept) in shared memory, XOR-swizzled by
//     16-byte chunks, and read with ldmatrix (no bank conflicts, no per-warp
//     re-splitting);
//   * precision is a template switch: SPLIT = false ("v3", the default) keeps
//     the 3-term hi/lo split only on the state path (S, dS, so h_t and dh0)
//     and uses one bf16 MMA where a product only feeds a bf16 output; with
//     bf16 I/O, v and dy are exact bf16, so their products need no A-side
//     split at all. SPLIT = true ("v3x") splits every operand that is at hand
//     as hi/lo;
//   * the forward stages chunk c+1's inputs with cp.async (16-byte copies)
//     while chunk c's matrices and value side run: 3 barriers per chunk;
//   * the forward saves each chunk's start state as bf16 (8 KB per chunk at
//     N = 64, half of v2's fp32 bytes) in `ckpt` ([B, H, ceil(T/16), N, N]
//     bf16); the backward needs S0 only in products that feed bf16 outputs
//     (dS, hence dh0, does not depend on S0), so it loads it into a tile with
//     cp.async and never recomputes states. The final state h_t is the fp32
//     register state;
//   * the backward's key-side gradients run in three passes (dr/da, dk, db);
//     the time contractions there use hi + lo of the matrix gradients and of
//     the decay-scaled keys (dw is sensitive to them: docs/kernels-v3.md);
//   * fast reciprocal (__fdividef) in the column pass, __restrict__, paired
//     (4- / 8-byte) stores of the gradients and states.
// bf16 I/O only (the fast path); f32 I/O runs v2 (src/wkv7/v3.rs). The
// input, dy and ckpt buffers must be 16-byte aligned (16-byte copies; the
// host launch checks).
//
// Notation as in kernels/wkv7_v2.cu: per chunk of L = 16 tokens,
//   P_t = prod_{u<=t} w_u,  q~ = r P_t,  a~ = a P_{t-1},  k~ = k / P_t,
//   b~ = b / P_t,  k^ = k~ P_L,  b^ = b~ P_L
//   M_ab = stril(A~ B~^T)  M_ak = stril(A~ K~^T)  M_qk = tril(Q~ K~^T)
//   M_qb = tril(Q~ B~^T)   Inv = (I - M_ab)^-1
//   R^T = S0 A~^T + V^T M_ak^T,  U^T = R^T Inv^T
//   Y^T = S0 Q~^T + V^T M_qk^T + U^T M_qb^T,  S_L = S0 diag(P_L) + V^T K^ + U^T B^
//
// Block: NN/16 warps (warp w owns state rows 16w..16w+15 and, in the
// backward's key phase, key columns 16w..16w+15); grid (H, B); NN = 32 or 64.
#include "mma.cuh"

#ifndef WKV7_V3_BWD_CTAS
#define WKV7_V3_BWD_CTAS 4  // backward CTAs per SM the registers are bounded for (<= 128)
#endif

namespace wkv7v3 {

constexpr int L = 16;

// Element offset of (r, c) in a [rows][W] bf16 tile whose 16-byte chunks are
// XOR-swizzled so that 8 consecutive rows of one chunk column hit 8 distinct
// bank quads (ldmatrix and column-wise scalar access are conflict-free).
template <int W>
__device__ __forceinline__ int swz(int r, int c) {
  constexpr int CH = W / 8;
  constexpr int SH = CH >= 8 ? 0 : (CH == 4 ? 1 : 2);
  const int ch = (c >> 3) ^ ((r >> SH) & (CH - 1));
  return r * W + (ch << 3) + (c & 7);
}

template <int NN>
struct alignas(16) Tile {
  bf16 e[L * NN];  // [t][j], swizzled
};
struct alignas(16) Mat {
  bf16 e[L * L];  // [t][u], swizzled
};

__device__ __forceinline__ bf16 to_bf(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float bf_f(bf16 x) { return __bfloat162float(x); }

template <int W>
__device__ __forceinline__ void put(bf16* t, int r, int c, float x) {
  t[swz<W>(r, c)] = to_bf(x);
}
template <int W>
__device__ __forceinline__ void put2(bf16* hi, bf16* lo, int r, int c, float x) {
  const bf16 h = to_bf(x);
  hi[swz<W>(r, c)] = h;
  lo[swz<W>(r, c)] = to_bf(x - bf_f(h));
}

// ---- ldmatrix addressing (16 x 16 blocks) ----------------------------------
// The lane index re-read at each use: the per-lane ldmatrix offsets are then
// recomputed next to their load (a few integer instructions) instead of being
// hoisted out of the chunk loop, where dozens of them would hold registers.
__device__ __forceinline__ int fresh_lane() {
#ifdef CUDA_EMU
  return lane_id();
#else
  int l;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
#endif
}
__device__ __forceinline__ int fresh_tid() {
#ifdef CUDA_EMU
  return (int)threadIdx.x;
#else
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
#endif
}

// A operand (rows i, columns k) from a row-major tile.
template <int W, bool F = false>
__device__ __forceinline__ FragA lda(const bf16* t, int r0, int c0) {
  const int l = F ? fresh_lane() : lane_id();
  FragA a;
  ldsm_x4<false>(a.x, t + swz<W>(r0 + (l & 15), c0 + ((l >> 4) << 3)));
  return a;
}
// A operand from a tile that stores A^T (rows k, columns i).
template <int W, bool F = false>
__device__ __forceinline__ FragA lda_t(const bf16* t, int k0, int i0) {
  const int l = F ? fresh_lane() : lane_id();
  FragA a;
  ldsm_x4<true>(a.x, t + swz<W>(k0 + (l & 7) + ((l >> 4) << 3), i0 + (((l >> 3) & 1) << 3)));
  return a;
}
// Two B operands (n-tiles n0..n0+7 and n0+8..n0+15, k = k0..k0+15) from a
// tile that stores B^T (rows n, columns k).
template <int W, bool F = false>
__device__ __forceinline__ void ldb(const bf16* t, int n0, int k0, FragB& b0, FragB& b1) {
  const int l = F ? fresh_lane() : lane_id();
  uint32_t r[4];
  ldsm_x4<false>(r, t + swz<W>(n0 + (l & 7) + ((l >> 4) << 3), k0 + (((l >> 3) & 1) << 3)));
  b0.x[0] = r[0];
  b0.x[1] = r[1];
  b1.x[0] = r[2];
  b1.x[1] = r[3];
}
// Two B operands from a tile that stores B (rows k, columns n).
template <int W, bool F = false>
__device__ __forceinline__ void ldb_t(const bf16* t, int k0, int n0, FragB& b0, FragB& b1) {
  const int l = F ? fresh_lane() : lane_id();
  uint32_t r[4];
  ldsm_x4<true>(r, t + swz<W>(k0 + (l & 7) + (((l >> 3) & 1) << 3), n0 + ((l >> 4) << 3)));
  b0.x[0] = r[0];
  b0.x[1] = r[1];
  b1.x[0] = r[2];
  b1.x[1] = r[3];
}

// d += (A_h [+ A_l]) (B_h [+ B_l]): which operands are split is a compile-time
// choice (AS, BS); the unused lo arguments are not read.
template <bool AS, bool BS>
__device__ __forceinline__ void mm(FragC& d, const FragA& ah, const FragA& al, const FragB& bh,
                                   const FragB& bl) {
  if (AS && BS)
    mma3(d, ah, al, bh, bl);
  else if (AS)
    mma2a(d, ah, al, bh);
  else if (BS)
    mma2b(d, ah, bh, bl);
  else
    mma1(d, ah, bh);
}

// ---- the key side of one chunk ---------------------------------------------
// Tiles of one chunk (null = not kept in this kernel / scheme).
template <int NN>
struct Keys {
  bf16 *ah, *al, *bh, *bl, *kh, *kl, *qh, *ql, *khh, *khl, *bhh, *bhl, *v, *dy;
  bf16 *mak_h, *mak_l, *mqk_h, *mqk_l, *mqb_h, *mqb_l, *inv_h, *inv_l;
  float* mab;  // [L][L + 1] fp32 (M_ab for the inverse)
  float* P;    // [L][NN + 8] fp32 (rows padded) or null
  float* PL;   // [NN]
};

// Input x of r w k v a b dy (0..6), without an indexed local array.
__device__ __forceinline__ const bf16* input(const Wkv7Params& p, int x) {
  const void* q = x == 0 ? p.r : x == 1 ? p.w : x == 2 ? p.k : x == 3 ? p.v : x == 4 ? p.a
                : x == 5 ? p.b : p.dy;
  return (const bf16*)q;
}

// Raw inputs of one chunk: [6 or 7][L][NN] bf16 (r w k v a b [dy]).
template <int NN, int NX>
struct alignas(16) Stage {
  bf16 x[NX][L][NN];
};

// Issues the cp.async copies of chunk t0's inputs into `st` (identity
// padding past T written directly). NX = 6 (forward) or 7 (with dy).
template <int NN, int NX, int NT>
__device__ __forceinline__ void stage_chunk(const Wkv7Params& p, Stage<NN, NX>& st, int t0,
                                            int tid) {
  constexpr int CHN = NN / 8;
  const int b = blockIdx.y, h = blockIdx.x;
  for (int idx = tid; idx < NX * L * CHN; idx += NT) {
    const int x = idx / (L * CHN), t = (idx / CHN) % L, c = idx % CHN, tt = t0 + t;
    bf16* dst = &st.x[x][t][c * 8];
    if (tt < p.T) {
      cp_async16(dst, input(p, x) + (((long)b * p.T + tt) * p.H + h) * NN + c * 8);
    } else {
      const bf16 f = to_bf(x == 1 ? 1.f : 0.f);
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = f;
    }
  }
}

// Column pass, on column pairs (4-byte accesses): warp 0 (threads j <
// NN/2, columns 2j, 2j+1) builds the scaled tiles and P; the threads of the
// other warps copy v (and dy) into their tiles in 16-byte pieces. `st` =
// staged inputs, or null to read global memory (identity past T).
template <int NN>
__device__ __forceinline__ void put2x(bf16* hi, bf16* lo, int r, int c, float x0, float x1) {
  const uint32_t h0 = bf16_bits(x0), h1 = bf16_bits(x1);
  *(uint32_t*)&hi[swz<NN>(r, c)] = h0 | (h1 << 16);
  if (lo)
    *(uint32_t*)&lo[swz<NN>(r, c)] =
        bf16_bits(x0 - bf16_bits_to_float(h0)) | (bf16_bits(x1 - bf16_bits_to_float(h1)) << 16);
}
template <int NN, int NX, int NT>
__device__ __forceinline__ void column_pass(const Wkv7Params& p, const Keys<NN>& K,
                                            const Stage<NN, NX>* st, int t0, int tid) {
  static_assert(NT >= 64 && NN <= 64, "column pass: warp 0 plus copy threads");
  // callers pass fresh_tid(): the offsets are recomputed here, not hoisted
  const int b = blockIdx.y, h = blockIdx.x;
  const long row0 = ((long)b * p.T + t0) * p.H + h;  // global row of token t0
  auto in2 = [&](int x, int t, int j) -> float2 {
    uint32_t u;
    if (st) {
      u = *(const uint32_t*)&st->x[x][t][j];
    } else {
      if (t0 + t >= p.T) return x == 1 ? make_float2(1.f, 1.f) : make_float2(0.f, 0.f);
      u = *(const uint32_t*)&input(p, x)[(row0 + (long)t * p.H) * NN + j];
    }
    return make_float2(bf16_bits_to_float(u & 0xffffu), bf16_bits_to_float(u >> 16));
  };
  if (tid < NN / 2) {
    const int j = 2 * tid;
    float P0 = 1.f, P1 = 1.f;
#pragma unroll
    for (int t = 0; t < L; ++t) {
      const float Pm0 = P0, Pm1 = P1;
      const float2 w = in2(1, t, j), k = in2(2, t, j), a = in2(4, t, j), bb = in2(5, t, j);
      P0 *= w.x;
      P1 *= w.y;
      const float i0 = __fdividef(1.f, P0), i1 = __fdividef(1.f, P1);
      put2x<NN>(K.ah, K.al, t, j, a.x * Pm0, a.y * Pm1);
      put2x<NN>(K.bh, K.bl, t, j, bb.x * i0, bb.y * i1);
      put2x<NN>(K.kh, K.kl, t, j, k.x * i0, k.y * i1);
      if (K.qh) {
        const float2 r = in2(0, t, j);
        put2x<NN>(K.qh, K.ql, t, j, r.x * P0, r.y * P1);
      }
      if (K.P) *(float2*)&K.P[t * (NN + 8) + j] = make_float2(P0, P1);
    }
    *(float2*)&K.PL[j] = make_float2(P0, P1);
    // k^ = k~ P_L, b^ = b~ P_L from the k~, b~ (hi + lo) this thread wrote
    // (about 16 bits, as much as the split keeps): no per-column arrays
    const float L0 = P0, L1 = P1;
#pragma unroll
    for (int t = 0; t < L; ++t) {
      auto back = [&](const bf16* hi, const bf16* lo) -> float2 {
        const uint32_t h = *(const uint32_t*)&hi[swz<NN>(t, j)];
        const uint32_t l = lo ? *(const uint32_t*)&lo[swz<NN>(t, j)] : 0u;
        return make_float2(bf16_bits_to_float(h & 0xffffu) + bf16_bits_to_float(l & 0xffffu),
                           bf16_bits_to_float(h >> 16) + bf16_bits_to_float(l >> 16));
      };
      const float2 k = back(K.kh, K.kl), bb = back(K.bh, K.bl);
      put2x<NN>(K.khh, K.khl, t, j, k.x * L0, k.y * L1);
      put2x<NN>(K.bhh, K.bhl, t, j, bb.x * L0, bb.y * L1);
    }
  } else if (tid >= 32) {  // the copy threads (warp 0 does the columns)
    constexpr int CHN = NN / 8;  // 16-byte pieces per row
    constexpr int C0 = 32, NC = NT - C0;
    const int nx = K.dy ? 2 : 1;
    for (int i = tid - C0; i < nx * L * CHN; i += NC) {
      const int x = i / (L * CHN), t = (i / CHN) % L, c = (i % CHN) * 8;
      bf16* dst = (x ? K.dy : K.v) + swz<NN>(t, c);
      if (st)
        copy16(dst, &st->x[x ? 6 : 3][t][c]);
      else if (t0 + t < p.T)
        copy16(dst, &input(p, x ? 6 : 3)[(row0 + (long)t * p.H) * NN + c]);
      else
        zero16(dst);
    }
  }
}

// acc = X Y^T for X, Y [L][NN] tiles (hi, and lo when XS / YS).
template <int NN, bool XS, bool YS, bool F>
__device__ __forceinline__ void xyt(const bf16* xh, const bf16* xl, const bf16* yh, const bf16* yl,
                                    FragC (&acc)[2]) {
  c_zero(acc[0]);
  c_zero(acc[1]);
#pragma unroll 1
  for (int ks = 0; ks < NN / 16; ++ks) {
    const FragA ah = lda<NN, F>(xh, 0, 16 * ks);
    FragA al = ah;
    if (XS) al = lda<NN, F>(xl, 0, 16 * ks);
    FragB bh[2], bl[2];
    ldb<NN, F>(yh, 0, 16 * ks, bh[0], bh[1]);
    bl[0] = bh[0];
    bl[1] = bh[1];
    if (YS) ldb<NN, F>(yl, 0, 16 * ks, bl[0], bl[1]);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) mm<XS, YS>(acc[nt], ah, al, bh[nt], bl[nt]);
  }
}
// c_foreach with the lane index re-read (see fresh_lane).
template <class Fn>
__device__ __forceinline__ void c_foreach_f(FragC& c, Fn f) {
  const int lane = fresh_lane(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int e = 0; e < 4; ++e) f(g + ((e & 2) ? 8 : 0), 2 * q + (e & 1), c.x[e]);
}

// Writes a masked 16 x 16 C pair into a Mat (hi, and lo when given).
__device__ __forceinline__ void put_mat(FragC (&acc)[2], bf16* hi, bf16* lo, bool strict) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
    c_foreach_f(acc[nt], [&](int t, int col, float& x) {
      const int u = nt * 8 + col;
      const float v = (strict ? u < t : u <= t) ? x : 0.f;
      if (lo) put2<L>(hi, lo, t, u, v); else put<L>(hi, t, u, v);
    });
}

// The chunk matrices (warp m builds matrix m, m += NW; `nmat` = 2 builds
// only M_ab and M_ak, for a state-only recompute) and Inv (warp 0).
// SPLIT: the v3x scheme; QB_SPLIT: M_qb feeds dS (backward) and keeps its lo part.
template <int NN, int NW, bool SPLIT, bool QB_SPLIT, bool F>
__device__ __forceinline__ void matrices(const Keys<NN>& K, int warp, int lane, int nmat) {
  for (int m = warp; m < nmat; m += NW) {
    FragC acc[2];
    if (m == 0) {
      xyt<NN, true, true, F>(K.ah, K.al, K.bh, K.bl, acc);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        c_foreach(acc[nt], [&](int t, int col, float& x) {
          const int u = nt * 8 + col;
          K.mab[t * (L + 1) + u] = u < t ? x : 0.f;
        });
    } else if (m == 1) {
      xyt<NN, true, true, F>(K.ah, K.al, K.kh, K.kl, acc);
      put_mat(acc, K.mak_h, K.mak_l, true);
    } else if (m == 2) {
      if (SPLIT)
        xyt<NN, true, true, F>(K.qh, K.ql, K.kh, K.kl, acc);
      else
        xyt<NN, false, false, F>(K.qh, K.qh, K.kh, K.kh, acc);
      put_mat(acc, K.mqk_h, K.mqk_l, false);
    } else {
      if (SPLIT || QB_SPLIT)
        xyt<NN, true, true, F>(K.qh, K.ql, K.bh, K.bl, acc);
      else
        xyt<NN, false, false, F>(K.qh, K.qh, K.bh, K.bh, acc);
      put_mat(acc, K.mqb_h, K.mqb_l, false);
    }
  }
  if (warp == 0) {
    __syncwarp();
    if (lane < L) {
      float x[L];  // column `lane` of (I - M_ab)^-1
      tri_inverse_column<L>([&](int t, int u) { return K.mab[t * (L + 1) + u]; }, lane, x);
#pragma unroll
      for (int t = 0; t < L; ++t) put2<L>(K.inv_h, K.inv_l, t, lane, x[t]);
    }
  }
}

// One chunk of the state recurrence for warp rows vb.. (state S in C tiles):
// R, U, then S <- S diag(P_L) + V^T K^ + U^T B^. With `Yc`, also the output
// Y^T (forward). Returns U (C tiles) in `U`.
template <int NN, bool SPLIT, bool WITH_Y, bool F>
__device__ __forceinline__ void state_chunk(const Keys<NN>& K, FragC (&S)[NN / 8], int vb,
                                            FragC (&U)[2], FragC (&Yc)[2]) {
  FragC R[2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    c_zero(R[nt]);
    c_zero(U[nt]);
    if (WITH_Y) c_zero(Yc[nt]);
  }
#pragma unroll
  for (int ks = 0; ks < NN / 16; ++ks) {
    FragA sh, sl;
    c_to_a_split(S[2 * ks], S[2 * ks + 1], sh, sl);
    FragB bh[2], bl[2];
    ldb<NN, F>(K.ah, 0, 16 * ks, bh[0], bh[1]);
    ldb<NN, F>(K.al, 0, 16 * ks, bl[0], bl[1]);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) mma3(R[nt], sh, sl, bh[nt], bl[nt]);
    if (WITH_Y) {
      ldb<NN, F>(K.qh, 0, 16 * ks, bh[0], bh[1]);
      if (SPLIT) ldb<NN, F>(K.ql, 0, 16 * ks, bl[0], bl[1]);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        mm<SPLIT, SPLIT>(Yc[nt], sh, sl, bh[nt], bl[nt]);
    }
  }
  const FragA vt = lda_t<NN, F>(K.v, 0, vb);  // V^T rows vb..: exact bf16
  {
    FragB bh[2], bl[2];
    ldb<L, F>(K.mak_h, 0, 0, bh[0], bh[1]);
    ldb<L, F>(K.mak_l, 0, 0, bl[0], bl[1]);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) mma2b(R[nt], vt, bh[nt], bl[nt]);
    if (WITH_Y) {
      ldb<L, F>(K.mqk_h, 0, 0, bh[0], bh[1]);
      if (SPLIT) ldb<L, F>(K.mqk_l, 0, 0, bl[0], bl[1]);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) mm<false, SPLIT>(Yc[nt], vt, vt, bh[nt], bl[nt]);
    }
  }
  FragA uh, ul;
  {
    FragA rh, rl;
    c_to_a_split(R[0], R[1], rh, rl);
    FragB bh[2], bl[2];
    ldb<L, F>(K.inv_h, 0, 0, bh[0], bh[1]);
    ldb<L, F>(K.inv_l, 0, 0, bl[0], bl[1]);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) mma3(U[nt], rh, rl, bh[nt], bl[nt]);
    c_to_a_split(U[0], U[1], uh, ul);
    if (WITH_Y) {
      ldb<L, F>(K.mqb_h, 0, 0, bh[0], bh[1]);
      if (SPLIT) ldb<L, F>(K.mqb_l, 0, 0, bl[0], bl[1]);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        mm<SPLIT, SPLIT>(Yc[nt], uh, ul, bh[nt], bl[nt]);
    }
  }
  // S_L = S0 diag(P_L) + V^T K^ + U^T B^
#pragma unroll
  for (int kp = 0; kp < NN / 16; ++kp) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int kt = 2 * kp + h2;
      const float2 pl = *(const float2*)&K.PL[kt * 8 + 2 * (lane_id() & 3)];
      S[kt].x[0] *= pl.x;
      S[kt].x[1] *= pl.y;
      S[kt].x[2] *= pl.x;
      S[kt].x[3] *= pl.y;
    }
    FragB bh[2], bl[2];
    ldb_t<NN, F>(K.khh, 0, 16 * kp, bh[0], bh[1]);
    ldb_t<NN, F>(K.khl, 0, 16 * kp, bl[0], bl[1]);
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) mma2b(S[2 * kp + h2], vt, bh[h2], bl[h2]);
    ldb_t<NN, F>(K.bhh, 0, 16 * kp, bh[0], bh[1]);
    ldb_t<NN, F>(K.bhl, 0, 16 * kp, bl[0], bl[1]);
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) mma3(S[2 * kp + h2], uh, ul, bh[h2], bl[h2]);
  }
}

// Loads a [NN][NN] fp32 state (rows vb.. of this warp) into C tiles.
template <int NN>
__device__ __forceinline__ void load_state(const float* __restrict__ src, FragC (&S)[NN / 8],
                                           int vb) {
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt) {
    if (!src) {
      c_zero(S[kt]);
      continue;
    }
    const float2 a = *(const float2*)&src[(vb + g) * NN + kt * 8 + 2 * q];
    const float2 c = *(const float2*)&src[(vb + g + 8) * NN + kt * 8 + 2 * q];
    S[kt].x[0] = a.x;
    S[kt].x[1] = a.y;
    S[kt].x[2] = c.x;
    S[kt].x[3] = c.y;
  }
}
template <int NN>
__device__ __forceinline__ void store_state(float* __restrict__ dst, const FragC (&S)[NN / 8],
                                            int vb) {
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt) {
    *(float2*)&dst[(vb + g) * NN + kt * 8 + 2 * q] = make_float2(S[kt].x[0], S[kt].x[1]);
    *(float2*)&dst[(vb + g + 8) * NN + kt * 8 + 2 * q] = make_float2(S[kt].x[2], S[kt].x[3]);
  }
}
// Writes C tiles (rows vb..) as a bf16 [NN][NN] tile (hi only).
template <int NN>
__device__ __forceinline__ void state_to_tile(bf16* dst, const FragC (&S)[NN / 8], int vb) {
  const int lane = fresh_lane(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt) {
    const int c = kt * 8 + 2 * q;
    *(uint32_t*)&dst[swz<NN>(vb + g, c)] = bf16_bits(S[kt].x[0]) | (bf16_bits(S[kt].x[1]) << 16);
    *(uint32_t*)&dst[swz<NN>(vb + g + 8, c)] =
        bf16_bits(S[kt].x[2]) | (bf16_bits(S[kt].x[3]) << 16);
  }
}

// Writes C tiles (rows vb..) as a bf16 [NN][NN] row-major state in global memory.
template <int NN>
__device__ __forceinline__ void state_to_global(bf16* __restrict__ dst, const FragC (&S)[NN / 8],
                                                int vb) {
  const int lane = lane_id(), g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt) {
    const int c = kt * 8 + 2 * q;
    *(uint32_t*)&dst[(vb + g) * NN + c] = bf16_bits(S[kt].x[0]) | (bf16_bits(S[kt].x[1]) << 16);
    *(uint32_t*)&dst[(vb + g + 8) * NN + c] = bf16_bits(S[kt].x[2]) | (bf16_bits(S[kt].x[3]) << 16);
  }
}

// Stores the C tile pair of a [value][time] product as X[t][value] (rows vb..).
__device__ __forceinline__ void store_vt(const Wkv7Params& p, bf16* __restrict__ out,
                                         FragC (&C)[2], int t0, int vb, int NN) {
  const int b = blockIdx.y, h = blockIdx.x;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
    c_foreach_f(C[nt], [&](int r, int c, float& x) {
      const int t = t0 + nt * 8 + c;
      if (t < p.T) out[(((long)b * p.T + t) * p.H + h) * NN + vb + r] = to_bf(x);
    });
}

}  // namespace wkv7v3

// ---- forward ----------------------------------------------------------------
template <int NN, bool SPLIT>
struct alignas(16) Wkv7V3Fwd {
  wkv7v3::Tile<NN> ah, al, bh, bl, kh, kl, qh, ql, khh, khl, bhh, bhl, v;
  wkv7v3::Mat mak_h, mak_l, mqk_h, mqk_l, mqb_h, mqb_l, inv_h, inv_l;
  wkv7v3::Stage<NN, 6> st;
  float mab[wkv7v3::L * (wkv7v3::L + 1)];
  float PL[NN];
};

template <int NN, bool SPLIT>
__device__ void wkv7_fwd_v3(const Wkv7Params p) {
  using namespace wkv7v3;
  constexpr int NW = NN / 16, NT = NW * 32;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, vb = 16 * warp;
  const long bh = (long)b * p.H + h;
  bf16* __restrict__ y = (bf16*)p.y;

  __shared__ Wkv7V3Fwd<NN, SPLIT> s;
  const Keys<NN> K{s.ah.e, s.al.e, s.bh.e, s.bl.e, s.kh.e, s.kl.e, s.qh.e,
                   SPLIT ? s.ql.e : nullptr, s.khh.e, s.khl.e, s.bhh.e, s.bhl.e, s.v.e, nullptr,
                   s.mak_h.e, s.mak_l.e, s.mqk_h.e, SPLIT ? s.mqk_l.e : nullptr, s.mqb_h.e,
                   SPLIT ? s.mqb_l.e : nullptr, s.inv_h.e, s.inv_l.e, s.mab, nullptr, s.PL};

  FragC S[NN / 8];
  load_state<NN>(p.h0 ? p.h0 + bh * NN * NN : nullptr, S, vb);

  const int n_chunks = (p.T + L - 1) / L;
  stage_chunk<NN, 6, NT>(p, s.st, 0, tid);
  cp_async_commit();
  for (int ch = 0; ch < n_chunks; ++ch) {
    if (p.ckpt) state_to_global<NN>((bf16*)p.ckpt + (bh * n_chunks + ch) * NN * NN, S, vb);
    cp_async_wait_all();
    __syncthreads();  // chunk ch staged; chunk ch-1 done with the tiles
    column_pass<NN, 6, NT>(p, K, &s.st, ch * L, fresh_tid());
    __syncthreads();  // tiles built; the stage is free
    if (ch + 1 < n_chunks) stage_chunk<NN, 6, NT>(p, s.st, (ch + 1) * L, tid);
    cp_async_commit();
    matrices<NN, NW, SPLIT, false, true>(K, warp, lane, 4);
    __syncthreads();
    FragC U[2], Yc[2];
    state_chunk<NN, SPLIT, true, false>(K, S, vb, U, Yc);
    store_vt(p, y, Yc, ch * L, vb, NN);
  }
  if (p.h_t) store_state<NN>(p.h_t + bh * NN * NN, S, vb);
}

// ---- backward ---------------------------------------------------------------
// Shared memory (NN = 64: 50.5 KB, dynamic on the GPU): k^, b^ hold dS_L
// after the value side; the matrices' slots hold their gradients (hi, lo).
template <int NN>
struct alignas(16) Wkv7V3Bwd {
  wkv7v3::Tile<NN> ah, al, bh, bl, kh, kl, qh, ql, v, dy, u, dr;
  union {
    struct {
      wkv7v3::Tile<NN> khh, khl, bhh, bhl;
    } k;
    bf16 dsl[NN * NN];  // dS of the chunk end, [value][key] swizzled
  } o2;
  bf16 s0[NN * NN];  // S of the chunk start (bf16, from the forward), [value][key] swizzled
  wkv7v3::Mat m[8];  // mak_h mak_l mqk_h mqk_l mqb_h mqb_l inv_h inv_l / dM_{ab,ak,qk,qb} hi, lo
  union {
    float mab[wkv7v3::L * (wkv7v3::L + 1)];
    float tot[NN / 16][NN];  // per warp: sum over its rows of S0 * dS_L per key
  } o3;
  float P[wkv7v3::L][NN + 8];  // rows padded: the key side's float2 reads are conflict-free
  float PL[NN];
};

template <int NN, bool SPLIT>
__device__ void wkv7_bwd_v3(const Wkv7Params p) {
  using namespace wkv7v3;
  constexpr int NW = NN / 16, NT = NW * 32;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, vb = 16 * warp, kb = 16 * warp;
  const int T = p.T, H = p.H;
  const long bh = (long)b * H + h;

#ifdef CUDA_EMU
  __shared__ Wkv7V3Bwd<NN> s;  // the emulator: a static of any size
#else
  extern __shared__ __align__(16) unsigned char wkv7_v3_dyn[];
  Wkv7V3Bwd<NN>& s = *reinterpret_cast<Wkv7V3Bwd<NN>*>(wkv7_v3_dyn);
#endif
  const Keys<NN> K{s.ah.e, s.al.e, s.bh.e, s.bl.e, s.kh.e, s.kl.e, s.qh.e, s.ql.e,
                   s.o2.k.khh.e, SPLIT ? s.o2.k.khl.e : nullptr, s.o2.k.bhh.e, s.o2.k.bhl.e,
                   s.v.e, s.dy.e, s.m[0].e, s.m[1].e, s.m[2].e, SPLIT ? s.m[3].e : nullptr,
                   s.m[4].e, s.m[5].e, s.m[6].e, s.m[7].e, s.o3.mab, &s.P[0][0], s.PL};
  const Stage<NN, 7>* nost = nullptr;

  FragC dS[NN / 8];
  load_state<NN>(p.dh_t ? p.dh_t + bh * NN * NN : nullptr, dS, vb);

  const int n_chunks = (T + L - 1) / L;
  for (int ch = n_chunks - 1; ch >= 0; --ch) {
    {
      const int t0 = ch * L;
      __syncthreads();  // the previous chunk is done with every tile
      {  // S0 (bf16, saved by the forward) into its swizzled tile, while the column pass runs
        const bf16* src = (const bf16*)p.ckpt + (bh * n_chunks + ch) * NN * NN;
        for (int i = fresh_tid(); i < NN * NN / 8; i += NT) {
          const int r = i / (NN / 8), c = (i % (NN / 8)) * 8;
          cp_async16(&s.s0[swz<NN>(r, c)], src + r * NN + c);
        }
        cp_async_commit();
      }
      column_pass<NN, 7, NT>(p, K, nost, t0, fresh_tid());
      cp_async_wait_all();
      __syncthreads();
      matrices<NN, NW, SPLIT, true, true>(K, warp, lane, 4);
      __syncthreads();

      // ---- value side (rows vb..vb+15) ----
      {  // R^T = S0 A~^T + V^T M_ak^T, U^T = R^T Inv^T (output path) -> U tile;
         // per-key sums of S0 * dS_L over this warp's rows -> tot
        FragC R[2];
        c_zero(R[0]);
        c_zero(R[1]);
#pragma unroll
        for (int ks = 0; ks < NN / 16; ++ks) {
          const FragA s0 = lda<NN, true>(s.s0, vb, 16 * ks);  // S0 rows vb.. (bf16)
          // the A fragment holds the elements of dS's C tiles 2ks, 2ks+1
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int half = e >> 1, odd = e & 1;
            const FragC& d = dS[2 * ks + half];
            const uint32_t r0 = s0.x[2 * half], r1 = s0.x[2 * half + 1];  // rows g, g+8
            float x = bf16_bits_to_float(odd ? r0 >> 16 : r0 & 0xffffu) * d.x[odd] +
                      bf16_bits_to_float(odd ? r1 >> 16 : r1 & 0xffffu) * d.x[2 + odd];
            x += __shfl_xor_sync(0xffffffffu, x, 4);
            x += __shfl_xor_sync(0xffffffffu, x, 8);
            x += __shfl_xor_sync(0xffffffffu, x, 16);
            const int ln = fresh_lane();
            if ((ln >> 2) == 0) s.o3.tot[warp][16 * ks + 8 * half + 2 * (ln & 3) + odd] = x;  // M_ab is dead
          }
          FragB bh[2], bl[2];
          ldb<NN, true>(K.ah, 0, 16 * ks, bh[0], bh[1]);
          if (SPLIT) ldb<NN, true>(K.al, 0, 16 * ks, bl[0], bl[1]);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mm<false, SPLIT>(R[nt], s0, s0, bh[nt], bl[nt]);
        }
        FragB bh[2], bl[2];
        ldb<L, true>(K.mak_h, 0, 0, bh[0], bh[1]);
        if (SPLIT) ldb<L, true>(K.mak_l, 0, 0, bl[0], bl[1]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const FragA vt = lda_t<NN, true>(s.v.e, 0, vb);  // V^T rows vb.. (exact bf16)
          mm<false, SPLIT>(R[nt], vt, vt, bh[nt], bl[nt]);
        }
        FragA rh, rl;
        c_to_a_split(R[0], R[1], rh, rl);
        FragC U[2];
        c_zero(U[0]);
        c_zero(U[1]);
        ldb<L, true>(K.inv_h, 0, 0, bh[0], bh[1]);
        if (SPLIT) ldb<L, true>(K.inv_l, 0, 0, bl[0], bl[1]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
          mm<SPLIT, SPLIT>(U[nt], rh, rl, bh[nt], bl[nt]);
        // b~/k~ lo (o1) are dead since the matrices: U^T as a [t][value] tile
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
          c_foreach_f(U[nt], [&](int r, int c, float& x) { put<NN>(s.u.e, nt * 8 + c, vb + r, x); });
      }
      FragA drh, drl;
      {  // dU^T = dS B^ + dY^T M_qb, dR^T = dU^T Inv (state path) -> dR tile;
         // dV^T = dS K^ + dY^T M_qk + dR^T M_ak (output path) -> dv
        FragC dU[2], dV[2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          c_zero(dU[nt]);
          c_zero(dV[nt]);
        }
#pragma unroll
        for (int ks = 0; ks < NN / 16; ++ks) {
          FragA gh, gl;
          c_to_a_split(dS[2 * ks], dS[2 * ks + 1], gh, gl);
          FragB bh[2], bl[2];
          ldb<NN, true>(K.bhh, 0, 16 * ks, bh[0], bh[1]);
          ldb<NN, true>(K.bhl, 0, 16 * ks, bl[0], bl[1]);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma3(dU[nt], gh, gl, bh[nt], bl[nt]);
          ldb<NN, true>(K.khh, 0, 16 * ks, bh[0], bh[1]);
          if (SPLIT) ldb<NN, true>(K.khl, 0, 16 * ks, bl[0], bl[1]);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
            mm<SPLIT, SPLIT>(dV[nt], gh, gl, bh[nt], bl[nt]);
        }
        FragB bh[2], bl[2];
        ldb_t<L, true>(K.mqb_h, 0, 0, bh[0], bh[1]);
        ldb_t<L, true>(K.mqb_l, 0, 0, bl[0], bl[1]);
        const FragA yt = lda_t<NN, true>(s.dy.e, 0, vb);  // dY^T rows vb.. (exact bf16)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) mma2b(dU[nt], yt, bh[nt], bl[nt]);
        ldb_t<L, true>(K.mqk_h, 0, 0, bh[0], bh[1]);
        if (SPLIT) ldb_t<L, true>(K.mqk_l, 0, 0, bl[0], bl[1]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) mm<false, SPLIT>(dV[nt], yt, yt, bh[nt], bl[nt]);
        FragA duh, dul;
        c_to_a_split(dU[0], dU[1], duh, dul);
        FragC dR[2];
        c_zero(dR[0]);
        c_zero(dR[1]);
        ldb_t<L, true>(K.inv_h, 0, 0, bh[0], bh[1]);
        ldb_t<L, true>(K.inv_l, 0, 0, bl[0], bl[1]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) mma3(dR[nt], duh, dul, bh[nt], bl[nt]);
        c_to_a_split(dR[0], dR[1], drh, drl);
        ldb_t<L, true>(K.mak_h, 0, 0, bh[0], bh[1]);
        if (SPLIT) ldb_t<L, true>(K.mak_l, 0, 0, bl[0], bl[1]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
          mm<SPLIT, SPLIT>(dV[nt], drh, drl, bh[nt], bl[nt]);
        store_vt(p, (bf16*)p.dv, dV, t0, vb, NN);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
          c_foreach_f(dR[nt], [&](int r, int c, float& x) { put<NN>(s.dr.e, nt * 8 + c, vb + r, x); });
      }
      __syncthreads();  // all warps done with k^, b^ (o2)
      state_to_tile<NN>(s.o2.dsl, dS, vb);  // dS_L as a [value][key] tile
      // dS_0 = dS_L diag(P_L) + dY^T Q~ + dR^T A~ (state path)
      const FragA yt = lda_t<NN, true>(s.dy.e, 0, vb);  // dY^T rows vb.. (exact bf16)
#pragma unroll
      for (int kp = 0; kp < NN / 16; ++kp) {
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const int kt = 2 * kp + h2;
          const float2 pl = *(const float2*)&s.PL[kt * 8 + 2 * (fresh_lane() & 3)];
          dS[kt].x[0] *= pl.x;
          dS[kt].x[1] *= pl.y;
          dS[kt].x[2] *= pl.x;
          dS[kt].x[3] *= pl.y;
        }
        FragB bh[2], bl[2];
        ldb_t<NN, true>(s.qh.e, 0, 16 * kp, bh[0], bh[1]);
        ldb_t<NN, true>(s.ql.e, 0, 16 * kp, bl[0], bl[1]);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) mma2b(dS[2 * kp + h2], yt, bh[h2], bl[h2]);
        ldb_t<NN, true>(s.ah.e, 0, 16 * kp, bh[0], bh[1]);
        ldb_t<NN, true>(s.al.e, 0, 16 * kp, bl[0], bl[1]);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) mma3(dS[2 * kp + h2], drh, drl, bh[h2], bl[h2]);
      }
      __syncthreads();
      // ---- gradients of the L x L matrices (single products, kept as hi + lo) ----
      // dM_ab = dR U^T, dM_ak = dR V^T (strict), dM_qk = dY V^T, dM_qb = dY U^T
      for (int m = warp; m < 4; m += NW) {
        const bf16* A = m < 2 ? s.dr.e : s.dy.e;
        const bf16* B = (m == 0 || m == 3) ? s.u.e : s.v.e;
        FragC acc[2];
        xyt<NN, false, false, true>(A, A, B, B, acc);
        put_mat(acc, s.m[m].e, s.m[4 + m].e, m < 2);  // M_qb, Inv are dead
      }
      __syncthreads();

      // ---- key side (keys kb..kb+15): C tiles (time x 8 keys), in three
      // passes (dr/da, dk, db) so that only two accumulator pairs are live ----
      // g1 = r dr - k dk - b db, g2 = a da, g3 = (P_L / P_t)(k dk^ + b db^), all
      // at t; dλ_t = tot P_L + sum_u g3_u + sum_{u>=t} (g1_u + g2_{u+1}).
      // x holds g1_t + g2_{t+1} (g2 moved one row up by shuffles), t3 the
      // per-lane part of sum_u g3_u, per key.
      float x[2][4], t3[2][2];
      {
        // raw input pair (keys key0, key0 + 1) at row t of the chunk (0 past
        // T); addresses from the kernel parameters at each use (no hoisted
        // 64-bit pointers across the passes)
        auto at = [&](int t, int key0) -> long {
          return (((long)blockIdx.y * p.T + t0 + t) * p.H + blockIdx.x) * NN + key0;
        };
        auto raw2 = [&](const void* src, int t, int key0) -> float2 {
          if (t0 + t >= p.T) return make_float2(0.f, 0.f);
          const uint32_t u = *(const uint32_t*)&((const bf16*)src)[at(t, key0)];
          return make_float2(bf16_bits_to_float(u & 0xffffu), bf16_bits_to_float(u >> 16));
        };
        auto out2 = [&](void* dst, int t, int key0, float v0, float v1) {
          if (t0 + t < p.T)
            *(uint32_t*)&((bf16*)dst)[at(t, key0)] = bf16_bits(v0) | (bf16_bits(v1) << 16);
        };
#pragma unroll
        for (int pass = 0; pass < 3; ++pass) {
          FragC c0[2], c1[2];
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            c_zero(c0[nt]);
            c_zero(c1[nt]);
          }
          if (pass == 0) {  // dq = dY S0 + dM_qk K~ + dM_qb B~, da = dR S0 + dM_ak K~ + dM_ab B~
#pragma unroll 1
            for (int ks = 0; ks < NN / 16; ++ks) {
              FragB bb[2];
              ldb_t<NN, true>(s.s0, 16 * ks, kb, bb[0], bb[1]);
              const FragA ya = lda<NN, true>(s.dy.e, 0, 16 * ks), ra = lda<NN, true>(s.dr.e, 0, 16 * ks);
#pragma unroll
              for (int nt = 0; nt < 2; ++nt) {
                mma1(c0[nt], ya, bb[nt]);
                mma1(c1[nt], ra, bb[nt]);
              }
            }
            // time contractions: dM (hi, lo) times K~, B~ (hi, lo): 3 terms, as the
            // decay-scaled keys make these products the ones dw is sensitive to
            FragB bh[2], bl[2];
            ldb_t<NN, true>(s.kh.e, 0, kb, bh[0], bh[1]);
            ldb_t<NN, true>(s.kl.e, 0, kb, bl[0], bl[1]);
            FragA m0 = lda<L, true>(s.m[2].e, 0, 0), m0l = lda<L, true>(s.m[6].e, 0, 0);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma3(c0[nt], m0, m0l, bh[nt], bl[nt]);  // dM_qk K~
            m0 = lda<L, true>(s.m[1].e, 0, 0);
            m0l = lda<L, true>(s.m[5].e, 0, 0);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma3(c1[nt], m0, m0l, bh[nt], bl[nt]);  // dM_ak K~
            ldb_t<NN, true>(s.bh.e, 0, kb, bh[0], bh[1]);
            ldb_t<NN, true>(s.bl.e, 0, kb, bl[0], bl[1]);
            m0 = lda<L, true>(s.m[3].e, 0, 0);
            m0l = lda<L, true>(s.m[7].e, 0, 0);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma3(c0[nt], m0, m0l, bh[nt], bl[nt]);  // dM_qb B~
            m0 = lda<L, true>(s.m[0].e, 0, 0);
            m0l = lda<L, true>(s.m[4].e, 0, 0);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma3(c1[nt], m0, m0l, bh[nt], bl[nt]);  // dM_ab B~
          } else {  // dk~ = dM_qk^T Q~ + dM_ak^T A~, dk^ = V dS_L (pass 1); b likewise (pass 2)
            const bf16* A = pass == 1 ? s.v.e : s.u.e;
#pragma unroll 1
            for (int ks = 0; ks < NN / 16; ++ks) {
              FragB bb[2];
              ldb_t<NN, true>(s.o2.dsl, 16 * ks, kb, bb[0], bb[1]);
              const FragA va = lda<NN, true>(A, 0, 16 * ks);
#pragma unroll
              for (int nt = 0; nt < 2; ++nt) mma1(c1[nt], va, bb[nt]);
            }
            FragB bh[2], bl[2];
            ldb_t<NN, true>(s.qh.e, 0, kb, bh[0], bh[1]);
            ldb_t<NN, true>(s.ql.e, 0, kb, bl[0], bl[1]);
            const int mq = pass == 1 ? 2 : 3, ma = pass == 1 ? 1 : 0;
            FragA m = lda_t<L, true>(s.m[mq].e, 0, 0), ml = lda_t<L, true>(s.m[4 + mq].e, 0, 0);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma3(c0[nt], m, ml, bh[nt], bl[nt]);  // dM_q.^T Q~
            ldb_t<NN, true>(s.ah.e, 0, kb, bh[0], bh[1]);
            ldb_t<NN, true>(s.al.e, 0, kb, bl[0], bl[1]);
            m = lda_t<L, true>(s.m[ma].e, 0, 0);
            ml = lda_t<L, true>(s.m[4 + ma].e, 0, 0);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma3(c0[nt], m, ml, bh[nt], bl[nt]);  // dM_a.^T A~
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int ln = fresh_lane(), g8 = ln >> 2, q4 = ln & 3;  // not hoisted
            const int key0 = kb + nt * 8 + 2 * q4;
            const float2 pl = *(const float2*)&s.PL[key0];
            float g2lo[2] = {0.f, 0.f};  // pass 0: g2 at t = g8 (t3 then holds g2 at g8 + 8)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {  // rows t = g8 (hf 0) and g8 + 8
              const int t = g8 + 8 * hf, e0 = 2 * hf;
              const float2 P = *(const float2*)&s.P[t][key0];
              if (pass == 0) {
                const float2 Pm = t ? *(const float2*)&s.P[t - 1][key0] : make_float2(1.f, 1.f);
                const float2 r = raw2(p.r, t, key0), a = raw2(p.a, t, key0);
                const float dr0 = c0[nt].x[e0] * P.x, dr1 = c0[nt].x[e0 + 1] * P.y;
                const float da0 = c1[nt].x[e0] * Pm.x, da1 = c1[nt].x[e0 + 1] * Pm.y;
                out2(p.dr, t, key0, dr0, dr1);
                out2(p.da, t, key0, da0, da1);
                x[nt][e0] = r.x * dr0;
                x[nt][e0 + 1] = r.y * dr1;
                t3[nt][0] = a.x * da0;  // g2, moved into x below
                t3[nt][1] = a.y * da1;
                if (hf == 0) {
                  g2lo[0] = a.x * da0;
                  g2lo[1] = a.y * da1;
                }
              } else {
                const float2 kv = raw2(pass == 1 ? p.k : p.b, t, key0);
                const float i0 = __fdividef(1.f, P.x), i1 = __fdividef(1.f, P.y);
                const float d0 = (c0[nt].x[e0] + c1[nt].x[e0] * pl.x) * i0;
                const float d1 = (c0[nt].x[e0 + 1] + c1[nt].x[e0 + 1] * pl.y) * i1;
                out2(pass == 1 ? p.dk : p.db, t, key0, d0, d1);
                x[nt][e0] -= kv.x * d0;
                x[nt][e0 + 1] -= kv.y * d1;
                const float h0 = pl.x * i0 * kv.x * c1[nt].x[e0];
                const float h1 = pl.y * i1 * kv.y * c1[nt].x[e0 + 1];
                const bool first = pass == 1 && hf == 0;
                t3[nt][0] = first ? h0 : t3[nt][0] + h0;
                t3[nt][1] = first ? h1 : t3[nt][1] + h1;
              }
            }
            if (pass == 0) {  // x_t += g2_{t+1}: rows g8 + 1 (lane + 4); row 8 for g8 = 7; 0 at t = 15
#pragma unroll
              for (int od = 0; od < 2; ++od) {
                const float nlo = __shfl_down_sync(0xffffffffu, g2lo[od], 4);
                const float nhi = __shfl_down_sync(0xffffffffu, t3[nt][od], 4);
                const float first_hi = __shfl_sync(0xffffffffu, t3[nt][od], q4);
                x[nt][od] += g8 < 7 ? nlo : first_hi;
                x[nt][2 + od] += g8 < 7 ? nhi : 0.f;
              }
            }
          }
        }
      }
      // dw = dλ / w: per key, suffix sums over t = g8 (element od) and g8 + 8 (2 + od)
      {
        const bf16* __restrict__ ww = (const bf16*)p.w;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int od = 0; od < 2; ++od) {
            const int ln = fresh_lane(), g8 = ln >> 2, q4 = ln & 3;  // not hoisted
            float hi = x[nt][2 + od], lo = x[nt][od], g3s = t3[nt][od];
#pragma unroll
            for (int d = 4; d < 32; d <<= 1) {
              const float oh = __shfl_down_sync(0xffffffffu, hi, d);
              const float ol = __shfl_down_sync(0xffffffffu, lo, d);
              if (lane + d < 32) {
                hi += oh;
                lo += ol;
              }
              g3s += __shfl_xor_sync(0xffffffffu, g3s, d);
            }
            const float hi_all = __shfl_sync(0xffffffffu, hi, q4);  // sum over t = 8..15
            const int key = kb + nt * 8 + 2 * q4 + od;
            float tot = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) tot += s.o3.tot[w][key];
            const float base = tot * s.PL[key] + g3s;
            const float dl[2] = {base + lo + hi_all, base + hi};
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const int tt = t0 + g8 + 8 * hf;
              if (tt < T) {
                const long xo = (((long)b * T + tt) * H + h) * NN + key;
                st((bf16*)p.dw, xo, __fdividef(dl[hf], bf_f(ww[xo])));
              }
            }
          }
      }
    }
  }
  store_state<NN>(p.dh0 + bh * NN * NN, dS, vb);
}

#ifdef CUDA_EMU
// Dynamic shared memory of the backward on the GPU (the host launch passes
// it; src/wkv7/v3.rs mirrors it, tests compare the two).
extern "C" int emu_wkv7_v3_bwd_smem(int n) {
  return n == 64 ? (int)sizeof(Wkv7V3Bwd<64>) : n == 32 ? (int)sizeof(Wkv7V3Bwd<32>) : 0;
}
#endif

// extern "C" entry points: wkv7_{fwd,bwd}_v3{,x}_bf16_n{32,64}
#define WKV7_V3_INSTANCE(NAME, SPLIT, NN)                                          \
  extern "C" __global__ void __launch_bounds__(NN * 2, 4)                           \
      wkv7_fwd_##NAME##_bf16_n##NN(const __grid_constant__ Wkv7Params p) {        \
    wkv7_fwd_v3<NN, SPLIT>(p);                                                     \
  }                                                                                \
  extern "C" __global__ void __launch_bounds__(NN * 2, WKV7_V3_BWD_CTAS)            \
      wkv7_bwd_##NAME##_bf16_n##NN(const __grid_constant__ Wkv7Params p) {        \
    wkv7_bwd_v3<NN, SPLIT>(p);                                                     \
  }                                                                                \
  EMU_ENTRY(wkv7_fwd_##NAME##_bf16_n##NN, Wkv7Params)                              \
  EMU_ENTRY(wkv7_bwd_##NAME##_bf16_n##NN, Wkv7Params)

WKV7_V3_INSTANCE(v3, false, 32)
WKV7_V3_INSTANCE(v3, false, 64)
WKV7_V3_INSTANCE(v3x, true, 32)
WKV7_V3_INSTANCE(v3x, true, 64)
