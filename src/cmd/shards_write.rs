#[derive(clap::Args)]
pub struct WriteArgs {}
pub fn run(_args: WriteArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
