// kernels/model_ops.cu — the element-wise and normalisation kernels of the
// RWKV-7 (x070) forward pass (everything but the GEMMs and the WKV
// recurrence). f32 I/O, except ops_f32_to_bf16 (the bf16 GEMM operand).
// CPU twins: src/ops/reference.rs; launchers: src/ops/{emu,cuda}.rs; tests:
// tests/ops_backends.rs, tests/model_device_bf16.rs.
//
// Two launch shapes (chosen in src/ops/mod.rs, `Geom`):
//  * element-wise kernels: 1-D grid-stride loops over elements (or columns);
//    any grid and block size works.
//  * row kernels (LayerNorm, GroupNorm, L2 norm): one warp per row, block
//    (32, rows_per_block); rows are walked with a grid-stride loop over warps,
//    so the trip count is uniform within a warp and every shuffle has all 32
//    lanes. No __syncthreads anywhere.
//
// Layouts: activations are row-major [rows, C] with C = H * N (head h owns
// columns h*N .. h*N+N-1); per-channel parameters are [C].
#include "common.cuh"

#include <math.h>

#define OPS_DECAY_SCALE 0.60653066f  // e^{-1/2}: w = exp(-e^{-1/2} sigmoid(d))

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// Index of the first row of this warp and the stride between a warp's rows.
#define ROW_LOOP(row, nrows)                                          \
  for (long row = (long)blockIdx.x * blockDim.y + threadIdx.y; row < (nrows); \
       row += (long)gridDim.x * blockDim.y)

#define ELEM_LOOP(i, n)                                                   \
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long)gridDim.x * blockDim.x)

// y[r] = (x[r] - mean) / sqrt(var + eps) * weight + bias, per row of C.
// Two passes over the row (mean, then centred variance), like the reference.
extern "C" __global__ void __launch_bounds__(256)
    ops_layer_norm_f32(const __grid_constant__ LayerNormParams p) {
  const int lane = threadIdx.x, C = p.C;
  ROW_LOOP(row, p.rows) {
    const float* x = p.x + row * C;
    float* y = p.y + row * C;
    float s = 0.f;
    for (int j = lane; j < C; j += 32) s += x[j];
    const float mean = warp_sum(s) / (float)C;
    float q = 0.f;
    for (int j = lane; j < C; j += 32) {
      const float d = x[j] - mean;
      q += d * d;
    }
    const float inv = 1.f / sqrtf(warp_sum(q) / (float)C + p.eps);
    for (int j = lane; j < C; j += 32) y[j] = (x[j] - mean) * inv * p.weight[j] + p.bias[j];
  }
}
EMU_ENTRY(ops_layer_norm_f32, LayerNormParams)

// Per (token, head) row of N: GroupNorm (eps), affine, "r_k bonus"
// (sum_j r_j k_j r_k[h, j]) * v, then the gate:  y = (GN(x) + bonus * v) * g.
// r/k/v/r_k NULL = no bonus; g NULL = no gate. y may equal x.
extern "C" __global__ void __launch_bounds__(256)
    ops_group_norm_f32(const __grid_constant__ GroupNormParams p) {
  const int lane = threadIdx.x, H = p.H, N = p.N;
  ROW_LOOP(row, (long)p.rows * H) {
    const long base = row * N;  // [t, h, :] of a [rows, H*N] tensor
    const int c0 = (int)(row % H) * N;
    const float* x = p.x + base;
    float s = 0.f;
    for (int j = lane; j < N; j += 32) s += x[j];
    const float mean = warp_sum(s) / (float)N;
    float q = 0.f;
    for (int j = lane; j < N; j += 32) {
      const float d = x[j] - mean;
      q += d * d;
    }
    const float inv = 1.f / sqrtf(warp_sum(q) / (float)N + p.eps);
    float bonus = 0.f;
    if (p.r) {
      float bs = 0.f;
      for (int j = lane; j < N; j += 32) bs += p.r[base + j] * p.k[base + j] * p.r_k[c0 + j];
      bonus = warp_sum(bs);
    }
    for (int j = lane; j < N; j += 32) {
      float z = (x[j] - mean) * inv * p.weight[c0 + j] + p.bias[c0 + j];
      if (p.r) z += bonus * p.v[base + j];
      if (p.g) z *= p.g[base + j];
      p.y[base + j] = z;
    }
  }
}
EMU_ENTRY(ops_group_norm_f32, GroupNormParams)

