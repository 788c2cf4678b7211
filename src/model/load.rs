//! Reading and writing checkpoints: safetensors, and PyTorch `.pth` through
//! [`crate::pth`] (the format is told by the file's first bytes).
//!
//! Two naming schemes are understood: the official BlinkDL x070 names
//! (`blocks.N.att.x_r` `[1,1,C]`, `blocks.N.att.w1` `[C,D]`, …) and the fla /
//! Hugging Face names (`model.layers.N.attn.r_proj.weight`,
//! `attn.w_lora.lora.0.weight` = w1ᵀ, …). Tensors may be f32, f16, bf16 or f64;
//! they are converted to f32. The config is read off the shapes; a missing,
//! unexpected or mis-shaped tensor, a truncated file or a corrupt header is a
//! typed error that names the tensor or the byte offset.
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::weights::{Block, ChannelMix, Config, LayerNorm, TimeMix, Weights};
use crate::error::{Error, Result};

/// Tensor naming scheme of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// BlinkDL RWKV-LM x070 `.pth` names.
    Official,
    /// flash-linear-attention / Hugging Face `fla-hub/rwkv7-*` names.
    Fla,
}

/// Element type used when writing tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl std::str::FromStr for StoreDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(StoreDType::F32),
            "f16" | "float16" | "fp16" => Ok(StoreDType::F16),
            "bf16" | "bfloat16" => Ok(StoreDType::BF16),
            _ => Err(Error::Invalid(format!(
                "unknown dtype `{s}` (use f32, f16 or bf16)"
            ))),
        }
    }
}

/// One tensor read from a file, converted to f32.
#[derive(Clone, Debug)]
pub struct F32Tensor {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f32>,
}

fn st_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::SafeTensors {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads a whole regular file (a FIFO or device is refused:
/// [`crate::guard::read_regular`]), mapping I/O errors to [`Error::Io`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    crate::guard::read_regular(path)
}

/// Explains why a buffer is not a valid safetensors file, with byte offsets
/// where possible (called after the safetensors crate refused it).
fn diagnose(bytes: &[u8], path: &Path, fallback: String) -> Error {
    let len = bytes.len();
    match crate::pth::FileFormat::detect(bytes) {
        crate::pth::FileFormat::PyTorch => {
            return st_err(
                path,
                "this is a PyTorch file (a zip archive, `PK\\x03\\x04`), not safetensors; \
                 load it with Weights::load / State::load or `rwkv-tune convert` it",
            )
        }
        crate::pth::FileFormat::LegacyPyTorch => return legacy_err(path),
        crate::pth::FileFormat::SafeTensors => {}
    }
    if len < 8 {
        return st_err(
            path,
            format!("truncated: {len} bytes, but the file must start with an 8-byte header length"),
        );
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > (len as u64).saturating_sub(8) {
        return st_err(
            path,
            format!(
                "corrupt or truncated header: the header length at byte offset 0 says {n} bytes, \
                 but only {} bytes follow offset 8",
                len - 8
            ),
        );
    }
    let n = n as usize;
    let header = &bytes[8..8 + n];
    let json: serde_json::Value = match serde_json::from_slice(header) {
        Ok(v) => v,
        Err(e) => {
            return st_err(path, format!("corrupt header (bytes 8..{}): {e}", 8 + n));
        }
    };
    let data_len = len - 8 - n;
    if let Some(obj) = json.as_object() {
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let end = info
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .and_then(|a| a.get(1))
                .and_then(|e| e.as_u64());
            if let Some(end) = end {
                if end as usize > data_len {
                    return st_err(
                        path,
                        format!(
                            "truncated: tensor `{name}` ends at byte offset {} but the file has \
                             {len} bytes",
                            8 + n as u64 + end
                        ),
                    );
                }
            }
        }
    }
    st_err(
        path,
        format!(
            "{fallback} (header is bytes 8..{}, file {len} bytes)",
            8 + n
        ),
    )
}

fn to_f32(view: &TensorView<'_>, name: &str) -> Result<Vec<f32>> {
    let d = view.data();
    let out = match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        other => {
            return Err(Error::DType {
                name: name.to_string(),
                expected: "F32, F16, BF16 or F64".into(),
                got: format!("{other:?}"),
            })
        }
    };
    Ok(out)
}

