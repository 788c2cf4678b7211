//! Training checkpoints: everything a run needs to continue exactly where it
//! stopped — the tuned parameters, Adam's moments and update count, the step,
//! the data loader's position and the loss history — in one safetensors file
//! written atomically (temporary file, fsync, rename), so a crash or SIGKILL
//! at any moment leaves either the previous checkpoint or the new one.
//!
//! Layout: tensors `param.{i}`, `adam.m.{i}`, `adam.v.{i}` (f32, in the order
//! of `TunedState::params`) and `history.loss` (f32, one train loss per step
//! done); metadata `rwkv_tune.kind = state_tuning_checkpoint`, `step`,
//! `adam_t`, `epoch`, `pos`, and `fingerprint` (the run's model shape, data
//! and hyper-parameters: a resume with different ones is refused).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::data::LoaderPos;
use crate::error::{Error, Result};

const KIND: &str = "state_tuning_checkpoint";

/// A training checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimiser steps done.
    pub step: u64,
    /// Tuned parameters, in `TunedState::params` order.
    pub params: Vec<Vec<f32>>,
    /// Adam first and second moments and update count.
    pub adam_m: Vec<Vec<f32>>,
    /// Adam's second moments, per layer.
    pub adam_v: Vec<Vec<f32>>,
    /// Adam's step count.
    pub adam_t: u64,
    /// Data loader position after the last step.
    pub loader: LoaderPos,
    /// Train loss (per token) of every step done.
    pub history: Vec<f32>,
    /// Describes the run (model shape, data, hyper-parameters).
    pub fingerprint: String,
    /// DBP decorrelation matrices `[L, H, N, N]` (f64), when DBP is on.
    pub dbp_r: Option<Vec<f64>>,
}

