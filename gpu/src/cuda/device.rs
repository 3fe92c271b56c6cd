//! One GPU: its context, the compute and copy streams, cuBLAS, and the kernels compiled for it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::launch::Launch;
use super::{driver_err, driver_present, CUDA_MAJOR};
use crate::probe::{GpuError, GpuInfo};

/// The kernel sources, compiled together as one module (`common.cuh` first).
const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    (
        "elementwise.cu",
        include_str!("../../kernels/elementwise.cu"),
    ),
    ("norm.cu", include_str!("../../kernels/norm.cu")),
    ("rope.cu", include_str!("../../kernels/rope.cu")),
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    ("route.cu", include_str!("../../kernels/route.cu")),
    ("qkv.cu", include_str!("../../kernels/qkv.cu")),
    ("logits.cu", include_str!("../../kernels/logits.cu")),
    ("gemv.cu", include_str!("../../kernels/gemv.cu")),
    ("experts.cu", include_str!("../../kernels/experts.cu")),
];

/// Every kernel the backend launches; the discriminant indexes [`CudaDevice`]'s loaded functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Embed,
    RmsNorm,
    AddRmsNorm,
    Clamp,
    Swiglu,
    AddGated,
    GatherRows,
    AddBias,
    ToBf16,
    WriteKv,
    Rope,
    Attention,
    Route,
    Gemv,
    ExpertsGateUp,
    ExpertsDown,
    ExpertsCombine,
    MoePlan,
    QkvPrepare,
    LogitSummary,
    GemvOneRowC1,
    GemvOneRowC2,
    GemvOneRowC4,
    GemvOneRowC8,
    GemvOneRow3C1,
    GemvOneRow3C2,
    GemvOneRow3C4,
    GemvOneRow3C8,
    ExpertsGateUpOneRowC1,
    ExpertsGateUpOneRowC2,
    ExpertsGateUpOneRowC4,
    ExpertsDownCombineOneRowC1,
    ExpertsDownCombineOneRowC2,
    ExpertsDownCombineOneRowC4,
    ExpertsDownCombineOneRowC8,
    GemvNormOneRow3C1,
    GemvNormOneRow3C2,
    GemvNormOneRow3C4,
    GemvNormOneRow3C8,
}

impl Kernel {
    /// All of them, in discriminant order.
    pub(crate) const ALL: [Kernel; 39] = [
        Kernel::Embed,
        Kernel::RmsNorm,
        Kernel::AddRmsNorm,
        Kernel::Clamp,
        Kernel::Swiglu,
        Kernel::AddGated,
        Kernel::GatherRows,
        Kernel::AddBias,
        Kernel::ToBf16,
        Kernel::WriteKv,
        Kernel::Rope,
        Kernel::Attention,
        Kernel::Route,
        Kernel::Gemv,
        Kernel::ExpertsGateUp,
        Kernel::ExpertsDown,
        Kernel::ExpertsCombine,
        Kernel::MoePlan,
        Kernel::QkvPrepare,
        Kernel::LogitSummary,
        Kernel::GemvOneRowC1,
        Kernel::GemvOneRowC2,
        Kernel::GemvOneRowC4,
        Kernel::GemvOneRowC8,
        Kernel::GemvOneRow3C1,
        Kernel::GemvOneRow3C2,
        Kernel::GemvOneRow3C4,
        Kernel::GemvOneRow3C8,
        Kernel::ExpertsGateUpOneRowC1,
        Kernel::ExpertsGateUpOneRowC2,
        Kernel::ExpertsGateUpOneRowC4,
        Kernel::ExpertsDownCombineOneRowC1,
        Kernel::ExpertsDownCombineOneRowC2,
        Kernel::ExpertsDownCombineOneRowC4,
        Kernel::ExpertsDownCombineOneRowC8,
        Kernel::GemvNormOneRow3C1,
        Kernel::GemvNormOneRow3C2,
        Kernel::GemvNormOneRow3C4,
        Kernel::GemvNormOneRow3C8,
    ];

    /// `gemv_one_row_c<C>` for `c` columns per warp (the largest it is built for, not above `c`).
    pub(crate) fn gemv_one_row(c: u32) -> Kernel {
        match c {
            8.. => Kernel::GemvOneRowC8,
            4..=7 => Kernel::GemvOneRowC4,
            2..=3 => Kernel::GemvOneRowC2,
            _ => Kernel::GemvOneRowC1,
        }
    }

