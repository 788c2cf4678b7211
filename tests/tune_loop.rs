//! A fixed-seed state-tuning run on the synthetic demo task: the held-out
//! loss must fall by a clear margin and the exported state file must load.
//! Also the engine builder on the CPU, and the check that the crate's
//! module graph is acyclic
//! ([`module_graph`], tests/common/module_graph.rs).
use rwkv_tune::model::{Model, State};
use rwkv_tune::tune::builder::{EngineBuilder, EngineOptions, Exported, ObserverOptions};
use rwkv_tune::tune::data::ByteTokenizer;
use rwkv_tune::tune::demo;
use rwkv_tune::tune::train::{export_state, train, TrainConfig};
use rwkv_tune::Error;

#[test]
fn tuning_lowers_held_out_loss_on_the_synthetic_task() {
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let cfg = w.config.clone();
    let model = Model::new(w).unwrap();
    let (tr, va) = demo::synthetic_datasets(256, 48, 11, &ByteTokenizer).unwrap();
    let mut tc = TrainConfig::new(40);
    tc.batch = 8;
    tc.seed = 3;
    let rep = train(&model, &tr, Some(&va), &tc, None).unwrap();
    let (b, a) = (rep.before.unwrap(), rep.after.unwrap());
    eprintln!("before {b:?}\nafter  {a:?}\n{:.1} s", rep.seconds);
    assert_eq!(rep.steps, 40);
    assert_eq!(rep.history.len(), 40);
    assert!(
        b.exact == Some((0, 48)),
        "the random model should not solve the task: {b:?}"
    );
    assert!(
        a.loss < b.loss - 1.5,
        "held-out loss should fall by > 1.5 nats: {:.3} -> {:.3}",
        b.loss,
        a.loss
    );
    // The export is an ai00-layout state file that the model's loader accepts.
    let dir = std::env::temp_dir().join(format!("rwkv-tune-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("state.safetensors");
    export_state(&p, &cfg, &rep.state).unwrap();
    let st = State::load(&p, &cfg).unwrap();
    for (l, ls) in st.layers.iter().enumerate() {
        assert_eq!(ls.wkv, rep.state.wkv[l]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The engine builder on the CPU: DBP when asked, the upscaled engine (and
/// no DBP) with `upscale`, typed errors for bad options, and an export that
/// writes the sidecar only for the upscaled state.
#[test]
fn the_engine_builder_picks_the_engine_from_the_options() {
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let cfg = w.config.clone();
    let model = Model::new(w).unwrap();
    let (tr, va) = demo::synthetic_datasets(32, 8, 5, &ByteTokenizer).unwrap();
    let mut quiet = |_: &str| {};
    let tc = || {
        let mut tc = TrainConfig::new(2);
        tc.dbp = Some((9.0, 9.0)); // overwritten by the options
        tc
    };
    let dir = std::env::temp_dir().join(format!("rwkv-tune-builder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("s.safetensors");

    let opts = EngineOptions {
        dbp: Some((0.05, 0.0)),
        ..EngineOptions::default()
    };
    let b = EngineBuilder::open(opts.clone(), &mut quiet).unwrap();
    let mut t = b.build(&model, &tr, Some(&va), tc(), &mut quiet).unwrap();
    assert_eq!(t.config.dbp, Some((0.05, 0.0)));
    assert_eq!(t.engine().device(), "cpu");
    // the CPU engine is the device engine over the CPU ops: it plans memory
    assert_eq!(t.upscale(), None);
    assert!(t.peak_bytes().is_some());
    let hnn = cfg.n_layer * cfg.n_head * cfg.head_size * cfg.head_size;
    assert_eq!(t.n_params, hnn);
    let rep = t.run().unwrap();
    assert_eq!(rep.steps, 2);
    assert_eq!(
        t.export(&out, &rep.state).unwrap(),
        Exported::Plain {
            removed_sidecar: None
        }
    );

    let up = EngineOptions {
        upscale: Some(4),
        ..opts.clone()
    };
    let mut lines = Vec::new();
    let b = EngineBuilder::open(up, &mut |l: &str| lines.push(l.to_string())).unwrap();
    let mut t = b
        .build(&model, &tr, Some(&va), tc(), &mut |l: &str| {
            lines.push(l.to_string())
        })
        .unwrap();
    assert_eq!(t.config.dbp, None, "the upscaled state trains without DBP");
    assert!(
        lines[0].starts_with("note: --upscale trains without DBP"),
        "{lines:?}"
    );
    assert!(t.config.tag.contains("upscale m=4"), "{}", t.config.tag);
    assert_eq!(
        t.n_params,
        hnn + cfg.n_layer * cfg.n_head * cfg.head_size * 4
    );
    let rep = t.run().unwrap();
    let side = dir.join("s.upscale.safetensors");
    assert_eq!(
        t.export(&out, &rep.state).unwrap(),
        Exported::Upscaled {
            sidecar: side.clone(),
            m: 4
        }
    );

    let bad = EngineOptions {
        upscale: Some(0),
        ..opts.clone()
    };
    assert!(matches!(
        EngineBuilder::open(bad, &mut quiet),
        Err(Error::Options(m)) if m.contains("M ≥ 1")
    ));
    let missing = EngineOptions {
        observer: Some(ObserverOptions {
            model: dir.join("missing.safetensors"),
            weight: 1.0,
            temperature: 1.0,
        }),
        ..opts
    };
    let b = EngineBuilder::open(missing, &mut quiet).unwrap();
    assert!(matches!(
        b.build(&model, &tr, None, tc(), &mut quiet),
        Err(Error::Context { what, .. }) if what.starts_with("loading observer")
    ));
    // A plain export removes the now stale sidecar.
    let b = EngineBuilder::open(EngineOptions::default(), &mut quiet).unwrap();
    let t = b.build(&model, &tr, None, tc(), &mut quiet).unwrap();
    let s = t.engine().tuned().unwrap();
    assert_eq!(
        t.export(&out, &s).unwrap(),
        Exported::Plain {
            removed_sidecar: Some(side.clone())
        }
    );
    assert!(!side.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// The crate's module graph has no cycles (and the checker can fail): kept
/// in this binary rather than a new one, since each test binary links slowly.
#[path = "common/module_graph.rs"]
mod module_graph;
