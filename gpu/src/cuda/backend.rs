//! The CUDA [`Backend`](tileflow_engine::backend::Backend).

use std::sync::Arc;

use tileflow_engine::backend::BackendError;
use tileflow_engine::dtype::Dtype;

use super::CudaDevice;

/// The CUDA backend on one GPU.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    pub(crate) dev: Arc<CudaDevice>,
    pub(crate) weight_dtype: Dtype,
}

impl CudaBackend {
    /// A backend on `dev` storing matrices as `weight_dtype` (the pack's element type).
    pub fn new(dev: Arc<CudaDevice>, weight_dtype: Dtype) -> Result<CudaBackend, BackendError> {
        Ok(CudaBackend { dev, weight_dtype })
    }
}
