// kernels/emu/cuda_emu.h — runs the project's CUDA kernel sources on the CPU.
//
// The same .cu file is compiled twice: by nvcc for the GPU, and by the host
// C++ compiler (g++ -std=c++20 -DCUDA_EMU) against this header, so that CI,
// which has no GPU, executes the real kernel code and compares it with the
// Rust reference.
//
// Execution model (one block at a time, one OS thread per CUDA thread):
//   * emu::launch() holds a global mutex: launches never overlap, so
//     `__shared__` can map to a function-local `static` (one block is alive).
//   * every CUDA thread of the block is a std::thread; each walks all blocks of
//     the grid in order, with an internal barrier between blocks;
//   * `__syncthreads()` is a block barrier, `__syncwarp()` a warp barrier,
//     shuffles go through a per-warp exchange buffer between two warp barriers;
//   * atomics use std::atomic_ref (C++20).
//   * Watchdog: every barrier wait gives up after emu_watchdog_ms (default
//     20 s, env RWKV_EMU_WATCHDOG_MS or emu_set_watchdog_ms()). A timed-out
//     or divergent barrier aborts the launch: every thread unwinds and the
//     launch returns a non-zero code instead of hanging the test process.
//
// Fidelity limits (see docs/emulation.md): no SIMT lockstep, no co-resident
// blocks, x86 memory model, libm instead of SFU approximations, no FMA
// contraction unless the host compiler does it.
#pragma once
#ifndef CUDA_EMU
#error "cuda_emu.h is only for the CPU emulation build (-DCUDA_EMU)"
#endif

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

// Thrown inside an emulated thread when the launch is being aborted.
struct Abort {};

inline std::atomic<bool> g_abort{false};
inline std::atomic<long> g_watchdog_ms{-1};

inline long watchdog_ms() {
  long v = g_watchdog_ms.load();
  if (v < 0) {
    const char* e = std::getenv("RWKV_EMU_WATCHDOG_MS");
    v = e ? std::atol(e) : 20000;
    if (v <= 0) v = 20000;
    g_watchdog_ms.store(v);
  }
  return v;
}

// A reusable barrier for `count` threads whose wait gives up (and aborts the
// whole launch) after the watchdog time, or as soon as another barrier did.
class Barrier {
 public:
  explicit Barrier(int count = 0) : count_(count) {}
  void reset(int count) { count_ = count; arrived_ = 0; }
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    if (g_abort.load()) throw Abort{};
    const uint64_t gen = gen_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(watchdog_ms());
    while (gen_ == gen) {
      if (g_abort.load()) throw Abort{};
      if (std::chrono::steady_clock::now() >= deadline) {
        g_abort.store(true);
        throw Abort{};
      }
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  Barrier bar;
  uint64_t slot[32];
};

struct ThreadCtx {
  dim3 tid;
  dim3 bid;
  Barrier* block_bar = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
};

inline thread_local ThreadCtx tctx;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline unsigned char* g_dyn_smem = nullptr;
inline std::mutex g_launch_mutex;

// Runs `kernel()` for every thread of every block of the grid. Returns 0 on
// success, 1 when the watchdog fired or a barrier diverged, 2 on a bad launch
// configuration, 3 when the kernel threw something unexpected.
template <class F>
int launch(dim3 grid, dim3 block, size_t dyn_smem, F kernel) {
  std::lock_guard<std::mutex> guard(g_launch_mutex);
  const unsigned long nthreads = (unsigned long)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      dyn_smem > 227 * 1024)
    return 2;
  g_abort.store(false);
  g_block_dim = block;
  g_grid_dim = grid;
  std::vector<unsigned char> smem(dyn_smem + 16);
  g_dyn_smem = smem.data();
  Barrier block_bar((int)nthreads);
  Barrier block_end((int)nthreads);
  const unsigned nwarps = (unsigned)((nthreads + 31) / 32);
  std::vector<Warp> warps(nwarps);
  for (unsigned w = 0; w < nwarps; ++w) {
    const unsigned long rem = nthreads - 32ul * w;
    warps[w].bar.reset((int)(rem < 32 ? rem : 32));
  }
  std::atomic<int> unexpected{0};
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned long t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      tctx.tid = dim3((unsigned)(t % block.x), (unsigned)((t / block.x) % block.y),
                      (unsigned)(t / ((unsigned long)block.x * block.y)));
      tctx.block_bar = &block_bar;
      tctx.warp = &warps[t / 32];
      tctx.lane = (int)(t % 32);
      try {
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
              tctx.bid = dim3(bx, by, bz);
              kernel();
              block_end.wait();
            }
      } catch (const Abort&) {
        g_abort.store(true);
      } catch (...) {
        unexpected.fetch_add(1);
        g_abort.store(true);
      }
    });
  }
  for (auto& th : threads) th.join();
  g_dyn_smem = nullptr;
  if (unexpected.load()) return 3;
  return g_abort.load() ? 1 : 0;
}

template <class T>
inline T shfl_exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Warp* w = tctx.warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slot[tctx.lane] = bits;
  w->bar.wait();
  uint64_t got = w->slot[src_lane & 31];
  w->bar.wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

}  // namespace emu

// `used`: emitted (as a COMDAT) in every kernel object, so Rust can link it.
extern "C" __attribute__((used)) inline void emu_set_watchdog_ms(long ms) { emu::g_watchdog_ms.store(ms); }

// ---- the CUDA vocabulary, mapped onto the emulator ----------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define threadIdx (::emu::tctx.tid)
#define blockIdx (::emu::tctx.bid)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

inline void __syncthreads() { ::emu::tctx.block_bar->wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::tctx.warp->bar.wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int base = ::emu::tctx.lane & ~(width - 1);
  return ::emu::shfl_exchange(v, base + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = ::emu::tctx.lane;
  const int base = lane & ~(width - 1);
  return ::emu::shfl_exchange(v, base + ((lane ^ mask) & (width - 1)));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::tctx.lane;
  const int base = lane & ~(width - 1);
  const int rel = (lane & (width - 1)) + (int)delta;
  return ::emu::shfl_exchange(v, rel < width ? base + rel : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::tctx.lane;
  const int base = lane & ~(width - 1);
  const int rel = (lane & (width - 1)) - (int)delta;
  return ::emu::shfl_exchange(v, rel >= 0 ? base + rel : lane);
}

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v);
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// bf16 with round-to-nearest-even, bit-compatible with cuda_bf16.h.
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = (uint32_t)h.x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet
    h.x = (uint16_t)((u >> 16) | 0x40u);
    return h;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  h.x = (uint16_t)(u >> 16);
  return h;
}

// Exports a kernel to Rust: `int emu_<name>(grid, block, smem, const P*)`.
#define EMU_ENTRY(name, P)                                                           \
  extern "C" int emu_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx,     \
                            unsigned by, unsigned bz, unsigned smem, const P* p) {  \
    const P params = *p;                                                             \
    return ::emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), smem,                   \
                         [params] { name(params); });                                \
  }
