/* kernels/params.h — the one description of every kernel's parameters.
 *
 * Included by the CUDA kernels (nvcc), by their CPU emulation (g++ -DCUDA_EMU)
 * and read by build.rs, which generates the matching #[repr(C)] Rust structs
 * (src/params.rs includes them) and a C++ table of offsetof() values that a
 * test compares with Rust's offset_of!, so the two sides cannot disagree.
 *
 * Format rules (build.rs parses this file): structs are written as
 * `typedef struct Name {` ... `} Name;`, one field per line, `<type> <name>;`
 * with <type> one of int32_t, float, const void*, void*, const float*, float*.
 * Pointer fields become u64 in Rust (a device address on the GPU, a host
 * address under emulation).
 */
#pragma once
#include <stdint.h>

/* Tokens between saved fp32 states in the v1 (FMA) WKV-7 kernels. */
#define WKV7_V1_CHUNK 16

/* WKV-7 forward and backward (kernels/wkv7_v1.cu).
 * Per (b, h): S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,
 *             y_t = S_t r_t;  S is [N, N] value-major (row = value index i,
 *             column = key index j), always fp32. */
typedef struct Wkv7Params {
  int32_t B;
  int32_t T;
  int32_t H;
  int32_t N;
  int32_t chunk;
  int32_t n_chunks;
  const void* r;
  const void* w;
  const void* k;
  const void* v;
  const void* a;
  const void* b;
  const float* h0;
  void* y;
  float* h_t;
  float* ckpt;
  const void* dy;
  const float* dh_t;
  void* dr;
  void* dw;
  void* dk;
  void* dv;
  void* da;
  void* db;
  float* dh0;
  float* scratch;
} Wkv7Params;
/* Field shapes (dtype X = the kernel's I/O dtype, f32 or bf16):
 *   r w k v a b     [B, T, H, N] X    inputs (w: decay in (0, 1])
 *   h0              [B, H, N, N] f32  initial state, NULL = zero
 *   y               [B, T, H, N] X    output
 *   h_t             [B, H, N, N] f32  final state, NULL = not written
 *   ckpt            [B, H, n_chunks, N, N] f32  state before token c*chunk;
 *                   written by the forward when non-NULL, read by the backward
 *   dy              [B, T, H, N] X    gradient of y
 *   dh_t            [B, H, N, N] f32  gradient of the final state, NULL = zero
 *   dr dw dk dv da db [B, T, H, N] X  gradients of the inputs
 *   dh0             [B, H, N, N] f32  gradient of the initial state
 *   scratch         [B, H, chunk + 2, N, N] f32  backward workspace (v1)
 */

/* Self-test kernels of the emulator (kernels/emu_selftest.cu). */
typedef struct EmuTestParams {
  int32_t n;
  int32_t mode;
  const float* x;
  float* out;
} EmuTestParams;
/*   x    [n] f32 input;  out [3] f32: sum of x (shuffle + shared + atomics),
 *        max of x (shuffle), and the block-0 sum computed with __shfl_down_sync. */

/* Model element-wise / normalisation kernels (kernels/model_ops.cu), f32.
 * Activations are row-major [rows, C] with C = H * N. */
#define OPS_ACT_TANH 0
#define OPS_ACT_SIGMOID 1
#define OPS_ACT_RELU_SQ 2
#define OPS_ACT_DECAY 3

typedef struct LayerNormParams {
  int32_t rows;
  int32_t C;
  float eps;
  const float* x;
  const float* weight;
  const float* bias;
  float* y;
} LayerNormParams;
/*   x, y [rows, C] (y may equal x); weight, bias [C]. */

typedef struct GroupNormParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  float eps;
  const float* x;
  const float* weight;
  const float* bias;
  const float* r;
  const float* k;
  const float* v;
  const float* r_k;
  const float* g;
  float* y;
} GroupNormParams;
/*   x, y, r, k, v, g [rows, H*N] (y may equal x); weight, bias, r_k [H*N].
 *   y = (GroupNorm_h(x) * weight + bias + (sum_j r k r_k) * v) * g;
 *   r (with k, v, r_k) NULL = no bonus term, g NULL = no gate. */

