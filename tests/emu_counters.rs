//! The emulator's counting build (docs/emulation.md, "Memory counters"):
//! shared-memory wavefronts against the bank rule's closed form, the WKV-7
//! forwards' global bytes against their I/O contract (kernels/params.h),
//! and the time model against hand-computed bounds.
use rwkv_tune::emu::{
    counted_ckpt_tokens, counters_report, estimate, profile_wkv7, ptxas_resources, selftest_banks,
    CountedKernel, CtaCounts, KernelResources, Wkv7Profile, H100_SXM,
};

fn gcd(a: i32, b: i32) -> i32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// None (and a SKIP line) when the counting build is not linked in.
fn available() -> bool {
    match selftest_banks(1) {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: {e}");
            false
        }
    }
}

#[test]
fn wavefronts_follow_the_bank_rule() {
    if !available() {
        return;
    }
    // one warp, word index lane * stride: gcd(stride, 32) lanes share a bank
    // with distinct words (stride 0: one word, a broadcast)
    for stride in [0, 1, 2, 3, 4, 6, 8, 16, 32] {
        let (req, waves) = selftest_banks(stride).unwrap();
        let per = if stride == 0 { 1 } else { gcd(stride, 32) } as u64;
        assert_eq!(req, 2, "stride {stride}: one store and one load");
        assert_eq!(waves, 2 * per, "stride {stride}");
    }
}

#[test]
fn forwards_read_each_input_once_and_write_y_and_the_checkpoint() {
    if !available() {
        return;
    }
    for bf16 in [false, true] {
        let x = if bf16 { 2.0 } else { 4.0 };
        // per chunk of 16 tokens, one (b, h), N = 64: r w k v a b read, y
        // written, one fp32 64x64 checkpoint written
        let reads = 16.0 * 64.0 * 6.0 * x;
        let writes = 16.0 * 64.0 * x + 64.0 * 64.0 * 4.0;
        for k in [CountedKernel::FwdV1, CountedKernel::FwdV2] {
            let p = profile_wkv7(k, bf16).unwrap();
            let c = &p.per_chunk;
            assert_eq!(c.gmem_read_bytes, reads, "{k:?} bf16={bf16}");
            assert_eq!(c.gmem_write_bytes, writes, "{k:?} bf16={bf16}");
            // the checkpoint is the only workspace traffic of a forward
            assert_eq!(c.gmem_aux_write_bytes, 64.0 * 64.0 * 4.0, "{k:?}");
            assert_eq!(c.gmem_aux_read_bytes, 0.0, "{k:?}");
            assert_eq!(c.other_accesses, 0.0, "{k:?}");
            assert!(c.smem_wavefronts >= c.smem_requests && c.smem_requests > 0.0);
            // v1 is FMA only; v2's products are tensor-core MMAs
            assert_eq!(c.mma_m16n8k16 > 0.0, k == CountedKernel::FwdV2, "{k:?}");
        }
    }
}

#[test]
fn backwards_are_classified() {
    if !available() {
        return;
    }
    for k in [CountedKernel::BwdV1, CountedKernel::BwdV2] {
        let p = profile_wkv7(k, true).unwrap();
        assert_eq!(
            p.per_chunk.other_accesses + p.fixed.other_accesses,
            0.0,
            "{k:?}"
        );
        assert!(p.per_chunk.gmem_read_bytes > 0.0 && p.per_chunk.block_barriers > 0.0);
    }
}

