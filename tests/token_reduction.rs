//! Training-free token reduction (issue 15, `model::reduce`,
//! `ops::reduce`, `kernels/reduce_ops.cu`), in one test binary:
//!
//! - ratio 0 (and no anchor) gives logits and state bit-identical to the
//!   unreduced forward, on the CPU model and the emulated device model;
//! - the emulated kernels equal their Rust twins bit for bit, and the twins
//!   match an independent f64 reference (1e-5 relative) on random data;
//! - the plan keeps order and protected tokens, and the merge arithmetic
//!   is the size-weighted mean, on hand-made inputs;
//! - a reduced forward agrees between the CPU model and the emulated device
//!   model (same surviving positions, logits within 1e-4 relative);
//! - bad options are refused with typed errors; the param structs match C;
//! - on the tiny trained model (../shared; SKIPPED when absent), the logit
//!   drift of the protected tail grows with the ratio;
//! - on a GPU (SKIPPED without one): the CUDA kernels and reduced forward
//!   against the CPU.
use std::path::PathBuf;

use rwkv_tune::error::{Error, ReduceError};
use rwkv_tune::model::device::DeviceModel;
use rwkv_tune::model::reduce::{
    plan_layer, GatherMap, Method, Metric, ReduceConfig, Score, Similarity,
};
use rwkv_tune::model::{Config, Logits, Model, State, Weights};
use rwkv_tune::ops::reduce::{twin, ReduceOps};
use rwkv_tune::ops::{cpu::CpuOps, emu::EmuOps, DeviceOps};
use rwkv_tune::rng::Rng;

fn tiny_model() -> (Weights, Model) {
    // C = 64, H = 2, N = 32, 3 layers, V = 61: small enough for the emulator
    let mut cfg = Config::with_defaults(3, 64, 32, 61);
    cfg.d_w = 32;
    cfg.d_a = 32;
    cfg.d_v = 32;
    cfg.d_g = 32;
    let w = Weights::random(&cfg, 7).unwrap();
    let m = Model::new(w.clone()).unwrap();
    (w, m)
}

fn tokens(t: usize, v: usize) -> Vec<u32> {
    (0..t).map(|i| ((i * 29 + 5) % v) as u32).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn state_bits(s: &State) -> Vec<u32> {
    s.layers
        .iter()
        .flat_map(|l| {
            bits(&l.att_x)
                .into_iter()
                .chain(bits(&l.ffn_x))
                .chain(bits(&l.wkv))
        })
        .collect()
}

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

#[test]
fn ratio_zero_is_bit_identical_cpu_and_emu() {
    let (w, cpu) = tiny_model();
    let toks = tokens(24, 61);
    let zero = ReduceConfig::uniform(&[0, 1, 2], 0.0).unwrap();
    let none = ReduceConfig::uniform(&[], 0.3).unwrap();
    // CPU model
    let mut s0 = cpu.new_state();
    cpu.forward(&[3, 4], &mut s0, Logits::None).unwrap();
    let mut s_ref = s0.clone();
    let want = cpu.forward(&toks, &mut s_ref, Logits::All).unwrap();
    for red in [&zero, &none] {
        let mut s = s0.clone();
        let got = cpu
            .forward_reduced(&toks, &mut s, red, 1, Logits::All)
            .unwrap();
        assert_eq!(bits(&got.logits), bits(&want), "cpu logits");
        assert_eq!(state_bits(&s), state_bits(&s_ref), "cpu state");
        assert_eq!(got.positions, (0..toks.len()).collect::<Vec<_>>());
        assert_eq!(got.report.saved(), 0.0);
    }
    // emulated device model (a short sequence: the emulator is slow)
    let dm = DeviceModel::new(EmuOps::default(), &w).unwrap();
    let toks = tokens(9, 61);
    let mut s_ref = s0.clone();
    let want = dm.forward(&toks, &mut s_ref, Logits::All).unwrap();
    let mut s = s0.clone();
    let got = dm
        .forward_reduced(&toks, &mut s, &zero, 1, Logits::All)
        .unwrap();
    assert_eq!(bits(&got.logits), bits(&want), "emu logits");
    assert_eq!(state_bits(&s), state_bits(&s_ref), "emu state");
}

/// An independent f64 score (no lane order).
fn score_f64(x: &[f32], rows: usize, c: usize, m: Metric) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let row = &x[r * c..(r + 1) * c];
            let f = |v: f32| {
                let v = v as f64;
                match m {
                    Metric::Clip => v.max(0.0),
                    Metric::L1 => v.abs(),
                    Metric::L2 => v * v,
                    Metric::Mean => v,
                    Metric::Erase => 1.0 - v,
                }
            };
            let s = row.iter().map(|&v| f(v)).sum::<f64>() / c as f64;
            if m == Metric::L2 {
                s.sqrt()
            } else {
                s
            }
        })
        .collect()
}

