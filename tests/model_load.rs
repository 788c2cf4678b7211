//! Checkpoint loading: official and fla / Hugging Face names, f32/f16/bf16,
//! and named errors for missing, extra and mis-shaped tensors, truncated
//! files and corrupt headers (never a panic).
use std::path::Path;

use rwkv_tune::model::load::{read_f32_tensors, write_f32_tensors, F32Tensor};
use rwkv_tune::model::{Config, Model, Naming, StoreDType, Weights};
use rwkv_tune::Error;

fn small() -> Config {
    Config {
        n_layer: 2,
        n_embd: 64,
        n_head: 2,
        head_size: 32,
        vocab: 20,
        d_w: 32,
        d_a: 32,
        d_v: 16,
        d_g: 32,
        d_ffn: 256,
    }
}

fn logits(w: Weights) -> Vec<f32> {
    let m = Model::new(w).unwrap();
    let mut st = m.new_state();
    m.forward_seq(&[1, 5, 7, 19, 0], &mut st).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn p() -> &'static Path {
    Path::new("test.safetensors")
}

#[test]
fn official_round_trip_and_dtypes() {
    let w = Weights::random(&small(), 3).unwrap();
    let want = logits(w.clone());
    let bytes = w
        .to_safetensors_bytes(Naming::Official, StoreDType::F32)
        .unwrap();
    let back = Weights::from_safetensors_bytes(&bytes, p()).unwrap();
    assert_eq!(back.config, w.config);
    assert_eq!(back.emb, w.emb);
    assert_eq!(back.blocks[1].att.v2, w.blocks[1].att.v2);
    assert_eq!(logits(back), want);
    for (dt, tol) in [(StoreDType::F16, 0.05), (StoreDType::BF16, 0.3)] {
        let bytes = w.to_safetensors_bytes(Naming::Official, dt).unwrap();
        assert!(bytes.len() < w.config.n_params() * 3);
        let back = Weights::from_safetensors_bytes(&bytes, p()).unwrap();
        let d = max_abs(&logits(back), &want);
        assert!(d > 0.0 && d < tol, "{dt:?}: {d}");
    }
}

