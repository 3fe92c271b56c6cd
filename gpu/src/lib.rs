//! The CUDA backend: a [`tileflow_engine::backend::Backend`] whose weights, activations, KV pool
//! and expert slots live in VRAM, and a [`tileflow_engine::tier::TierMemory`] whose host tier is
//! page-locked memory the storage backend reads into and the GPU copy engine reads from.
//!
//! Everything CUDA is behind the `cuda` feature and loaded at run time (cudarc's dynamic
//! loading), so a `cuda` build starts on a machine without a driver and [`probe`] says there is
//! no GPU. Without the feature, [`probe`] always finds none. [`ComputeDevice`] picks the device
//! (`auto`, `cpu`, `cuda`, `cuda:N`) and opens models on it in either build.

mod probe;
mod select;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use probe::{probe, GpuError, GpuInfo, CUDA_BUILT};
pub use select::{ComputeDevice, DeviceChoice, ParseDeviceError, UseModel};

#[cfg(feature = "cuda")]
pub use cuda::{open_model, CudaBackend, CudaDevice, CudaModel, CudaTierMemory};
