// kernels/wkv7_v1.cu — WKV-7 forward and backward, version 1: plain fp32 FMA
// arithmetic on CUDA cores, one thread block per (b, h), one thread per state
// row. CPU reference: src/wkv7/reference.rs. Test: tests/wkv7_backends.rs.
//
// Recurrence (per b, h; state S is [N, N], row i = value, column j = key):
//   sa_t   = S_{t-1} a_t
//   S_t    = S_{t-1} diag(w_t) + sa_t b_t^T + v_t k_t^T
//   y_t    = S_t r_t
// Tensors: r w k v a b y dy dr.. [B, T, H, N] in dtype X (float or bf16);
//          h0 h_t dh_t dh0 [B, H, N, N] f32; see params.h for the rest.
//
// Chunk structure (kept for the tensor-core version): the forward saves the
// fp32 state at the start of every chunk of WKV7_V1_CHUNK tokens in `ckpt`;
// the backward walks the chunks in reverse, recomputes the chunk's states
// from its checkpoint into `scratch` and sweeps dS back to t = 0 (dh0).
// No division by w anywhere, so any w in (0, 1] is fine (no lower bound).
#include "common.cuh"

// Grid (H, B), block NN threads. Thread i owns row i of S (NN registers).
template <class X, int NN>
__device__ void wkv7_fwd_v1(const Wkv7Params p) {
  const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x;
  const int T = p.T, H = p.H, L = p.chunk;
  const X* r = (const X*)p.r;
  const X* w = (const X*)p.w;
  const X* k = (const X*)p.k;
  const X* v = (const X*)p.v;
  const X* a = (const X*)p.a;
  const X* bb = (const X*)p.b;
  X* y = (X*)p.y;
  const long bh = (long)b * H + h;  // state index (b, h)

  __shared__ float r_s[NN], w_s[NN], k_s[NN], a_s[NN], b_s[NN];

  float S[NN];
  if (p.h0) {
#pragma unroll
    for (int j = 0; j < NN; ++j) S[j] = p.h0[(bh * NN + i) * NN + j];
  } else {
#pragma unroll
    for (int j = 0; j < NN; ++j) S[j] = 0.f;
  }

  for (int t = 0; t < T; ++t) {
    if (p.ckpt && t % L == 0) {
      float* c = p.ckpt + ((bh * p.n_chunks + t / L) * NN + i) * NN;
#pragma unroll
      for (int j = 0; j < NN; ++j) c[j] = S[j];
    }
    const long x = (((long)b * T + t) * H + h) * NN + i;  // [b, t, h, i]
    __syncthreads();  // everyone is done reading the previous token
    r_s[i] = ld(r, x);
    w_s[i] = ld(w, x);
    k_s[i] = ld(k, x);
    a_s[i] = ld(a, x);
    b_s[i] = ld(bb, x);
    const float vi = ld(v, x);
    __syncthreads();

    float sa = 0.f;
#pragma unroll
    for (int j = 0; j < NN; ++j) sa += S[j] * a_s[j];
    float yi = 0.f;
#pragma unroll
    for (int j = 0; j < NN; ++j) {
      S[j] = S[j] * w_s[j] + sa * b_s[j] + vi * k_s[j];
      yi += S[j] * r_s[j];
    }
    st(y, x, yi);
  }
  if (p.h_t) {
#pragma unroll
    for (int j = 0; j < NN; ++j) p.h_t[(bh * NN + i) * NN + j] = S[j];
  }
}

