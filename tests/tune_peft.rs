//! Parameter-efficient tuning on the one engine: LoRA (docs/lora.md) and
//! sparse dimension tuning (docs/sdt.md). LoRA:
//! against f64 central finite differences (every target kind, with and
//! without dropout), the exact merge (merged model's logits equal the
//! adapted ones, and the CPU model of the merged file agrees), adapter
//! files (round trip, bad files refused with named errors), the engine's
//! training (loss goes down, the base weights never change, resume is
//! bit-exact) and the emulated kernels against the CPU twins.
//!
//! Tolerances: f64 gradients vs f64 finite differences (h = 1e-5) within
//! 1e-5 relative per tensor group; f32 within 2e-2 (the bound the state
//! gradient's f32 check uses, tests/tune_grad.rs).
use rwkv_tune::model::lora::{LoraAdapter, LoraTarget};
use rwkv_tune::model::weights::{Config, Weights};
use rwkv_tune::model::Model;
use rwkv_tune::ops::cpu::CpuOps;
use rwkv_tune::ops::emu::EmuOps;
use rwkv_tune::tune::device::{DeviceEngine, DeviceTuner};
use rwkv_tune::tune::engine::Engine;
use rwkv_tune::tune::grad::{Example, GradOpts, TunedState, TunedStateOf};
use rwkv_tune::tune::optim::AdamConfig;
use rwkv_tune::Error;

mod common;
use common::tune::{random_example, random_state, rel_err, small_config, tiny_config, Rng};

/// An adapter on `targets` with random A and B (B nonzero, so every
/// factor's gradient is nonzero).
fn random_adapter(cfg: &Config, targets: &[LoraTarget], rank: usize, seed: u64) -> LoraAdapter {
    let mut ad = LoraAdapter::init(cfg, rank, 2.0 * rank as f32, targets, seed).unwrap();
    let mut rng = Rng(seed ^ 0x55);
    for p in ad.params_mut() {
        for v in p.iter_mut() {
            *v = rng.sym(0.3) as f32;
        }
    }
    ad
}

fn batch(cfg: &Config, rng: &mut Rng) -> Vec<Example> {
    vec![
        random_example(9, cfg.vocab, false, false, rng),
        random_example(12, cfg.vocab, true, false, rng),
    ]
}

/// Per parameter tensor, `k` sampled entries: FD of the training loss vs
/// the engine's gradient; returns the worst relative error.
fn fd_check(
    tuner: &mut DeviceTuner<CpuOps<f64>>,
    names: &[String],
    s: &TunedStateOf<f64>,
    b: &[Example],
    o: &GradOpts,
    k: usize,
    rng: &mut Rng,
) -> f64 {
    let st = tuner.upload_state(s).unwrap();
    let (_, _, g) = tuner.loss_and_grad_lora(&st, b, o).unwrap();
    let p0 = tuner.lora_params_f64().unwrap();
    assert_eq!(g.len(), p0.len());
    let h = 1e-5;
    let mut worst = 0.0f64;
    for (t, name) in names.iter().enumerate() {
        let idx: Vec<usize> = (0..k).map(|_| rng.below(p0[t].len())).collect();
        let mut fd = Vec::new();
        for &i in &idx {
            let mut p = p0.clone();
            p[t][i] += h;
            tuner.set_lora_params_f64(&p).unwrap();
            let lp = tuner.loss_and_grad_lora(&st, b, o).unwrap().0;
            p[t][i] -= 2.0 * h;
            tuner.set_lora_params_f64(&p).unwrap();
            let lm = tuner.loss_and_grad_lora(&st, b, o).unwrap().0;
            fd.push((lp - lm) / (2.0 * h));
        }
        tuner.set_lora_params_f64(&p0).unwrap();
        let an: Vec<f64> = idx.iter().map(|&i| g[t][i]).collect();
        let fnorm = fd.iter().map(|v| v * v).sum::<f64>().sqrt();
        let e = rel_err(&an, &fd);
        println!("{name:>28}: |fd| = {fnorm:.3e}  rel.err = {e:.2e}");
        assert!(fnorm > 1e-9, "{name}: finite differences ~0 (vacuous)");
        worst = worst.max(e);
    }
    worst
}

fn param_names(ad: &LoraAdapter) -> Vec<String> {
    ad.tensors
        .iter()
        .flat_map(|t| {
            let b = format!("blocks.{}.{}", t.layer, t.target.name());
            [format!("{b}.lora_A"), format!("{b}.lora_B")]
        })
        .collect()
}

