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
 *   scratch         [B, H, chunk + 1, N, N] f32  backward workspace
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
