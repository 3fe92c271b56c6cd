//! `--device` of the in-process commands (`run --offline`, `bench stream`): the daemon's rules
//! (`auto`, `cpu`, `cuda`, `cuda:N`), with GPU kernels cached in the user's cache directory.

use std::path::PathBuf;

use anyhow::Context;
use tileflow_gpu::{ComputeDevice, DeviceChoice};

/// Parses `--device` for clap.
pub fn parse_choice(text: &str) -> Result<DeviceChoice, String> {
    text.parse()
        .map_err(|e: tileflow_gpu::ParseDeviceError| e.to_string())
}

/// `$XDG_CACHE_HOME/tileflow`, else `~/.cache/tileflow`; none without either (kernels are
/// then compiled at every start).
fn kernel_cache() -> Option<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".cache")))
        .map(|cache| cache.join("tileflow"))
}

/// Opens the device `choice` names (`auto` when not given) on this thread.
pub fn open(choice: Option<DeviceChoice>) -> anyhow::Result<ComputeDevice> {
    let choice = choice.unwrap_or_default();
    let device = ComputeDevice::select(choice, kernel_cache().as_deref())
        .with_context(|| format!("--device {choice} cannot be used"))?;
    if let Some(why) = device.fallback_reason() {
        tracing::info!("device {choice}: using the CPU ({why})");
    }
    Ok(device)
}
