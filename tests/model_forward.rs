//! CPU forward pass on random multi-layer, multi-head models: sequence mode
//! equals repeated one-token steps; both match an independent, naive f64
//! implementation of the x070 equations written here; long inputs (split
//! internally) equal short pieces; the trace records the right values.
use rwkv_tune::model::{Config, Logits, Model, Weights};

fn cfg(n_layer: usize, c: usize, n: usize, vocab: usize) -> Config {
    Config {
        n_layer,
        n_embd: c,
        n_head: c / n,
        head_size: n,
        vocab,
        d_w: 32,
        d_a: 32,
        d_v: 16,
        d_g: 48,
        d_ffn: 4 * c,
    }
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = rwkv_tune::model::init::SplitMix64::new(seed);
    (0..n)
        .map(|_| (r.next_u64() % vocab as u64) as u32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------- naive f64 reference ----------------

fn ln(x: &[f64], w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / n;
    x.iter()
        .enumerate()
        .map(|(i, a)| (a - m) / (v + eps).sqrt() * w[i] as f64 + b[i] as f64)
        .collect()
}

/// y = x @ M for M stored [in, out].
fn vm(x: &[f64], m: &[f32], out: usize) -> Vec<f64> {
    (0..out)
        .map(|j| {
            x.iter()
                .enumerate()
                .map(|(i, a)| a * m[i * out + j] as f64)
                .sum()
        })
        .collect()
}

/// y = W x for W stored [out, in].
fn mv(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * b).sum())
        .collect()
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

struct RefState {
    att: Vec<Vec<f64>>,
    ffn: Vec<Vec<f64>>,
    s: Vec<Vec<f64>>,
}

fn ref_step(w: &Weights, tok: u32, st: &mut RefState) -> Vec<f64> {
    let cf = &w.config;
    let (c, h, n) = (cf.n_embd, cf.n_head, cf.head_size);
    let e: Vec<f64> = w.emb[tok as usize * c..(tok as usize + 1) * c]
        .iter()
        .map(|&v| v as f64)
        .collect();
    let l0 = w.blocks[0].ln0.as_ref().unwrap();
    let mut x = ln(&e, &l0.weight, &l0.bias, 1e-5);
    let mut v_first = vec![0.0; c];
    for (l, b) in w.blocks.iter().enumerate() {
        let a = &b.att;
        let xa = ln(&x, &b.ln1.weight, &b.ln1.bias, 1e-5);
        let mix = |mu: &[f32]| -> Vec<f64> {
            (0..c)
                .map(|i| xa[i] + (st.att[l][i] - xa[i]) * mu[i] as f64)
                .collect()
        };
        let (xr, xw, xk, xv, xaa, xg) = (
            mix(&a.x_r),
            mix(&a.x_w),
            mix(&a.x_k),
            mix(&a.x_v),
            mix(&a.x_a),
            mix(&a.x_g),
        );
        st.att[l] = xa.clone();
        let r = mv(&a.receptance, &xr);
        let mut k = mv(&a.key, &xk);
        let mut v = mv(&a.value, &xv);
        let t1: Vec<f64> = vm(&xw, &a.w1, cf.d_w).into_iter().map(f64::tanh).collect();
        let d = vm(&t1, &a.w2, c);
        let wd: Vec<f64> = (0..c)
            .map(|i| (-(-0.5f64).exp() * sig(a.w0[i] as f64 + d[i])).exp())
            .collect();
        let al: Vec<f64> = vm(&vm(&xaa, &a.a1, cf.d_a), &a.a2, c)
            .iter()
            .enumerate()
            .map(|(i, z)| sig(a.a0[i] as f64 + z))
            .collect();
        if l == 0 {
            v_first = v.clone();
        } else {
            let g = vm(
                &vm(&xv, a.v1.as_ref().unwrap(), cf.d_v),
                a.v2.as_ref().unwrap(),
                c,
            );
            for i in 0..c {
                v[i] += (v_first[i] - v[i]) * sig(a.v0.as_ref().unwrap()[i] as f64 + g[i]);
            }
        }
        let gs: Vec<f64> = vm(&xg, &a.g1, cf.d_g).into_iter().map(sig).collect();
        let g = vm(&gs, &a.g2, c);
        let mut kk: Vec<f64> = (0..c).map(|i| k[i] * a.k_k[i] as f64).collect();
        for hh in 0..h {
            let nrm = kk[hh * n..(hh + 1) * n]
                .iter()
                .map(|z| z * z)
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            kk[hh * n..(hh + 1) * n].iter_mut().for_each(|z| *z /= nrm);
        }
        for i in 0..c {
            k[i] *= 1.0 + (al[i] - 1.0) * a.k_a[i] as f64;
        }
        let mut y = vec![0.0; c];
        for hh in 0..h {
            let s = &mut st.s[l][hh * n * n..(hh + 1) * n * n];
            let o = hh * n;
            for i in 0..n {
                let sa: f64 = (0..n).map(|j| s[i * n + j] * -kk[o + j]).sum();
                for j in 0..n {
                    s[i * n + j] =
                        s[i * n + j] * wd[o + j] + sa * kk[o + j] * al[o + j] + v[o + i] * k[o + j];
                }
                y[o + i] = (0..n).map(|j| s[i * n + j] * r[o + j]).sum();
            }
            let yh = &y[o..o + n];
            let m = yh.iter().sum::<f64>() / n as f64;
            let var = yh.iter().map(|z| (z - m) * (z - m)).sum::<f64>() / n as f64;
            let bonus: f64 = (0..n)
                .map(|j| r[o + j] * k[o + j] * a.r_k[o + j] as f64)
                .sum();
            for j in 0..n {
                let q = o + j;
                let z = (y[q] - m) / (var + 1e-5 * n as f64).sqrt() * a.ln_x.weight[q] as f64
                    + a.ln_x.bias[q] as f64;
                y[q] = (z + bonus * v[q]) * g[q];
            }
        }
        let out = mv(&a.output, &y);
        for i in 0..c {
            x[i] += out[i];
        }
        let xf = ln(&x, &b.ln2.weight, &b.ln2.bias, 1e-5);
        let kx: Vec<f64> = (0..c)
            .map(|i| xf[i] + (st.ffn[l][i] - xf[i]) * b.ffn.x_k[i] as f64)
            .collect();
        st.ffn[l] = xf;
        let hdn: Vec<f64> = mv(&b.ffn.key, &kx)
            .into_iter()
            .map(|z| z.max(0.0).powi(2))
            .collect();
        let out = mv(&b.ffn.value, &hdn);
        for i in 0..c {
            x[i] += out[i];
        }
    }
    let xo = ln(&x, &w.ln_out.weight, &w.ln_out.bias, 1e-5);
    mv(&w.head, &xo)
}

#[test]
fn sequence_equals_steps_random_model() {
    let w = Weights::random(&cfg(3, 128, 64, 97), 11).unwrap();
    let model = Model::new(w).unwrap();
    let toks = tokens(37, 97, 5);
    let mut s1 = model.new_state();
    let seq = model.forward_seq(&toks, &mut s1).unwrap();
    let mut s2 = model.new_state();
    let mut steps = Vec::new();
    for &t in &toks {
        steps.extend(model.step(t, &mut s2).unwrap());
    }
    let d = max_abs(&seq, &steps);
    eprintln!("seq vs step: max |Δlogit| = {d:e}");
    assert!(d < 1e-5, "{d}");
    for (a, b) in s1.layers.iter().zip(&s2.layers) {
        assert!(max_abs(&a.wkv, &b.wkv) < 1e-5);
        assert!(max_abs(&a.att_x, &b.att_x) < 1e-5);
        assert!(max_abs(&a.ffn_x, &b.ffn_x) < 1e-5);
    }
    // The logits are not degenerate.
    let spread = seq.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.1 && spread.is_finite());
}

