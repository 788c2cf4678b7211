// kernels/emu_selftest.cu — kernels that exercise the execution model itself
// (warp shuffles, shared memory, barriers, float atomics) and, under the CPU
// emulator, the watchdog. Test: tests/emu_selftest.rs.
#include "common.cuh"

// Grid any, block 128 (4 warps). out[0] += Σ x (xor-shuffle tree per warp,
// shared partials, one atomicAdd per block); out[1] = max x (atomic-free:
// block 0 only, xor-shuffle max over a grid-stride loop); out[2] = Σ x over
// the whole array computed by block 0 with __shfl_down_sync.
extern "C" __global__ void __launch_bounds__(128) emu_selftest_reduce(const __grid_constant__ EmuTestParams p) {
  __shared__ float part[4];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + tid; i < p.n; i += gridDim.x * blockDim.x) s += p.x[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) part[warp] = s;
  __syncthreads();
  if (tid == 0) atomicAdd(&p.out[0], part[0] + part[1] + part[2] + part[3]);

  if (blockIdx.x == 0) {
    float m = -3.0e38f, d = 0.f;
    for (int i = tid; i < p.n; i += blockDim.x) {
      m = fmaxf(m, p.x[i]);
      d += p.x[i];
    }
    for (int o = 16; o > 0; o >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      d += __shfl_down_sync(0xffffffffu, d, o);
    }
    __syncthreads();  // everyone has read part[] above
    if (lane == 0) part[warp] = m;
    __syncthreads();
    if (tid == 0) p.out[1] = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
    __syncthreads();
    if (lane == 0) part[warp] = d;
    __syncthreads();
    if (tid == 0) p.out[2] = part[0] + part[1] + part[2] + part[3];
  }
}

// A deliberately broken kernel: thread 0 skips a barrier the others wait at.
// Undefined behaviour on a GPU (never launched there); under the emulator it
// must make the launch fail through the watchdog instead of hanging.
extern "C" __global__ void emu_selftest_divergent(const __grid_constant__ EmuTestParams p) {
  if (threadIdx.x != 0) __syncthreads();
  if (threadIdx.x == 0 && p.out) p.out[0] = 1.f;
}

// Also broken on purpose: lane 5 of every warp skips a shuffle the other
// lanes of its warp execute (a warp-level barrier that cannot complete).
extern "C" __global__ void emu_selftest_divergent_shfl(const __grid_constant__ EmuTestParams p) {
  float v = (float)threadIdx.x;
  if ((threadIdx.x & 31) != 5) v += __shfl_xor_sync(0xffffffffu, v, 1);
  if (threadIdx.x == 0 && p.out) p.out[0] = v;
}

// One warp stores and loads one shared float per lane at word lane * p.n
// (mode 0). On a GPU: gcd(p.n, 32) wavefronts per access (1 for p.n = 0, a
// broadcast). Checks the CPU emulator's bank counting
// (tests/emu_counters.rs); never needed on a GPU.
extern "C" __global__ void emu_selftest_banks(const __grid_constant__ EmuTestParams p) {
  __shared__ float buf[1024];
  const int i = (int)((threadIdx.x * (unsigned)p.n) & 1023u);
  buf[i] = (float)threadIdx.x;
  __syncwarp();
  const float v = buf[i];
  if (v < 0.f) p.out[0] = v;  // never true; keeps the load on every lane
}

EMU_ENTRY(emu_selftest_reduce, EmuTestParams)
EMU_ENTRY(emu_selftest_banks, EmuTestParams)
EMU_ENTRY(emu_selftest_divergent_shfl, EmuTestParams)
EMU_ENTRY(emu_selftest_divergent, EmuTestParams)
