//! Choosing the compute device: what `--device` (or `engine.device`) asks for, what that is on
//! this machine and build, and opening a model there.
//!
//! The rules, shared by `tileflowd` and `tilectl`: `auto` is the first GPU when the build has
//! CUDA and the driver reports one that opens, else the CPU (a failed probe or open is logged as
//! a warning, never fatal); `cpu` is the CPU; `cuda` and `cuda:N` are that GPU or an error
//! saying why it cannot be used.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use tileflow_engine::backend::Backend;
use tileflow_engine::model::{LoadError, LoadOptions, LoadedModel};
use tileflow_engine::store::Store;
use tileflow_engine::tier::TierMemory;

use crate::probe::{probe, GpuError, CUDA_BUILT};

/// What the user asked for: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first usable GPU, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// A GPU: `cuda` (`None`, the first) or `cuda:N`.
    Cuda(Option<usize>),
}

/// A device name that is none of `auto`, `cpu`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\" (N a GPU ordinal)")]
pub struct ParseDeviceError {
    /// The text as given.
    pub given: String,
}

impl FromStr for DeviceChoice {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<DeviceChoice, ParseDeviceError> {
        let ordinal = |n: &str| {
            // Digits only: `cuda:+1` and `cuda: 1` are typos, not ordinals.
            n.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| n.parse::<usize>().ok())
                .flatten()
        };
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(ordinal)
                .map(|n| DeviceChoice::Cuda(Some(n)))
                .ok_or_else(|| ParseDeviceError {
                    given: s.to_owned(),
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device models are opened on. Holding a GPU keeps its context, streams and kernels
/// alive, so every model opened through one `ComputeDevice` shares them.
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    kind: Kind,
    /// Why `auto` settled on the CPU.
    fallback: Option<String>,
}

#[derive(Debug, Clone)]
enum Kind {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::cuda::CudaDevice>),
}

/// What to do with a model once it is open, whichever device it is on: the one code path the
/// CPU and GPU models share (a closure cannot be generic over the backend, hence a trait).
pub trait UseModel {
    /// What it gives back.
    type Output;

    /// Uses `model`.
    fn use_model<B, M>(self, model: LoadedModel<B, M>) -> Self::Output
    where
        B: Backend + 'static,
        M: TierMemory + 'static;
}

impl ComputeDevice {
    /// The CPU, as asked for.
    pub fn cpu() -> ComputeDevice {
        ComputeDevice {
            kind: Kind::Cpu,
            fallback: None,
        }
    }

    fn cpu_because(why: impl Into<String>) -> ComputeDevice {
        ComputeDevice {
            kind: Kind::Cpu,
            fallback: Some(why.into()),
        }
    }

    /// Resolves `choice` on this machine, opening the GPU it names (kernels compiled by NVRTC
    /// or read from `kernel_cache`). Call it on the thread that will run the models: a GPU's
    /// context is used from there. Fails only for `cuda`/`cuda:N` that cannot be used.
    pub fn select(
        choice: DeviceChoice,
        kernel_cache: Option<&Path>,
    ) -> Result<ComputeDevice, GpuError> {
        match choice {
            DeviceChoice::Cpu => Ok(ComputeDevice::cpu()),
            DeviceChoice::Cuda(ordinal) => open_gpu(ordinal.unwrap_or(0), kernel_cache),
            DeviceChoice::Auto => Ok(ComputeDevice::auto(kernel_cache)),
        }
    }

    fn auto(kernel_cache: Option<&Path>) -> ComputeDevice {
        if !CUDA_BUILT {
            return ComputeDevice::cpu_because("this build has no CUDA backend");
        }
        let gpus = match probe() {
            Ok(gpus) => gpus,
            Err(e) => {
                tracing::warn!(
                    "device auto: the GPU probe failed, using the CPU: {}",
                    tileflow_engine::error_chain(&e)
                );
                return ComputeDevice::cpu_because("the GPU probe failed");
            }
        };
        let Some(first) = gpus.first() else {
            return ComputeDevice::cpu_because("no GPU found");
        };
        match open_gpu(first.ordinal, kernel_cache) {
            Ok(device) => device,
            Err(e) => {
                tracing::warn!(
                    "device auto: {first} cannot be used, using the CPU: {}",
                    tileflow_engine::error_chain(&e)
                );
                ComputeDevice::cpu_because(format!("cuda:{} cannot be used", first.ordinal))
            }
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        !matches!(self.kind, Kind::Cpu)
    }

    /// Why `auto` chose the CPU (no GPU found, a build without CUDA, …); `None` for a GPU or
    /// a CPU asked for.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Opens `name` from `store` on this device and hands it to `then`.
    pub fn open_model<U: UseModel>(
        &self,
        store: &Store,
        name: &str,
        options: &LoadOptions,
        then: U,
    ) -> Result<U::Output, LoadError> {
        match &self.kind {
            Kind::Cpu => Ok(then.use_model(LoadedModel::open(store, name, options)?)),
            #[cfg(feature = "cuda")]
            Kind::Cuda(device) => {
                Ok(then.use_model(crate::cuda::open_model(store, name, options, device)?))
            }
        }
    }
}

/// `cpu`, or the GPU as `cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB, sm_90)`.
impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Kind::Cuda(device) => write!(f, "{}", device.info()),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_gpu(ordinal: usize, kernel_cache: Option<&Path>) -> Result<ComputeDevice, GpuError> {
    let device = crate::cuda::CudaDevice::open(ordinal, kernel_cache)?;
    Ok(ComputeDevice {
        kind: Kind::Cuda(device),
        fallback: None,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_ordinal: usize, _kernel_cache: Option<&Path>) -> Result<ComputeDevice, GpuError> {
    Err(GpuError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(None)),
            ("cuda:0", DeviceChoice::Cuda(Some(0))),
            ("cuda:12", DeviceChoice::Cuda(Some(12))),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice));
            assert_eq!(choice.to_string(), text);
        }
    }

    #[test]
    fn other_names_are_refused_naming_the_value() {
        for bad in [
            "", "tpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda: 1", "gpu:0",
        ] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert_eq!(err.given, bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn cpu_is_always_available_and_auto_falls_back_without_a_gpu() {
        let cpu = ComputeDevice::select(DeviceChoice::Cpu, None).unwrap();
        assert_eq!(
            (cpu.to_string(), cpu.fallback_reason()),
            ("cpu".into(), None)
        );
        if !CUDA_BUILT {
            let auto = ComputeDevice::select(DeviceChoice::Auto, None).unwrap();
            assert!(!auto.is_gpu());
            assert_eq!(
                auto.fallback_reason(),
                Some("this build has no CUDA backend")
            );
            for ordinal in [None, Some(1)] {
                let err = ComputeDevice::select(DeviceChoice::Cuda(ordinal), None).unwrap_err();
                assert!(matches!(err, GpuError::NotBuilt), "{err}");
            }
        }
    }
}
