//! `rwkv-tune wkv7`: placeholder
#[derive(clap::Args)]
pub struct Wkv7Args {}
pub fn run(_a: Wkv7Args) -> anyhow::Result<()> {
    Ok(())
}
