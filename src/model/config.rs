//! Reading a [`Config`] off checkpoint tensor shapes, checking it, and the
//! list of tensors (official names and shapes) that a config implies.
use std::collections::HashMap;

use crate::error::{Error, Result};

pub use super::weights::Config;

/// What kind of tensor a name is, for shape checks: a `[C]`-like vector may
/// be stored `[C]`, `[1, C]` or `[1, 1, C]`; everything else must match exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Vector,
    Matrix,
}

/// One expected tensor: official name, canonical (official) shape, kind, and
/// whether it may be absent (layer-0 `v0/v1/v2`).
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    pub(crate) kind: Kind,
    /// Whether the tensor may be absent.
    pub optional: bool,
}

impl TensorSpec {
    /// Does a stored shape fit this spec?
    pub fn accepts(&self, got: &[usize]) -> bool {
        if got == self.shape.as_slice() {
            return true;
        }
        match self.kind {
            Kind::Matrix => false,
            Kind::Vector => {
                let n: usize = self.shape.iter().product();
                got.last() == Some(&n) && got.iter().rev().skip(1).all(|&d| d == 1)
            }
        }
    }
}

fn vec_spec(name: String, c: usize, optional: bool) -> TensorSpec {
    TensorSpec {
        name,
        shape: vec![1, 1, c],
        kind: Kind::Vector,
        optional,
    }
}

fn ln_specs(prefix: &str, c: usize, out: &mut Vec<TensorSpec>) {
    for part in ["weight", "bias"] {
        out.push(TensorSpec {
            name: format!("{prefix}.{part}"),
            shape: vec![c],
            kind: Kind::Vector,
            optional: false,
        });
    }
}

fn mat_spec(name: String, shape: [usize; 2], optional: bool) -> TensorSpec {
    TensorSpec {
        name,
        shape: shape.to_vec(),
        kind: Kind::Matrix,
        optional,
    }
}

