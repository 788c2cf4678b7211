// kernels/tune_ops.cu — the backward-pass and optimizer kernels of on-device
// state tuning (f32). CPU twins: src/ops/backward_ref.rs; launchers:
// src/ops/backward_{emu,cuda}.rs; tests: tests/backward_ops.rs. The GEMM
// dx = dy·W (`matmul_t`) and the WKV backward are not here (cuBLAS / Rust,
// and kernels/wkv7_v1.cu).
//
// Launch shapes (from `Geom`, src/ops/mod.rs), as in kernels/model_ops.cu:
//  * element-wise kernels: 1-D grid-stride loops over elements (or columns,
//    or output entries); any grid and block size works.
//  * row kernels (LayerNorm, GroupNorm, kk_prep backward): one warp per row
//    (or per (row, head)), block (32, rows_per_block), grid-stride over
//    warps, so a warp's trip count is uniform and every shuffle has all 32
//    lanes. No __syncthreads (the upscale kernels exchange values between
//    the lanes of a warp through memory, ordered by __syncwarp).
//  * block kernels (xent: one block per row; sumsq: one partial per block):
//    blockDim.x a multiple of 32 (at most 256), blockDim.y = 1; every thread
//    of a block runs the same loop trip counts, so the __syncthreads in the
//    block reductions are uniform.
// Reductions run in a fixed order (no atomics): results are deterministic
// for a given geometry.
//
// Layouts: activations are row-major [rows, C] with C = H * N (head h owns
// columns h*N .. h*N+N-1); per-channel parameters are [C].
#include "common.cuh"

#include <math.h>

#define TUNE_DECAY_SCALE 0.60653066f  // e^{-1/2}: w = exp(-e^{-1/2} sigmoid(d))

// Sum / max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float tn_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float tn_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum / max over a block of blockDim.x (a multiple of 32, blockDim.y = 1);
// every thread gets the result. `sh` is __shared__ float[32]. Every thread
// of the block must call it (it contains __syncthreads).
__device__ __forceinline__ float tn_block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = tn_warp_sum(v);
  __syncthreads();  // earlier readers of sh are done
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return tn_warp_sum(lane < nw ? sh[lane] : 0.f);
}
__device__ __forceinline__ float tn_block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = tn_warp_max(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return tn_warp_max(lane < nw ? sh[lane] : -INFINITY);
}

__device__ __forceinline__ float tn_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// One warp per row: `row` walks [0, nrows) with a grid-stride loop over warps.
#define ROW_LOOP(row, nrows)                                                  \
  for (long row = (long)blockIdx.x * blockDim.y + threadIdx.y; row < (nrows); \
       row += (long)gridDim.x * blockDim.y)

// One thread per element: grid-stride loop.
#define ELEM_LOOP(i, n)                                               \
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long)gridDim.x * blockDim.x)

// LayerNorm backward, accumulating into dx. One warp per row of C.
//   x [rows, C] (forward input), weight [C], dy [rows, C], dx [rows, C] (+=).
// With x̂ = (x − mean)·rs, g = dy·weight:
//   dx += rs · (g − mean(g) − x̂ · mean(g · x̂)).
extern "C" __global__ void __launch_bounds__(256)
    tune_layer_norm_bwd_f32(const __grid_constant__ LayerNormBwdParams p) {
  const int lane = threadIdx.x, C = p.C;
  ROW_LOOP(row, p.rows) {
    const float* x = p.x + row * C;
    const float* dy = p.dy + row * C;
    float* dx = p.dx + row * C;
    float s = 0.f;
    for (int j = lane; j < C; j += 32) s += x[j];
    const float mean = tn_warp_sum(s) / (float)C;
    float q = 0.f;
    for (int j = lane; j < C; j += 32) {
      const float d = x[j] - mean;
      q += d * d;
    }
    const float rs = 1.f / sqrtf(tn_warp_sum(q) / (float)C + p.eps);
    float m1 = 0.f, m2 = 0.f;
    for (int j = lane; j < C; j += 32) {
      const float g = dy[j] * p.weight[j];
      m1 += g;
      m2 += g * (x[j] - mean) * rs;
    }
    m1 = tn_warp_sum(m1) / (float)C;
    m2 = tn_warp_sum(m2) / (float)C;
    for (int j = lane; j < C; j += 32) {
      const float xh = (x[j] - mean) * rs;
      dx[j] += rs * (dy[j] * p.weight[j] - m1 - xh * m2);
    }
  }
}
EMU_ENTRY(tune_layer_norm_bwd_f32, LayerNormBwdParams)

