//! The `--reduce*` options shared by `eval`, `generate` and `reduce-bench`
//! (training-free token reduction of the prefill, `model::reduce`).
use anyhow::Context;
use rwkv_tune::model::reduce::{default_layers, Method, ReduceConfig, Score, Similarity};
use rwkv_tune::model::Config;

/// How a removed token's match is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sim {
    /// Cosine on the score's feature vectors (the paper).
    Feature,
    /// Cosine on the time mix's output dx.
    Dx,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ReduceArgs {
    /// Token reduction of the prefill: the fraction (0 ≤ RATIO < 1) of the
    /// layers' counted FLOPs to save, by removing tokens after the time mix
    /// of the anchor layers (--reduce-layers) with the same per-layer ratio
    /// (see docs/token-reduction.md). The last token, and in `eval` the
    /// scored answer tokens, are never removed. Decoding is unchanged.
    #[arg(long, value_name = "RATIO")]
    pub reduce: Option<f64>,
    /// Anchor layers, comma-separated (default: 3,5,7,9 for 12 layers,
    /// 5,8,…,20 for 24, 6,10,…,26 for 32, the same rule otherwise).
    #[arg(long, value_delimiter = ',', value_name = "L,L,…")]
    pub reduce_layers: Option<Vec<usize>>,
    /// hybrid (prune q of the removed tokens in the time-mix output, merge
    /// the residual stream), prune, or merge.
    #[arg(long, default_value = "hybrid", value_name = "METHOD")]
    pub reduce_method: String,
    /// Importance score: wkv, gated, out (optionally -l1, -l2, -mean) or erase.
    #[arg(long, default_value = "wkv", value_name = "SCORE")]
    pub reduce_score: String,
    /// The hybrid's fraction of removed tokens pruned (the rest merged).
    #[arg(long, default_value_t = 0.5, value_name = "Q")]
    pub reduce_q: f64,
    /// Similarity for matching.
    #[arg(long, value_enum, default_value_t = Sim::Feature)]
    pub reduce_sim: Sim,
    /// RATIO is the fraction of tokens removed at each anchor layer
    /// instead of the FLOPs to save.
    #[arg(long)]
    pub reduce_per_layer: bool,
    /// Let removed tokens be merged into protected ones (by default the
    /// protected tokens are left exactly as computed).
    #[arg(long)]
    pub reduce_into_protected: bool,
}

impl ReduceArgs {
    /// The setting for a model of config `cfg` (`None` without --reduce).
    pub fn config(&self, cfg: &Config) -> anyhow::Result<Option<ReduceConfig>> {
        let Some(r) = self.reduce else {
            return Ok(None);
        };
        let layers = self
            .reduce_layers
            .clone()
            .unwrap_or_else(|| default_layers(cfg.n_layer));
        let mut red = if self.reduce_per_layer {
            ReduceConfig::uniform(&layers, r)
        } else {
            ReduceConfig::for_target(cfg, &layers, r)
        }
        .context("--reduce / --reduce-layers")?;
        red.method = self
            .reduce_method
            .parse::<Method>()
            .context("--reduce-method")?;
        red.score = self
            .reduce_score
            .parse::<Score>()
            .context("--reduce-score")?;
        red.q = self.reduce_q;
        red.merge_into_protected = self.reduce_into_protected;
        red.sim = match self.reduce_sim {
            Sim::Feature => Similarity::Feature,
            Sim::Dx => Similarity::Dx,
        };
        red.validate(cfg.n_layer).context("--reduce options")?;
        Ok(Some(red))
    }
}

/// One line describing a setting.
pub fn describe(red: &ReduceConfig) -> String {
    let layers: Vec<String> = red.anchors.iter().map(|a| a.layer.to_string()).collect();
    let ratio = red.anchors.first().map_or(0.0, |a| a.ratio);
    format!(
        "{} at layers [{}], {:.1} % of the tokens per layer, score {}, q {}",
        red.method,
        layers.join(","),
        100.0 * ratio,
        red.score,
        red.q
    )
}
