// kernels/emu/cuda_emu.h — runs the project's CUDA kernel sources on the CPU.
//
// The same .cu file is compiled twice: by nvcc for the GPU, and by the host
// C++ compiler (g++ -std=c++20 -DCUDA_EMU) against this header, so that CI,
// which has no GPU, executes the real kernel code and compares it with the
// Rust reference.
//
// Execution model (one block at a time, one user-space fiber per CUDA thread,
// all on the thread that called the launch):
//   * emu::launch() holds a global mutex: launches never overlap, so
//     `__shared__` can map to a function-local `static` (one block is alive).
//   * for each block of the grid, every CUDA thread becomes a fiber with its
//     own stack (mmap'ed once and pooled, a PROT_NONE guard page below each
//     one); a fiber runs until it blocks at a barrier or finishes, then
//     switches directly to the next runnable fiber of the block (round robin).
//     The switch is 14 instructions of hand-written x86-64 assembly (callee-
//     saved registers + stack pointer, no system call); other targets (or
//     -DEMU_FIBER_UCONTEXT) use ucontext's swapcontext.
//   * threadIdx / blockIdx read the running fiber's context through the
//     global `emu::g_cur`, which every switch updates (no thread_local).
//   * `__syncthreads()` is a block barrier, `__syncwarp()` a warp barrier,
//     shuffles go through a per-warp exchange buffer between two warp barriers;
//     a barrier's last arrival wakes the waiters and carries on running.
//   * atomics use std::atomic_ref (C++20).
//   * Watchdog: a barrier that can never complete (every live fiber waits and
//     none can run: a divergent `__syncthreads` or a missing lane at a warp
//     barrier) is detected at once, every fiber unwinds and the launch returns
//     1. A fiber that never reaches a barrier or its end (a spin-wait, an
//     endless loop) cannot be pre-empted: a monitor thread then ends the
//     process with a message after max(watchdog, 5 s) without any switch
//     (emu_watchdog_ms: default 20 s, env RWKV_EMU_WATCHDOG_MS or
//     emu_set_watchdog_ms()) instead of hanging the test run.
//
// Fidelity limits (see docs/emulation.md): no SIMT lockstep, no co-resident
// blocks, no spin-waits between threads of a block (a fiber is never
// pre-empted), x86 memory model, libm instead of SFU approximations, no FMA
// contraction unless the host compiler does it.
#pragma once
#ifndef CUDA_EMU
#error "cuda_emu.h is only for the CPU emulation build (-DCUDA_EMU)"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(__x86_64__) || defined(EMU_FIBER_UCONTEXT)
#define EMU_FIBER_USE_UCONTEXT 1
#include <ucontext.h>
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#ifndef EMU_FIBER_USE_UCONTEXT
// emu_fiber_switch(save, next): pushes the callee-saved registers, stores the
// stack pointer into *save, loads `next` as the stack pointer, pops the next
// fiber's registers and returns into it. emu_fiber_entry is where a new
// fiber's first switch returns to: it calls r13(r12) and never comes back.
// Weak symbols: every translation unit that includes this header emits the
// same two functions and the linker keeps one. (MXCSR / x87 control words are
// not switched: nothing in the emulated kernels changes them.)
asm(R"(
  .pushsection .text.emu_fiber,"ax",@progbits
  .weak emu_fiber_switch
  .type emu_fiber_switch,@function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch
  .weak emu_fiber_entry
  .type emu_fiber_entry,@function
emu_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_entry, .-emu_fiber_entry
  .popsection
)");
extern "C" void emu_fiber_switch(void** save_sp, void* next_sp);
extern "C" void emu_fiber_entry();
#endif

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

// A barrier for `count` fibers of the running block. Only the launching OS
// thread touches it (fibers never run concurrently), so no locking.
struct Barrier {
  int count = 0;
  int arrived = 0;
  std::vector<int> waiters;  // fiber indices, capacity reserved up front
  void reset(int n) {
    count = n;
    arrived = 0;
    waiters.clear();
    waiters.reserve((size_t)n);
  }
  void wait();
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
  int index = 0;  // linear thread index in the block = fiber index
};

