//! The backward and optimizer ops of state tuning (`ops::backward::BackwardOps`)
//! on every backend — cpu (the Rust twins of `ops::backward_ref`), emu
//! (`kernels/tune_ops.cu` on the CPU emulator, with its own small geometry and
//! with the GPU geometry), cuda (when a GPU is present; SKIPPED otherwise) —
//! compared with the CPU twins on seeded random data; plus finite-difference
//! checks of the twins themselves against the forward functions of
//! `ops::reference`, which is what makes the twins trustworthy.
//!
//! Tolerances (‖x − ref‖∞ / ‖ref‖∞, see each constant):
//! - [`TOL`] 1e-5 for every kernel-vs-twin comparison in f32: the kernels
//!   compute the twins' formulas with the same f32 operations; what differs
//!   is the order of the reductions (warp/block trees vs sequential sums,
//!   ~√len · 6e-8 relative) and, on a GPU, FMA contraction — both orders of
//!   magnitude below 1e-5 for the sizes here. The largest case, xent with
//!   V = 65536 (cuda only), sums 65536 exponentials in f32 on both sides
//!   (≈1e-5 relative each), which moves lse by ≈1e-5: ≈1e-6 of the loss,
//!   ≈1e-7 of the largest gradient entry.
//! - [`FD_TOL`] 5e-4 for the finite-difference checks: central differences
//!   with step 1e-2 on f32 forward functions have a truncation error of
//!   O(h²) ≈ 1e-5 … 1e-4 · |f‴| and a rounding error of ≈ 6e-8 · |L_row| / h
//!   ≈ 1e-5 (only the outputs of the perturbed row change, the rest cancel
//!   exactly); the worst measured is 6.5e-5 (GroupNorm dy), so 5e-4 leaves a
//!   margin of ~8 while any wrong or missing term gives an O(1e-2 … 1) error.
use rwkv_tune::ops::backward::{BackwardOps, GnBwdBufs, GnBwdGrads, KkBwdBufs, SdtBwdBufs, UpBufs};
use rwkv_tune::ops::backward_ref::{self as bref, AdamStep};
use rwkv_tune::ops::emu::EmuOps;
use rwkv_tune::ops::{cpu::CpuOps, reference, Act, DeviceOps, Geom};
use rwkv_tune::rng::Rng;
use rwkv_tune::Error;

/// Kernel vs CPU twin, f32 (see the module docs).
const TOL: f64 = 1e-5;
/// The WKV backward, emulated / CUDA kernel vs the Rust reference recurrence:
/// the same tolerance the wkv7 backend tests use for f32 I/O.
const WKV_TOL: f64 = 1e-5;
/// Finite differences vs the twins (see the module docs).
const FD_TOL: f64 = 5e-4;

const ACTS: [Act; 4] = [Act::Tanh, Act::Sigmoid, Act::ReluSq, Act::Decay];

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

fn ok(be: &str, what: &str, x: &[f32], r: &[f32], tol: f64) -> f64 {
    let e = rel(x, r);
    eprintln!("  {be:<9} {what:<28} rel err {e:.2e}");
    assert!(
        e.is_finite() && e <= tol,
        "{be}: {what}: rel err {e:e} > {tol:e}"
    );
    e
}

struct Z(Rng);

impl Z {
    fn v(&mut self, n: usize, s: f64) -> Vec<f32> {
        self.0.normal_vec(n, s)
    }
    fn pos(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.0.range(lo, hi) as f32).collect()
    }
}

/// Worst error per op name, for the summary line of each backend.
#[derive(Default)]
struct Worst(Vec<(String, f64)>);

impl Worst {
    fn add(&mut self, what: &str, e: f64) {
        match self.0.iter_mut().find(|(n, _)| n == what) {
            Some((_, w)) => *w = w.max(e),
            None => self.0.push((what.to_string(), e)),
        }
    }
    fn print(&self, be: &str) {
        eprintln!("== {be}: worst rel err per op ==");
        for (n, e) in &self.0 {
            eprintln!("   {n:<22} {e:.2e}");
        }
    }
}

/// `sdt_bwd`'s inputs from 13 buffers in the order k, da, a0, k_k, k_a,
/// d_kout, d_a, d_b, r, k~, v, g, dout.
fn sdt_bufs<B>(b: &[B]) -> SdtBwdBufs<'_, B> {
    SdtBwdBufs {
        kk: KkBwdBufs {
            k: &b[0],
            da: &b[1],
            a0: &b[2],
            k_k: &b[3],
            k_a: &b[4],
            d_kout: &b[5],
            d_a: &b[6],
            d_b: &b[7],
        },
        r: &b[8],
        kt: &b[9],
        v: &b[10],
        g: &b[11],
        dout: &b[12],
    }
}

