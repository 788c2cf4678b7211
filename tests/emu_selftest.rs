//! The CPU emulator itself: shuffles, shared memory, barriers and float
//! atomics give the right answers on random data, and a kernel that hangs
//! (a divergent `__syncthreads`) fails through the watchdog instead of
//! hanging the test run. (Own test binary: the watchdog setting is global.)
use rwkv_tune::emu::{launch_selftest, set_watchdog_ms};
use rwkv_tune::params::EmuTestParams;
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
