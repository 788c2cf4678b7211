//! The bf16 GEMM option of the device forward ([`GemmPrecision::Bf16`]: bf16
//! weights, activations rounded to bf16 per GEMM, f32 accumulation):
//!
//! 1. the emulated `ops_f32_to_bf16` against `half::bf16::from_f32` (bit for
//!    bit, ties and specials included), and the emulated bf16 `matmul_w`
//!    against an f64 GEMM of the same bf16-rounded operands (1e-5 relative);
//! 2. the device model in bf16 on the emulated path against the CPU f32 model
//!    on a random model (3 layers, 2 heads): logits within 5e-2 relative and
//!    not equal (bf16 is really used); on the tiny trained model (../shared,
//!    skipped when absent) the top-1 next byte after `"in` is unchanged;
//! 3. the same on cuda (SKIPPED without a GPU), plus the cuda bf16 GEMM
//!    against the emulated one.
use std::path::PathBuf;
use std::sync::Arc;

use half::bf16;
use rwkv_tune::model::device::DeviceModel;
use rwkv_tune::model::{Config, Logits, Model, State, Weights};
use rwkv_tune::ops::{emu::EmuOps, DeviceOps, GemmPrecision, HostMat};
use rwkv_tune::rng::Rng;

fn rel(x: &[f32], r: &[f32]) -> f64 {
    assert_eq!(x.len(), r.len());
    let m = r
        .iter()
        .fold(0f64, |a, &b| a.max((b as f64).abs()))
        .max(1e-30);
    x.iter()
        .zip(r)
        .fold(0f64, |a, (&p, &q)| a.max((p as f64 - q as f64).abs()))
        / m
}

fn random_vec(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    rng.normal_vec(n, scale)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[test]
fn emu_f32_to_bf16_matches_half() {
    let ops = EmuOps::default();
    let mut rng = Rng::new(7);
    let mut x = random_vec(&mut rng, 3 * 40, 3.0);
    // ties (round to even), carries into the exponent, specials, subnormals
    let specials = [
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f7f_ffff),
        f32::from_bits(0x7f7f_ffff),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x0000_0001),
        f32::from_bits(0x8040_8000),
        -0.0,
        0.0,
        1e-40,
    ];
    x[..specials.len()].copy_from_slice(&specials);
    // rows of 33 columns with a stride of 40
    let got = ops.f32_to_bf16(&x, 40, 3, 33).unwrap();
    let mut want = vec![bf16::ZERO; 3 * 33];
    rwkv_tune::ops::reference::f32_to_bf16(&x, 40, 3, 33, &mut want);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "element {i}: emu {g} vs half {w}");
        let (r, j) = (i / 33, i % 33);
        assert_eq!(w.to_bits(), bf16::from_f32(x[r * 40 + j]).to_bits());
    }
    assert!(ops.f32_to_bf16(&x, 32, 3, 33).is_err(), "ld < cols");
    assert!(ops.f32_to_bf16(&x[..100], 40, 3, 33).is_err(), "short x");
}

/// The bf16 emu GEMM vs f64 on the same bf16-rounded operands; also its
/// distance from the f32 GEMM (must be nonzero: the rounding happened).
#[test]
fn emu_bf16_matmul_matches_f64_on_rounded_operands() {
    let ops = EmuOps::default().with_gemm(GemmPrecision::Bf16);
    assert_eq!(ops.gemm_precision(), GemmPrecision::Bf16);
    let mut rng = Rng::new(3);
    let (m, n, k, ldx, x_off) = (5, 37, 131, 150, 7);
    let x = random_vec(&mut rng, x_off + (m - 1) * ldx + k + 3, 1.0);
    let w = random_vec(&mut rng, n * k, 0.2);
    let wm = ops.upload_mat(&w).unwrap();
    assert!(matches!(wm, HostMat::Bf16(_)));
    let mut y = vec![0f32; m * n];
    ops.matmul_w(&x, x_off, ldx, m, &wm, n, k, &mut y).unwrap();

    let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
    let mut want = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|q| r(x[x_off + i * ldx + q]) * r(w[j * k + q]))
                .sum();
            want[i * n + j] = s as f32;
        }
    }
    let e = rel(&y, &want);
    eprintln!("emu bf16 matmul vs f64 on bf16-rounded operands: rel err {e:.2e}");
    assert!(e <= 1e-5, "{e:e}");

    let f = EmuOps::default();
    let mut y32 = vec![0f32; m * n];
    f.matmul_w(
        &x,
        x_off,
        ldx,
        m,
        &f.upload_mat(&w).unwrap(),
        n,
        k,
        &mut y32,
    )
    .unwrap();
    let d = rel(&y, &y32);
    eprintln!("emu bf16 matmul vs f32 matmul: rel diff {d:.2e}");
    assert!(d > 0.0 && d < 5e-2, "{d:e}");

    // shape errors are typed, not panics
    let mut short = vec![0f32; m * n - 1];
    assert!(ops
        .matmul_w(&x, x_off, ldx, m, &wm, n, k, &mut short)
        .is_err());
    assert!(ops
        .matmul_w(&x, x_off, k - 1, m, &wm, n, k, &mut y)
        .is_err());
}

fn random_model() -> (Weights, Model) {
    // C = 128, H = 2, N = 64, 3 layers, V = 97 (as tests/model_device.rs)
    let mut cfg = Config::with_defaults(3, 128, 64, 97);
    cfg.d_w = 32;
    cfg.d_a = 32;
    cfg.d_v = 32;
    cfg.d_g = 32;
    let w = Weights::random(&cfg, 42).unwrap();
    let m = Model::new(w.clone()).unwrap();
    (w, m)
}

