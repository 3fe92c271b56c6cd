//! Paged attention over the host KV pool.

use rayon::prelude::*;

use super::CpuKvPool;
use crate::backend::{check, AttentionPlan, BackendError, HostMatrix};

/// Paged attention: one rayon task per (token, head).
pub(super) fn attention(
    q: &HostMatrix,
    pool: &CpuKvPool,
    layer: usize,
    plan: &AttentionPlan,
) -> Result<HostMatrix, BackendError> {
    let (heads, kv_heads, hd) = (plan.num_heads, plan.num_kv_heads, plan.head_dim);
    let layout = &pool.layout;
    let row_chunk = check::attention(layout, layer, (q.rows, q.cols), plan)?;
    let bs = layout.block_size;

    let group = heads / kv_heads;
    let width = layout.slot_width();
    let (kp, vp) = (&pool.k[layer], &pool.v[layer]);
    let mut out = HostMatrix::zeros(q.rows, q.cols);
    out.data
        .par_chunks_mut(hd)
        .enumerate()
        .for_each(|(idx, o)| {
            let (row, head) = (idx / heads, idx % heads);
            let c = &plan.chunks[row_chunk[row]];
            let pos = c.start_pos + (row - c.first_row);
            let lo = plan
                .sliding_window
                .map_or(0, |w| (pos + 1).saturating_sub(w));
            let qh = &q.data[row * q.cols + head * hd..][..hd];
            let off = (head / group) * hd;
            let slot = |j: usize| c.blocks[j / bs] as usize * bs + j % bs;
            let mut scores: Vec<f32> = (lo..=pos)
                .map(|j| {
                    let k = &kp[slot(j) * width + off..][..hd];
                    qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * plan.scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (j, p) in (lo..=pos).zip(&scores) {
                let v = &vp[slot(j) * width + off..][..hd];
                let p = p / sum;
                o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
            }
        });
    Ok(out)
}
