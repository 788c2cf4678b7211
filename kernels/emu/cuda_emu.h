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
//   * Counters: every launch counts barriers, warp syncs, shuffles and mma
//     instructions (enum emu::Counter, emu_last_counters()). The counting
//     build (-DEMU_COUNT_MEM -fsanitize=thread, kernels/emu/count_wkv7.cpp)
//     also counts shared-memory wavefronts and global bytes (emu::mem).
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

// The counting build (-DEMU_COUNT_MEM -fsanitize=thread, see below) must not
// instrument the emulator's own code.
#ifdef EMU_COUNT_MEM
#define EMU_NOSAN __attribute__((no_sanitize("thread")))
#else
#define EMU_NOSAN
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

// Per-launch execution counters (docs/emulation.md, "Counters"). Counted by
// the emulator itself, so they are exact for what they name: a warp-level
// instruction is counted once per warp (by its lane 0, or by the barrier's
// last arrival), a block barrier once per completion per CTA.
enum Counter : int {
  kCtas = 0,          // blocks run
  kThreadsPerCta,     // blockDim.x * y * z
  kBlockBarriers,     // completed __syncthreads, summed over CTAs
  kWarpSyncs,         // completed __syncwarp called by kernel code, per warp
  kShuffles,          // __shfl_*_sync, per warp instruction
  kMmaM16n8k16,       // mma.sync m16n8k16 bf16 (kernels/mma.cuh twins), per warp
  kFiberSwitches,     // emulator cost, not a GPU quantity
  // memory counters: only in the counting build (-DEMU_COUNT_MEM, below)
  kSmemRequests,      // warp-level shared-memory accesses
  kSmemWavefronts,    // their wavefronts (32 banks x 4 bytes rule)
  kSmemBytes,         // bytes the threads asked for
  kGmemReadBytes,     // global bytes the threads read
  kGmemWriteBytes,    // ... wrote
  kGmemReadSectors,   // distinct 32-byte sectors per warp-level global read
  kGmemWriteSectors,  // ... write
  kOtherAccesses,     // accesses the counting build could not classify
  kGmemAuxReadBytes,  // of kGmemReadBytes: bytes read from "aux" buffers
                      // (emu_count_register_global_aux: e.g. checkpoints, scratch)
  kGmemAuxWriteBytes, // ... written to them
  kNumCounters
};
inline uint64_t g_count[kNumCounters];                   // the running launch (under the mutex)
inline thread_local uint64_t t_last_count[kNumCounters];  // the caller's last launch

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
  void wait(int counter = -1);
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
  int mute = 0;   // counting build: the emulator's own accesses are not counted
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
EMU_NOSAN inline void switch_to(Fiber* self, Fiber* next) {
  g_cur = &next->ctx;
  bump_progress();
  ++g_count[kFiberSwitches];
#ifdef EMU_FIBER_USE_UCONTEXT
  swapcontext(&self->uc, &next->uc);
#else
  emu_fiber_switch(&self->sp, next->sp);
#endif
}