fn legacy_err(path: &Path) -> Error {
    Error::PyTorch {
        path: path.to_path_buf(),
        msg: "this is a PyTorch file in the format before PyTorch 1.6 (a bare pickle, not a \
              zip), which is not read; re-save it with a recent torch.save (the zip format is \
              the default since 1.6) or as safetensors"
            .into(),
    }
}

/// Reads named f32 tensors from a safetensors or PyTorch `.pth` buffer (told
/// apart by content), each with the dtype it was stored in (`None` = f64).
/// safetensors tensors come sorted by name, `.pth` ones in state-dict order.
pub fn read_tensors_typed(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<(F32Tensor, Option<StoreDType>)>> {
    use crate::pth::FileFormat;
    match FileFormat::detect(bytes) {
        FileFormat::PyTorch => Ok(read_pth(bytes, path)?
            .into_iter()
            .map(|(t, d)| (t, store_of(d)))
            .collect()),
        FileFormat::LegacyPyTorch => Err(legacy_err(path)),
        FileFormat::SafeTensors => {
            let st = match SafeTensors::deserialize(bytes) {
                Ok(st) => st,
                Err(e) => return Err(diagnose(bytes, path, e.to_string())),
            };
            let mut out = Vec::with_capacity(st.len());
            for (name, view) in st.iter() {
                let data = to_f32(&view, name)?;
                let d = match view.dtype() {
                    Dtype::F16 => Some(StoreDType::F16),
                    Dtype::BF16 => Some(StoreDType::BF16),
                    Dtype::F32 => Some(StoreDType::F32),
                    _ => None,
                };
                let t = F32Tensor {
                    name: name.to_string(),
                    shape: view.shape().to_vec(),
                    data,
                };
                out.push((t, d));
            }
            out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            Ok(out)
        }
    }
}

/// The store dtype of a `.pth` storage dtype (`None` for f64, read only).
fn store_of(d: crate::pth::StorageDType) -> Option<StoreDType> {
    use crate::pth::StorageDType as S;
    match d {
        S::F32 => Some(StoreDType::F32),
        S::F16 => Some(StoreDType::F16),
        S::BF16 => Some(StoreDType::BF16),
        S::F64 => None,
    }
}

/// Reads a PyTorch `.pth` state dict ([`crate::pth::read`]) as named f32
/// tensors with their stored dtypes, in state-dict order.
pub fn read_pth(bytes: &[u8], path: &Path) -> Result<Vec<(F32Tensor, crate::pth::StorageDType)>> {
    Ok(crate::pth::read(bytes, path)?
        .into_iter()
        .map(|t| {
            let d = t.dtype;
            let t = F32Tensor {
                name: t.name,
                shape: t.shape,
                data: t.data,
            };
            (t, d)
        })
        .collect())
}

/// Serialises named tensors as a PyTorch `.pth` state dict in `dtype`
/// ([`crate::pth::write`]).
pub fn write_pth(tensors: &[F32Tensor], dtype: StoreDType) -> Result<Vec<u8>> {
    use crate::pth::StorageDType as S;
    let d = match dtype {
        StoreDType::F32 => S::F32,
        StoreDType::F16 => S::F16,
        StoreDType::BF16 => S::BF16,
    };
    let views: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice(), t.data.as_slice()))
        .collect();
    crate::pth::write(&views, d)
}