    /// `gemv_one_row3_c<C>` for `c` columns per warp (the largest it is built for, not above `c`).
    pub(crate) fn gemv_one_row3(c: u32) -> Kernel {
        match c {
            8.. => Kernel::GemvOneRow3C8,
            4..=7 => Kernel::GemvOneRow3C4,
            2..=3 => Kernel::GemvOneRow3C2,
            _ => Kernel::GemvOneRow3C1,
        }
    }

    /// `gemv_norm_one_row3_c<C>` for `c` columns per warp (the largest it is built for, not
    /// above `c`).
    pub(crate) fn gemv_norm_one_row3(c: u32) -> Kernel {
        match c {
            8.. => Kernel::GemvNormOneRow3C8,
            4..=7 => Kernel::GemvNormOneRow3C4,
            2..=3 => Kernel::GemvNormOneRow3C2,
            _ => Kernel::GemvNormOneRow3C1,
        }
    }

    /// `experts_gate_up_one_row_c<C>` for `c` columns per warp (the largest it is built for, not above `c`).
    pub(crate) fn experts_gate_up_one_row(c: u32) -> Kernel {
        match c {
            4.. => Kernel::ExpertsGateUpOneRowC4,
            2..=3 => Kernel::ExpertsGateUpOneRowC2,
            _ => Kernel::ExpertsGateUpOneRowC1,
        }
    }

    /// `experts_down_combine_one_row_c<C>` for `c` columns per warp (the largest it is built for, not above `c`).
    pub(crate) fn experts_down_combine_one_row(c: u32) -> Kernel {
        match c {
            8.. => Kernel::ExpertsDownCombineOneRowC8,
            4..=7 => Kernel::ExpertsDownCombineOneRowC4,
            2..=3 => Kernel::ExpertsDownCombineOneRowC2,
            _ => Kernel::ExpertsDownCombineOneRowC1,
        }
    }

    /// The `extern "C"` name in `gpu/kernels/`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Embed => "embed",
            Kernel::RmsNorm => "rms_norm",
            Kernel::AddRmsNorm => "add_rms_norm",
            Kernel::Clamp => "clamp",
            Kernel::Swiglu => "swiglu",
            Kernel::AddGated => "add_gated",
            Kernel::GatherRows => "gather_rows",
            Kernel::AddBias => "add_bias",
            Kernel::ToBf16 => "to_bf16",
            Kernel::WriteKv => "write_kv",
            Kernel::Rope => "rope",
            Kernel::Attention => "attention",
            Kernel::Route => "route",
            Kernel::Gemv => "gemv",
            Kernel::ExpertsGateUp => "experts_gate_up",
            Kernel::ExpertsDown => "experts_down",
            Kernel::ExpertsCombine => "experts_combine",
            Kernel::MoePlan => "moe_plan",
            Kernel::QkvPrepare => "qkv_prepare",
            Kernel::LogitSummary => "logit_summary",
            Kernel::GemvOneRowC1 => "gemv_one_row_c1",
            Kernel::GemvOneRowC2 => "gemv_one_row_c2",
            Kernel::GemvOneRowC4 => "gemv_one_row_c4",
            Kernel::GemvOneRowC8 => "gemv_one_row_c8",
            Kernel::GemvOneRow3C1 => "gemv_one_row3_c1",
            Kernel::GemvOneRow3C2 => "gemv_one_row3_c2",
            Kernel::GemvOneRow3C4 => "gemv_one_row3_c4",
            Kernel::GemvOneRow3C8 => "gemv_one_row3_c8",
            Kernel::ExpertsGateUpOneRowC1 => "experts_gate_up_one_row_c1",
            Kernel::ExpertsGateUpOneRowC2 => "experts_gate_up_one_row_c2",
            Kernel::ExpertsGateUpOneRowC4 => "experts_gate_up_one_row_c4",
            Kernel::ExpertsDownCombineOneRowC1 => "experts_down_combine_one_row_c1",
            Kernel::ExpertsDownCombineOneRowC2 => "experts_down_combine_one_row_c2",
            Kernel::ExpertsDownCombineOneRowC4 => "experts_down_combine_one_row_c4",
            Kernel::ExpertsDownCombineOneRowC8 => "experts_down_combine_one_row_c8",
            Kernel::GemvNormOneRow3C1 => "gemv_norm_one_row3_c1",
            Kernel::GemvNormOneRow3C2 => "gemv_norm_one_row3_c2",
            Kernel::GemvNormOneRow3C4 => "gemv_norm_one_row3_c4",
            Kernel::GemvNormOneRow3C8 => "gemv_norm_one_row3_c8",
        }
    }
}