EMU_NOSAN inline void switch_to_main(Fiber* self) {
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
EMU_NOSAN inline void schedule_from(Fiber* self) {
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

#ifdef EMU_COUNT_MEM
namespace mem {
void flush();
}
#endif

// `counter`: the Counter a completion adds 1 to (-1: none, e.g. the warp
// barriers inside a shuffle or an emulated mma).
EMU_NOSAN inline void Barrier::wait(int counter) {
  if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
  ++g_cur->mute;
  if (++arrived == count) {
    arrived = 0;
    if (counter >= 0) ++g_count[counter];
#ifdef EMU_COUNT_MEM
    if (counter == kBlockBarriers) mem::flush();
#endif
    Scheduler& s = *g_sched;
    for (int w : waiters) s.fibers[(size_t)w].runnable = true;
    waiters.clear();
    --g_cur->mute;
    return;
  }
  Fiber* self = &g_sched->fibers[(size_t)g_cur->index];
  waiters.push_back(self->ctx.index);
  self->runnable = false;
  schedule_from(self);
  --g_cur->mute;
  if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
}

EMU_NOSAN inline void fiber_main(Fiber* self) {
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

#ifdef EMU_COUNT_MEM
// ---- the counting build: shared-memory wavefronts and global bytes ----------
//
// Compiled with -fsanitize=thread but without the TSan runtime, every load and
// store of kernel code calls __tsan_readN / __tsan_writeN(addr) (defined at
// the end of this header). An access is classified by its address: the
// running fiber's stack (registers / local memory) and the emulator's own
// state are skipped; an address inside a registered global buffer
// (emu_count_register_global) is global; one in the image's static data
// (where `__shared__` statics live) is shared; anything else is counted in
// kOtherAccesses. Fibers run one thread at a time, so the 32 lanes of a
// warp-level access are grouped afterwards: by (warp, call site, occurrence k
// of that site by that thread since the last block barrier) — SIMT's grouping
// for convergent code. docs/emulation.md, "Counters".
extern "C" char __bss_start[], _end[];
namespace mem {
struct Rec {
  uintptr_t site;
  uintptr_t addr;
  uint32_t warp;
  uint32_t occ;
  uint16_t lane;
  uint16_t size;
};
struct Slot {
  uintptr_t site;
  uint32_t epoch;
  uint32_t count;
};
constexpr uint32_t kSlots = 1024;  // per thread, power of two
struct Buf {
  Rec* v = nullptr;
  size_t n = 0, cap = 0;
};
inline bool g_on = false;
inline thread_local bool t_launcher = false;  // the thread running the launch (not the monitor)
inline uint32_t g_epoch = 1;
inline Fiber* g_fibers = nullptr;
inline Slot* g_slots = nullptr;
inline size_t g_slots_cap = 0;
inline Buf g_buf[3];  // shared, global read, global write
inline uintptr_t g_ign_lo[8], g_ign_hi[8];
inline int g_nign = 0;
inline uintptr_t g_glob_lo[64], g_glob_hi[64];
inline bool g_glob_aux[64];  // counted again in kGmemAux*Bytes
inline int g_nglob = 0;

EMU_NOSAN inline void ignore(const void* p, size_t bytes) {
  if (g_nign < 8) {
    g_ign_lo[g_nign] = (uintptr_t)p;
    g_ign_hi[g_nign++] = (uintptr_t)p + bytes;
  }
}
EMU_NOSAN inline void begin_launch(Fiber* fibers, int n, const void* functor, size_t fbytes,
                                  const void* sched, size_t sbytes) {
  g_fibers = fibers;
  const size_t need = (size_t)n * kSlots;
  if (need > g_slots_cap) {
    std::free(g_slots);
    g_slots = (Slot*)std::calloc(need, sizeof(Slot));
    g_slots_cap = g_slots ? need : 0;
  } else {
    std::memset(g_slots, 0, need * sizeof(Slot));
  }
  g_nign = 0;
  ignore(functor, fbytes);  // the kernel's parameters: the constant bank
  ignore(sched, sbytes);    // the scheduler (its vectors' bookkeeping)
  ignore(fibers, (size_t)n * sizeof(Fiber));  // threadIdx & co.
  ignore(&g_cur, sizeof g_cur);
  ignore(&g_block_dim, sizeof g_block_dim);
  ignore(&g_grid_dim, sizeof g_grid_dim);
  ignore(&g_dyn_smem, sizeof g_dyn_smem);
  g_on = g_slots != nullptr;
  t_launcher = true;
}
EMU_NOSAN inline void end_launch() { g_on = false; }

EMU_NOSAN inline void push(Buf& b, const Rec& r) {
  if (b.n == b.cap) {
    const size_t cap = b.cap ? 2 * b.cap : 4096;
    Rec* v = (Rec*)std::realloc(b.v, cap * sizeof(Rec));
    if (!v) return;
    b.v = v;
    b.cap = cap;
  }
  b.v[b.n++] = r;
}

EMU_NOSAN inline void access(const void* a, unsigned size, bool write, uintptr_t site) {
  if (!g_on || !t_launcher) return;
  ThreadCtx* c = g_cur;
  if (!c || c->mute) return;
  const uintptr_t x = (uintptr_t)a;
  const Fiber& f = g_fibers[c->index];
  if (x < (uintptr_t)f.stack_top && x >= (uintptr_t)f.stack_top - f.stack_size) return;
  for (int i = 0; i < g_nign; ++i)
    if (x >= g_ign_lo[i] && x < g_ign_hi[i]) return;
  int kind = -1;
  bool aux = false;
  for (int i = 0; i < g_nglob; ++i)
    if (x >= g_glob_lo[i] && x < g_glob_hi[i]) {
      kind = write ? 2 : 1;
      aux = g_glob_aux[i];
    }
  if (kind < 0 && x >= (uintptr_t)__bss_start && x < (uintptr_t)_end) kind = 0;
  if (kind < 0) {
    ++g_count[kOtherAccesses];
    return;
  }
  // occurrence of this site by this thread since the last block barrier
  Slot* tab = g_slots + (size_t)c->index * kSlots;
  uint32_t h = (uint32_t)((site * 0x9E3779B97F4A7C15ull) >> 40) & (kSlots - 1);
  for (uint32_t probe = 0; probe < kSlots; ++probe, h = (h + 1) & (kSlots - 1)) {
    Slot& sl = tab[h];
    if (sl.site == site || sl.site == 0) {
      sl.site = site;
      if (sl.epoch != g_epoch) {
        sl.epoch = g_epoch;
        sl.count = 0;
      }
      push(g_buf[kind], Rec{site, x, (uint32_t)(c->index / 32), sl.count++, (uint16_t)c->lane,
                            (uint16_t)size});
      if (aux) g_count[write ? kGmemAuxWriteBytes : kGmemAuxReadBytes] += size;
      return;
    }
  }
  ++g_count[kOtherAccesses];  // table full
}

// Wavefronts of one warp-level shared access (records r[0..n) of one group):
// lanes split into parts of 32 / 16 / 8 lanes for 4 / 8 / 16-byte accesses;
// in each part, the maximum over the 32 banks of the number of distinct
// 4-byte words of that bank (a word read by several lanes is a broadcast).
EMU_NOSAN inline uint64_t wavefronts(const Rec* r, size_t n) {
  uint64_t total = 0;
  const unsigned size = r[0].size;
  const unsigned part_lanes = size >= 16 ? 8 : (size >= 8 ? 16 : 32);
  for (unsigned part = 0; part < 32 / part_lanes; ++part) {
    uintptr_t words[32 * 4];
    int nw = 0;
    for (size_t i = 0; i < n; ++i) {
      if (r[i].lane / part_lanes != part) continue;
      for (uintptr_t w = r[i].addr / 4; w < (r[i].addr + r[i].size + 3) / 4 && nw < 128; ++w)
        words[nw++] = w;
    }
    if (!nw) continue;
    int per_bank[32] = {0};
    for (int i = 0; i < nw; ++i) {
      bool seen = false;
      for (int j = 0; j < i && !seen; ++j) seen = words[j] == words[i];
      if (!seen) ++per_bank[words[i] % 32];
    }
    int m = 0;
    for (int b = 0; b < 32; ++b) m = per_bank[b] > m ? per_bank[b] : m;
    total += (uint64_t)m;
  }
  return total;
}
// Distinct 32-byte sectors of one warp-level global access.
EMU_NOSAN inline uint64_t sectors(const Rec* r, size_t n) {
  uintptr_t s[64];
  int ns = 0;
  for (size_t i = 0; i < n; ++i)
    for (uintptr_t x = r[i].addr / 32; x <= (r[i].addr + r[i].size - 1) / 32 && ns < 64; ++x) {
      bool seen = false;
      for (int j = 0; j < ns && !seen; ++j) seen = s[j] == x;
      if (!seen) s[ns++] = x;
    }
  return (uint64_t)ns;
}

EMU_NOSAN inline bool rec_less(const Rec& a, const Rec& b) {
  if (a.site != b.site) return a.site < b.site;
  if (a.warp != b.warp) return a.warp < b.warp;
  return a.occ < b.occ;
}
// simple in-place merge-free sort (insertion on small, heap sort on large),
// kept here so that no instrumented library code runs inside the hooks
EMU_NOSAN inline void sift(Rec* v, size_t i, size_t n) {
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) return;
    if (c + 1 < n && rec_less(v[c], v[c + 1])) ++c;
    if (!rec_less(v[i], v[c])) return;
    const Rec t = v[i];
    v[i] = v[c];
    v[c] = t;
    i = c;
  }
}
EMU_NOSAN inline void sort_recs(Rec* v, size_t n) {
  if (n < 2) return;
  for (size_t i = n / 2; i-- > 0;) sift(v, i, n);
  for (size_t e = n - 1; e > 0; --e) {
    const Rec t = v[0];
    v[0] = v[e];
    v[e] = t;
    sift(v, 0, e);
  }
}

// Groups the records since the last flush into warp-level accesses and adds
// them to the counters. Called at every block barrier and at the block's end.
EMU_NOSAN inline void flush() {
  for (int k = 0; k < 3; ++k) {
    Buf& b = g_buf[k];
    sort_recs(b.v, b.n);
    size_t i = 0;
    while (i < b.n) {
      size_t j = i + 1;
      while (j < b.n && b.v[j].site == b.v[i].site && b.v[j].warp == b.v[i].warp &&
             b.v[j].occ == b.v[i].occ)
        ++j;
      uint64_t bytes = 0;
      for (size_t q = i; q < j; ++q) bytes += b.v[q].size;
      if (k == 0) {
        ++g_count[kSmemRequests];
        g_count[kSmemWavefronts] += wavefronts(b.v + i, j - i);
        g_count[kSmemBytes] += bytes;
      } else {
        g_count[k == 1 ? kGmemReadBytes : kGmemWriteBytes] += bytes;
        g_count[k == 1 ? kGmemReadSectors : kGmemWriteSectors] += sectors(b.v + i, j - i);
      }
      i = j;
    }
    b.n = 0;
  }
  ++g_epoch;
}
}  // namespace mem
#endif

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
  std::memset(g_count, 0, sizeof g_count);
  g_count[kThreadsPerCta] = nthreads;
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
#ifdef EMU_COUNT_MEM
  mem::begin_launch(s.fibers.data(), n, &kernel, sizeof kernel, &s, sizeof s);
#endif
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
        ++g_count[kCtas];
        g_cur = &s.fibers[0].ctx;
        bump_progress();
#ifdef EMU_FIBER_USE_UCONTEXT
        swapcontext(&s.main_uc, &s.fibers[0].uc);
#else
        emu_fiber_switch(&s.main_sp, s.fibers[0].sp);
#endif
#ifdef EMU_COUNT_MEM
        mem::flush();
#endif
      }
  g_in_launch.store(false);