#[test]
fn matches_naive_f64_reference() {
    let mut fails = Vec::new();
    for (layers, c, n, seed) in [
        (3usize, 128usize, 64usize, 3u64),
        (2, 64, 32, 4),
        (2, 96, 48, 5),
        (2, 96, 32, 6),
        (2, 80, 16, 7),
    ] {
        let cf = cfg(layers, c, n, 50);
        let w = Weights::random(&cf, seed).unwrap();
        let model = Model::new(w.clone()).unwrap();
        let toks = tokens(20, 50, seed + 100);
        let mut st = model.new_state();
        let got = model.forward_seq(&toks, &mut st).unwrap();
        let mut rs = RefState {
            att: vec![vec![0.0; c]; layers],
            ffn: vec![vec![0.0; c]; layers],
            s: vec![vec![0.0; c * n]; layers],
        };
        let mut worst = 0.0f64;
        for (t, &tok) in toks.iter().enumerate() {
            let want = ref_step(&w, tok, &mut rs);
            for (g, r) in got[t * 50..(t + 1) * 50].iter().zip(&want) {
                worst = worst.max((*g as f64 - r).abs() / (1.0 + r.abs()));
            }
        }
        eprintln!("C={c} N={n}: max relative |Δ| vs f64 = {worst:e}");
        fails.push((c, n, worst));
        for l in 0..layers {
            for (g, r) in st.layers[l].wkv.iter().zip(&rs.s[l]) {
                assert!(
                    (*g as f64 - r).abs() < 1e-3 * (1.0 + r.abs()),
                    "C={c} N={n} state"
                );
            }
        }
    }
    for (c, n, worst) in fails {
        assert!(worst < 2e-4, "C={c} N={n}: {worst}");
    }
}

