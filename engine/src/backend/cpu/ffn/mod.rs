//! Routed experts on the CPU, straight from the bytes of their host slots: the CPU backend's
//! experts, and the experts the hybrid mode computes on the host while the GPU works.
//!
//! A step's experts are computed together, threads over (expert, block of weight rows): first
//! gate and up for a block of intermediate columns, SwiGLU fused (every weight row read once
//! for all of the expert's token rows), then down for a block of hidden columns; last, each
//! token row adds its experts' scaled outputs in ascending expert order. Weights are widened to
//! f32 as they are read (no converted copy is kept: the host tier is the cache, and the
//! widening costs nothing next to reading the bytes), activations stay f32.

mod dot;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

pub use dot::{dot_rows, SimdLevel};

use rayon::prelude::*;

use super::{shape_err, silu};
use crate::backend::{BackendError, ExpertRef, ExpertWork, HostMatrix};
use crate::dtype::Dtype;
use crate::pack::ProjectionExtent;

/// Weight rows per task of the gate·up phase (each reads this many rows of both).
const GATE_UP_BLOCK: usize = 16;
/// Weight rows per task of the down phase.
const DOWN_BLOCK: usize = 32;

/// One projection of an expert: its bytes (row-major `[rows, cols]` of `dtype`).
#[derive(Debug, Clone, Copy)]
struct Projection<'a> {
    bytes: &'a [u8],
    dtype: Dtype,
    rows: usize,
    cols: usize,
}

impl<'a> Projection<'a> {
    /// Rows `range` of the projection's bytes.
    fn rows(&self, start: usize, end: usize) -> &'a [u8] {
        let rb = self.cols * self.dtype.size();
        &self.bytes[start * rb..end * rb]
    }
}

/// The projection `name` of `e` checked against `shape` and its bytes.
fn projection<'a>(
    e: &ExpertRef<'a>,
    expert: usize,
    name: &str,
    p: &ProjectionExtent,
    shape: [usize; 2],
) -> Result<Projection<'a>, BackendError> {
    let layout_err = |detail: String| BackendError::ExpertLayout { expert, detail };
    if p.shape != shape {
        return Err(layout_err(format!(
            "{name} has shape {:?}, expected {shape:?}",
            p.shape
        )));
    }
    let all = e.bytes.host().ok_or_else(|| {
        layout_err("its bytes are in device memory, which the CPU cannot read".into())
    })?;
    let len = shape[0]
        .checked_mul(shape[1])
        .and_then(|n| n.checked_mul(e.dtype.size()))
        .ok_or_else(|| layout_err(format!("{name} of shape {shape:?} is too large")))?;
    let start = usize::try_from(p.offset).map_err(|_| layout_err(format!("{name} offset")))?;
    let bytes = start
        .checked_add(len)
        .and_then(|end| all.get(start..end))
        .ok_or_else(|| {
            layout_err(format!(
                "{name} at {start}+{len} is outside its {} bytes",
                all.len()
            ))
        })?;
    Ok(Projection {
        bytes,
        dtype: e.dtype,
        rows: shape[0],
        cols: shape[1],
    })
}

/// One expert's share of the step, checked: its projections and its rows of x gathered.
#[derive(Debug)]
struct Task<'a> {
    expert: usize,
    gate: Projection<'a>,
    up: Projection<'a>,
    down: Projection<'a>,
    /// Its token rows of x, `[m, hidden]`.
    xs: Vec<f32>,
    m: usize,
    /// The rows of out its outputs go to, with their combine weights.
    rows: Vec<usize>,
    scales: Vec<f32>,
}