// Grid (H, B), block NN threads. Thread i owns row i of dS (value side) and
// column i of dS (key side), so that every reduction below is thread-local;
// columns of the recomputed states are read from `scratch` (written by all
// threads, separated by a block barrier).
template <class X, int NN>
__device__ void wkv7_bwd_v1(const Wkv7Params p) {
  const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x;
  const int T = p.T, H = p.H, L = p.chunk;
  const X* r = (const X*)p.r;
  const X* w = (const X*)p.w;
  const X* k = (const X*)p.k;
  const X* v = (const X*)p.v;
  const X* a = (const X*)p.a;
  const X* bb = (const X*)p.b;
  const X* dy = (const X*)p.dy;
  const long bh = (long)b * H + h;
  // scratch[s] = S after s tokens of the chunk, s = 0..L, then one slot of
  // dS rows (used when the column copy of dS does not fit in registers):
  // [L + 2][NN][NN]
  float* scr = p.scratch + bh * (long)(L + 2) * NN * NN;
  float* dscr = scr + (long)(L + 1) * NN * NN;
  // N <= 64: both dS copies in registers. N = 128: 2 x 128 floats per thread
  // would spill, so the key side reads dS columns from `dscr` instead.
  constexpr bool kRegCols = NN <= 64;

  __shared__ float r_s[NN], w_s[NN], k_s[NN], v_s[NN], a_s[NN], b_s[NN], dy_s[NN];
  __shared__ float dsa_s[NN];
  __shared__ float sa_s[WKV7_V1_CHUNK][NN];

  float dSr[NN];  // dS[i][j], j = 0..NN-1 (row i)
  float dSc[kRegCols ? NN : 1];  // dS[m][i], m = 0..NN-1 (column i)
  if (p.dh_t) {
    const float* g = p.dh_t + bh * NN * NN;
#pragma unroll
    for (int j = 0; j < NN; ++j) dSr[j] = g[i * NN + j];
    if constexpr (kRegCols) {
#pragma unroll
      for (int j = 0; j < NN; ++j) dSc[j] = g[j * NN + i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < NN; ++j) dSr[j] = 0.f;
    if constexpr (kRegCols) {
#pragma unroll
      for (int j = 0; j < NN; ++j) dSc[j] = 0.f;
    }
  }

  for (int c = p.n_chunks - 1; c >= 0; --c) {
    const int t0 = c * L;
    const int t1 = (t0 + L < T) ? t0 + L : T;

    // 1. Recompute the chunk's states from its checkpoint (thread i: row i).
    //    Rows live in `scratch` only (each thread re-reads its own row), so
    //    dSr/dSc are the only NN-float register arrays: no spills.
    __syncthreads();  // the previous chunk's sweep is done reading scratch
    {
      const float* ck = p.ckpt + ((bh * p.n_chunks + c) * NN + i) * NN;
      float* row0 = scr + (long)i * NN;
#pragma unroll 8
      for (int j = 0; j < NN; ++j) row0[j] = ck[j];
    }
    for (int t = t0; t < t1; ++t) {
      const long x = (((long)b * T + t) * H + h) * NN + i;
      __syncthreads();
      w_s[i] = ld(w, x);
      k_s[i] = ld(k, x);
      a_s[i] = ld(a, x);
      b_s[i] = ld(bb, x);
      const float vi = ld(v, x);
      __syncthreads();
      const float* prev = scr + ((long)(t - t0) * NN + i) * NN;  // own row of S_{t-1}
      float* out = scr + ((long)(t - t0 + 1) * NN + i) * NN;     // own row of S_t
      float sa = 0.f;
#pragma unroll 8
      for (int j = 0; j < NN; ++j) sa += prev[j] * a_s[j];
      sa_s[t - t0][i] = sa;
#pragma unroll 8
      for (int j = 0; j < NN; ++j) out[j] = prev[j] * w_s[j] + sa * b_s[j] + vi * k_s[j];
    }

    // 2. Sweep the chunk backwards.
    for (int t = t1 - 1; t >= t0; --t) {
      const int s = t - t0;
      const long x = (((long)b * T + t) * H + h) * NN + i;
      __syncthreads();  // scratch / sa_s complete; previous step done with shared
      r_s[i] = ld(r, x);
      w_s[i] = ld(w, x);
      k_s[i] = ld(k, x);
      v_s[i] = ld(v, x);
      a_s[i] = ld(a, x);
      b_s[i] = ld(bb, x);
      dy_s[i] = ld(dy, x);
      __syncthreads();
      const float* S_prev = scr + (long)s * NN * NN;     // S_{t-1}
      const float* S_cur = scr + (long)(s + 1) * NN * NN;  // S_t
      const float dyi = dy_s[i], ri = r_s[i];

      // value side (row i): dS_t = dS + dy r^T; dv_i, dsa_i
      float dvi = 0.f, dsai = 0.f;
#pragma unroll
      for (int j = 0; j < NN; ++j) {
        dSr[j] += dyi * r_s[j];
        dvi += dSr[j] * k_s[j];
        dsai += dSr[j] * b_s[j];
      }
      dsa_s[i] = dsai;
      if constexpr (!kRegCols) {
#pragma unroll
        for (int j = 0; j < NN; ++j) dscr[(long)i * NN + j] = dSr[j];
      }

      // key side (column i): dr_i, dk_i, db_i, dw_i
      float dri = 0.f, dki = 0.f, dbi = 0.f, dwi = 0.f;
      if constexpr (kRegCols) {
#pragma unroll
        for (int m = 0; m < NN; ++m) {
          dSc[m] += dy_s[m] * ri;
          dri += dy_s[m] * S_cur[m * NN + i];
          dki += dSc[m] * v_s[m];
          dbi += dSc[m] * sa_s[s][m];
          dwi += dSc[m] * S_prev[m * NN + i];
        }
      }
      __syncthreads();  // dsa_s (and dscr) complete
      if constexpr (!kRegCols) {
#pragma unroll 8
        for (int m = 0; m < NN; ++m) {
          const float g = dscr[(long)m * NN + i];  // dS_t[m][i], dy r^T included
          dri += dy_s[m] * S_cur[m * NN + i];
          dki += g * v_s[m];
          dbi += g * sa_s[s][m];
          dwi += g * S_prev[m * NN + i];
        }
      }
      float dai = 0.f;
      const float wi = w_s[i], ai = a_s[i];
#pragma unroll
      for (int m = 0; m < NN; ++m) {
        dai += dsa_s[m] * S_prev[m * NN + i];
        if constexpr (kRegCols) dSc[m] = dSc[m] * wi + dsa_s[m] * ai;
      }
#pragma unroll
      for (int j = 0; j < NN; ++j) dSr[j] = dSr[j] * w_s[j] + dsai * a_s[j];

      st((X*)p.dr, x, dri);
      st((X*)p.dw, x, dwi);
      st((X*)p.dk, x, dki);
      st((X*)p.dv, x, dvi);
      st((X*)p.da, x, dai);
      st((X*)p.db, x, dbi);
    }
  }
#pragma unroll
  for (int j = 0; j < NN; ++j) p.dh0[(bh * NN + i) * NN + j] = dSr[j];
}

// extern "C" entry points: wkv7_{fwd,bwd}_v1_{f32,bf16}_n{32,64,128}
#define WKV7_V1_INSTANCE(X, XN, NN)                                                     \
  extern "C" __global__ void __launch_bounds__(NN)                                      \
      wkv7_fwd_v1_##XN##_n##NN(const __grid_constant__ Wkv7Params p) {                 \
    wkv7_fwd_v1<X, NN>(p);                                                              \
  }                                                                                     \
  extern "C" __global__ void __launch_bounds__(NN)                                      \
      wkv7_bwd_v1_##XN##_n##NN(const __grid_constant__ Wkv7Params p) {                 \
    wkv7_bwd_v1<X, NN>(p);                                                              \
  }                                                                                     \
  EMU_ENTRY(wkv7_fwd_v1_##XN##_n##NN, Wkv7Params)                                       \
  EMU_ENTRY(wkv7_bwd_v1_##XN##_n##NN, Wkv7Params)

WKV7_V1_INSTANCE(float, f32, 32)
WKV7_V1_INSTANCE(float, f32, 64)
WKV7_V1_INSTANCE(float, f32, 128)
WKV7_V1_INSTANCE(bf16, bf16, 32)
WKV7_V1_INSTANCE(bf16, bf16, 64)
WKV7_V1_INSTANCE(bf16, bf16, 128)
