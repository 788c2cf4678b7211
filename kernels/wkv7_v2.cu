// kernels/wkv7_v2.cu — WKV-7 forward and backward, version 2: the chunked
// closed form (docs/kernels-v2.md, shared rwkv7-math-and-kernels.md §7) on
// bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation, operands split
// into bf16 hi + lo so products keep ~16 bits), fp32 state in registers.
// Same Wkv7Params, tensors and checkpoint layout as v1 (chunk 16); the
// backward's `scratch` is only [B, H, N, N] f32 here.
//
// Per chunk of L = 16 tokens (t = 0..L-1, padded past T with identity steps
// w = 1, r = k = v = a = b = 0), per key channel j:
//   P_t = prod_{u<=t} w_u,  q~ = r P_t,  a~ = a P_{t-1},  k~ = k / P_t,
//   b~ = b / P_t,  k^ = k~ P_L,  b^ = b~ P_L
//   M_ab = stril(A~ B~^T)  M_ak = stril(A~ K~^T)  M_qk = tril(Q~ K~^T)
//   M_qb = tril(Q~ B~^T)   Inv = (I - M_ab)^-1 (fp32 forward substitution)
// and, per value row block (one warp = 16 rows of S, everything transposed
// so that C fragments feed the next MMA as A operands):
//   R^T = S0 A~^T + V^T M_ak^T,  U^T = R^T Inv^T
//   Y^T = S0 Q~^T + V^T M_qk^T + U^T M_qb^T
//   S_L = S0 diag(P_L) + V^T K^ + U^T B^
// Dividing by P_t needs a lower bound on w (see WKV7_V2_W_MIN): 1/P_t <= w_min^-16.
//
// Block: NN/16 warps; grid (H, B). NN = 32 or 64 (static shared memory).
#include "mma.cuh"

#define WKV7_V2_CHUNK 16

