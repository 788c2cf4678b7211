// kernels/emu/count_wkv7.cpp — the emulator's counting build (docs/emulation.md,
// "Memory counters"): the WKV-7 kernels and the bank self-test compiled with
// -DCUDA_EMU -DEMU_COUNT_MEM -fsanitize=thread (no TSan runtime: the
// emulation header defines the instrumentation hooks). build.rs links it
// with every symbol localised except the emu_cnt_* entries below, which
// src/emu.rs wraps (`rwkv-tune bench --backend emu --counters`).
#include "../emu_selftest.cu"
#include "../wkv7_v1.cu"
#include "../wkv7_v2.cu"
#include "../wkv7_v3.cu"

// Tokens between the v3 kernels' saved states (p.chunk): one bf16 state per
// 16-token chunk (src/wkv7/v3.rs CKPT_TOKENS).
#ifndef WKV7_V3_CKPT
#define WKV7_V3_CKPT 16
#endif

#include <mutex>
#include <random>
#include <vector>

namespace {

// The registered global buffers are process-wide: one profile at a time.
std::mutex g_profile_mutex;

typedef int (*Entry)(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                     const Wkv7Params*);

struct Kernel {
  const char* name;
  Entry fwd;  // run first when `bwd` is set (the backward needs the forward's checkpoints)
  Entry bwd;
  int threads;  // per CTA at N = 64
  int version;  // 1, 2, 3 (v3 and v3x)
};

// Tokens per saved state (p.chunk) of a kernel version.
int ckpt_tokens(int version) { return version == 3 ? WKV7_V3_CKPT : 16; }

// One CTA (grid 1 x 1) over `chunks` chunks of 16 tokens; counters of the
// kernel (the backward's only, for a backward) into out[0..n). The
// checkpoints (p.chunk = the version's interval, >= 16 tokens, so `chunks`
// slots always suffice) and the scratch are registered as "aux" buffers.
int run_one(const Kernel& k, int chunks, bool bf16, uint64_t* out, int nout) {
  const int T = 16 * chunks, N = 64, L = 16, nc = chunks;
  const int ck = ckpt_tokens(k.version);
  const size_t n = (size_t)T * N;
  std::mt19937 g(7);
  std::uniform_real_distribution<float> u(-1, 1), wd(0.6f, 0.999f);
  const size_t xs = bf16 ? 2 : 4;
  auto mk = [&](float scale, bool decay) {
    std::vector<unsigned char> v(n * xs);
    for (size_t i = 0; i < n; ++i) {
      const float f = decay ? wd(g) : u(g) * scale;
      if (bf16) {
        const __nv_bfloat16 h = __float2bfloat16_rn(f);
        std::memcpy(&v[i * 2], &h, 2);
      } else {
        std::memcpy(&v[i * 4], &f, 4);
      }
    }
    return v;
  };
  auto r = mk(1, false), w = mk(1, true), kk = mk(.3f, false), v = mk(1, false),
       a = mk(.3f, false), b = mk(.3f, false), dy = mk(1, false);
  std::vector<unsigned char> y(n * xs), dr(n * xs), dw(n * xs), dk(n * xs), dv(n * xs),
      da(n * xs), db(n * xs);
  std::vector<float> h0((size_t)N * N), ht((size_t)N * N), dht((size_t)N * N), dh0((size_t)N * N);
  for (auto& x : h0) x = u(g) * .1f;
  for (auto& x : dht) x = u(g) * .1f;
  std::vector<float> ckpt((size_t)nc * N * N), scratch((size_t)(L + 2) * N * N);
  Wkv7Params p{};
  p.B = 1;
  p.T = T;
  p.H = 1;
  p.N = N;
  p.chunk = ck;
  p.n_chunks = (T + ck - 1) / ck;
  p.r = r.data();
  p.w = w.data();
  p.k = kk.data();
  p.v = v.data();
  p.a = a.data();
  p.b = b.data();
  p.h0 = h0.data();
  p.y = y.data();
  p.h_t = ht.data();
  p.ckpt = ckpt.data();
  p.dy = dy.data();
  p.dh_t = dht.data();
  p.dr = dr.data();
  p.dw = dw.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.da = da.data();
  p.db = db.data();
  p.dh0 = dh0.data();
  p.scratch = scratch.data();
  emu_count_clear_globals();
  for (auto* x : {&r, &w, &kk, &v, &a, &b, &dy, &y, &dr, &dw, &dk, &dv, &da, &db})
    emu_count_register_global(x->data(), x->size());
  for (auto* x : {&h0, &ht, &dht, &dh0})
    emu_count_register_global(x->data(), x->size() * 4);
  for (auto* x : {&ckpt, &scratch}) emu_count_register_global_aux(x->data(), x->size() * 4);
  int rc = k.fwd(1, 1, 1, k.threads, 1, 1, 0, &p);
  if (!rc && k.bwd) rc = k.bwd(1, 1, 1, k.threads, 1, 1, 0, &p);
  emu_last_counters(out, nout);
  return rc;
}

}  // namespace

