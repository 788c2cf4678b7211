//! `rwkv-tune wkv7`: run the WKV-7 op on tensors from a safetensors file, so
//! users can cross-check the kernels against their own pipelines.
use anyhow::{bail, Context, Result};
use rwkv_tune::tensors::{read_f32, write_f32, F32Tensor};
use rwkv_tune::wkv7::{Backend, Dims, GradInputs, Inputs, Version};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Run the WKV-7 recurrence (forward, and backward when `dy` is given).
///
/// Input tensors (f32, f16 or bf16; computed in `--dtype`):
///   r, w, k, v, a, b  [B, T, H, N]   (w = decay in (0, 1])
///   h0                [B, H, N, N]   optional initial state, value-major
///   dy                [B, T, H, N]   optional: run the backward
///   dhT               [B, H, N, N]   optional gradient of the final state
/// Output tensors (f32): y [B,T,H,N], hT [B,H,N,N]; with dy also
/// dr, dw, dk, dv, da, db [B,T,H,N] and dh0 [B,H,N,N].
///
/// Recurrence per (b, h): S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,
/// y_t = S_t r_t, with S[i][j] = row i (value), column j (key).
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Wkv7Args {
    /// safetensors file with r, w, k, v, a, b (and optionally h0, dy, dhT)
    #[arg(long)]
    input: PathBuf,
    /// where to write the results (safetensors, f32)
    #[arg(long)]
    output: PathBuf,
    /// cpu: Rust reference; emu: the CUDA kernels run on the CPU; cuda: a GPU
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "emu", "cuda"])]
    backend: String,
    /// I/O precision inside the kernels (state and accumulation are always f32)
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// kernel version on the emu / cuda backends: v1 (FMA, any decay), v2
    /// (tensor cores), v3 (tensor cores, bf16 I/O, split only on the state
    /// path) or v3x (v3 with every operand split); v3 and v3x need --dtype
    /// bf16 (with f32 they run v2); v2, v3 and v3x fall back to v1 for other
    /// head sizes than 32/64 or decays < 0.5
    #[arg(long, default_value = "v1", value_parser = ["v1", "v2", "v3", "v3x"])]
    kernel: String,
}

fn take<'a>(t: &'a BTreeMap<String, F32Tensor>, name: &str, shape: &[usize]) -> Result<&'a [f32]> {
    let x = t
        .get(name)
        .with_context(|| format!("input is missing tensor `{name}` (expected shape {shape:?})"))?;
    if x.shape != shape {
        bail!(
            "tensor `{name}` has shape {:?}, expected {shape:?}",
            x.shape
        );
    }
    Ok(&x.data)
}

fn opt<'a>(
    t: &'a BTreeMap<String, F32Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<Option<&'a [f32]>> {
    if t.contains_key(name) {
        take(t, name, shape).map(Some)
    } else {
        Ok(None)
    }
}

