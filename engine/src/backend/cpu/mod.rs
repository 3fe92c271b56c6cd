//! The reference backend: every op in f32 on the host, GEMMs through the `gemm` crate,
//! threads through rayon.
//!
//! Routed experts are computed straight from the bytes the storage tier holds, by the CPU
//! expert kernels ([`ffn`]) that the hybrid mode also runs beside a GPU.

mod attention;
pub mod ffn;
mod matmul;
mod memory;

pub use self::memory::{CpuCopyDone, CpuTierMemory};

use gemm::Parallelism;
use rayon::prelude::*;

use self::matmul::matmul_nt;
use super::{check, AttentionPlan, Backend, BackendError, ExpertWork, HostMatrix, Routing};
use crate::kv::KvLayout;
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

pub(super) fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
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

pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn same_shape(op: &'static str, a: &HostMatrix, b: &HostMatrix) -> Result<(), BackendError> {
    check::same_shape(op, (a.rows, a.cols), (b.rows, b.cols))
}

impl Backend for CpuBackend {
    type Weight = HostMatrix;
    type Act = HostMatrix;
    type KvPool = CpuKvPool;
    type ExpertTable = ();
    type RoutingLog = ();

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
        check::norm("rms_norm", x.cols, w.data.len())?;
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
        check::norm("add_rms_norm", x.cols, w.data.len())?;
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
        check::linear(
            (x.rows, x.cols),
            (w.rows, w.cols),
            bias.map(|b| b.data.len()),
        )?;
        let mut out = HostMatrix::zeros(x.rows, w.rows);
        matmul_nt(
            &x.data,
            &w.data,
            (x.rows, x.cols, w.rows),
            &mut out.data,
            self.parallelism(),
        )?;
        if let Some(b) = bias {
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
        check::write_kv(
            &pool.layout,
            layer,
            (k.rows, k.cols),
            (v.rows, v.cols),
            slots,
        )?;
        let width = pool.layout.slot_width();
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
        attention::attention(q, pool, layer, plan)
    }

    fn route(
        &self,
        logits: &HostMatrix,
        top_k: usize,
        renormalize: bool,
    ) -> Result<Routing, BackendError> {
        let e = logits.cols;
        check::route(e, top_k)?;
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
        ffn::experts_into(ffn::SimdLevel::current(), x, work, out)
    }

    fn add(&self, x: &mut HostMatrix, y: &HostMatrix) -> Result<(), BackendError> {
        same_shape("add", x, y)?;
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn computes_on_host(&self) -> bool {
        true
    }

    fn add_gated(
        &self,
        out: &mut HostMatrix,
        y: &HostMatrix,
        gate_logit: &HostMatrix,
    ) -> Result<(), BackendError> {
        check::add_gated(
            (out.rows, out.cols),
            (y.rows, y.cols),
            (gate_logit.rows, gate_logit.cols),
        )?;
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
        check::rows_within(rows, x.rows)?;
        let mut out = HostMatrix::zeros(rows.len(), x.cols);
        for (i, &r) in rows.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, f: impl Fn(usize) -> f32) -> HostMatrix {
        HostMatrix::new(rows, cols, (0..rows * cols).map(f).collect()).unwrap()
    }

    #[test]
    fn linear_matches_the_definition_on_odd_shapes() {
        let b = CpuBackend::new();
        let x = m(3, 5, |i| (i as f32 * 0.37).sin());
        let w = m(7, 5, |i| (i as f32 * 0.11).cos());
        let bias = m(1, 7, |i| i as f32);
        let y = b.linear(&x, &w, Some(&bias)).unwrap();
        for r in 0..3 {
            for c in 0..7 {
                let want: f32 = (0..5).map(|k| x.row(r)[k] * w.row(c)[k]).sum::<f32>() + c as f32;
                assert!((y.row(r)[c] - want).abs() < 1e-5);
            }
        }
        assert!(b.linear(&x, &m(2, 4, |_| 0.0), None).is_err());
    }

    #[test]
    fn routing_breaks_ties_to_the_lower_index_and_renormalises() {
        let b = CpuBackend::new();
        let logits = m(1, 4, |i| [1.0, 3.0, 1.0, 3.0][i]);
        let r = b.route(&logits, 3, true).unwrap();
        assert_eq!(r.experts, vec![1, 3, 0]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let raw = b.route(&logits, 2, false).unwrap();
        assert!((raw.weights[0] - 3f32.exp() / (2.0 * 3f32.exp() + 2.0 * 1f32.exp())).abs() < 1e-6);
        assert!(b.route(&logits, 5, true).is_err());
    }

    #[test]
    fn rms_norm_groups_by_weight_width() {
        let b = CpuBackend::new();
        let x = m(1, 4, |i| [1.0, 1.0, 2.0, 2.0][i]);
        let per_head = b.rms_norm(&x, &m(1, 2, |_| 1.0), 0.0).unwrap();
        assert_eq!(per_head.data, vec![1.0, 1.0, 1.0, 1.0]);
        let whole = b.rms_norm(&x, &m(1, 4, |_| 1.0), 0.0).unwrap();
        assert!((whole.data[2] / whole.data[0] - 2.0).abs() < 1e-6);
        assert!(b.rms_norm(&x, &m(1, 3, |_| 1.0), 1e-6).is_err());
    }
}