// One CTA (grid 1 x 1, N = 64) of WKV-7 kernel `kernel` (0 fwd_v1, 1 bwd_v1,
// 2 fwd_v2, 3 bwd_v2, 4 fwd_v3, 5 bwd_v3, 6 fwd_v3x, 7 bwd_v3x; a backward
// runs after its forward and only the backward is counted) over `chunks`
// chunks of 16 tokens; copies up to `n` counters (order: enum emu::Counter)
// into `out`. Returns the launch's code (0 = ok, 5 = no such kernel).
extern "C" int emu_cnt_wkv7_profile(int kernel, int bf16, int chunks, uint64_t* out, int n) {
  const Kernel kernels[] = {
      {"fwd_v1", bf16 ? emu_wkv7_fwd_v1_bf16_n64 : emu_wkv7_fwd_v1_f32_n64, nullptr, 64, 1},
      {"bwd_v1", bf16 ? emu_wkv7_fwd_v1_bf16_n64 : emu_wkv7_fwd_v1_f32_n64,
       bf16 ? emu_wkv7_bwd_v1_bf16_n64 : emu_wkv7_bwd_v1_f32_n64, 64, 1},
      {"fwd_v2", bf16 ? emu_wkv7_fwd_v2_bf16_n64 : emu_wkv7_fwd_v2_f32_n64, nullptr, 128, 2},
      {"bwd_v2", bf16 ? emu_wkv7_fwd_v2_bf16_n64 : emu_wkv7_fwd_v2_f32_n64,
       bf16 ? emu_wkv7_bwd_v2_bf16_n64 : emu_wkv7_bwd_v2_f32_n64, 128, 2},
      {"fwd_v3", bf16 ? emu_wkv7_fwd_v3_bf16_n64 : nullptr, nullptr, 128, 3},
      {"bwd_v3", bf16 ? emu_wkv7_fwd_v3_bf16_n64 : nullptr,
       bf16 ? emu_wkv7_bwd_v3_bf16_n64 : nullptr, 128, 3},
      {"fwd_v3x", bf16 ? emu_wkv7_fwd_v3x_bf16_n64 : nullptr, nullptr, 128, 3},
      {"bwd_v3x", bf16 ? emu_wkv7_fwd_v3x_bf16_n64 : nullptr,
       bf16 ? emu_wkv7_bwd_v3x_bf16_n64 : nullptr, 128, 3},
  };
  if (kernel < 0 || kernel >= (int)(sizeof kernels / sizeof kernels[0]) || chunks < 1) return 5;
  if (!kernels[kernel].fwd) return 5;  // v3 has no f32 kernels
  const std::lock_guard<std::mutex> lock(g_profile_mutex);
  return run_one(kernels[kernel], chunks, bf16 != 0, out, n);
}

// Tokens per saved state (p.chunk) the counting build uses for `kernel`
// (numbered as in emu_cnt_wkv7_profile); -1 for no such kernel.
extern "C" int emu_cnt_wkv7_ckpt_tokens(int kernel) {
  if (kernel < 0 || kernel > 7) return -1;
  return ckpt_tokens(kernel < 2 ? 1 : kernel < 4 ? 2 : 3);
}

// emu_selftest_banks on one warp with stride `stride` words; counters as above.
extern "C" int emu_cnt_selftest_banks(int stride, uint64_t* out, int n) {
  const std::lock_guard<std::mutex> lock(g_profile_mutex);
  float sink[3] = {0, 0, 0};
  EmuTestParams p{stride, 0, nullptr, sink};
  emu_count_clear_globals();
  emu_count_register_global(sink, sizeof sink);
  const int rc = emu_emu_selftest_banks(1, 1, 1, 32, 1, 1, 0, &p);
  emu_last_counters(out, n);
  return rc;
}
