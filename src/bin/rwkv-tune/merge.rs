//! `rwkv-tune merge`: a LoRA adapter merged into its base model, written as
//! a plain model (official x070 names) that any RWKV-7 runtime loads.
use std::path::PathBuf;

use anyhow::Context;
use rwkv_tune::model::lora::Adapter;
use rwkv_tune::model::{Naming, StoreDType, Weights};

#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    rwkv-tune tune --demo --method lora --out lora.safetensors\n  \
    rwkv-tune merge --model base.safetensors --adapter lora.safetensors --out merged.safetensors")]
pub struct MergeArgs {
    /// The base model the adapter was trained on (safetensors or `.pth`).
    #[arg(long)]
    pub model: PathBuf,
    /// The LoRA adapter (from `rwkv-tune tune --method lora`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The merged model (safetensors, official x070 names).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Stored dtype of the merged model. Default f32: a bf16 store would
    /// round small adapter updates away.
    #[arg(long, default_value = "f32")]
    pub dtype: StoreDType,
}

/// One line on what an adapter holds.
pub fn describe(ad: &Adapter) -> String {
    let mut parts = Vec::new();
    if let Some(l) = &ad.lora {
        parts.push(format!(
            "LoRA rank {}, alpha {}, {} matrices",
            l.rank,
            l.alpha,
            l.tensors.len()
        ));
    }
    if !ad.sparse.is_empty() {
        let n: usize = ad.sparse.iter().map(|d| d.index.len()).sum();
        parts.push(format!("{n} sparse entries of the recurrent module"));
    }
    parts.join(" + ")
}

pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    rwkv_tune::guard::check_outputs(
        &[
            ("--model", a.model.as_path()),
            ("--adapter", a.adapter.as_path()),
        ],
        &[("--out", a.out.as_path())],
    )?;
    let mut w =
        Weights::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let ad = Adapter::load(&a.adapter, &w.config)?;
    ad.merge_into(&mut w)
        .with_context(|| format!("merging {}", a.adapter.display()))?;
    w.save(&a.out, Naming::Official, a.dtype)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "merged {} ({}) into {}: wrote {} ({:?})",
        a.adapter.display(),
        describe(&ad),
        a.model.display(),
        a.out.display(),
        a.dtype
    );
    Ok(())
}
