//! Shape checks of the backend ops, shared by every backend so that all of them refuse the same
//! inputs with the same messages. Shapes are `(rows, cols)`.

use super::{AttentionPlan, BackendError};
use crate::kv::KvLayout;

fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// Two operands of `op` that must have one shape.
pub fn same_shape(
    op: &'static str,
    a: (usize, usize),
    b: (usize, usize),
) -> Result<(), BackendError> {
    if a != b {
        return Err(shape_err(
            op,
            format!("[{}, {}] vs [{}, {}]", a.0, a.1, b.0, b.1),
        ));
    }
    Ok(())
}

/// An RMSNorm (`op`) of rows of `cols` by a weight of `weight` elements: one group per weight
/// width, so the width must divide the rows.
pub fn norm(op: &'static str, cols: usize, weight: usize) -> Result<(), BackendError> {
    if weight == 0 || !cols.is_multiple_of(weight) {
        return Err(shape_err(
            op,
            format!("weight of {weight} does not divide rows of {cols}"),
        ));
    }
    Ok(())
}

/// `linear` of `x` by `weight` (`[n, k]`) with a bias of `bias` elements.
pub fn linear(
    x: (usize, usize),
    weight: (usize, usize),
    bias: Option<usize>,
) -> Result<(), BackendError> {
    if x.1 != weight.1 {
        return Err(shape_err(
            "linear",
            format!("x has {} columns, weight [{}, {}]", x.1, weight.0, weight.1),
        ));
    }
    if let Some(b) = bias.filter(|&b| b != weight.0) {
        return Err(shape_err(
            "linear",
            format!("bias of {b} for {} outputs", weight.0),
        ));
    }
    Ok(())
}

/// `gather_rows` of `rows` from a matrix of `n` rows.
pub fn rows_within(rows: &[usize], n: usize) -> Result<(), BackendError> {
    match rows.iter().find(|&&r| r >= n) {
        Some(r) => Err(shape_err("gather_rows", format!("row {r} of {n}"))),
        None => Ok(()),
    }
}

/// `write_kv` of `k` and `v` (`[rows, cols]` each) into `layer` at `slots`.
pub fn write_kv(
    layout: &KvLayout,
    layer: usize,
    k: (usize, usize),
    v: (usize, usize),
    slots: &[usize],
) -> Result<(), BackendError> {
    let width = layout.slot_width();
    let n_slots = layout.slots();
    same_shape("write_kv", k, v)?;
    if k.1 != width || k.0 != slots.len() || layer >= layout.num_layers {
        return Err(shape_err(
            "write_kv",
            format!(
                "k [{}, {}] with {} slots into layer {layer} of slot width {width}",
                k.0,
                k.1,
                slots.len()
            ),
        ));
    }
    if let Some(bad) = slots.iter().find(|&&s| s >= n_slots) {
        return Err(shape_err("write_kv", format!("slot {bad} of {n_slots}")));
    }
    Ok(())
}

/// `attention` of `q` (`[rows, cols]`) over `layer`'s pool by `plan`: every row in a chunk,
/// every position of a chunk in its blocks, every block in the pool. Returns the chunk of
/// each row.
pub fn attention(
    layout: &KvLayout,
    layer: usize,
    q: (usize, usize),
    plan: &AttentionPlan,
) -> Result<Vec<usize>, BackendError> {
    let (heads, kv_heads, hd) = (plan.num_heads, plan.num_kv_heads, plan.head_dim);
    if q.1 != heads * hd
        || kv_heads == 0
        || heads % kv_heads != 0
        || layout.slot_width() != kv_heads * hd
        || layer >= layout.num_layers
    {
        return Err(shape_err(
            "attention",
            format!(
                "q [{}, {}] with {heads} heads x {hd}, {kv_heads} kv heads, layer {layer}, pool slot width {}",
                q.0,
                q.1,
                layout.slot_width()
            ),
        ));
    }
    let bs = layout.block_size;
    let mut row_chunk = vec![usize::MAX; q.0];
    for (ci, c) in plan.chunks.iter().enumerate() {
        let last_pos = c.start_pos + c.rows;
        if c.first_row + c.rows > q.0 || last_pos.div_ceil(bs) > c.blocks.len() {
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
    Ok(row_chunk)
}

/// `route` over `experts` columns choosing `top_k`.
pub fn route(experts: usize, top_k: usize) -> Result<(), BackendError> {
    if top_k == 0 || top_k > experts {
        return Err(shape_err(
            "route",
            format!("top_k {top_k} of {experts} experts"),
        ));
    }
    Ok(())
}

/// `add_gated` of `y` into `out` (same shape) under one gate logit per row.
pub fn add_gated(
    out: (usize, usize),
    y: (usize, usize),
    gate: (usize, usize),
) -> Result<(), BackendError> {
    same_shape("add_gated", out, y)?;
    if gate.1 != 1 || gate.0 != out.0 {
        return Err(shape_err(
            "add_gated",
            format!("gate [{}, {}] for {} rows", gate.0, gate.1, out.0),
        ));
    }
    Ok(())
}