namespace wkv7v2 {

template <int NN, int L>
struct KeySide {
  // [t][j] row-major (t = token in chunk, j = key channel)
  float q[L][NN], k[L][NN], a[L][NN], b[L][NN];
  float P[L][NN];  // inclusive decay products P_t (raw w before the column pass)
  float PL[NN];
  float mab[L][L], mak[L][L], mqk[L][L], mqb[L][L], inv[L][L];
};

// Column pass (threads < NN): raw r, w, k, a, b in q, P, k, a, b become the
// scaled q~, P_t, k~, a~, b~; PL = P_{L-1}.
template <int NN, int L>
__device__ __forceinline__ void scale_columns(KeySide<NN, L>& s, int tid) {
  if (tid >= NN) return;
  const int j = tid;
  float P = 1.f;
#pragma unroll
  for (int t = 0; t < L; ++t) {
    const float Pm = P;
    P *= s.P[t][j];
    const float ip = 1.f / P;
    s.q[t][j] *= P;
    s.a[t][j] *= Pm;
    s.k[t][j] *= ip;
    s.b[t][j] *= ip;
    s.P[t][j] = P;
  }
  s.PL[j] = P;
}

// The four L x L matrices (warp m computes matrix m, m += NW) and the
// inverse (warp 0, lanes < L, after its M_ab).
template <int NN, int L, int NW>
__device__ __forceinline__ void chunk_matrices(KeySide<NN, L>& s, int warp, int lane) {
  for (int m = warp; m < 4; m += NW) {
    float(*X)[NN] = (m < 2) ? s.a : s.q;
    float(*Y)[NN] = (m == 0 || m == 3) ? s.b : s.k;
    float(*M)[L] = m == 0 ? s.mab : m == 1 ? s.mak : m == 2 ? s.mqk : s.mqb;
    const bool strict = m < 2;
    FragC acc[2];
    c_zero(acc[0]);
    c_zero(acc[1]);
#pragma unroll
    for (int ks = 0; ks < NN / 16; ++ks) {
      FragA ah, al;
      load_a_split([&](int i, int j) { return X[i][16 * ks + j]; }, ah, al);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        FragB bh, bl;
        load_b_split([&](int k, int n) { return Y[nt * 8 + n][16 * ks + k]; }, bh, bl);
        mma3(acc[nt], ah, al, bh, bl);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
      c_foreach(acc[nt], [&](int t, int col, float& x) {
        const int u = nt * 8 + col;
        M[t][u] = (strict ? u < t : u <= t) ? x : 0.f;
      });
  }
  if (warp == 0) {
    __syncwarp();
    if (lane < L) {
      float x[L];  // column `lane` of (I - M_ab)^-1
      tri_inverse_column<L>([&](int t, int u) { return s.mab[t][u]; }, lane, x);
#pragma unroll
      for (int t = 0; t < L; ++t) s.inv[t][lane] = x[t];
    }
  }
}

// Stages one chunk's inputs (fp32) with identity padding past T.
template <class X, int NN, int L, int NT>
__device__ __forceinline__ void load_chunk(const Wkv7Params& p, KeySide<NN, L>& s,
                                           float (*v_s)[NN], float (*dy_s)[NN], int t0, int tid) {
  const int b = blockIdx.y, h = blockIdx.x;
  for (int idx = tid; idx < L * NN; idx += NT) {
    const int t = idx / NN, j = idx % NN, tt = t0 + t;
    if (tt < p.T) {
      const long x = (((long)b * p.T + tt) * p.H + h) * NN + j;
      s.q[t][j] = ld((const X*)p.r, x);
      s.P[t][j] = ld((const X*)p.w, x);
      s.k[t][j] = ld((const X*)p.k, x);
      s.a[t][j] = ld((const X*)p.a, x);
      s.b[t][j] = ld((const X*)p.b, x);
      v_s[t][j] = ld((const X*)p.v, x);
      if (dy_s) dy_s[t][j] = ld((const X*)p.dy, x);
    } else {
      s.q[t][j] = s.k[t][j] = s.a[t][j] = s.b[t][j] = v_s[t][j] = 0.f;
      s.P[t][j] = 1.f;
      if (dy_s) dy_s[t][j] = 0.f;
    }
  }
}

}  // namespace wkv7v2

// Forward. Warp w owns state rows (values) 16w..16w+15: S[kt] is the C tile
// of keys 8kt..8kt+7. Saves the fp32 state before every chunk in ckpt.
template <class X, int NN, int L>
__device__ void wkv7_fwd_v2(const Wkv7Params p) {
  static_assert(L == 16, "v2 kernels are written for 16-token chunks");
  constexpr int NW = NN / 16, NT = NW * 32;
  using namespace wkv7v2;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, vb = 16 * warp;
  const int T = p.T, H = p.H;
  const long bh = (long)b * H + h;
  X* y = (X*)p.y;

  __shared__ KeySide<NN, L> s;
  __shared__ float v_s[L][NN];

  FragC S[NN / 8];
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt)
    c_foreach(S[kt], [&](int r, int c, float& x) {
      x = p.h0 ? p.h0[(bh * NN + vb + r) * NN + kt * 8 + c] : 0.f;
    });

  const int n_chunks = (T + L - 1) / L;
  for (int ch = 0; ch < n_chunks; ++ch) {
    const int t0 = ch * L;
    if (p.ckpt) {
      float* ck = p.ckpt + (bh * n_chunks + ch) * NN * NN;
#pragma unroll
      for (int kt = 0; kt < NN / 8; ++kt)
        c_foreach(S[kt], [&](int r, int c, float& x) { ck[(vb + r) * NN + kt * 8 + c] = x; });
    }
    __syncthreads();  // previous chunk done reading shared memory
    load_chunk<X, NN, L, NT>(p, s, v_s, nullptr, t0, tid);
    __syncthreads();
    scale_columns<NN, L>(s, tid);
    __syncthreads();
    chunk_matrices<NN, L, NW>(s, warp, lane);
    __syncthreads();

    // R^T = S0 A~^T + V^T M_ak^T and Y^T = S0 Q~^T + V^T M_qk^T
    FragC R[2], Yc[2], U[2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      c_zero(R[nt]);
      c_zero(Yc[nt]);
      c_zero(U[nt]);
    }
#pragma unroll
    for (int ks = 0; ks < NN / 16; ++ks) {
      FragA sh, sl;
      c_to_a_split(S[2 * ks], S[2 * ks + 1], sh, sl);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        FragB bh_, bl_;
        load_b_split([&](int k, int n) { return s.a[nt * 8 + n][16 * ks + k]; }, bh_, bl_);
        mma3(R[nt], sh, sl, bh_, bl_);
        load_b_split([&](int k, int n) { return s.q[nt * 8 + n][16 * ks + k]; }, bh_, bl_);
        mma3(Yc[nt], sh, sl, bh_, bl_);
      }
    }
    FragA vh, vl;  // V^T of this warp's rows: A(i = value, j = time)
    load_a_split([&](int i, int j) { return v_s[j][vb + i]; }, vh, vl);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.mak[nt * 8 + n][k]; }, bh_, bl_);
      mma3(R[nt], vh, vl, bh_, bl_);
      load_b_split([&](int k, int n) { return s.mqk[nt * 8 + n][k]; }, bh_, bl_);
      mma3(Yc[nt], vh, vl, bh_, bl_);
    }
    // U^T = R^T Inv^T ; Y^T += U^T M_qb^T
    FragA rh, rl;
    c_to_a_split(R[0], R[1], rh, rl);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.inv[nt * 8 + n][k]; }, bh_, bl_);
      mma3(U[nt], rh, rl, bh_, bl_);
    }
    FragA uh, ul;
    c_to_a_split(U[0], U[1], uh, ul);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.mqb[nt * 8 + n][k]; }, bh_, bl_);
      mma3(Yc[nt], uh, ul, bh_, bl_);
      c_foreach(Yc[nt], [&](int r, int c, float& x) {
        const int t = t0 + nt * 8 + c;
        if (t < T) st(y, (((long)b * T + t) * H + h) * NN + vb + r, x);
      });
    }
    // S_L = S0 diag(P_L) + V^T K^ + U^T B^