typedef struct KkPrepParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  const float* k;
  const float* da;
  const float* a0;
  const float* k_k;
  const float* k_a;
  float* k_out;
  float* a;
  float* b;
} KkPrepParams;
/*   k, da, k_out, a, b [rows, H*N] (k_out may equal k); a0, k_k, k_a [H*N].
 *   alpha = sigmoid(a0 + da), kh = L2normalize_head(k * k_k),
 *   a = -kh, b = kh * alpha, k_out = k * (1 + (alpha - 1) * k_a). */

typedef struct TokenShiftParams {
  int32_t B;
  int32_t T;
  int32_t C;
  int32_t n_mix;
  const float* x;
  float* state;
  const float* mu;
  float* out;
} TokenShiftParams;
/*   B sequences of T rows: x [B, T, C]; state [B, C] (x_{-1} in, x_{T-1}
 *   out, per sequence); mu [n_mix, C];
 *   out [B, T, n_mix, C] = x + (shift(x) - x) * mu[m]. */

typedef struct ActParams {
  int32_t n;
  int32_t C;
  int32_t mode;
  float* x;
  const float* bias;
} ActParams;
/*   x [n] in place, n a multiple of C; bias [C] or NULL;
 *   x = f_mode(x + bias), mode one of OPS_ACT_*. */

typedef struct ValueResidualParams {
  int32_t rows;
  int32_t C;
  float* v;
  const float* v_first;
  const float* v0;
  const float* dv;
} ValueResidualParams;
/*   v, v_first, dv [rows, C]; v0 [C].  v += (v_first - v) * sigmoid(v0 + dv). */

typedef struct AddParams {
  int32_t n;
  float* x;
  const float* y;
} AddParams;
/*   x, y [n]; x += y. */

typedef struct EmbedParams {
  int32_t T;
  int32_t C;
  const void* tokens;
  const float* table;
  float* out;
} EmbedParams;
/*   tokens [T] int32 (each < rows of table); table [V, C]; out [T, C]. */

typedef struct F32ToBf16Params {
  int32_t rows;
  int32_t cols;
  int32_t ld;
  const float* x;
  void* y;
} F32ToBf16Params;
/*   x [rows, ld] f32 (row r at x + r * ld, ld >= cols); y [rows, cols] bf16,
 *   dense.  y = bf16(x[:, :cols]), round to nearest even (NaN stays NaN):
 *   the activation operand of the bf16 GEMMs. */

/* Self-test of the tensor-core helpers in kernels/mma.cuh (kernels/mma_selftest.cu). */
typedef struct MmaTestParams {
  int32_t mode;
  const float* a;
  const float* b;
  const float* c;
  float* out;
} MmaTestParams;
/*   one warp (block 32).  mode 0: out[16x8] = a[16x16] b[16x8] + c[16x8], one
 *   bf16 MMA (a, b must be bf16-exact).  mode 1: the same with fp32 a, b via
 *   the hi/lo split (mma3).  mode 2: out[16x8] = (a[16x16] b[16x16]) b2[16x8]
 *   + c, where b2 = b + 256, the inner product kept in C fragments and fed
 *   back as an A operand (C -> A reuse), both products split.  modes 3, 4:
 *   out = a b[:, 0..8] + c with b 16x16 and bf16-exact a, b, fragments by
 *   ldmatrix (3: A row-major, B [k][n] with .trans; 4: A transposed with
 *   .trans, B^T [n][k]).  Row-major. */

/* Backward and optimizer kernels of on-device state tuning
 * (kernels/tune_ops.cu), f32. CPU twins: src/ops/backward_ref.rs.
 * Activations are row-major [rows, C] with C = H * N. */

typedef struct LayerNormBwdParams {
  int32_t rows;
  int32_t C;
  float eps;
  const float* x;
  const float* weight;
  const float* dy;
  float* dx;
} LayerNormBwdParams;
/*   x [rows, C] (the forward input, statistics recomputed); weight [C];
 *   dy [rows, C]; dx [rows, C] accumulated: dx += dL/dx of LN(x)*weight + b. */