// Token-shift backward, one thread per column j walking the T tokens.
//   d0..d{M-1} [T, C] (M = n_mix, 1..6), mu [M, C], dstate [C] (in/out),
//   dx [T, C] (overwritten).
// Forward: out_m[t] = x_t (1 − mu_m) + x_{t−1} mu_m, x_{−1} = state_in,
// state_out = x_{T−1}. So dx_t = Σ_m d_m[t](1 − mu_m) + Σ_m d_m[t+1] mu_m
// (t + 1 < T) or + dstate (t = T − 1); dstate_in = Σ_m d_m[0] mu_m.
extern "C" __global__ void __launch_bounds__(256)
    tune_token_shift_bwd_f32(const __grid_constant__ TokenShiftBwdParams p) {
  const int T = p.T, C = p.C, M = p.n_mix;
  if (T <= 0) return;  // state_out = state_in: dstate passes through
  ELEM_LOOP(i, (long)p.B * C) {
    const long b = i / C, j = i % C, base = b * T * C;
    const float* d[6] = {p.d0, p.d1, p.d2, p.d3, p.d4, p.d5};
    float u[6];
#pragma unroll
    for (int m = 0; m < 6; ++m) u[m] = m < M ? p.mu[(long)m * C + j] : 0.f;
    for (int t = 0; t < T; ++t) {
      float cur = 0.f, nxt = 0.f;
#pragma unroll
      for (int m = 0; m < 6; ++m) {
        if (m < M) {
          cur += d[m][base + (long)t * C + j] * (1.f - u[m]);
          if (t + 1 < T) nxt += d[m][base + (long)(t + 1) * C + j] * u[m];
        }
      }
      if (t + 1 == T) nxt = p.dstate[i];
      p.dx[base + (long)t * C + j] = cur + nxt;
    }
    float s = 0.f;
#pragma unroll
    for (int m = 0; m < 6; ++m)
      if (m < M) s += d[m][base + j] * u[m];
    p.dstate[i] = s;
  }
}
EMU_ENTRY(tune_token_shift_bwd_f32, TokenShiftBwdParams)

// Activation backward, in place: dy[i] *= f'(pre[i] + bias[i % C]).
//   pre [n], bias [C] or NULL, dy [n]; mode OPS_ACT_* (params.h).
extern "C" __global__ void __launch_bounds__(256)
    tune_act_bwd_f32(const __grid_constant__ ActBwdParams p) {
  const int C = p.C, mode = p.mode;
  ELEM_LOOP(i, p.n) {
    float v = p.pre[i];
    if (p.bias) v = p.bias[i % C] + v;
    float d;
    switch (mode) {
      case OPS_ACT_TANH: {
        const float t = tanhf(v);
        d = 1.f - t * t;
        break;
      }
      case OPS_ACT_SIGMOID: {
        const float s = tn_sigmoid(v);
        d = s * (1.f - s);
        break;
      }
      case OPS_ACT_RELU_SQ: d = 2.f * fmaxf(v, 0.f); break;
      default: {
        const float s = tn_sigmoid(v);
        const float w = expf(-TUNE_DECAY_SCALE * s);
        d = -w * TUNE_DECAY_SCALE * s * (1.f - s);
        break;
      }
    }
    p.dy[i] *= d;
  }
}
EMU_ENTRY(tune_act_bwd_f32, ActBwdParams)

// The removal key's normalisation in one (row, head), by a whole warp:
// *inv = 1 / max(|κ|, 1e-12) with κ = k·k_k, *pp = κ̂·dκ̂ with
// dκ̂ = d_b·α − d_a, α = σ(a0 + da) (0 when the norm is clamped). Shared by
// the kk_prep backward and the SDT gradients; every lane gets both.
__device__ __forceinline__ void tn_kk_norm(const float* k, const float* k_k, const float* a0,
                                           const float* da, const float* d_a, const float* d_b,
                                           long base, int c0, int N, int lane, float* inv,
                                           float* pp) {
  float ss = 0.f;
  for (int j = lane; j < N; j += 32) {
    const float q = k[base + j] * k_k[c0 + j];
    ss += q * q;
  }
  const float nrm = sqrtf(tn_warp_sum(ss));
  const float iv = 1.f / fmaxf(nrm, 1e-12f);
  float s = 0.f;
  for (int j = lane; j < N; j += 32) {
    const long i = base + j;
    const int q = c0 + j;
    const float al = tn_sigmoid(a0[q] + da[i]);
    const float kh = k[i] * k_k[q] * iv;
    s += kh * (d_b[i] * al - d_a[i]);
  }
  s = tn_warp_sum(s);
  *inv = iv;
  *pp = nrm <= 1e-12f ? 0.f : s;
}

