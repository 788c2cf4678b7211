//! The recurrent state of an RWKV-7 model and state files.
//!
//! Per layer the state is the time-mix token-shift vector `[C]`, the
//! channel-mix token-shift vector `[C]`, and the WKV state `[H, N, N]` in
//! value-major layout (row = value channel i, column = key channel j, as in
//! the official RNN code).
//!
//! State files use the layout of ai00 / web-rwkv / RWKV-PEFT state tuning: one
//! tensor `blocks.N.att.time_state` of shape `[H, N, N]` (value-major) per
//! layer; only the WKV part is stored (the token-shift vectors start at zero).
//! They are read from safetensors or PyTorch `.pth` (RWKV-PEFT) files alike.
use std::collections::HashMap;
use std::path::Path;

use super::load::{
    read_f32_tensors, read_file, read_tensors, write_f32_tensors, write_file, F32Tensor, StoreDType,
};
use super::weights::Config;
use crate::error::{Error, Result};

/// Recurrent state of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    /// Time-mix token shift: the last `ln1` output `[C]`.
    pub att_x: Vec<f32>,
    /// Channel-mix token shift: the last `ln2` output `[C]`.
    pub ffn_x: Vec<f32>,
    /// WKV state `[H, N, N]`, value-major.
    pub wkv: Vec<f32>,
}

/// Recurrent state of the whole model (one [`LayerState`] per layer).
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// One state per layer.
    pub layers: Vec<LayerState>,
}

impl State {
    /// The zero state (start of a document).
    pub fn zeros(cfg: &Config) -> State {
        let c = cfg.n_embd;
        let layers = (0..cfg.n_layer)
            .map(|_| LayerState {
                att_x: vec![0.0; c],
                ffn_x: vec![0.0; c],
                wkv: vec![0.0; cfg.n_head * cfg.head_size * cfg.head_size],
            })
            .collect();
        State { layers }
    }

    /// Checks the state's sizes against a config (named errors).
    pub fn check(&self, cfg: &Config) -> Result<()> {
        if self.layers.len() != cfg.n_layer {
            return Err(Error::Shape {
                name: "state.layers".into(),
                expected: vec![cfg.n_layer],
                got: vec![self.layers.len()],
            });
        }
        let c = cfg.n_embd;
        let (h, n) = (cfg.n_head, cfg.head_size);
        for (l, s) in self.layers.iter().enumerate() {
            for (what, v, want) in [
                ("att_x", &s.att_x, vec![c]),
                ("ffn_x", &s.ffn_x, vec![c]),
                ("wkv", &s.wkv, vec![h, n, n]),
            ] {
                if v.len() != want.iter().product::<usize>() {
                    return Err(Error::Shape {
                        name: format!("state.layers[{l}].{what}"),
                        expected: want,
                        got: vec![v.len()],
                    });
                }
            }
        }
        Ok(())
    }

    /// Sets every value to zero, keeping the sizes.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.att_x.fill(0.0);
            l.ffn_x.fill(0.0);
            l.wkv.fill(0.0);
        }
    }

    /// The WKV states as `blocks.N.att.time_state` tensors `[H, N, N]`.
    pub fn time_state_tensors(&self, cfg: &Config) -> Vec<F32Tensor> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, s)| F32Tensor {
                name: format!("blocks.{l}.att.time_state"),
                shape: vec![cfg.n_head, cfg.head_size, cfg.head_size],
                data: s.wkv.clone(),
            })
            .collect()
    }

    /// Serialises the WKV states to safetensors bytes in `dtype`.
    pub fn to_safetensors_bytes(&self, cfg: &Config, dtype: StoreDType) -> Result<Vec<u8>> {
        self.check(cfg)?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("rwkv_tune.kind".to_string(), "rwkv7_time_state".to_string());
        write_f32_tensors(&self.time_state_tensors(cfg), dtype, Some(meta))
    }

    /// Writes a state file (`blocks.N.att.time_state` `[H, N, N]`).
    pub fn save(&self, path: impl AsRef<Path>, cfg: &Config, dtype: StoreDType) -> Result<()> {
        let bytes = self.to_safetensors_bytes(cfg, dtype)?;
        write_file(path.as_ref(), &bytes)
    }

    /// Reads a state file and checks it against `cfg`: every layer's
    /// `blocks.N.att.time_state` must be present with shape `[H, N, N]` (a
    /// leading batch dimension of 1 is accepted); f32, f16 and bf16 are
    /// accepted; unknown tensors are an error. Token-shift vectors start at zero.
    pub fn load(path: impl AsRef<Path>, cfg: &Config) -> Result<State> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Self::from_bytes(&bytes, path, cfg)
    }

    /// Like [`State::load`] for safetensors bytes already in memory (`path`
    /// for messages).
    pub fn from_safetensors_bytes(bytes: &[u8], path: &Path, cfg: &Config) -> Result<State> {
        Self::from_tensors(read_f32_tensors(bytes, path)?, path, cfg)
    }

    /// Like [`State::load`] for safetensors or PyTorch `.pth` bytes (told
    /// apart by content), e.g. an RWKV-PEFT state file.
    pub fn from_bytes(bytes: &[u8], path: &Path, cfg: &Config) -> Result<State> {
        Self::from_tensors(read_tensors(bytes, path)?, path, cfg)
    }

    /// Builds a state from `blocks.N.att.time_state` tensors (`path` for
    /// messages).
    pub fn from_tensors(mut tensors: Vec<F32Tensor>, path: &Path, cfg: &Config) -> Result<State> {
        // Check layers in order so errors name the first offending layer.
        let layer_of = |n: &str| {
            n.strip_prefix("blocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(usize::MAX)
        };
        tensors.sort_by_key(|t| (layer_of(&t.name), t.name.clone()));
        let mut state = State::zeros(cfg);
        let (h, n) = (cfg.n_head, cfg.head_size);
        let mut seen = vec![false; cfg.n_layer];
        for t in tensors {
            let layer = t
                .name
                .strip_prefix("blocks.")
                .and_then(|r| r.strip_suffix(".att.time_state"))
                .and_then(|l| l.parse::<usize>().ok());
            let Some(l) = layer else {
                return Err(Error::Model(format!(
                    "unexpected tensor `{}` in state file {} (expected blocks.N.att.time_state)",
                    t.name,
                    path.display()
                )));
            };
            if l >= cfg.n_layer {
                return Err(Error::Model(format!(
                    "state tensor `{}` is for layer {l}, but the model has {} layers",
                    t.name, cfg.n_layer
                )));
            }
            if seen[l] {
                return Err(Error::Model(format!(
                    "state file {} has two tensors for layer {l} (`{}` is the second); refusing \
                     to pick one",
                    path.display(),
                    t.name
                )));
            }
            let ok = t.shape == [h, n, n] || t.shape == [1, h, n, n];
            if !ok {
                return Err(Error::Shape {
                    name: t.name,
                    expected: vec![h, n, n],
                    got: t.shape,
                });
            }
            crate::guard::check_finite(&format!("state tensor `{}`", t.name), &t.data)?;
            state.layers[l].wkv = t.data;
            seen[l] = true;
        }
        if let Some(l) = seen.iter().position(|s| !s) {
            return Err(Error::MissingTensor(format!("blocks.{l}.att.time_state")));
        }
        Ok(state)
    }
}