/// Every op of `d` on one shape (`rows` rows of `h` heads of `n`) vs the
/// CPU twins.
fn check_all<D: BackwardOps>(d: &D, be: &str, rows: usize, h: usize, n: usize, w: &mut Worst) {
    eprintln!("-- {be}: rows {rows}, H {h}, N {n}");
    let mut z = Z(Rng::new(
        0xbac0 + rows as u64 * 131 + h as u64 * 17 + n as u64,
    ));
    let c = h * n;
    let rc = rows * c;
    let cpu = CpuOps::new();
    let up = |x: &[f32]| d.upload(x).unwrap();
    let down = |b: &D::Buf| d.download(b).unwrap();

    // matmul_t: dx[m, k] = dy[m, n2] · w[n2, k]
    {
        let (m, n2, k) = (rows, 3 * n / 2 + 1, c);
        let (dy, wm) = (z.v(m * n2, 1.0), z.v(n2 * k, 0.5));
        let mut want = z.v(m * k, 1.0);
        let mut got = up(&want);
        cpu.matmul_t(&dy, m, &wm, n2, k, &mut want).unwrap();
        d.matmul_t(&up(&dy), m, &up(&wm), n2, k, &mut got).unwrap();
        w.add("matmul_t", ok(be, "matmul_t", &down(&got), &want, TOL));
    }

    // layer_norm_bwd: from a row offset of 2, accumulating into a non-zero
    // dx, whose rows outside [2, 2 + rows) must stay untouched
    {
        let off = 2 * c;
        let len = (rows + 3) * c;
        let x = z.v(len, 1.3);
        let wt = z.pos(c, 0.5, 1.5);
        let dy = z.v(rc, 1.0);
        let mut want = z.v(len, 0.5);
        let mut got = up(&want);
        cpu.layer_norm_bwd(&x, off, rows, c, &wt, 1e-5, &dy, &mut want)
            .unwrap();
        d.layer_norm_bwd(&up(&x), off, rows, c, &up(&wt), 1e-5, &up(&dy), &mut got)
            .unwrap();
        w.add(
            "layer_norm_bwd",
            ok(be, "layer_norm_bwd", &down(&got), &want, TOL),
        );
    }

    // token_shift_bwd, 1 and 6 mixes, non-zero incoming dstate
    for n_mix in [1usize, 3, 6] {
        let t = rows;
        let dmix: Vec<Vec<f32>> = (0..n_mix).map(|_| z.v(t * c, 1.0)).collect();
        let mu = z.pos(n_mix * c, 0.0, 1.0);
        let ds0 = z.v(c, 1.0);
        let mut want_s = ds0.clone();
        let mut want_x = z.v(t * c, 1.0);
        let mut got_x = up(&want_x);
        let refs: Vec<&Vec<f32>> = dmix.iter().collect();
        cpu.token_shift_bwd(t, c, &refs, &mu, &mut want_s, &mut want_x)
            .unwrap();
        let dd: Vec<D::Buf> = dmix.iter().map(|v| up(v)).collect();
        let dr: Vec<&D::Buf> = dd.iter().collect();
        let mut got_s = up(&ds0);
        d.token_shift_bwd(t, c, &dr, &up(&mu), &mut got_s, &mut got_x)
            .unwrap();
        let e1 = ok(
            be,
            &format!("token_shift_bwd dx m{n_mix}"),
            &down(&got_x),
            &want_x,
            TOL,
        );
        let e2 = ok(
            be,
            &format!("token_shift_bwd dstate m{n_mix}"),
            &down(&got_s),
            &want_s,
            TOL,
        );
        w.add("token_shift_bwd", e1.max(e2));
    }

    // act_bwd, every mode, with and without bias, on the first rc of a
    // longer buffer (the tail must stay untouched)
    for mode in ACTS {
        for bias in [false, true] {
            let pre = z.v(rc + 3, 2.0);
            let bv = z.v(c, 1.0);
            let mut want = z.v(rc + 3, 1.0);
            let mut got = up(&want);
            let bd = up(&bv);
            cpu.act_bwd(mode, rc, c, &pre, bias.then_some(&bv), &mut want)
                .unwrap();
            d.act_bwd(mode, rc, c, &up(&pre), bias.then_some(&bd), &mut got)
                .unwrap();
            let what = format!("act_bwd {mode:?}{}", if bias { "+b" } else { "" });
            w.add("act_bwd", ok(be, &what, &down(&got), &want, TOL));
        }
    }

    // kk_prep_bwd; the second case has one (row, head) with k = 0 (the
    // clamped-norm branch)
    for zero_head in [false, true] {
        let mut k = z.v(rc, 1.0);
        if zero_head {
            k[c - n..c].iter_mut().for_each(|v| *v = 0.0);
        }
        let (da, a0, kk, ka) = (
            z.v(rc, 1.0),
            z.v(c, 0.5),
            z.pos(c, 0.5, 1.5),
            z.pos(c, 0.0, 1.0),
        );
        let (dko, dav, dbv) = (z.v(rc, 1.0), z.v(rc, 1.0), z.v(rc, 1.0));
        let mut want_k = z.v(rc, 1.0);
        let mut want_a = z.v(rc, 1.0);
        let mut got_k = up(&want_k);
        let mut got_a = up(&want_a);
        cpu.kk_prep_bwd(
            rows,
            h,
            n,
            &KkBwdBufs {
                k: &k,
                da: &da,
                a0: &a0,
                k_k: &kk,
                k_a: &ka,
                d_kout: &dko,
                d_a: &dav,
                d_b: &dbv,
            },
            &mut want_k,
            &mut want_a,
        )
        .unwrap();
        let bufs: Vec<D::Buf> = [&k, &da, &a0, &kk, &ka, &dko, &dav, &dbv]
            .iter()
            .map(|v| up(v))
            .collect();
        d.kk_prep_bwd(
            rows,
            h,
            n,
            &KkBwdBufs {
                k: &bufs[0],
                da: &bufs[1],
                a0: &bufs[2],
                k_k: &bufs[3],
                k_a: &bufs[4],
                d_kout: &bufs[5],
                d_a: &bufs[6],
                d_b: &bufs[7],
            },
            &mut got_k,
            &mut got_a,
        )
        .unwrap();
        let tag = if zero_head { " (k=0 head)" } else { "" };
        let e1 = ok(
            be,
            &format!("kk_prep_bwd dk{tag}"),
            &down(&got_k),
            &want_k,
            TOL,
        );
        let e2 = ok(
            be,
            &format!("kk_prep_bwd dda{tag}"),
            &down(&got_a),
            &want_a,
            TOL,
        );
        w.add("kk_prep_bwd", e1.max(e2));
    }

    // sdt_bwd: per-element gradients of k_k, k_a, r_k (docs/sdt.md)
    {
        let vals: Vec<Vec<f32>> = vec![
            z.v(rc, 1.0),       // k
            z.v(rc, 1.0),       // da
            z.v(c, 0.5),        // a0
            z.pos(c, 0.5, 1.5), // k_k
            z.pos(c, 0.0, 1.0), // k_a
            z.v(rc, 1.0),       // d_kout
            z.v(rc, 1.0),       // d_a
            z.v(rc, 1.0),       // d_b
            z.v(rc, 1.0),       // r
            z.v(rc, 1.0),       // k~
            z.v(rc, 1.0),       // v
            z.v(rc, 1.0),       // g
            z.v(rc, 1.0),       // dout
        ];
        let mut want: Vec<Vec<f32>> = (0..3).map(|_| z.v(rc, 1.0)).collect();
        let mut got: Vec<D::Buf> = want.iter().map(|v| up(v)).collect();
        let [wk, wa, wr] = &mut want[..] else {
            unreachable!()
        };
        cpu.sdt_bwd(rows, h, n, &sdt_bufs(&vals), wk, wa, wr)
            .unwrap();
        let bufs: Vec<D::Buf> = vals.iter().map(|v| up(v)).collect();
        let [gk, ga, gr] = &mut got[..] else {
            unreachable!()
        };
        d.sdt_bwd(rows, h, n, &sdt_bufs(&bufs), gk, ga, gr).unwrap();
        let mut e = 0f64;
        for (name, g, wv) in [
            ("dk_k", &*gk, &*wk),
            ("dk_a", &*ga, &*wa),
            ("dr_k", &*gr, &*wr),
        ] {
            e = e.max(ok(be, &format!("sdt_bwd {name}"), &down(g), wv, TOL));
        }
        w.add("sdt_bwd", e);
    }

    // mask_mul on the first n of longer buffers: a 0/1 mask
    {
        let len = rc + 7;
        let m: Vec<f32> = z
            .pos(len, 0.0, 1.0)
            .iter()
            .map(|&u| f32::from(u8::from(u < 0.6)))
            .collect();
        let mut want = z.v(len, 1.0);
        let mut got = up(&want);
        cpu.mask_mul(rc + 3, &m, &mut want).unwrap();
        d.mask_mul(rc + 3, &up(&m), &mut got).unwrap();
        w.add("mask_mul", ok(be, "mask_mul", &down(&got), &want, TOL));
    }

    // lora_in from a row offset with a wider row stride, with and without
    // dropout (the same hash on every backend)
    for keep in [1.0f32, 0.7] {
        let (k, ldx, off) = (c, c + 3, 2 * (c + 3));
        let x = z.v(off + rows * ldx, 1.0);
        let seqs = (rows.div_ceil(2), 3);
        let mut want = z.v(rows * k, 1.0);
        let mut got = up(&want);
        cpu.lora_in(rows, k, &x, off, ldx, seqs, 11, keep, 0.5, &mut want)
            .unwrap();
        d.lora_in(rows, k, &up(&x), off, ldx, seqs, 11, keep, 0.5, &mut got)
            .unwrap();
        w.add(
            "lora_in",
            ok(be, &format!("lora_in keep {keep}"), &down(&got), &want, TOL),
        );
    }

    // value_residual_bwd over the first rc elements of longer buffers
    {
        let len = rc + 5;
        let (vraw, vf, v0, dvp) = (z.v(len, 1.0), z.v(len, 1.0), z.v(c, 1.0), z.v(len, 1.0));
        let mut want_dv = z.v(len, 1.0);
        let mut want_dvf = z.v(len, 1.0);
        let mut want_ddv = z.v(len, 1.0);
        let (mut g1, mut g2, mut g3) = (up(&want_dv), up(&want_dvf), up(&want_ddv));
        cpu.value_residual_bwd(
            rc,
            c,
            &vraw,
            &vf,
            &v0,
            &dvp,
            &mut want_dv,
            &mut want_dvf,
            &mut want_ddv,
        )
        .unwrap();
        d.value_residual_bwd(
            rc,
            c,
            &up(&vraw),
            &up(&vf),
            &up(&v0),
            &up(&dvp),
            &mut g1,
            &mut g2,
            &mut g3,
        )
        .unwrap();
        let e = ok(be, "value_residual_bwd dv", &down(&g1), &want_dv, TOL)
            .max(ok(be, "value_residual_bwd dvf", &down(&g2), &want_dvf, TOL))
            .max(ok(be, "value_residual_bwd ddv", &down(&g3), &want_ddv, TOL));
        w.add("value_residual_bwd", e);
    }

    // group_norm_bwd (bonus + gate); outputs pre-filled with noise
    {
        let eps = 1e-5 * n as f32;
        let ins: Vec<Vec<f32>> = vec![
            z.v(rc, 0.7),       // y
            z.pos(c, 0.5, 1.5), // weight
            z.v(c, 0.2),        // bias
            z.v(rc, 1.0),       // r
            z.v(rc, 1.0),       // k
            z.v(rc, 1.0),       // v
            z.v(c, 0.3),        // r_k
            z.v(rc, 1.0),       // g
            z.v(rc, 1.0),       // dout
        ];
        let mut want: Vec<Vec<f32>> = (0..5).map(|_| z.v(rc, 1.0)).collect();
        let mut got: Vec<D::Buf> = want.iter().map(|v| up(v)).collect();
        {
            let [dy, dr, dk, dv, dg] = &mut want[..] else {
                unreachable!()
            };
            cpu.group_norm_bwd(
                rows,
                h,
                n,
                eps,
                &GnBwdBufs {
                    y: &ins[0],
                    weight: &ins[1],
                    bias: &ins[2],
                    r: &ins[3],
                    k: &ins[4],
                    v: &ins[5],
                    r_k: &ins[6],
                    g: &ins[7],
                    dout: &ins[8],
                },
                GnBwdGrads { dy, dr, dk, dv, dg },
            )
            .unwrap();
        }
        let bufs: Vec<D::Buf> = ins.iter().map(|v| up(v)).collect();
        {
            let [dy, dr, dk, dv, dg] = &mut got[..] else {
                unreachable!()
            };
            d.group_norm_bwd(
                rows,
                h,
                n,
                eps,
                &GnBwdBufs {
                    y: &bufs[0],
                    weight: &bufs[1],
                    bias: &bufs[2],
                    r: &bufs[3],
                    k: &bufs[4],
                    v: &bufs[5],
                    r_k: &bufs[6],
                    g: &bufs[7],
                    dout: &bufs[8],
                },
                GnBwdGrads { dy, dr, dk, dv, dg },
            )
            .unwrap();
        }
        let mut e = 0f64;
        for (i, name) in ["dy", "dr", "dk", "dv", "dg"].iter().enumerate() {
            e = e.max(ok(
                be,
                &format!("group_norm_bwd {name}"),
                &down(&got[i]),
                &want[i],
                TOL,
            ));
        }
        w.add("group_norm_bwd", e);
    }

    // outer_acc into a non-zero accumulator
    {
        let r = z.v(rc, 1.0);
        let mut want = z.v(h * n * n, 1.0);
        let mut got = up(&want);
        cpu.outer_acc(rows, h, n, &r, &mut want).unwrap();
        d.outer_acc(rows, h, n, &up(&r), &mut got).unwrap();
        w.add("outer_acc", ok(be, "outer_acc", &down(&got), &want, TOL));
    }

    // kernel-upscaled read-out: M below one warp and over one warp (a
    // partial second tile), into non-zero y / du / dr (they accumulate) and
    // a phi full of garbage (overwritten)
    for m in [5usize, 37] {
        let (r, cen) = (z.v(rc, 1.0), z.v(h * m * n, 1.0));
        let gam = z.pos(h, 0.3 / n as f64, 2.0 / n as f64);
        let u = z.v(h * n * m, 0.5);
        let k_cpu = UpBufs {
            m,
            linear: false,
            centres: &cen,
            gamma: &gam,
            u: &u,
        };
        let (cb, gb, ub) = (up(&cen), up(&gam), up(&u));
        let k_dev = UpBufs {
            m,
            linear: false,
            centres: &cb,
            gamma: &gb,
            u: &ub,
        };
        let rb = up(&r);
        let mut phi_w = z.v(rows * h * m, 3.0);
        let mut phi_g = up(&phi_w);
        let mut y_w = z.v(rc, 0.1);
        let mut y_g = up(&y_w);
        cpu.up_fwd(rows, h, n, &k_cpu, &r, &mut phi_w, &mut y_w)
            .unwrap();
        d.up_fwd(rows, h, n, &k_dev, &rb, &mut phi_g, &mut y_g)
            .unwrap();
        let e = ok(be, &format!("up_fwd phi M={m}"), &down(&phi_g), &phi_w, TOL).max(ok(
            be,
            &format!("up_fwd y M={m}"),
            &down(&y_g),
            &y_w,
            TOL,
        ));
        w.add("up_fwd", e);
        let dy = z.v(rc, 1.0);
        let mut du_w = z.v(h * n * m, 0.01);
        let mut dr_w = z.v(rc, 0.01);
        let (mut du_g, mut dr_g) = (up(&du_w), up(&dr_w));
        cpu.up_bwd(rows, h, n, &k_cpu, &r, &phi_w, &dy, &mut du_w, &mut dr_w)
            .unwrap();
        d.up_bwd(
            rows,
            h,
            n,
            &k_dev,
            &rb,
            &up(&phi_w),
            &up(&dy),
            &mut du_g,
            &mut dr_g,
        )
        .unwrap();
        let e = ok(be, &format!("up_bwd du M={m}"), &down(&du_g), &du_w, TOL).max(ok(
            be,
            &format!("up_bwd dr M={m}"),
            &down(&dr_g),
            &dr_w,
            TOL,
        ));
        w.add("up_bwd", e);
    }

    // batched_matmul, both transposes
    for trans in [false, true] {
        let groups = h + 1;
        let (a, b) = (z.v(groups * n * n, 1.0), z.v(groups * n * n, 1.0));
        let mut want = z.v(groups * n * n, 1.0);
        let mut got = up(&want);
        cpu.batched_matmul(groups, n, &a, &b, trans, &mut want)
            .unwrap();
        d.batched_matmul(groups, n, &up(&a), &up(&b), trans, &mut got)
            .unwrap();
        let what = format!("batched_matmul{}", if trans { " T" } else { "" });
        w.add("batched_matmul", ok(be, &what, &down(&got), &want, TOL));
    }
}