/// Writes fla / HF names by hand (independently of the library's mapping).
fn to_fla_by_hand(w: &Weights) -> Vec<F32Tensor> {
    let tr = |d: &[f32], r: usize, c: usize| -> Vec<f32> {
        let mut o = vec![0.0; d.len()];
        for i in 0..r {
            for j in 0..c {
                o[j * r + i] = d[i * c + j];
            }
        }
        o
    };
    let cf = &w.config;
    let c = cf.n_embd;
    let mut out = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        out.push(F32Tensor { name, shape, data });
    };
    put(
        "model.embeddings.weight".into(),
        vec![cf.vocab, c],
        w.emb.clone(),
    );
    put("lm_head.weight".into(), vec![cf.vocab, c], w.head.clone());
    put("model.norm.weight".into(), vec![c], w.ln_out.weight.clone());
    put("model.norm.bias".into(), vec![c], w.ln_out.bias.clone());
    for (l, b) in w.blocks.iter().enumerate() {
        let p = format!("model.layers.{l}");
        if let Some(ln0) = &b.ln0 {
            put(format!("{p}.pre_norm.weight"), vec![c], ln0.weight.clone());
            put(format!("{p}.pre_norm.bias"), vec![c], ln0.bias.clone());
        }
        for (nm, ln) in [("attn_norm", &b.ln1), ("ffn_norm", &b.ln2)] {
            put(format!("{p}.{nm}.weight"), vec![c], ln.weight.clone());
            put(format!("{p}.{nm}.bias"), vec![c], ln.bias.clone());
        }
        let a = &b.att;
        for (nm, v) in [
            ("x_r", &a.x_r),
            ("x_w", &a.x_w),
            ("x_k", &a.x_k),
            ("x_v", &a.x_v),
            ("x_a", &a.x_a),
            ("x_g", &a.x_g),
        ] {
            put(format!("{p}.attn.{nm}"), vec![1, 1, c], v.clone());
        }
        put(format!("{p}.attn.k_k"), vec![c], a.k_k.clone());
        put(format!("{p}.attn.k_a"), vec![c], a.k_a.clone());
        put(
            format!("{p}.attn.r_k"),
            vec![cf.n_head, cf.head_size],
            a.r_k.clone(),
        );
        for (nm, m) in [
            ("r_proj", &a.receptance),
            ("k_proj", &a.key),
            ("v_proj", &a.value),
            ("o_proj", &a.output),
        ] {
            put(format!("{p}.attn.{nm}.weight"), vec![c, c], m.clone());
        }
        put(
            format!("{p}.attn.g_norm.weight"),
            vec![c],
            a.ln_x.weight.clone(),
        );
        put(
            format!("{p}.attn.g_norm.bias"),
            vec![c],
            a.ln_x.bias.clone(),
        );
        let mut lora = |nm: &str, d: usize, m1: &[f32], m2: &[f32], bias: Option<&Vec<f32>>| {
            put(
                format!("{p}.attn.{nm}.lora.0.weight"),
                vec![d, c],
                tr(m1, c, d),
            );
            put(
                format!("{p}.attn.{nm}.lora.2.weight"),
                vec![c, d],
                tr(m2, d, c),
            );
            if let Some(b) = bias {
                put(format!("{p}.attn.{nm}.lora.2.bias"), vec![c], b.clone());
            }
        };
        lora("w_lora", cf.d_w, &a.w1, &a.w2, Some(&a.w0));
        lora("a_lora", cf.d_a, &a.a1, &a.a2, Some(&a.a0));
        lora("g_lora", cf.d_g, &a.g1, &a.g2, None);
        if l > 0 {
            lora(
                "v_lora",
                cf.d_v,
                a.v1.as_ref().unwrap(),
                a.v2.as_ref().unwrap(),
                a.v0.as_ref(),
            );
        }
        put(format!("{p}.ffn.x_k"), vec![c], b.ffn.x_k.clone());
        put(
            format!("{p}.ffn.key.weight"),
            vec![cf.d_ffn, c],
            b.ffn.key.clone(),
        );
        put(
            format!("{p}.ffn.value.weight"),
            vec![c, cf.d_ffn],
            b.ffn.value.clone(),
        );
    }
    out
}

#[test]
fn fla_names_load_and_round_trip() {
    let w = Weights::random(&small(), 4).unwrap();
    let want = logits(w.clone());
    let bytes = write_f32_tensors(&to_fla_by_hand(&w), StoreDType::F32, None).unwrap();
    let back = Weights::from_safetensors_bytes(&bytes, p()).unwrap();
    assert_eq!(back.config, w.config);
    assert_eq!(back.blocks[1].att.w1, w.blocks[1].att.w1);
    assert_eq!(logits(back), want);
    // The library's own fla writer agrees with the hand-written one.
    let mine = w.named_tensors(Naming::Fla);
    let hand = to_fla_by_hand(&w);
    assert_eq!(mine.len(), hand.len());
    for t in &hand {
        let m = mine
            .iter()
            .find(|x| x.name == t.name)
            .unwrap_or_else(|| panic!("{}", t.name));
        assert_eq!(m.data, t.data, "{}", t.name);
    }
    // bf16 fla file.
    let bytes = w
        .to_safetensors_bytes(Naming::Fla, StoreDType::BF16)
        .unwrap();
    let back = Weights::from_safetensors_bytes(&bytes, p()).unwrap();
    assert!(max_abs(&logits(back), &want) < 0.3);
}

fn official_tensors(w: &Weights) -> Vec<F32Tensor> {
    w.named_tensors(Naming::Official)
}

fn load_err(ts: Vec<F32Tensor>) -> Error {
    let bytes = write_f32_tensors(&ts, StoreDType::F32, None).unwrap();
    Weights::from_safetensors_bytes(&bytes, p()).unwrap_err()
}