#[test]
fn long_input_and_prefill_modes_agree() {
    let model = Model::new(Weights::random(&cfg(2, 64, 64, 40), 9).unwrap()).unwrap();
    let toks = tokens(1300, 40, 8); // longer than the internal chunk
    let mut s1 = model.new_state();
    let all = model.forward(&toks, &mut s1, Logits::All).unwrap();
    let mut s2 = model.new_state();
    let last = model.forward(&toks, &mut s2, Logits::Last).unwrap();
    assert_eq!(last, all[all.len() - 40..].to_vec());
    // Same thing in three pieces, carrying the state.
    let mut s3 = model.new_state();
    let mut pieces = Vec::new();
    for part in [&toks[..1], &toks[1..700], &toks[700..]] {
        pieces.extend(model.forward(part, &mut s3, Logits::All).unwrap());
    }
    assert!(max_abs(&pieces, &all) < 1e-5);
    let mut s4 = model.new_state();
    assert!(model
        .forward(&toks, &mut s4, Logits::None)
        .unwrap()
        .is_empty());
    assert_eq!(s1, s2);
    assert!(max_abs(&s3.layers[1].wkv, &s1.layers[1].wkv) < 1e-5);
    assert_eq!(s4, s1);
    // Empty input: no change.
    let before = s4.clone();
    assert!(model
        .forward(&[], &mut s4, Logits::Last)
        .unwrap()
        .is_empty());
    assert_eq!(before, s4);
}

#[test]
fn trace_and_errors() {
    let model = Model::new(Weights::random(&cfg(2, 64, 32, 30), 1).unwrap()).unwrap();
    let toks = tokens(9, 30, 2);
    let mut st = model.new_state();
    let (logits, traces) = model.forward_traced(&toks, &mut st).unwrap();
    let mut st2 = model.new_state();
    assert_eq!(logits, model.forward_seq(&toks, &mut st2).unwrap());
    assert_eq!(traces.len(), 2);
    let t0 = &traces[0];
    assert_eq!(t0.rwkvab.len(), 9 * 6 * 64);
    // decay in (e^{-e^{-0.5}}, 1)
    for tt in 0..9 {
        for &w in &t0.rwkvab[tt * 384 + 64..tt * 384 + 128] {
            assert!(w > 0.5452 && w < 1.0, "{w}");
        }
    }
    assert_eq!(traces[1].x_in.len(), 9 * 64);
    assert!(traces[0].wkv_state_in.iter().all(|&v| v == 0.0));

    let mut bad = model.new_state();
    assert!(model.step(30, &mut bad).is_err()); // token out of range
    bad.layers.pop();
    assert!(model.step(1, &mut bad).is_err()); // wrong state
    let mut w = Weights::random(&cfg(2, 64, 32, 30), 1).unwrap();
    w.blocks[1].att.k_k.pop();
    let e = Model::new(w).unwrap_err().to_string();
    assert!(e.contains("blocks.1.att.k_k"), "{e}");
}
