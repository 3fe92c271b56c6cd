//! The reference backend: every op in f32 on the host, GEMMs through the `gemm` crate,
//! threads through rayon.
//!
//! Routed experts are computed straight from the bytes the storage tier holds: each step
//! converts a selected expert's projections to f32 once (an f32 extent whose bytes are
//! 4-aligned is used in place). We keep no converted copy per slot: the host tier is the
//! cache, a second f32 copy would triple its memory for bf16 experts and need eviction hooks,
//! and the conversion is one streaming pass over bytes the GEMM reads anyway.

use std::borrow::Cow;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{AttentionPlan, Backend, BackendError, ExpertRef, ExpertWork, HostMatrix, Routing};
use crate::kv::KvLayout;
use crate::pack::ProjectionExtent;
use crate::rope::RopeTable;

/// The CPU backend.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    /// Threads for GEMMs; 0 is rayon's pool size.
    threads: usize,
}

impl CpuBackend {
    /// A backend on rayon's global pool.
    pub fn new() -> CpuBackend {
        CpuBackend { threads: 0 }
    }

    /// A backend whose GEMMs use at most `threads` threads (0: rayon's pool size).
    pub fn with_threads(threads: usize) -> CpuBackend {
        CpuBackend { threads }
    }

    fn parallelism(&self) -> Parallelism {
        Parallelism::Rayon(self.threads)
    }
}

