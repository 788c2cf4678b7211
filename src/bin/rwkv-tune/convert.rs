//! `rwkv-tune convert`: safetensors ↔ PyTorch `.pth` for models and states,
//! and states to the RWKV-PEFT layout.
use std::path::PathBuf;

use anyhow::Context;
use rwkv_tune::convert::{convert, Target};
use rwkv_tune::model::StoreDType;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    rwkv-tune convert RWKV-x070-World-0.1B.pth model.safetensors\n  \
    rwkv-tune convert tuned.safetensors tuned-peft.pth --to peft\n  \
    rwkv-tune convert model.safetensors model-bf16.pth --dtype bf16")]
pub struct ConvertArgs {
    /// Input: safetensors or PyTorch `.pth` (told apart by content).
    pub input: PathBuf,
    /// Output file.
    pub output: PathBuf,
    /// Stored dtype (default: the input's when all tensors share one, else f32).
    #[arg(long)]
    pub dtype: Option<StoreDType>,
    /// Output format: safetensors, pth, or peft (a state as RWKV-PEFT loads
    /// it: `.pth` of `blocks.N.att.time_state` [H,N,N]). Default: from the
    /// output's extension.
    #[arg(long)]
    pub to: Option<Target>,
    /// Transpose every [N,N] block of a state (repairs a state saved
    /// key-major by a v6-era script; see docs/file-formats.md).
    #[arg(long)]
    pub transpose_state: bool,
}

pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    rwkv_tune::guard::check_outputs(
        &[("the input", a.input.as_path())],
        &[("the output", a.output.as_path())],
    )?;
    let r = convert(&a.input, &a.output, a.to, a.dtype, a.transpose_state)
        .with_context(|| format!("converting {}", a.input.display()))?;
    println!(
        "{} {:?} → {:?}: {} tensors{}, stored as {:?} in {}",
        a.input.display(),
        r.from,
        r.to,
        r.tensors,
        if r.is_state { " (state)" } else { "" },
        r.dtype,
        a.output.display()
    );
    Ok(())
}
