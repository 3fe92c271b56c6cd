//! The CUDA backend proper (feature `cuda`).

mod backend;
mod device;
mod launch;
mod memory;
mod pinned;

pub use backend::{CudaAct, CudaBackend, CudaExpertTable, CudaKvPool, CudaRoutingLog, CudaWeight};
pub use device::CudaDevice;
pub use memory::{CudaCopy, CudaSlot, CudaTierMemory};

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use tileflow_engine::model::{LoadError, LoadOptions, LoadedModel};
use tileflow_engine::store::Store;

use crate::probe::{GpuError, GpuInfo};

/// A model loaded on a GPU.
pub type CudaModel = LoadedModel<CudaBackend, CudaTierMemory>;

/// The CUDA major version this build loads (`libnvrtc.so.13`, `libcublas.so.13`).
const CUDA_MAJOR: &str = "13";

/// Whether the driver library can be loaded; every other call into cudarc assumes it can.
fn driver_present() -> bool {
    // SAFETY: only dlopens libcuda (cudarc caches the handle); no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

/// The GPUs the driver reports; none where the driver library is absent.
pub(crate) fn probe() -> Result<Vec<GpuInfo>, GpuError> {
    if !driver_present() {
        return Ok(Vec::new());
    }
    let count = match CudaContext::device_count() {
        Ok(n) => usize::try_from(n).unwrap_or(0),
        // No device, or a driver without devices: not an error for a probe.
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
        Err(e) => return Err(driver_err("cuInit / cuDeviceGetCount", e)),
    };
    (0..count).map(device::info).collect()
}

pub(crate) fn driver_err(what: impl Into<String>, e: cudarc::driver::DriverError) -> GpuError {
    GpuError::Driver {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// Opens `name` from `store` on `device`: dense weights, KV pool and expert slots in its VRAM,
/// the host tier in page-locked memory.
pub fn open_model(
    store: &Store,
    name: &str,
    options: &LoadOptions,
    device: &Arc<CudaDevice>,
) -> Result<CudaModel, LoadError> {
    let mut model = LoadedModel::open_on(store, name, options, &device.to_string(), |manifest| {
        let backend = CudaBackend::new(device.clone(), manifest.expert_dtype)?;
        let memory = CudaTierMemory::new(device.clone());
        Ok((backend, memory))
    })?;
    // When VRAM holds every expert, read them all now: the first requests do not wait on
    // storage, and routing stays on the device from the first step (it needs every expert
    // resident).
    let experts = model.runner.experts_mut();
    if experts.capacity() >= model.manifest.experts.len() {
        experts.warm().map_err(|source| LoadError::Engine {
            model: name.to_string(),
            source,
        })?;
    }
    Ok(model)
}
