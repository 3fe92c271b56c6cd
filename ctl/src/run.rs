//! `tilectl run` and `tilectl demo`: offline generation on the CPU backend.

use std::path::Path;

use crate::cli::{DemoArgs, RunArgs};

/// `tilectl run MODEL --prompt TEXT`.
pub fn run(_state_dir: &Path, _args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("generation arrives with the engine")
}

/// `tilectl demo`.
pub fn demo(_state_dir: &Path, _args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("generation arrives with the engine")
}