/// Cross-entropy on `rows` rows of `v` logits: without soft targets, with
/// soft targets (lam 0.3, some zero entries) and with lam 0 (= none); some
/// rows masked out (0) and one with weight 0.5.
fn check_xent<D: BackwardOps>(d: &D, be: &str, rows: usize, v: usize, w: &mut Worst) {
    let mut z = Z(Rng::new(0x7e47 + rows as u64 * 3 + v as u64));
    let up = |x: &[f32]| d.upload(x).unwrap();
    let logits = z.v(rows * v, 2.0);
    let targets: Vec<u32> = (0..rows).map(|_| z.0.below(v as u64) as u32).collect();
    let mask: Vec<f32> = (0..rows)
        .map(|r| match r % 4 {
            1 => 0.0,
            3 => 0.5,
            _ => 1.0,
        })
        .collect();
    // soft targets: a softmax of random scores, with every 7th entry zeroed
    let mut soft = vec![0f32; rows * v];
    for r in 0..rows {
        let s = z.v(v, 1.5);
        let row = &mut soft[r * v..(r + 1) * v];
        for (j, (o, &x)) in row.iter_mut().zip(&s).enumerate() {
            *o = if j % 7 == 3 { 0.0 } else { x.exp() };
        }
        let tot: f32 = row.iter().sum();
        row.iter_mut().for_each(|o| *o /= tot);
    }
    for (use_soft, lam) in [(false, 0.0f32), (true, 0.3), (true, 0.0)] {
        let mut want = logits.clone();
        let mut want_l = vec![7f32; rows + 2];
        let sv = use_soft.then_some(&soft);
        CpuOps::new()
            .xent(rows, v, &mut want, &targets, &mask, sv, lam, &mut want_l)
            .unwrap();
        let sd = up(&soft);
        let mut got = up(&logits);
        let mut got_l = up(&vec![7f32; rows + 2]);
        d.xent(
            rows,
            v,
            &mut got,
            &targets,
            &mask,
            use_soft.then_some(&sd),
            lam,
            &mut got_l,
        )
        .unwrap();
        let tag = format!("xent V{v} soft={use_soft} lam={lam}");
        let gl = d.download(&got_l).unwrap();
        let e = ok(
            be,
            &format!("{tag} grad"),
            &d.download(&got).unwrap(),
            &want,
            TOL,
        )
        .max(ok(be, &format!("{tag} loss"), &gl, &want_l, TOL));
        // masked rows: zero gradient and zero loss (checked on the twin too)
        for r in (0..rows).filter(|r| mask[*r] == 0.0) {
            assert_eq!(gl[r], 0.0, "{be}: masked row {r} loss");
            assert!(want[r * v..(r + 1) * v].iter().all(|&x| x == 0.0));
        }
        w.add("xent", e);
    }
}

