//! One test body for every model op (kernels/model_ops.cu), run on every
//! backend of `rwkv_tune::ops::DeviceOps` — cpu (the Rust twins), emu (the
//! CUDA source on the CPU emulator, with its own small geometry and with the
//! GPU geometry), cuda (when a GPU is present; SKIPPED otherwise) — and
//! compared with the CPU twins of `ops::reference` on random data.
//! Tolerance: ‖x − ref‖∞ / ‖ref‖∞ ≤ 1e-5 (f32).
use std::sync::Arc;

use rwkv_tune::ops::{self, cpu::CpuOps, reference, Act, BonusBufs, DeviceOps, Geom};
use rwkv_tune::rng::Rng;

const TOL: f64 = 1e-5;

fn rel(x: &[f32], r: &[f32]) -> f64 {
    assert_eq!(x.len(), r.len(), "length");
    let m = r
        .iter()
        .fold(0f64, |a, &b| a.max((b as f64).abs()))
        .max(1e-30);
    let d = x
        .iter()
        .zip(r)
        .fold(0f64, |a, (&p, &q)| a.max((p as f64 - q as f64).abs()));
    d / m
}

fn ok(be: &str, what: &str, x: &[f32], r: &[f32]) -> f64 {
    let e = rel(x, r);
    eprintln!("  {be:<9} {what:<16} rel err {e:.2e}");
    assert!(e <= TOL, "{be}: {what}: rel err {e:e} > {TOL:e}");
    e
}

struct Data {
    rows: usize,
    h: usize,
    n: usize,
    g: Rng,
}

impl Data {
    fn c(&self) -> usize {
        self.h * self.n
    }
    fn v(&mut self, n: usize, s: f64) -> Vec<f32> {
        self.g.normal_vec(n, s)
    }
    fn pos(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.g.range(lo, hi) as f32).collect()
    }
}