// kk_prep backward, one warp per (row, head) of N (any N; lanes loop).
//   k, da, d_kout, d_a, d_b, dk, dda [rows, H*N]; a0, k_k, k_a [H*N].
// α = σ(a0 + da), κ = k·k_k, κ̂ = κ / max(|κ|, 1e-12); forward a = −κ̂,
// b = κ̂α, k_out = k(1 + (α − 1)k_a). With dκ̂ = d_b·α − d_a and
// p = κ̂·dκ̂ (0 when the norm is clamped):
//   dda = (d_b κ̂ + d_kout k k_a) α(1 − α)
//   dk  = d_kout (1 + (α − 1) k_a) + (dκ̂ − κ̂ p) / max(|κ|, 1e-12) · k_k.
extern "C" __global__ void __launch_bounds__(256)
    tune_kk_prep_bwd_f32(const __grid_constant__ KkPrepBwdParams p) {
  const int lane = threadIdx.x, H = p.H, N = p.N;
  ROW_LOOP(row, (long)p.rows * H) {
    const long base = row * N;
    const int c0 = (int)(row % H) * N;
    float inv, pp;
    tn_kk_norm(p.k, p.k_k, p.a0, p.da, p.d_a, p.d_b, base, c0, N, lane, &inv, &pp);
    for (int j = lane; j < N; j += 32) {
      const long i = base + j;
      const int q = c0 + j;
      const float al = tn_sigmoid(p.a0[q] + p.da[i]);
      const float kh = p.k[i] * p.k_k[q] * inv;
      const float dkh = p.d_b[i] * al - p.d_a[i];
      const float dal = p.d_b[i] * kh + p.d_kout[i] * p.k[i] * p.k_a[q];
      p.dda[i] = dal * al * (1.f - al);
      p.dk[i] = p.d_kout[i] * (1.f + (al - 1.f) * p.k_a[q]) + (dkh - kh * pp) * inv * p.k_k[q];
    }
  }
}
EMU_ENTRY(tune_kk_prep_bwd_f32, KkPrepBwdParams)

// Value-residual backward, element-wise over n.
//   vraw, v_first, dvp, dv (in/out), dvf (+=), ddv (out) [n]; v0 [C].
// Forward v = vraw + (v_first − vraw)·s, s = σ(v0 + dvp).
extern "C" __global__ void __launch_bounds__(256)
    tune_value_residual_bwd_f32(const __grid_constant__ ValueResidualBwdParams p) {
  const int C = p.C;
  ELEM_LOOP(i, p.n) {
    const float s = tn_sigmoid(p.v0[i % C] + p.dvp[i]);
    const float g = p.dv[i];
    p.dvf[i] += g * s;
    p.ddv[i] = g * (p.v_first[i] - p.vraw[i]) * s * (1.f - s);
    p.dv[i] = g * (1.f - s);
  }
}
EMU_ENTRY(tune_value_residual_bwd_f32, ValueResidualBwdParams)

// GroupNorm + bonus + gate backward, one warp per (row, head) of N.
//   y, r, k, v, g, dout [rows, H*N] inputs; weight, bias, r_k [H*N];
//   dy, dr, dk, dv, dg [rows, H*N] overwritten.
// Forward: z = ŷ·weight + bias + β·v with ŷ = GN(y), β = Σ_j r k r_k;
// out = z·g. With dz = dout·g: dg = dout·z, dv = β dz, dβ = Σ dz v,
// dy = rs (dz w − mean(dz w) − ŷ mean(dz w ŷ)), dr = dβ k r_k, dk = dβ r r_k.
extern "C" __global__ void __launch_bounds__(256)
    tune_group_norm_bwd_f32(const __grid_constant__ GroupNormBwdParams p) {
  const int lane = threadIdx.x, H = p.H, N = p.N;
  ROW_LOOP(row, (long)p.rows * H) {
    const long base = row * N;
    const int c0 = (int)(row % H) * N;
    const float* y = p.y + base;
    float s = 0.f;
    for (int j = lane; j < N; j += 32) s += y[j];
    const float mean = tn_warp_sum(s) / (float)N;
    float q = 0.f;
    for (int j = lane; j < N; j += 32) {
      const float d = y[j] - mean;
      q += d * d;
    }
    const float rs = 1.f / sqrtf(tn_warp_sum(q) / (float)N + p.eps);
    float bs = 0.f;
    for (int j = lane; j < N; j += 32) bs += p.r[base + j] * p.k[base + j] * p.r_k[c0 + j];
    const float bonus = tn_warp_sum(bs);
    float dbonus = 0.f, m1 = 0.f, m2 = 0.f;
    for (int j = lane; j < N; j += 32) {
      const long i = base + j;
      const int c = c0 + j;
      const float yh = (y[j] - mean) * rs;
      const float z = yh * p.weight[c] + p.bias[c] + bonus * p.v[i];
      p.dg[i] = p.dout[i] * z;
      const float dz = p.dout[i] * p.g[i];
      p.dv[i] = bonus * dz;
      dbonus += dz * p.v[i];
      const float gq = dz * p.weight[c];
      m1 += gq;
      m2 += gq * yh;
    }
    dbonus = tn_warp_sum(dbonus);
    m1 = tn_warp_sum(m1) / (float)N;
    m2 = tn_warp_sum(m2) / (float)N;
    for (int j = lane; j < N; j += 32) {
      const long i = base + j;
      const int c = c0 + j;
      const float yh = (y[j] - mean) * rs;
      const float dz = p.dout[i] * p.g[i];
      p.dy[i] = rs * (dz * p.weight[c] - m1 - yh * m2);
      p.dr[i] = dbonus * p.k[i] * p.r_k[c];
      p.dk[i] = dbonus * p.r[i] * p.r_k[c];
    }
  }
}
EMU_ENTRY(tune_group_norm_bwd_f32, GroupNormBwdParams)