pub fn run(a: Wkv7Args) -> Result<()> {
    rwkv_tune::guard::check_outputs(
        &[("--input", a.input.as_path())],
        &[("--output", a.output.as_path())],
    )?;
    let t = read_f32(&a.input)?;
    let r = t
        .get("r")
        .with_context(|| "input is missing tensor `r` (expected shape [B, T, H, N])")?;
    let [b, tt, h, n] = r.shape[..] else {
        bail!(
            "tensor `r` has shape {:?}, expected 4 dimensions [B, T, H, N]",
            r.shape
        );
    };
    let d = Dims { b, t: tt, h, n };
    d.validate()?;
    let (s, st) = (d.seq_shape(), d.state_shape());
    let (r, w, k, v, aa, bb) = (
        take(&t, "r", &s)?,
        take(&t, "w", &s)?,
        take(&t, "k", &s)?,
        take(&t, "v", &s)?,
        take(&t, "a", &s)?,
        take(&t, "b", &s)?,
    );
    let h0 = opt(&t, "h0", &st)?;
    let dy = opt(&t, "dy", &s)?;
    let dht = opt(&t, "dhT", &st)?;
    if dht.is_some() && dy.is_none() {
        bail!(
            "the input has `dhT` but no `dy`: the backward runs only with `dy` (add a zero \
             `dy` of shape {s:?} to back-propagate dhT alone)"
        );
    }
    for (name, x) in [("r", r), ("w", w), ("k", k), ("v", v), ("a", aa), ("b", bb)]
        .into_iter()
        .chain(h0.map(|x| ("h0", x)))
        .chain(dy.map(|x| ("dy", x)))
        .chain(dht.map(|x| ("dhT", x)))
    {
        rwkv_tune::guard::check_finite(&format!("input tensor `{name}`"), x)?;
    }
    // (NaN / Inf decays were refused above, or let through on purpose.)
    if let Some(i) = w
        .iter()
        .position(|&x| x.is_finite() && !(x > 0.0 && x <= 1.0))
    {
        bail!(
            "`w` (the decay) must be in (0, 1]; element {i} is {} (the recurrence is unstable \
             above 1)",
            w[i]
        );
    }
    let known = ["r", "w", "k", "v", "a", "b", "h0", "dy", "dhT"];
    for name in t.keys() {
        if !known.contains(&name.as_str()) {
            eprintln!("note: ignoring tensor `{name}` (not one of {known:?})");
        }
    }
    let backend = Backend::from_name(&a.backend)?;
    let mut out = BTreeMap::new();
    let mut put = |name: &str, shape: &[usize], data: Vec<f32>| {
        out.insert(
            name.to_string(),
            F32Tensor {
                shape: shape.to_vec(),
                data,
            },
        );
    };
    let ver = Version::parse(&a.kernel)?;
    let x = [r, w, k, v, aa, bb];
    let ran = match a.dtype.as_str() {
        "f32" => run_typed::<f32>(&backend, ver, &d, x, h0, dy, dht, &mut put)?,
        _ => run_typed::<half::bf16>(&backend, ver, &d, x, h0, dy, dht, &mut put)?,
    };
    write_f32(&a.output, &out)?;
    eprintln!(
        "wkv7: B={b} T={tt} H={h} N={n} backend={} kernel={}{} dtype={} {} -> {}",
        backend.name(),
        a.kernel,
        match ran {
            // the cpu backend has no kernel versions
            Some(v) if v != ver => format!(" (ran {}: {})", v.name(), fallback_reason(ver, v)),
            _ => String::new(),
        },
        a.dtype,
        if dy.is_some() {
            "forward+backward"
        } else {
            "forward"
        },
        a.output.display()
    );
    Ok(())
}

/// Receives each output tensor: (name, shape, data).
type Sink<'a> = dyn FnMut(&str, &[usize], Vec<f32>) + 'a;

#[allow(clippy::too_many_arguments)]
fn run_typed<X: rwkv_tune::dtype::IoType>(
    backend: &Backend,
    ver: Version,
    d: &Dims,
    x: [&[f32]; 6],
    h0: Option<&[f32]>,
    dy: Option<&[f32]>,
    dht: Option<&[f32]>,
    put: &mut Sink,
) -> Result<Option<Version>> {
    let c = |s: &[f32]| s.iter().map(|&e| X::from_f32(e)).collect::<Vec<X>>();
    let back = |s: Vec<X>| s.into_iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    let xs: Vec<Vec<X>> = x.iter().map(|s| c(s)).collect();
    let inp = Inputs {
        r: &xs[0],
        w: &xs[1],
        k: &xs[2],
        v: &xs[3],
        a: &xs[4],
        b: &xs[5],
        h0,
    };
    let (s, st) = (d.seq_shape(), d.state_shape());
    let ran = (!matches!(backend, Backend::Cpu)).then(|| ver.effective(d, &xs[1]));
    match dy {
        None => {
            let o = backend.forward_v(ver, d, &inp)?;
            put("y", &s, back(o.y));
            put("hT", &st, o.h_t);
        }
        Some(dy) => {
            let dyx = c(dy);
            let (o, g) = backend.forward_backward_v(
                ver,
                d,
                &inp,
                &GradInputs {
                    dy: &dyx,
                    dh_t: dht,
                },
            )?;
            put("y", &s, back(o.y));
            put("hT", &st, o.h_t);
            for (name, v) in [
                ("dr", g.dr),
                ("dw", g.dw),
                ("dk", g.dk),
                ("dv", g.dv),
                ("da", g.da),
                ("db", g.db),
            ] {
                put(name, &s, back(v));
            }
            put("dh0", &st, g.dh0);
        }
    }
    Ok(ran)
}

/// Why `requested` ran as `ran` (the fallbacks of `Version::effective`).
fn fallback_reason(requested: Version, ran: Version) -> &'static str {
    match (requested, ran) {
        (Version::V3 | Version::V3Exact, Version::V2) => "v3 takes bf16 I/O only",
        _ => "head size not 32/64 or a decay below 0.5",
    }
}