/// Every op on backend `d`, vs the CPU twins. Returns the worst error.
fn check_all<D: DeviceOps>(d: &D, label: &str, rows: usize, h: usize, n: usize) -> f64 {
    let mut z = Data {
        rows,
        h,
        n,
        g: Rng::new(1234 + rows as u64 * 7 + n as u64),
    };
    let c = z.c();
    let rc = z.rows * c;
    let up = |h: &[f32]| d.upload(h).unwrap();
    let mut worst = 0f64;

    // layer norm, from a row offset (rows 1..)
    let x = z.v((rows + 1) * c, 1.3);
    let (w, b) = (z.pos(c, 0.5, 1.5), z.v(c, 0.2));
    let mut want = vec![0.0; rc];
    reference::layer_norm(&x[c..], rows, c, &w, &b, 1e-5, &mut want);
    let mut y = d.zeros(rc).unwrap();
    d.layer_norm(&up(&x), c, rows, c, &up(&w), &up(&b), 1e-5, &mut y)
        .unwrap();
    worst = worst.max(ok(label, "layer_norm", &d.download(&y).unwrap(), &want));

    // group norm + bonus + gate, and plain group norm
    let eps = 1e-5 * n as f32;
    let (yw, r, k, v, g) = (
        z.v(rc, 0.7),
        z.v(rc, 1.0),
        z.v(rc, 1.0),
        z.v(rc, 1.0),
        z.v(rc, 1.0),
    );
    let rk = z.v(c, 0.3);
    let mut want = yw.clone();
    let bonus = reference::Bonus {
        r: &r,
        k: &k,
        v: &v,
        r_k: &rk,
    };
    reference::group_norm(&mut want, rows, h, n, eps, &w, &b, Some(bonus), Some(&g));
    let (rd, kd, vd, rkd, gd) = (up(&r), up(&k), up(&v), up(&rk), up(&g));
    let mut yd = up(&yw);
    let bb = BonusBufs {
        r: &rd,
        k: &kd,
        v: &vd,
        r_k: &rkd,
    };
    d.group_norm(
        rows,
        h,
        n,
        eps,
        &mut yd,
        &up(&w),
        &up(&b),
        Some(bb),
        Some(&gd),
    )
    .unwrap();
    worst = worst.max(ok(
        label,
        "group_norm+bonus",
        &d.download(&yd).unwrap(),
        &want,
    ));
    let mut want = yw.clone();
    reference::group_norm(&mut want, rows, h, n, eps, &w, &b, None, None);
    let mut yd = up(&yw);
    d.group_norm(rows, h, n, eps, &mut yd, &up(&w), &up(&b), None, None)
        .unwrap();
    worst = worst.max(ok(label, "group_norm", &d.download(&yd).unwrap(), &want));

    // kk prep (one head row of zeros to hit the 1e-12 clamp)
    let mut kin = z.v(rc, 1.0);
    kin[..n].iter_mut().for_each(|q| *q = 0.0);
    let (da, a0, kk, ka) = (
        z.v(rc, 1.0),
        z.v(c, 1.0),
        z.pos(c, 0.5, 1.0),
        z.pos(c, 0.8, 1.2),
    );
    let (mut ko, mut a, mut bo) = (vec![0.0; rc], vec![0.0; rc], vec![0.0; rc]);
    reference::kk_prep(
        rows, h, n, &kin, &da, &a0, &kk, &ka, &mut ko, &mut a, &mut bo,
    );
    let (mut kod, mut ad, mut bd) = (
        d.zeros(rc).unwrap(),
        d.zeros(rc).unwrap(),
        d.zeros(rc).unwrap(),
    );
    d.kk_prep(
        rows,
        h,
        n,
        &up(&kin),
        &up(&da),
        &up(&a0),
        &up(&kk),
        &up(&ka),
        &mut kod,
        &mut ad,
        &mut bd,
    )
    .unwrap();
    worst = worst.max(ok(label, "kk_prep k~", &d.download(&kod).unwrap(), &ko));
    worst = worst.max(ok(label, "kk_prep a", &d.download(&ad).unwrap(), &a));
    worst = worst.max(ok(label, "kk_prep b", &d.download(&bd).unwrap(), &bo));

    // token shift, 6 mixes and 1 mix
    for m in [6usize, 1] {
        let x = z.v(rc, 1.0);
        let s0 = z.v(c, 1.0);
        let mu = z.pos(m * c, 0.0, 1.0);
        let mut st = s0.clone();
        let mut out = vec![0.0; rc * m];
        reference::token_shift(rows, c, &x, &mut st, &mu, m, &mut out);
        let mut sd = up(&s0);
        let mut od = d.zeros(rc * m).unwrap();
        d.token_shift(rows, c, &up(&x), &mut sd, &up(&mu), m, &mut od)
            .unwrap();
        worst = worst.max(ok(
            label,
            &format!("token_shift x{m}"),
            &d.download(&od).unwrap(),
            &out,
        ));
        worst = worst.max(ok(
            label,
            "token_shift state",
            &d.download(&sd).unwrap(),
            &st,
        ));
    }

    // activations, with and without bias
    for (mode, bias) in [
        (Act::Tanh, false),
        (Act::Sigmoid, false),
        (Act::Sigmoid, true),
        (Act::ReluSq, false),
        (Act::Decay, true),
    ] {
        let x = z.v(rc, 2.0);
        let bv = z.v(c, 2.0);
        let mut want = x.clone();
        reference::act(mode, &mut want, c, bias.then_some(&bv[..]));
        let mut xd = up(&x);
        let bd = up(&bv);
        d.act(mode, &mut xd, c, bias.then_some(&bd)).unwrap();
        worst = worst.max(ok(
            label,
            &format!("{mode:?}{}", if bias { "+b" } else { "" }),
            &d.download(&xd).unwrap(),
            &want,
        ));
    }

    // value residual, add, embed
    let (v, vf, v0, dv) = (z.v(rc, 1.0), z.v(rc, 1.0), z.v(c, 1.0), z.v(rc, 1.0));
    let mut want = v.clone();
    reference::value_residual(c, &mut want, &vf, &v0, &dv);
    let mut vd = up(&v);
    d.value_residual(c, &mut vd, &up(&vf), &up(&v0), &up(&dv))
        .unwrap();
    worst = worst.max(ok(
        label,
        "value_residual",
        &d.download(&vd).unwrap(),
        &want,
    ));

    let (x, y) = (z.v(rc, 1.0), z.v(rc, 1.0));
    let mut want = x.clone();
    reference::add(&mut want, &y);
    let mut xd = up(&x);
    d.add(&mut xd, &up(&y)).unwrap();
    worst = worst.max(ok(label, "add", &d.download(&xd).unwrap(), &want));

    let vocab = 13;
    let table = z.v(vocab * c, 1.0);
    let toks: Vec<u32> = (0..rows).map(|i| ((i * 5 + 3) % vocab) as u32).collect();
    let mut want = vec![0.0; rc];
    reference::embed(&toks, &table, c, &mut want);
    let mut od = d.zeros(rc).unwrap();
    d.embed(&toks, &up(&table), c, &mut od).unwrap();
    worst = worst.max(ok(label, "embed", &d.download(&od).unwrap(), &want));

    // matmul from a strided, offset input: y = x[:, c..2c] · wᵀ
    let (nout, k) = (37usize, c);
    let x = z.v(rows * 3 * c, 1.0);
    let w = z.v(nout * k, 0.3);
    let mut want = vec![0.0; rows * nout];
    reference::matmul(&x[c..], 3 * c, rows, &w, nout, k, &mut want);
    let mut yd = d.zeros(rows * nout).unwrap();
    d.matmul(&up(&x), c, 3 * c, rows, &up(&w), nout, k, &mut yd)
        .unwrap();
    worst = worst.max(ok(label, "matmul", &d.download(&yd).unwrap(), &want));
    worst
}