// Softmax cross-entropy (+ lam·KL(soft ‖ softmax)), one block per row of V
// (grid-stride over rows; the threads of a block loop over V).
//   logits [rows, V] in place → ∂L/∂logits; targets [rows] int32; mask [rows];
//   soft [rows, V] or NULL; loss [rows].
// lse = max + log Σ exp(z − max); q = exp(z − lse);
// grad = mask·((q − 1[j = tgt]) + lam (psum·q − soft_j)), psum = Σ_{soft>0} soft;
// loss = mask·(lse − z_tgt + lam Σ_{soft>0} soft (log soft − (z − lse))).
extern "C" __global__ void __launch_bounds__(256) tune_xent_f32(const __grid_constant__ XentParams p) {
  __shared__ float sh[32];
  const int V = p.V;
  const int32_t* tg = (const int32_t*)p.targets;
  const bool use_soft = p.soft != NULL && p.lam != 0.f;
  for (long row = blockIdx.x; row < p.rows; row += gridDim.x) {
    float* z = p.logits + row * V;
    const float mk = p.mask[row];
    if (mk == 0.f) {  // uniform over the block
      for (int j = threadIdx.x; j < V; j += blockDim.x) z[j] = 0.f;
      if (threadIdx.x == 0) p.loss[row] = 0.f;
      continue;
    }
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, z[j]);
    mx = tn_block_max(mx, sh);
    float se = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) se += expf(z[j] - mx);
    const float lse = mx + logf(tn_block_sum(se, sh));
    const int tgt = tg[row];
    const float zt = z[tgt];
    float kl = 0.f, psum = 0.f;
    if (use_soft) {
      const float* q = p.soft + row * V;
      for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float pj = q[j];
        if (pj > 0.f) {
          kl += pj * (logf(pj) - (z[j] - lse));
          psum += pj;
        }
      }
      kl = tn_block_sum(kl, sh);
      psum = tn_block_sum(psum, sh);
    }
    __syncthreads();  // every thread has read z[tgt] before it is overwritten
    if (use_soft) {
      const float* q = p.soft + row * V;
      for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float e = expf(z[j] - lse);
        const float oh = j == tgt ? 1.f : 0.f;
        z[j] = mk * ((e - oh) + p.lam * (psum * e - q[j]));
      }
    } else {
      for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float e = expf(z[j] - lse);
        const float oh = j == tgt ? 1.f : 0.f;
        z[j] = mk * (e - oh);
      }
    }
    if (threadIdx.x == 0) {
      float l = lse - zt;
      if (use_soft) l += p.lam * kl;
      p.loss[row] = mk * l;
    }
  }
}
EMU_ENTRY(tune_xent_f32, XentParams)

// Softmax with temperature, in place, one block per row of V (grid-stride
// over rows; the threads of a block loop over V), as the observer's soft
// targets: x = exp((x − max)·inv_temp) / Σ exp((x − max)·inv_temp).
extern "C" __global__ void __launch_bounds__(256) tune_softmax_f32(const __grid_constant__ SoftmaxParams p) {
  __shared__ float sh[32];
  const int V = p.V;
  for (long row = blockIdx.x; row < p.rows; row += gridDim.x) {
    float* z = p.x + row * V;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, z[j]);
    mx = tn_block_max(mx, sh);
    float se = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float e = expf((z[j] - mx) * p.inv_temp);
      z[j] = e;
      se += e;
    }
    const float s = tn_block_sum(se, sh);
    for (int j = threadIdx.x; j < V; j += blockDim.x) z[j] = z[j] / s;
  }
}
EMU_ENTRY(tune_softmax_f32, SoftmaxParams)