#[test]
fn the_time_model_matches_hand_computed_bounds() {
    // 132 CTAs of 128 threads on 132 SMs: one CTA per SM, one wave
    let per_chunk = CtaCounts {
        mma_m16n8k16: 1e6,
        smem_wavefronts: 3e6,
        gmem_read_bytes: 1e6,
        ..Default::default()
    };
    let p = Wkv7Profile {
        kernel: CountedKernel::FwdV2,
        per_chunk,
        fixed: CtaCounts::default(),
    };
    let e = estimate(&p, (1, 16, 132), &H100_SXM, None);
    let clk_ms = 1.0 / (1.755e9) * 1e3;
    assert_eq!((e.ctas_per_sm, e.waves), (16, 1));
    assert!((e.mma_ms - 1e6 / 0.5 * clk_ms).abs() < 1e-9, "{e:?}");
    assert!((e.smem_ms - 3e6 * clk_ms).abs() < 1e-9, "{e:?}");
    assert!(
        (e.hbm_ms - 132.0 * 1e6 / 3350e9 * 1e3).abs() < 1e-9,
        "{e:?}"
    );
    assert_eq!(e.ms, e.smem_ms);
    // 205 registers x 128 threads: 2 CTAs per SM -> 1056 CTAs are 4 waves
    let res = KernelResources {
        regs: 205,
        smem: 30000,
    };
    let e = estimate(&p, (8, 16, 132), &H100_SXM, Some(res));
    assert_eq!((e.ctas_per_sm, e.waves), (2, 4), "{e:?}");
    let line = "  wkv7_fwd_v2_bf16_n64         regs  205  smem  30000 B  stack     0 B  spills st 0 / ld 0";
    assert_eq!(ptxas_resources(line, "wkv7_fwd_v2_bf16_n64"), Some(res));
    assert_eq!(ptxas_resources(line, "wkv7_fwd_v2_f32_n64"), None);
}

/// The v3 kernels (mixed and exact) are counted: the counting build's
/// checkpoint interval is `Version::chunk`, the forwards read each input
/// once and write y plus one bf16 state per 16-token chunk (the only
/// workspace bytes), nothing is unclassified, and the report compares v3 /
/// v3x with v2 and ends with the four estimated sums.
#[test]
fn v3_counters_run() {
    if !available() {
        return;
    }
    use CountedKernel::*;
    for k in [FwdV3, BwdV3, FwdV3x, BwdV3x] {
        let ck = counted_ckpt_tokens(k).unwrap();
        let ver = rwkv_tune::wkv7::Version::parse(k.version_name()).unwrap();
        assert_eq!(ck, ver.chunk(), "{k:?}");
        let p = profile_wkv7(k, true).unwrap();
        let c = &p.per_chunk;
        assert_eq!(c.other_accesses + p.fixed.other_accesses, 0.0, "{k:?}");
        assert!(
            c.smem_wavefronts >= c.smem_requests && c.smem_requests > 0.0,
            "{k:?}"
        );
        assert!(c.mma_m16n8k16 > 0.0 && c.block_barriers > 0.0, "{k:?}");
        // v3 saves one bf16 state per chunk
        let ckpt_per_chunk = 64.0 * 64.0 * 2.0 * 16.0 / ck as f64;
        if k.is_backward() {
            assert!(c.gmem_read_bytes > 0.0, "{k:?}");
            // the backward reads every checkpoint at least once
            assert!(c.gmem_aux_read_bytes >= ckpt_per_chunk, "{k:?}: {c:?}");
        } else {
            assert_eq!(c.gmem_read_bytes, 16.0 * 64.0 * 6.0 * 2.0, "{k:?}");
            assert_eq!(
                c.gmem_write_bytes,
                16.0 * 64.0 * 2.0 + ckpt_per_chunk,
                "{k:?}"
            );
            assert_eq!(c.gmem_aux_write_bytes, ckpt_per_chunk, "{k:?}");
            assert_eq!(c.gmem_aux_read_bytes, 0.0, "{k:?}");
        }
    }
    // a ptxas report for every kernel, so that the waves are known
    let ptxas: String = CountedKernel::ALL
        .iter()
        .map(|k| {
            format!(
                "  {:<28} regs  128  smem  20000 B  stack     0 B  spills st 0 / ld 0\n",
                k.symbol(true)
            )
        })
        .collect();
    let r = counters_report((8, 4096, 64), true, Some(&ptxas)).unwrap();
    eprintln!("{r}");
    for k in CountedKernel::ALL {
        assert!(r.contains(&k.symbol(true)), "{k:?} missing from the report");
    }
    assert!(r.contains("v3 / v3x vs v2"), "{r}");
    for v in ["v3 ", "v3x "] {
        assert!(
            r.lines().any(|l| l.starts_with(v)),
            "no ratio row for {v}: {r}"
        );
    }
    let last = r.lines().last().unwrap();
    assert!(last.starts_with("ESTIMATED forward + backward:"), "{last}");
    for v in ["v1 ", "v2 ", "v3 ", "v3x "] {
        assert!(last.contains(v), "{v} missing from the last line: {last}");
    }
}