/// Shape errors are typed errors, never panics or out-of-bounds accesses.
fn check_errors<D: DeviceOps>(d: &D) {
    let x = d.zeros(10).unwrap();
    let w = d.zeros(4).unwrap();
    let mut y = d.zeros(8).unwrap();
    let e = d.layer_norm(&x, 4, 2, 4, &w, &w, 1e-5, &mut y).unwrap_err();
    assert!(
        matches!(e, rwkv_tune::Error::Shape { ref name, .. } if name == "x"),
        "{e}"
    );
    let mut a = d.zeros(10).unwrap();
    assert!(d.act(Act::Tanh, &mut a, 4, None).is_err());
    let e = d.embed(&[5], &w, 2, &mut y).unwrap_err();
    assert!(matches!(e, rwkv_tune::Error::Invalid(_)), "{e}");
    assert!(d.matmul(&x, 0, 4, 3, &w, 2, 2, &mut y).is_ok());
    assert!(d.matmul(&x, 0, 4, 3, &w, 3, 2, &mut y).is_err());
}

const SHAPES: [(usize, usize, usize); 3] = [(5, 2, 64), (3, 1, 32), (2, 3, 128)];

#[test]
fn ops_cpu() {
    for (rows, h, n) in SHAPES {
        check_all(&CpuOps::new(), "cpu", rows, h, n);
    }
    check_errors(&CpuOps::new());
}

#[test]
fn ops_emu() {
    let d = ops::emu::EmuOps::default();
    for (rows, h, n) in SHAPES {
        check_all(&d, "emu", rows, h, n);
    }
    check_errors(&d);
}

#[test]
fn ops_emu_gpu_geometry() {
    // the launch geometry the GPU uses (several blocks of 256 / 4 warps)
    let d = ops::emu::EmuOps::with_geom(Geom::GPU);
    check_all(&d, "emu(gpu)", 9, 2, 64);
    // multi-block element-wise kernels: tiny blocks and grids
    let d = ops::emu::EmuOps::with_geom(Geom {
        elem_block: 32,
        max_blocks: 3,
        rows_per_block: 1,
    });
    check_all(&d, "emu(3x32)", 7, 2, 32);
}

#[test]
fn ops_cuda() {
    let gpu = match rwkv_tune::cuda::Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            rwkv_tune::cuda::skip_gpu("ops on cuda", &e);
            return;
        }
    };
    let d = ops::cuda::CudaOps::new(gpu).expect("cuBLAS");
    eprintln!("ops on {}", d.gpu().describe());
    for (rows, h, n) in SHAPES {
        check_all(&d, "cuda", rows, h, n);
    }
    check_all(&d, "cuda", 600, 32, 64);
    check_errors(&d);
}

/// The Rust mirrors of the op param structs match the C compiler's layout.
#[test]
fn ops_params_layout_matches_c() {
    use rwkv_tune::params::*;
    macro_rules! check {
        ($($t:ty),*) => {$(
            let (size, offs) = <$t>::c_layout();
            assert_eq!(size, std::mem::size_of::<$t>(), "sizeof {}", stringify!($t));
            assert_eq!(offs, <$t>::OFFSETS.to_vec(), "offsets of {}", stringify!($t));
        )*};
    }
    check!(
        LayerNormParams,
        GroupNormParams,
        KkPrepParams,
        TokenShiftParams,
        ActParams,
        ValueResidualParams,
        AddParams,
        EmbedParams
    );
}