// Second moments, one thread per (h, i, j) walking the rows.
//   r [rows, H, N]; acc [H, N, N]: acc[h, i, j] += Σ_t r[t, h, i] r[t, h, j].
extern "C" __global__ void __launch_bounds__(256)
    tune_outer_acc_f32(const __grid_constant__ OuterAccParams p) {
  const long N = p.N, NN = N * N, C = (long)p.H * N;
  ELEM_LOOP(e, (long)p.H * NN) {
    const long h = e / NN, i = (e / N) % N, j = e % N;
    const float* ri = p.r + h * N + i;
    const float* rj = p.r + h * N + j;
    float s = 0.f;
    for (long t = 0; t < p.rows; ++t) s += ri[t * C] * rj[t * C];
    p.acc[e] += s;
  }
}
EMU_ENTRY(tune_outer_acc_f32, OuterAccParams)

// Kernel-upscaled read-out (docs/upscale.md), one warp per (row, head); the
// lanes stride over the M support vectors and over the N channels.
//   r [rows, H*N]; centres [H, M, N]; gamma [H]; u [H, N, M]; phi [rows, H, M]
//   (overwritten); y [rows, H*N] (+=).
// ℓ_m = −γ‖r − c_m‖², φ = softmax(ℓ) (max-shifted), y_i += Σ_m u[i, m] φ_m.
// φ goes through phi (global memory): each lane writes its own entries, and
// after the __syncwarp every lane reads all M of them.
extern "C" __global__ void __launch_bounds__(256) tune_up_fwd_f32(const __grid_constant__ UpFwdParams p) {
  const int lane = threadIdx.x, H = p.H, N = p.N, M = p.M;
  ROW_LOOP(row, (long)p.rows * H) {
    const long h = row % H;
    const float* r = p.r + row * N;
    const float* c = p.centres + h * M * N;
    const float* u = p.u + h * N * M;
    const float gam = p.gamma[h];
    float* ph = p.phi + row * M;
    if (p.linear) {
      // state offset: φ = r (M == N)
      for (int q = lane; q < M; q += 32) ph[q] = r[q];
      __syncwarp();
      float* y = p.y + row * N;
      for (int i = lane; i < N; i += 32) {
        const float* ui = u + (long)i * M;
        float s = 0.f;
        for (int q = 0; q < M; ++q) s += ui[q] * ph[q];
        y[i] += s;
      }
      continue;
    }
    float mx = -INFINITY;
    for (int q = lane; q < M; q += 32) {
      const float* cq = c + (long)q * N;
      float d2 = 0.f;
      for (int j = 0; j < N; ++j) {
        const float d = r[j] - cq[j];
        d2 += d * d;
      }
      const float lg = -(gam * d2);
      ph[q] = lg;
      mx = fmaxf(mx, lg);
    }
    mx = tn_warp_max(mx);
    float se = 0.f;
    for (int q = lane; q < M; q += 32) {
      const float e = expf(ph[q] - mx);
      ph[q] = e;
      se += e;
    }
    const float inv = 1.f / tn_warp_sum(se);
    for (int q = lane; q < M; q += 32) ph[q] *= inv;
    __syncwarp();  // every lane's φ entries are written
    float* y = p.y + row * N;
    for (int i = lane; i < N; i += 32) {
      const float* ui = u + (long)i * M;
      float s = 0.f;
      for (int q = 0; q < M; ++q) s += ui[q] * ph[q];
      y[i] += s;
    }
  }
}
EMU_ENTRY(tune_up_fwd_f32, UpFwdParams)