#pragma unroll
    for (int kt = 0; kt < NN / 8; ++kt) {
      c_foreach(S[kt], [&](int r, int c, float& x) { x *= s.PL[kt * 8 + c]; });
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.k[k][kt * 8 + n] * s.PL[kt * 8 + n]; }, bh_, bl_);
      mma3(S[kt], vh, vl, bh_, bl_);
      load_b_split([&](int k, int n) { return s.b[k][kt * 8 + n] * s.PL[kt * 8 + n]; }, bh_, bl_);
      mma3(S[kt], uh, ul, bh_, bl_);
    }
  }
  if (p.h_t) {
#pragma unroll
    for (int kt = 0; kt < NN / 8; ++kt)
      c_foreach(S[kt], [&](int r, int c, float& x) {
        p.h_t[(bh * NN + vb + r) * NN + kt * 8 + c] = x;
      });
  }
}

// Backward (§7.2 in transposed form). Chunks in reverse; S0 of each chunk from
// ckpt; dS (gradient of the chunk's end state) carried in registers by value
// rows (warp w: rows 16w..); key-side gradients computed by key columns
// (warp w: keys 16w..) after U, dR (smem) and dS (global scratch) are shared.
template <class X, int NN, int L>
__device__ void wkv7_bwd_v2(const Wkv7Params p) {
  static_assert(L == 16, "v2 kernels are written for 16-token chunks");
  constexpr int NW = NN / 16, NT = NW * 32;
  using namespace wkv7v2;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, vb = 16 * warp, kb = 16 * warp;
  const int T = p.T, H = p.H;
  const long bh = (long)b * H + h;
  float* sc = p.scratch + bh * NN * NN;  // dS of the chunk end, shared by the block

  __shared__ KeySide<NN, L> s;
  __shared__ float v_s[L][NN], dy_s[L][NN], u_s[L][NN], dr_s[L][NN];

  FragC dS[NN / 8];
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt)
    c_foreach(dS[kt], [&](int r, int c, float& x) {
      x = p.dh_t ? p.dh_t[(bh * NN + vb + r) * NN + kt * 8 + c] : 0.f;
    });

  const int n_chunks = (T + L - 1) / L;
  for (int ch = n_chunks - 1; ch >= 0; --ch) {
    const int t0 = ch * L;
    const float* ck = p.ckpt + (bh * n_chunks + ch) * NN * NN;  // S0 of the chunk
    __syncthreads();
    load_chunk<X, NN, L, NT>(p, s, v_s, dy_s, t0, tid);
    __syncthreads();
    scale_columns<NN, L>(s, tid);
    __syncthreads();
    chunk_matrices<NN, L, NW>(s, warp, lane);
    __syncthreads();

    // ---- value side (rows vb..vb+15) ----
    FragC R[2], U[2], dU[2], dV[2], dR[2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      c_zero(R[nt]);
      c_zero(U[nt]);
      c_zero(dU[nt]);
      c_zero(dV[nt]);
      c_zero(dR[nt]);
    }
#pragma unroll
    for (int ks = 0; ks < NN / 16; ++ks) {
      FragA sh, sl, gh, gl;
      load_a_split([&](int i, int j) { return ck[(vb + i) * NN + 16 * ks + j]; }, sh, sl);
      c_to_a_split(dS[2 * ks], dS[2 * ks + 1], gh, gl);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        FragB bh_, bl_;
        load_b_split([&](int k, int n) { return s.a[nt * 8 + n][16 * ks + k]; }, bh_, bl_);
        mma3(R[nt], sh, sl, bh_, bl_);
        load_b_split(
            [&](int k, int n) { return s.b[nt * 8 + n][16 * ks + k] * s.PL[16 * ks + k]; }, bh_,
            bl_);
        mma3(dU[nt], gh, gl, bh_, bl_);
        load_b_split(
            [&](int k, int n) { return s.k[nt * 8 + n][16 * ks + k] * s.PL[16 * ks + k]; }, bh_,
            bl_);
        mma3(dV[nt], gh, gl, bh_, bl_);
      }
    }
    FragA vh, vl, yh, yl;  // V^T, dY^T of this warp's rows: A(i = value, j = time)
    load_a_split([&](int i, int j) { return v_s[j][vb + i]; }, vh, vl);
    load_a_split([&](int i, int j) { return dy_s[j][vb + i]; }, yh, yl);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.mak[nt * 8 + n][k]; }, bh_, bl_);
      mma3(R[nt], vh, vl, bh_, bl_);
      load_b_split([&](int k, int n) { return s.mqb[k][nt * 8 + n]; }, bh_, bl_);
      mma3(dU[nt], yh, yl, bh_, bl_);
      load_b_split([&](int k, int n) { return s.mqk[k][nt * 8 + n]; }, bh_, bl_);
      mma3(dV[nt], yh, yl, bh_, bl_);
    }
    {
      FragA rh, rl, duh, dul;
      c_to_a_split(R[0], R[1], rh, rl);
      c_to_a_split(dU[0], dU[1], duh, dul);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        FragB bh_, bl_;
        load_b_split([&](int k, int n) { return s.inv[nt * 8 + n][k]; }, bh_, bl_);
        mma3(U[nt], rh, rl, bh_, bl_);  // U^T = R^T Inv^T
        load_b_split([&](int k, int n) { return s.inv[k][nt * 8 + n]; }, bh_, bl_);
        mma3(dR[nt], duh, dul, bh_, bl_);  // dR^T = dU^T Inv
      }
    }
    FragA drh, drl;
    c_to_a_split(dR[0], dR[1], drh, drl);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.mak[k][nt * 8 + n]; }, bh_, bl_);
      mma3(dV[nt], drh, drl, bh_, bl_);  // dV^T += dR^T M_ak
      c_foreach(dV[nt], [&](int r, int c, float& x) {
        const int t = t0 + nt * 8 + c;
        if (t < T) st((X*)p.dv, (((long)b * T + t) * H + h) * NN + vb + r, x);
      });
      c_foreach(U[nt], [&](int r, int c, float& x) { u_s[nt * 8 + c][vb + r] = x; });
      c_foreach(dR[nt], [&](int r, int c, float& x) { dr_s[nt * 8 + c][vb + r] = x; });
    }
    // share dS_L, then dS_0 = dS_L diag(P_L) + dY^T Q~ + dR^T A~
