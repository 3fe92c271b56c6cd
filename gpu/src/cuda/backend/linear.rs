//! `x · wᵀ (+ bias)`: a matrix-vector kernel for the few rows of a decode step, cuBLAS for
//! longer prefills.
//!
//! f32 weights take cuBLAS SGEMM past [`GEMV_MAX_ROWS`] rows. bf16 and f16 weights stay on the
//! matrix-vector kernel (weights widened exactly, f32 activations and sums, as the CPU
//! reference and transformers in f32) up to [`TENSOR_CORE_MIN_ROWS`] rows: a tensor-core GEMM
//! needs bf16 activations, and rounding them moved the logprobs of the small golden models by
//! up to 1 (measured on the GPU host), so only long prefills, where the matrix-vector kernel's
//! re-reads of the weights would dominate, take it.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use tileflow_engine::backend::{check, Backend, BackendError};
use tileflow_engine::dtype::Dtype;

use super::{
    dev_err, dtype_code, elementwise, grid_dim, int, shape_err, split_k, CudaAct, CudaBackend,
    CudaWeight, MAX_ONE_ROW_COLUMNS, ONE_ROW_WARPS_PER_SM,
};
use crate::cuda::device::Kernel;

/// Rows up to which the matrix-vector kernel beats a GEMM (it reads the weights once per 8 rows).
const GEMV_MAX_ROWS: usize = 16;

/// Rows from which bf16 weights go to the tensor cores (bf16 activations).
const TENSOR_CORE_MIN_ROWS: usize = 256;

/// Warps (output columns) per block of the matrix-vector kernel.
const GEMV_WARPS: u32 = 8;