/// The bf16 device model vs the f32 CPU model: sequence mode (T = 20 from a
/// non-zero state) and 4 one-token steps. Returns the worst logits error.
fn check_bf16_model<D: rwkv_tune::ops::backward::BackwardOps>(ops: D, label: &str) -> f64 {
    assert_eq!(ops.gemm_precision(), GemmPrecision::Bf16);
    let (w, cpu) = random_model();
    let dm = DeviceModel::new(ops, &w).unwrap();
    assert_eq!(dm.gemm_precision(), GemmPrecision::Bf16);
    let toks: Vec<u32> = (0..20).map(|i| ((i * 37 + 11) % 97) as u32).collect();
    let mut s_cpu = cpu.new_state();
    cpu.forward(&[5, 6, 7], &mut s_cpu, Logits::None).unwrap();
    let mut s_dev: State = s_cpu.clone();
    let want = cpu.forward_seq(&toks, &mut s_cpu).unwrap();
    let got = dm.forward_seq(&toks, &mut s_dev).unwrap();
    let mut worst = rel(&got, &want);
    eprintln!("{label} bf16 GEMMs: sequence mode T=20: logits rel err {worst:.3e}");
    let mut agree = 0;
    for t in 0..20 {
        let r = t * 97..(t + 1) * 97;
        agree += usize::from(argmax(&got[r.clone()]) == argmax(&want[r]));
    }
    eprintln!("{label} bf16 GEMMs: top-1 agrees on {agree}/20 positions");
    for &tok in &[3u32, 96, 0, 50] {
        let want = cpu.step(tok, &mut s_cpu).unwrap();
        let got = dm.step(tok, &mut s_dev).unwrap();
        worst = worst.max(rel(&got, &want));
    }
    eprintln!("{label} bf16 GEMMs: worst logits rel err incl. 4 steps {worst:.3e}");
    assert!(
        worst > 0.0,
        "{label}: bf16 logits equal the f32 ones: bf16 not used"
    );
    assert!(worst <= 5e-2, "{label}: bf16 logits rel err {worst:e}");
    worst
}

#[test]
fn device_model_bf16_emu_close_to_cpu_model() {
    check_bf16_model(EmuOps::default().with_gemm(GemmPrecision::Bf16), "emu");
}

#[test]
fn device_model_bf16_cuda_close_to_cpu_model() {
    let gpu = match rwkv_tune::cuda::Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            rwkv_tune::cuda::skip_gpu("bf16 device model on cuda", &e);
            return;
        }
    };
    let ops = rwkv_tune::ops::cuda::CudaOps::new(gpu)
        .unwrap()
        .with_gemm(GemmPrecision::Bf16);

    // the cuda bf16 GEMM vs the emulated one (same operands, f32 sums)
    let mut rng = Rng::new(11);
    let (m, n, k, ldx, x_off) = (9, 70, 200, 210, 5);
    let x = random_vec(&mut rng, x_off + (m - 1) * ldx + k, 1.0);
    let w = random_vec(&mut rng, n * k, 0.2);
    let emu = EmuOps::default().with_gemm(GemmPrecision::Bf16);
    let mut want = vec![0f32; m * n];
    emu.matmul_w(
        &x,
        x_off,
        ldx,
        m,
        &emu.upload_mat(&w).unwrap(),
        n,
        k,
        &mut want,
    )
    .unwrap();
    let xd = ops.upload(&x).unwrap();
    let wd = ops.upload_mat(&w).unwrap();
    let mut yd = ops.zeros(m * n).unwrap();
    ops.matmul_w(&xd, x_off, ldx, m, &wd, n, k, &mut yd)
        .unwrap();
    let got = ops.download(&yd).unwrap();
    let e = rel(&got, &want);
    eprintln!("cuda bf16 GEMM vs emu bf16 GEMM: rel err {e:.2e}");
    assert!(e <= 1e-5, "{e:e}");

    check_bf16_model(ops, "cuda");
}

#[test]
fn tiny_model_bf16_emu_keeps_top1() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/rwkv7-tiny-834k");
    let path = dir.join("rwkv7-tiny-834k.safetensors");
    if !path.is_file() {
        eprintln!("SKIPPED: {} not found", path.display());
        return;
    }
    let w = Weights::load(&path).unwrap();
    let cpu = Model::new(w.clone()).unwrap();
    let dm = DeviceModel::new(EmuOps::default().with_gemm(GemmPrecision::Bf16), &w).unwrap();
    let prompt = [34u32, 105, 110]; // "in
    let mut s = cpu.new_state();
    let want = cpu.forward(&prompt, &mut s, Logits::Last).unwrap();
    let mut ds = dm.new_state().unwrap();
    let got = dm.forward_dev(&prompt, &mut ds, Logits::Last).unwrap();
    let e = rel(&got, &want);
    let (tg, tw) = (argmax(&got), argmax(&want));
    eprintln!(
        "tiny model, bf16 GEMMs on emu: logits rel err {e:.3e}; top-1 {tg} ({:?}) vs f32 {tw} ({:?})",
        tg as u8 as char, tw as u8 as char
    );
    assert!(e > 0.0 && e <= 5e-2, "{e:e}");
    assert_eq!(tg, tw, "top-1 next byte changed under bf16 GEMMs");
}