// Backward of tune_up_fwd_f32 into dr (+=), one warp per (row, head).
// With g_m = Σ_i u[i, m] dy_i, pg = Σ_m φ_m g_m and dℓ_m = φ_m (g_m − pg):
//   dr_j += 2γ (Σ_m dℓ_m c_{m,j} − (Σ_m dℓ_m) r_j).
// Pass 1 computes pg; pass 2 walks the support vectors in tiles of 32
// (one per lane), recomputes g_m, stages the tile's dℓ in shared memory
// (one 32-float slice per warp of the block; Geom::rows launches at most 8
// warps per block) and adds the tile's part of Σ_m dℓ_m c_{m,j} to the
// lane's own channels j. The tile loop's trip count is uniform over the warp.
#define TUNE_UP_MAX_WARPS 8
extern "C" __global__ void __launch_bounds__(256)
    tune_up_bwd_dr_f32(const __grid_constant__ UpBwdParams p) {
  __shared__ float sh[TUNE_UP_MAX_WARPS * 32];
  const int lane = threadIdx.x, H = p.H, N = p.N, M = p.M;
  float* sd = sh + (threadIdx.y % TUNE_UP_MAX_WARPS) * 32;
  ROW_LOOP(row, (long)p.rows * H) {
    const long h = row % H;
    const float* r = p.r + row * N;
    const float* dy = p.dy + row * N;
    const float* c = p.centres + h * M * N;
    const float* u = p.u + h * N * M;
    const float* ph = p.phi + row * M;
    const float tg = 2.f * p.gamma[h];
    float* dr = p.dr + row * N;
    if (p.linear) {
      // state offset: dr_j += Σ_i u[i, j] dy_i (M == N)
      for (int j = lane; j < N; j += 32) {
        float a = 0.f;
        for (int i = 0; i < N; ++i) a += u[(long)i * M + j] * dy[i];
        dr[j] += a;
      }
      continue;
    }
    float s = 0.f;
    for (int q = lane; q < M; q += 32) {
      float g = 0.f;
      for (int i = 0; i < N; ++i) g += u[(long)i * M + q] * dy[i];
      s += ph[q] * g;
    }
    const float pg = tn_warp_sum(s);
    float sdl = 0.f;
    for (int q0 = 0; q0 < M; q0 += 32) {
      const int q = q0 + lane;
      float dl = 0.f;
      if (q < M) {
        float g = 0.f;
        for (int i = 0; i < N; ++i) g += u[(long)i * M + q] * dy[i];
        dl = ph[q] * (g - pg);
      }
      sdl += dl;
      sd[lane] = dl;
      __syncwarp();
      const int nq = M - q0 < 32 ? M - q0 : 32;
      for (int j = lane; j < N; j += 32) {
        float a = 0.f;
        for (int k = 0; k < nq; ++k) a += sd[k] * c[(long)(q0 + k) * N + j];
        dr[j] += tg * a;
      }
      __syncwarp();  // the tile is read before the next one is staged
    }
    sdl = tn_warp_sum(sdl);
    for (int j = lane; j < N; j += 32) dr[j] -= tg * sdl * r[j];
  }
}
EMU_ENTRY(tune_up_bwd_dr_f32, UpBwdParams)

// Backward of tune_up_fwd_f32 into du (+=), one thread per (h, i, m) walking
// the rows (no two threads write the same entry):
//   du[h, i, m] += Σ_t dy[t, h, i] φ[t, h, m].
extern "C" __global__ void __launch_bounds__(256)
    tune_up_bwd_du_f32(const __grid_constant__ UpBwdParams p) {
  const long N = p.N, M = p.M, H = p.H, NM = N * M, C = H * N;
  ELEM_LOOP(e, H * NM) {
    const long h = e / NM, i = (e / M) % N, q = e % M;
    const float* dy = p.dy + h * N + i;
    const float* ph = p.phi + h * M + q;
    float s = 0.f;
    for (long t = 0; t < p.rows; ++t) s += dy[t * C] * ph[t * H * M];
    p.du[e] += s;
  }
}
EMU_ENTRY(tune_up_bwd_du_f32, UpBwdParams)

// Batched square GEMM, one thread per output element (g, i, j).
//   a, b, out [groups, N, N]: out[g] = a[g] b[g] (trans_b: a[g] b[g]^T).
extern "C" __global__ void __launch_bounds__(256)
    tune_batched_matmul_f32(const __grid_constant__ BatchedMatmulParams p) {
  const long N = p.N, NN = N * N;
  ELEM_LOOP(e, (long)p.groups * NN) {
    const long g = e / NN, i = (e / N) % N, j = e % N;
    const float* a = p.a + g * NN + i * N;
    const float* b = p.b + g * NN;
    float s = 0.f;
    if (p.trans_b) {
      for (long q = 0; q < N; ++q) s += a[q] * b[j * N + q];
    } else {
      for (long q = 0; q < N; ++q) s += a[q] * b[q * N + j];
    }
    p.out[e] = s;
  }
}
EMU_ENTRY(tune_batched_matmul_f32, BatchedMatmulParams)