/// Reads named f32 tensors from a safetensors or PyTorch `.pth` buffer (told
/// apart by content, not extension). `path` is only used in messages.
pub fn read_tensors(bytes: &[u8], path: &Path) -> Result<Vec<F32Tensor>> {
    Ok(read_tensors_typed(bytes, path)?
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

/// Parses a safetensors buffer into f32 tensors (sorted by name), converting
/// f16 / bf16 / f64. `path` is only used in error messages.
pub fn read_f32_tensors(bytes: &[u8], path: &Path) -> Result<Vec<F32Tensor>> {
    let st = match SafeTensors::deserialize(bytes) {
        Ok(st) => st,
        Err(e) => return Err(diagnose(bytes, path, e.to_string())),
    };
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        let data = to_f32(&view, name)?;
        out.push(F32Tensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads the `__metadata__` map of a safetensors buffer (empty when absent).
pub fn read_metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>> {
    match SafeTensors::read_metadata(bytes) {
        Ok((_, m)) => Ok(m.metadata().clone().unwrap_or_default()),
        Err(e) => Err(diagnose(bytes, path, e.to_string())),
    }
}

/// Serialises f32 tensors into a safetensors buffer in the chosen dtype.
pub fn write_f32_tensors(
    tensors: &[F32Tensor],
    dtype: StoreDType,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let bytes: Vec<u8> = match dtype {
                StoreDType::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                StoreDType::F16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                StoreDType::BF16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            (t.name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        StoreDType::F32 => Dtype::F32,
        StoreDType::F16 => Dtype::F16,
        StoreDType::BF16 => Dtype::BF16,
    };
    let mut views = Vec::with_capacity(encoded.len());
    for (name, shape, bytes) in &encoded {
        let v = TensorView::new(st_dtype, shape.clone(), bytes)
            .map_err(|e| Error::Invalid(format!("tensor `{name}` with shape {shape:?}: {e}")))?;
        views.push((name.clone(), v));
    }
    crate::tensors::serialize_sorted(views, metadata).map_err(|e| Error::Invalid(e.to_string()))
}

/// Writes per-document logits to a safetensors file: `doc{i}.tokens` `[T]`
/// (i64, the tokens fed) and `doc{i}.logits` `[T, vocab]` (f32; row t follows
/// token t).
pub fn write_logits(path: &Path, docs: &[(Vec<u32>, Vec<f32>)], vocab: usize) -> Result<()> {
    let mut bufs = Vec::with_capacity(docs.len() * 2);
    for (i, (toks, logits)) in docs.iter().enumerate() {
        if logits.len() != toks.len() * vocab {
            return Err(Error::Shape {
                name: format!("doc{i}.logits"),
                expected: vec![toks.len(), vocab],
                got: vec![logits.len()],
            });
        }
        let tb: Vec<u8> = toks
            .iter()
            .flat_map(|&t| (t as i64).to_le_bytes())
            .collect();
        let lb: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        bufs.push((format!("doc{i}.tokens"), Dtype::I64, vec![toks.len()], tb));
        bufs.push((
            format!("doc{i}.logits"),
            Dtype::F32,
            vec![toks.len(), vocab],
            lb,
        ));
    }
    let mut views = Vec::with_capacity(bufs.len());
    for (name, dt, shape, b) in &bufs {
        let v = TensorView::new(*dt, shape.clone(), b)
            .map_err(|e| Error::Invalid(format!("tensor `{name}`: {e}")))?;
        views.push((name.clone(), v));
    }
    let bytes =
        crate::tensors::serialize_sorted(views, None).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::tensors::write_atomic(path, &bytes)
}

/// Writes bytes to a file atomically ([`crate::tensors::write_atomic`]:
/// a temporary file, fsync'd and renamed), mapping I/O errors to
/// [`Error::Io`].
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::tensors::write_atomic(path, bytes)
}

const LORAS: [(&str, char); 4] = [
    ("w_lora", 'w'),
    ("a_lora", 'a'),
    ("v_lora", 'v'),
    ("g_lora", 'g'),
];

/// Maps an fla / HF name to (official name, transpose?). `None` = unknown.
fn fla_to_official(name: &str) -> Option<(String, bool)> {
    match name {
        "model.embeddings.weight" => return Some(("emb.weight".into(), false)),
        "model.norm.weight" => return Some(("ln_out.weight".into(), false)),
        "model.norm.bias" => return Some(("ln_out.bias".into(), false)),
        "lm_head.weight" => return Some(("head.weight".into(), false)),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let p = format!("blocks.{l}");
    for (fla, off) in [
        ("pre_norm", "ln0"),
        ("attn_norm", "ln1"),
        ("ffn_norm", "ln2"),
    ] {
        if let Some(part) = rest.strip_prefix(fla).and_then(|r| r.strip_prefix('.')) {
            if part == "weight" || part == "bias" {
                return Some((format!("{p}.{off}.{part}"), false));
            }
            return None;
        }
    }
    if let Some(a) = rest.strip_prefix("attn.") {
        for (fla, off) in [
            ("r_proj", "receptance"),
            ("k_proj", "key"),
            ("v_proj", "value"),
            ("o_proj", "output"),
        ] {
            if a == format!("{fla}.weight") {
                return Some((format!("{p}.att.{off}.weight"), false));
            }
        }
        if a == "g_norm.weight" || a == "g_norm.bias" {
            return Some((format!("{p}.att.ln_x.{}", &a[7..]), false));
        }
        for (fla, c) in LORAS {
            if let Some(part) = a.strip_prefix(fla) {
                return match part {
                    ".lora.0.weight" => Some((format!("{p}.att.{c}1"), true)),
                    ".lora.2.weight" => Some((format!("{p}.att.{c}2"), true)),
                    ".lora.2.bias" if c != 'g' => Some((format!("{p}.att.{c}0"), false)),
                    _ => None,
                };
            }
        }
        if [
            "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k",
        ]
        .contains(&a)
        {
            return Some((format!("{p}.att.{a}"), false));
        }
        return None;
    }
    if ["ffn.key.weight", "ffn.value.weight", "ffn.x_k"].contains(&rest) {
        return Some((format!("{p}.{rest}"), false));
    }
    None
}

/// Maps an official name to (fla name, transpose?, squeeze to `[C]`?).
fn official_to_fla(name: &str) -> (String, bool, bool) {
    match name {
        "emb.weight" => return ("model.embeddings.weight".into(), false, false),
        "ln_out.weight" => return ("model.norm.weight".into(), false, false),
        "ln_out.bias" => return ("model.norm.bias".into(), false, false),
        "head.weight" => return ("lm_head.weight".into(), false, false),
        _ => {}
    }
    // blocks.L.rest
    let rest = &name["blocks.".len()..];
    let (l, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let p = format!("model.layers.{l}");
    let map = |s: &str| format!("{p}.{s}");
    for (off, fla) in [
        ("ln0.", "pre_norm."),
        ("ln1.", "attn_norm."),
        ("ln2.", "ffn_norm."),
    ] {
        if let Some(part) = rest.strip_prefix(off) {
            return (map(&format!("{fla}{part}")), false, false);
        }
    }
    if let Some(a) = rest.strip_prefix("att.") {
        for (off, fla) in [
            ("receptance", "r_proj"),
            ("key", "k_proj"),
            ("value", "v_proj"),
            ("output", "o_proj"),
        ] {
            if a == format!("{off}.weight") {
                return (map(&format!("attn.{fla}.weight")), false, false);
            }
        }
        if let Some(part) = a.strip_prefix("ln_x.") {
            return (map(&format!("attn.g_norm.{part}")), false, false);
        }
        for (fla, c) in LORAS {
            if a == format!("{c}1") {
                return (map(&format!("attn.{fla}.lora.0.weight")), true, false);
            }
            if a == format!("{c}2") {
                return (map(&format!("attn.{fla}.lora.2.weight")), true, false);
            }
            if a == format!("{c}0") {
                return (map(&format!("attn.{fla}.lora.2.bias")), false, true);
            }
        }
        let squeeze = a == "k_k" || a == "k_a";
        return (map(&format!("attn.{a}")), false, squeeze);
    }
    let squeeze = rest == "ffn.x_k";
    (map(rest), false, squeeze)
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Detects the naming scheme of a set of tensor names.
pub fn detect_naming<'a>(names: impl IntoIterator<Item = &'a str>) -> Naming {
    for n in names {
        if n.starts_with("model.layers.") || n.starts_with("model.embeddings.") {
            return Naming::Fla;
        }
    }
    Naming::Official
}

struct Entry {
    shape: Vec<usize>,
    data: Vec<f32>,
    /// The name as stored in the file (for error messages).
    file_name: String,
}

impl Weights {
    /// Loads a checkpoint: safetensors or PyTorch `.pth` (told apart by
    /// content), official or fla names, f32/f16/bf16.
    pub fn load(path: impl AsRef<Path>) -> Result<Weights> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses a safetensors or `.pth` checkpoint already in memory (`path` for
    /// messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Weights> {
        Self::from_tensors(read_tensors(bytes, path)?)
    }

    /// Parses a checkpoint already in memory. `path` is used in error messages.
    pub fn from_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Weights> {
        let tensors = read_f32_tensors(bytes, path)?;
        Self::from_tensors(tensors)
    }

    /// Builds weights from named f32 tensors (official or fla names). A
    /// NaN or infinite value is refused ([`Error::NonFinite`]) unless
    /// [`crate::guard::set_allow_nonfinite`] is on.
    pub fn from_tensors(tensors: Vec<F32Tensor>) -> Result<Weights> {
        for t in &tensors {
            crate::guard::check_finite(&format!("tensor `{}`", t.name), &t.data)?;
        }
        let naming = detect_naming(tensors.iter().map(|t| t.name.as_str()));
        let mut map: HashMap<String, Entry> = HashMap::with_capacity(tensors.len());
        for t in tensors {
            let (name, tr) = match naming {
                Naming::Official => (t.name.clone(), false),
                Naming::Fla => fla_to_official(&t.name).ok_or_else(|| {
                    Error::Model(format!(
                        "unexpected tensor `{}` (not an fla RWKV-7 name)",
                        t.name
                    ))
                })?,
            };
            let (shape, data) = if tr {
                if t.shape.len() != 2 {
                    return Err(Error::Shape {
                        name: t.name.clone(),
                        expected: vec![0, 0],
                        got: t.shape.clone(),
                    });
                }
                (
                    vec![t.shape[1], t.shape[0]],
                    transpose(&t.data, t.shape[0], t.shape[1]),
                )
            } else {
                (t.shape.clone(), t.data)
            };
            if map
                .insert(
                    name.clone(),
                    Entry {
                        shape,
                        data,
                        file_name: t.name.clone(),
                    },
                )
                .is_some()
            {
                return Err(Error::Model(format!(
                    "tensor `{}` maps to `{name}`, which appears twice",
                    t.name
                )));
            }
        }
        let shapes: HashMap<String, Vec<usize>> = map
            .iter()
            .map(|(k, e)| (k.clone(), e.shape.clone()))
            .collect();
        let config = Config::from_shapes(&shapes)?;
        let specs = config.tensor_specs();
        let mut taken: HashMap<String, Vec<f32>> = HashMap::with_capacity(specs.len());
        for spec in &specs {
            match map.remove(&spec.name) {
                None if spec.optional => {}
                None => {
                    let name = match naming {
                        Naming::Official => spec.name.clone(),
                        Naming::Fla => official_to_fla(&spec.name).0,
                    };
                    return Err(Error::MissingTensor(name));
                }
                Some(e) => {
                    if !spec.accepts(&e.shape) {
                        let expected = match (naming, official_to_fla(&spec.name)) {
                            (Naming::Fla, (_, true, _)) => {
                                spec.shape.iter().rev().copied().collect()
                            }
                            _ => spec.shape.clone(),
                        };
                        let got = match (naming, official_to_fla(&spec.name)) {
                            (Naming::Fla, (_, true, _)) => e.shape.iter().rev().copied().collect(),
                            _ => e.shape.clone(),
                        };
                        return Err(Error::Shape {
                            name: e.file_name,
                            expected,
                            got,
                        });
                    }
                    taken.insert(spec.name.clone(), e.data);
                }
            }
        }
        if let Some(extra) = map.values().map(|e| e.file_name.clone()).min() {
            return Err(Error::Model(format!(
                "unexpected tensor `{extra}` (not part of an RWKV-7 x070 model with {} layers)",
                config.n_layer
            )));
        }
        Ok(assemble(config, taken))
    }

    /// The weights as named tensors in the given naming scheme (official
    /// shapes, or fla's transposed LoRA factors and squeezed vectors).
    pub fn named_tensors(&self, naming: Naming) -> Vec<F32Tensor> {
        let mut out = Vec::new();
        let cfg = &self.config;
        for spec in cfg.tensor_specs() {
            let Some(data) = self.get(&spec.name) else {
                continue;
            };
            let (name, shape, data) = match naming {
                Naming::Official => (spec.name.clone(), spec.shape.clone(), data.to_vec()),
                Naming::Fla => {
                    let (name, tr, squeeze) = official_to_fla(&spec.name);
                    if tr {
                        let (r, c) = (spec.shape[0], spec.shape[1]);
                        (name, vec![c, r], transpose(data, r, c))
                    } else if squeeze {
                        (name, vec![data.len()], data.to_vec())
                    } else {
                        (name, spec.shape.clone(), data.to_vec())
                    }
                }
            };
            out.push(F32Tensor { name, shape, data });
        }
        out
    }

    /// Serialises the weights to safetensors bytes.
    pub fn to_safetensors_bytes(&self, naming: Naming, dtype: StoreDType) -> Result<Vec<u8>> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_f32_tensors(&self.named_tensors(naming), dtype, Some(meta))
    }

    /// Writes the weights to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>, naming: Naming, dtype: StoreDType) -> Result<()> {
        let bytes = self.to_safetensors_bytes(naming, dtype)?;
        write_file(path.as_ref(), &bytes)
    }

    /// Checks every tensor's length against the config (named errors); used
    /// by [`super::Model::new`] so hand-built weights are validated too.
    pub fn check(&self) -> Result<()> {
        self.config.validate()?;
        for spec in self.config.tensor_specs() {
            match self.get(&spec.name) {
                None if spec.optional => {}
                None => return Err(Error::MissingTensor(spec.name)),
                Some(d) => {
                    let n: usize = spec.shape.iter().product();
                    if d.len() != n {
                        return Err(Error::Shape {
                            name: spec.name,
                            expected: spec.shape,
                            got: vec![d.len()],
                        });
                    }
                }
            }
        }
        if self.blocks.len() != self.config.n_layer {
            return Err(Error::Model(format!(
                "{} blocks but config.n_layer = {}",
                self.blocks.len(),
                self.config.n_layer
            )));
        }
        Ok(())
    }

    /// The tensor with this official name, if the model has it.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        fn ln<'a>(l: &'a LayerNorm, part: &str) -> Option<&'a [f32]> {
            match part {
                "weight" => Some(&l.weight),
                "bias" => Some(&l.bias),
                _ => None,
            }
        }
        match name {
            "emb.weight" => return Some(&self.emb),
            "head.weight" => return Some(&self.head),
            _ => {}
        }
        if let Some(part) = name.strip_prefix("ln_out.") {
            return ln(&self.ln_out, part);
        }
        let rest = name.strip_prefix("blocks.")?;
        let (l, rest) = rest.split_once('.')?;
        let b = self.blocks.get(l.parse::<usize>().ok()?)?;
        if let Some(part) = rest.strip_prefix("ln0.") {
            return ln(b.ln0.as_ref()?, part);
        }
        if let Some(part) = rest.strip_prefix("ln1.") {
            return ln(&b.ln1, part);
        }
        if let Some(part) = rest.strip_prefix("ln2.") {
            return ln(&b.ln2, part);
        }
        let a = &b.att;
        let f = &b.ffn;
        let v: &Vec<f32> = match rest {
            "att.x_r" => &a.x_r,
            "att.x_w" => &a.x_w,
            "att.x_k" => &a.x_k,
            "att.x_v" => &a.x_v,
            "att.x_a" => &a.x_a,
            "att.x_g" => &a.x_g,
            "att.w0" => &a.w0,
            "att.w1" => &a.w1,
            "att.w2" => &a.w2,
            "att.a0" => &a.a0,
            "att.a1" => &a.a1,
            "att.a2" => &a.a2,
            "att.v0" => a.v0.as_ref()?,
            "att.v1" => a.v1.as_ref()?,
            "att.v2" => a.v2.as_ref()?,
            "att.g1" => &a.g1,
            "att.g2" => &a.g2,
            "att.k_k" => &a.k_k,
            "att.k_a" => &a.k_a,
            "att.r_k" => &a.r_k,
            "att.receptance.weight" => &a.receptance,
            "att.key.weight" => &a.key,
            "att.value.weight" => &a.value,
            "att.output.weight" => &a.output,
            "att.ln_x.weight" => &a.ln_x.weight,
            "att.ln_x.bias" => &a.ln_x.bias,
            "ffn.x_k" => &f.x_k,
            "ffn.key.weight" => &f.key,
            "ffn.value.weight" => &f.value,
            _ => return None,
        };
        Some(v)
    }
}

/// Moves checked tensors (official names, shapes already validated) into a
/// [`Weights`].
fn assemble(config: Config, mut t: HashMap<String, Vec<f32>>) -> Weights {
    let mut take = |n: &str| t.remove(n).unwrap_or_default();
    let mut blocks = Vec::with_capacity(config.n_layer);
    for l in 0..config.n_layer {
        let mut g = |s: &str| take(&format!("blocks.{l}.{s}"));
        let ln0 = if l == 0 {
            Some(LayerNorm {
                weight: g("ln0.weight"),
                bias: g("ln0.bias"),
            })
        } else {
            None
        };
        let ln1 = LayerNorm {
            weight: g("ln1.weight"),
            bias: g("ln1.bias"),
        };
        let ln2 = LayerNorm {
            weight: g("ln2.weight"),
            bias: g("ln2.bias"),
        };
        let opt = |v: Vec<f32>| if v.is_empty() { None } else { Some(v) };
        let att = TimeMix {
            x_r: g("att.x_r"),
            x_w: g("att.x_w"),
            x_k: g("att.x_k"),
            x_v: g("att.x_v"),
            x_a: g("att.x_a"),
            x_g: g("att.x_g"),
            w0: g("att.w0"),
            w1: g("att.w1"),
            w2: g("att.w2"),
            a0: g("att.a0"),
            a1: g("att.a1"),
            a2: g("att.a2"),
            v0: opt(g("att.v0")),
            v1: opt(g("att.v1")),
            v2: opt(g("att.v2")),
            g1: g("att.g1"),
            g2: g("att.g2"),
            k_k: g("att.k_k"),
            k_a: g("att.k_a"),
            r_k: g("att.r_k"),
            receptance: g("att.receptance.weight"),
            key: g("att.key.weight"),
            value: g("att.value.weight"),
            output: g("att.output.weight"),
            ln_x: LayerNorm {
                weight: g("att.ln_x.weight"),
                bias: g("att.ln_x.bias"),
            },
        };
        let ffn = ChannelMix {
            x_k: g("ffn.x_k"),
            key: g("ffn.key.weight"),
            value: g("ffn.value.weight"),
        };
        blocks.push(Block {
            ln0,
            ln1,
            ln2,
            att,
            ffn,
        });
    }
    let emb = take("emb.weight");
    let head = take("head.weight");
    let ln_out = LayerNorm {
        weight: take("ln_out.weight"),
        bias: take("ln_out.bias"),
    };
    Weights {
        config,
        emb,
        blocks,
        ln_out,
        head,
    }
}