/// The weight gradient `dw (+)= dyᵀ·x` (x rows at a stride, from an
/// offset; overwriting and accumulating) against an f64 sum written here.
fn check_matmul_tn<D: BackwardOps>(d: &D, be: &str, m: usize, n: usize, k: usize, w: &mut Worst) {
    let mut z = Z(Rng::new(0x7a7 + (m * 31 + n * 7 + k) as u64));
    let (ldx, off) = (k + 3, 5);
    let dy = z.v(m * n, 1.0);
    let x = z.v(off + m * ldx, 1.0);
    let dw0 = z.v(n * k, 1.0);
    for acc in [false, true] {
        let mut want = vec![0f64; n * k];
        for o in 0..n {
            for j in 0..k {
                let mut s = if acc { dw0[o * k + j] as f64 } else { 0.0 };
                for i in 0..m {
                    s += dy[i * n + o] as f64 * x[off + i * ldx + j] as f64;
                }
                want[o * k + j] = s;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let mut got = d.upload(&dw0).unwrap();
        d.matmul_tn(
            &d.upload(&dy).unwrap(),
            m,
            n,
            &d.upload(&x).unwrap(),
            off,
            ldx,
            k,
            &mut got,
            acc,
        )
        .unwrap();
        let what = format!("matmul_tn {m}x{n}x{k} acc={acc}");
        w.add(
            "matmul_tn",
            ok(be, &what, &d.download(&got).unwrap(), &want, TOL),
        );
    }
    // a stride below the width, a short x: typed errors
    let (dyb, xb) = (d.upload(&dy).unwrap(), d.upload(&x).unwrap());
    let mut dw = d.upload(&dw0).unwrap();
    assert!(
        d.matmul_tn(&dyb, m, n, &xb, 0, k - 1, k, &mut dw, false)
            .is_err(),
        "{be}: ldx < k"
    );
    assert!(
        d.matmul_tn(&dyb, m, n, &xb, off + 4, ldx, k, &mut dw, false)
            .is_err(),
        "{be}: short x"
    );
}

/// Softmax with temperature (the observer's soft targets) on `rows` rows of
/// `v` logits at temperatures 0.25, 1 and 3: against an f64 softmax written
/// here (independent of the twin) and the CPU twin; bad temperatures and a
/// short buffer are typed errors.
fn check_softmax<D: BackwardOps>(d: &D, be: &str, rows: usize, v: usize, w: &mut Worst) {
    let mut z = Z(Rng::new(0x50f7 + rows as u64 * 5 + v as u64));
    let logits = z.v(rows * v, 4.0);
    for temp in [0.25f32, 1.0, 3.0] {
        let mut want = vec![0f64; rows * v];
        for r in 0..rows {
            let x = &logits[r * v..(r + 1) * v];
            let mx = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let e: Vec<f64> = x
                .iter()
                .map(|&q| ((q as f64 - mx) / temp as f64).exp())
                .collect();
            let s: f64 = e.iter().sum();
            for (o, q) in want[r * v..(r + 1) * v].iter_mut().zip(&e) {
                *o = q / s;
            }
        }
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        let mut twin = logits.clone();
        CpuOps::new().softmax(rows, v, temp, &mut twin).unwrap();
        let mut got = d.upload(&logits).unwrap();
        d.softmax(rows, v, temp, &mut got).unwrap();
        let tag = format!("softmax V{v} T{temp}");
        let e = ok(be, &tag, &d.download(&got).unwrap(), &want, TOL).max(ok(
            "cpu",
            &format!("{tag} twin"),
            &twin,
            &want,
            TOL,
        ));
        w.add("softmax", e);
    }
    let mut x = d.upload(&logits).unwrap();
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        assert!(
            matches!(d.softmax(rows, v, bad, &mut x), Err(Error::Invalid(_))),
            "{be}: T = {bad}"
        );
    }
    assert!(
        d.softmax(rows + 1, v, 1.0, &mut x).is_err(),
        "{be}: short x"
    );
    assert!(d.softmax(rows, 0, 1.0, &mut x).is_err(), "{be}: V = 0");
}

/// Adam over a few steps (with and without weight decay), and Σx².
fn check_adam_sumsq<D: BackwardOps>(d: &D, be: &str, n: usize, w: &mut Worst) {
    let mut z = Z(Rng::new(0xada + n as u64));
    let up = |x: &[f32]| d.upload(x).unwrap();
    let down = |b: &D::Buf| d.download(b).unwrap();
    for wd in [0.0f32, 0.01] {
        let len = n + 4; // only the first n elements are updated
        let (mut p, mut m, mut v) = (z.v(len, 1.0), vec![0f32; len], vec![0f32; len]);
        let (mut pd, mut md, mut vd) = (up(&p), up(&m), up(&v));
        let (b1, b2) = (0.9f32, 0.999f32);
        for step in 1..=3 {
            let g = z.v(len, 1.0);
            let s = AdamStep {
                lr: 1e-2,
                beta1: b1,
                beta2: b2,
                eps: 1e-8,
                weight_decay: wd,
                bc1: 1.0 - b1.powi(step),
                bc2: 1.0 - b2.powi(step),
                grad_scale: 0.25,
            };
            CpuOps::new()
                .adam(n, &s, &mut p, &g, &mut m, &mut v)
                .unwrap();
            d.adam(n, &s, &mut pd, &up(&g), &mut md, &mut vd).unwrap();
            let tag = format!("adam wd={wd} step {step}");
            let e = ok(be, &format!("{tag} p"), &down(&pd), &p, TOL)
                .max(ok(be, &format!("{tag} m"), &down(&md), &m, TOL))
                .max(ok(be, &format!("{tag} v"), &down(&vd), &v, TOL));
            w.add("adam", e);
        }
    }
    for len in [0usize, 1, 33, n] {
        let x = z.v(len + 2, 1.0);
        let exact: f64 = x[..len].iter().map(|&v| v as f64 * v as f64).sum();
        let got = d.sumsq(len, &up(&x)).unwrap();
        let cpu = CpuOps::new().sumsq(len, &x).unwrap();
        let e = (got - exact).abs() / exact.max(1e-30);
        eprintln!("  {be:<9} {:<28} rel err {e:.2e}", format!("sumsq n={len}"));
        assert!(e <= TOL, "{be}: sumsq n={len}: {got} vs {exact}");
        assert!((cpu - exact).abs() <= 1e-12 * exact.max(1.0), "cpu sumsq");
        w.add("sumsq", e);
    }
    // device scalars: out[slot] += Σ x or Σ x² (f64 reference), slot 1 of 3
    for squares in [false, true] {
        for len in [1usize, 33, n] {
            let x = z.v(len + 2, 1.0);
            let base = z.v(3, 1.0);
            let sum: f64 = x[..len]
                .iter()
                .map(|&v| {
                    if squares {
                        v as f64 * v as f64
                    } else {
                        v as f64
                    }
                })
                .sum();
            let mut o = up(&base);
            d.reduce_acc(squares, len, &up(&x), &mut o, 1).unwrap();
            let got = down(&o);
            let want = base[1] as f64 + sum;
            // Σ x can cancel: relative to Σ |x| (what the rounding scales with)
            let scale: f64 = x[..len]
                .iter()
                .map(|&v| (v as f64).abs().powi(if squares { 2 } else { 1 }))
                .sum::<f64>()
                + (base[1] as f64).abs();
            let e = (got[1] as f64 - want).abs() / scale;
            eprintln!(
                "  {be:<9} {:<28} rel err {e:.2e}",
                format!("reduce_acc sq={squares} n={len}")
            );
            assert!(e <= TOL, "{be}: reduce_acc: {} vs {want}", got[1]);
            assert_eq!((got[0], got[2]), (base[0], base[2]), "{be}: other slots");
            w.add("reduce_acc", e);
        }
    }
    // Adam with the clipping decided on the device: a norm under the clip,
    // one over it, and a non-finite one (no update at all)
    for (clip, ssq) in [(1e9f32, 4.0f32), (0.1, 4.0), (1.0, f32::INFINITY)] {
        let len = n + 4;
        let (p0, m0, v0) = (z.v(len, 1.0), z.v(len, 0.1), z.pos(len, 0.0, 0.1));
        let g = z.v(len, 1.0);
        let s = AdamStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bc1: 0.1,
            bc2: 0.001,
            grad_scale: 0.25,
        };
        // independent: the norm √ssq · 0.25 = 0.5 and the scale by hand
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        if ssq.is_finite() {
            let norm = ssq.sqrt() * 0.25;
            let f = if norm > clip { clip / norm } else { 1.0 };
            let s2 = AdamStep {
                grad_scale: 0.25 * f,
                ..s
            };
            rwkv_tune::ops::backward_ref::adam(n, &s2, &mut p, &g, &mut m, &mut v);
        }
        let (mut pd, mut md, mut vd) = (up(&p0), up(&m0), up(&v0));
        let stats = up(&[123.0, ssq]);
        d.adam_clipped(n, &s, clip, &stats, &mut pd, &up(&g), &mut md, &mut vd)
            .unwrap();
        let tag = format!("adam_clipped clip={clip} ss={ssq}");
        let e = ok(be, &format!("{tag} p"), &down(&pd), &p, TOL)
            .max(ok(be, &format!("{tag} m"), &down(&md), &m, TOL))
            .max(ok(be, &format!("{tag} v"), &down(&vd), &v, TOL));
        w.add("adam_clipped", e);
    }
}

/// WKV forward+backward of `d` vs the CPU reference recurrence.
fn check_wkv<D: BackwardOps>(d: &D, be: &str, t: usize, h: usize, n: usize, w: &mut Worst) {
    let dims = rwkv_tune::wkv7::Dims { b: 1, t, h, n };
    let p = rwkv_tune::wkv7::testdata::random_problem(dims, 77 + t as u64, 0.6, 0.99);
    let up = |x: &[f32]| d.upload(x).unwrap();
    let sl = dims.seq_len();
    let mut want: Vec<Vec<f32>> = (0..6).map(|_| vec![0f32; sl]).collect();
    let mut want_h = vec![0f32; dims.state_len()];
    {
        let [a, b, c, dd, e, f] = &mut want[..] else {
            unreachable!()
        };
        CpuOps::new()
            .wkv_bwd(
                t,
                h,
                n,
                [&p.r, &p.w, &p.k, &p.v, &p.a, &p.b],
                &p.h0,
                &p.dy,
                [a, b, c, dd, e, f],
                &mut want_h,
            )
            .unwrap();
    }
    let ins: Vec<D::Buf> = [&p.r, &p.w, &p.k, &p.v, &p.a, &p.b]
        .iter()
        .map(|v| up(v))
        .collect();
    let mut got: Vec<D::Buf> = (0..6).map(|_| d.zeros(sl).unwrap()).collect();
    let mut got_h = d.zeros(dims.state_len()).unwrap();
    {
        let [a, b, c, dd, e, f] = &mut got[..] else {
            unreachable!()
        };
        d.wkv_bwd(
            t,
            h,
            n,
            [&ins[0], &ins[1], &ins[2], &ins[3], &ins[4], &ins[5]],
            &up(&p.h0),
            &up(&p.dy),
            [a, b, c, dd, e, f],
            &mut got_h,
        )
        .unwrap();
    }
    let mut e = ok(
        be,
        &format!("wkv_bwd T{t} dh0"),
        &d.download(&got_h).unwrap(),
        &want_h,
        WKV_TOL,
    );
    for (i, name) in ["dr", "dw", "dk", "dv", "da", "db"].iter().enumerate() {
        let x = d.download(&got[i]).unwrap();
        e = e.max(ok(
            be,
            &format!("wkv_bwd T{t} {name}"),
            &x,
            &want[i],
            WKV_TOL,
        ));
    }
    w.add("wkv_bwd", e);
}

