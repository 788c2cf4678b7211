//! The CPU emulator itself: shuffles, shared memory, barriers and float
//! atomics give the right answers on random data, and a kernel that hangs
//! (a divergent `__syncthreads`) fails through the watchdog instead of
//! hanging the test run. (Own test binary: the watchdog setting is global.)
use rwkv_tune::emu::{last_counters, launch_mma_selftest, launch_selftest, set_watchdog_ms};
use rwkv_tune::params::{EmuTestParams, MmaTestParams};
use std::time::Instant;

#[test]
fn shuffles_shared_memory_and_atomics() {
    let mut g = rwkv_tune::rng::Rng::new(5);
    for (n, blocks) in [(1000usize, 3u32), (77, 1), (4096, 5)] {
        let x = g.normal_vec(n, 1.0);
        let mut out = [0f32; 3];
        let p = EmuTestParams {
            n: n as i32,
            mode: 0,
            x: x.as_ptr() as u64,
            out: out.as_mut_ptr() as u64,
        };
        // SAFETY: x holds n floats and out 3 floats, both alive for the call.
        unsafe { launch_selftest("emu_selftest_reduce", (blocks, 1, 1), (128, 1, 1), &p) }.unwrap();
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        let max = x.iter().cloned().fold(f32::MIN, f32::max);
        assert!(
            (out[0] as f64 - sum).abs() < 1e-3,
            "atomic sum {} vs {sum}",
            out[0]
        );
        assert_eq!(out[1], max, "shuffle max");
        assert!(
            (out[2] as f64 - sum).abs() < 1e-3,
            "shfl_down sum {} vs {sum}",
            out[2]
        );
    }
}

#[test]
fn a_hanging_kernel_fails_through_the_watchdog() {
    set_watchdog_ms(300);
    let x = [1f32; 4];
    let mut out = [0f32; 3];
    let p = EmuTestParams {
        n: 4,
        mode: 0,
        x: x.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
    };
    let t0 = Instant::now();
    // SAFETY: x holds 4 floats and out 3 floats, both alive for the call.
    let r = unsafe { launch_selftest("emu_selftest_divergent", (2, 1, 1), (64, 1, 1), &p) };
    let e = r
        .expect_err("a divergent barrier must not succeed")
        .to_string();
    assert!(e.contains("watchdog"), "{e}");
    assert!(
        t0.elapsed().as_secs_f64() < 10.0,
        "watchdog took {:?}",
        t0.elapsed()
    );
    // a lane missing at a shuffle (a warp-level barrier) fails the same way
    // SAFETY: as above (the kernel writes at most out[0]).
    let r = unsafe { launch_selftest("emu_selftest_divergent_shfl", (1, 1, 1), (64, 1, 1), &p) };
    let e = r
        .expect_err("a shuffle a lane skipped must not succeed")
        .to_string();
    assert!(e.contains("watchdog"), "{e}");
    // the emulator is usable again afterwards
    set_watchdog_ms(20_000);
    let x = [2f32; 256];
    let mut out = [0f32; 3];
    let p = EmuTestParams {
        n: 256,
        mode: 0,
        x: x.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
    };
    // SAFETY: as above.
    unsafe { launch_selftest("emu_selftest_reduce", (1, 1, 1), (128, 1, 1), &p) }.unwrap();
    assert_eq!(out[0], 512.0);
}

/// The emulator's counters against counts read off the kernel source:
/// emu_selftest_reduce has 1 `__syncthreads` and a 5-step xor-shuffle tree
/// per block, and block 0 runs 4 more barriers and 5 xor + 5 down shuffles;
/// mma_selftest runs 1, 3 and 3 + 3 + 3 m16n8k16 MMAs in modes 0, 1, 2.
#[test]
fn counters_match_the_kernel_source() {
    let x = vec![0.5f32; 1000];
    let mut out = [0f32; 3];
    let p = EmuTestParams {
        n: 1000,
        mode: 0,
        x: x.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
    };
    // SAFETY: x holds 1000 floats and out 3 floats, both alive for the call.
    unsafe { launch_selftest("emu_selftest_reduce", (3, 1, 1), (128, 1, 1), &p) }.unwrap();
    let c = last_counters();
    assert_eq!((c.ctas, c.threads_per_cta), (3, 128));
    assert_eq!(c.block_barriers, 3 + 4, "{c:?}");
    assert_eq!(c.shuffles, 3 * 4 * 5 + 4 * 10, "{c:?}");
    assert_eq!((c.mma_m16n8k16, c.warp_syncs), (0, 0), "{c:?}");
    assert!(c.fiber_switches > 0);

    let a = vec![0.25f32; 256];
    let b = vec![0.5f32; 384];
    let cc = vec![0f32; 128];
    let mut o = vec![0f32; 128];
    for (mode, mmas) in [(0, 1), (1, 3), (2, 9)] {
        let p = MmaTestParams {
            mode,
            a: a.as_ptr() as u64,
            b: b.as_ptr() as u64,
            c: cc.as_ptr() as u64,
            out: o.as_mut_ptr() as u64,
        };
        // SAFETY: a 256, b 384, c and out 128 floats, alive for the call.
        unsafe { launch_mma_selftest(&p) }.unwrap();
        let c = last_counters();
        assert_eq!(c.mma_m16n8k16, mmas, "mode {mode}: {c:?}");
        assert_eq!((c.ctas, c.block_barriers, c.warp_syncs), (1, 0, 0), "{c:?}");
    }
}