// Adam / AdamW, element-wise, in place on p, m, v; g [n] read only.
extern "C" __global__ void __launch_bounds__(256) tune_adam_f32(const __grid_constant__ AdamParams p) {
  float scale = p.grad_scale;
  if (p.stats) {
    const float norm = sqrtf(p.stats[1]) * p.grad_scale;
    if (!isfinite(norm)) return;  // the host reports it; nothing is updated
    if (p.clip > 0.f && norm > p.clip) scale *= p.clip / norm;
  }
  ELEM_LOOP(i, p.n) {
    const float gi = p.g[i] * scale;
    const float mi = p.beta1 * p.m[i] + (1.f - p.beta1) * gi;
    const float vi = p.beta2 * p.v[i] + (1.f - p.beta2) * gi * gi;
    p.m[i] = mi;
    p.v[i] = vi;
    const float upd = (mi / p.bc1) / (sqrtf(vi / p.bc2) + p.eps);
    float pi = p.p[i];
    if (p.weight_decay > 0.f) pi -= p.lr * p.weight_decay * pi;
    p.p[i] = pi - p.lr * upd;
  }
}
EMU_ENTRY(tune_adam_f32, AdamParams)

// DBP's step per group (one block each): M = I - step, step from
// Z = scale * z as in tune/dbp.rs, its row-sum norm clipped to max_norm.
extern "C" __global__ void __launch_bounds__(256) tune_dbp_step_f32(const __grid_constant__ DbpStepParams p) {
  __shared__ float sh[32];
  __shared__ float rows[1024];
  const int N = p.N;
  const long NN = (long)N * N;
  for (long g = blockIdx.x; g < p.groups; g += gridDim.x) {
    const float* z = p.z + g * NN;
    float* m = p.m + g * NN;
    for (long e = threadIdx.x; e < NN; e += blockDim.x) {
      const int i = (int)(e / N), j = (int)(e % N);
      const float zij = p.scale * z[e];
      m[e] = i == j ? p.eta * p.kappa * (zij - 1.f) : p.eta * (1.f - p.kappa) * zij;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
      float r = 0.f;
      for (int j = 0; j < N; ++j) r += fabsf(m[(long)i * N + j]);
      rows[i] = r;
    }
    __syncthreads();
    float mx = 0.f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) mx = fmaxf(mx, rows[i]);
    const float norm = tn_block_max(mx, sh);
    const float f = norm > p.max_norm ? p.max_norm / norm : 1.f;
    for (long e = threadIdx.x; e < NN; e += blockDim.x) {
      const int i = (int)(e / N), j = (int)(e % N);
      m[e] = (i == j ? 1.f : 0.f) - f * m[e];
    }
    __syncthreads();
  }
}
EMU_ENTRY(tune_dbp_step_f32, DbpStepParams)

// out = alpha I + beta x per [N, N] group (element-wise; out may be x).
extern "C" __global__ void __launch_bounds__(256) tune_eye_axpy_f32(const __grid_constant__ EyeAxpyParams p) {
  const long NN = (long)p.N * p.N;
  ELEM_LOOP(e, p.groups * NN) {
    const long k = e % NN;
    const bool diag = k / p.N == k % p.N;
    p.out[e] = (diag ? p.alpha : 0.f) + p.beta * p.x[e];
  }
}
EMU_ENTRY(tune_eye_axpy_f32, EyeAxpyParams)

// A device scalar: out[slot] += sum x (mode 0) or sum x^2 (mode 1), one block.
extern "C" __global__ void __launch_bounds__(256) tune_reduce_f32(const __grid_constant__ ReduceParams p) {
  __shared__ float sh[32];
  if (blockIdx.x != 0) return;
  float s = 0.f;
  for (long i = threadIdx.x; i < p.n; i += blockDim.x) {
    const float v = p.x[i];
    s += p.mode ? v * v : v;
  }
  s = tn_block_sum(s, sh);
  if (threadIdx.x == 0) p.out[p.slot] += s;
}
EMU_ENTRY(tune_reduce_f32, ReduceParams)

// Sum over a batch: dst[i] = (accumulate ? dst[i] : 0) + sum_b src[b, i].
//   src [B, n], dst [n] (distinct).
extern "C" __global__ void __launch_bounds__(256)
    tune_sum_batch_f32(const __grid_constant__ SumBatchParams p) {
  ELEM_LOOP(i, p.n) {
    float s = p.accumulate ? p.dst[i] : 0.f;
    for (int b = 0; b < p.B; ++b) s += p.src[(long)b * p.n + i];
    p.dst[i] = s;
  }
}
EMU_ENTRY(tune_sum_batch_f32, SumBatchParams)