/// The batched forms the device tuner uses, against the one-sequence ops
/// of the CPU twins run sequence by sequence (an independent path):
/// `token_shift_b`, `token_shift_bwd_b` (per-sequence states), `sum_batch`,
/// `outer_acc_rows`, and the WKV forward that keeps its checkpoints with the
/// backward that reads them (`wkv_fwd_ckpt` / `wkv_bwd_ckpt`, B = 3) against
/// `wkv` / `wkv_bwd` per sequence.
fn check_batched<D: BackwardOps>(d: &D, be: &str, t: usize, h: usize, n: usize, w: &mut Worst) {
    let mut z = Z(Rng::new(0xb47c + t as u64 * 7 + n as u64));
    let (b, c) = (3usize, h * n);
    let cpu = CpuOps::new();
    let up = |x: &[f32]| d.upload(x).unwrap();
    let down = |x: &D::Buf| d.download(x).unwrap();
    // token shift forward and backward, 6 mixes
    let x = z.v(b * t * c, 1.0);
    let st = z.v(b * c, 1.0);
    let mu = z.pos(6 * c, 0.0, 1.0);
    let (mut want_o, mut want_s) = (vec![0f32; b * t * 6 * c], st.clone());
    for i in 0..b {
        let mut s = st[i * c..(i + 1) * c].to_vec();
        let mut o = vec![0f32; t * 6 * c];
        cpu.token_shift(
            t,
            c,
            &x[i * t * c..(i + 1) * t * c].to_vec(),
            &mut s,
            &mu,
            6,
            &mut o,
        )
        .unwrap();
        want_o[i * t * 6 * c..(i + 1) * t * 6 * c].copy_from_slice(&o);
        want_s[i * c..(i + 1) * c].copy_from_slice(&s);
    }
    let (mut got_o, mut got_s) = (d.zeros(b * t * 6 * c).unwrap(), up(&st));
    d.token_shift_b(b, t, c, &up(&x), &mut got_s, &up(&mu), 6, &mut got_o)
        .unwrap();
    let e = ok(be, "token_shift_b out", &down(&got_o), &want_o, TOL).max(ok(
        be,
        "token_shift_b state",
        &down(&got_s),
        &want_s,
        TOL,
    ));
    w.add("token_shift_b", e);
    let dm: Vec<Vec<f32>> = (0..6).map(|_| z.v(b * t * c, 1.0)).collect();
    let ds0 = z.v(b * c, 1.0);
    let (mut want_x, mut want_ds) = (vec![0f32; b * t * c], ds0.clone());
    for i in 0..b {
        let part: Vec<Vec<f32>> = dm
            .iter()
            .map(|m| m[i * t * c..(i + 1) * t * c].to_vec())
            .collect();
        let refs: Vec<&Vec<f32>> = part.iter().collect();
        let mut s = ds0[i * c..(i + 1) * c].to_vec();
        let mut dx = vec![0f32; t * c];
        cpu.token_shift_bwd(t, c, &refs, &mu, &mut s, &mut dx)
            .unwrap();
        want_x[i * t * c..(i + 1) * t * c].copy_from_slice(&dx);
        want_ds[i * c..(i + 1) * c].copy_from_slice(&s);
    }
    let dd: Vec<D::Buf> = dm.iter().map(|v| up(v)).collect();
    let dr: Vec<&D::Buf> = dd.iter().collect();
    let (mut got_x, mut got_ds) = (d.zeros(b * t * c).unwrap(), up(&ds0));
    d.token_shift_bwd_b(b, t, c, &dr, &up(&mu), &mut got_ds, &mut got_x)
        .unwrap();
    let e = ok(be, "token_shift_bwd_b dx", &down(&got_x), &want_x, TOL).max(ok(
        be,
        "token_shift_bwd_b dstate",
        &down(&got_ds),
        &want_ds,
        TOL,
    ));
    w.add("token_shift_bwd_b", e);
    // sum over the batch (accumulating and not), against an f64 sum
    let src = z.v(b * c, 1.0);
    let d0 = z.v(c, 1.0);
    for acc in [false, true] {
        let want: Vec<f32> = (0..c)
            .map(|j| {
                let base = if acc { d0[j] as f64 } else { 0.0 };
                (base + (0..b).map(|i| src[i * c + j] as f64).sum::<f64>()) as f32
            })
            .collect();
        let mut got = up(&d0);
        d.sum_batch(b, c, &up(&src), &mut got, acc).unwrap();
        w.add("sum_batch", ok(be, "sum_batch", &down(&got), &want, TOL));
    }
    // outer_acc over rows [r0, r0 + rows) of a longer r
    let r = z.v(b * t * c, 1.0);
    let (r0, nr) = (t - 1, t + 1);
    let a0 = z.v(h * n * n, 1.0);
    let mut want = a0.clone();
    cpu.outer_acc(nr, h, n, &r[r0 * c..].to_vec(), &mut want)
        .unwrap();
    let mut got = up(&a0);
    d.outer_acc_rows(r0, nr, h, n, &up(&r), &mut got).unwrap();
    w.add(
        "outer_acc_rows",
        ok(be, "outer_acc_rows", &down(&got), &want, TOL),
    );
    // WKV forward with checkpoints, backward from them
    let dims = rwkv_tune::wkv7::Dims { b, t, h, n };
    let p = rwkv_tune::wkv7::testdata::random_problem(dims, 91 + t as u64, 0.6, 0.99);
    let (sl, hl) = (t * c, h * n * n);
    let mut want_y = vec![0f32; b * sl];
    let mut want_g: Vec<Vec<f32>> = (0..6).map(|_| vec![0f32; b * sl]).collect();
    let mut want_h = vec![0f32; b * hl];
    let mut want_ht = vec![0f32; b * hl];
    let ins = [&p.r, &p.w, &p.k, &p.v, &p.a, &p.b];
    for i in 0..b {
        let part: Vec<Vec<f32>> = ins
            .iter()
            .map(|v| v[i * sl..(i + 1) * sl].to_vec())
            .collect();
        let pr: [&Vec<f32>; 6] = std::array::from_fn(|j| &part[j]);
        let mut s = p.h0[i * hl..(i + 1) * hl].to_vec();
        let mut y = vec![0f32; sl];
        cpu.wkv(t, h, n, pr, &mut s, &mut y).unwrap();
        want_y[i * sl..(i + 1) * sl].copy_from_slice(&y);
        want_ht[i * hl..(i + 1) * hl].copy_from_slice(&s);
        let mut g: Vec<Vec<f32>> = (0..6).map(|_| vec![0f32; sl]).collect();
        let mut dh = vec![0f32; hl];
        {
            let [g0, g1, g2, g3, g4, g5] = &mut g[..] else {
                unreachable!()
            };
            cpu.wkv_bwd(
                t,
                h,
                n,
                pr,
                &p.h0[i * hl..(i + 1) * hl].to_vec(),
                &p.dy[i * sl..(i + 1) * sl].to_vec(),
                [g0, g1, g2, g3, g4, g5],
                &mut dh,
            )
            .unwrap();
        }
        for j in 0..6 {
            want_g[j][i * sl..(i + 1) * sl].copy_from_slice(&g[j]);
        }
        want_h[i * hl..(i + 1) * hl].copy_from_slice(&dh);
    }
    let dins: Vec<D::Buf> = ins.iter().map(|v| up(v)).collect();
    let di: [&D::Buf; 6] = std::array::from_fn(|j| &dins[j]);
    let (ck, sc) = d.wkv_ws_len(b, t, h, n);
    let (mut ckpt, mut scratch) = (d.zeros(ck).unwrap(), d.zeros(sc).unwrap());
    let h0 = up(&p.h0);
    let mut y = d.zeros(b * sl).unwrap();
    let mut ht = d.zeros(b * hl + 3).unwrap();
    d.wkv_fwd_ckpt(b, t, h, n, di, &h0, &mut y, &mut ckpt, Some(&mut ht))
        .unwrap();
    let mut e = ok(be, "wkv_fwd_ckpt y", &down(&y), &want_y, WKV_TOL);
    e = e.max(ok(
        be,
        "wkv_fwd_ckpt h_t",
        &down(&ht)[..b * hl],
        &want_ht,
        WKV_TOL,
    ));
    let mut got: Vec<D::Buf> = (0..6).map(|_| d.zeros(b * sl).unwrap()).collect();
    let mut got_h = d.zeros(b * hl).unwrap();
    {
        let [g0, g1, g2, g3, g4, g5] = &mut got[..] else {
            unreachable!()
        };
        d.wkv_bwd_ckpt(
            b,
            t,
            h,
            n,
            di,
            &h0,
            &ckpt,
            &up(&p.dy),
            [g0, g1, g2, g3, g4, g5],
            &mut got_h,
            &mut scratch,
        )
        .unwrap();
    }
    e = e.max(ok(be, "wkv_bwd_ckpt dh0", &down(&got_h), &want_h, WKV_TOL));
    for (j, name) in ["dr", "dw", "dk", "dv", "da", "db"].iter().enumerate() {
        e = e.max(ok(
            be,
            &format!("wkv_bwd_ckpt {name}"),
            &down(&got[j]),
            &want_g[j],
            WKV_TOL,
        ));
    }
    w.add("wkv_fwd_ckpt + wkv_bwd_ckpt", e);
}

