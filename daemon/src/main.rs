//! `tileflowd`, the TileFlow daemon. The Unix-socket API arrives with the daemon issue.

use clap::Parser;

/// TileFlow daemon (not yet serving: see the README for what works now).
#[derive(Debug, Parser)]
#[command(name = "tileflowd", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("tileflowd does not serve yet; use `tilectl run` for offline generation")
}