#[test]
fn lora_gradients_match_finite_differences_on_every_target() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 3).unwrap();
    let mut rng = Rng(21);
    let ad = random_adapter(&cfg, &LoraTarget::ALL, 2, 5);
    let s = random_state(&cfg, true, 0.5, &mut rng).map(|v| v as f64);
    let b = batch(&cfg, &mut rng);
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 4,
    };
    let names = param_names(&ad);
    for dropout in [0.0f32, 0.3] {
        let mut t = DeviceTuner::new(CpuOps::<f64>::default(), &w).unwrap();
        t.set_lora(&ad, dropout, 9).unwrap();
        let e = fd_check(&mut t, &names, &s, &b, &o, 4, &mut rng);
        println!("dropout {dropout}: worst f64 relative error {e:.2e}");
        assert!(
            e <= 1e-5,
            "dropout {dropout}: f64 LoRA gradient vs FD: {e:.3e}"
        );
    }
    // the f32 engine's gradients against the f64 ones
    let mut t64 = DeviceTuner::new(CpuOps::<f64>::default(), &w).unwrap();
    t64.set_lora(&ad, 0.0, 9).unwrap();
    let (_, _, g64) = t64
        .loss_and_grad_lora(&t64.upload_state(&s).unwrap(), &b, &o)
        .unwrap();
    let mut t32 = DeviceTuner::new(CpuOps::<f32>::default(), &w).unwrap();
    t32.set_lora(&ad, 0.0, 9).unwrap();
    let s32 = s.map(|v| v as f32);
    let (_, _, g32) = t32
        .loss_and_grad_lora(&t32.upload_state(&s32).unwrap(), &b, &o)
        .unwrap();
    let e = g32
        .iter()
        .zip(&g64)
        .map(|(a, r)| rel_err(a, r))
        .fold(0.0f64, f64::max);
    println!("f32 vs f64 LoRA gradients: worst per-tensor {e:.2e}");
    assert!(e <= 2e-2, "f32 LoRA gradient: {e:.3e}");
}

#[test]
fn merged_model_equals_the_adapted_one() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 4).unwrap();
    let ad = random_adapter(&cfg, &LoraTarget::ALL, 3, 8);
    let mut rng = Rng(3);
    let tokens: Vec<u32> = (0..17).map(|_| rng.below(cfg.vocab) as u32).collect();
    let zero = TunedStateOf::<f64>::zeros(&cfg, false);
    // adapted, f64 throughout
    let mut ta = DeviceTuner::new(CpuOps::<f64>::default(), &w).unwrap();
    ta.set_lora(&ad, 0.0, 1).unwrap();
    let la = ta
        .logits(&ta.upload_state(&zero).unwrap(), &tokens)
        .unwrap();
    // merged (f32 weights), evaluated in f64
    let mut wm = w.clone();
    ad.merge_into(&mut wm).unwrap();
    let tm = DeviceTuner::new(CpuOps::<f64>::default(), &wm).unwrap();
    let lm = tm
        .logits(&tm.upload_state(&zero).unwrap(), &tokens)
        .unwrap();
    let e = rel_err32(&lm, &la);
    println!("merged vs adapted logits: rel. err {e:.2e}");
    assert!(e <= 1e-5, "merge is not exact to f32 rounding: {e:.3e}");
    // the merge changed the logits at all (else the check is vacuous)
    let t0 = DeviceTuner::new(CpuOps::<f64>::default(), &w).unwrap();
    let l0 = t0
        .logits(&t0.upload_state(&zero).unwrap(), &tokens)
        .unwrap();
    assert!(
        rel_err32(&l0, &la) > 1e-3,
        "the adapter does not change the model"
    );
    // the CPU model (its own forward code) on the merged weights agrees
    let model = Model::new(wm).unwrap();
    let mut state = model.new_state();
    let lc = model
        .forward(&tokens, &mut state, rwkv_tune::model::Logits::All)
        .unwrap();
    let e = rel_err32(&lc, &la);
    println!("CPU model of the merged weights vs adapted: rel. err {e:.2e}");
    assert!(e <= 1e-4, "CPU model of merged weights: {e:.3e}");
}