/// The shapes every backend runs: rows not a multiple of any block, heads
/// (2, 32), (1, 64) and (1, 128).
const SHAPES: [(usize, usize, usize); 3] = [(7, 2, 32), (5, 1, 64), (3, 1, 128)];

fn run_backend<D: BackwardOps>(d: &D, be: &str, big: bool) {
    let mut w = Worst::default();
    for (rows, h, n) in SHAPES {
        check_all(d, be, rows, h, n, &mut w);
    }
    if big {
        check_all(d, be, 300, 32, 64, &mut w);
    }
    check_matmul_tn(d, be, 7, 5, 9, &mut w);
    check_matmul_tn(d, be, 33, 64, 48, &mut w);
    for (rows, v) in [(5, 37), (6, 1000)] {
        check_xent(d, be, rows, v, &mut w);
        check_softmax(d, be, rows, v, &mut w);
    }
    if big {
        check_xent(d, be, 64, 65536, &mut w);
        check_softmax(d, be, 64, 65536, &mut w);
    }
    check_adam_sumsq(d, be, if big { 1 << 20 } else { 1000 }, &mut w);
    check_wkv(d, be, 5, 1, 32, &mut w);
    check_wkv(d, be, 21, 2, 64, &mut w);
    check_batched(d, be, 5, 2, 32, &mut w);
    check_batched(d, be, 19, 1, 64, &mut w);
    w.print(be);
}

#[test]
fn backward_ops_cpu_self_consistency() {
    // the cpu backend against itself is trivially exact; this runs every
    // code path of the harness (and the twins) once without a kernel
    run_backend(&CpuOps::new(), "cpu", false);
}

#[test]
fn backward_ops_emu() {
    run_backend(&EmuOps::default(), "emu", false);
}

#[test]
fn backward_ops_emu_gpu_geometry() {
    // the GPU launch geometry (256-thread blocks, 4 warps per row block,
    // many blocks) under the emulator: the row and block kernels
    let d = EmuOps::with_geom(Geom::GPU);
    let mut w = Worst::default();
    check_all(&d, "emu-gpu", 9, 2, 32, &mut w);
    check_all(&d, "emu-gpu", 3, 1, 128, &mut w);
    check_xent(&d, "emu-gpu", 5, 1000, &mut w);
    check_softmax(&d, "emu-gpu", 5, 1000, &mut w);
    check_adam_sumsq(&d, "emu-gpu", 3000, &mut w);
    w.print("emu-gpu");
}

#[test]
fn backward_ops_cuda() {
    let gpu = match rwkv_tune::cuda::Gpu::new(0) {
        Ok(g) => std::sync::Arc::new(g),
        Err(e) => {
            rwkv_tune::cuda::skip_gpu("backward ops on cuda", &e);
            return;
        }
    };
    let d = rwkv_tune::ops::cuda::CudaOps::new(gpu).expect("cuBLAS");
    run_backend(&d, "cuda", true);
}

// ---- size errors: typed errors, never a panic ------------------------------

fn shape_errors<D: BackwardOps>(d: &D) {
    let be = d.name();
    let up = |x: &[f32]| d.upload(x).unwrap();
    let (rows, c) = (3, 8);
    // layer_norm_bwd: dx one element short (from the offset)
    let r = d.layer_norm_bwd(
        &up(&vec![1.0; 4 * c]),
        c,
        rows,
        c,
        &up(&vec![1.0; c]),
        1e-5,
        &up(&vec![1.0; rows * c]),
        &mut up(&vec![0.0; 4 * c - 1]),
    );
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "dx"),
        "{be}: {r:?}"
    );
    // layer_norm_bwd: offset not a multiple of C
    let r = d.layer_norm_bwd(
        &up(&vec![1.0; 4 * c]),
        1,
        rows,
        c,
        &up(&vec![1.0; c]),
        1e-5,
        &up(&vec![1.0; rows * c]),
        &mut up(&vec![0.0; 4 * c]),
    );
    assert!(matches!(r, Err(Error::Invalid(_))), "{be}: {r:?}");
    // xent: too few targets, a target out of range, short logits
    let mut lg = up(&vec![0.0; rows * 10]);
    let mut loss = up(&vec![0.0; rows]);
    let r = d.xent(rows, 10, &mut lg, &[1, 2], &[1.0; 3], None, 0.0, &mut loss);
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "targets"),
        "{be}: {r:?}"
    );
    let r = d.xent(
        rows,
        10,
        &mut lg,
        &[1, 2, 10],
        &[1.0; 3],
        None,
        0.0,
        &mut loss,
    );
    assert!(matches!(r, Err(Error::Invalid(_))), "{be}: {r:?}");
    let r = d.xent(
        rows + 1,
        10,
        &mut lg,
        &[1; 4],
        &[1.0; 4],
        None,
        0.0,
        &mut loss,
    );
    assert!(matches!(r, Err(Error::Shape { .. })), "{be}: {r:?}");
    // token_shift_bwd: 7 mixes; a short mix
    let m = up(&vec![1.0; rows * c]);
    let short = up(&vec![1.0; rows * c - 1]);
    let mu = up(&vec![0.5; 7 * c]);
    let (mut ds, mut dx) = (up(&vec![0.0; c]), up(&vec![0.0; rows * c]));
    let r = d.token_shift_bwd(rows, c, &[&m; 7], &mu, &mut ds, &mut dx);
    assert!(matches!(r, Err(Error::Invalid(_))), "{be}: {r:?}");
    let r = d.token_shift_bwd(rows, c, &[&m, &short], &mu, &mut ds, &mut dx);
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "dmix[1]"),
        "{be}: {r:?}"
    );
    // batched_matmul: out short; adam: m short; sumsq: x short
    let a = up(&[1.0; 2 * 16]);
    let r = d.batched_matmul(2, 4, &a, &a, false, &mut up(&[0.0; 31]));
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "out"),
        "{be}: {r:?}"
    );
    let s = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        bc1: 0.1,
        bc2: 0.001,
        grad_scale: 1.0,
    };
    let r = d.adam(
        10,
        &s,
        &mut up(&[0.0; 10]),
        &up(&[0.0; 10]),
        &mut up(&[0.0; 9]),
        &mut up(&[0.0; 10]),
    );
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "m"),
        "{be}: {r:?}"
    );
    assert!(d.sumsq(11, &up(&[1.0; 10])).is_err(), "{be}: sumsq");
    // kk_prep_bwd: zero heads; group_norm_bwd: a short [C] vector
    let x = up(&vec![1.0; rows * c]);
    let cv = up(&vec![1.0; c]);
    let (mut o1, mut o2) = (up(&vec![0.0; rows * c]), up(&vec![0.0; rows * c]));
    let kb = KkBwdBufs {
        k: &x,
        da: &x,
        a0: &cv,
        k_k: &cv,
        k_a: &cv,
        d_kout: &x,
        d_a: &x,
        d_b: &x,
    };
    let r = d.kk_prep_bwd(rows, 0, c, &kb, &mut o1, &mut o2);
    assert!(matches!(r, Err(Error::Invalid(_))), "{be}: {r:?}");
    let short_c = up(&vec![1.0; c - 1]);
    let mut outs: Vec<D::Buf> = (0..5).map(|_| up(&vec![0.0; rows * c])).collect();
    let [dy, dr, dk, dv, dg] = &mut outs[..] else {
        unreachable!()
    };
    let r = d.group_norm_bwd(
        rows,
        2,
        c / 2,
        1e-5,
        &GnBwdBufs {
            y: &x,
            weight: &cv,
            bias: &cv,
            r: &x,
            k: &x,
            v: &x,
            r_k: &short_c,
            g: &x,
            dout: &x,
        },
        GnBwdGrads { dy, dr, dk, dv, dg },
    );
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "r_k"),
        "{be}: {r:?}"
    );
    // wkv_bwd: a gradient buffer of the wrong (exact) length
    let (t, h, n) = (2, 1, 32);
    let s = up(&vec![0.1; t * h * n]);
    let h0 = up(&vec![0.0; h * n * n]);
    let mut g: Vec<D::Buf> = (0..6).map(|_| up(&vec![0.0; t * h * n])).collect();
    g[2] = up(&vec![0.0; t * h * n + 1]);
    let mut dh0 = up(&vec![0.0; h * n * n]);
    let [a1, a2, a3, a4, a5, a6] = &mut g[..] else {
        unreachable!()
    };
    let r = d.wkv_bwd(
        t,
        h,
        n,
        [&s; 6],
        &h0,
        &s,
        [a1, a2, a3, a4, a5, a6],
        &mut dh0,
    );
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "dk"),
        "{be}: {r:?}"
    );
    // up_fwd: M = 0; up_bwd: du one element short, phi short
    let (h, n, m) = (2, 4, 3);
    let cen = up(&vec![0.0; h * m * n]);
    let gam = up(&vec![1.0; h]);
    let u = up(&vec![0.0; h * n * m]);
    let rb = up(&vec![0.0; rows * h * n]);
    let k0 = UpBufs {
        m: 0,
        linear: false,
        centres: &cen,
        gamma: &gam,
        u: &u,
    };
    let (mut phi, mut y) = (up(&vec![0.0; rows * h * m]), up(&vec![0.0; rows * h * n]));
    let r = d.up_fwd(rows, h, n, &k0, &rb, &mut phi, &mut y);
    assert!(matches!(r, Err(Error::Invalid(_))), "{be}: {r:?}");
    // the linear read-out (state offset) reads r as φ: M must equal N
    let kl = UpBufs {
        m,
        linear: true,
        centres: &cen,
        gamma: &gam,
        u: &u,
    };
    let r = d.up_fwd(rows, h, n, &kl, &rb, &mut phi, &mut y);
    assert!(
        matches!(r, Err(Error::Invalid(_))),
        "{be}: linear with M ≠ N: {r:?}"
    );
    let k = UpBufs {
        m,
        linear: false,
        centres: &cen,
        gamma: &gam,
        u: &u,
    };
    let mut dr = up(&vec![0.0; rows * h * n]);
    let r = d.up_bwd(
        rows,
        h,
        n,
        &k,
        &rb,
        &phi,
        &rb,
        &mut up(&vec![0.0; h * n * m - 1]),
        &mut dr,
    );
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "du"),
        "{be}: {r:?}"
    );
    let r = d.up_bwd(
        rows,
        h,
        n,
        &k,
        &rb,
        &up(&vec![0.0; rows * h * m - 1]),
        &rb,
        &mut up(&vec![0.0; h * n * m]),
        &mut dr,
    );
    assert!(
        matches!(r, Err(Error::Shape { ref name, .. }) if name == "phi"),
        "{be}: {r:?}"
    );
    eprintln!("{be}: shape errors OK");
}