#[test]
fn emulated_kernels_equal_twins() {
    let (rows, c) = (37, 80); // C not a multiple of 32: uneven lanes
    let mut g = Rng::new(11);
    let x = g.normal_vec(rows * c, 1.0);
    let cpu = CpuOps::new();
    let emu = EmuOps::default();
    let xc = cpu.upload(&x).unwrap();
    let xe = emu.upload(&x).unwrap();
    for m in [
        Metric::Clip,
        Metric::L1,
        Metric::L2,
        Metric::Mean,
        Metric::Erase,
    ] {
        let sc = cpu.tok_score(rows, c, m, &xc).unwrap();
        let se = emu.tok_score(rows, c, m, &xe).unwrap();
        assert_eq!(bits(&sc), bits(&se), "score {m:?}: emu vs twin");
        assert_eq!(bits(&sc), bits(&twin::score(&x, rows, c, m)));
        for (a, b) in sc.iter().zip(score_f64(&x, rows, c, m)) {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{m:?}: {a} vs {b}"
            );
        }
    }
    // matching: A = every third row, B = the rest
    let a: Vec<u32> = (0..rows as u32).filter(|i| i % 3 == 0).collect();
    let b: Vec<u32> = (0..rows as u32).filter(|i| i % 3 != 0).collect();
    let (fc, gc) = cpu.tok_match(rows, c, &xc, &a, &b).unwrap();
    let (fe, ge) = emu.tok_match(rows, c, &xe, &a, &b).unwrap();
    assert_eq!(fc, fe, "match: emu vs twin");
    assert_eq!(bits(&gc), bits(&ge));
    // against an f64 brute force: the chosen cosine is the best within 1e-5
    for (i, &ai) in a.iter().enumerate() {
        let row = |k: u32| &x[k as usize * c..(k as usize + 1) * c];
        let cos = |p: &[f32], q: &[f32]| {
            let d: f64 = p.iter().zip(q).map(|(u, v)| *u as f64 * *v as f64).sum();
            let n = |r: &[f32]| r.iter().map(|u| (*u as f64).powi(2)).sum::<f64>().sqrt();
            d / (n(p) * n(q))
        };
        let best = b
            .iter()
            .map(|&bi| cos(row(ai), row(bi)))
            .fold(f64::MIN, f64::max);
        assert!(
            (gc[i] as f64 - best).abs() < 1e-5,
            "row {ai}: {} vs {best}",
            gc[i]
        );
        assert!((cos(row(ai), row(b[fc[i] as usize])) - best).abs() < 1e-5);
    }
    // gather: random order-preserving map with random weights
    let mut map = GatherMap {
        rows_in: rows,
        ptr: vec![0],
        ..Default::default()
    };
    for k in 0..rows as u32 {
        if k % 4 == 1 {
            continue; // merged away
        }
        map.src.push(k);
        map.w.push(g.range(0.5, 3.0) as f32);
        if k + 1 < rows as u32 && (k + 1) % 4 == 1 {
            map.src.push(k + 1);
            map.w.push(g.range(0.5, 3.0) as f32);
        }
        map.ptr.push(map.src.len() as u32);
    }
    let k = map.rows_out();
    let mut oc = cpu.zeros(k * c).unwrap();
    let mut oe = emu.zeros(k * c).unwrap();
    cpu.tok_gather(c, &xc, &map, &mut oc).unwrap();
    emu.tok_gather(c, &xe, &map, &mut oe).unwrap();
    assert_eq!(bits(&oc), bits(&oe), "gather: emu vs twin");
    for r in 0..k {
        let (e0, e1) = (map.ptr[r] as usize, map.ptr[r + 1] as usize);
        for j in 0..c {
            let mut acc = 0f64;
            let mut ws = 0f64;
            for e in e0..e1 {
                acc += map.w[e] as f64 * x[map.src[e] as usize * c + j] as f64;
                ws += map.w[e] as f64;
            }
            let want = acc / ws;
            assert!((oc[r * c + j] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        }
    }
}

#[test]
fn plan_keeps_order_and_protected_tokens_and_merges_by_size() {
    // 8 tokens; scores make rows 1, 2, 5, 6 the least important
    let scores = [0.9, 0.1, 0.2, 0.8, 0.7, 0.15, 0.05, 0.6];
    let mut prot = vec![false; 8];
    prot[7] = true; // the last token
    prot[6] = true; // an answer token: never removed despite its low score
    let sizes = [1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    // A = the 4 least important unprotected rows: 1, 2, 5, then 4 (0.7 < 0.8)
    // matcher: 1 → B[0] (row 0), 2 → B[1] (row 3), 4 → B[1] (row 3), 5 → B[2] (row 6)
    let plan = plan_layer(
        &scores,
        &prot,
        &sizes,
        0.5,
        Method::Hybrid,
        0.5,
        true,
        |a, b| {
            assert_eq!(a, [1, 2, 4, 5]);
            assert_eq!(b, [0, 3, 6, 7]);
            Ok((vec![0, 1, 1, 2], vec![0.9, 0.8, 0.3, 0.7]))
        },
    )
    .unwrap()
    .unwrap();
    // round(0.5·8) = 4 links wanted, all 4 of A: every one removed
    assert_eq!(plan.keep, [0, 3, 6, 7]);
    // hybrid: the 2 selected rows of lowest score (1 and 5) are pruned in
    // the hidden branch; 2 and 4 merge; the residual branch merges all
    assert_eq!(plan.pruned, 2);
    assert_eq!(plan.res.ptr, [0, 2, 5, 7, 8]);
    assert_eq!(plan.res.src, [0, 1, 3, 2, 4, 6, 5, 7]);
    assert_eq!(plan.res.w, [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]);
    assert_eq!(plan.hid.ptr, [0, 1, 4, 5, 6]);
    assert_eq!(plan.hid.src, [0, 3, 2, 4, 6, 7]);
    assert_eq!(plan.sizes, [2.0, 4.0, 2.0, 1.0]);

    // merge arithmetic on hand-made rows (C = 2)
    let x: Vec<f32> = (0..8).flat_map(|i| [i as f32, 10.0 * i as f32]).collect();
    let out = twin::gather(&x, 2, &plan.res);
    // row 3 (size 1) absorbs row 2 (size 2) and row 4 (size 1): (3 + 2·2 + 4) / 4
    assert_eq!(out, [0.5, 5.0, 2.75, 27.5, 5.5, 55.0, 7.0, 70.0]);
    let emu = EmuOps::default();
    let xe = emu.upload(&x).unwrap();
    let mut oe = emu.zeros(8).unwrap();
    emu.tok_gather(2, &xe, &plan.res, &mut oe).unwrap();
    assert_eq!(oe, out);

    // prune only: nothing merged, sizes unchanged
    let p = plan_layer(
        &scores,
        &prot,
        &sizes,
        0.25,
        Method::Prune,
        0.5,
        true,
        |a, _| Ok((vec![0; a.len()], vec![0.5, 0.9, 0.1, 0.2])),
    )
    .unwrap()
    .unwrap();
    // 2 links wanted: the best cosines are rows 2 (0.9) and 1 (0.5)
    assert_eq!(p.keep, [0, 3, 4, 5, 6, 7]);
    assert_eq!(p.res, p.hid);
    assert_eq!(p.res.src, [0, 3, 4, 5, 6, 7]);
    assert_eq!(p.sizes, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    // protected rows are no merge targets by default: A = half of the 6
    // unprotected rows (1, 5, 2 → [1, 2, 5]), B = the other unprotected ones
    let p = plan_layer(
        &scores,
        &prot,
        &sizes,
        0.5,
        Method::Merge,
        0.5,
        false,
        |a, b| {
            assert_eq!(a, [1, 2, 5]);
            assert_eq!(b, [0, 3, 4]);
            Ok((vec![2, 2, 0], vec![0.1, 0.2, 0.3]))
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(p.keep, [0, 3, 4, 6, 7]);
    assert_eq!(p.res.src, [0, 5, 3, 4, 1, 2, 6, 7]);
    assert_eq!(p.res, p.hid);
    // ratio 0: no plan at all
    assert!(plan_layer(
        &scores,
        &prot,
        &sizes,
        0.0,
        Method::Merge,
        0.5,
        true,
        |_, _| { unreachable!() }
    )
    .unwrap()
    .is_none());
}

#[test]
fn reduced_forward_cpu_matches_emu_and_keeps_protected_tail() {
    let (w, cpu) = tiny_model();
    let toks = tokens(16, 61);
    let mut red = ReduceConfig::uniform(&[1], 0.3).unwrap();
    for (method, score, sim) in [
        (Method::Hybrid, "wkv", Similarity::Feature),
        (Method::Merge, "gated-l2", Similarity::Dx),
        (Method::Prune, "erase", Similarity::Feature),
    ] {
        red.method = method;
        red.score = score.parse::<Score>().unwrap();
        red.sim = sim;
        let mut sc = cpu.new_state();
        let rc = cpu
            .forward_reduced(&toks, &mut sc, &red, 3, Logits::All)
            .unwrap();
        // order preserved, protected tail present, 5 of 16 removed at layer 1
        assert!(rc.positions.windows(2).all(|p| p[0] < p[1]));
        assert!(rc.positions.ends_with(&[13, 14, 15]));
        assert_eq!(rc.positions.len(), 11, "{method} {score}");
        assert_eq!(rc.report.rows_att, [16, 16, 11]);
        assert_eq!(rc.report.rows_ffn, [16, 11, 11]);
        assert!(rc.report.saved() > 0.1);
        let dm = DeviceModel::new(EmuOps::default(), &w).unwrap();
        let mut se = dm.new_state().and_then(|s| dm.download_state(&s)).unwrap();
        let re = dm
            .forward_reduced(&toks, &mut se, &red, 3, Logits::All)
            .unwrap();
        assert_eq!(re.positions, rc.positions, "{method} {score}");
        assert!(rel(&re.logits, &rc.logits) < 1e-4, "{method} {score}");
        for (a, b) in se.layers.iter().zip(&sc.layers) {
            assert!(rel(&a.wkv, &b.wkv) < 1e-4);
            assert!(rel(&a.ffn_x, &b.ffn_x) < 1e-4);
        }
        // Logits::Last: the last row of Logits::All
        let mut s2 = cpu.new_state();
        let last = cpu
            .forward_reduced(&toks, &mut s2, &red, 3, Logits::Last)
            .unwrap();
        assert_eq!(last.logits, rc.logits[rc.logits.len() - 61..]);
    }
}

#[test]
fn bad_options_are_refused_with_typed_errors() {
    let (_, cpu) = tiny_model();
    let cfg = cpu.config().clone();
    for r in [1.0, 1.5, -0.1, f64::NAN] {
        match ReduceConfig::uniform(&[1], r) {
            Err(Error::Reduce(ReduceError::Ratio(_))) => {}
            other => panic!("ratio {r}: {other:?}"),
        }
    }
    let red = ReduceConfig::uniform(&[1, 9], 0.2).unwrap();
    let mut s = cpu.new_state();
    match cpu.forward_reduced(&[1, 2, 3], &mut s, &red, 1, Logits::Last) {
        Err(Error::Reduce(ReduceError::UnknownLayer {
            layer: 9,
            n_layer: 3,
        })) => {}
        other => panic!("{other:?}"),
    }
    let msg = red.validate(3).unwrap_err().to_string();
    assert!(msg.contains("layer 9 does not exist"), "{msg}");
    let dup = ReduceConfig::uniform(&[1, 1], 0.2).unwrap();
    assert!(matches!(
        dup.validate(3),
        Err(Error::Reduce(ReduceError::DuplicateLayer(1)))
    ));
    let mut q = ReduceConfig::uniform(&[1], 0.2).unwrap();
    q.q = 1.5;
    assert!(matches!(
        q.validate(3),
        Err(Error::Reduce(ReduceError::PruneFraction(_)))
    ));
    assert!(matches!(
        "fold".parse::<Method>(),
        Err(Error::Reduce(ReduceError::UnknownName { .. }))
    ));
    assert!(matches!(
        "wkv-l3".parse::<Score>(),
        Err(Error::Reduce(ReduceError::UnknownName { .. }))
    ));
    assert!(matches!(
        ReduceConfig::for_target(&cfg, &[1], 0.9),
        Err(Error::Reduce(ReduceError::Unreachable { .. }))
    ));
    assert!(matches!(
        ReduceConfig::for_target(&cfg, &[], 0.1),
        Err(Error::Reduce(ReduceError::Unreachable { .. }))
    ));
    // a target that is reachable gives a per-layer ratio in (0, 0.5]
    let t = ReduceConfig::for_target(&cfg, &[0, 1], 0.2).unwrap();
    assert!(t.anchors.iter().all(|a| a.ratio > 0.0 && a.ratio <= 0.5));
    // a malformed gather map is refused before any kernel runs
    let bad = GatherMap {
        rows_in: 2,
        ptr: vec![0, 1],
        src: vec![5],
        w: vec![1.0],
    };
    let emu = EmuOps::default();
    let x = emu.upload(&[0.0; 8]).unwrap();
    let mut o = emu.zeros(8).unwrap();
    assert!(matches!(
        emu.tok_gather(4, &x, &bad, &mut o),
        Err(Error::Reduce(ReduceError::Map(_)))
    ));
}

#[test]
fn tiny_trained_model_drift_grows_with_ratio() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/rwkv7-tiny-834k");
    let path = dir.join("rwkv7-tiny-834k.safetensors");
    if !path.is_file() {
        eprintln!("SKIP: {} not found", path.display());
        return;
    }
    let model = Model::load(&path).unwrap();
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n";
    let toks: Vec<u32> = text.bytes().map(u32::from).collect();
    let tail = 16;
    let mut s = model.new_state();
    let dense = model.forward(&toks, &mut s, Logits::All).unwrap();
    let v = model.config().vocab;
    let dense_tail = &dense[(toks.len() - tail) * v..];
    let layers = rwkv_tune::model::reduce::default_layers(model.config().n_layer);
    let mut drift = Vec::new();
    for r in [0.1, 0.3] {
        let red = ReduceConfig::uniform(&layers, r).unwrap();
        let mut s = model.new_state();
        let out = model
            .forward_reduced(&toks, &mut s, &red, tail, Logits::All)
            .unwrap();
        let k = out.positions.len();
        assert_eq!(
            &out.positions[k - tail..],
            (toks.len() - tail..toks.len()).collect::<Vec<_>>()
        );
        let got_tail = &out.logits[(k - tail) * v..];
        drift.push(rel(got_tail, dense_tail));
    }
    eprintln!("tail logit drift at 10 % / 30 %: {drift:?}");
    assert!(drift[0] < drift[1], "{drift:?}");
}

/// The Rust mirrors of the reduction kernels' param structs match the C
/// compiler's layout.
#[test]
fn reduce_params_layout_matches_c() {
    use rwkv_tune::params::{TokGatherParams, TokMatchParams, TokScoreParams};
    macro_rules! check {
        ($($t:ty),*) => {$(
            let (size, offs) = <$t>::c_layout();
            assert_eq!(size, std::mem::size_of::<$t>(), "sizeof {}", stringify!($t));
            assert_eq!(offs, <$t>::OFFSETS.to_vec(), "offsets of {}", stringify!($t));
        )*};
    }
    check!(TokScoreParams, TokMatchParams, TokGatherParams);
}

/// On a GPU (SKIPPED without one): the CUDA kernels against the twins and
/// the reduced forward of `DeviceModel<CudaOps>` against the CPU model.
#[test]
fn cuda_kernels_and_reduced_forward_match_cpu() {
    let gpu = match rwkv_tune::cuda::Gpu::new(0) {
        Ok(g) => std::sync::Arc::new(g),
        Err(e) => {
            rwkv_tune::cuda::skip_gpu("token reduction on cuda", &e);
            return;
        }
    };
    let cuda = rwkv_tune::ops::cuda::CudaOps::new(gpu).unwrap();
    let (rows, c) = (300, 96);
    let mut g = Rng::new(5);
    let x = g.normal_vec(rows * c, 1.0);
    let xd = cuda.upload(&x).unwrap();
    for m in [
        Metric::Clip,
        Metric::L1,
        Metric::L2,
        Metric::Mean,
        Metric::Erase,
    ] {
        let got = cuda.tok_score(rows, c, m, &xd).unwrap();
        assert!(
            rel(&got, &twin::score(&x, rows, c, m)) < 1e-6,
            "score {m:?}"
        );
    }
    let a: Vec<u32> = (0..rows as u32).step_by(2).collect();
    let b: Vec<u32> = (1..rows as u32).step_by(2).collect();
    let (f, s) = cuda.tok_match(rows, c, &xd, &a, &b).unwrap();
    let (ft, st) = twin::matching(&x, c, &a, &b);
    assert_eq!(f, ft, "match");
    assert!(rel(&s, &st) < 1e-6);
    let map = GatherMap {
        rows_in: rows,
        ptr: (0..=(rows / 2) as u32).map(|k| 2 * k).collect(),
        src: (0..rows as u32).collect(),
        w: (0..rows).map(|i| 1.0 + (i % 3) as f32).collect(),
    };
    let mut o = cuda.zeros(rows / 2 * c).unwrap();
    cuda.tok_gather(c, &xd, &map, &mut o).unwrap();
    let o = cuda.download(&o).unwrap();
    assert!(rel(&o, &twin::gather(&x, c, &map)) < 1e-6, "gather");

    let (w, cpu) = tiny_model();
    let dm = DeviceModel::new(cuda, &w).unwrap();
    let toks = tokens(40, 61);
    let red = ReduceConfig::uniform(&[1, 2], 0.25).unwrap();
    let mut sc = cpu.new_state();
    let rc = cpu
        .forward_reduced(&toks, &mut sc, &red, 4, Logits::All)
        .unwrap();
    let mut sd = cpu.new_state();
    let rd = dm
        .forward_reduced(&toks, &mut sd, &red, 4, Logits::All)
        .unwrap();
    assert_eq!(rd.positions, rc.positions);
    assert!(rel(&rd.logits, &rc.logits) < 1e-4);
}
