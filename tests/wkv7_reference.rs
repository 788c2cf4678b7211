//! The CPU reference's gradients against central finite differences in f64,
//! on random inputs with h0 ≠ 0 and dh_t ≠ 0, T not a multiple of the chunk.
//! Tolerance: relative error ≤ 1e-6 per checked coordinate (|g − fd| ≤
//! 1e-6·max(|fd|, 1e-3·scale)), where fd uses step 1e-5.
use rwkv_tune::wkv7::reference::{backward, forward, RefInputs};
use rwkv_tune::wkv7::testdata::random_problem;
use rwkv_tune::wkv7::Dims;

/// L = Σ dy⊙y + Σ dh_t⊙h_t, the scalar whose gradient `backward` returns.
fn objective(d: &Dims, t: &[Vec<f64>; 7], dy: &[f64], dht: &[f64]) -> f64 {
    let x = RefInputs {
        r: &t[0],
        w: &t[1],
        k: &t[2],
        v: &t[3],
        a: &t[4],
        b: &t[5],
        h0: Some(&t[6]),
    };
    let (y, ht) = forward(d, &x).unwrap();
    y.iter().zip(dy).map(|(a, b)| a * b).sum::<f64>()
        + ht.iter().zip(dht).map(|(a, b)| a * b).sum::<f64>()
}

#[test]
fn reference_gradients_match_finite_differences() {
    for (seed, d, lo) in [
        (
            7u64,
            Dims {
                b: 2,
                t: 19,
                h: 2,
                n: 8,
            },
            0.05,
        ),
        (
            8,
            Dims {
                b: 1,
                t: 23,
                h: 1,
                n: 16,
            },
            0.5,
        ),
    ] {
        let p = random_problem(d, seed, lo, 1.0);
        let f = |v: &Vec<f32>| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let mut t = [
            f(&p.r),
            f(&p.w),
            f(&p.k),
            f(&p.v),
            f(&p.a),
            f(&p.b),
            f(&p.h0),
        ];
        let (dy, dht) = (f(&p.dy), f(&p.dh_t));
        let x = RefInputs {
            r: &t[0],
            w: &t[1],
            k: &t[2],
            v: &t[3],
            a: &t[4],
            b: &t[5],
            h0: Some(&t[6]),
        };
        let g = backward(&d, &x, &dy, Some(&dht)).unwrap();
        let grads = [&g.dr, &g.dw, &g.dk, &g.dv, &g.da, &g.db, &g.dh0];
        let names = ["dr", "dw", "dk", "dv", "da", "db", "dh0"];
        let mut rng = rwkv_tune::rng::Rng::new(seed);
        for (ti, name) in names.iter().enumerate() {
            let scale = grads[ti].iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(
                scale > 0.0,
                "{name} is identically zero: the test would be vacuous"
            );
            for _ in 0..40 {
                let idx = rng.below(t[ti].len() as u64) as usize;
                let h = 1e-5;
                let orig = t[ti][idx];
                t[ti][idx] = orig + h;
                let lp = objective(&d, &t, &dy, &dht);
                t[ti][idx] = orig - h;
                let lm = objective(&d, &t, &dy, &dht);
                t[ti][idx] = orig;
                let fd = (lp - lm) / (2.0 * h);
                let got = grads[ti][idx];
                let tol = 1e-6 * fd.abs().max(1e-3 * scale);
                assert!((got - fd).abs() <= tol, "{name}[{idx}]: analytic {got:.10e} vs finite difference {fd:.10e} (dims {d:?})");
            }
        }
    }
}

#[test]
fn reference_f32_close_to_f64() {
    let d = Dims {
        b: 1,
        t: 50,
        h: 2,
        n: 32,
    };
    let p = random_problem(d, 3, 0.05, 1.0);
    let x32 = RefInputs {
        r: &p.r,
        w: &p.w,
        k: &p.k,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: Some(&p.h0),
    };
    let f = |v: &Vec<f32>| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let t = [
        f(&p.r),
        f(&p.w),
        f(&p.k),
        f(&p.v),
        f(&p.a),
        f(&p.b),
        f(&p.h0),
    ];
    let x64 = RefInputs {
        r: &t[0],
        w: &t[1],
        k: &t[2],
        v: &t[3],
        a: &t[4],
        b: &t[5],
        h0: Some(&t[6]),
    };
    let (y32, _) = forward(&d, &x32).unwrap();
    let (y64, _) = forward(&d, &x64).unwrap();
    let m = y64.iter().fold(0f64, |a, b| a.max(b.abs()));
    let e = y32
        .iter()
        .zip(&y64)
        .fold(0f64, |a, (p, q)| a.max((*p as f64 - q).abs()))
        / m;
    assert!(e < 1e-5, "f32 reference deviates from f64 by {e:e}");
}

#[test]
fn reference_rejects_bad_lengths() {
    let d = Dims {
        b: 1,
        t: 3,
        h: 1,
        n: 4,
    };
    let p = random_problem(d, 1, 0.5, 1.0);
    let x = RefInputs {
        r: &p.r,
        w: &p.w[..5],
        k: &p.k,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: None,
    };
    let e = forward(&d, &x).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("[1, 3, 1, 4]"), "{e}");
    let x = RefInputs {
        r: &p.r,
        w: &p.w,
        k: &p.k,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: None,
    };
    let e = backward(&d, &x, &p.dy[..2], None).unwrap_err().to_string();
    assert!(e.contains("`dy`"), "{e}");
}