/// The shapes of `x · wᵀ + bias`, and a bias kept as an f32 vector.
fn check_linear(
    x: &CudaAct,
    w: &CudaWeight,
    bias: Option<&CudaWeight>,
) -> Result<(), BackendError> {
    check::linear(
        (x.rows, x.cols),
        (w.rows, w.cols),
        bias.map(|b| b.rows * b.cols),
    )?;
    match bias {
        Some(b) if b.dtype != Dtype::F32 => Err(shape_err(
            "linear",
            format!(
                "a [{}, {}] {:?} matrix as the bias of a [{}, {}] weight",
                b.rows, b.cols, b.dtype, w.rows, w.cols
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) fn linear(
    be: &CudaBackend,
    x: &CudaAct,
    w: &CudaWeight,
    bias: Option<&CudaWeight>,
) -> Result<CudaAct, BackendError> {
    check_linear(x, w, bias)?;
    let (m, k, n) = (x.rows, x.cols, w.rows);
    let mut out = be.alloc_act("linear", m, n)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    if k == 0 {
        return tileflow_engine::backend::Backend::zeros(be, m, n);
    }
    let gemm_from = match w.dtype {
        Dtype::F32 => GEMV_MAX_ROWS + 1,
        Dtype::BF16 => TENSOR_CORE_MIN_ROWS,
        Dtype::F16 => usize::MAX,
    };
    if m < gemm_from {
        gemv(be, x, w, &mut out)?;
    } else {
        gemm(be, x, w, &mut out)?;
    }
    if let Some(b) = bias {
        add_bias(be, &mut out, b)?;
    }
    Ok(out)
}

/// `out[r] += bias` for every row (shapes checked by the caller).
fn add_bias(be: &CudaBackend, out: &mut CudaAct, b: &CudaWeight) -> Result<(), BackendError> {
    let (rows, cols) = (int("linear", out.rows)?, int("linear", out.cols)?);
    let mut l = be.dev.launch(Kernel::AddBias);
    l.arg(&mut out.data).arg(&b.data).arg(&rows).arg(&cols);
    // SAFETY: add_bias(x, bias, rows, cols): out is rows * cols, bias cols (checked).
    unsafe { l.launch(elementwise(out.rows * out.cols)) }.map_err(dev_err("linear bias"))?;
    Ok(())
}

/// Matrices [`linears`] computes in one launch.
const FUSED_LINEARS: usize = 3;

/// [`linear`] of one `x` by several weights: for one row of x and up to three 16-bit
/// matrices, one launch of `gemv_one_row3`; otherwise one [`linear`] each.
pub(super) fn linears(
    be: &CudaBackend,
    x: &CudaAct,
    weights: &[(&CudaWeight, Option<&CudaWeight>)],
) -> Result<Vec<CudaAct>, BackendError> {
    if !one_row3(x, weights) {
        return weights.iter().map(|&(w, b)| linear(be, x, w, b)).collect();
    }
    let plan = OneRow3::new(be, x, weights, 0)?;
    let (k, bf) = (int("linear", x.cols)?, plan.bf);
    let mut l = be.dev.launch(Kernel::gemv_one_row3(plan.cpw));
    l.arg(&x.data).arg(&k).arg(&bf);
    for (w, n, out) in &plan.args {
        l.arg(w).arg(n).arg(out);
    }
    // SAFETY: gemv_one_row3_c<cpw>(x, k, bf, w0, n0, o0, w1, n1, o1, w2, n2, o2): see
    // OneRow3; x is k floats.
    unsafe { l.launch(plan.cfg) }.map_err(dev_err("linear"))?;
    plan.finish(be, weights)
}

/// The longest row [`norm_linears`] norms inside its launch (kernels/norm.cu: the vector
/// path of a 256-thread block).
const NORM_FUSED_MAX: usize = 4096;

/// [`tileflow_engine::backend::Backend::norm_linears`]: for one row of x (up to
/// NORM_FUSED_MAX wide, a norm over the whole row) and up to three 16-bit matrices, one launch
/// of `gemv_norm_one_row3`; otherwise the norm, then [`linears`].
pub(super) fn norm_linears(
    be: &CudaBackend,
    x: &mut CudaAct,
    delta: Option<&CudaAct>,
    (norm, eps): (&CudaWeight, f32),
    weights: &[(&CudaWeight, Option<&CudaWeight>)],
) -> Result<(CudaAct, Vec<CudaAct>), BackendError> {
    const OP: &str = "norm_linears";
    let fused = one_row3(x, weights)
        && x.cols <= NORM_FUSED_MAX
        && norm.dtype == Dtype::F32
        && norm.rows * norm.cols == x.cols
        && delta.is_none_or(|d| (d.rows, d.cols) == (x.rows, x.cols));
    if !fused {
        let h = match delta {
            Some(d) => be.add_rms_norm(x, d, norm, eps)?,
            None => be.rms_norm(x, norm, eps)?,
        };
        let out = linears(be, &h, weights)?;
        return Ok((h, out));
    }
    let k = x.cols;
    let plan = OneRow3::new(be, x, weights, k * size_of::<f32>())?;
    let mut h = be.alloc_act(OP, 1, k)?;
    let mut sum = delta.map(|_| be.alloc_act(OP, 1, k)).transpose()?;
    let (ki, bf, null) = (int(OP, k)?, plan.bf, 0u64);
    let mut l = be.dev.launch(Kernel::gemv_norm_one_row3(plan.cpw));
    l.arg(&x.data);
    match delta {
        Some(d) => l.arg(&d.data),
        None => l.arg(&null),
    };
    l.arg(&norm.data).arg(&eps);
    match sum.as_mut() {
        Some(s) => l.arg(&mut s.data),
        None => l.arg(&null),
    };
    l.arg(&mut h.data).arg(&ki).arg(&bf);
    for (w, n, out) in &plan.args {
        l.arg(w).arg(n).arg(out);
    }
    // SAFETY: gemv_norm_one_row3_c<cpw>(x, delta, nw, eps, x_sum, h, k, bf, w0, n0, o0, w1,
    // n1, o1, w2, n2, o2): see OneRow3; x, delta (or null), x_sum (or null, a buffer apart
    // from x) and h are k floats, nw k floats (f32); k % 8 == 0 and k <= NORM_FUSED_MAX for
    // the norm's vector path; k floats of dynamic shared memory.
    unsafe { l.launch(plan.cfg) }.map_err(dev_err(OP))?;
    let outs = plan.finish(be, weights)?;
    if let Some(s) = sum {
        *x = s;
    }
    Ok((h, outs))
}

/// Whether one launch of the one-row kernels takes `x` by `weights`: one row (k % 8 == 0)
/// and one to FUSED_LINEARS 16-bit matrices of one type.
fn one_row3(x: &CudaAct, weights: &[(&CudaWeight, Option<&CudaWeight>)]) -> bool {
    x.rows == 1
        && x.cols.is_multiple_of(8)
        && (1..=FUSED_LINEARS).contains(&weights.len())
        && weights
            .iter()
            .all(|(w, _)| w.dtype != Dtype::F32 && w.dtype == weights[0].0.dtype && w.rows > 0)
}

/// A launch of `gemv_one_row3` or `gemv_norm_one_row3` being prepared: per matrix its
/// weights, columns and output (null and 0 where unused), the columns per warp and the grid.
/// The kernels read each used w as n * k 16-bit elements (shapes checked here) and write n
/// floats to its o, all allocations alive until the stream ran them (weights borrowed,
/// outputs returned); unused matrices have n = 0 and are never touched; cpw is 1, 2, 4 or 8
/// and the grid covers ceil(n / cpw) warps per matrix; allocations are 256-byte aligned.
struct OneRow3 {
    outs: Vec<CudaAct>,
    args: [(u64, i32, u64); FUSED_LINEARS],
    bf: i32,
    cpw: u32,
    cfg: LaunchConfig,
}

impl OneRow3 {
    /// For `weights` accepted by [`one_row3`]; `smem`: dynamic shared memory per block.
    fn new(
        be: &CudaBackend,
        x: &CudaAct,
        weights: &[(&CudaWeight, Option<&CudaWeight>)],
        smem: usize,
    ) -> Result<OneRow3, BackendError> {
        for &(w, b) in weights {
            check_linear(x, w, b)?;
        }
        let mut outs = weights
            .iter()
            .map(|(w, _)| be.alloc_act("linear", 1, w.rows))
            .collect::<Result<Vec<_>, _>>()?;
        let s = &be.dev.compute;
        let mut args = [(0u64, 0i32, 0u64); FUSED_LINEARS];
        for (i, ((w, _), out)) in weights.iter().zip(outs.iter_mut()).enumerate() {
            args[i] = (
                w.data.device_ptr(s).0,
                int("linear", w.rows)?,
                out.data.device_ptr_mut(s).0,
            );
        }
        let groups = |c: usize| {
            weights
                .iter()
                .map(|(w, _)| w.rows.div_ceil(c))
                .sum::<usize>()
        };
        let cpw = be.one_row_columns(MAX_ONE_ROW_COLUMNS, ONE_ROW_WARPS_PER_SM, groups);
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim(
                    "linear",
                    groups(cpw as usize).div_ceil(GEMV_WARPS as usize),
                    "blocks of columns",
                )?,
                1,
                1,
            ),
            block_dim: (32 * GEMV_WARPS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        Ok(OneRow3 {
            outs,
            args,
            bf: i32::from(weights[0].0.dtype == Dtype::BF16),
            cpw,
            cfg,
        })
    }

    /// The outputs, each with its bias added.
    fn finish(
        mut self,
        be: &CudaBackend,
        weights: &[(&CudaWeight, Option<&CudaWeight>)],
    ) -> Result<Vec<CudaAct>, BackendError> {
        for (out, (_, b)) in self.outs.iter_mut().zip(weights) {
            if let Some(b) = b {
                add_bias(be, out, b)?;
            }
        }
        Ok(self.outs)
    }
}

fn gemv(
    be: &CudaBackend,
    x: &CudaAct,
    w: &CudaWeight,
    out: &mut CudaAct,
) -> Result<(), BackendError> {
    let (m, k, n) = (
        int("linear", x.rows)?,
        int("linear", x.cols)?,
        int("linear", w.rows)?,
    );
    let dt = dtype_code(w.dtype);
    if x.rows == 1 && w.dtype != Dtype::F32 && x.cols.is_multiple_of(8) {
        let bf = i32::from(w.dtype == Dtype::BF16);
        let cpw = be.one_row_columns(MAX_ONE_ROW_COLUMNS, ONE_ROW_WARPS_PER_SM, |c| {
            w.rows.div_ceil(c)
        });
        let warps = w.rows.div_ceil(cpw as usize);
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim(
                    "linear",
                    warps.div_ceil(GEMV_WARPS as usize),
                    "blocks of columns",
                )?,
                1,
                1,
            ),
            block_dim: (32 * GEMV_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = be.dev.launch(Kernel::gemv_one_row(cpw));
        l.arg(&x.data)
            .arg(&k)
            .arg(&w.data)
            .arg(&bf)
            .arg(&n)
            .arg(&mut out.data);
        // SAFETY: gemv_one_row_c<cpw>(x, k, w, bf, n, out): cpw is 1, 2, 4 or 8 and the grid
        // covers ceil(n / cpw) warps; x is k floats, w n * k 16-bit elements,
        // out n floats; k % 8 == 0 and the allocations are 256-byte aligned, so every row and
        // x take 16-byte loads.
        unsafe { l.launch(cfg) }.map_err(dev_err("linear"))?;
        return Ok(());
    }
    let split = split_k(x.cols, w.rows);
    let cfg = LaunchConfig {
        grid_dim: ((w.rows as u32).div_ceil(GEMV_WARPS / split as u32), 1, 1),
        block_dim: (32 * GEMV_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = be.dev.launch(Kernel::Gemv);
    l.arg(&x.data)
        .arg(&m)
        .arg(&k)
        .arg(&w.data)
        .arg(&dt)
        .arg(&n)
        .arg(&split)
        .arg(&mut out.data);
    // SAFETY: gemv(x, m, k, w, dt, n, split, out): x is m * k floats, w n * k elements of dt,
    // out m * n; split divides k and 8.
    unsafe { l.launch(cfg) }.map_err(dev_err("linear"))?;
    Ok(())
}

fn gemm(
    be: &CudaBackend,
    x: &CudaAct,
    w: &CudaWeight,
    out: &mut CudaAct,
) -> Result<(), BackendError> {
    use blas_sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
    let (m, k, n) = (
        int("linear", x.rows)?,
        int("linear", x.cols)?,
        int("linear", w.rows)?,
    );
    let s = &be.dev.compute;
    // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major outᵀ[n, m] = wᵀ[n, k] · xᵀ[k, m]
    // with w and x read as column-major [k, n] and [k, m].
    let x16;
    let (x_ptr, x_type) = match w.dtype {
        Dtype::BF16 => {
            // SAFETY: to_bf16 below writes all m * k elements before the GEMM reads them.
            let mut buf = unsafe { s.alloc::<u16>(x.rows * x.cols) }.map_err(|_| {
                BackendError::OutOfMemory {
                    what: format!("linear: [{m}, {k}] bf16 activation"),
                }
            })?;
            let len = (x.rows * x.cols) as i64;
            let mut l = be.dev.launch(Kernel::ToBf16);
            l.arg(&x.data).arg(&mut buf).arg(&len);
            // SAFETY: to_bf16(x, out, n): both hold n elements.
            unsafe { l.launch(elementwise(x.rows * x.cols)) }.map_err(dev_err("linear"))?;
            x16 = buf;
            (x16.device_ptr(s).0, CUDA_R_16BF)
        }
        _ => (x.data.device_ptr(s).0, CUDA_R_32F),
    };
    let w_type = if w.dtype == Dtype::BF16 {
        CUDA_R_16BF
    } else {
        CUDA_R_32F
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let w_ptr = w.data.device_ptr(s).0;
    let out_ptr = out.data.device_ptr_mut(s).0;
    // SAFETY: the handle is bound to the compute stream; w holds n * k elements of w_type, x
    // k * m of x_type and out n * m floats, all alive until the stream runs the GEMM (the
    // bf16 copy of x is freed stream-ordered after it); alpha and beta are host f32 scalars
    // (the handle's default pointer mode).
    unsafe {
        blas::gemm_ex(
            *be.dev.blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            (&alpha as *const f32).cast::<c_void>(),
            w_ptr as *const c_void,
            w_type,
            k,
            x_ptr as *const c_void,
            x_type,
            k,
            (&beta as *const f32).cast::<c_void>(),
            out_ptr as *mut c_void,
            CUDA_R_32F,
            n,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(dev_err("linear (cuBLAS)"))
}