#ifdef EMU_COUNT_MEM
  mem::end_launch();
#endif
  std::memcpy(t_last_count, g_count, sizeof g_count);
  g_sched = nullptr;
  g_cur = nullptr;
  g_dyn_smem = nullptr;
  if (s.unexpected) return 3;
  return g_abort.load() ? 1 : 0;
}

template <class T>
EMU_NOSAN inline T shfl_exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Warp* w = g_cur->warp;
  ++g_cur->mute;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slot[g_cur->lane] = bits;
  w->bar.wait(kShuffles);
  uint64_t got = w->slot[src_lane & 31];
  w->bar.wait();
  --g_cur->mute;
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

}  // namespace emu

// `used`: emitted (as a COMDAT) in every kernel object, so Rust can link it.
extern "C" __attribute__((used)) inline void emu_set_watchdog_ms(long ms) { emu::g_watchdog_ms.store(ms); }
// Copies up to `n` counters of the calling thread's last launch (order: enum
// emu::Counter) into `out`; returns how many the emulator has.
extern "C" __attribute__((used)) inline int emu_last_counters(uint64_t* out, int n) {
  for (int i = 0; i < n && i < emu::kNumCounters; ++i) out[i] = emu::t_last_count[i];
  return emu::kNumCounters;
}

#ifdef EMU_COUNT_MEM
// ---- the counting build's instrumentation hooks (no TSan runtime) ---------
// -fsanitize=thread makes the compiler call these; here they count (see
// emu::mem) and perform the atomic operations they stand for.
extern "C" {
// Registers [p, p + bytes) as a global-memory buffer for the counting build.
__attribute__((used)) inline void emu_count_register_global(const void* p, size_t bytes) {
  if (emu::mem::g_nglob < 64) {
    emu::mem::g_glob_aux[emu::mem::g_nglob] = false;
    emu::mem::g_glob_lo[emu::mem::g_nglob] = (uintptr_t)p;
    emu::mem::g_glob_hi[emu::mem::g_nglob++] = (uintptr_t)p + bytes;
  }
}
// The same for an "aux" buffer (a kernel's workspace: checkpoints, scratch):
// its bytes count in kGmem*Bytes and again in kGmemAux*Bytes.
__attribute__((used)) inline void emu_count_register_global_aux(const void* p, size_t bytes) {
  if (emu::mem::g_nglob < 64) {
    emu::mem::g_glob_aux[emu::mem::g_nglob] = true;
    emu::mem::g_glob_lo[emu::mem::g_nglob] = (uintptr_t)p;
    emu::mem::g_glob_hi[emu::mem::g_nglob++] = (uintptr_t)p + bytes;
  }
}
__attribute__((used)) inline void emu_count_clear_globals() { emu::mem::g_nglob = 0; }

#define EMU_HOOK_RW(N)                                                                      \
  EMU_NOSAN __attribute__((used)) inline void __tsan_read##N(void* a) {                                           \
    emu::mem::access(a, N, false, (uintptr_t)__builtin_return_address(0));                 \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline void __tsan_write##N(void* a) {                                          \
    emu::mem::access(a, N, true, (uintptr_t)__builtin_return_address(0));                  \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline void __tsan_unaligned_read##N(void* a) {                                 \
    emu::mem::access(a, N, false, (uintptr_t)__builtin_return_address(0));                 \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline void __tsan_unaligned_write##N(void* a) {                                \
    emu::mem::access(a, N, true, (uintptr_t)__builtin_return_address(0));                  \
  }