impl<'a> Task<'a> {
    fn new(x: &HostMatrix, w: &ExpertWork<'a>) -> Result<Task<'a>, BackendError> {
        let h = x.cols;
        let inter = w.weights.gate.shape[0];
        let e = &w.weights;
        let gate = projection(e, w.expert, "gate", &e.gate, [inter, h])?;
        let up = projection(e, w.expert, "up", &e.up, [inter, h])?;
        let down = projection(e, w.expert, "down", &e.down, [h, inter])?;
        if w.scales.len() != w.rows.len() {
            return Err(shape_err(
                "experts",
                format!(
                    "expert {} has {} rows and {} combine weights",
                    w.expert,
                    w.rows.len(),
                    w.scales.len()
                ),
            ));
        }
        let mut xs = Vec::with_capacity(w.rows.len() * h);
        for &r in &w.rows {
            if r >= x.rows {
                return Err(shape_err(
                    "experts",
                    format!("row {r} of {} routed to expert {}", x.rows, w.expert),
                ));
            }
            xs.extend_from_slice(x.row(r));
        }
        Ok(Task {
            expert: w.expert,
            gate,
            up,
            down,
            xs,
            m: w.rows.len(),
            rows: w.rows.clone(),
            scales: w.scales.clone(),
        })
    }
}

/// For each expert of `work`: `out[rows] += scale * down(silu(gate(x[rows])) * up(x[rows]))`,
/// each row's contributions added in ascending expert order, with the kernels of `level`.
pub fn experts_into(
    level: SimdLevel,
    x: &HostMatrix,
    work: &[ExpertWork<'_>],
    out: &mut HostMatrix,
) -> Result<(), BackendError> {
    if (x.rows, x.cols) != (out.rows, out.cols) {
        return Err(shape_err(
            "experts",
            format!(
                "x is [{}, {}] but out is [{}, {}]",
                x.rows, x.cols, out.rows, out.cols
            ),
        ));
    }
    let mut tasks = work
        .iter()
        .map(|w| Task::new(x, w))
        .collect::<Result<Vec<_>, _>>()?;
    tasks.retain(|t| t.m > 0);
    let acts = gate_up(level, &tasks)?;
    let ys = down(level, &tasks, &acts)?;
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| tasks[i].expert);
    for i in order {
        let t = &tasks[i];
        let y = &ys[i];
        for (j, (&r, &s)) in t.rows.iter().zip(&t.scales).enumerate() {
            for (c, o) in out.row_mut(r).iter_mut().enumerate() {
                *o += s * y[c * t.m + j];
            }
        }
    }
    Ok(())
}

/// Per task, `silu(gate · x) * (up · x)` as row-major `[m, inter]`.
fn gate_up(level: SimdLevel, tasks: &[Task<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
    // Column-major [inter, m] while the blocks are written (each block contiguous).
    let mut cm: Vec<Vec<f32>> = tasks.iter().map(|t| vec![0.0; t.gate.rows * t.m]).collect();
    blocks(&mut cm, tasks, GATE_UP_BLOCK)
        .into_par_iter()
        .map(|(i, r0, block)| {
            let t = &tasks[i];
            let n = block.len() / t.m;
            let (k, m) = (t.gate.cols, t.m);
            let mut up = vec![0.0f32; block.len()];
            let ok = dot_rows(
                level,
                t.gate.dtype,
                t.gate.rows(r0, r0 + n),
                k,
                &t.xs,
                m,
                block,
            ) && dot_rows(
                level,
                t.up.dtype,
                t.up.rows(r0, r0 + n),
                k,
                &t.xs,
                m,
                &mut up,
            );
            if !ok {
                return Err(kernel_err(t.expert, "gate/up"));
            }
            for (g, u) in block.iter_mut().zip(&up) {
                *g = silu(*g) * u;
            }
            Ok(())
        })
        .collect::<Result<(), BackendError>>()?;
    Ok(tasks
        .iter()
        .zip(cm)
        .map(|(t, c)| transpose(&c, t.gate.rows, t.m))
        .collect())
}

/// Per task, `down · act` as column-major `[hidden, m]`.
fn down(
    level: SimdLevel,
    tasks: &[Task<'_>],
    acts: &[Vec<f32>],
) -> Result<Vec<Vec<f32>>, BackendError> {
    let mut ys: Vec<Vec<f32>> = tasks.iter().map(|t| vec![0.0; t.down.rows * t.m]).collect();
    blocks(&mut ys, tasks, DOWN_BLOCK)
        .into_par_iter()
        .map(|(i, r0, block)| {
            let t = &tasks[i];
            let n = block.len() / t.m;
            let d = &t.down;
            if !dot_rows(
                level,
                d.dtype,
                d.rows(r0, r0 + n),
                d.cols,
                &acts[i],
                t.m,
                block,
            ) {
                return Err(kernel_err(t.expert, "down"));
            }
            Ok(())
        })
        .collect::<Result<(), BackendError>>()?;
    Ok(ys)
}

/// The threads' jobs over column-major outputs `[n, m]` (one per task): (task, first weight
/// row, its block of `block` weight rows' outputs).
fn blocks<'b>(
    bufs: &'b mut [Vec<f32>],
    tasks: &[Task<'_>],
    block: usize,
) -> Vec<(usize, usize, &'b mut [f32])> {
    bufs.iter_mut()
        .enumerate()
        .flat_map(|(i, buf)| {
            buf.chunks_mut(block * tasks[i].m)
                .enumerate()
                .map(move |(b, c)| (i, b * block, c))
        })
        .collect()
}

/// Row-major `[m, n]` from column-major `[n, m]`.
fn transpose(cm: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * m];
    for (c, col) in cm.chunks_exact(m.max(1)).enumerate().take(n) {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + c] = v;
        }
    }
    out
}

fn kernel_err(expert: usize, what: &str) -> BackendError {
    BackendError::ExpertLayout {
        expert,
        detail: format!("its {what} weights do not fit the kernel's shapes"),
    }
}