/// The architectures NVRTC is asked for (its option wants a `'static` string).
const ARCHS: &[(u32, u32, &str)] = &[
    (7, 0, "sm_70"),
    (7, 5, "sm_75"),
    (8, 0, "sm_80"),
    (8, 6, "sm_86"),
    (8, 7, "sm_87"),
    (8, 9, "sm_89"),
    (9, 0, "sm_90"),
    (10, 0, "sm_100"),
    (10, 3, "sm_103"),
    (12, 0, "sm_120"),
];

/// A GPU opened for the engine: the context, a compute stream every op runs on, a copy stream
/// for the expert tiers' host → device copies, cuBLAS on the compute stream, and the kernels.
pub struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) compute: Arc<CudaStream>,
    pub(crate) copy: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    kernels: Vec<CudaFunction>,
    _module: Arc<CudaModule>,
    info: GpuInfo,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({})", self.info)
    }
}

impl fmt::Display for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{}", self.info.ordinal)
    }
}

/// What the driver says about device `ordinal`.
pub(super) fn info(ordinal: usize) -> Result<GpuInfo, GpuError> {
    let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(format!("cuda:{ordinal}"), e))?;
    let what = || format!("cuda:{ordinal}: device attributes");
    let name = ctx.name().map_err(|e| driver_err(what(), e))?;
    let total = ctx.total_mem().map_err(|e| driver_err(what(), e))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_err(what(), e))?;
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_err(what(), e))?;
    Ok(GpuInfo {
        ordinal,
        name,
        total_memory: total as u64,
        compute_capability: (major.max(0) as u32, minor.max(0) as u32),
        multiprocessors: sms.max(1) as u32,
    })
}

fn driver_version() -> i32 {
    let mut v = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer; the driver is loaded
    // (callers checked `driver_present`).
    let _ = unsafe { sys::cuDriverGetVersion(&mut v) };
    v
}

impl CudaDevice {
    /// Opens GPU `ordinal`: creates its streams and cuBLAS handle and loads the kernels,
    /// compiled by NVRTC for its architecture or read from `kernel_cache` (a directory; the
    /// compiled module is keyed by source hash, architecture and driver version). A cache that
    /// cannot be written is logged and skipped.
    pub fn open(ordinal: usize, kernel_cache: Option<&Path>) -> Result<Arc<CudaDevice>, GpuError> {
        if !driver_present() {
            return Err(GpuError::Library {
                library: "libcuda.so",
                version: CUDA_MAJOR,
            });
        }
        // SAFETY: dlopen of the libraries only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::Library {
                library: "libnvrtc.so",
                version: CUDA_MAJOR,
            });
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::Library {
                library: "libcublas.so",
                version: CUDA_MAJOR,
            });
        }
        let count = super::probe()?.len();
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let info = info(ordinal)?;
        let name = format!("cuda:{ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&name, e))?;
        // Every activation lives on the compute stream and the tiers order their copies with
        // explicit events, so cudarc's per-buffer event tracking would only add work per launch.
        // SAFETY: no buffer of this context exists yet, and buffers are only shared between
        // streams through the explicit events of `CudaTierMemory`.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let compute = ctx
            .new_stream()
            .map_err(|e| driver_err(format!("{name}: compute stream"), e))?;
        let copy = ctx
            .new_stream()
            .map_err(|e| driver_err(format!("{name}: copy stream"), e))?;
        let blas = CudaBlas::new(compute.clone()).map_err(|e| GpuError::Driver {
            what: format!("{name}: cuBLAS"),
            reason: e.to_string(),
        })?;
        let ptx = compile_cached(&info, kernel_cache)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| driver_err(format!("{name}: loading the kernels"), e))?;
        let kernels = Kernel::ALL
            .iter()
            .map(|k| {
                let k = k.name();
                module
                    .load_function(k)
                    .map_err(|e| driver_err(format!("{name}: kernel {k}"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(device = %info, "GPU opened");
        Ok(Arc::new(CudaDevice {
            ctx,
            compute,
            copy,
            blas,
            kernels,
            _module: module,
            info,
        }))
    }

    /// What the driver says about this GPU.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// A launch of kernel `k` on the compute stream, with programmatic dependent launch where
    /// the GPU has it (compute capability 9.0 on; see [`Launch`]).
    pub(crate) fn launch(&self, k: Kernel) -> Launch<'_> {
        let dependent = self.info.compute_capability.0 >= 9;
        Launch::new(&self.kernels[k as usize], &self.compute, dependent)
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> Option<usize> {
        cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, _)| free)
    }
}

/// Bytes of freed stream-ordered allocations the device's default memory pool keeps for reuse.
/// The driver's default (none) hands every freed activation back at each synchronisation, so
/// the next decode step maps fresh memory for all of them; a step's activations are far below
/// this.
const POOL_KEEP: u64 = 256 << 20;

/// Raises the default memory pool's release threshold to [`POOL_KEEP`]; a driver that refuses
/// only costs speed, so it is logged.
fn keep_pool_memory(ctx: &CudaContext) {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut keep = POOL_KEEP;
    // SAFETY: the context is current (CudaContext::new binds it); the driver writes one pool
    // handle through `pool`, and reads one u64 through the attribute's pointer, as the
    // release threshold attribute is defined.
    let r = unsafe {
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        } else {
            r
        }
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        tracing::warn!(result = ?r, "memory pool release threshold not set");
    }
}

