//! The fuzzer that stays (issue 11): for every parser — the model loader
//! (safetensors and `.pth`), the state loader, the upscale sidecar loader,
//! the checkpoint loader, the data readers and the `wkv7` input reader —
//! valid seed files are mutated (bit flips, truncations, header edits with
//! huge dimensions, stray layer indices, duplicate names, huge metadata
//! numbers, NaN / Inf bytes) and parsed, asserting that nothing panics
//! (`catch_unwind`) and that no input makes the parser allocate more than
//! a bound proportional to the input (a counting global allocator tracks the
//! peak; a single request beyond 1 GiB is refused, which aborts the run).
//! A corpus of the issue's reproducers runs first in each target and must
//! be refused with an error.
//!
//! Time-bounded: `RWKV_TUNE_FUZZ_SECS` seconds in total (default 30, split
//! over the targets), so CI stays short and a longer run is one variable
//! away (`RWKV_TUNE_FUZZ_SECS=600 cargo test --release --test fuzz`).
//! `RWKV_TUNE_FUZZ_SEED` changes the mutation stream; a failure names the
//! seed and iteration, and writes the input to the temporary directory.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rwkv_tune::model::load::{write_f32_tensors, write_pth, F32Tensor};
use rwkv_tune::model::{Config, Model, Naming, State, StoreDType, Weights};
use rwkv_tune::rng::Rng;
use rwkv_tune::tune::checkpoint::Checkpoint;
use rwkv_tune::tune::data::{self, ByteTokenizer, LoaderPos};
use rwkv_tune::tune::grad::TunedState;
use rwkv_tune::tune::upscale::{self, Kernel, UpscaledStateOf};

// ---------------------------------------------------------------- allocator

/// Counts live heap bytes and their peak; refuses (null) any single request
/// above [`CAP`].
struct Counting;

static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
const CAP: usize = 1 << 30;