impl Config {
    /// Checks the internal consistency of the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Model(m));
        if self.n_layer == 0 || self.n_embd == 0 || self.vocab == 0 {
            return bad(format!(
                "n_layer ({}), n_embd ({}) and vocab ({}) must be positive",
                self.n_layer, self.n_embd, self.vocab
            ));
        }
        if self.n_head == 0 || self.head_size == 0 || self.n_head * self.head_size != self.n_embd {
            return bad(format!(
                "n_head ({}) × head_size ({}) must equal n_embd ({})",
                self.n_head, self.head_size, self.n_embd
            ));
        }
        if self.d_w == 0 || self.d_a == 0 || self.d_g == 0 || self.d_ffn == 0 {
            return bad(format!(
                "LoRA widths (d_w {}, d_a {}, d_g {}) and d_ffn ({}) must be positive",
                self.d_w, self.d_a, self.d_g, self.d_ffn
            ));
        }
        if self.n_layer > 1 && self.d_v == 0 {
            return bad("d_v must be positive when there is more than one layer".into());
        }
        Ok(())
    }

    /// Every tensor of a checkpoint with this config, with its official
    /// BlinkDL x070 name and shape. Layer 0's `v0/v1/v2` are listed as optional
    /// (present in `.pth` files, unused by the math).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let c = self.n_embd;
        let mut s = Vec::new();
        s.push(mat_spec("emb.weight".into(), [self.vocab, c], false));
        for l in 0..self.n_layer {
            let p = format!("blocks.{l}");
            if l == 0 {
                ln_specs(&format!("{p}.ln0"), c, &mut s);
            }
            ln_specs(&format!("{p}.ln1"), c, &mut s);
            ln_specs(&format!("{p}.ln2"), c, &mut s);
            let a = format!("{p}.att");
            for m in [
                "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a",
            ] {
                s.push(vec_spec(format!("{a}.{m}"), c, false));
            }
            let v_opt = l == 0;
            if self.d_v > 0 || l > 0 {
                s.push(vec_spec(format!("{a}.v0"), c, v_opt));
                s.push(mat_spec(format!("{a}.v1"), [c, self.d_v], v_opt));
                s.push(mat_spec(format!("{a}.v2"), [self.d_v, c], v_opt));
            }
            s.push(mat_spec(format!("{a}.w1"), [c, self.d_w], false));
            s.push(mat_spec(format!("{a}.w2"), [self.d_w, c], false));
            s.push(mat_spec(format!("{a}.a1"), [c, self.d_a], false));
            s.push(mat_spec(format!("{a}.a2"), [self.d_a, c], false));
            s.push(mat_spec(format!("{a}.g1"), [c, self.d_g], false));
            s.push(mat_spec(format!("{a}.g2"), [self.d_g, c], false));
            s.push(mat_spec(
                format!("{a}.r_k"),
                [self.n_head, self.head_size],
                false,
            ));
            for m in ["receptance", "key", "value", "output"] {
                s.push(mat_spec(format!("{a}.{m}.weight"), [c, c], false));
            }
            ln_specs(&format!("{a}.ln_x"), c, &mut s);
            s.push(vec_spec(format!("{p}.ffn.x_k"), c, false));
            s.push(mat_spec(
                format!("{p}.ffn.key.weight"),
                [self.d_ffn, c],
                false,
            ));
            s.push(mat_spec(
                format!("{p}.ffn.value.weight"),
                [c, self.d_ffn],
                false,
            ));
        }
        ln_specs("ln_out", c, &mut s);
        s.push(mat_spec("head.weight".into(), [self.vocab, c], false));
        s
    }

    /// Infers the config from a map of official tensor names to shapes
    /// (`emb.weight` gives V and C, `blocks.0.att.r_k` gives H and N, the LoRA
    /// factors their widths, `ffn.key.weight` the FFN width; the layer count is
    /// one more than the largest `blocks.N` index).
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Config> {
        let get = |name: &str| -> Result<&Vec<usize>> {
            shapes
                .get(name)
                .ok_or_else(|| Error::MissingTensor(name.to_string()))
        };
        let dim2 = |name: &str| -> Result<[usize; 2]> {
            let s = get(name)?;
            if s.len() != 2 {
                return Err(Error::Shape {
                    name: name.to_string(),
                    expected: vec![0, 0],
                    got: s.clone(),
                });
            }
            Ok([s[0], s[1]])
        };
        let [vocab, n_embd] = dim2("emb.weight")?;
        let mut n_layer = 0usize;
        let mut layers = std::collections::BTreeSet::new();
        let mut highest = "";
        for k in shapes.keys() {
            if let Some(rest) = k.strip_prefix("blocks.") {
                let idx = rest.split('.').next().unwrap_or("");
                let l: usize = idx.parse().map_err(|_| {
                    Error::Model(format!("tensor `{k}`: `{idx}` is not a layer index"))
                })?;
                if l.checked_add(1).is_none_or(|n| n > n_layer) {
                    highest = k;
                }
                n_layer = n_layer.max(l.saturating_add(1));
                layers.insert(l);
            }
        }
        if n_layer == 0 {
            return Err(Error::MissingTensor("blocks.0.*".into()));
        }
        // Every layer index below the highest must be present, before any
        // per-layer list is built from n_layer (a stray `blocks.1000000.*`
        // must not make the loader allocate a million layers).
        if layers.len() != n_layer {
            let missing = (0..n_layer).find(|l| !layers.contains(l)).unwrap_or(0);
            return Err(Error::Model(format!(
                "tensor `{highest}` implies {n_layer} layers, but layer {missing} has no tensors \
                 (layer indices must be 0..n_layer without gaps)"
            )));
        }
        let [n_head, head_size] = dim2("blocks.0.att.r_k")?;
        let d_w = dim2("blocks.0.att.w1")?[1];
        let d_a = dim2("blocks.0.att.a1")?[1];
        let d_g = dim2("blocks.0.att.g1")?[1];
        let d_v = if n_layer > 1 {
            dim2("blocks.1.att.v1")?[1]
        } else if shapes.contains_key("blocks.0.att.v1") {
            dim2("blocks.0.att.v1")?[1]
        } else {
            0
        };
        let d_ffn = dim2("blocks.0.ffn.key.weight")?[0];
        let cfg = Config {
            n_layer,
            n_embd,
            n_head,
            head_size,
            vocab,
            d_w,
            d_a,
            d_v,
            d_g,
            d_ffn,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Number of parameters (counting layer-0 `v0/v1/v2` as absent).
    pub fn n_params(&self) -> usize {
        let c = self.n_embd;
        let per_layer =
            18 * c + 2 * c * (self.d_w + self.d_a + self.d_g) + 4 * c * c + 2 * c * self.d_ffn;
        let v_lora = c + 2 * c * self.d_v;
        2 * self.vocab * c + 2 * c + 2 * c + self.n_layer * per_layer + (self.n_layer - 1) * v_lora
    }
}
