//! The CUDA backend: a [`tileflow_engine::backend::Backend`] whose weights, activations, KV pool
//! and expert slots live in VRAM, and a [`tileflow_engine::tier::TierMemory`] whose host tier is
//! page-locked memory the storage backend reads into and the GPU copy engine reads from.
//!
//! Everything CUDA is behind the `cuda` feature and loaded at run time (cudarc's dynamic
//! loading), so a `cuda` build starts on a machine without a driver and [`probe`] says there is
//! no GPU. Without the feature, [`probe`] always finds none.

mod probe;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use probe::{probe, GpuError, GpuInfo, CUDA_BUILT};

#[cfg(feature = "cuda")]
pub use cuda::{open_model, CudaBackend, CudaDevice, CudaModel, CudaTierMemory};
