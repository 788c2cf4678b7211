//! `rwkv-tune eval` (placeholder until the model module lands).
#[derive(clap::Args)]
pub struct EvalArgs {}

pub fn run(_a: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`eval` is not implemented yet")
}
