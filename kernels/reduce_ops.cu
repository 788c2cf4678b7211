// kernels/reduce_ops.cu — training-free token reduction for the RWKV-7
// prefill (issue 15, docs/token-reduction.md): a per-token importance score,
// the bipartite cosine argmax that links each low-importance token to its
// most similar kept candidate, and the order-preserving gather / weighted
// scatter-mean that applies one index map to x, dx and v_first.
// CPU twins: src/ops/reduce.rs (`twin`); launchers: the same file (emu and
// cuda); tests: tests/token_reduction.rs.
//
// Every sum is written as separate multiply and add (`MUL` / `ADD`: no FMA
// contraction on the GPU) in a fixed order (32 lane partials, then the
// xor-butterfly warp_sum), so the Rust twin reproduces it bit for bit.
#include "common.cuh"

#include <math.h>

#ifdef CUDA_EMU
#define RED_MUL(a, b) ((a) * (b))
#define RED_ADD(a, b) ((a) + (b))
#else
#define RED_MUL(a, b) __fmul_rn((a), (b))
#define RED_ADD(a, b) __fadd_rn((a), (b))
#endif

__device__ __forceinline__ float red_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = RED_ADD(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

#define RED_ROW_LOOP(row, nrows)                                               \
  for (long row = (long)blockIdx.x * blockDim.y + threadIdx.y; row < (nrows); \
       row += (long)gridDim.x * blockDim.y)

#define RED_ELEM_LOOP(i, n)                                               \
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long)gridDim.x * blockDim.x)

// score[r] = metric over the C channels of row r (see TokScoreParams).
extern "C" __global__ void __launch_bounds__(256)
    red_score_f32(const __grid_constant__ TokScoreParams p) {
  const int lane = threadIdx.x, C = p.C, m = p.metric;
  RED_ROW_LOOP(row, p.rows) {
    const float* x = p.x + row * C;
    float s = 0.f;
    for (int j = lane; j < C; j += 32) {
      const float v = x[j];
      float f;
      if (m == 0) f = v > 0.f ? v : 0.f;
      else if (m == 1) f = fabsf(v);
      else if (m == 2) f = RED_MUL(v, v);
      else if (m == 3) f = v;
      else f = 1.f - v;
      s = RED_ADD(s, f);
    }
    s = red_warp_sum(s) / (float)C;
    if (m == 2) s = sqrtf(s);
    if (lane == 0) p.score[row] = s;
  }
}
EMU_ENTRY(red_score_f32, TokScoreParams)

// For each a row: the b row of highest cosine similarity (first on ties).
extern "C" __global__ void __launch_bounds__(256)
    red_match_f32(const __grid_constant__ TokMatchParams p) {
  const int lane = threadIdx.x, C = p.C;
  RED_ROW_LOOP(i, p.na) {
    const float* xa = p.x + (long)p.a_idx[i] * C;
    float qa = 0.f;
    for (int j = lane; j < C; j += 32) qa = RED_ADD(qa, RED_MUL(xa[j], xa[j]));
    const float na = sqrtf(red_warp_sum(qa));
    float best = -INFINITY;
    int arg = 0;
    for (int b = 0; b < p.nb; ++b) {
      const float* xb = p.x + (long)p.b_idx[b] * C;
      float d = 0.f, qb = 0.f;
      for (int j = lane; j < C; j += 32) {
        d = RED_ADD(d, RED_MUL(xa[j], xb[j]));
        qb = RED_ADD(qb, RED_MUL(xb[j], xb[j]));
      }
      d = red_warp_sum(d);
      const float nb = sqrtf(red_warp_sum(qb));
      const float cs = d / fmaxf(RED_MUL(na, nb), 1e-12f);
      if (cs > best) {
        best = cs;
        arg = b;
      }
    }
    if (lane == 0) {
      p.best[i] = (float)arg;
      p.sim[i] = best;
    }
  }
}
EMU_ENTRY(red_match_f32, TokMatchParams)

// out[k, :] = sum_e w[e] x[src[e], :] / sum_e w[e] over e in ptr[k]..ptr[k+1].
extern "C" __global__ void __launch_bounds__(256)
    red_gather_f32(const __grid_constant__ TokGatherParams p) {
  const long C = p.C;
  RED_ELEM_LOOP(i, (long)p.K * C) {
    const long k = i / C, j = i % C;
    const int e0 = (int)p.ptr[k], e1 = (int)p.ptr[k + 1];
    float acc = 0.f, ws = 0.f;
    for (int e = e0; e < e1; ++e) {
      const float w = p.w[e];
      acc = RED_ADD(acc, RED_MUL(w, p.x[(long)p.src[e] * C + j]));
      ws = RED_ADD(ws, w);
    }
    p.out[i] = acc / ws;
  }
}
EMU_ENTRY(red_gather_f32, TokGatherParams)