// Per (token, head) row of N, with alpha = sigmoid(a0 + da):
//   kappa = k * k_k,  kh = kappa / max(|kappa|_2, 1e-12)
//   a = -kh,  b = kh * alpha,  k_out = k * (1 + (alpha - 1) * k_a)
// k_out may equal k.
extern "C" __global__ void __launch_bounds__(256)
    ops_kk_prep_f32(const __grid_constant__ KkPrepParams p) {
  const int lane = threadIdx.x, H = p.H, N = p.N;
  ROW_LOOP(row, (long)p.rows * H) {
    const long base = row * N;
    const int c0 = (int)(row % H) * N;
    float ss = 0.f;
    for (int j = lane; j < N; j += 32) {
      const float q = p.k[base + j] * p.k_k[c0 + j];
      ss += q * q;
    }
    const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
    for (int j = lane; j < N; j += 32) {
      const float kj = p.k[base + j];
      const float al = sigmoid_f(p.a0[c0 + j] + p.da[base + j]);
      const float kh = kj * p.k_k[c0 + j] * inv;
      p.a[base + j] = -kh;
      p.b[base + j] = kh * al;
      p.k_out[base + j] = kj * (1.f + (al - 1.f) * p.k_a[c0 + j]);
    }
  }
}
EMU_ENTRY(ops_kk_prep_f32, KkPrepParams)

// Token shift + lerp, one thread per column j walking the T tokens in order
// (so the carried state column is read first and written last by the same
// thread):  out[t, m, j] = x[t, j] + (x[t-1, j] - x[t, j]) * mu[m, j],
// x[-1, j] = state[j];  afterwards state[j] = x[T-1, j].
extern "C" __global__ void __launch_bounds__(256)
    ops_token_shift_f32(const __grid_constant__ TokenShiftParams p) {
  const int T = p.T, C = p.C, M = p.n_mix;
  ELEM_LOOP(i, (long)p.B * C) {
    const long b = i / C, j = i % C;
    float prev = p.state[i];
    const float* x = p.x + b * T * C;
    float* out = p.out + b * T * M * C;
    for (int t = 0; t < T; ++t) {
      const float cur = x[(long)t * C + j];
      float* o = out + (long)t * M * C + j;
      for (int m = 0; m < M; ++m) o[(long)m * C] = cur + (prev - cur) * p.mu[(long)m * C + j];
      prev = cur;
    }
    p.state[i] = prev;
  }
}
EMU_ENTRY(ops_token_shift_f32, TokenShiftParams)

// In place: x[i] = f(x[i] + bias[i % C]) (bias NULL = 0), f by mode
// (OPS_ACT_* in params.h): tanh, sigmoid, relu^2, x070 decay exp(-e^{-1/2} sigmoid).
extern "C" __global__ void __launch_bounds__(256)
    ops_act_f32(const __grid_constant__ ActParams p) {
  const int C = p.C, mode = p.mode;
  ELEM_LOOP(i, p.n) {
    float z = p.x[i];
    if (p.bias) z = p.bias[i % C] + z;
    switch (mode) {
      case OPS_ACT_TANH: z = tanhf(z); break;
      case OPS_ACT_SIGMOID: z = sigmoid_f(z); break;
      case OPS_ACT_RELU_SQ: z = fmaxf(z, 0.f); z = z * z; break;
      default: z = expf(-OPS_DECAY_SCALE * sigmoid_f(z)); break;
    }
    p.x[i] = z;
  }
}
EMU_ENTRY(ops_act_f32, ActParams)

// Value residual, in place: v += (v_first - v) * sigmoid(v0 + dv).
extern "C" __global__ void __launch_bounds__(256)
    ops_value_residual_f32(const __grid_constant__ ValueResidualParams p) {
  const int C = p.C;
  ELEM_LOOP(i, (long)p.rows * C) {
    const float vi = p.v[i];
    p.v[i] = vi + (p.v_first[i] - vi) * sigmoid_f(p.v0[i % C] + p.dv[i]);
  }
}
EMU_ENTRY(ops_value_residual_f32, ValueResidualParams)

// Residual add, in place: x += y.
extern "C" __global__ void __launch_bounds__(256) ops_add_f32(const __grid_constant__ AddParams p) {
  ELEM_LOOP(i, p.n) p.x[i] += p.y[i];
}
EMU_ENTRY(ops_add_f32, AddParams)

// Embedding gather: out[t, :] = table[tokens[t], :] (tokens int32, in range).
extern "C" __global__ void __launch_bounds__(256)
    ops_embed_f32(const __grid_constant__ EmbedParams p) {
  const int C = p.C;
  const int32_t* tok = (const int32_t*)p.tokens;
  ELEM_LOOP(i, (long)p.T * C) {
    const long t = i / C, j = i % C;
    p.out[i] = p.table[(long)tok[t] * C + j];
  }
}
EMU_ENTRY(ops_embed_f32, EmbedParams)

// Activation operand of the bf16 GEMMs: y[r, j] = bf16_rn(x[r * ld + j]) for
// j < cols, y dense [rows, cols] (round to nearest even, like
// half::bf16::from_f32 in the CPU twin).
extern "C" __global__ void __launch_bounds__(256)
    ops_f32_to_bf16(const __grid_constant__ F32ToBf16Params p) {
  const int cols = p.cols;
  const long ld = p.ld;
  bf16* y = (bf16*)p.y;
  ELEM_LOOP(i, (long)p.rows * cols) {
    const long r = i / cols, j = i % cols;
    st(y, i, p.x[r * ld + j]);
  }
}
EMU_ENTRY(ops_f32_to_bf16, F32ToBf16Params)
