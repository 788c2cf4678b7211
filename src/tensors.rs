//! Reading and writing named f32 tensors in safetensors files, with errors
//! that name the file, the tensor and both shapes.
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// A named f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f32>,
}

/// Reads every tensor of a safetensors file as f32 (f32, f16 and bf16 accepted).
pub fn read_f32(path: &Path) -> Result<BTreeMap<String, F32Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::SafeTensors {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::DType {
                    name,
                    expected: "F32, F16 or BF16".into(),
                    got: format!("{other:?}"),
                });
            }
        };
        out.insert(
            name,
            F32Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Writes f32 tensors to a safetensors file atomically (temp file + rename).
pub fn write_f32(path: &Path, tensors: &BTreeMap<String, F32Tensor>) -> Result<()> {
    let bytes: BTreeMap<&String, (Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k,
                (
                    t.shape.clone(),
                    t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            )
        })
        .collect();
    let views: Vec<(&String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (s, b))| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (*k, v))
                .map_err(|e| Error::SafeTensors {
                    path: path.into(),
                    msg: format!("tensor `{k}`: {e}"),
                })
        })
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| Error::SafeTensors {
        path: path.into(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &data)
}

/// Writes `data` to `path` through a temporary file in the same directory,
/// fsync'd and renamed, so a crash never leaves a half-written file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}