fn grew(n: usize) {
    let c = CUR.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(c, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged (so `System`'s guarantees hold), and only updates counters
// besides; a request above CAP gets null, which GlobalAlloc allows.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: `l` comes from the caller, who upholds `alloc`'s contract.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by this allocator (hence by `System`)
        // with layout `l`, as the caller guarantees.
        unsafe { System.dealloc(p, l) };
        CUR.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: `p` / `l` describe a live block of `System`'s (caller's
        // contract); `new` is non-zero and fits isize (caller's contract).
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            grew(new);
            CUR.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One target at a time, so the peak belongs to the case that made it.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------- driver

fn total_secs() -> f64 {
    std::env::var("RWKV_TUNE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0)
}

const TARGETS: f64 = 6.0;

fn base_seed() -> u64 {
    std::env::var("RWKV_TUNE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x11_2026)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rwkv-tune-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `parse` on one input: no panic, and the heap's peak during the call
/// stays under `64 × len + 64 MiB`. Returns whether the parse succeeded.
fn one(target: &str, case: &str, input: &[u8], parse: &dyn Fn(&[u8]) -> bool) -> bool {
    let base = CUR.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(input)));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let bound = 64 * input.len() + (64 << 20);
    let fail = |why: String| -> ! {
        let p = std::env::temp_dir().join(format!("rwkv-tune-fuzz-failure-{target}.bin"));
        let _ = std::fs::write(&p, input);
        panic!(
            "{target} {case}: {why} (input of {} bytes saved to {}; seed {:#x})",
            input.len(),
            p.display(),
            base_seed()
        );
    };
    match r {
        Err(_) => fail("the parser panicked".into()),
        Ok(_) if peak > bound => fail(format!(
            "peak heap {} bytes for an input of {} bytes (bound {bound})",
            peak,
            input.len()
        )),
        Ok(ok) => ok,
    }
}

/// The safetensors header of `b` as JSON and the data after it.
fn split_st(b: &[u8]) -> Option<(serde_json::Map<String, serde_json::Value>, &[u8])> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let h = b.get(8..8usize.checked_add(n)?)?;
    let v: serde_json::Value = serde_json::from_slice(h).ok()?;
    Some((v.as_object()?.clone(), &b[8 + n..]))
}

fn join_st(h: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let mut j = serde_json::to_vec(h).unwrap();
    while j.len() % 8 != 0 {
        j.push(b' ');
    }
    let mut out = (j.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&j);
    out.extend_from_slice(data);
    out
}

const HUGE: [u64; 6] = [
    1 << 20,
    1 << 32,
    1 << 40,
    u32::MAX as u64,
    i64::MAX as u64,
    u64::MAX,
];

/// One structured edit of a safetensors header (None when `b` is not one).
fn edit_header(b: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let (mut h, data) = split_st(b)?;
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return None;
    }
    let name = names[rng.below(names.len() as u64) as usize].clone();
    let pick = |rng: &mut Rng| HUGE[rng.below(HUGE.len() as u64) as usize];
    match rng.below(8) {
        // a huge dimension
        0 => {
            let t = h.get_mut(&name)?.as_object_mut()?;
            let shape = t.get_mut("shape")?.as_array_mut()?;
            if !shape.is_empty() {
                let i = rng.below(shape.len() as u64) as usize;
                shape[i] = pick(rng).into();
            }
        }
        // a stray layer index or a duplicate spelling of a name
        1 | 2 => {
            let t = h.get(&name)?.clone();
            let new = match (rng.below(3), name.strip_prefix("blocks.")) {
                (0, _) => format!("blocks.1000000.{}", name.rsplit('.').next()?),
                (1, Some(rest)) => format!("blocks.0{rest}"),
                _ => format!("{name}.dup"),
            };
            h.insert(new, t);
        }
        // another dtype
        3 => {
            let t = h.get_mut(&name)?.as_object_mut()?;
            let d = ["F16", "BF16", "F64", "I64", "U8", "BOOL"][rng.below(6) as usize];
            t.insert("dtype".into(), d.into());
        }
        // data offsets moved
        4 => {
            let t = h.get_mut(&name)?.as_object_mut()?;
            let o = t.get_mut("data_offsets")?.as_array_mut()?;
            let i = rng.below(2) as usize;
            o[i] = if rng.below(2) == 0 {
                pick(rng).into()
            } else {
                (o[i].as_u64()? / 2).into()
            };
        }
        // a huge or odd metadata number
        5 | 6 => {
            let m = h
                .entry("__metadata__")
                .or_insert_with(|| serde_json::json!({}))
                .as_object_mut()?;
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = if keys.is_empty() || rng.below(4) == 0 {
                ["n_params", "step", "upscale_m", "n_layer", "pos", "epoch"][rng.below(6) as usize]
                    .to_string()
            } else {
                keys[rng.below(keys.len() as u64) as usize].clone()
            };
            let val = match rng.below(4) {
                0 => pick(rng).to_string(),
                1 => "-1".into(),
                2 => "NaN".into(),
                _ => String::new(),
            };
            m.insert(key, val.into());
        }
        // a tensor removed
        _ => {
            h.remove(&name);
        }
    }
    Some(join_st(&h, data))
}

/// One random mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    let header_end = split_st(seed)
        .map(|(_, d)| seed.len() - d.len())
        .unwrap_or(seed.len().min(512));
    match rng.below(6) {
        0 => {
            // bit flips, mostly in the header
            for _ in 0..1 + rng.below(8) {
                if b.is_empty() {
                    break;
                }
                let lim = if rng.below(4) == 0 {
                    b.len()
                } else {
                    header_end.max(1)
                };
                let i = rng.below(lim as u64) as usize;
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let n = rng.below(b.len() as u64 + 1) as usize;
            b.truncate(n);
        }
        2 => {
            // NaN / Inf bytes in the data
            let pats: [[u8; 4]; 3] = [
                f32::NAN.to_le_bytes(),
                f32::INFINITY.to_le_bytes(),
                f32::NEG_INFINITY.to_le_bytes(),
            ];
            for _ in 0..1 + rng.below(4) {
                if b.len() <= header_end + 4 {
                    break;
                }
                let span = (b.len() - header_end - 4) as u64;
                let i = header_end + (rng.below(span / 4 + 1) as usize) * 4;
                let i = i.min(b.len() - 4);
                b[i..i + 4].copy_from_slice(&pats[rng.below(3) as usize]);
            }
        }
        3 | 4 => {
            if let Some(e) = edit_header(&b, rng) {
                b = e;
            }
        }
        _ => {
            // random bytes spliced in
            let at = rng.below(b.len() as u64 + 1) as usize;
            let junk: Vec<u8> = (0..1 + rng.below(16))
                .map(|_| rng.below(256) as u8)
                .collect();
            b.splice(at..at, junk);
        }
    }
    b
}

/// Runs the corpus (each must be refused), then mutations of the seeds
/// until the target's time is up.
fn fuzz(
    target: &str,
    seeds: &[Vec<u8>],
    corpus: &[(&str, Vec<u8>)],
    parse: &dyn Fn(&[u8]) -> bool,
) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for s in seeds {
        assert!(
            one(target, "seed", s, parse),
            "{target}: a seed was refused"
        );
    }
    for (name, input) in corpus {
        assert!(
            !one(target, name, input, parse),
            "{target}: corpus case `{name}` was accepted"
        );
    }
    let budget = Duration::from_secs_f64(total_secs() / TARGETS);
    let t0 = Instant::now();
    let mut rng = Rng::new(base_seed() ^ target.len() as u64 ^ (target.as_bytes()[0] as u64) << 8);
    let (mut n, mut accepted) = (0u64, 0u64);
    while t0.elapsed() < budget || n < 50 {
        let s = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut input = mutate(s, &mut rng);
        if rng.below(3) == 0 {
            input = mutate(&input, &mut rng);
        }
        if one(target, &format!("iteration {n}"), &input, parse) {
            accepted += 1;
        }
        n += 1;
    }
    println!(
        "fuzz {target}: {n} inputs in {:.1} s ({accepted} parsed, the rest refused cleanly)",
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- seeds

fn cfg() -> Config {
    Config::with_defaults(2, 64, 32, 50)
}

fn weights() -> Weights {
    Weights::random(&cfg(), 7).unwrap()
}

fn st_bytes(t: &[F32Tensor], meta: &[(&str, &str)]) -> Vec<u8> {
    let m = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    write_f32_tensors(t, StoreDType::F32, Some(m)).unwrap()
}

fn random_state(seed: u64) -> State {
    let c = cfg();
    let mut st = State::zeros(&c);
    let mut rng = Rng::new(seed);
    for l in &mut st.layers {
        l.wkv = rng.normal_vec(l.wkv.len(), 0.3);
    }
    st
}

#[test]
fn fuzz_model_loader() {
    let w = weights();
    let off = w.named_tensors(Naming::Official);
    let seeds = vec![
        w.to_safetensors_bytes(Naming::Official, StoreDType::F32)
            .unwrap(),
        w.to_safetensors_bytes(Naming::Fla, StoreDType::BF16)
            .unwrap(),
        write_pth(&off, StoreDType::F16).unwrap(),
    ];
    // the issue's reproducers: a stray layer index (3.6 GB before the fix),
    // NaN weights, a duplicate spelling of a layer
    let mut stray = off.clone();
    stray.push(F32Tensor {
        name: "blocks.1000000.att.a0".into(),
        shape: vec![1, 1, 64],
        data: vec![0.1; 64],
    });
    let mut nan = off.clone();
    nan[3].data[1] = f32::NAN;
    let mut dup = off.clone();
    let mut d = off
        .iter()
        .find(|t| t.name == "blocks.1.att.k_k")
        .unwrap()
        .clone();
    d.name = "blocks.01.att.k_k".into();
    dup.push(d);
    let corpus = vec![
        ("stray layer 1000000", st_bytes(&stray, &[])),
        ("NaN weight", st_bytes(&nan, &[])),
        ("duplicate layer spelling", st_bytes(&dup, &[])),
        ("empty", Vec::new()),
        ("/dev/zero-like", vec![0u8; 4096]),
    ];
    fuzz(
        "model",
        &seeds,
        &corpus,
        &|b| match Weights::from_bytes(b, Path::new("fuzz.safetensors")) {
            Ok(w) => Model::new(w).is_ok(),
            Err(_) => false,
        },
    );
}

#[test]
fn fuzz_state_loader() {
    let c = cfg();
    let st = random_state(3);
    let t = st.time_state_tensors(&c);
    let seeds = vec![
        st.to_safetensors_bytes(&c, StoreDType::F32).unwrap(),
        write_pth(&t, StoreDType::BF16).unwrap(),
    ];
    let mut dup = t.clone();
    let mut d = t[0].clone();
    d.name = "blocks.00.att.time_state".into();
    dup.push(d);
    let mut nan = t.clone();
    nan[1].data[0] = f32::INFINITY;
    let mut far = t.clone();
    far[1].name = "blocks.1000000.att.time_state".into();
    let corpus = vec![
        ("blocks.0 and blocks.00", st_bytes(&dup, &[])),
        ("Inf in a state", st_bytes(&nan, &[])),
        ("layer 1000000", st_bytes(&far, &[])),
    ];
    fuzz("state", &seeds, &corpus, &|b| {
        State::from_bytes(b, Path::new("fuzz-state.safetensors"), &c).is_ok()
    });
}

fn sidecar_parts() -> (Kernel, UpscaledStateOf<f32>, TunedState) {
    let c = cfg();
    let m = 3;
    let (h, n) = (c.n_head, c.head_size);
    let mut rng = Rng::new(5);
    let centres = (0..c.n_layer)
        .map(|_| (0..h * m * n).map(|_| rng.normal()).collect())
        .collect();
    let gamma = (0..c.n_layer)
        .map(|_| (0..h).map(|_| rng.range(0.1, 1.0)).collect())
        .collect();
    let k = Kernel::from_parts(&c, m, centres, gamma).unwrap();
    let st = rwkv_tune::tune::state::from_model_state(&c, &random_state(4), false).unwrap();
    let u = (0..c.n_layer)
        .map(|_| rng.normal_vec(h * n * m, 0.2))
        .collect();
    let s = UpscaledStateOf {
        state: st.clone(),
        u,
    };
    (k, s, st)
}

#[test]
fn fuzz_sidecar_loader() {
    let c = cfg();
    let (k, s, st) = sidecar_parts();
    let seed = upscale::sidecar_to_bytes(&c, &k, &s).unwrap();
    let mut corpus = Vec::new();
    if let Some((mut h, data)) = split_st(&seed) {
        h["__metadata__"]["upscale_m"] = "18446744073709551615".into();
        corpus.push(("upscale_m = u64::MAX", join_st(&h, data)));
        h["__metadata__"]["upscale_m"] = "3".into();
        h["__metadata__"]["n_layer"] = "1000000".into();
        corpus.push(("n_layer = 1000000", join_st(&h, data)));
    }
    fuzz("sidecar", &[seed], &corpus, &|b| {
        upscale::sidecar_from_bytes(b, Path::new("fuzz.upscale.safetensors"), &c, st.clone())
            .is_ok()
    });
}

fn checkpoint() -> Checkpoint {
    let mut rng = Rng::new(8);
    let params: Vec<Vec<f32>> = (0..3).map(|_| rng.normal_vec(64, 0.5)).collect();
    Checkpoint {
        step: 5,
        adam_m: params
            .iter()
            .map(|p| p.iter().map(|x| x * 0.1).collect())
            .collect(),
        adam_v: params
            .iter()
            .map(|p| p.iter().map(|x| x * x).collect())
            .collect(),
        params,
        adam_t: 5,
        loader: LoaderPos { epoch: 1, pos: 3 },
        history: vec![3.0, 2.5, 2.0, 1.5, 1.2],
        fingerprint: "model=…; weights=0123456789abcdef".into(),
        dbp_r: Some((0..32).map(|i| i as f64 * 0.01).collect()),
    }
}

#[test]
fn fuzz_checkpoint_loader() {
    let ck = checkpoint();
    let p = Path::new("fuzz.ckpt");
    let seed = ck.to_bytes(p).unwrap();
    let mut corpus = Vec::new();
    if let Some((mut h, data)) = split_st(&seed) {
        for v in ["18446744073709551615", "1000000000000"] {
            h["__metadata__"]["n_params"] = v.into();
            corpus.push(("n_params huge", join_st(&h, data)));
        }
        h["__metadata__"]["n_params"] = "3".into();
        h["__metadata__"]["step"] = "1000".into();
        corpus.push(("step without its history", join_st(&h, data)));
    }
    let mut nan = ck.clone();
    nan.params[1][2] = f32::NAN;
    corpus.push(("NaN parameter", nan.to_bytes(p).unwrap()));
    fuzz("checkpoint", &[seed], &corpus, &|b| {
        Checkpoint::from_bytes(b, p).is_ok()
    });
}

#[test]
fn fuzz_data_readers() {
    let dir = scratch("data");
    let mut rng = Rng::new(2);
    let mut jsonl = String::new();
    for i in 0..12 {
        let (p, r) = rwkv_tune::tune::demo::synthetic_pair(&mut rng);
        let line = if i % 3 == 0 {
            serde_json::json!({ "text": format!("{p}{r}") })
        } else {
            serde_json::json!({ "prompt": p, "response": r })
        };
        jsonl += &line.to_string();
        jsonl.push('\n');
    }
    let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n";
    let seeds = vec![jsonl.into_bytes(), text.as_bytes().to_vec()];
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("empty JSONL", Vec::new()),
        ("whitespace only JSONL", b"\n   \n\t\n".to_vec()),
        ("not an object", b"[1,2,3]\n".to_vec()),
    ];
    let n = AtomicUsize::new(0);
    fuzz("data", &seeds, &corpus, &|b| {
        // the extension decides JSONL for the corpus; mutations try both
        let i = n.fetch_add(1, Ordering::Relaxed);
        let ext = if i < seeds.len() + corpus.len() || i % 2 == 0 {
            if b.first() == Some(&b'T') {
                "txt"
            } else {
                "jsonl"
            }
        } else {
            "txt"
        };
        let p = dir.join(format!("d.{ext}"));
        std::fs::write(&p, b).unwrap();
        let Ok(recs) = data::read_records(&p, &ByteTokenizer) else {
            return false;
        };
        let ctx = 1 + (i % 40);
        let frac = [0.0, 0.1, 0.5, 2.0, -1.0, f64::NAN][i % 6];
        let (tr, va) = data::split_records(recs, frac, i as u64);
        let Ok(ds) = data::Dataset::from_records(&tr, ctx) else {
            return false;
        };
        let _ = data::Dataset::from_records(&va, ctx);
        if !ds.examples.is_empty() {
            let mut l = data::Loader::new(ds.examples.len(), 3);
            for _ in 0..3 {
                let idx = l.next_batch(4);
                let refs: Vec<_> = idx.iter().map(|&j| &ds.examples[j]).collect();
                let _ = data::pad_batch(&refs);
            }
        }
        !ds.examples.is_empty()
    });
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fuzz_wkv7_input_reader() {
    use rwkv_tune::wkv7::{Backend, Dims, Inputs, Version};
    let dir = scratch("wkv7");
    let (b, t, h, n) = (1usize, 4usize, 1usize, 32usize);
    let mut rng = Rng::new(6);
    let mut m = std::collections::BTreeMap::new();
    for name in ["r", "k", "v", "a", "b", "w", "h0"] {
        let (shape, lo, hi) = match name {
            "w" => (vec![b, t, h, n], 0.6, 0.99),
            "h0" => (vec![b, h, n, n], -0.1, 0.1),
            _ => (vec![b, t, h, n], -0.5, 0.5),
        };
        let len: usize = shape.iter().product();
        let data = (0..len).map(|_| rng.range(lo, hi) as f32).collect();
        m.insert(
            name.to_string(),
            rwkv_tune::tensors::F32Tensor { shape, data },
        );
    }
    let sp = dir.join("seed.safetensors");
    rwkv_tune::tensors::write_f32(&sp, &m).unwrap();
    let seed = std::fs::read(&sp).unwrap();
    let p = dir.join("in.safetensors");
    fuzz("wkv7", &[seed], &[("empty", Vec::new())], &|bytes| {
        std::fs::write(&p, bytes).unwrap();
        let Ok(t) = rwkv_tune::tensors::read_f32(&p) else {
            return false;
        };
        let Some(r) = t.get("r") else { return false };
        let [b, tt, h, n] = r.shape[..] else {
            return false;
        };
        let d = Dims { b, t: tt, h, n };
        if d.validate().is_err() {
            return false;
        }
        let get = |k: &str| t.get(k).map(|x| x.data.as_slice()).unwrap_or(&[]);
        // the library checks every length against the dims
        let inp = Inputs {
            r: get("r"),
            w: get("w"),
            k: get("k"),
            v: get("v"),
            a: get("a"),
            b: get("b"),
            h0: t.get("h0").map(|x| x.data.as_slice()),
        };
        if b * tt * h * n > 1 << 16 {
            return true;
        }
        Backend::Cpu.forward_v(Version::V1, &d, &inp).is_ok()
    });
    std::fs::remove_dir_all(&dir).ok();
}