typedef struct TokenShiftBwdParams {
  int32_t B;
  int32_t T;
  int32_t C;
  int32_t n_mix;
  const float* d0;
  const float* d1;
  const float* d2;
  const float* d3;
  const float* d4;
  const float* d5;
  const float* mu;
  float* dstate;
  float* dx;
} TokenShiftBwdParams;
/*   B sequences of T rows: d0 .. d{n_mix-1} [B, T, C] the gradients of the
 *   n_mix mixes (the rest unused, may be NULL); mu [n_mix, C];
 *   dstate [B, C]: dL/d(state out) in, dL/d(state in) out, per sequence;
 *   dx [B, T, C] overwritten. 1 <= n_mix <= 6. */

typedef struct ActBwdParams {
  int32_t n;
  int32_t C;
  int32_t mode;
  const float* pre;
  const float* bias;
  float* dy;
} ActBwdParams;
/*   pre [n] (the activation input before bias); bias [C] or NULL;
 *   dy [n] in place: dy *= f_mode'(pre + bias[i % C]), mode one of OPS_ACT_*. */

typedef struct KkPrepBwdParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  const float* k;
  const float* da;
  const float* a0;
  const float* k_k;
  const float* k_a;
  const float* d_kout;
  const float* d_a;
  const float* d_b;
  float* dk;
  float* dda;
} KkPrepBwdParams;
/*   k, da, d_kout, d_a, d_b, dk, dda [rows, H*N]; a0, k_k, k_a [H*N].
 *   Backward of KkPrepParams' kernel: dk = dL/dk, dda = dL/dda (overwritten). */

typedef struct ValueResidualBwdParams {
  int32_t n;
  int32_t C;
  const float* vraw;
  const float* v_first;
  const float* v0;
  const float* dvp;
  float* dv;
  float* dvf;
  float* ddv;
} ValueResidualBwdParams;
/*   vraw, v_first, dvp, dv, dvf, ddv [n]; v0 [C].  With s = sigmoid(v0 + dvp):
 *   dvf += dv * s;  ddv = dv * (v_first - vraw) * s * (1 - s);
 *   dv = dv * (1 - s) (in: dL/dv, out: dL/dvraw). */

typedef struct GroupNormBwdParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  float eps;
  const float* y;
  const float* weight;
  const float* bias;
  const float* r;
  const float* k;
  const float* v;
  const float* r_k;
  const float* g;
  const float* dout;
  float* dy;
  float* dr;
  float* dk;
  float* dv;
  float* dg;
} GroupNormBwdParams;
/*   y, r, k, v, g, dout, dy, dr, dk, dv, dg [rows, H*N]; weight, bias, r_k [H*N].
 *   Backward of out = (GroupNorm_h(y) * weight + bias + (sum_j r k r_k) * v) * g
 *   given dout = dL/dout; the five gradients are overwritten. */

typedef struct XentParams {
  int32_t rows;
  int32_t V;
  float lam;
  float* logits;
  const void* targets;
  const float* mask;
  const float* soft;
  float* loss;
} XentParams;
/*   (see tune_xent_f32) */

typedef struct SoftmaxParams {
  int32_t rows;
  int32_t V;
  float inv_temp;
  float* x;
} SoftmaxParams;
/*   x [rows, V] in place: x = softmax(x · inv_temp) per row, the row's
 *   maximum subtracted first (the observer's soft targets at temperature
 *   1 / inv_temp). */
/*   logits [rows, V] in place (become dL/dlogits); targets [rows] int32 (< V);
 *   mask [rows]; soft [rows, V] soft targets or NULL (= none; also unused when
 *   lam == 0); loss [rows] = mask * (CE + lam * KL(soft || softmax)).
 *   Rows with mask 0 get a zero gradient and loss 0. */

typedef struct OuterAccParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  const float* r;
  float* acc;
} OuterAccParams;
/*   r [rows, H, N]; acc [H, N, N]: acc[h, i, j] += sum_t r[t, h, i] r[t, h, j]. */