EMU_HOOK_RW(1)
EMU_HOOK_RW(2)
EMU_HOOK_RW(4)
EMU_HOOK_RW(8)
EMU_HOOK_RW(16)
#undef EMU_HOOK_RW
EMU_NOSAN __attribute__((used)) inline void __tsan_read_range(void* a, unsigned long n) {
  emu::mem::access(a, (unsigned)n, false, (uintptr_t)__builtin_return_address(0));
}
EMU_NOSAN __attribute__((used)) inline void __tsan_write_range(void* a, unsigned long n) {
  emu::mem::access(a, (unsigned)n, true, (uintptr_t)__builtin_return_address(0));
}
EMU_NOSAN __attribute__((used)) inline void __tsan_init() {}
EMU_NOSAN __attribute__((used)) inline void __tsan_func_entry(void*) {}
EMU_NOSAN __attribute__((used)) inline void __tsan_func_exit() {}
EMU_NOSAN __attribute__((used)) inline void __tsan_vptr_update(void** p, void* v) { *p = v; }
EMU_NOSAN __attribute__((used)) inline void __tsan_vptr_read(void**) {}
#define EMU_HOOK_ATOMIC(N, T)                                                               \
  EMU_NOSAN __attribute__((used)) inline T __tsan_atomic##N##_load(const volatile T* a, int) {                    \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline void __tsan_atomic##N##_store(volatile T* a, T v, int) {                 \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                               \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                \
    emu::mem::access((const void*)a, N / 8, true, (uintptr_t)__builtin_return_address(0)); \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, \
                                                                  int, int) {               \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                         \
  EMU_NOSAN __attribute__((used)) inline int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v,   \
                                                                int, int) {                 \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
  }