#[test]
fn backward_ops_shape_errors() {
    shape_errors(&CpuOps::new());
    shape_errors(&EmuOps::default());
}

// ---- finite differences: the CPU twins vs the forward functions ------------

/// Central difference of `f` at `x[i]` with step `h`, in f64 of f32 values.
fn central(x: &mut [f32], i: usize, h: f32, f: &mut dyn FnMut(&[f32]) -> f64) -> f64 {
    let x0 = x[i];
    x[i] = x0 + h;
    let fp = f(x);
    x[i] = x0 - h;
    let fm = f(x);
    x[i] = x0;
    // the step actually taken in f32
    let hh = ((x0 + h) as f64 - (x0 - h) as f64) / 2.0;
    (fp - fm) / (2.0 * hh)
}

/// The finite-difference gradient of `f` over every element of `x`.
fn fd_grad(x: &[f32], f: &mut dyn FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| central(&mut x, i, 1e-2, f) as f32)
        .collect()
}

/// `Σ c·y` in f64.
fn dot(c: &[f32], y: &[f32]) -> f64 {
    c.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn fd_ok(what: &str, analytic: &[f32], fd: &[f32]) -> f64 {
    ok("fd", what, analytic, fd, FD_TOL)
}

#[test]
fn fd_layer_norm() {
    let mut z = Z(Rng::new(11));
    let (rows, c, eps) = (3, 24, 1e-5f32);
    let (x, wt, b, cy) = (
        z.v(rows * c, 1.3),
        z.pos(c, 0.5, 1.5),
        z.v(c, 0.2),
        z.v(rows * c, 1.0),
    );
    let mut dx = vec![0f32; rows * c];
    bref::layer_norm_bwd(&x, rows, c, &wt, eps, &cy, &mut dx);
    let fd = fd_grad(&x, &mut |x| {
        let mut y = vec![0f32; rows * c];
        reference::layer_norm(x, rows, c, &wt, &b, eps, &mut y);
        dot(&cy, &y)
    });
    fd_ok("layer_norm dx", &dx, &fd);
}

#[test]
fn fd_group_norm_bonus_gate() {
    let mut z = Z(Rng::new(12));
    let (rows, h, n) = (3, 2, 8);
    let (c, rc, eps) = (h * n, rows * h * n, 1e-5 * 8.0);
    let (y, wt, b) = (z.v(rc, 0.7), z.pos(c, 0.5, 1.5), z.v(c, 0.2));
    let (r, k, v, rk, g) = (
        z.v(rc, 1.0),
        z.v(rc, 1.0),
        z.v(rc, 1.0),
        z.v(c, 0.3),
        z.v(rc, 1.0),
    );
    let cy = z.v(rc, 1.0);
    let mut o: Vec<Vec<f32>> = (0..5).map(|_| vec![0f32; rc]).collect();
    {
        let [dy, dr, dk, dv, dg] = &mut o[..] else {
            unreachable!()
        };
        let x = bref::GnBwd {
            y: &y,
            weight: &wt,
            bias: &b,
            r: &r,
            k: &k,
            v: &v,
            r_k: &rk,
            g: &g,
            dout: &cy,
        };
        bref::group_norm_bwd(rows, h, n, eps, &x, bref::GnBwdOut { dy, dr, dk, dv, dg });
    }
    // forward with one input replaced: L = Σ cy · out
    let fwd = |which: usize, xs: &[f32]| -> f64 {
        let mut ins = [&y, &r, &k, &v, &g].map(|s| s.to_vec());
        ins[which] = xs.to_vec();
        let [mut yy, rr, kk, vv, gg] = ins;
        let bonus = reference::Bonus {
            r: &rr,
            k: &kk,
            v: &vv,
            r_k: &rk,
        };
        reference::group_norm(&mut yy, rows, h, n, eps, &wt, &b, Some(bonus), Some(&gg));
        dot(&cy, &yy)
    };
    for (i, (name, x)) in [("dy", &y), ("dr", &r), ("dk", &k), ("dv", &v), ("dg", &g)]
        .into_iter()
        .enumerate()
    {
        let fd = fd_grad(x, &mut |xs| fwd(i, xs));
        fd_ok(&format!("group_norm {name}"), &o[i], &fd);
    }
}

#[test]
fn fd_upscale() {
    // L = Σ cy · y(r, U) through the twin's forward; the twin's backward
    // gives ∂L/∂r and ∂L/∂U (dy = cy)
    let mut z = Z(Rng::new(13));
    let (rows, h, n, m) = (3, 2, 6, 7);
    let rc = rows * h * n;
    let (r, cen) = (z.v(rc, 1.0), z.v(h * m * n, 1.0));
    let gam = z.pos(h, 0.1, 0.4);
    let u = z.v(h * n * m, 1.0);
    let cy = z.v(rc, 1.0);
    let fwd = |rr: &[f32], uu: &[f32]| -> f64 {
        let k = bref::Up {
            m,
            linear: false,
            centres: &cen,
            gamma: &gam,
            u: uu,
        };
        let mut phi = vec![0f32; rows * h * m];
        let mut y = vec![0f32; rc];
        bref::up_fwd(rows, h, n, &k, rr, &mut phi, &mut y);
        dot(&cy, &y)
    };
    let k = bref::Up {
        m,
        linear: false,
        centres: &cen,
        gamma: &gam,
        u: &u,
    };
    let mut phi = vec![0f32; rows * h * m];
    let mut y = vec![0f32; rc];
    bref::up_fwd(rows, h, n, &k, &r, &mut phi, &mut y);
    for row in phi.chunks(m) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "φ sums to {s}");
    }
    let (mut du, mut dr) = (vec![0f32; h * n * m], vec![0f32; rc]);
    bref::up_bwd(rows, h, n, &k, &r, &phi, &cy, &mut du, &mut dr);
    let fd_r = fd_grad(&r, &mut |xs| fwd(xs, &u));
    fd_ok("upscale dr", &dr, &fd_r);
    let fd_u = fd_grad(&u, &mut |xs| fwd(&r, xs));
    fd_ok("upscale du", &du, &fd_u);
}