/// The kernel module's PTX: from the cache when a file for this source, architecture and
/// driver is there, compiled (and stored) otherwise.
fn compile_cached(info: &GpuInfo, cache: Option<&Path>) -> Result<Ptx, GpuError> {
    let (major, minor) = info.compute_capability;
    let arch = ARCHS
        .iter()
        .rev()
        .find(|(ma, mi, _)| (*ma, *mi) <= (major, minor))
        .map_or("sm_70", |a| a.2);
    let source = source();
    let key = format!(
        "kernels-{:016x}-{arch}-{}.ptx",
        xxhash_rust::xxh3::xxh3_64(source.as_bytes()),
        driver_version()
    );
    let path: Option<PathBuf> = cache.map(|dir| dir.join(&key));
    if let Some(p) = &path {
        if let Ok(text) = std::fs::read_to_string(p) {
            tracing::debug!(path = %p.display(), "kernels from the cache");
            return Ok(Ptx::from_src(text));
        }
    }
    let started = std::time::Instant::now();
    let ptx = compile(&source, arch)?;
    tracing::info!(
        arch,
        ms = started.elapsed().as_millis() as u64,
        "kernels compiled"
    );
    if let Some(p) = &path {
        if let Err(e) = store(p, &ptx.to_src()) {
            tracing::warn!(error = %e, "kernel cache not written; kernels compile at every start");
        }
    }
    Ok(ptx)
}

/// The kernel files as one program.
fn source() -> String {
    SOURCES
        .iter()
        .map(|(file, text)| format!("// ---- {file}\n{text}\n"))
        .collect()
}

/// NVRTC's PTX of `source` for `arch`.
fn compile(source: &str, arch: &'static str) -> Result<Ptx, GpuError> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| GpuError::Compile {
        file: "gpu/kernels/*.cu",
        arch: arch.to_string(),
        log: e.to_string(),
    })
}

/// Writes `text` to `path` through a temporary file, so a reader never sees half a module.
fn store(path: &Path, text: &str) -> Result<(), GpuError> {
    let err = |source| GpuError::Cache {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile for every architecture we name, wherever libnvrtc can be loaded (no
    /// GPU needed); every kernel the backend launches is in the PTX.
    #[test]
    fn kernels_compile_for_every_architecture() {
        // SAFETY: dlopen only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            // CI fetches NVRTC and sets this, so there a missing library is a failure.
            assert!(
                std::env::var_os("TILEFLOW_REQUIRE_NVRTC").is_none(),
                "libnvrtc.so.{CUDA_MAJOR} is not on the library path"
            );
            eprintln!("libnvrtc.so.{CUDA_MAJOR} not found: kernel compilation not checked");
            return;
        }
        let src = source();
        for (_, _, arch) in ARCHS.iter().filter(|a| a.0 >= 8) {
            let ptx = compile(&src, arch).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for k in Kernel::ALL.map(Kernel::name) {
                assert!(
                    text.contains(&format!(".entry {k}(")),
                    "{arch}: no kernel {k}"
                );
            }
        }
    }
}