#pragma unroll
    for (int kt = 0; kt < NN / 8; ++kt) {
      c_foreach(dS[kt], [&](int r, int c, float& x) {
        sc[(vb + r) * NN + kt * 8 + c] = x;
        x *= s.PL[kt * 8 + c];
      });
      FragB bh_, bl_;
      load_b_split([&](int k, int n) { return s.q[k][kt * 8 + n]; }, bh_, bl_);
      mma3(dS[kt], yh, yl, bh_, bl_);
      load_b_split([&](int k, int n) { return s.a[k][kt * 8 + n]; }, bh_, bl_);
      mma3(dS[kt], drh, drl, bh_, bl_);
    }
    __syncthreads();

    // ---- gradients of the L x L matrices (overwrite the matrices) ----
    for (int m = warp; m < 4; m += NW) {
      float(*Am)[NN] = (m < 2) ? dr_s : dy_s;
      float(*Bm)[NN] = (m == 0 || m == 3) ? u_s : v_s;
      float(*M)[L] = m == 0 ? s.mab : m == 1 ? s.mak : m == 2 ? s.mqk : s.mqb;
      const bool strict = m < 2;
      FragC acc[2];
      c_zero(acc[0]);
      c_zero(acc[1]);
#pragma unroll
      for (int ks = 0; ks < NN / 16; ++ks) {
        FragA ah, al;
        load_a_split([&](int i, int j) { return Am[i][16 * ks + j]; }, ah, al);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          FragB bh_, bl_;
          load_b_split([&](int k, int n) { return Bm[nt * 8 + n][16 * ks + k]; }, bh_, bl_);
          mma3(acc[nt], ah, al, bh_, bl_);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        c_foreach(acc[nt], [&](int t, int col, float& x) {
          const int u = nt * 8 + col;
          M[t][u] = (strict ? u < t : u <= t) ? x : 0.f;
        });
    }
    __syncthreads();

    // ---- key side (keys kb..kb+15): C tiles (time x 8 keys) ----
    FragC dq[2], da[2], dkt[2], dbt[2], dkh[2], dbh[2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      c_zero(dq[nt]);
      c_zero(da[nt]);
      c_zero(dkt[nt]);
      c_zero(dbt[nt]);
      c_zero(dkh[nt]);
      c_zero(dbh[nt]);
    }
    // contractions over values: dY S0, dR S0, V dS_L, U dS_L
#pragma unroll 1
    for (int ks = 0; ks < NN / 16; ++ks) {
      FragA ah, al, ch_, cl_;
      load_a_split([&](int i, int j) { return dy_s[i][16 * ks + j]; }, ah, al);
      load_a_split([&](int i, int j) { return dr_s[i][16 * ks + j]; }, ch_, cl_);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        FragB bh_, bl_;
        load_b_split([&](int k, int n) { return ck[(16 * ks + k) * NN + kb + nt * 8 + n]; }, bh_,
                     bl_);
        mma3(dq[nt], ah, al, bh_, bl_);
        mma3(da[nt], ch_, cl_, bh_, bl_);
      }
      load_a_split([&](int i, int j) { return v_s[i][16 * ks + j]; }, ah, al);
      load_a_split([&](int i, int j) { return u_s[i][16 * ks + j]; }, ch_, cl_);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        FragB bh_, bl_;
        load_b_split([&](int k, int n) { return sc[(16 * ks + k) * NN + kb + nt * 8 + n]; }, bh_,
                     bl_);
        mma3(dkh[nt], ah, al, bh_, bl_);
        mma3(dbh[nt], ch_, cl_, bh_, bl_);
      }
    }
    // contractions over time with the matrix gradients
    {
      FragA qk_h, qk_l, qb_h, qb_l, ab_h, ab_l, ak_h, ak_l;
      load_a_split([&](int i, int j) { return s.mqk[i][j]; }, qk_h, qk_l);
      load_a_split([&](int i, int j) { return s.mqb[i][j]; }, qb_h, qb_l);
      load_a_split([&](int i, int j) { return s.mab[i][j]; }, ab_h, ab_l);
      load_a_split([&](int i, int j) { return s.mak[i][j]; }, ak_h, ak_l);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int c0 = kb + nt * 8;
        FragB kh_, kl_, bh_, bl_;
        load_b_split([&](int k, int n) { return s.k[k][c0 + n]; }, kh_, kl_);
        load_b_split([&](int k, int n) { return s.b[k][c0 + n]; }, bh_, bl_);
        mma3(dq[nt], qk_h, qk_l, kh_, kl_);
        mma3(dq[nt], qb_h, qb_l, bh_, bl_);
        mma3(da[nt], ab_h, ab_l, bh_, bl_);
        mma3(da[nt], ak_h, ak_l, kh_, kl_);
      }
      load_a_split([&](int i, int j) { return s.mqk[j][i]; }, qk_h, qk_l);
      load_a_split([&](int i, int j) { return s.mqb[j][i]; }, qb_h, qb_l);
      load_a_split([&](int i, int j) { return s.mab[j][i]; }, ab_h, ab_l);
      load_a_split([&](int i, int j) { return s.mak[j][i]; }, ak_h, ak_l);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int c0 = kb + nt * 8;
        FragB qh_, ql_, ah_, al_;
        load_b_split([&](int k, int n) { return s.q[k][c0 + n]; }, qh_, ql_);
        load_b_split([&](int k, int n) { return s.a[k][c0 + n]; }, ah_, al_);
        mma3(dkt[nt], qk_h, qk_l, qh_, ql_);
        mma3(dkt[nt], ak_h, ak_l, ah_, al_);
        mma3(dbt[nt], qb_h, qb_l, qh_, ql_);
        mma3(dbt[nt], ab_h, ab_l, ah_, al_);
      }
    }
    // raw gradients and the decay terms g1 (at t), g2 (at t-1), g3 (at L-1)
    float g1[2][4], g2[2][4], g3[2][4];
    {
      const int g = lane >> 2, q = lane & 3;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = g + ((e & 2) ? 8 : 0), key = kb + nt * 8 + 2 * q + (e & 1);
          const float P = s.P[t][key], Pm = t ? s.P[t - 1][key] : 1.f, PL = s.PL[key];
          const float qv = s.q[t][key], kv = s.k[t][key], av = s.a[t][key], bv = s.b[t][key];
          const float khv = kv * PL, bhv = bv * PL;
          const float dqv = dq[nt].x[e], dav = da[nt].x[e], dktv = dkt[nt].x[e],
                      dbtv = dbt[nt].x[e], dkhv = dkh[nt].x[e], dbhv = dbh[nt].x[e];
          g1[nt][e] = qv * dqv - kv * dktv - bv * dbtv - khv * dkhv - bhv * dbhv;
          g2[nt][e] = av * dav;
          g3[nt][e] = khv * dkhv + bhv * dbhv;
          if (t0 + t < T) {
            const long x = (((long)b * T + t0 + t) * H + h) * NN + key;
            st((X*)p.dr, x, dqv * P);
            st((X*)p.da, x, dav * Pm);
            st((X*)p.dk, x, (dktv + dkhv * PL) / P);
            st((X*)p.db, x, (dbtv + dbhv * PL) / P);
          }
        }
      __syncwarp();  // this warp's reads of its own key columns are done
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = g + ((e & 2) ? 8 : 0), key = kb + nt * 8 + 2 * q + (e & 1);
          s.q[t][key] = g1[nt][e];
          s.k[t][key] = g2[nt][e];
          s.b[t][key] = g3[nt][e];
        }
      __syncwarp();
    }
    // reverse cumulative sum over the chunk: dλ_u = sum_{t>=u} g_t; dw = dλ / w
    if (lane < 16) {
      const int key = kb + lane;
      float tot = 0.f;
      for (int v = 0; v < NN; ++v) tot += ck[v * NN + key] * sc[v * NN + key];
      tot *= s.PL[key];
#pragma unroll
      for (int t = 0; t < L; ++t) tot += s.b[t][key];
      float acc = tot;
#pragma unroll
      for (int t = L - 1; t >= 0; --t) {
        acc += s.q[t][key] + (t + 1 < L ? s.k[t + 1][key] : 0.f);
        if (t0 + t < T) {
          const long x = (((long)b * T + t0 + t) * H + h) * NN + key;
          st((X*)p.dw, x, acc / ld((const X*)p.w, x));
        }
      }
    }
  }
