//! Routed experts computed straight from their extent bytes.

use std::borrow::Cow;

use gemm::Parallelism;

use super::matmul::matmul_nt;
use super::{shape_err, silu};
use crate::backend::{BackendError, ExpertRef, ExpertWork, HostMatrix};
use crate::pack::ProjectionExtent;

/// One projection of an expert as f32 `[rows, cols]`: borrowed when the bytes already are
/// aligned f32, converted otherwise.
fn projection<'a>(
    e: &ExpertRef<'a>,
    expert: usize,
    name: &str,
    p: &ProjectionExtent,
    shape: [usize; 2],
) -> Result<Cow<'a, [f32]>, BackendError> {
    let layout_err = |detail: String| BackendError::ExpertLayout { expert, detail };
    if p.shape != shape {
        return Err(layout_err(format!(
            "{name} has shape {:?}, expected {shape:?}",
            p.shape
        )));
    }
    let len = shape[0] * shape[1] * e.dtype.size();
    let start = usize::try_from(p.offset).map_err(|_| layout_err(format!("{name} offset")))?;
    let all = e.bytes.host().ok_or_else(|| {
        layout_err("its bytes are in device memory, which the CPU backend cannot read".into())
    })?;
    let bytes = start
        .checked_add(len)
        .and_then(|end| all.get(start..end))
        .ok_or_else(|| {
            layout_err(format!(
                "{name} at {start}+{len} is outside its {} bytes",
                all.len()
            ))
        })?;
    if e.dtype == crate::dtype::Dtype::F32 && cfg!(target_endian = "little") {
        if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
            return Ok(Cow::Borrowed(v));
        }
    }
    Ok(Cow::Owned(e.dtype.to_f32(bytes)))
}

/// One expert's FFN on its rows of `x`, scaled by the combine weights: `[rows, hidden]`.
pub(super) fn expert_ffn(
    x: &HostMatrix,
    w: &ExpertWork<'_>,
    parallelism: Parallelism,
) -> Result<Vec<f32>, BackendError> {
    let h = x.cols;
    let inter = w.weights.gate.shape[0];
    let gate = projection(&w.weights, w.expert, "gate", &w.weights.gate, [inter, h])?;
    let up = projection(&w.weights, w.expert, "up", &w.weights.up, [inter, h])?;
    let down = projection(&w.weights, w.expert, "down", &w.weights.down, [h, inter])?;
    let n = w.rows.len();
    let mut xs = Vec::with_capacity(n * h);
    for &r in &w.rows {
        if r >= x.rows {
            return Err(shape_err(
                "experts",
                format!("row {r} of {} routed to expert {}", x.rows, w.expert),
            ));
        }
        xs.extend_from_slice(x.row(r));
    }
    let mut g = vec![0.0; n * inter];
    let mut u = vec![0.0; n * inter];
    matmul_nt(&xs, &gate, (n, h, inter), &mut g, parallelism)?;
    matmul_nt(&xs, &up, (n, h, inter), &mut u, parallelism)?;
    for (gv, uv) in g.iter_mut().zip(&u) {
        *gv = silu(*gv) * uv;
    }
    let mut y = xs;
    matmul_nt(&g, &down, (n, inter, h), &mut y, parallelism)?;
    for (row, &s) in y.chunks_exact_mut(h).zip(&w.scales) {
        row.iter_mut().for_each(|v| *v *= s);
    }
    Ok(y)
}
