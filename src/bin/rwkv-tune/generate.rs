//! `rwkv-tune generate` (placeholder until the model module lands).
#[derive(clap::Args)]
pub struct GenerateArgs {}

pub fn run(_a: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`generate` is not implemented yet")
}
