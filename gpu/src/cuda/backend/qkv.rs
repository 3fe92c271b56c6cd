//! A layer's q, k and v made ready for attention in one launch (`qkv_prepare`).

use cudarc::driver::LaunchConfig;
use tileflow_engine::backend::{check, prepare_attention_ops, BackendError, QkvPrep};
use tileflow_engine::dtype::Dtype;

use super::{
    dev_err, grid_dim, int, u32s, CudaAct, CudaBackend, CudaKvPool, CudaWeight, STATIC_SMEM,
};
use crate::cuda::device::Kernel;

/// The norms, clamp, RoPE and KV write of [`QkvPrep`] as one kernel when the shapes fit it (a
/// row of q or k in shared memory, f32 norm weights dividing the rows); the separate ops
/// otherwise, which also name whatever does not fit.
pub(super) fn prepare_attention(
    be: &CudaBackend,
    [mut q, k, v]: [CudaAct; 3],
    pool: &mut CudaKvPool,
    p: &QkvPrep<'_, CudaWeight>,
) -> Result<CudaAct, BackendError> {
    let half = p.rope.inv_freq().len();
    let norm_ok = |w: Option<&CudaWeight>, cols: usize| {
        w.is_none_or(|w| w.dtype == Dtype::F32 && check::norm("qkv", cols, w.rows * w.cols).is_ok())
    };
    let fits = q.rows == k.rows
        && p.positions.len() == q.rows
        && half > 0
        && q.cols % (2 * half) == 0
        && k.cols % (2 * half) == 0
        && norm_ok(p.q_norm, q.cols)
        && norm_ok(p.k_norm, k.cols)
        && q.cols.max(k.cols) * 4 <= STATIC_SMEM
        && q.rows > 0
        && check::write_kv(
            &pool.layout,
            p.layer,
            (k.rows, k.cols),
            (v.rows, v.cols),
            p.slots,
        )
        .is_ok();
    if !fits {
        return prepare_attention_ops(be, [q, k, v], pool, p);
    }
    const OP: &str = "prepare_attention";
    let (pos, freq) = be.upload_rope(OP, p.positions, p.rope)?;
    let slots = be.upload_cached(OP, &u32s(OP, p.slots)?)?;
    let width = |w: Option<&CudaWeight>| w.map_or(0, |w| w.rows * w.cols);
    let (qc, kc, qg, kg, h) = (
        int(OP, q.cols)?,
        int(OP, k.cols)?,
        int(OP, width(p.q_norm))?,
        int(OP, width(p.k_norm))?,
        int(OP, half)?,
    );
    let (has_clip, clip) = (i32::from(p.clip.is_some()), p.clip.unwrap_or(0.0));
    let scale = p.rope.scale();
    // A stand-in pointer for an absent norm: the kernel tests for null.
    let null = 0u64;
    let (kp, vp) = (&mut pool.k, &mut pool.v);
    let mut b = be.dev.launch(Kernel::QkvPrepare);
    b.arg(&mut q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&qc)
        .arg(&kc);
    match p.q_norm {
        Some(w) => b.arg(&w.data),
        None => b.arg(&null),
    };
    b.arg(&qg);
    match p.k_norm {
        Some(w) => b.arg(&w.data),
        None => b.arg(&null),
    };
    b.arg(&kg)
        .arg(&p.eps)
        .arg(&has_clip)
        .arg(&clip)
        .arg(&*pos)
        .arg(&*freq)
        .arg(&scale)
        .arg(&h)
        .arg(&*slots)
        .arg(&mut kp[p.layer])
        .arg(&mut vp[p.layer]);
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(OP, q.rows, "rows")?, 3, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (q.cols.max(k.cols) * 4) as u32,
    };
    // SAFETY: qkv_prepare: q is rows * q_cols, k and v rows * kv_cols (kv_cols the pool's slot
    // width, every slot < the pool's slots: checked by check::write_kv); norm weights are f32
    // of widths dividing their rows, or null; positions has rows entries and inv_freq half,
    // both columns multiples of 2 * half; the shared memory holds the wider row.
    unsafe { b.launch(cfg) }.map_err(dev_err(OP))?;
    Ok(q)
}