#[test]
fn fd_kk_prep() {
    let mut z = Z(Rng::new(13));
    let (rows, h, n) = (3, 2, 8);
    let (c, rc) = (h * n, rows * h * n);
    let (k, da) = (z.v(rc, 1.0), z.v(rc, 1.0));
    let (a0, kk, ka) = (z.v(c, 0.5), z.pos(c, 0.5, 1.5), z.pos(c, 0.0, 1.0));
    let (c_ko, c_a, c_b) = (z.v(rc, 1.0), z.v(rc, 1.0), z.v(rc, 1.0));
    let (mut dk, mut dda) = (vec![0f32; rc], vec![0f32; rc]);
    let x = bref::KkBwd {
        k: &k,
        da: &da,
        a0: &a0,
        k_k: &kk,
        k_a: &ka,
        d_kout: &c_ko,
        d_a: &c_a,
        d_b: &c_b,
    };
    bref::kk_prep_bwd(rows, h, n, &x, &mut dk, &mut dda);
    let fwd = |kx: &[f32], dax: &[f32]| -> f64 {
        let (mut ko, mut a, mut b) = (vec![0f32; rc], vec![0f32; rc], vec![0f32; rc]);
        reference::kk_prep(rows, h, n, kx, dax, &a0, &kk, &ka, &mut ko, &mut a, &mut b);
        dot(&c_ko, &ko) + dot(&c_a, &a) + dot(&c_b, &b)
    };
    let fd_k = fd_grad(&k, &mut |kx| fwd(kx, &da));
    fd_ok("kk_prep dk", &dk, &fd_k);
    let fd_da = fd_grad(&da, &mut |dax| fwd(&k, dax));
    fd_ok("kk_prep dda", &dda, &fd_da);
}

#[test]
fn fd_value_residual() {
    let mut z = Z(Rng::new(14));
    let (rows, c) = (3, 10);
    let nn = rows * c;
    let (vraw, vf, v0, dvp) = (z.v(nn, 1.0), z.v(nn, 1.0), z.v(c, 1.0), z.v(nn, 1.0));
    let cy = z.v(nn, 1.0);
    let (mut dv, mut dvf, mut ddv) = (cy.clone(), vec![0f32; nn], vec![0f32; nn]);
    bref::value_residual_bwd(nn, c, &vraw, &vf, &v0, &dvp, &mut dv, &mut dvf, &mut ddv);
    let fwd = |a: &[f32], b: &[f32], d: &[f32]| -> f64 {
        let mut v = a.to_vec();
        reference::value_residual(c, &mut v, b, &v0, d);
        dot(&cy, &v)
    };
    fd_ok(
        "value_residual dvraw",
        &dv,
        &fd_grad(&vraw, &mut |x| fwd(x, &vf, &dvp)),
    );
    fd_ok(
        "value_residual dvf",
        &dvf,
        &fd_grad(&vf, &mut |x| fwd(&vraw, x, &dvp)),
    );
    fd_ok(
        "value_residual ddv",
        &ddv,
        &fd_grad(&dvp, &mut |x| fwd(&vraw, &vf, x)),
    );
}

#[test]
fn fd_act() {
    let mut z = Z(Rng::new(15));
    let (rows, c) = (4, 6);
    let nn = rows * c;
    for mode in ACTS {
        for bias in [false, true] {
            let bv = z.v(c, 0.7);
            // keep pre + bias away from relu²'s kink at 0 (|v| ≥ 0.1 > step)
            let pre: Vec<f32> = (0..nn)
                .map(|i| {
                    let b = if bias { bv[i % c] } else { 0.0 };
                    let mut p = z.v(1, 1.5)[0];
                    while (p + b).abs() < 0.1 {
                        p = z.v(1, 1.5)[0];
                    }
                    p
                })
                .collect();
            let cy = z.v(nn, 1.0);
            let mut dy = cy.clone();
            bref::act_bwd(mode, nn, c, &pre, bias.then_some(&bv[..]), &mut dy);
            let fd = fd_grad(&pre, &mut |x| {
                let mut y = x.to_vec();
                reference::act(mode, &mut y, c, bias.then_some(&bv[..]));
                dot(&cy, &y)
            });
            fd_ok(
                &format!("act {mode:?}{}", if bias { "+b" } else { "" }),
                &dy,
                &fd,
            );
        }
    }
}

#[test]
fn fd_token_shift() {
    let mut z = Z(Rng::new(16));
    let (t, c) = (4, 5);
    for n_mix in [1usize, 3, 6] {
        let (x, st, mu) = (z.v(t * c, 1.0), z.v(c, 1.0), z.pos(n_mix * c, 0.0, 1.0));
        let (c_out, c_st) = (z.v(t * n_mix * c, 1.0), z.v(c, 1.0));
        // dmix[m][t, :] = c_out[t, m, :]
        let dmix: Vec<Vec<f32>> = (0..n_mix)
            .map(|m| {
                (0..t * c)
                    .map(|i| c_out[((i / c) * n_mix + m) * c + i % c])
                    .collect()
            })
            .collect();
        let dm: Vec<&[f32]> = dmix.iter().map(|v| v.as_slice()).collect();
        let (mut dstate, mut dx) = (c_st.clone(), vec![0f32; t * c]);
        bref::token_shift_bwd(t, c, &dm, &mu, &mut dstate, &mut dx);
        let fwd = |xx: &[f32], s0: &[f32]| -> f64 {
            let mut s = s0.to_vec();
            let mut out = vec![0f32; t * n_mix * c];
            reference::token_shift(t, c, xx, &mut s, &mu, n_mix, &mut out);
            dot(&c_out, &out) + dot(&c_st, &s)
        };
        fd_ok(
            &format!("token_shift dx m{n_mix}"),
            &dx,
            &fd_grad(&x, &mut |xx| fwd(xx, &st)),
        );
        fd_ok(
            &format!("token_shift dstate m{n_mix}"),
            &dstate,
            &fd_grad(&st, &mut |s| fwd(&x, s)),
        );
    }
}

#[test]
fn fd_xent() {
    // the twin's gradient vs central differences of the twin's own loss
    let mut z = Z(Rng::new(17));
    let (rows, v) = (3, 11);
    let logits = z.v(rows * v, 1.5);
    let targets = [3u32, 0, 10];
    let mask = [1.0f32, 0.5, 0.0];
    let mut soft = vec![0f32; rows * v];
    for (j, s) in soft.iter_mut().enumerate() {
        *s = if j % 5 == 2 {
            0.0
        } else {
            1.0 + (j % 3) as f32
        };
    }
    for r in 0..rows {
        let tot: f32 = soft[r * v..(r + 1) * v].iter().sum();
        soft[r * v..(r + 1) * v].iter_mut().for_each(|s| *s /= tot);
    }
    for (sv, lam) in [(None, 0.0f32), (Some(&soft[..]), 0.4)] {
        let mut g = logits.clone();
        let mut loss = vec![0f32; rows];
        bref::xent(rows, v, &mut g, &targets, &mask, sv, lam, &mut loss);
        let fd = fd_grad(&logits, &mut |x| {
            let mut y = x.to_vec();
            let mut l = vec![0f32; rows];
            bref::xent(rows, v, &mut y, &targets, &mask, sv, lam, &mut l);
            l.iter().map(|&q| q as f64).sum()
        });
        fd_ok(&format!("xent soft={}", sv.is_some()), &g, &fd);
    }
}

// ---- the param structs of kernels/tune_ops.cu: C layout == Rust layout -----

macro_rules! layout_eq {
    ($($t:ident),* $(,)?) => {$({
        use rwkv_tune::params::$t;
        let (size, offs) = $t::c_layout();
        assert_eq!(size, std::mem::size_of::<$t>(), "sizeof({})", stringify!($t));
        assert_eq!(offs.as_slice(), $t::OFFSETS, "field offsets of {}", stringify!($t));
    })*};
}

#[test]
fn tune_params_layout_matches_c() {
    layout_eq!(
        LayerNormBwdParams,
        TokenShiftBwdParams,
        ActBwdParams,
        KkPrepBwdParams,
        ValueResidualBwdParams,
        GroupNormBwdParams,
        XentParams,
        OuterAccParams,
        BatchedMatmulParams,
        AdamParams,
        SumsqParams,
        UpFwdParams,
        UpBwdParams,
    );
}
