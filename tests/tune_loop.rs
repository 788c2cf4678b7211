//! A fixed-seed state-tuning run on the synthetic demo task: the held-out
//! loss must fall by a clear margin and the exported state file must load.
//! Also the check that the crate's module graph is acyclic
//! ([`module_graph`], tests/common/module_graph.rs).
use rwkv_tune::model::{Model, State};
use rwkv_tune::tune::data::ByteTokenizer;
use rwkv_tune::tune::demo;
use rwkv_tune::tune::train::{export_state, train, TrainConfig};

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

/// The crate's module graph has no cycles (and the checker can fail): kept
/// in this binary rather than a new one, since each test binary links slowly.
#[path = "common/module_graph.rs"]
mod module_graph;
