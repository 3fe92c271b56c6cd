//! Finding GPUs without failing where there are none.

/// Whether this build has the CUDA backend (the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// One GPU the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal (`cuda:N`).
    pub ordinal: usize,
    /// The driver's name for it.
    pub name: String,
    /// Bytes of device memory.
    pub total_memory: u64,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} ({}, {:.1} GiB, sm_{}{})",
            self.ordinal,
            self.name,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.compute_capability.0,
            self.compute_capability.1
        )
    }
}

/// Why the GPU could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// This build has no CUDA backend.
    #[error("this build has no CUDA backend (rebuild with --features cuda)")]
    NotBuilt,
    /// A CUDA library could not be loaded.
    #[error("cannot load {library}: is the NVIDIA driver (and CUDA {version}) installed?")]
    Library {
        /// The library (libcuda, libnvrtc, libcublas).
        library: &'static str,
        /// The CUDA major version the build expects.
        version: &'static str,
    },
    /// There is no device with that ordinal.
    #[error("no GPU cuda:{ordinal}: the driver reports {count}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A driver call failed.
    #[error("{what}: {reason}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        reason: String,
    },
    /// A kernel source did not compile.
    #[error("kernel {file} does not compile for {arch}: {log}")]
    Compile {
        /// The kernel file.
        file: &'static str,
        /// The target architecture.
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// The kernel cache could not be written (the kernels still run from memory).
    #[error("kernel cache {path}: {source}")]
    Cache {
        /// The cache file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The GPUs this process can use: empty without the `cuda` feature, without a driver, or
/// without devices. A driver that loads but fails is an error.
pub fn probe() -> Result<Vec<GpuInfo>, GpuError> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Vec::new())
    }
}