typedef struct BatchedMatmulParams {
  int32_t groups;
  int32_t N;
  int32_t trans_b;
  const float* a;
  const float* b;
  float* out;
} BatchedMatmulParams;
/*   a, b, out [groups, N, N] (out distinct from a and b):
 *   out[g] = a[g] b[g], or a[g] b[g]^T when trans_b != 0. */

typedef struct UpFwdParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  int32_t M;
  const float* r;
  const float* centres;
  const float* gamma;
  const float* u;
  float* phi;
  float* y;
  int32_t linear;
} UpFwdParams;
/*   linear != 0: state-offset tuning (docs/state-offset.md), M == N and
 *   phi = r (centres, gamma unread): y[t, h] += u[h] r[t, h].
 *   r [rows, H*N]; centres [H, M, N]; gamma [H]; u [H, N, M] (value-major);
 *   phi [rows, H, M] overwritten; y [rows, H*N] (+=). Kernel-upscaled read-out
 *   (docs/upscale.md): phi[t, h] = softmax_m(-gamma[h] |r[t, h] - c[h, m]|^2),
 *   y[t, h] += u[h] phi[t, h]. phi is distinct from every other buffer. */

typedef struct UpBwdParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  int32_t M;
  const float* r;
  const float* centres;
  const float* gamma;
  const float* u;
  const float* phi;
  const float* dy;
  float* du;
  float* dr;
  int32_t linear;
} UpBwdParams;
/*   r, dy [rows, H*N]; centres [H, M, N]; gamma [H]; u [H, N, M];
 *   phi [rows, H, M] (from UpFwdParams' kernel); du [H, N, M] (+=, by
 *   tune_up_bwd_du_f32: du[h, i, m] += sum_t dy[t, h, i] phi[t, h, m]);
 *   dr [rows, H*N] (+=, by tune_up_bwd_dr_f32: with g = u[h]^T dy[t, h],
 *   dl_m = phi_m (g_m - phi.g), dr[t, h] += -2 gamma[h] sum_m dl_m (r - c_m)).
 *   du and dr are distinct from the inputs and from each other. */

typedef struct AdamParams {
  int32_t n;
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;
  float bc1;
  float bc2;
  float grad_scale;
  float* p;
  const float* g;
  float* m;
  float* v;
  float clip;
  const float* stats;
} AdamParams;
/*   p, g, m, v [n]; p, m, v in place. g' = g * grad_scale;
 *   m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
 *   p -= lr * wd * p (when wd > 0); p -= lr * (m / bc1) / (sqrt(v / bc2) + eps).
 *   stats [2] or NULL: when given, stats[1] is the sum of squares of the
 *   whole (unscaled) gradient; norm = sqrt(stats[1]) * grad_scale; a
 *   non-finite norm leaves p, m, v untouched; with clip > 0 and norm > clip
 *   the gradient is scaled by clip / norm as well (global-norm clipping
 *   decided on the device). */

typedef struct DbpStepParams {
  int32_t groups;
  int32_t N;
  float scale;
  float eta;
  float kappa;
  float max_norm;
  const float* z;
  float* m;
} DbpStepParams;
/*   z [groups, N, N]: R (sum x x^T) R^T per group (unscaled); m [groups, N, N]
 *   (distinct from z) = I - step with Z = scale * z,
 *   step = eta * ((1 - kappa) offdiag(Z) + kappa (diag(Z) - I)), scaled down
 *   per group so its row-sum norm is <= max_norm. One block per group,
 *   N <= 1024. */

typedef struct EyeAxpyParams {
  int32_t groups;
  int32_t N;
  float alpha;
  float beta;
  const float* x;
  float* out;
} EyeAxpyParams;
/*   x, out [groups, N, N] (out may be x): out = alpha I + beta x per group. */

