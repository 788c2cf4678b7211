//! Converting tensor files (models and states) between safetensors, PyTorch
//! `.pth` and the RWKV-PEFT state layout. Names and values pass through
//! unchanged; with the stored dtype kept, every tensor is bit-identical.
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::load::{read_file, read_tensors_typed, write_f32_tensors, F32Tensor, StoreDType};
use crate::pth::FileFormat;

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A safetensors file.
    SafeTensors,
    /// A PyTorch `.pth` state dict (names unchanged).
    Pth,
    /// A state in the layout RWKV-PEFT loads: a `.pth` of
    /// `blocks.N.att.time_state` `[H, N, N]` (a leading 1 is dropped).
    Peft,
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "safetensors" | "st" => Ok(Target::SafeTensors),
            "pth" | "pt" | "torch" => Ok(Target::Pth),
            "peft" | "rwkv-peft" => Ok(Target::Peft),
            _ => Err(Error::Options(format!(
                "unknown --to `{s}` (use safetensors, pth or peft)"
            ))),
        }
    }
}

impl Target {
    /// The target an output path's extension implies (`.safetensors`,
    /// `.pth` / `.pt`), if any.
    pub fn from_extension(path: &Path) -> Option<Target> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "safetensors" | "st" => Some(Target::SafeTensors),
            "pth" | "pt" => Some(Target::Pth),
            _ => None,
        }
    }
}

/// What [`convert`] did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The input file format.
    pub from: FileFormat,
    /// What was written.
    pub to: Target,
    /// Number of tensors written.
    pub tensors: usize,
    /// Element type written.
    pub dtype: StoreDType,
    /// Every tensor is a `blocks.N.att.time_state` (a state file).
    pub is_state: bool,
}

/// The layer index of a `blocks.N.att.time_state` name.
fn state_layer(name: &str) -> Option<usize> {
    name.strip_prefix("blocks.")?
        .strip_suffix(".att.time_state")?
        .parse()
        .ok()
}

/// Converts `input` (safetensors or `.pth`, told by content) to `output`.
/// `to` defaults to the output's extension; `dtype` defaults to the input's
/// dtype when all tensors share one of f32 / f16 / bf16, else f32. With
/// `transpose_state` every `[N, N]` block of a state file is transposed (to
/// repair a state saved key-major, see docs/file-formats.md).
pub fn convert(
    input: &Path,
    output: &Path,
    to: Option<Target>,
    dtype: Option<StoreDType>,
    transpose_state: bool,
) -> Result<Report> {
    let to = match to.or_else(|| Target::from_extension(output)) {
        Some(t) => t,
        None => {
            return Err(Error::Options(format!(
                "cannot tell the output format from `{}`; pass --to safetensors|pth|peft",
                output.display()
            )))
        }
    };
    let bytes = read_file(input)?;
    let from = FileFormat::detect(&bytes);
    let typed = read_tensors_typed(&bytes, input)?;
    drop(bytes);
    let first = typed.first().and_then(|t| t.1);
    let uniform = typed.iter().all(|t| t.1 == first);
    let dtype = dtype.unwrap_or(match (uniform, first) {
        (true, Some(d)) => d,
        _ => StoreDType::F32,
    });
    let mut tensors: Vec<F32Tensor> = typed.into_iter().map(|t| t.0).collect();
    let is_state = !tensors.is_empty() && tensors.iter().all(|t| state_layer(&t.name).is_some());
    let n = tensors.len();
    if transpose_state {
        if !is_state {
            return Err(Error::Options(
                "--transpose-state needs a state file (only blocks.N.att.time_state tensors)"
                    .into(),
            ));
        }
        for t in &mut tensors {
            let k = *t.shape.last().unwrap_or(&0);
            if t.shape.len() < 2 || t.shape[t.shape.len() - 2] != k || k == 0 {
                return Err(Error::Shape {
                    name: t.name.clone(),
                    expected: vec![0, k, k],
                    got: t.shape.clone(),
                });
            }
            for block in t.data.chunks_exact_mut(k * k) {
                for i in 0..k {
                    for j in i + 1..k {
                        block.swap(i * k + j, j * k + i);
                    }
                }
            }
        }
    }
    let out = match to {
        Target::SafeTensors => {
            let mut meta = std::collections::HashMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            if is_state {
                meta.insert("rwkv_tune.kind".to_string(), "rwkv7_time_state".to_string());
            }
            write_f32_tensors(&tensors, dtype, Some(meta))?
        }
        Target::Pth => crate::model::load::write_pth(&tensors, dtype)?,
        Target::Peft => {
            if !is_state {
                let bad = tensors
                    .iter()
                    .find(|t| state_layer(&t.name).is_none())
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                return Err(Error::Model(format!(
                    "--to peft needs a state file (only blocks.N.att.time_state tensors); \
                     {} has `{bad}`",
                    input.display()
                )));
            }
            tensors.sort_by_key(|t| state_layer(&t.name));
            for (l, t) in tensors.iter_mut().enumerate() {
                if state_layer(&t.name) != Some(l) {
                    return Err(Error::MissingTensor(format!("blocks.{l}.att.time_state")));
                }
                let ok3 = t.shape.len() == 3 && t.shape[1] == t.shape[2];
                let ok4 = t.shape.len() == 4 && t.shape[0] == 1 && t.shape[2] == t.shape[3];
                if ok4 {
                    t.shape.remove(0);
                } else if !ok3 {
                    return Err(Error::Shape {
                        name: t.name.clone(),
                        expected: vec![0, 0, 0],
                        got: t.shape.clone(),
                    });
                }
            }
            crate::model::load::write_pth(&tensors, dtype)?
        }
    };
    crate::tensors::write_atomic(output, &out)?;
    Ok(Report {
        from,
        to,
        tensors: n,
        dtype,
        is_state,
    })
}