fn st_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::SafeTensors {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Checkpoint {
    /// Serialises the checkpoint to safetensors bytes.
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            named.push((format!("param.{i}"), vec![p.len()], to_bytes(p)));
        }
        for (i, m) in self.adam_m.iter().enumerate() {
            named.push((format!("adam.m.{i}"), vec![m.len()], to_bytes(m)));
        }
        for (i, v) in self.adam_v.iter().enumerate() {
            named.push((format!("adam.v.{i}"), vec![v.len()], to_bytes(v)));
        }
        named.push((
            "history.loss".into(),
            vec![self.history.len()],
            to_bytes(&self.history),
        ));
        let n_f32 = named.len();
        if let Some(r) = &self.dbp_r {
            let b: Vec<u8> = r.iter().flat_map(|x| x.to_le_bytes()).collect();
            named.push(("dbp.r".into(), vec![r.len()], b));
        }
        let views = named
            .iter()
            .enumerate()
            .map(|(i, (n, s, b))| {
                let dt = if i < n_f32 { Dtype::F32 } else { Dtype::F64 };
                TensorView::new(dt, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| st_err(path, format!("tensor `{n}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::new();
        meta.insert("rwkv_tune.kind".to_string(), KIND.to_string());
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("adam_t".to_string(), self.adam_t.to_string());
        meta.insert("epoch".to_string(), self.loader.epoch.to_string());
        meta.insert("pos".to_string(), self.loader.pos.to_string());
        meta.insert("n_params".to_string(), self.params.len().to_string());
        meta.insert("fingerprint".to_string(), self.fingerprint.clone());
        crate::tensors::serialize_sorted(views, Some(meta)).map_err(|e| st_err(path, e))
    }

    /// Writes the checkpoint atomically (see the module docs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes(path)?;
        crate::tensors::write_atomic(path, &bytes)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`].
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = crate::guard::read_regular(path)?;
        Checkpoint::from_bytes(&bytes, path)
    }

    /// Parses checkpoint bytes (`path` for messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
        let (_, md) = SafeTensors::read_metadata(bytes).map_err(|e| st_err(path, e))?;
        let meta = md.metadata().clone().unwrap_or_default();
        if meta.get("rwkv_tune.kind").map(String::as_str) != Some(KIND) {
            return Err(st_err(path, "not a rwkv-tune state-tuning checkpoint"));
        }
        let num = |k: &str| -> Result<u64> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| st_err(path, format!("metadata `{k}` missing or not a number")))
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| st_err(path, e))?;
        let get = |name: &str| -> Result<Vec<f32>> {
            let v = st
                .tensor(name)
                .map_err(|e| st_err(path, format!("tensor `{name}`: {e}")))?;
            if v.dtype() != Dtype::F32 {
                return Err(st_err(
                    path,
                    format!("tensor `{name}` is {:?}, not F32", v.dtype()),
                ));
            }
            let data: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            crate::guard::check_finite(&format!("{}: tensor `{name}`", path.display()), &data)?;
            Ok(data)
        };
        // Three tensors per parameter are in the file: a count beyond that
        // is corrupt (and must not size an allocation).
        let n = num("n_params")?;
        if n == 0 || n.saturating_mul(3) > st.len() as u64 {
            return Err(st_err(
                path,
                format!(
                    "metadata `n_params` = {n} does not fit the file's {} tensors",
                    st.len()
                ),
            ));
        }
        let n = n as usize;
        let mut params = Vec::with_capacity(n);
        let mut adam_m = Vec::with_capacity(n);
        let mut adam_v = Vec::with_capacity(n);
        for i in 0..n {
            params.push(get(&format!("param.{i}"))?);
            adam_m.push(get(&format!("adam.m.{i}"))?);
            adam_v.push(get(&format!("adam.v.{i}"))?);
        }
        let step = num("step")?;
        let history = get("history.loss")?;
        if history.len() as u64 != step {
            return Err(st_err(
                path,
                format!(
                    "step {step} but `history.loss` holds {} losses (one per step)",
                    history.len()
                ),
            ));
        }
        Ok(Checkpoint {
            step,
            params,
            adam_m,
            adam_v,
            adam_t: num("adam_t")?,
            loader: LoaderPos {
                epoch: num("epoch")?,
                pos: num("pos")?,
            },
            history,
            fingerprint: meta.get("fingerprint").cloned().unwrap_or_default(),
            dbp_r: match st.tensor("dbp.r") {
                Ok(v) if v.dtype() == Dtype::F64 => Some(
                    v.data()
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect(),
                ),
                Ok(v) => {
                    return Err(st_err(
                        path,
                        format!("tensor `dbp.r` is {:?}, not F64", v.dtype()),
                    ))
                }
                Err(_) => None,
            },
        })
    }
}

/// Removes temporary files that an interrupted atomic write of `path` may
/// have left next to it (`.{name}.tmp*`). Returns the paths removed.
pub fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().to_string()) else {
        return Vec::new();
    };
    let prefix = format!(".{name}.tmp");
    let mut removed = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix)
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed.push(e.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact() {
        let ck = Checkpoint {
            step: 7,
            params: vec![vec![1.5, -2.25, f32::MIN_POSITIVE], vec![3.0]],
            adam_m: vec![vec![0.1, 0.2, 0.3], vec![0.4]],
            adam_v: vec![vec![1e-9, 2e-9, 3e-9], vec![4e-9]],
            adam_t: 7,
            loader: LoaderPos { epoch: 2, pos: 5 },
            history: vec![3.0, 2.5, 2.0, 1.9, 1.8, 1.7, 1.6],
            fingerprint: "cfg".into(),
            dbp_r: Some(vec![1.0, -0.1, 1e-300]),
        };
        let dir = std::env::temp_dir().join(format!("rwkv-tune-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.safetensors");
        ck.save(&p).unwrap();
        assert_eq!(Checkpoint::load(&p).unwrap(), ck);
        std::fs::write(dir.join(".c.safetensors.tmp123"), b"partial").unwrap();
        assert_eq!(remove_stale_temps(&p).len(), 1);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(Checkpoint::load(&p).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