EMU_HOOK_ATOMIC(8, uint8_t)
EMU_HOOK_ATOMIC(16, uint16_t)
EMU_HOOK_ATOMIC(32, uint32_t)
EMU_HOOK_ATOMIC(64, uint64_t)
#undef EMU_HOOK_ATOMIC
EMU_NOSAN __attribute__((used)) inline void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_NOSAN __attribute__((used)) inline void __tsan_atomic_signal_fence(int) {}
}
#endif

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

inline void __syncthreads() { ::emu::g_cur->block_bar->wait(::emu::kBlockBarriers); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::g_cur->warp->bar.wait(::emu::kWarpSyncs); }
namespace emu {
// The warp barrier of the emulated tensor-core twins (kernels/mma.cuh): not
// counted as a __syncwarp; `mmas` m16n8k16 instructions are counted instead
// (pass them on the first of the twin's two barriers, 0 on the second).
EMU_NOSAN inline void mma_sync_point(int mmas) {
  if (mmas && g_cur->lane == 0) g_count[kMmaM16n8k16] += (uint64_t)mmas;
  g_cur->warp->bar.wait();
}
// Counting build: the emulated twins' scratch traffic is not a GPU access
// (the real mma reads registers); the twin mutes itself while it runs.
struct MuteScope {
  EMU_NOSAN MuteScope() { ++g_cur->mute; }
  EMU_NOSAN ~MuteScope() { --g_cur->mute; }
};
}  // namespace emu
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

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
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