typedef struct LoraInParams {
  int32_t rows;
  int32_t K;
  int32_t ldx;
  int32_t T;
  int32_t seq0;
  int32_t seed;
  float keep;
  float scale;
  const float* x;
  float* out;
} LoraInParams;
/*   x [rows, ldx] (row i from x + i*ldx, K <= ldx), out [rows, K]; the rows
 *   are sequences of T rows, the first being sequence seq0 of the batch:
 *   out[i, j] = x[i, j] * scale * d, d = 1 when the element is kept (keep ==
 *   1: always; else when a hash of (seed, sequence, position, j) is below
 *   keep) and 0 when dropped: the mask does not depend on how a batch is
 *   split into launches. The LoRA branch's input (dropout and alpha/r in one pass)
 *   and, with the same seed, its gradient towards x (tune_lora_in_f32). */

typedef struct SdtBwdParams {
  int32_t rows;
  int32_t H;
  int32_t N;
  const float* k;
  const float* da;
  const float* a0;
  const float* k_k;
  const float* d_kout;
  const float* d_a;
  const float* d_b;
  const float* r;
  const float* kt;
  const float* v;
  const float* g;
  const float* dout;
  float* dkk;
  float* dka;
  float* drk;
} SdtBwdParams;
/*   k, da, d_kout, d_a, d_b (as in KkPrepBwdParams), r, kt, v, g, dout (as in
 *   GroupNormBwdParams), dkk, dka, drk [rows, H*N]; a0, k_k [H*N]. Per element
 *   the gradient of the key-indexed vectors k_k, k_a and r_k (summed over
 *   rows by the caller): dkk = dkappa * k, dka = d_kout * k * (alpha - 1),
 *   drk = dbonus * r * kt (tune_sdt_bwd_f32; docs/sdt.md). */

typedef struct MaskMulParams {
  int32_t n;
  const float* m;
  float* x;
} MaskMulParams;
/*   x, m [n]: x *= m (masks the gradient of a sparse delta). */

typedef struct ReduceParams {
  int32_t n;
  int32_t mode;
  int32_t slot;
  const float* x;
  float* out;
} ReduceParams;
/*   x [n]; out[slot] += sum_i x[i] (mode 0) or sum_i x[i]^2 (mode 1).
 *   One block (gridDim.x == 1): a device scalar, no host round trip. */

typedef struct SumBatchParams {
  int32_t B;
  int32_t n;
  int32_t accumulate;
  const float* src;
  float* dst;
} SumBatchParams;
/*   src [B, n]; dst [n] (distinct from src):
 *   dst[i] = (accumulate ? dst[i] : 0) + sum_b src[b, i]. */

typedef struct SumsqParams {
  int32_t n;
  const float* x;
  float* partial;
} SumsqParams;
/*   x [n]; partial [gridDim.x]: block b writes the sum of x[i]^2 over the
 *   elements its grid-stride loop visits (the host adds the partials in f64). */

/* Training-free token reduction (kernels/reduce_ops.cu; issue 15).
 * Token indices travel as exact f32 values (every index < 2^24, checked on
 * the host by src/ops/reduce.rs before upload). */
typedef struct TokScoreParams {
  int32_t rows;
  int32_t C;
  int32_t metric;
  const float* x;
  float* score;
} TokScoreParams;
/*   x [rows, C]; score [rows]. metric 0: mean_j max(0, x) (the paper's "clip"),
 *   1: mean_j |x|, 2: sqrt(mean_j x^2), 3: mean_j x, 4: mean_j (1 - x)
 *   (erase strength when x is the decay). One warp per row. */

typedef struct TokMatchParams {
  int32_t na;
  int32_t nb;
  int32_t C;
  const float* x;
  const float* a_idx;
  const float* b_idx;
  float* best;
  float* sim;
} TokMatchParams;
/*   x [rows, C]; a_idx [na], b_idx [nb] row indices of x; best [na] (the
 *   position in b_idx, as f32) and sim [na]: argmax_j cos(x[a_i], x[b_j]),
 *   first j on ties. One warp per a row. */

typedef struct TokGatherParams {
  int32_t K;
  int32_t C;
  const float* x;
  const float* ptr;
  const float* src;
  const float* w;
  float* out;
} TokGatherParams;
/*   x [rows, C]; ptr [K + 1], src / w [ptr[K]] (CSR: output row k is the
 *   w-weighted mean of rows src[ptr[k] .. ptr[k+1]] of x, summed in that
 *   order); out [K, C], distinct from x. */
