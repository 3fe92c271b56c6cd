//! Routing on the device. Once every expert of a layer is resident, the layer gets a table of
//! its experts' projection addresses; the router's decision then goes straight from the route
//! kernel through `moe_plan` (kernels/experts.cu) to the expert kernels, and a step never waits
//! on the host. The decisions are kept in a [`CudaRoutingLog`] and come back once per step.

use cudarc::driver::{CudaSlice, LaunchConfig};
use tileflow_engine::backend::{check, Backend, BackendError, ExpertBytes, ExpertRef, Routing};
use tileflow_engine::dtype::Dtype;

use super::experts::{launch_route, projection_ptr, run_experts, ExpertLists};
use super::{dev_err, int, shape_err, CudaAct, CudaBackend, STATIC_SMEM};
use crate::cuda::device::Kernel;

/// One layer's experts in VRAM: gate, up and down addresses of expert `e` at `3e..3e + 3`.
#[derive(Debug)]
pub struct CudaExpertTable {
    experts: usize,
    hidden: usize,
    inter: usize,
    dtype: Dtype,
    /// Every address a multiple of 16 (vector loads).
    aligned: bool,
    ptrs: CudaSlice<u64>,
}

/// A step's routing decisions in VRAM: per entry, `tokens * top_k` experts then as many
/// weights (f32 bits).
#[derive(Debug)]
pub struct CudaRoutingLog {
    entries: usize,
    tokens: usize,
    top_k: usize,
    renormalize: bool,
    data: CudaSlice<u32>,
}

impl CudaRoutingLog {
    /// Choices per entry.
    fn choices(&self) -> usize {
        self.tokens * self.top_k
    }
}