// Σ x² per block: partial[blockIdx.x] (no atomics; the host adds the
// gridDim.x partials in f64).  x [n], partial [gridDim.x].
extern "C" __global__ void __launch_bounds__(256) tune_sumsq_f32(const __grid_constant__ SumsqParams p) {
  __shared__ float sh[32];
  float s = 0.f;
  ELEM_LOOP(i, p.n) {
    const float v = p.x[i];
    s += v * v;
  }
  s = tn_block_sum(s, sh);
  if (threadIdx.x == 0) p.partial[blockIdx.x] = s;
}
EMU_ENTRY(tune_sumsq_f32, SumsqParams)

// The LoRA branch's input (docs/lora.md): dropout and the alpha/r scale in
// one element-wise pass, from a strided x into a dense [rows, K].
//   x [rows, ldx] (K <= ldx), out [rows, K].
// An element is kept when keep == 1, else when the hash of (seed, sequence,
// position, column) as a uniform in [0, 1) is below keep; out = x * scale if kept, else 0. The
// mask is a pure function of (seed, index), so the backward reapplies it to
// the gradient with the same seed (the CPU twin hashes identically).
__device__ __forceinline__ unsigned tn_hash(unsigned seed, unsigned i) {
  unsigned h = i * 0x9E3779B9u ^ seed;
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}
extern "C" __global__ void __launch_bounds__(256) tune_lora_in_f32(const __grid_constant__ LoraInParams p) {
  const long K = p.K, T = p.T;
  ELEM_LOOP(i, (long)p.rows * K) {
    const long row = i / K, j = i % K;
    float v = p.x[row * p.ldx + j] * p.scale;
    if (p.keep < 1.f) {
      const unsigned s = tn_hash((unsigned)p.seed, (unsigned)(p.seq0 + row / T));
      const unsigned e = (unsigned)((row % T) * K + j);
      const float u = (float)(tn_hash(s, e) >> 8) * (1.f / 16777216.f);
      if (!(u < p.keep)) v = 0.f;
    }
    p.out[i] = v;
  }
}
EMU_ENTRY(tune_lora_in_f32, LoraInParams)

// The gradients of the key-indexed vectors k_k, k_a, r_k per element (the
// caller sums them over rows): sparse dimension tuning (docs/sdt.md) trains
// these entries. One warp per (row, head) of N.
//   k, da, d_kout, d_a, d_b, r, kt, v, g, dout, dkk, dka, drk [rows, H*N];
//   a0, k_k [H*N].
// With κ = k·k_k, κ̂ = κ / max(|κ|, 1e-12), α = σ(a0 + da), dκ̂ = d_b α − d_a,
// p = κ̂·dκ̂ (0 when the norm is clamped): dκ = (dκ̂ − κ̂ p) / max(|κ|, 1e-12),
// dkk = dκ k; k_out = k(1 + (α − 1)k_a) gives dka = d_kout k (α − 1); the
// bonus β = Σ r kt r_k gives drk = (Σ_j dout_j g_j v_j) r kt.
extern "C" __global__ void __launch_bounds__(256) tune_sdt_bwd_f32(const __grid_constant__ SdtBwdParams p) {
  const int lane = threadIdx.x, H = p.H, N = p.N;
  ROW_LOOP(row, (long)p.rows * H) {
    const long base = row * N;
    const int c0 = (int)(row % H) * N;
    float inv, pp;
    tn_kk_norm(p.k, p.k_k, p.a0, p.da, p.d_a, p.d_b, base, c0, N, lane, &inv, &pp);
    float db = 0.f;
    for (int j = lane; j < N; j += 32) db += p.dout[base + j] * p.g[base + j] * p.v[base + j];
    const float dbonus = tn_warp_sum(db);
    for (int j = lane; j < N; j += 32) {
      const long i = base + j;
      const int q = c0 + j;
      const float al = tn_sigmoid(p.a0[q] + p.da[i]);
      const float kh = p.k[i] * p.k_k[q] * inv;
      const float dkh = p.d_b[i] * al - p.d_a[i];
      p.dkk[i] = (dkh - kh * pp) * inv * p.k[i];
      p.dka[i] = p.d_kout[i] * p.k[i] * (al - 1.f);
      p.drk[i] = dbonus * p.r[i] * p.kt[i];
    }
  }
}
EMU_ENTRY(tune_sdt_bwd_f32, SdtBwdParams)

// x *= m, element-wise over n (a sparse delta's gradient masked).
extern "C" __global__ void __launch_bounds__(256) tune_mask_mul_f32(const __grid_constant__ MaskMulParams p) {
  ELEM_LOOP(i, p.n) p.x[i] *= p.m[i];
}
EMU_ENTRY(tune_mask_mul_f32, MaskMulParams)