struct Fiber {
  ThreadCtx ctx;
  void* sp = nullptr;  // saved stack pointer while switched out
#ifdef EMU_FIBER_USE_UCONTEXT
  ucontext_t uc;
#endif
  unsigned char* stack_top = nullptr;
  size_t stack_size = 0;
  bool runnable = false;
  bool done = false;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  int n = 0;
  int ndone = 0;
  bool unexpected = false;
  void* main_sp = nullptr;
#ifdef EMU_FIBER_USE_UCONTEXT
  ucontext_t main_uc;
#endif
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Scheduler* g_sched = nullptr;
inline ThreadCtx* g_cur = nullptr;  // the running fiber's context
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline unsigned char* g_dyn_smem = nullptr;
inline std::mutex g_launch_mutex;

// ---- watchdog for fibers that never switch ---------------------------------
inline std::atomic<uint64_t> g_progress{0};  // bumped (plain load + store) at every switch
inline std::atomic<bool> g_in_launch{false};

inline void bump_progress() {
  g_progress.store(g_progress.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

inline void start_monitor() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::thread([] {
      uint64_t last = ~0ull;
      auto since = std::chrono::steady_clock::now();
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        const auto now = std::chrono::steady_clock::now();
        const uint64_t p = g_progress.load(std::memory_order_relaxed);
        if (!g_in_launch.load() || p != last) {
          last = p;
          since = now;
          continue;
        }
        const long limit = watchdog_ms() < 5000 ? 5000 : watchdog_ms();
        if (now - since > std::chrono::milliseconds(limit)) {
          std::fprintf(stderr,
                       "cuda_emu: no emulated CUDA thread reached a barrier or its end for %ld ms "
                       "(a spin-wait or an endless loop in a kernel?): aborting the process\n",
                       limit);
          std::abort();
        }
      }
    }).detach();
  });
}

// ---- fiber stacks: mmap'ed once, pooled across launches ---------------------
inline size_t stack_bytes() {
  static const size_t v = [] {
    const char* e = std::getenv("RWKV_EMU_STACK_KB");
    long kb = e ? std::atol(e) : 256;
    if (kb < 64) kb = 64;
    return (size_t)kb * 1024;
  }();
  return v;
}

struct Stack {
  unsigned char* lo;  // lowest usable byte (the guard page is just below)
  size_t size;
};
inline std::vector<Stack> g_stacks;  // guarded by g_launch_mutex

// Makes sure `n` stacks exist. false when the memory could not be mapped.
inline bool ensure_stacks(size_t n) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  const size_t size = (stack_bytes() + page - 1) / page * page;
  while (g_stacks.size() < n) {
    void* m = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    // guard page: a stack overflow faults instead of corrupting a neighbour
    if (mprotect(m, page, PROT_NONE) != 0) {
      munmap(m, size + page);
      return false;
    }
    g_stacks.push_back(Stack{(unsigned char*)m + page, size});
  }
  return true;
}

// ---- switching ---------------------------------------------------------------
inline void switch_to(Fiber* self, Fiber* next) {
  g_cur = &next->ctx;
  bump_progress();
#ifdef EMU_FIBER_USE_UCONTEXT
  swapcontext(&self->uc, &next->uc);
#else
  emu_fiber_switch(&self->sp, next->sp);
#endif
}

inline void switch_to_main(Fiber* self) {
  Scheduler& s = *g_sched;
  g_cur = nullptr;
  bump_progress();
#ifdef EMU_FIBER_USE_UCONTEXT
  swapcontext(&self->uc, &s.main_uc);
#else
  emu_fiber_switch(&self->sp, s.main_sp);
#endif
}

// Called by a fiber that blocked (runnable == false) or finished (done): runs
// the next runnable fiber, and returns once `self` runs again. When no fiber
// can run, either the block is complete (back to the launch) or every live
// fiber waits at a barrier that can never complete: the launch is aborted
// and every fiber is woken to unwind.
inline void schedule_from(Fiber* self) {
  Scheduler& s = *g_sched;
  const int n = s.n;
  for (;;) {
    int c = self->ctx.index;
    for (int k = 0; k < n; ++k) {
      if (++c == n) c = 0;
      Fiber* f = &s.fibers[(size_t)c];
      if (f->runnable) {
        if (f != self) switch_to(self, f);
        return;
      }
    }
    if (s.ndone == n) {
      switch_to_main(self);
      return;  // not reached: a finished fiber is never resumed
    }
    g_abort.store(true);  // deadlock: a divergent or incomplete barrier
    for (Fiber& f : s.fibers)
      if (!f.done) f.runnable = true;
  }
}

inline void Barrier::wait() {
  if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
  if (++arrived == count) {
    arrived = 0;
    Scheduler& s = *g_sched;
    for (int w : waiters) s.fibers[(size_t)w].runnable = true;
    waiters.clear();
    return;
  }
  Fiber* self = &g_sched->fibers[(size_t)g_cur->index];
  waiters.push_back(self->ctx.index);
  self->runnable = false;
  schedule_from(self);
  if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
}

inline void fiber_main(Fiber* self) {
  Scheduler& s = *g_sched;
  try {
    s.body(s.body_arg);
  } catch (const Abort&) {
    g_abort.store(true);
  } catch (...) {
    s.unexpected = true;
    g_abort.store(true);
  }
  self->done = true;
  self->runnable = false;
  ++s.ndone;
  schedule_from(self);
  std::abort();  // a finished fiber is never resumed
}