pub(super) fn expert_table(
    be: &CudaBackend,
    experts: &[ExpertRef<'_>],
) -> Result<Option<CudaExpertTable>, BackendError> {
    let Some(first) = experts.first() else {
        return Ok(None);
    };
    if plan_smem(experts.len(), 0, false).is_none() {
        // Too many experts for the planning block's shared memory: route on the host.
        return Ok(None);
    }
    let [inter, hidden] = first.gate.shape;
    let dtype = first.dtype;
    let mut ptrs = Vec::with_capacity(3 * experts.len());
    for (e, r) in experts.iter().enumerate() {
        let ExpertBytes::Device(d) = r.bytes else {
            return Ok(None);
        };
        if r.dtype != dtype || r.gate.shape[0] != inter {
            return Err(BackendError::ExpertLayout {
                expert: e,
                detail: "experts of one layer differ in element type or width".into(),
            });
        }
        let at = |name, p, shape| projection_ptr(d.ptr, d.len, dtype, e, name, p, shape);
        ptrs.push(at("gate", &r.gate, [inter, hidden])?);
        ptrs.push(at("up", &r.up, [inter, hidden])?);
        ptrs.push(at("down", &r.down, [hidden, inter])?);
    }
    let aligned = ptrs.iter().all(|p| p % 16 == 0);
    let ptrs = be
        .dev
        .compute
        .clone_htod(&ptrs)
        .map_err(dev_err("expert table"))?;
    Ok(Some(CudaExpertTable {
        experts: experts.len(),
        hidden,
        inter,
        dtype,
        aligned,
        ptrs,
    }))
}

pub(super) fn routing_log(
    be: &CudaBackend,
    entries: usize,
    tokens: usize,
    top_k: usize,
    renormalize: bool,
) -> Result<CudaRoutingLog, BackendError> {
    let n = entries
        .checked_mul(tokens)
        .and_then(|v| v.checked_mul(2 * top_k))
        .ok_or_else(|| shape_err("routing_log", "size overflows".into()))?;
    // Unwritten entries read back as expert 0 with weight 0 (a step that failed early).
    let data =
        be.dev
            .compute
            .alloc_zeros::<u32>(n.max(1))
            .map_err(|_| BackendError::OutOfMemory {
                what: format!("routing log of {entries} x {tokens} x {top_k}"),
            })?;
    Ok(CudaRoutingLog {
        entries,
        tokens,
        top_k,
        renormalize,
        data,
    })
}

/// Threads of the planning block.
const PLAN_THREADS: u32 = 256;

/// Bytes of shared memory `moe_plan` needs for `ne` experts with `staged` choices (0: none
/// staged) and routing in the block or not (kernels/experts.cu lays it out); `None` past the
/// limit.
fn plan_smem(ne: usize, staged: usize, route_here: bool) -> Option<u32> {
    let words = 3 * ne
        + 3 * staged
        + if route_here {
            (PLAN_THREADS as usize / 32) * ne
        } else {
            0
        };
    // + the kernel's two static u32.
    let bytes = 4 * words + 8;
    (bytes <= STATIC_SMEM).then_some(bytes as u32 - 8)
}
/// Rows up to which the planning block routes them itself (two per warp).
const PLAN_ROUTE_ROWS: usize = 16;
/// Experts up to which the routers' probabilities fit the planning block's shared memory.
const PLAN_ROUTE_EXPERTS: usize = 512;
/// Choices up to which the planning block works on them in shared memory.
const PLAN_STAGED_CHOICES: usize = 1024;

pub(super) fn route_experts(
    be: &CudaBackend,
    logits: &CudaAct,
    table: &CudaExpertTable,
    x: &CudaAct,
    log: &mut CudaRoutingLog,
    entry: usize,
) -> Result<CudaAct, BackendError> {
    let op = "route_experts";
    check::route(table.experts, log.top_k)?;
    if logits.rows != x.rows
        || logits.rows != log.tokens
        || logits.cols != table.experts
        || x.cols != table.hidden
        || entry >= log.entries
    {
        return Err(shape_err(
            op,
            format!(
                "logits [{}, {}], x [{}, {}], {} experts of width {}, log entry {entry} of {} \
                 for {} tokens",
                logits.rows,
                logits.cols,
                x.rows,
                x.cols,
                table.experts,
                table.hidden,
                log.entries,
                log.tokens
            ),
        ));
    }
    let n = log.choices();
    if n == 0 {
        return Backend::zeros(be, x.rows, x.cols);
    }
    let (top_k, renormalize) = (log.top_k, log.renormalize);
    let mut seg = log.data.slice_mut(entry * 2 * n..(entry + 1) * 2 * n);
    let (mut chosen, mut weights) = seg.split_at_mut(n);
    if x.cols == 0 || table.inter == 0 {
        // Nothing to compute, but the decision is still logged.
        launch_route(be, logits, top_k, renormalize, &mut chosen, &mut weights)?;
        return Backend::zeros(be, x.rows, x.cols);
    }
    // Few rows: the planning block routes them itself (one launch fewer); many: one block per
    // row first.
    let route_here = x.rows <= PLAN_ROUTE_ROWS
        && table.experts <= PLAN_ROUTE_EXPERTS
        && plan_smem(table.experts, 0, true).is_some();
    if !route_here {
        launch_route(be, logits, top_k, renormalize, &mut chosen, &mut weights)?;
    }
    let staged = n <= PLAN_STAGED_CHOICES && plan_smem(table.experts, n, route_here).is_some();
    let selected = n.min(table.experts);
    let rows = x.rows;
    // ptrs (two u32 per address, first so they are 8-byte aligned) | starts | assign | scales |
    // row_starts | row_assign | slot_of (scratch).
    let o_starts = 6 * selected;
    let o_assign = o_starts + selected + 1;
    let o_scales = o_assign + n;
    let o_row_starts = o_scales + n;
    let o_row_assign = o_row_starts + rows + 1;
    let o_slot_of = o_row_assign + n;
    let len = o_slot_of + n;
    let s = &be.dev.compute;
    // SAFETY: moe_plan writes every entry of every list (see kernels/experts.cu).
    let mut plan = unsafe { s.alloc::<u32>(len) }.map_err(|_| BackendError::OutOfMemory {
        what: format!("{op}: plan of {n} choices"),
    })?;
    let (ni, ki, ri, ei, si) = (
        int(op, n)?,
        int(op, top_k)?,
        int(op, rows)?,
        int(op, table.experts)?,
        int(op, selected)?,
    );
    let (renorm, staged_i) = (i32::from(renormalize), i32::from(staged));
    let smem =
        plan_smem(table.experts, if staged { n } else { 0 }, route_here).ok_or_else(|| {
            shape_err(
                op,
                format!("{} experts do not fit shared memory", table.experts),
            )
        })?;
    {
        let (mut ptrs, mut rest) = plan.split_at_mut(o_starts);
        let (mut starts, mut rest) = rest.split_at_mut(o_assign - o_starts);
        let (mut assign, mut rest) = rest.split_at_mut(n);
        let (mut scales, mut rest) = rest.split_at_mut(n);
        let (mut row_starts, mut rest) = rest.split_at_mut(rows + 1);
        let (mut row_assign, mut slot_of) = rest.split_at_mut(n);
        let null = 0u64;
        let mut b = be.dev.launch(Kernel::MoePlan);
        if route_here {
            b.arg(&logits.data);
        } else {
            b.arg(&null);
        }
        b.arg(&renorm)
            .arg(&mut chosen)
            .arg(&mut weights)
            .arg(&ni)
            .arg(&ki)
            .arg(&ri)
            .arg(&ei)
            .arg(&si)
            .arg(&staged_i)
            .arg(&table.ptrs)
            .arg(&mut ptrs)
            .arg(&mut starts)
            .arg(&mut assign)
            .arg(&mut scales)
            .arg(&mut row_starts)
            .arg(&mut row_assign)
            .arg(&mut slot_of);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (PLAN_THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: moe_plan(logits, renorm, experts, weights, n, k, rows, ne, maxsel, staged,
        // table, ptrs, starts, assign, scales, row_starts, row_assign, slot_of): logits (when
        // not null) is rows * ne, the choices hold n = rows * k entries each, the table 3 * ne
        // addresses; the outputs are sized 3 * maxsel u64, maxsel + 1, n, n, rows + 1, n and n
        // as the kernel writes them; maxsel = min(n, ne) bounds the distinct experts chosen;
        // shared memory is sized as the kernel lays it out for `staged` and `logits`.
        unsafe { b.launch(cfg) }.map_err(dev_err(op))?;
    }
    let lists = ExpertLists {
        ptrs: plan.slice(0..o_starts),
        starts: plan.slice(o_starts..o_assign),
        assign: plan.slice(o_assign..o_scales),
        scales: plan.slice(o_scales..o_row_starts),
        row_starts: plan.slice(o_row_starts..o_row_assign),
        row_assign: plan.slice(o_row_assign..o_slot_of),
    };
    let mut out = be.alloc_act(op, x.rows, x.cols)?;
    run_experts(
        be,
        x,
        &lists,
        (selected, n),
        (table.inter, table.dtype, table.aligned),
        (&mut out, true),
    )?;
    Ok(out)
}

pub(super) fn read_routing_log(
    be: &CudaBackend,
    log: &CudaRoutingLog,
) -> Result<Vec<Routing>, BackendError> {
    let s = &be.dev.compute;
    let host = s
        .clone_dtoh(&log.data)
        .map_err(dev_err("read_routing_log"))?;
    s.synchronize().map_err(dev_err("read_routing_log"))?;
    let n = log.choices();
    Ok((0..log.entries)
        .map(|i| {
            let at = i * 2 * n;
            Routing {
                top_k: log.top_k,
                experts: host[at..at + n].to_vec(),
                weights: host[at + n..at + 2 * n]
                    .iter()
                    .map(|&b| f32::from_bits(b))
                    .collect(),
            }
        })
        .collect())
}