#[test]
fn named_errors() {
    let w = Weights::random(&small(), 5).unwrap();

    let mut ts = official_tensors(&w);
    ts.retain(|t| t.name != "blocks.1.att.k_a");
    let e = load_err(ts);
    assert!(
        matches!(&e, Error::MissingTensor(n) if n == "blocks.1.att.k_a"),
        "{e}"
    );

    let mut ts = official_tensors(&w);
    ts.push(F32Tensor {
        name: "blocks.1.att.extra".into(),
        shape: vec![3],
        data: vec![1.0; 3],
    });
    let e = load_err(ts).to_string();
    assert!(e.contains("blocks.1.att.extra"), "{e}");

    let mut ts = official_tensors(&w);
    let t = ts
        .iter_mut()
        .find(|t| t.name == "blocks.1.att.key.weight")
        .unwrap();
    t.shape = vec![64, 32];
    t.data.truncate(64 * 32);
    let e = load_err(ts);
    assert!(
        matches!(&e, Error::Shape { name, .. } if name == "blocks.1.att.key.weight"),
        "{e}"
    );

    // Vectors may be [C] instead of [1,1,C]; but not [2,32].
    let mut ts = official_tensors(&w);
    ts.iter_mut()
        .find(|t| t.name == "blocks.0.att.x_r")
        .unwrap()
        .shape = vec![64];
    assert!(write_f32_tensors(&ts, StoreDType::F32, None)
        .map(|b| Weights::from_safetensors_bytes(&b, p()).is_ok())
        .unwrap());
    ts.iter_mut()
        .find(|t| t.name == "blocks.0.att.x_r")
        .unwrap()
        .shape = vec![2, 32];
    let e = load_err(ts);
    assert!(
        matches!(&e, Error::Shape { name, .. } if name == "blocks.0.att.x_r"),
        "{e}"
    );

    // Unsupported dtype.
    let mut bytes = w
        .to_safetensors_bytes(Naming::Official, StoreDType::F32)
        .unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let first = header.find("\"F32\"").unwrap();
    bytes[8 + first..8 + first + 5].copy_from_slice(b"\"I32\"");
    let e = Weights::from_safetensors_bytes(&bytes, p()).unwrap_err();
    assert!(matches!(e, Error::DType { .. }), "{e}");
}

#[test]
fn truncated_and_corrupt_files() {
    let w = Weights::random(&small(), 6).unwrap();
    let bytes = w
        .to_safetensors_bytes(Naming::Official, StoreDType::F32)
        .unwrap();
    for cut in [0usize, 5, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let e = Weights::from_safetensors_bytes(&bytes[..cut], p()).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::SafeTensors { .. }), "{s}");
        assert!(s.contains("test.safetensors"), "{s}");
        if cut > 1000 {
            assert!(s.contains("byte offset"), "cut {cut}: {s}");
        }
    }
    let mut bad = bytes.clone();
    bad[10] = b'#';
    let e = Weights::from_safetensors_bytes(&bad, p()).unwrap_err();
    assert!(e.to_string().contains("header"), "{e}");
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = Weights::from_safetensors_bytes(&huge, p()).unwrap_err();
    assert!(e.to_string().contains("header"), "{e}");
    // read_f32_tensors on garbage
    assert!(read_f32_tensors(b"\x02\0\0\0\0\0\0\0{}", p()).is_ok());
    let e = Weights::load("/nonexistent/dir/model.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
}

#[test]
fn tiny_fixture_loads_in_all_dtypes_and_names() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rwkv7-tiny-834k/rwkv7-tiny-834k.safetensors");
    if !path.is_file() {
        eprintln!("SKIP: {} not found", path.display());
        return;
    }
    let w = Weights::load(&path).unwrap();
    assert!(w.blocks[0].att.v0.is_none());
    let want = logits_tiny(w.clone());
    let fla = w
        .to_safetensors_bytes(Naming::Fla, StoreDType::F32)
        .unwrap();
    let back = Weights::from_safetensors_bytes(&fla, &path).unwrap();
    assert_eq!(logits_tiny(back), want);
}

fn logits_tiny(w: Weights) -> Vec<f32> {
    let m = Model::new(w).unwrap();
    let toks: Vec<u32> = b"Hello".iter().map(|&b| b as u32).collect();
    let mut st = m.new_state();
    m.forward_seq(&toks, &mut st).unwrap()
}
