//! State files (`blocks.N.att.time_state` `[H, N, N]`, value-major): round
//! trips in f32 / f16 / bf16, checks against the model config, and that a
//! loaded state continues generation exactly like the in-memory one.
use std::path::Path;

use rwkv_tune::model::load::{write_f32_tensors, F32Tensor};
use rwkv_tune::model::{Config, Model, State, StoreDType, Weights};
use rwkv_tune::Error;

fn cfg() -> Config {
    Config {
        n_layer: 3,
        n_embd: 64,
        n_head: 2,
        head_size: 32,
        vocab: 30,
        d_w: 32,
        d_a: 32,
        d_v: 32,
        d_g: 32,
        d_ffn: 128,
    }
}

#[test]
fn round_trip_all_dtypes() {
    let model = Model::new(Weights::random(&cfg(), 2).unwrap()).unwrap();
    let mut st = model.new_state();
    model
        .forward_seq(&[1, 2, 3, 4, 5, 6, 7, 8], &mut st)
        .unwrap();
    assert!(st.layers[2].wkv.iter().any(|&v| v.abs() > 1e-3));
    let dir = std::env::temp_dir().join(format!("rwkv-tune-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (dt, tol) in [
        (StoreDType::F32, 0.0f32),
        (StoreDType::F16, 1e-3),
        (StoreDType::BF16, 1e-2),
    ] {
        let path = dir.join(format!("{dt:?}.safetensors"));
        st.save(&path, model.config(), dt).unwrap();
        let back = State::load(&path, model.config()).unwrap();
        for (a, b) in st.layers.iter().zip(&back.layers) {
            let d = a
                .wkv
                .iter()
                .zip(&b.wkv)
                .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
                .fold(0.0, f32::max);
            assert!(d <= tol, "{dt:?}: {d}");
            assert!(b.att_x.iter().all(|&v| v == 0.0));
        }
    }
    // A loaded f32 state continues exactly like the original (token shift reset).
    let path = dir.join("F32.safetensors");
    let mut a = State::load(&path, model.config()).unwrap();
    let mut b = st.clone();
    for l in &mut b.layers {
        l.att_x.fill(0.0);
        l.ffn_x.fill(0.0);
    }
    assert_eq!(
        model.step(9, &mut a).unwrap(),
        model.step(9, &mut b).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn checked_against_config() {
    let c = cfg();
    let st = State::zeros(&c);
    let bytes = st.to_safetensors_bytes(&c, StoreDType::F32).unwrap();
    let p = Path::new("s.safetensors");
    // Wrong head size.
    let mut other = c.clone();
    other.n_head = 1;
    other.head_size = 64;
    let e = State::from_safetensors_bytes(&bytes, p, &other).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { name, .. } if name == "blocks.0.att.time_state"),
        "{e}"
    );
    // Fewer layers in the model than in the file.
    let mut fewer = c.clone();
    fewer.n_layer = 2;
    let e = State::from_safetensors_bytes(&bytes, p, &fewer).unwrap_err();
    assert!(e.to_string().contains("blocks.2.att.time_state"), "{e}");
    // Missing layer.
    let mut more = c.clone();
    more.n_layer = 4;
    let e = State::from_safetensors_bytes(&bytes, p, &more).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor(n) if n == "blocks.3.att.time_state"),
        "{e}"
    );
    // Unknown tensor; [1,H,N,N] accepted.
    let mut ts = st.time_state_tensors(&c);
    ts[0].shape = vec![1, 2, 32, 32];
    let ok = write_f32_tensors(&ts, StoreDType::BF16, None).unwrap();
    assert!(State::from_safetensors_bytes(&ok, p, &c).is_ok());
    ts.push(F32Tensor {
        name: "blocks.0.att.time_mix".into(),
        shape: vec![1],
        data: vec![0.5],
    });
    let bad = write_f32_tensors(&ts, StoreDType::F32, None).unwrap();
    let e = State::from_safetensors_bytes(&bad, p, &c).unwrap_err();
    assert!(e.to_string().contains("blocks.0.att.time_mix"), "{e}");
    // Truncated.
    let e = State::from_safetensors_bytes(&bytes[..bytes.len() - 3], p, &c).unwrap_err();
    assert!(matches!(e, Error::SafeTensors { .. }), "{e}");
}