#[test]
fn adapter_files_round_trip_and_bad_files_are_refused() {
    let cfg = small_config();
    let ad = random_adapter(&cfg, &LoraTarget::DEFAULT, 2, 1);
    let dir = tempfile_dir("lora_files");
    let p = dir.join("a.safetensors");
    ad.save(&p, &cfg).unwrap();
    let back = LoraAdapter::load(&p, &cfg).unwrap();
    assert_eq!(back, ad, "round trip is not exact");
    // another model shape
    let other = tiny_config();
    let e = chain(&LoraAdapter::load(&p, &other).unwrap_err());
    assert!(e.contains("att.receptance") || e.contains("shape"), "{e}");
    // hand-made bad files
    use rwkv_tune::tensors::F32Tensor;
    let t = |shape: Vec<usize>, v: f32| F32Tensor {
        data: vec![v; shape.iter().product()],
        shape,
    };
    let c = cfg.n_embd;
    let cases: Vec<BadFile> = vec![
        (
            "rank mismatch",
            vec![
                ("blocks.0.att.key.lora_A", t(vec![2, c], 0.1)),
                ("blocks.0.att.key.lora_B", t(vec![c, 3], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "rank",
        ),
        (
            "wrong width",
            vec![
                ("blocks.0.att.key.lora_A", t(vec![2, c + 1], 0.1)),
                ("blocks.0.att.key.lora_B", t(vec![c, 2], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "blocks.0.att.key",
        ),
        (
            "unknown name",
            vec![
                ("blocks.0.att.keys.lora_A", t(vec![2, c], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "unknown tensor",
        ),
        (
            "missing half",
            vec![
                ("blocks.0.att.key.lora_A", t(vec![2, c], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "lora_B",
        ),
        (
            "NaN",
            vec![
                ("blocks.0.att.key.lora_A", t(vec![2, c], f32::NAN)),
                ("blocks.0.att.key.lora_B", t(vec![c, 2], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "lora_A",
        ),
        (
            "no alpha",
            vec![
                ("blocks.0.att.key.lora_A", t(vec![2, c], 0.1)),
                ("blocks.0.att.key.lora_B", t(vec![c, 2], 0.1)),
            ],
            "lora_alpha",
        ),
        (
            "layer out of range",
            vec![
                ("blocks.9.att.key.lora_A", t(vec![2, c], 0.1)),
                ("blocks.9.att.key.lora_B", t(vec![c, 2], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "no such matrix",
        ),
        (
            "v1 in layer 0",
            vec![
                ("blocks.0.att.v1.lora_A", t(vec![2, c], 0.1)),
                ("blocks.0.att.v1.lora_B", t(vec![cfg.d_v, 2], 0.1)),
                ("lora_alpha", t(vec![1], 2.0)),
            ],
            "no such matrix",
        ),
    ];
    refuse_bad_files(&dir, cases, |p| LoraAdapter::load(p, &cfg));
    // bad options
    assert!(matches!(
        LoraAdapter::init(&cfg, 0, 1.0, &LoraTarget::DEFAULT, 1),
        Err(Error::Options(_))
    ));
    assert!(LoraTarget::parse_list("r,bogus").is_err());
    assert_eq!(
        LoraTarget::parse_list("proj").unwrap(),
        LoraTarget::DEFAULT.to_vec()
    );
}

/// The error and every source, joined (what a user sees from the CLI).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// The relative error of `got` against `want` (f32 vectors, compared in f64).
fn rel_err32(got: &[f32], want: &[f32]) -> f64 {
    let (g, w): (Vec<f64>, Vec<f64>) = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64, b as f64))
        .unzip();
    rel_err(&g, &w)
}

/// One hand-made bad file: what it is, its tensors, a word the error must
/// contain.
type BadFile<'a> = (
    &'a str,
    Vec<(&'a str, rwkv_tune::tensors::F32Tensor)>,
    &'a str,
);

/// Writes every bad file of `cases` into `dir` and checks that `load`
/// refuses it with an error (sources included) that names what is wrong.
fn refuse_bad_files<T: std::fmt::Debug, E: std::error::Error>(
    dir: &std::path::Path,
    cases: Vec<BadFile>,
    load: impl Fn(&std::path::Path) -> Result<T, E>,
) {
    for (what, tensors, want) in cases {
        let m: std::collections::BTreeMap<String, rwkv_tune::tensors::F32Tensor> = tensors
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect();
        let p = dir.join(format!("{}.safetensors", what.replace(' ', "_")));
        rwkv_tune::tensors::write_f32(&p, &m).unwrap();
        let e = chain(&load(&p).expect_err(what));
        println!("{what}: {e}");
        assert!(
            e.contains(want),
            "{what}: error '{e}' does not mention '{want}'"
        );
    }
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rwkv_tune_{tag}_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn engine<O: rwkv_tune::ops::backward::BackwardOps>(
    ops: O,
    w: &Weights,
    ad: &LoraAdapter,
) -> DeviceEngine<O> {
    DeviceEngine::new_lora(
        ops,
        w,
        ad,
        0.1,
        7,
        AdamConfig::default(),
        GradOpts {
            observer_weight: 0.0,
            chunk: 4,
        },
    )
    .unwrap()
}

#[test]
fn lora_engine_trains_and_resumes_bit_exactly() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 6).unwrap();
    let ad = LoraAdapter::init(&cfg, 4, 8.0, &LoraTarget::DEFAULT, 2).unwrap();
    let mut rng = Rng(8);
    let data: Vec<Vec<Example>> = (0..6).map(|_| batch(&cfg, &mut rng)).collect();
    let mut e = engine(CpuOps::new(), &w, &ad);
    assert_eq!(e.sizes().len(), 2 * ad.tensors.len());
    let first = e.step(&data[0], 1e-2, 1.0).unwrap();
    for b in &data[1..3] {
        e.step(b, 1e-2, 1.0).unwrap();
    }
    // resume: a fresh engine loaded from the checkpoint continues identically
    let ck = e.save().unwrap();
    let mut r = engine(CpuOps::new(), &w, &ad);
    r.load(ck).unwrap();
    for b in &data[3..] {
        let a = e.step(b, 1e-2, 1.0).unwrap();
        let c = r.step(b, 1e-2, 1.0).unwrap();
        assert_eq!(a.loss_sum.to_bits(), c.loss_sum.to_bits(), "resumed loss");
    }
    let (x, y) = (e.adapter().unwrap().unwrap(), r.adapter().unwrap().unwrap());
    assert_eq!(x, y, "resumed adapter differs");
    // training moved B away from zero and lowered the loss on the first batch
    let xl = x.lora.as_ref().unwrap();
    assert!(xl.tensors.iter().any(|t| t.b.iter().any(|&v| v != 0.0)));
    let again = e.step(&data[0], 0.0, 1.0).unwrap();
    println!(
        "loss on batch 0: {:.4} → {:.4}",
        first.loss_sum / first.n_tokens,
        again.loss_sum / again.n_tokens
    );
    assert!(
        again.loss_sum < first.loss_sum,
        "training did not lower the loss"
    );
    // the state is not trained: the engine's state is zero
    let st: TunedState = e.tuned().unwrap();
    assert!(st.wkv.iter().all(|l| l.iter().all(|&v| v == 0.0)));
}

#[test]
fn emulated_lora_step_matches_the_cpu_twins() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 9).unwrap();
    let ad = random_adapter(
        &cfg,
        &[LoraTarget::K, LoraTarget::FfnValue, LoraTarget::W2],
        2,
        4,
    );
    let mut rng = Rng(4);
    let b = vec![
        random_example(6, cfg.vocab, false, false, &mut rng),
        random_example(5, cfg.vocab, true, false, &mut rng),
    ];
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 4,
    };
    let s = random_state(&cfg, false, 0.5, &mut rng);
    for dropout in [0.0f32, 0.25] {
        let mut tc = DeviceTuner::new(CpuOps::<f32>::default(), &w).unwrap();
        tc.set_lora(&ad, dropout, 3).unwrap();
        let (lc, _, gc) = tc
            .loss_and_grad_lora(&tc.upload_state(&s).unwrap(), &b, &o)
            .unwrap();
        let mut te = DeviceTuner::new(EmuOps::default(), &w).unwrap();
        te.set_lora(&ad, dropout, 3).unwrap();
        let (le, _, ge) = te
            .loss_and_grad_lora(&te.upload_state(&s).unwrap(), &b, &o)
            .unwrap();
        let worst = gc
            .iter()
            .zip(&ge)
            .map(|(c, e)| rel_err(e, c))
            .fold(0.0f64, f64::max);
        println!(
            "dropout {dropout}: loss cpu {lc:.6} emu {le:.6}; worst gradient rel. err {worst:.2e}"
        );
        assert!((lc - le).abs() <= 1e-4 * lc.abs(), "loss {lc} vs {le}");
        assert!(worst <= 1e-3, "emu vs cpu LoRA gradient {worst:.3e}");
    }
}

/// Runs the CLI, panicking with its output when it fails.
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rwkv-tune {args:?} failed:\n{text}");
    text
}

/// The `"loss"` of `eval --json`.
fn json_loss(out: &str) -> f64 {
    let line = out.lines().find(|l| l.starts_with('{')).expect("json line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn cli_tune_lora_then_merge_equals_eval_with_the_adapter() {
    let mut cfg = small_config();
    cfg.vocab = 256;
    let w = Weights::random(&cfg, 12).unwrap();
    let dir = tempfile_dir("lora_cli");
    let (m, d, a, merged) = (
        dir.join("m.safetensors"),
        dir.join("d.txt"),
        dir.join("a.safetensors"),
        dir.join("merged.safetensors"),
    );
    w.save(
        &m,
        rwkv_tune::model::Naming::Official,
        rwkv_tune::model::StoreDType::F32,
    )
    .unwrap();
    let text: String = (0..60)
        .map(|i| format!("line {i}: the quick brown fox {} jumps.\n", i % 7))
        .collect();
    std::fs::write(&d, text).unwrap();
    let (ms, ds, as_, me) = (
        m.to_str().unwrap(),
        d.to_str().unwrap(),
        a.to_str().unwrap(),
        merged.to_str().unwrap(),
    );
    let out = cli(&[
        "tune",
        "--method",
        "lora",
        "--model",
        ms,
        "--data",
        ds,
        "--ctx",
        "32",
        "--steps",
        "4",
        "--batch",
        "2",
        "--lora-rank",
        "2",
        "--lora-targets",
        "r,v,ffn.value,w2",
        "--out",
        as_,
        "--quiet",
    ]);
    assert!(out.contains("(adapter, "), "{out}");
    let ad = LoraAdapter::load(&a, &cfg).unwrap();
    assert_eq!(ad.rank, 2);
    assert_eq!(
        ad.targets(),
        vec![
            LoraTarget::R,
            LoraTarget::V,
            LoraTarget::FfnValue,
            LoraTarget::W2
        ]
    );
    cli(&["merge", "--model", ms, "--adapter", as_, "--out", me]);
    let with_adapter = json_loss(&cli(&[
        "eval",
        "--model",
        ms,
        "--adapter",
        as_,
        "--data",
        ds,
        "--json",
    ]));
    let merged_loss = json_loss(&cli(&["eval", "--model", me, "--data", ds, "--json"]));
    let base = json_loss(&cli(&["eval", "--model", ms, "--data", ds, "--json"]));
    println!("eval loss: base {base:.6}, --adapter {with_adapter:.6}, merged {merged_loss:.6}");
    assert_eq!(with_adapter.to_bits(), merged_loss.to_bits());
    assert!(with_adapter < base, "4 LoRA steps did not lower the loss");
    // SDLoRA: the adapter holds LoRA factors and sparse deltas; merging it
    // gives the model `eval --adapter` runs
    let sd = dir.join("sd.safetensors");
    let out = cli(&[
        "tune",
        "--method",
        "sdlora",
        "--model",
        ms,
        "--data",
        ds,
        "--ctx",
        "32",
        "--steps",
        "3",
        "--sdt-warmup",
        "2",
        "--batch",
        "2",
        "--lora-rank",
        "2",
        "--lora-targets",
        "o",
        "--out",
        sd.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.contains("SDT warm-up: 2 dense steps"), "{out}");
    let ad = rwkv_tune::model::lora::Adapter::load(&sd, &cfg).unwrap();
    assert!(ad.lora.is_some() && !ad.sparse.is_empty());
    let me2 = dir.join("merged2.safetensors");
    cli(&[
        "merge",
        "--model",
        ms,
        "--adapter",
        sd.to_str().unwrap(),
        "--out",
        me2.to_str().unwrap(),
    ]);
    let a1 = json_loss(&cli(&[
        "eval",
        "--model",
        ms,
        "--adapter",
        sd.to_str().unwrap(),
        "--data",
        ds,
        "--json",
    ]));
    let a2 = json_loss(&cli(&[
        "eval",
        "--model",
        me2.to_str().unwrap(),
        "--data",
        ds,
        "--json",
    ]));
    assert_eq!(a1.to_bits(), a2.to_bits(), "SDLoRA: merged vs --adapter");
    // merging onto the wrong model is refused with the tensor's name
    let mut other = cfg.clone();
    other.n_embd = 32;
    other.head_size = 16;
    let wo = Weights::random(&other, 1).unwrap();
    let mo = dir.join("other.safetensors");
    wo.save(
        &mo,
        rwkv_tune::model::Naming::Official,
        rwkv_tune::model::StoreDType::F32,
    )
    .unwrap();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args([
            "merge",
            "--model",
            mo.to_str().unwrap(),
            "--adapter",
            as_,
            "--out",
        ])
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("blocks.0"), "{err}");
}

const SDT_NAMES: [&str; 7] = ["w0", "a0", "k_k", "k_a", "r_k", "w2", "a2"];

#[test]
fn sdt_gradients_match_finite_differences() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 13).unwrap();
    let mut rng = Rng(31);
    let s = random_state(&cfg, true, 0.5, &mut rng).map(|v| v as f64);
    let b = batch(&cfg, &mut rng);
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 4,
    };
    let mut t = DeviceTuner::new(CpuOps::<f64>::default(), &w).unwrap();
    // SDLoRA: a LoRA adapter too, so both kinds of gradient flow together
    t.set_lora(
        &random_adapter(&cfg, &[LoraTarget::K, LoraTarget::W2], 2, 3),
        0.0,
        1,
    )
    .unwrap();
    t.set_sdt(None, None).unwrap();
    let lens = rwkv_tune::tune::device::sdt_lens(&cfg);
    let d0: Vec<Vec<Vec<f64>>> = (0..cfg.n_layer)
        .map(|_| {
            lens.iter()
                .map(|&n| (0..n).map(|_| rng.sym(0.1)).collect())
                .collect()
        })
        .collect();
    t.set_sdt_deltas_f64(&d0).unwrap();
    let st = t.upload_state(&s).unwrap();
    let (_, _, g) = t.loss_and_grad_sdt(&st, &b, &o).unwrap();
    let h = 1e-5;
    let mut worst = 0.0f64;
    for l in 0..cfg.n_layer {
        for (k, name) in SDT_NAMES.iter().enumerate() {
            let idx: Vec<usize> = (0..4).map(|_| rng.below(lens[k])).collect();
            let mut fd = Vec::new();
            for &i in &idx {
                let mut d = d0.clone();
                d[l][k][i] += h;
                t.set_sdt_deltas_f64(&d).unwrap();
                let lp = t.loss_and_grad_sdt(&st, &b, &o).unwrap().0;
                d[l][k][i] -= 2.0 * h;
                t.set_sdt_deltas_f64(&d).unwrap();
                let lm = t.loss_and_grad_sdt(&st, &b, &o).unwrap().0;
                fd.push((lp - lm) / (2.0 * h));
            }
            t.set_sdt_deltas_f64(&d0).unwrap();
            let an: Vec<f64> = idx.iter().map(|&i| g[l][k][i]).collect();
            let e = rel_err(&an, &fd);
            let fnorm = fd.iter().map(|v| v * v).sum::<f64>().sqrt();
            println!("layer {l} {name:>4}: |fd| = {fnorm:.3e}  rel.err = {e:.2e}");
            assert!(fnorm > 1e-9, "layer {l} {name}: vacuous");
            worst = worst.max(e);
        }
    }
    println!("worst f64 relative error {worst:.2e}");
    assert!(worst <= 1e-5, "SDT gradient vs FD: {worst:.3e}");
}

/// Masks selecting head 1 and key dimensions 3 and 7 of it in every layer.
fn some_masks(cfg: &Config) -> Vec<[Vec<f32>; 7]> {
    let lens = rwkv_tune::tune::device::sdt_lens(cfg);
    let chans: Vec<usize> = [3, 7].iter().map(|i| cfg.head_size + i).collect();
    (0..cfg.n_layer)
        .map(|_| {
            let mut m: [Vec<f32>; 7] = std::array::from_fn(|k| vec![0.0; lens[k]]);
            for &c in &chans {
                for v in m.iter_mut().take(5) {
                    v[c] = 1.0;
                }
                m[5][c * cfg.d_w..(c + 1) * cfg.d_w].fill(1.0);
                m[6][c * cfg.d_a..(c + 1) * cfg.d_a].fill(1.0);
            }
            m
        })
        .collect()
}

#[test]
fn sdt_training_stays_inside_the_masks_and_resumes_bit_exactly() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 14).unwrap();
    let mut rng = Rng(9);
    let data: Vec<Vec<Example>> = (0..5).map(|_| batch(&cfg, &mut rng)).collect();
    let masks = some_masks(&cfg);
    let ad = LoraAdapter::init(&cfg, 2, 2.0, &[LoraTarget::O], 5).unwrap();
    let mk = || {
        let o = GradOpts {
            observer_weight: 0.0,
            chunk: 4,
        };
        let adam = AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        DeviceEngine::new_sdt(
            CpuOps::new(),
            &w,
            Some(&masks),
            Some((&ad, 0.0)),
            3,
            adam,
            o,
        )
        .unwrap()
    };
    let mut e = mk();
    let first = e.step(&data[0], 1e-2, 1.0).unwrap();
    e.step(&data[1], 1e-2, 1.0).unwrap();
    let ck = e.save().unwrap();
    let mut r = mk();
    r.load(ck).unwrap();
    for b in &data[2..] {
        let a = e.step(b, 1e-2, 1.0).unwrap();
        let c = r.step(b, 1e-2, 1.0).unwrap();
        assert_eq!(a.loss_sum.to_bits(), c.loss_sum.to_bits(), "resumed loss");
    }
    let d = e.sdt_deltas().unwrap().unwrap();
    assert_eq!(d, r.sdt_deltas().unwrap().unwrap(), "resumed deltas differ");
    let (mut inside, mut outside) = (0usize, 0usize);
    for (dl, ml) in d.iter().zip(&masks) {
        for (dv, mv) in dl.iter().zip(ml) {
            for (&x, &m) in dv.iter().zip(mv) {
                if m == 0.0 {
                    assert_eq!(
                        x.to_bits(),
                        0.0f32.to_bits(),
                        "a delta moved outside its mask"
                    );
                    outside += 1;
                } else if x != 0.0 {
                    inside += 1;
                }
            }
        }
    }
    println!("{inside} trained entries moved, {outside} outside the masks stayed 0");
    assert!(inside > 0, "nothing inside the masks was trained");
    let again = e.step(&data[0], 0.0, 1.0).unwrap();
    assert!(
        again.loss_sum < first.loss_sum,
        "SDLoRA did not lower the loss"
    );
}

#[test]
fn emulated_sdt_gradients_match_the_cpu_twins() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 15).unwrap();
    let mut rng = Rng(5);
    let b = vec![
        random_example(6, cfg.vocab, false, false, &mut rng),
        random_example(5, cfg.vocab, true, false, &mut rng),
    ];
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 4,
    };
    let s = random_state(&cfg, false, 0.5, &mut rng);
    let lens = rwkv_tune::tune::device::sdt_lens(&cfg);
    let d0: Vec<Vec<Vec<f64>>> = (0..cfg.n_layer)
        .map(|_| {
            lens.iter()
                .map(|&n| (0..n).map(|_| rng.sym(0.1)).collect())
                .collect()
        })
        .collect();
    let mut tc = DeviceTuner::new(CpuOps::<f32>::default(), &w).unwrap();
    tc.set_sdt(None, None).unwrap();
    tc.set_sdt_deltas_f64(&d0).unwrap();
    let (lc, _, gc) = tc
        .loss_and_grad_sdt(&tc.upload_state(&s).unwrap(), &b, &o)
        .unwrap();
    let mut te = DeviceTuner::new(EmuOps::default(), &w).unwrap();
    te.set_sdt(None, None).unwrap();
    te.set_sdt_deltas_f64(&d0).unwrap();
    let (le, _, ge) = te
        .loss_and_grad_sdt(&te.upload_state(&s).unwrap(), &b, &o)
        .unwrap();
    assert!((lc - le).abs() <= 1e-4 * lc.abs(), "loss {lc} vs {le}");
    for l in 0..cfg.n_layer {
        for k in 0..7 {
            let e = rel_err(&ge[l][k], &gc[l][k]);
            println!("layer {l} {}: emu vs cpu {e:.2e}", SDT_NAMES[k]);
            assert!(e <= 1e-3, "layer {l} {}: {e:.3e}", SDT_NAMES[k]);
        }
    }
}

#[test]
fn sdt_selection_picks_the_largest_heads_and_dims() {
    let mut cfg = small_config();
    cfg.n_layer = 1; // 2 heads of 32
    let lens = rwkv_tune::tune::device::sdt_lens(&cfg);
    let mut d: [Vec<f32>; 7] = std::array::from_fn(|k| vec![0.01; lens[k]]);
    // head 1 dominates; inside it, dims 5 (via w0) and 9 (via a row of w2)
    d[0][32 + 5] = 3.0;
    for j in 0..cfg.d_w {
        d[5][(32 + 9) * cfg.d_w + j] = 1.0;
    }
    d[2][4] = 0.5; // the largest entry of head 0 stays below head 1's total
    let (m, chosen) =
        rwkv_tune::model::lora::sdt_select(&cfg, &[d.clone()], 0.5, 2.0 / 32.0).unwrap();
    assert_eq!(chosen, vec![vec![32 + 5, 32 + 9]]);
    for ch in 0..cfg.n_embd {
        let on = chosen[0].contains(&ch);
        assert_eq!(m[0][0][ch] == 1.0, on);
        assert_eq!(m[0][5][ch * cfg.d_w] == 1.0, on);
        assert_eq!(m[0][6][ch * cfg.d_a + cfg.d_a - 1] == 1.0, on);
    }
    assert!(rwkv_tune::model::lora::sdt_select(&cfg, &[d], 0.0, 0.5).is_err());
}

#[test]
fn sdlora_adapter_merges_bit_exactly_and_bad_sparse_files_are_refused() {
    use rwkv_tune::model::lora::Adapter;
    let cfg = small_config();
    let w = Weights::random(&cfg, 16).unwrap();
    let mut rng = Rng(2);
    let data: Vec<Vec<Example>> = (0..3).map(|_| batch(&cfg, &mut rng)).collect();
    let masks = some_masks(&cfg);
    let ad = LoraAdapter::init(&cfg, 2, 2.0, &[LoraTarget::V], 5).unwrap();
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 4,
    };
    let mut e = DeviceEngine::new_sdt(
        CpuOps::new(),
        &w,
        Some(&masks),
        Some((&ad, 0.0)),
        3,
        AdamConfig::default(),
        o,
    )
    .unwrap();
    for b in &data {
        e.step(b, 1e-2, 1.0).unwrap();
    }
    let full = e.adapter().unwrap().unwrap();
    let n_sparse: usize = full.sparse.iter().map(|d| d.index.len()).sum();
    let per_ch = 5 + cfg.d_w + cfg.d_a;
    assert_eq!(
        n_sparse,
        2 * per_ch * cfg.n_layer,
        "one entry per masked element"
    );
    let dir = tempfile_dir("sdt_files");
    let p = dir.join("sd.safetensors");
    full.save(&p, &cfg).unwrap();
    let back = Adapter::load(&p, &cfg).unwrap();
    assert_eq!(back, full);
    // the merged recurrent tensors equal the engine's effective ones, bit
    // for bit, and nothing outside the masks changed
    let mut sparse_only = back.clone();
    sparse_only.lora = None;
    let mut wm = w.clone();
    sparse_only.merge_into(&mut wm).unwrap();
    let deltas = e.sdt_deltas().unwrap().unwrap();
    for l in 0..cfg.n_layer {
        let (a0, am) = (&w.blocks[l].att, &wm.blocks[l].att);
        for c in 0..cfg.n_embd {
            let want = a0.w0[c] + deltas[l][0][c];
            assert_eq!(am.w0[c].to_bits(), want.to_bits(), "w0[{c}] layer {l}");
            if masks[l][0][c] == 0.0 {
                assert_eq!(am.k_k[c].to_bits(), a0.k_k[c].to_bits());
                assert_eq!(am.r_k[c].to_bits(), a0.r_k[c].to_bits());
            }
        }
        for j in 0..cfg.d_w {
            for c in 0..cfg.n_embd {
                let want = a0.w2[j * cfg.n_embd + c] + deltas[l][5][c * cfg.d_w + j];
                assert_eq!(am.w2[j * cfg.n_embd + c].to_bits(), want.to_bits());
            }
        }
    }
    // the merged model (LoRA too) computes what the engine computes
    let mut wf = w.clone();
    back.merge_into(&mut wf).unwrap();
    let tokens: Vec<u32> = (0..11).map(|_| rng.below(cfg.vocab) as u32).collect();
    let zero = TunedStateOf::<f32>::zeros(&cfg, false);
    let t = e.tuner();
    let le = t.logits(&t.upload_state(&zero).unwrap(), &tokens).unwrap();
    let tm = DeviceTuner::new(CpuOps::<f32>::default(), &wf).unwrap();
    let lm = tm
        .logits(&tm.upload_state(&zero).unwrap(), &tokens)
        .unwrap();
    let err = rel_err32(&lm, &le);
    println!("merged SDLoRA vs engine logits: {err:.2e}");
    assert!(err <= 1e-5, "merged SDLoRA logits: {err:.3e}");
    // bad sparse files
    use rwkv_tune::tensors::F32Tensor;
    let t1 = |v: Vec<f32>| F32Tensor {
        shape: vec![v.len()],
        data: v,
    };
    let cases: Vec<BadFile> = vec![
        (
            "index out of range",
            vec![
                ("blocks.0.att.w0.sdt_index", t1(vec![1.0, 9999.0])),
                ("blocks.0.att.w0.sdt_delta", t1(vec![0.1, 0.2])),
            ],
            "indices",
        ),
        (
            "fractional index",
            vec![
                ("blocks.0.att.w0.sdt_index", t1(vec![1.5])),
                ("blocks.0.att.w0.sdt_delta", t1(vec![0.1])),
            ],
            "not an index",
        ),
        (
            "unpaired",
            vec![("blocks.0.att.r_k.sdt_delta", t1(vec![0.1]))],
            "sdt_index",
        ),
        (
            "NaN delta",
            vec![
                ("blocks.0.att.a0.sdt_index", t1(vec![3.0])),
                ("blocks.0.att.a0.sdt_delta", t1(vec![f32::NAN])),
            ],
            "sdt_delta",
        ),
        (
            "unknown tensor",
            vec![
                ("blocks.0.att.x_r.sdt_index", t1(vec![3.0])),
                ("blocks.0.att.x_r.sdt_delta", t1(vec![0.1])),
            ],
            "unknown tensor",
        ),
    ];
    refuse_bad_files(&dir, cases, |p| Adapter::load(p, &cfg));
}

#[test]
fn state_offset_gradient_matches_finite_differences_and_emu() {
    use rwkv_tune::tune::state::UpscaledStateOf;
    let cfg = small_config();
    let w = Weights::random(&cfg, 17).unwrap();
    let mut rng = Rng(41);
    let b = batch(&cfg, &mut rng);
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 4,
    };
    let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
    // a random initial state too, so both read-out terms are exercised
    let state = random_state(&cfg, false, 0.5, &mut rng).map(|v| v as f64);
    let off: Vec<Vec<f64>> = (0..cfg.n_layer)
        .map(|_| (0..hnn).map(|_| rng.sym(0.2)).collect())
        .collect();
    let s = UpscaledStateOf {
        state: state.clone(),
        u: off.clone(),
    };
    let t = DeviceTuner::new_offset(CpuOps::<f64>::default(), &w).unwrap();
    let (_, _, g, _) = t.loss_and_grad_upscaled(&s, &b, &o).unwrap();
    let h = 1e-5;
    let mut worst = 0.0f64;
    for l in 0..cfg.n_layer {
        let idx: Vec<usize> = (0..8).map(|_| rng.below(hnn)).collect();
        let fd: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let mut sp = s.clone();
                sp.u[l][i] += h;
                let lp = t.loss_only_upscaled(&sp, &b, &o).unwrap().0;
                sp.u[l][i] -= 2.0 * h;
                let lm = t.loss_only_upscaled(&sp, &b, &o).unwrap().0;
                (lp - lm) / (2.0 * h)
            })
            .collect();
        let an: Vec<f64> = idx.iter().map(|&i| g.u[l][i]).collect();
        let e = rel_err(&an, &fd);
        println!("layer {l} S_off: rel.err {e:.2e}");
        worst = worst.max(e);
    }
    assert!(worst <= 1e-5, "state offset gradient vs FD: {worst:.3e}");
    // the emulated kernels (the linear read-out of tune_up_*) against the twins
    let s32 = UpscaledStateOf {
        state: state.map(|v| v as f32),
        u: off
            .iter()
            .map(|x| x.iter().map(|&v| v as f32).collect())
            .collect(),
    };
    let tc = DeviceTuner::new_offset(CpuOps::<f32>::default(), &w).unwrap();
    let (lc, _, gc, _) = tc.loss_and_grad_upscaled(&s32, &b, &o).unwrap();
    let te = DeviceTuner::new_offset(EmuOps::default(), &w).unwrap();
    let (le, _, ge, _) = te.loss_and_grad_upscaled(&s32, &b, &o).unwrap();
    assert!((lc - le).abs() <= 1e-4 * lc.abs(), "loss {lc} vs {le}");
    for l in 0..cfg.n_layer {
        let err = rel_err32(&ge.u[l], &gc.u[l]);
        println!("layer {l}: emu vs cpu S_off gradient {err:.2e}");
        assert!(err <= 1e-3);
    }
    // the engine trains only the offsets; the adapter holds them, refuses to
    // merge and round-trips
    let mut e =
        DeviceEngine::new_offset(CpuOps::new(), &w, None, AdamConfig::default(), o).unwrap();
    let before = e.step(&b, 0.1, 1.0).unwrap();
    for _ in 0..3 {
        e.step(&b, 0.1, 1.0).unwrap();
    }
    let after = e.step(&b, 0.0, 1.0).unwrap();
    assert!(after.loss_sum < before.loss_sum);
    let ad = e.adapter().unwrap().unwrap();
    assert!(ad.offset.is_some() && ad.lora.is_none() && ad.sparse.is_empty());
    let dir = tempfile_dir("offset");
    let p = dir.join("off.safetensors");
    ad.save(&p, &cfg).unwrap();
    let back = rwkv_tune::model::lora::Adapter::load(&p, &cfg).unwrap();
    assert_eq!(back, ad);
    let mut wm = w.clone();
    let err = back.merge_into(&mut wm).unwrap_err().to_string();
    assert!(err.contains("cannot be merged"), "{err}");
    // the CPU model with the offsets (what generate / eval --adapter run)
    // computes what the engine computes
    let off = back.offset.clone().unwrap();
    let mut model = Model::new(w.clone()).unwrap();
    model.set_state_offsets(Some(off.clone())).unwrap();
    let tokens: Vec<u32> = (0..13).map(|_| rng.below(cfg.vocab) as u32).collect();
    let mut st = model.new_state();
    let lm = model
        .forward(&tokens, &mut st, rwkv_tune::model::Logits::All)
        .unwrap();
    let tz = DeviceTuner::new_offset(CpuOps::<f32>::default(), &w).unwrap();
    let up = UpscaledStateOf {
        state: TunedState::zeros(&cfg, false),
        u: off,
    };
    let lt = tz
        .logits(&tz.upload_upscaled(&up).unwrap(), &tokens)
        .unwrap();
    let e = rel_err32(&lm, &lt);
    println!("CPU model with offsets vs the engine: {e:.2e}");
    assert!(e <= 1e-5, "CPU model with state offsets: {e:.3e}");
    // and the device model on the emulator (generate / eval --adapter --device emu)
    let mut dm = rwkv_tune::model::device::DeviceModel::new(EmuOps::default(), &w).unwrap();
    dm.set_state_offsets(Some(&up.u)).unwrap();
    let mut hs = model.new_state();
    let ld = dm
        .forward(&tokens, &mut hs, rwkv_tune::model::Logits::All)
        .unwrap();
    let e = rel_err32(&ld, &lm);
    println!("emulated device model with offsets vs the CPU model: {e:.2e}");
    assert!(e <= 1e-5, "device model with state offsets: {e:.3e}");
}
