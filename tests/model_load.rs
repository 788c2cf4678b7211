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

// ------------------------------------------------------------ PyTorch .pth
//
// Fixtures are built here: with the library's writer (round trips against
// the safetensors twin, bit for bit), and by hand, opcode by opcode, in the
// shape `torch.save(model.state_dict())` writes (memo, shared storages,
// strided views, `_metadata`, deflate), so the reader is checked against
// values computed independently of it.

use rwkv_tune::model::load::{read_pth, read_tensors, read_tensors_typed, write_pth};
use rwkv_tune::model::State;
use rwkv_tune::pth::StorageDType;

fn bits(t: &[F32Tensor]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let mut v: Vec<_> = t
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                t.data.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn pth_equals_its_safetensors_twin_bit_for_bit() {
    let w = Weights::random(&small(), 5).unwrap();
    let want = logits(w.clone());
    for naming in [Naming::Official, Naming::Fla] {
        for dt in [StoreDType::F32, StoreDType::F16, StoreDType::BF16] {
            let st = w.to_safetensors_bytes(naming, dt).unwrap();
            let pth = write_pth(&w.named_tensors(naming), dt).unwrap();
            assert_eq!(&pth[..4], b"PK\x03\x04");
            let a = read_tensors(&st, p()).unwrap();
            let typed = read_tensors_typed(&pth, Path::new("m.pth")).unwrap();
            assert!(typed.iter().all(|t| t.1 == Some(dt)), "{dt:?}");
            let b: Vec<F32Tensor> = typed.into_iter().map(|t| t.0).collect();
            assert_eq!(bits(&a), bits(&b), "{naming:?} {dt:?}");
            let ws = Weights::from_bytes(&st, p()).unwrap();
            let wp = Weights::from_bytes(&pth, Path::new("m.pth")).unwrap();
            let (ls, lp) = (logits(ws), logits(wp));
            assert_eq!(ls, lp, "{naming:?} {dt:?}");
            if dt == StoreDType::F32 {
                assert_eq!(lp, want);
            }
        }
    }
    // a .pth handed to the safetensors-only parser says what it is
    let pth = write_pth(&w.named_tensors(Naming::Official), StoreDType::F32).unwrap();
    let e = Weights::from_safetensors_bytes(&pth, p()).unwrap_err();
    assert!(e.to_string().contains("this is a PyTorch file"), "{e}");
}

/// Pickle writer helpers for hand-built fixtures.
fn s(out: &mut Vec<u8>, x: &str) {
    out.push(b'X');
    out.extend((x.len() as u32).to_le_bytes());
    out.extend(x.as_bytes());
}

fn zip_of(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, deflate) in entries {
        let m = if *deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let o = zip::write::SimpleFileOptions::default().compression_method(m);
        z.start_file(name.to_string(), o).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// A state dict as torch.save writes it: `a` [3,4] f32 over storage 0,
/// `b.t` its transpose (a strided view of the same storage), `c` an
/// nn.Parameter over f16 storage 1 (offset 1, stride 2), memoized globals,
/// the OrderedDict `_metadata` BUILD, storage 0 deflated.
fn torch_like(storage0: &[f32], storage1: &[half::f16], numel0: usize) -> Vec<u8> {
    let mut k = vec![0x80, 2];
    k.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
    s(&mut k, "a");
    k.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((");
    s(&mut k, "storage");
    k.extend(b"ctorch\nFloatStorage\nq\x03");
    s(&mut k, "0");
    s(&mut k, "cpu");
    k.push(b'M');
    k.extend((numel0 as u16).to_le_bytes());
    k.extend(b"tQK\x00(K\x03K\x04t(K\x04K\x01t\x89h\x00)RtRq\x04");
    s(&mut k, "b.t");
    k.extend(b"h\x02((");
    s(&mut k, "storage");
    k.extend(b"h\x03");
    s(&mut k, "0");
    s(&mut k, "cpu");
    k.push(b'M');
    k.extend((numel0 as u16).to_le_bytes());
    k.extend(b"tQK\x00(K\x04K\x03t(K\x01K\x04t\x89h\x00)RtRq\x05");
    s(&mut k, "c");
    k.extend(b"ctorch._utils\n_rebuild_parameter\n(h\x02((");
    s(&mut k, "storage");
    k.extend(b"ctorch\nHalfStorage\n");
    s(&mut k, "1");
    s(&mut k, "cuda:0");
    k.extend(b"K\x05tQK\x01(K\x02t(K\x02t\x89h\x00)Rtr\x06\x00\x00\x00R\x88h\x00)RtR");
    k.extend(b"u}(");
    s(&mut k, "_metadata");
    k.extend(b"h\x00)R(");
    s(&mut k, "");
    k.extend(b"}(");
    s(&mut k, "version");
    k.extend(b"K\x01uuub.");
    let b0: Vec<u8> = storage0.iter().flat_map(|x| x.to_le_bytes()).collect();
    let b1: Vec<u8> = storage1.iter().flat_map(|x| x.to_le_bytes()).collect();
    zip_of(&[
        ("model/data.pkl", &k, false),
        ("model/byteorder", b"little", false),
        ("model/data/0", &b0, true),
        ("model/data/1", &b1, false),
        ("model/version", b"3\n", false),
    ])
}

#[test]
fn pth_torch_layout_memo_views_and_parameters() {
    let mut rng = rwkv_tune::rng::Rng::new(9);
    let s0: Vec<f32> = (0..12).map(|_| rng.normal() as f32).collect();
    let s1: Vec<half::f16> = (0..5)
        .map(|_| half::f16::from_f32(rng.normal() as f32))
        .collect();
    let got = read_pth(&torch_like(&s0, &s1, 12), Path::new("t.pth")).unwrap();
    let names: Vec<&str> = got.iter().map(|t| t.0.name.as_str()).collect();
    assert_eq!(names, ["a", "b.t", "c"]);
    assert_eq!(got[0].0.shape, [3, 4]);
    assert_eq!(got[0].0.data, s0);
    assert_eq!(got[0].1, StorageDType::F32);
    assert_eq!(got[1].0.shape, [4, 3]);
    let bt: Vec<f32> = (0..4)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| s0[j * 4 + i])
        .collect();
    assert_eq!(got[1].0.data, bt);
    assert_eq!(got[2].0.data, [s1[1].to_f32(), s1[3].to_f32()]);
    assert_eq!(got[2].1, StorageDType::F16);
    // The storage is shorter than its persistent id claims.
    let e = read_pth(&torch_like(&s0[..10], &s1, 12), Path::new("t.pth")).unwrap_err();
    assert!(matches!(e, Error::PyTorch { .. }));
    assert!(
        e.to_string()
            .contains("holds 40 bytes but the pickle says 48"),
        "{e}"
    );
    // ... or claims fewer elements than the [3,4] view needs.
    let e = read_pth(&torch_like(&s0[..10], &s1, 10), Path::new("t.pth")).unwrap_err();
    assert!(e.to_string().contains("views a storage of 10"), "{e}");
}

/// A one-tensor pickle with custom pieces, zipped with a storage of `len` f32.
fn one_tensor(global: &[u8], pid_numel: &[u8], size: &[u8], len: usize) -> Vec<u8> {
    let mut k = vec![0x80, 2, b'}', b'('];
    s(&mut k, "x");
    k.extend(global);
    k.extend(b"((");
    s(&mut k, "storage");
    k.extend(b"ctorch\nFloatStorage\n");
    s(&mut k, "0");
    s(&mut k, "cpu");
    k.extend(pid_numel);
    k.extend(b"tQK\x00");
    k.extend(size);
    k.extend(b"\x89ccollections\nOrderedDict\n)RtRu.");
    let data = vec![0u8; len * 4];
    zip_of(&[("a/data.pkl", &k, false), ("a/data/0", &data, false)])
}

#[test]
fn pth_refuses_malicious_and_odd_files() {
    let rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n";
    let ok = one_tensor(rebuild, b"K\x04", b"(K\x04t(K\x01t", 4);
    assert_eq!(read_pth(&ok, p()).unwrap()[0].0.data, [0.0; 4]);
    let check = |bytes: &[u8], want: &str| {
        let e = read_pth(bytes, Path::new("evil.pth")).unwrap_err();
        assert!(matches!(e, Error::PyTorch { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(want), "want `{want}` in: {msg}");
        assert!(msg.contains("evil.pth"), "{msg}");
    };
    // an unknown global (what a code-execution payload names)
    check(
        &one_tensor(b"cos\nsystem\n", b"K\x04", b"(K\x04t(K\x01t", 4),
        "`os.system`",
    );
    check(
        &one_tensor(b"cbuiltins\neval\n", b"K\x04", b"(K\x04t(K\x01t", 4),
        "`builtins.eval`",
    );
    // REDUCE of a whitelisted name that is not a callable here
    check(
        &one_tensor(b"ctorch\nFloatStorage\n", b"K\x04", b"(K\x04t(K\x01t", 4),
        "REDUCE of Storage",
    );
    // truncated zip
    check(&ok[..ok.len() / 2], "zip cannot be read");
    check(&ok[..ok.len() - 10], "zip cannot be read");
    // storage smaller than the shape
    check(
        &one_tensor(rebuild, b"K\x04", b"(K\x05t(K\x01t", 4),
        "views a storage of 4",
    );
    // a view reaching past its storage (stride)
    check(
        &one_tensor(rebuild, b"K\x04", b"(K\x02t(K\x04t", 4),
        "reaches past its storage",
    );
    // huge claimed storage (2^60 elements) and huge shapes: refused by size checks
    check(
        &one_tensor(rebuild, b"\x8a\x08\0\0\0\0\0\0\0\x40", b"(K\x04t(K\x01t", 4),
        "storage `0` size overflows",
    );
    check(
        &one_tensor(rebuild, b"\x8a\x08\0\0\0\0\0\0\x10\0", b"(K\x04t(K\x01t", 4),
        "holds 16 bytes but the pickle says",
    );
    check(
        &one_tensor(
            rebuild,
            b"K\x04",
            b"(\x8a\x05\0\0\0\0\x01\x8a\x05\0\0\0\0\x01t(K\x01K\x01t",
            4,
        ),
        "overflows",
    );
    // an unknown opcode (NEWOBJ) and a non-dict root
    let mut k = vec![0x80, 2, 0x81, b'.'];
    check(&zip_of(&[("a/data.pkl", &k, false)]), "opcode 0x81");
    k = vec![0x80, 2, b'K', 1, b'.'];
    check(&zip_of(&[("a/data.pkl", &k, false)]), "holds a int");
    // 2M levels of nested 1-tuples (one byte each): no stack overflow
    let mut k = vec![0x80, 2, b'K', 0];
    k.extend(std::iter::repeat_n(0x85u8, 2_000_000));
    k.push(b'.');
    check(&zip_of(&[("a/data.pkl", &k, false)]), "holds a tuple");
    // a central directory that claims a ~4 GiB storage entry in a tiny file
    let mut lying = one_tensor(rebuild, b"K\x04", b"(K\x04t(K\x01t", 4);
    let cd = lying
        .windows(4)
        .rposition(|w| w == b"PK\x01\x02")
        .expect("central directory entry");
    for off in [20, 24] {
        lying[cd + off..cd + off + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    }
    check(&lying, "evil.pth");
    // a zip that is not a torch checkpoint
    check(
        &zip_of(&[("readme.txt", b"hi", false)]),
        "without `<name>/data.pkl`",
    );
    // legacy (pre-1.6) torch files are named as such
    let legacy = [
        0x80u8, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0,
    ];
    let e = Weights::from_bytes(&legacy, Path::new("old.pth")).unwrap_err();
    assert!(e.to_string().contains("before PyTorch 1.6"), "{e}");
}

#[test]
fn pth_peft_states_load_like_safetensors() {
    let cfg = small();
    let (h, n) = (cfg.n_head, cfg.head_size);
    let mut rng = rwkv_tune::rng::Rng::new(4);
    let ts: Vec<F32Tensor> = (0..cfg.n_layer)
        .map(|l| F32Tensor {
            name: format!("blocks.{l}.att.time_state"),
            shape: vec![h, n, n],
            data: (0..h * n * n).map(|_| rng.normal() as f32).collect(),
        })
        .collect();
    for dt in [StoreDType::F32, StoreDType::BF16] {
        let st = write_f32_tensors(&ts, dt, None).unwrap();
        let want = State::from_safetensors_bytes(&st, p(), &cfg).unwrap();
        let pth = write_pth(&ts, dt).unwrap();
        let got = State::from_bytes(&pth, Path::new("s.pth"), &cfg).unwrap();
        assert_eq!(got, want);
        // with a leading batch dimension of 1, as some RWKV-PEFT versions save
        let ts4: Vec<F32Tensor> = ts
            .iter()
            .map(|t| F32Tensor {
                shape: vec![1, h, n, n],
                ..t.clone()
            })
            .collect();
        let got4 =
            State::from_bytes(&write_pth(&ts4, dt).unwrap(), Path::new("s.pth"), &cfg).unwrap();
        assert_eq!(got4, want);
    }
}

#[test]
fn convert_round_trips_bit_identical() {
    use rwkv_tune::convert::{convert, Target};
    let dir = std::env::temp_dir().join(format!("rwkv-tune-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = Weights::random(&small(), 8).unwrap();
    for dt in [StoreDType::F32, StoreDType::F16, StoreDType::BF16] {
        let a = dir.join("a.safetensors");
        w.save(&a, Naming::Official, dt).unwrap();
        let (b, c) = (dir.join("b.pth"), dir.join("c.safetensors"));
        let r = convert(&a, &b, None, None, false).unwrap();
        assert_eq!((r.to, r.dtype, r.is_state), (Target::Pth, dt, false));
        convert(&b, &c, None, None, false).unwrap();
        let ra = std::fs::read(&a).unwrap();
        let rc = std::fs::read(&c).unwrap();
        assert_eq!(
            bits(&read_tensors(&ra, &a).unwrap()),
            bits(&read_tensors(&rc, &c).unwrap())
        );
        assert_eq!(
            bits(&read_tensors(&ra, &a).unwrap()),
            bits(&read_tensors(&std::fs::read(&b).unwrap(), &b).unwrap())
        );
    }
    // a state with a leading 1 → RWKV-PEFT layout [H,N,N] .pth, and back
    let cfg = small();
    let mut st = State::zeros(&cfg);
    let mut rng = rwkv_tune::rng::Rng::new(2);
    for l in &mut st.layers {
        l.wkv.iter_mut().for_each(|x| *x = rng.normal() as f32);
    }
    let ts: Vec<F32Tensor> = st
        .time_state_tensors(&cfg)
        .into_iter()
        .map(|mut t| {
            t.shape.insert(0, 1);
            t
        })
        .collect();
    let s_in = dir.join("s.safetensors");
    std::fs::write(
        &s_in,
        write_f32_tensors(&ts, StoreDType::F32, None).unwrap(),
    )
    .unwrap();
    let s_peft = dir.join("s.peft");
    let r = convert(&s_in, &s_peft, Some(Target::Peft), None, false).unwrap();
    assert!(r.is_state);
    let got = read_pth(&std::fs::read(&s_peft).unwrap(), &s_peft).unwrap();
    assert!(got
        .iter()
        .all(|t| t.0.shape == [cfg.n_head, cfg.head_size, cfg.head_size]));
    assert_eq!(State::load(&s_peft, &cfg).unwrap(), st);
    // --transpose-state: S[h][i][j] becomes S[h][j][i]; twice is the identity
    let (s_t, s_tt) = (dir.join("t.pth"), dir.join("tt.safetensors"));
    convert(&s_peft, &s_t, None, None, true).unwrap();
    convert(&s_t, &s_tt, None, None, true).unwrap();
    let t = State::load(&s_t, &cfg).unwrap();
    let n = cfg.head_size;
    for (a, b) in t.layers.iter().zip(&st.layers) {
        for h in 0..cfg.n_head {
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(a.wkv[h * n * n + i * n + j], b.wkv[h * n * n + j * n + i]);
                }
            }
        }
    }
    assert_ne!(t, st);
    assert_eq!(State::load(&s_tt, &cfg).unwrap(), st);
    // a model is not a state
    let m = dir.join("a.safetensors");
    let e = convert(&m, &dir.join("x.pth"), Some(Target::Peft), None, false).unwrap_err();
    assert!(e.to_string().contains("needs a state file"), "{e}");
    // unknown extension without --to
    let e = convert(&m, &dir.join("x.bin"), None, None, false).unwrap_err();
    assert!(e.to_string().contains("--to"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tiny_fixture_through_pth_equals_safetensors() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rwkv7-tiny-834k/rwkv7-tiny-834k.safetensors");
    if !path.is_file() {
        eprintln!("SKIP: {} not found", path.display());
        return;
    }
    let bytes = std::fs::read(&path).unwrap();
    let typed = read_tensors_typed(&bytes, &path).unwrap();
    let dt = typed[0].1.unwrap();
    let ts: Vec<F32Tensor> = typed.into_iter().map(|t| t.0).collect();
    let pth = write_pth(&ts, dt).unwrap();
    let from_pth = Weights::from_bytes(&pth, Path::new("tiny.pth")).unwrap();
    let from_st = Weights::load(&path).unwrap();
    assert_eq!(logits_tiny(from_pth), logits_tiny(from_st));
}