/// Keys and values of every layer, `[slots, kv_heads, head_dim]` each.
#[derive(Debug)]
pub struct CpuKvPool {
    layout: KvLayout,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, row-major; lengths are checked.
fn matmul_nt(
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    parallelism: Parallelism,
) -> Result<(), BackendError> {
    if x.len() != m * k || w.len() != n * k || out.len() != m * n {
        return Err(shape_err(
            "linear",
            format!(
                "x {} w {} out {} do not fit m={m} k={k} n={n}",
                x.len(),
                w.len(),
                out.len()
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let (ki, ni) = (k as isize, n as isize);
    // SAFETY: the lengths were checked above, so with these strides every index gemm touches
    // lies inside its slice: dst (i, j) at i*n + j < m*n, lhs (i, l) at i*k + l < m*k and rhs
    // (l, j) = w[j, l] at j*k + l < n*k. `out` is an exclusive borrow that aliases neither
    // input, and read_dst = false means its old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ni,
            false,
            x.as_ptr(),
            1,
            ki,
            w.as_ptr(),
            ki,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// RMSNorm of each `w.len()`-wide group of `x`, into `out` (same length as `x`).
fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let g = w.len();
    for (xs, os) in x.chunks_exact(g).zip(out.chunks_exact_mut(g)) {
        let sum_sq: f64 = xs.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let mean = (sum_sq / g as f64) as f32;
        let r = 1.0 / (mean + eps).sqrt();
        for ((o, &xv), &wv) in os.iter_mut().zip(xs).zip(w) {
            *o = wv * (xv * r);
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

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
    let bytes = start
        .checked_add(len)
        .and_then(|end| e.bytes.get(start..end))
        .ok_or_else(|| {
            layout_err(format!(
                "{name} at {start}+{len} is outside its {} bytes",
                e.bytes.len()
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
fn expert_ffn(
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

fn same_shape(op: &'static str, a: &HostMatrix, b: &HostMatrix) -> Result<(), BackendError> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(shape_err(
            op,
            format!("[{}, {}] vs [{}, {}]", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    Ok(())
}

fn check_norm(x: &HostMatrix, w: &HostMatrix) -> Result<(), BackendError> {
    if w.data.is_empty() || x.cols % w.data.len() != 0 {
        return Err(shape_err(
            "rms_norm",
            format!(
                "weight of {} does not divide rows of {}",
                w.data.len(),
                x.cols
            ),
        ));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Weight = HostMatrix;
    type Act = HostMatrix;
    type KvPool = CpuKvPool;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload(&self, weight: HostMatrix) -> Result<HostMatrix, BackendError> {
        Ok(weight)
    }

    fn upload_act(&self, act: HostMatrix) -> Result<HostMatrix, BackendError> {
        Ok(act)
    }

    fn download(&self, act: &HostMatrix) -> Result<HostMatrix, BackendError> {
        Ok(act.clone())
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CpuKvPool, BackendError> {
        let n = layout.layer_elements();
        let alloc = || {
            let mut v = Vec::new();
            v.try_reserve_exact(n)
                .map_err(|_| BackendError::OutOfMemory {
                    what: format!("KV pool of {n} floats per layer"),
                })?;
            v.resize(n, 0.0);
            Ok::<_, BackendError>(v)
        };
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(CpuKvPool {
            layout: *layout,
            k,
            v,
        })
    }

    fn embed(&self, table: &HostMatrix, ids: &[u32]) -> Result<HostMatrix, BackendError> {
        let mut out = HostMatrix::zeros(ids.len(), table.cols);
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= table.rows {
                return Err(BackendError::TokenOutOfRange {
                    token: id,
                    vocab: table.rows,
                });
            }
            out.row_mut(i).copy_from_slice(table.row(id as usize));
        }
        Ok(out)
    }

    fn rms_norm(
        &self,
        x: &HostMatrix,
        w: &HostMatrix,
        eps: f32,
    ) -> Result<HostMatrix, BackendError> {
        check_norm(x, w)?;
        let mut out = HostMatrix::zeros(x.rows, x.cols);
        rms_norm_into(&x.data, &w.data, eps, &mut out.data);
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &mut HostMatrix,
        delta: &HostMatrix,
        w: &HostMatrix,
        eps: f32,
    ) -> Result<HostMatrix, BackendError> {
        same_shape("add_rms_norm", x, delta)?;
        check_norm(x, w)?;
        x.data
            .iter_mut()
            .zip(&delta.data)
            .for_each(|(a, b)| *a += b);
        let mut out = HostMatrix::zeros(x.rows, x.cols);
        rms_norm_into(&x.data, &w.data, eps, &mut out.data);
        Ok(out)
    }

    fn linear(
        &self,
        x: &HostMatrix,
        w: &HostMatrix,
        bias: Option<&HostMatrix>,
    ) -> Result<HostMatrix, BackendError> {
        if x.cols != w.cols {
            return Err(shape_err(
                "linear",
                format!("x has {} columns, weight [{}, {}]", x.cols, w.rows, w.cols),
            ));
        }
        let mut out = HostMatrix::zeros(x.rows, w.rows);
        matmul_nt(
            &x.data,
            &w.data,
            (x.rows, x.cols, w.rows),
            &mut out.data,
            self.parallelism(),
        )?;
        if let Some(b) = bias {
            if b.data.len() != w.rows {
                return Err(shape_err(
                    "linear",
                    format!("bias of {} for {} outputs", b.data.len(), w.rows),
                ));
            }
            for row in out.data.chunks_exact_mut(w.rows) {
                row.iter_mut().zip(&b.data).for_each(|(o, b)| *o += b);
            }
        }
        Ok(out)
    }

    fn clamp(&self, x: &mut HostMatrix, limit: f32) -> Result<(), BackendError> {
        x.data.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut HostMatrix,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<(), BackendError> {
        if positions.len() != x.rows {
            return Err(shape_err(
                "rope",
                format!("{} positions for {} rows", positions.len(), x.rows),
            ));
        }
        let cols = x.cols;
        x.data
            .par_chunks_mut(cols.max(1))
            .zip(positions)
            .for_each(|(row, &p)| table.apply(row, p));
        Ok(())
    }

    fn write_kv(
        &self,
        pool: &mut CpuKvPool,
        layer: usize,
        k: &HostMatrix,
        v: &HostMatrix,
        slots: &[usize],
    ) -> Result<(), BackendError> {
        let width = pool.layout.slot_width();
        let n_slots = pool.layout.slots();
        same_shape("write_kv", k, v)?;
        if k.cols != width || k.rows != slots.len() || layer >= pool.layout.num_layers {
            return Err(shape_err(
                "write_kv",
                format!(
                    "k [{}, {}] with {} slots into layer {layer} of slot width {width}",
                    k.rows,
                    k.cols,
                    slots.len()
                ),
            ));
        }
        if let Some(bad) = slots.iter().find(|&&s| s >= n_slots) {
            return Err(shape_err("write_kv", format!("slot {bad} of {n_slots}")));
        }
        for (r, &s) in slots.iter().enumerate() {
            pool.k[layer][s * width..(s + 1) * width].copy_from_slice(k.row(r));
            pool.v[layer][s * width..(s + 1) * width].copy_from_slice(v.row(r));
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &HostMatrix,
        pool: &CpuKvPool,
        layer: usize,
        plan: &AttentionPlan,
    ) -> Result<HostMatrix, BackendError> {
        attention(q, pool, layer, plan)
    }

    fn route(
        &self,
        logits: &HostMatrix,
        top_k: usize,
        renormalize: bool,
    ) -> Result<Routing, BackendError> {
        let e = logits.cols;
        if top_k == 0 || top_k > e {
            return Err(shape_err("route", format!("top_k {top_k} of {e} experts")));
        }
        let mut experts = Vec::with_capacity(logits.rows * top_k);
        let mut weights = Vec::with_capacity(logits.rows * top_k);
        let mut order: Vec<usize> = Vec::with_capacity(e);
        for row in logits.data.chunks_exact(e) {
            let probs = softmax(row);
            order.clear();
            order.extend(0..e);
            // Descending probability, ties to the lower index (torch.topk's order).
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let top = &order[..top_k];
            let sum: f32 = top.iter().map(|&i| probs[i]).sum();
            for &i in top {
                experts.push(i as u32);
                weights.push(if renormalize {
                    probs[i] / sum
                } else {
                    probs[i]
                });
            }
        }
        Ok(Routing {
            top_k,
            experts,
            weights,
        })
    }

    fn swiglu(&self, gate: &HostMatrix, up: &HostMatrix) -> Result<HostMatrix, BackendError> {
        same_shape("swiglu", gate, up)?;
        let data = gate
            .data
            .iter()
            .zip(&up.data)
            .map(|(&g, &u)| silu(g) * u)
            .collect();
        Ok(HostMatrix {
            rows: gate.rows,
            cols: gate.cols,
            data,
        })
    }

    fn experts(
        &self,
        x: &HostMatrix,
        work: &[ExpertWork<'_>],
        out: &mut HostMatrix,
    ) -> Result<(), BackendError> {
        same_shape("experts", x, out)?;
        // Few busy experts: one at a time, each GEMM threaded. Many: one expert per thread.
        let threads = rayon::current_num_threads();
        let results: Vec<Result<Vec<f32>, BackendError>> = if work.len() >= threads {
            work.par_iter()
                .map(|w| expert_ffn(x, w, Parallelism::None))
                .collect()
        } else {
            work.iter()
                .map(|w| expert_ffn(x, w, self.parallelism()))
                .collect()
        };
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&i| work[i].expert);
        let results: Vec<Vec<f32>> = results.into_iter().collect::<Result<_, _>>()?;
        for i in order {
            let h = out.cols;
            for (y, &r) in results[i].chunks_exact(h).zip(&work[i].rows) {
                out.row_mut(r).iter_mut().zip(y).for_each(|(o, v)| *o += v);
            }
        }
        Ok(())
    }

    fn add_gated(
        &self,
        out: &mut HostMatrix,
        y: &HostMatrix,
        gate_logit: &HostMatrix,
    ) -> Result<(), BackendError> {
        same_shape("add_gated", out, y)?;
        if gate_logit.cols != 1 || gate_logit.rows != out.rows {
            return Err(shape_err(
                "add_gated",
                format!(
                    "gate [{}, {}] for {} rows",
                    gate_logit.rows, gate_logit.cols, out.rows
                ),
            ));
        }
        let h = out.cols;
        for ((o, yr), &g) in out
            .data
            .chunks_exact_mut(h)
            .zip(y.data.chunks_exact(h))
            .zip(&gate_logit.data)
        {
            let s = sigmoid(g);
            o.iter_mut().zip(yr).for_each(|(o, v)| *o += s * v);
        }
        Ok(())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<HostMatrix, BackendError> {
        Ok(HostMatrix::zeros(rows, cols))
    }

    fn gather_rows(&self, x: &HostMatrix, rows: &[usize]) -> Result<HostMatrix, BackendError> {
        let mut out = HostMatrix::zeros(rows.len(), x.cols);
        for (i, &r) in rows.iter().enumerate() {
            if r >= x.rows {
                return Err(shape_err("gather_rows", format!("row {r} of {}", x.rows)));
            }
            out.row_mut(i).copy_from_slice(x.row(r));
        }
        Ok(out)
    }
}

/// `exp(x - max) / Σ exp(x - max)` in f32.
fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter_mut().for_each(|v| *v /= sum);
    e
}

/// Paged attention: one rayon task per (token, head).
fn attention(
    q: &HostMatrix,
    pool: &CpuKvPool,
    layer: usize,
    plan: &AttentionPlan,
) -> Result<HostMatrix, BackendError> {
    let (heads, kv_heads, hd) = (plan.num_heads, plan.num_kv_heads, plan.head_dim);
    let layout = &pool.layout;
    if q.cols != heads * hd
        || kv_heads == 0
        || heads % kv_heads != 0
        || layout.slot_width() != kv_heads * hd
        || layer >= layout.num_layers
    {
        return Err(shape_err(
            "attention",
            format!(
                "q [{}, {}] with {heads} heads x {hd}, {kv_heads} kv heads, layer {layer}, pool slot width {}",
                q.rows,
                q.cols,
                layout.slot_width()
            ),
        ));
    }
    // Which chunk each row belongs to; every row must be covered, every position cached.
    let bs = layout.block_size;
    let mut row_chunk = vec![usize::MAX; q.rows];
    for (ci, c) in plan.chunks.iter().enumerate() {
        let last_pos = c.start_pos + c.rows;
        if c.first_row + c.rows > q.rows || last_pos.div_ceil(bs) > c.blocks.len() {
            return Err(shape_err(
                "attention",
                format!(
                    "chunk at row {} of {} rows from position {} has {} blocks",
                    c.first_row,
                    c.rows,
                    c.start_pos,
                    c.blocks.len()
                ),
            ));
        }
        if let Some(b) = c.blocks.iter().find(|&&b| b as usize >= layout.num_blocks) {
            return Err(shape_err(
                "attention",
                format!("block {b} of {}", layout.num_blocks),
            ));
        }
        row_chunk[c.first_row..c.first_row + c.rows].fill(ci);
    }
    if let Some(r) = row_chunk.iter().position(|&c| c == usize::MAX) {
        return Err(shape_err("attention", format!("row {r} is in no chunk")));
    }

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