#pragma unroll
  for (int kt = 0; kt < NN / 8; ++kt)
    c_foreach(dS[kt], [&](int r, int c, float& x) {
      p.dh0[(bh * NN + vb + r) * NN + kt * 8 + c] = x;
    });
}

// extern "C" entry points: wkv7_{fwd,bwd}_v2_{f32,bf16}_n{32,64}
#define WKV7_V2_INSTANCE(X, XN, NN)                                                     \
  extern "C" __global__ void __launch_bounds__(NN * 2, 1)                                \
      wkv7_fwd_v2_##XN##_n##NN(const __grid_constant__ Wkv7Params p) {                 \
    wkv7_fwd_v2<X, NN, WKV7_V2_CHUNK>(p);                                               \
  }                                                                                     \
  extern "C" __global__ void __launch_bounds__(NN * 2, 1)                                \
      wkv7_bwd_v2_##XN##_n##NN(const __grid_constant__ Wkv7Params p) {                 \
    wkv7_bwd_v2<X, NN, WKV7_V2_CHUNK>(p);                                               \
  }                                                                                     \
  EMU_ENTRY(wkv7_fwd_v2_##XN##_n##NN, Wkv7Params)                                       \
  EMU_ENTRY(wkv7_bwd_v2_##XN##_n##NN, Wkv7Params)

WKV7_V2_INSTANCE(float, f32, 32)
WKV7_V2_INSTANCE(float, f32, 64)
WKV7_V2_INSTANCE(bf16, bf16, 32)
WKV7_V2_INSTANCE(bf16, bf16, 64)