#ifdef EMU_FIBER_USE_UCONTEXT
inline void fiber_main_uc(unsigned hi, unsigned lo) {
  fiber_main((Fiber*)(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
#endif

// Prepares fiber `f` to start at fiber_main(f) on its stack.
inline void init_fiber(Fiber* f) {
#ifdef EMU_FIBER_USE_UCONTEXT
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_top - f->stack_size;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  const uintptr_t v = (uintptr_t)f;
  makecontext(&f->uc, (void (*)())fiber_main_uc, 2, (unsigned)(v >> 32), (unsigned)(v & 0xffffffffu));
#else
  // 16-byte aligned top; after the six pops and the `ret` into
  // emu_fiber_entry the stack pointer is 16-byte aligned, so the `call`
  // there enters fiber_main with the ABI's alignment.
  uintptr_t top = (uintptr_t)f->stack_top & ~(uintptr_t)15;
  void** sp = (void**)(top - 9 * sizeof(void*));
  sp[0] = nullptr;                                      // r15
  sp[1] = nullptr;                                      // r14
  sp[2] = (void*)&fiber_main;                          // r13: function
  sp[3] = (void*)f;                                     // r12: its argument
  sp[4] = nullptr;                                      // rbx
  sp[5] = nullptr;                                      // rbp
  sp[6] = (void*)&emu_fiber_entry;                      // return address
  sp[7] = nullptr;
  sp[8] = nullptr;
  f->sp = (void*)sp;
#endif
}

// Runs `kernel()` for every thread of every block of the grid. Returns 0 on
// success, 1 when a barrier diverged (the watchdog), 2 on a bad launch
// configuration, 3 when the kernel threw something unexpected, 4 when the
// fiber stacks could not be mapped.
template <class F>
int launch(dim3 grid, dim3 block, size_t dyn_smem, F kernel) {
  std::lock_guard<std::mutex> guard(g_launch_mutex);
  const unsigned long nthreads = (unsigned long)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      dyn_smem > 227 * 1024)
    return 2;
  if (!ensure_stacks(nthreads)) return 4;
  start_monitor();
  g_abort.store(false);
  g_block_dim = block;
  g_grid_dim = grid;
  std::vector<unsigned char> smem(dyn_smem + 16);
  g_dyn_smem = smem.data();
  const int n = (int)nthreads;
  Barrier block_bar;
  const unsigned nwarps = (unsigned)((nthreads + 31) / 32);
  std::vector<Warp> warps(nwarps);
  Scheduler s;
  s.n = n;
  s.fibers.resize((size_t)n);
  s.body = [](void* k) { (*(F*)k)(); };
  s.body_arg = (void*)&kernel;
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[(size_t)t];
    f.ctx.tid = dim3((unsigned)(t % block.x), (unsigned)((t / block.x) % block.y),
                     (unsigned)(t / ((unsigned long)block.x * block.y)));
    f.ctx.block_bar = &block_bar;
    f.ctx.warp = &warps[(size_t)t / 32];
    f.ctx.lane = t % 32;
    f.ctx.index = t;
    f.stack_top = g_stacks[(size_t)t].lo + g_stacks[(size_t)t].size;
    f.stack_size = g_stacks[(size_t)t].size;
  }
  g_sched = &s;
  g_in_launch.store(true);
  for (unsigned bz = 0; bz < grid.z && !g_abort.load(); ++bz)
    for (unsigned by = 0; by < grid.y && !g_abort.load(); ++by)
      for (unsigned bx = 0; bx < grid.x && !g_abort.load(); ++bx) {
        block_bar.reset(n);
        for (unsigned w = 0; w < nwarps; ++w) {
          const unsigned long rem = nthreads - 32ul * w;
          warps[w].bar.reset((int)(rem < 32 ? rem : 32));
        }
        for (Fiber& f : s.fibers) {
          f.ctx.bid = dim3(bx, by, bz);
          f.runnable = true;
          f.done = false;
          init_fiber(&f);
        }
        s.ndone = 0;
        g_cur = &s.fibers[0].ctx;
        bump_progress();
#ifdef EMU_FIBER_USE_UCONTEXT
        swapcontext(&s.main_uc, &s.fibers[0].uc);
#else
        emu_fiber_switch(&s.main_sp, s.fibers[0].sp);
#endif
      }
  g_in_launch.store(false);
  g_sched = nullptr;
  g_cur = nullptr;
  g_dyn_smem = nullptr;
  if (s.unexpected) return 3;
  return g_abort.load() ? 1 : 0;
}

template <class T>
inline T shfl_exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Warp* w = g_cur->warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slot[g_cur->lane] = bits;
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
#define threadIdx (::emu::g_cur->tid)
#define blockIdx (::emu::g_cur->bid)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

inline void __syncthreads() { ::emu::g_cur->block_bar->wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::g_cur->warp->bar.wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int base = ::emu::g_cur->lane & ~(width - 1);
  return ::emu::shfl_exchange(v, base + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = ::emu::g_cur->lane;
  const int base = lane & ~(width - 1);
  return ::emu::shfl_exchange(v, base + ((lane ^ mask) & (width - 1)));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::g_cur->lane;
  const int base = lane & ~(width - 1);
  const int rel = (lane & (width - 1)) + (int)delta;
  return ::emu::shfl_exchange(v, rel < width ? base + rel : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::g_cur->lane;
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
