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
    let bytes = crate::guard::read_regular(path)?;
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
    let data = serialize_sorted(views, None).map_err(|e| Error::SafeTensors {
        path: path.into(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &data)
}

/// Writes `data` to `path` through a temporary file in the same directory,
/// fsync'd and renamed, so a crash never leaves a half-written file. On any
/// failure (a full disk, say) the temporary file is removed.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}.{seq}", std::process::id()));
    let write = || -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(data).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// [`safetensors::serialize`] with a deterministic header: the JSON keys
/// (tensor names and the `__metadata__` map, whose `HashMap` order differs
/// from run to run) are sorted, so identical tensors and metadata give
/// identical bytes.
pub fn serialize_sorted<S, V, I>(
    data: I,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    let bytes = safetensors::serialize(data, metadata)?;
    Ok(sort_header(bytes))
}

/// Rewrites a safetensors buffer's JSON header with sorted keys (padded
/// with spaces to a multiple of 8 bytes, as the format writes it). The data
/// offsets are relative to the end of the header, so they stay valid.
fn sort_header(bytes: Vec<u8>) -> Vec<u8> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut kv: Vec<(String, serde_json::Value)> = m.into_iter().collect();
                kv.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            other => other,
        }
    }
    let Some(n8) = bytes.get(..8) else {
        return bytes;
    };
    let n = u64::from_le_bytes(n8.try_into().unwrap_or([0; 8])) as usize;
    let Some(header) = bytes.get(8..8usize.saturating_add(n)) else {
        return bytes;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(header) else {
        return bytes;
    };
    let Ok(mut h) = serde_json::to_vec(&sorted(v)) else {
        return bytes;
    };
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}
