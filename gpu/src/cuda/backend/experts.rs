//! The ops that take host-side plans: attention over block tables, the router, and the routed
//! experts read from their slots.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use tileflow_engine::backend::{
    check, AttentionPlan, BackendError, ExpertBytes, ExpertWork, Routing,
};
use tileflow_engine::dtype::Dtype;
use tileflow_engine::pack::ProjectionExtent;

use super::{
    dev_err, dtype_code, elementwise, grid_dim, int, shape_err, split_k, CudaAct, CudaBackend,
    CudaKvPool, MAX_ONE_ROW_COLUMNS, ONE_ROW_WARPS_PER_SM,
};
use crate::cuda::device::Kernel;

/// Warps per block of the expert kernels (one output column each).
const EXPERT_WARPS: u32 = 8;

/// Most assignments of one row the one-token down-and-combine kernel takes (`COMBINE_MAX` in
/// kernels/experts.cu).
const COMBINE_MAX: usize = 64;
/// Warps per block of attention (see kernels/attention.cu).
const ATT_WARPS: u32 = 16;
/// Widest head attention handles (32 lanes × ATT_DIMS).
const ATT_MAX_HEAD_DIM: usize = 256;

pub(super) fn attention(
    be: &CudaBackend,
    q: &CudaAct,
    pool: &CudaKvPool,
    layer: usize,
    plan: &AttentionPlan,
) -> Result<CudaAct, BackendError> {
    let (heads, kv_heads, hd) = (plan.num_heads, plan.num_kv_heads, plan.head_dim);
    let layout = &pool.layout;
    check::attention(layout, layer, (q.rows, q.cols), plan)?;
    if hd > ATT_MAX_HEAD_DIM {
        return Err(shape_err(
            "attention",
            format!("head_dim {hd} is over the {ATT_MAX_HEAD_DIM} the kernel handles"),
        ));
    }
    // Per row: its position, the first key it sees, and where its chunk's blocks start in
    // the concatenated block tables.
    let mut pos = vec![0u32; q.rows];
    let mut lo = vec![0u32; q.rows];
    let mut table_off = vec![0u32; q.rows];
    let mut tables: Vec<u32> = Vec::new();
    for c in &plan.chunks {
        let off = u32::try_from(tables.len())
            .map_err(|_| shape_err("attention", "block tables too long".into()))?;
        tables.extend_from_slice(&c.blocks);
        for i in 0..c.rows {
            let p = c.start_pos + i;
            let r = c.first_row + i;
            pos[r] =
                u32::try_from(p).map_err(|_| shape_err("attention", format!("position {p}")))?;
            lo[r] = plan.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w)) as u32;
            table_off[r] = off;
        }
    }
    let mut out = be.alloc_act("attention", q.rows, q.cols)?;
    if q.rows == 0 || heads == 0 || tables.is_empty() {
        return Ok(out);
    }
    // One upload per step (the same for every layer but where windows differ).
    let rows = q.rows;
    let mut meta = pos;
    meta.extend_from_slice(&lo);
    meta.extend_from_slice(&table_off);
    meta.extend_from_slice(&tables);
    let d_meta = be.upload_cached("attention", &meta)?;
    let d_pos = d_meta.slice(0..rows);
    let d_lo = d_meta.slice(rows..2 * rows);
    let d_off = d_meta.slice(2 * rows..3 * rows);
    let d_tables = d_meta.slice(3 * rows..);
    let (h, kvh, d, bsi) = (
        int("attention", heads)?,
        int("attention", kv_heads)?,
        int("attention", hd)?,
        int("attention", layout.block_size)?,
    );
    let scale = plan.scale;
    let cfg = LaunchConfig {
        grid_dim: (h as u32, q.rows as u32, 1),
        block_dim: (32 * ATT_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = be.dev.launch(Kernel::Attention);
    b.arg(&q.data)
        .arg(&pool.k[layer])
        .arg(&pool.v[layer])
        .arg(&d_pos)
        .arg(&d_lo)
        .arg(&d_off)
        .arg(&d_tables)
        .arg(&h)
        .arg(&kvh)
        .arg(&d)
        .arg(&bsi)
        .arg(&scale)
        .arg(&mut out.data);
    // SAFETY: attention(...): q and out are rows * heads * hd; every row has a position whose
    // blocks (checked < num_blocks, enough of them for the position) index the layer's pools of
    // slots * kv_heads * hd floats; hd <= 256 as the kernel assumes.
    unsafe { b.launch(cfg) }.map_err(dev_err("attention"))?;
    Ok(out)
}

pub(super) fn route(
    be: &CudaBackend,
    logits: &CudaAct,
    top_k: usize,
    renormalize: bool,
) -> Result<Routing, BackendError> {
    let e = logits.cols;
    check::route(e, top_k)?;
    let n = logits.rows * top_k;
    let s = &be.dev.compute;
    if n == 0 {
        return Ok(Routing {
            top_k,
            experts: Vec::new(),
            weights: Vec::new(),
        });
    }
    // Experts then weights (as f32 bits) in one buffer: one copy back.
    // SAFETY: the kernel writes all 2n entries.
    let mut both = unsafe { s.alloc::<u32>(2 * n) }.map_err(dev_err("route"))?;
    {
        let (mut experts, mut weights) = both.split_at_mut(n);
        launch_route(be, logits, top_k, renormalize, &mut experts, &mut weights)?;
    }
    let mut host = s.clone_dtoh(&both).map_err(dev_err("route"))?;
    s.synchronize().map_err(dev_err("route"))?;
    let weights = host.split_off(n).into_iter().map(f32::from_bits).collect();
    let experts = host;
    Ok(Routing {
        top_k,
        experts,
        weights,
    })
}

/// The router kernel on `logits` (`[rows, e]`, `top_k` checked ≤ e), writing `rows * top_k`
/// experts and weights.
pub(super) fn launch_route(
    be: &CudaBackend,
    logits: &CudaAct,
    top_k: usize,
    renormalize: bool,
    experts: &mut CudaViewMut<'_, u32>,
    weights: &mut CudaViewMut<'_, u32>,
) -> Result<(), BackendError> {
    let e = logits.cols;
    let n = logits.rows * top_k;
    if experts.len() < n || weights.len() < n {
        return Err(shape_err(
            "route",
            format!("room for fewer than {n} choices"),
        ));
    }
    let smem = u32::try_from(e * 4)
        .ok()
        .filter(|&b| b <= 48 * 1024)
        .ok_or_else(|| shape_err("route", format!("{e} experts do not fit shared memory")))?;
    let (ei, ki, renorm) = (
        int("route", e)?,
        int("route", top_k)?,
        i32::from(renormalize),
    );
    let cfg = LaunchConfig {
        grid_dim: (logits.rows as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut b = be.dev.launch(Kernel::Route);
    b.arg(&logits.data)
        .arg(&ei)
        .arg(&ki)
        .arg(&renorm)
        .arg(experts)
        .arg(weights);
    // SAFETY: route(logits, e, k, renorm, experts, weights): logits is rows * e, the outputs
    // hold at least rows * k each (checked), shared memory holds e floats.
    unsafe { b.launch(cfg) }.map_err(dev_err("route"))?;
    Ok(())
}

/// Device address of one projection of `w`, checked against its shape and extent.
pub(super) fn projection_ptr(
    base: u64,
    len: usize,
    dtype: Dtype,
    expert: usize,
    name: &str,
    p: &ProjectionExtent,
    shape: [usize; 2],
) -> Result<u64, BackendError> {
    let layout_err = |detail: String| BackendError::ExpertLayout { expert, detail };
    if p.shape != shape {
        return Err(layout_err(format!(
            "{name} has shape {:?}, expected {shape:?}",
            p.shape
        )));
    }
    let bytes = shape[0] * shape[1] * dtype.size();
    let start = usize::try_from(p.offset).map_err(|_| layout_err(format!("{name} offset")))?;
    if start.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(layout_err(format!(
            "{name} at {start}+{bytes} is outside its {len} bytes"
        )));
    }
    Ok(base + start as u64)
}

pub(super) fn experts(
    be: &CudaBackend,
    x: &CudaAct,
    work: &[ExpertWork<'_>],
    out: &mut CudaAct,
) -> Result<(), BackendError> {
    if (x.rows, x.cols) != (out.rows, out.cols) {
        return Err(shape_err(
            "experts",
            format!(
                "x [{}, {}] vs out [{}, {}]",
                x.rows, x.cols, out.rows, out.cols
            ),
        ));
    }
    if work.is_empty() || x.cols == 0 {
        return Ok(());
    }
    let s = &be.dev.compute;
    let h = x.cols;
    let inter = work[0].weights.gate.shape[0];
    let dtype = work[0].weights.dtype;
    // Ascending expert order: assignments are numbered expert by expert, so each row's list
    // below is in the order transformers adds the contributions.
    let mut order: Vec<usize> = (0..work.len()).collect();
    order.sort_by_key(|&i| work[i].expert);
    let mut ptrs = Vec::with_capacity(3 * work.len());
    let mut starts = vec![0u32];
    let mut assign_rows: Vec<u32> = Vec::new();
    let mut scales: Vec<f32> = Vec::new();
    // Host bytes (in-memory experts) are uploaded for this call; kept until the kernels ran.
    let mut staged: Vec<CudaSlice<u8>> = Vec::new();
    for &i in &order {
        let w = &work[i];
        let e = w.expert;
        if w.weights.dtype != dtype || w.weights.gate.shape[0] != inter {
            return Err(BackendError::ExpertLayout {
                expert: e,
                detail: "experts of one layer differ in element type or width".into(),
            });
        }
        if w.rows.len() != w.scales.len() {
            return Err(shape_err(
                "experts",
                format!(
                    "expert {e}: {} rows, {} scales",
                    w.rows.len(),
                    w.scales.len()
                ),
            ));
        }
        let (base, len) = match w.weights.bytes {
            ExpertBytes::Device(d) => (d.ptr, d.len),
            ExpertBytes::Host(bytes) => {
                let buf = s
                    .clone_htod(if bytes.is_empty() { &[0u8][..] } else { bytes })
                    .map_err(dev_err("experts"))?;
                let ptr = {
                    use cudarc::driver::DevicePtr;
                    buf.device_ptr(s).0
                };
                staged.push(buf);
                (ptr, bytes.len())
            }
        };
        let wr = &w.weights;
        ptrs.push(projection_ptr(
            base,
            len,
            dtype,
            e,
            "gate",
            &wr.gate,
            [inter, h],
        )?);
        ptrs.push(projection_ptr(
            base,
            len,
            dtype,
            e,
            "up",
            &wr.up,
            [inter, h],
        )?);
        ptrs.push(projection_ptr(
            base,
            len,
            dtype,
            e,
            "down",
            &wr.down,
            [h, inter],
        )?);
        for (&r, &sc) in w.rows.iter().zip(&w.scales) {
            if r >= x.rows {
                return Err(shape_err(
                    "experts",
                    format!("row {r} of {} routed to expert {e}", x.rows),
                ));
            }
            assign_rows.push(r as u32);
            scales.push(sc);
        }
        starts.push(assign_rows.len() as u32);
    }
    let total = assign_rows.len();
    if total == 0 || inter == 0 {
        return Ok(());
    }
    // Per output row, its assignments in ascending expert order (CSR).
    let mut row_starts = vec![0u32; x.rows + 1];
    for &r in &assign_rows {
        row_starts[r as usize + 1] += 1;
    }
    for r in 0..x.rows {
        row_starts[r + 1] += row_starts[r];
    }
    let mut fill = row_starts.clone();
    let mut row_assign = vec![0u32; total];
    for (a, &r) in assign_rows.iter().enumerate() {
        row_assign[fill[r as usize] as usize] = a as u32;
        fill[r as usize] += 1;
    }

    // Everything the kernels need in one upload: the projection addresses (u64, first, so
    // aligned), then the assignment lists.
    let n = work.len();
    let mut blob: Vec<u32> = Vec::with_capacity(6 * n + 4 * total + n + x.rows + 2);
    for p in &ptrs {
        blob.extend_from_slice(&[*p as u32, (*p >> 32) as u32]);
    }
    let at = |blob: &Vec<u32>| blob.len();
    let o_starts = at(&blob);
    blob.extend_from_slice(&starts);
    let o_assign = at(&blob);
    blob.extend_from_slice(&assign_rows);
    let o_scales = at(&blob);
    blob.extend(scales.iter().map(|v| v.to_bits()));
    let o_row_starts = at(&blob);
    blob.extend_from_slice(&row_starts);
    let o_row_assign = at(&blob);
    blob.extend_from_slice(&row_assign);
    let d_blob = be.upload_u32("experts", &blob)?;

    let lists = ExpertLists {
        ptrs: d_blob.slice(0..o_starts),
        starts: d_blob.slice(o_starts..o_assign),
        assign: d_blob.slice(o_assign..o_scales),
        scales: d_blob.slice(o_scales..o_row_starts),
        row_starts: d_blob.slice(o_row_starts..o_row_assign),
        row_assign: d_blob.slice(o_row_assign..),
    };
    // The one-token kernels compute one assignment per expert, reading 16-byte aligned rows.
    let one_row_ok = ptrs.iter().all(|p| p % 16 == 0) && work.iter().all(|w| w.rows.len() <= 1);
    run_experts(
        be,
        x,
        &lists,
        (work.len(), total),
        (inter, dtype, one_row_ok),
        (out, false),
    )?;
    drop(staged);
    Ok(())
}

/// The work lists the expert kernels read (see kernels/experts.cu): per selected expert its
/// three projection addresses (`ptrs`, two u32 each) and first assignment (`starts`); per
/// assignment its row and combine weight (`assign`, `scales` as f32 bits); per row its
/// assignments in ascending expert order (`row_starts`, `row_assign`).
pub(super) struct ExpertLists<'a> {
    pub(super) ptrs: CudaView<'a, u32>,
    pub(super) starts: CudaView<'a, u32>,
    pub(super) assign: CudaView<'a, u32>,
    pub(super) scales: CudaView<'a, u32>,
    pub(super) row_starts: CudaView<'a, u32>,
    pub(super) row_assign: CudaView<'a, u32>,
}

/// Gathers the assigned rows of `x`, runs gate·up, down and the combine into `out` for
/// `selected` expert entries and `total` assignments of `[inter, hidden]` experts in `dtype`
/// (`one_row_ok`: every projection address a multiple of 16 and at most one assignment per
/// expert, so a one-row step may take the one-token kernels); `fresh`: `out` is overwritten
/// with the sums instead of added to.
pub(super) fn run_experts(
    be: &CudaBackend,
    x: &CudaAct,
    lists: &ExpertLists<'_>,
    (selected, total): (usize, usize),
    (inter, dtype, one_row_ok): (usize, Dtype, bool),
    (out, fresh): (&mut CudaAct, bool),
) -> Result<(), BackendError> {
    let one_row = x.rows == 1
        && dtype != Dtype::F32
        && one_row_ok
        && x.cols.is_multiple_of(8)
        && inter % 8 == 0
        && total <= COMBINE_MAX;
    let h = x.cols;
    let mut act = be.alloc_act("experts", total, inter)?;
    let (hi, ii, dt) = (
        int("experts", h)?,
        int("experts", inter)?,
        dtype_code(dtype),
    );
    let (rows, fresh) = (int("experts", x.rows)?, i32::from(fresh));
    if one_row {
        one_row_gate_up(be, lists, (selected, h, inter), dtype, x, &mut act)?;
        let bf = i32::from(dtype == Dtype::BF16);
        // Columns per block: as many as still give every SM two blocks.
        let cpb = be.one_row_columns(MAX_ONE_ROW_COLUMNS, 2, |c| h.div_ceil(c));
        let mut b = be.dev.launch(Kernel::experts_down_combine_one_row(cpb));
        b.arg(&act.data)
            .arg(&hi)
            .arg(&ii)
            .arg(&bf)
            .arg(&lists.ptrs)
            .arg(&lists.scales)
            .arg(&lists.row_starts)
            .arg(&lists.row_assign)
            .arg(&mut out.data)
            .arg(&fresh);
        // Groups of cpb columns, all the row's experts in each; a block takes every grid-th
        // group, two blocks per SM.
        let sms = be.dev.info().multiprocessors as usize;
        let mut cfg = expert_cfg(h, cpb, 1)?;
        cfg.grid_dim.0 = cfg.grid_dim.0.min(grid_dim("experts", 2 * sms, "blocks")?);
        // SAFETY: experts_down_combine_one_row_c<cpb>: cpb is 1, 2, 4 or 8 and the blocks
        // stride over the ceil(h / cpb) groups; one row, whose CSR list holds its `total` <=
        // COMBINE_MAX assignments (or NO_ASSIGN), each its expert's only one, so assignment a
        // is entry a of ptrs (< selected) and row a of act (total * inter); out is h floats;
        // 16-bit weights at 16-byte aligned addresses, inter % 8 == 0.
        unsafe { b.launch(cfg) }.map_err(dev_err("experts"))?;
        return Ok(());
    }
    let mut y = be.alloc_act("experts", total, h)?;
    let mut xs = be.alloc_act("experts", total, h)?;
    be.gather(x, &lists.assign, total, &mut xs)?;
    let split_up = split_k(h, inter * selected);
    let cfg = expert_cfg(inter, EXPERT_WARPS / split_up as u32, selected)?;
    let mut b = be.dev.launch(Kernel::ExpertsGateUp);
    b.arg(&xs.data)
        .arg(&hi)
        .arg(&ii)
        .arg(&dt)
        .arg(&lists.ptrs)
        .arg(&lists.starts)
        .arg(&split_up)
        .arg(&mut act.data);
    // SAFETY: experts_gate_up: xs holds total * h floats, act total * inter; starts has
    // selected + 1 entries within total; every projection address lies, with its [inter, h] /
    // [h, inter] shape, inside its expert's bytes (checked where the lists were built), which
    // stay allocated until the stream ran (slots borrowed by the caller, or staged uploads).
    unsafe { b.launch(cfg) }.map_err(dev_err("experts"))?;

    let split_down = split_k(inter, h * selected);
    let cfg = expert_cfg(h, EXPERT_WARPS / split_down as u32, selected)?;
    let mut b = be.dev.launch(Kernel::ExpertsDown);
    b.arg(&act.data)
        .arg(&hi)
        .arg(&ii)
        .arg(&dt)
        .arg(&lists.ptrs)
        .arg(&lists.starts)
        .arg(&lists.scales)
        .arg(&split_down)
        .arg(&mut y.data);
    // SAFETY: experts_down: act is total * inter, y total * h, scales total; addresses as above.
    unsafe { b.launch(cfg) }.map_err(dev_err("experts"))?;

    let mut b = be.dev.launch(Kernel::ExpertsCombine);
    b.arg(&mut out.data)
        .arg(&y.data)
        .arg(&lists.row_starts)
        .arg(&lists.row_assign)
        .arg(&rows)
        .arg(&hi)
        .arg(&fresh);
    // SAFETY: experts_combine: out is rows * h, y total * h, the CSR lists every assignment
    // (< total, or NO_ASSIGN) under its row (< rows).
    unsafe { b.launch(elementwise(x.rows * h)) }.map_err(dev_err("experts"))?;
    Ok(())
}

/// The launch of an expert kernel over `columns` output columns, `per_block` of them per block
/// of EXPERT_WARPS warps, for each of `selected` experts.
fn expert_cfg(
    columns: usize,
    per_block: u32,
    selected: usize,
) -> Result<LaunchConfig, BackendError> {
    Ok(LaunchConfig {
        grid_dim: (
            grid_dim(
                "experts",
                columns.div_ceil(per_block as usize),
                "blocks of columns",
            )?,
            grid_dim("experts", selected, "selected experts")?,
            1,
        ),
        block_dim: (32 * EXPERT_WARPS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// gate·up for a one-token step of 16-bit experts (one warp per output column, whole rows in
/// flight), reading x's row through the assignment list.
fn one_row_gate_up(
    be: &CudaBackend,
    lists: &ExpertLists<'_>,
    (selected, h, inter): (usize, usize, usize),
    dtype: Dtype,
    x: &CudaAct,
    act: &mut CudaAct,
) -> Result<(), BackendError> {
    let (hi, ii) = (int("experts", h)?, int("experts", inter)?);
    let bf = i32::from(dtype == Dtype::BF16);
    // A warp streams its columns' gate and up rows together: at most half the rows of a chunk.
    // Half the one-row kernels' warps per SM: measured on an H100 (OLMoE's 8 experts of
    // [1024, 2048]), four columns a warp beat two.
    let cpw = be.one_row_columns(MAX_ONE_ROW_COLUMNS / 2, ONE_ROW_WARPS_PER_SM / 2, |c| {
        selected * inter.div_ceil(c)
    });
    let mut b = be.dev.launch(Kernel::experts_gate_up_one_row(cpw));
    b.arg(&x.data)
        .arg(&lists.assign)
        .arg(&hi)
        .arg(&ii)
        .arg(&bf)
        .arg(&lists.ptrs)
        .arg(&lists.starts)
        .arg(&mut act.data);
    // SAFETY: experts_gate_up_one_row_c<cpw>: as experts_gate_up, reading x (rows * h) at the rows
    // `assign` names (< rows), with at most one assignment per expert (one token), 16-bit
    // weights at 16-byte aligned addresses and h % 8 == 0; cpw is 1, 2 or 4 and the grid
    // covers ceil(inter / cpw) warps per expert.
    unsafe { b.launch(expert_cfg(inter, EXPERT_WARPS * cpw, selected)?) }
        .map_err(dev_err("experts"))
        .map(drop)
}
