//! The tensor-core helpers of `kernels/mma.cuh` under the CPU emulator,
//! against a plain matmul: one bf16 `mma.m16n8k16` (exact on bf16 inputs),
//! the hi/lo split product `mma3` on fp32 inputs, and a chained product that
//! feeds C fragments back as an A operand, and fragments loaded by
//! `ldmatrix` (with and without `.trans`, for A and B). A fragment-layout bug
//! in the emulated twins or in the fragment builders fails here directly.
use half::bf16;
use rwkv_tune::emu::launch_mma_selftest;
use rwkv_tune::params::MmaTestParams;
use rwkv_tune::rng::Rng;

fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
        }
    }
    c
}

fn run(mode: i32, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; 128];
    let p = MmaTestParams {
        mode,
        a: a.as_ptr() as u64,
        b: b.as_ptr() as u64,
        c: c.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
    };
    // SAFETY: a has 256 floats, b 128, 256 (modes 3, 4) or 384 (mode 2), c and out 128, all
    // alive for the synchronous call.
    unsafe { launch_mma_selftest(&p) }.expect("mma self-test launch");
    out
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn single_bf16_mma_matches_matmul_exactly() {
    let mut g = Rng::new(11);
    let round =
        |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect() };
    let a = round(g.normal_vec(256, 1.0));
    let b = round(g.normal_vec(128, 1.0));
    let c = g.normal_vec(128, 1.0);
    let out = run(0, &a, &b, &c);
    let r = matmul(&f64s(&a), &f64s(&b), 16, 16, 8);
    for i in 0..128 {
        let want = r[i] + c[i] as f64;
        assert!(
            (out[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "element ({}, {}): {} vs {want}",
            i / 8,
            i % 8,
            out[i]
        );
    }
    // a distinct, structured case: A = index-coded, B = unit columns, so a
    // swapped row/column or register half shows up as a wrong index.
    let a: Vec<f32> = (0..256).map(|i| (i % 16 * 16 + i / 16) as f32).collect();
    let mut b = vec![0f32; 128];
    for n in 0..8 {
        b[(2 * n + 1) * 8 + n] = 1.0; // column n picks A's column 2n+1
    }
    let out = run(0, &a, &b, &vec![0f32; 128]);
    for i in 0..16 {
        for n in 0..8 {
            assert_eq!(out[i * 8 + n], a[i * 16 + 2 * n + 1], "row {i} col {n}");
        }
    }
}

#[test]
fn split_mma_is_fp32_accurate() {
    let mut g = Rng::new(12);
    let a = g.normal_vec(256, 1.0);
    let b = g.normal_vec(128, 3.0);
    let c = g.normal_vec(128, 1.0);
    let out = run(1, &a, &b, &c);
    let r = matmul(&f64s(&a), &f64s(&b), 16, 16, 8);
    let scale = r.iter().fold(0f64, |m, x| m.max(x.abs()));
    for i in 0..128 {
        let want = r[i] + c[i] as f64;
        assert!(
            (out[i] as f64 - want).abs() <= 2e-5 * scale,
            "element {i}: {} vs {want}",
            out[i]
        );
    }
}

#[test]
fn c_fragments_feed_back_as_a_operand() {
    let mut g = Rng::new(13);
    let a = g.normal_vec(256, 1.0);
    let b = g.normal_vec(384, 1.0);
    let c = g.normal_vec(128, 1.0);
    let out = run(2, &a, &b, &c);
    let x = matmul(&f64s(&a), &f64s(&b[..256]), 16, 16, 16);
    let r = matmul(&x, &f64s(&b[256..]), 16, 16, 8);
    let scale = r.iter().fold(0f64, |m, x| m.max(x.abs()));
    for i in 0..128 {
        let want = r[i] + c[i] as f64;
        assert!(
            (out[i] as f64 - want).abs() <= 5e-5 * scale,
            "element {i}: {} vs {want}",
            out[i]
        );
    }
}

/// `ldmatrix.x4` (plain and `.trans`) feeding A and B fragments, on
/// bf16-exact random data: out = A B[:, 0..8] + C exactly as a matmul, for
/// both storage orders (mode 3: A row-major, B as [k][n]; mode 4: A
/// transposed, B as [n][k]).
#[test]
fn ldmatrix_fragments_match_matmul() {
    let mut g = Rng::new(13);
    let round =
        |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect() };
    let a = round(g.normal_vec(256, 1.0));
    let b = round(g.normal_vec(256, 1.0));
    let c = g.normal_vec(128, 1.0);
    // the first 8 columns of the 16 x 16 B
    let b8: Vec<f32> = (0..16)
        .flat_map(|k| b[k * 16..k * 16 + 8].to_vec())
        .collect();
    let r = matmul(&f64s(&a), &f64s(&b8), 16, 16, 8);
    for mode in [3, 4] {
        let out = run(mode, &a, &b, &c);
        for i in 0..128 {
            let want = r[i] + c[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "mode {mode}, element ({}, {}): {} vs {want}",
                i / 8,
                i % 8,
                out[i]
            );
        }
    }
}

#[test]
fn mma_test_params_layout_matches_c() {
    let (size, offs) = MmaTestParams::c_layout();
    assert_eq!(size, std::mem::size_of::<MmaTestParams>());
    assert_eq!(offs, MmaTestParams::OFFSETS.to_vec());
}
